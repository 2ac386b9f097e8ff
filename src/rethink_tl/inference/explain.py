"""``rtl explain RUN_DIR``: where the best checkpoint of a finished run looks, as Grad-CAM maps on test images.

    rtl explain outputs/runs/trunc/random/f1/s0 --label nodule --n 6

For every label (or only ``--label``) three groups of N test images are picked from the run's
``predictions.csv.gz``: the most confident true positives (highest probability among the positives), the
missed positives (lowest probability among the positives) and the false positives (highest probability
among the negatives). Entries whose label is unknown (mask 0) never count. With fewer than 2N positives the
first two groups share images. Each image gets a Grad-CAM map (pytorch_grad_cam) of that label's logit,
taken at the last convolutional block of the trunk (``target_layer``), and the maps go into one grid of
tiles, rows = label x group, written as PNG and PDF to ``--out`` (default RUN_DIR/explain/).

The images are the run's own test images, rebuilt from its config; a rebuilt split whose fingerprint is not
the run's (the data changed since) is refused. Where the dataset knows where its findings are (the synthetic
data paints them: ``data.finding_masks``), the command also says how much of the maps' mass falls inside them.
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..atomic_io import write_bytes
from ..data import finding_masks
from ..errors import UserError
from ..evidence import predictions
from .finished import eval_batcher, load_run, rebuild_data

# (key, row title, how a row is picked); the order of the rows of each label.
GROUPS = (
    ("tp", "highest-scored positives", "positives, highest probability first"),
    ("fn", "lowest-scored positives", "the other positives, lowest probability first"),
    ("fp", "highest-scored negatives", "negatives, highest probability first"),
)
MAX_N = 16  # columns of the grid
# Containers that only chain their children: target_layer looks inside them for the block that does the work.
# Exact types: DenseNet's _Transition subclasses nn.Sequential and _DenseBlock nn.ModuleDict, and both are blocks.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


# --- what to look at ------------------------------------------------------------------------------------------

def _holds_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def target_layer_name(model: nn.Module) -> str:
    """The name (in ``model.trunk``) of the last convolutional block of the trunk: ``target_layer``."""
    name, module = "", model.trunk
    while True:
        # Modules are registered in the order they run in every zoo trunk (tests/test_explain.py checks it
        # with hooks), so the last child holding a convolution is the last one to run.
        children = [(n, c) for n, c in module.named_children() if _holds_conv(c)]
        if not children:
            break
        child_name, module = children[-1]
        name = f"{name}.{child_name}" if name else child_name
        if type(module) not in _CONTAINERS:
            break
    if not name:
        raise UserError(f"model {model.info.name} has no convolution in its trunk: Grad-CAM needs a convolutional "
                        "feature map")
    return name


def target_layer(model: nn.Module) -> nn.Module:
    """The last convolutional block of the (possibly truncated) trunk, the layer whose activations and gradients
    Grad-CAM weighs: ResNet's last bottleneck, DenseNet's last transition (cut) or dense block (whole, slim),
    the stage block a timm trunk is cut after (or its head convolution, whole), a CBR net's last convolution.
    Its output is the trunk's feature map, or (CBR nets) that map before the last max-pool."""
    return model.trunk.get_submodule(target_layer_name(model))


# --- which images ---------------------------------------------------------------------------------------------

def pick(probs: np.ndarray, truth: np.ndarray, counted: np.ndarray, n: int) -> dict[str, list[int]]:
    """Row indices of each group of GROUPS for one label: (N,) probabilities, 0/1 truth and the mask of entries
    that count; at most ``n`` per group, no image in two groups (with fewer than 2n positives the lowest-scored
    group gets what the highest-scored left). Ties keep file order."""
    counted = np.asarray(counted, dtype=bool)
    positive = counted & (np.asarray(truth) > 0.5)
    negative = counted & ~positive
    p = np.asarray(probs, dtype=np.float64)
    pos, neg = np.flatnonzero(positive), np.flatnonzero(negative)
    top = pos[np.argsort(-p[pos], kind="stable")][:n]
    rest = np.setdiff1d(pos, top)
    return {
        "tp": top.tolist(),
        "fn": rest[np.argsort(p[rest], kind="stable")][:n].tolist(),
        "fp": neg[np.argsort(-p[neg], kind="stable")][:n].tolist(),
    }


# --- the maps ---------------------------------------------------------------------------------------------------

@dataclass
class Tile:
    id: str
    prob: float  # from predictions.csv.gz
    truth: int
    image: np.ndarray  # (H, W) float in [0, 1], grey
    cam: np.ndarray  # (H, W) float in [0, 1], at the image's size
    finding: np.ndarray | None = None  # (H, W) bool where the finding was painted (synthetic data only)


@dataclass
class Row:
    label: str
    group: str  # a key of GROUPS
    tiles: list[Tile] = field(default_factory=list)


@dataclass
class Explanation:
    rows: list[Row]
    notes: list[str]  # groups with fewer than n images, and the like
    layer: str
    paths: list[Path] = field(default_factory=list)
    # label -> (share of CAM mass inside the findings, share of the image area they cover, images), true positives
    inside: dict[str, tuple[float, float, int]] = field(default_factory=dict)


def grad_cam(model: nn.Module, images: torch.Tensor, label_index: int, batch_size: int = 32) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] of output ``label_index`` for uint8 images (N, C, H, W), normalised as
    the model was trained (engine.Batcher: ImageNet statistics, grey broadcast to 3 channels)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    info = model.info
    batcher = eval_batcher(model)
    layer = target_layer(model)
    maps = []
    with GradCAM(model=model, target_layers=[layer]) as cam:
        for start in range(0, len(images), batch_size):
            x = batcher(images[start:start + batch_size])
            try:
                with torch.enable_grad():
                    out = cam(input_tensor=x, targets=[ClassifierOutputTarget(label_index)] * len(x))
            except ValueError:
                # A token trunk (ViT): its only convolution embeds patches and emits a sequence, not a map.
                act = cam.activations_and_grads.activations
                if act and act[0].ndim != 4:
                    raise UserError(f"model {info.name}: its last convolutional block ({target_layer_name(model)}) "
                                    f"gives a {act[0].ndim}-d output, not a feature map: Grad-CAM needs a "
                                    "convolutional trunk") from None
                raise
            maps.append(out.astype(np.float32))
    model.zero_grad(set_to_none=True)
    return np.concatenate(maps) if maps else np.zeros((0, *images.shape[-2:]), np.float32)


def _grey(images: torch.Tensor) -> np.ndarray:
    x = images.float().mean(dim=1) / 255.0  # colour shown as grey, like the film it is
    return x.numpy()


def explain(run_dir: str | Path, label: str | None = None, n: int = 4, out: str | Path | None = None,
            write: bool = True) -> Explanation:
    """Pick, map and draw (module docstring); the figure goes to ``out`` (default RUN_DIR/explain/)."""
    if not 1 <= n <= MAX_N:
        raise UserError(f"--n must be 1 to {MAX_N} (images per group, one column each), got {n}")
    run = load_run(run_dir)
    if label is not None and label not in run.labels:
        raise UserError(f"the model of {run.path} has no label {label!r}; its labels: {', '.join(run.labels)}")
    pred = predictions.read(run.path / predictions.PREDICTIONS_FILE)
    if pred.label_names != run.labels:
        raise UserError(f"{pred.path} names labels {pred.label_names}, the model {run.labels}: the file is not this "
                        "run's; run it again with runtime.force=true")
    test = pred.split("test")
    split = rebuild_data(run, "its maps would show other images").test
    where = {i: k for k, i in enumerate(split.ids)}
    missing = [i for i in test.ids if i not in where]
    if missing:
        raise UserError(f"{pred.path} names test images the rebuilt data lacks (e.g. {missing[0]}): run the run "
                        "again with runtime.force=true")

    labels = [label] if label is not None else run.labels
    rows, notes, inside = [], [], {}
    for lab in labels:
        j = run.labels.index(lab)
        groups = pick(test.probs[:, j], test.labels[:, j], test.mask[:, j], n)
        chosen = sorted({r for g in groups.values() for r in g})  # one map per image, even in two groups
        images = split.images[[where[test.ids[r]] for r in chosen]]
        cams = dict(zip(chosen, grad_cam(run.model, images, j)))
        greys = dict(zip(chosen, _grey(images)))
        found = finding_masks(run.cfg.data, "test", [test.ids[r] for r in chosen], lab)
        findings = dict(zip(chosen, found)) if found is not None else {}
        for key, title, how in GROUPS:
            picked = groups[key]
            if len(picked) < n:
                notes.append(f"{lab}: only {len(picked)} {title} to show, not {n} ({how}, among "
                             f"{int(test.mask[:, j].sum())} test images with a known {lab})")
            rows.append(Row(lab, key, [Tile(test.ids[r], float(test.probs[r, j]), int(test.labels[r, j] > 0.5),
                                            greys[r], cams[r], findings.get(r)) for r in picked]))
        tp_row = next(row for row in rows if row.label == lab and row.group == "tp")
        tps = [t for t in tp_row.tiles if t.finding is not None and t.finding.any()]
        if tps:
            mass = float(np.mean([(t.cam * t.finding).sum() / max(float(t.cam.sum()), 1e-12) for t in tps]))
            area = float(np.mean([t.finding.mean() for t in tps]))
            inside[lab] = (mass, area, len(tps))
    result = Explanation(rows, notes, target_layer_name(run.model), inside=inside)
    if write:
        out_dir = Path(out) if out is not None else run.path / "explain"
        columns = max(1, max(len(row.tiles) for row in rows))  # no empty columns when every group is short
        result.paths = _save(_draw(result, run, columns), out_dir, label or "explain")
    return result


# --- the figure -------------------------------------------------------------------------------------------------

def _draw(result: Explanation, run, n: int):
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg renders the files
    from pytorch_grad_cam.utils.image import show_cam_on_image

    titles = {key: title for key, title, _ in GROUPS}
    nrows = len(result.rows)
    fig = Figure(figsize=(1.0 + 1.75 * n, 0.9 + 2.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, n, squeeze=False)
    for r, row in enumerate(result.rows):
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"{row.label}\n{titles[row.group]}", fontsize=8)
            if c >= len(row.tiles):
                for side in ax.spines.values():
                    side.set_visible(False)
                if c == len(row.tiles):
                    ax.text(0.5, 0.5, "none left" if row.tiles else "none", ha="center", va="center",
                            fontsize=8, color="0.4", transform=ax.transAxes)
                continue
            t = row.tiles[c]
            rgb = np.repeat(t.image[..., None], 3, axis=-1).astype(np.float32)
            ax.imshow(show_cam_on_image(rgb, t.cam, use_rgb=True, image_weight=0.6), interpolation="nearest")
            if t.finding is not None and t.finding.any():
                ax.contour(t.finding, levels=[0.5], colors="white", linewidths=0.6)
            ax.set_title(f"{t.id}\np={t.prob:.2f} · truth {t.truth}", fontsize=7)
    size = int(run.cfg.data.image_size)
    title = (f"Grad-CAM of {run.name} on its test images ({size} px), at trunk.{result.layer}; red = high"
             + ("; white outline: the painted finding" if result.inside else ""))
    # About 15 characters of a 9 pt title per inch: wrapped, no line runs off the page.
    fig.suptitle("\n".join(textwrap.wrap(title, max(40, int(fig.get_figwidth() * 15)))), fontsize=9)
    return fig


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for path, fmt in zip(paths, ("png", "pdf")):
        def render(fmt=fmt) -> bytes:
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, dpi=120)
            return buf.getvalue()

        # In memory first, then renamed into place: a full disk never leaves half a figure.
        write_bytes(path, render, option="--out")
    return paths


# --- the command ------------------------------------------------------------------------------------------------

def explain_to_files(run_dir: str, label: str | None, n: int, out: str | None) -> None:
    """``rtl explain``: the maps drawn, then what each row shows, the notes and the files, printed."""
    result = explain(run_dir, label=label, n=n, out=out)
    titles = {key: title for key, title, _ in GROUPS}
    for row in result.rows:
        shown = ", ".join(f"{t.id} (p={t.prob:.3f})" for t in row.tiles) or "none"
        print(f"{row.label}, {titles[row.group]}: {shown}")
    for note in result.notes:
        print(f"note: {note}")
    for lab, (mass, area, count) in result.inside.items():
        print(f"{lab}: CAM mass inside the painted finding: {mass / area:.1f}x its area share ({100 * mass:.0f}% of "
              f"the mass on {100 * area:.1f}% of the image; {count} true positive{'s' if count != 1 else ''} shown)")
    for path in result.paths:
        print(path)
