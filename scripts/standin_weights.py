"""Write *stand-in* "pretrained" weights for the smoke profile of the figure targets:

    .venv/bin/python scripts/standin_weights.py figures/smoke/standin-weights

ImageNet weights for DenseNet121 / ResNet50 cannot be installed offline and the CBR nets have none
at all, yet every figure compares init=pretrained with init=random. So that `make figures
PROFILE=smoke` runs end to end on a fresh machine with no network, this writes, per model name,
a weights file that ``init.weights=DIR/<model>.pth`` accepts: the source architecture
(torchvision densenet121 / resnet50, or the CBR trunk itself) with its default random
initialisation from a fixed seed. They carry no ImageNet features: "TL" in the smoke figures only
proves that the loading path works, and the figures say so.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torchvision

from rethink_tl.models import build_model, model_names

SEED = 20210609  # fixed, so that reruns write the same files and finished smoke runs stay valid
SOURCES = {"densenet121": ("dens_",), "resnet50": ("res_",)}


def source_of(name: str) -> str | None:
    """The weights file a model reads: its torchvision source, its own CBR trunk, or None (timm models)."""
    if name.startswith("cbr_"):
        return name
    if name in ("densenet121", "resnet50"):
        return name
    for arch, prefixes in SOURCES.items():
        if name.startswith(prefixes):
            return arch
    return None


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in model_names():
        source = source_of(name)
        if source is None:
            continue
        target = out / f"{source}.pth"
        if not target.exists():
            torch.manual_seed(SEED)
            if source.startswith("cbr_"):
                state = build_model({"name": source}, num_labels=1).trunk.state_dict()
            else:
                state = getattr(torchvision.models, source)(weights=None).state_dict()
            torch.save(state, target)
            written.append(target)
        link = out / f"{name}.pth"
        if link != target and not link.exists():
            os.symlink(target.name, link)  # relative: the folder can move
    (out / "README.txt").write_text(
        "Stand-in weights for `make figures PROFILE=smoke`: seeded random initialisations, NOT ImageNet weights.\n"
        "<model>.pth links to the file of its source architecture. Written by scripts/standin_weights.py.\n")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for <model>.pth files")
    args = parser.parse_args()
    written = write(args.out)
    print(f"{args.out}: {len(written)} stand-in weights files written (random, not ImageNet)")


if __name__ == "__main__":
    main()
