"""``data=medmnist``: the 2D MedMNIST sets (PneumoniaMNIST, ChestMNIST, ...), official splits.

Files are MedMNIST's own ``.npz`` (keys ``{train,val,test}_images`` — uint8 ``(N, H, W)`` grey or
``(N, H, W, 3)`` RGB — and ``{train,val,test}_labels``, int ``(N, 1)``, or ``(N, 14)`` for the
multi-label ChestMNIST), named ``<flag>.npz`` at 28 px and ``<flag>_<size>.npz`` at 64/128/224 px.

Where the file comes from: ``data.npz=PATH``; else ``data.root`` (default ``~/.medmnist``, the
package's own folder) holding ``<flag>[_<size>].npz``: ``data.size`` picks one, or by default the
smallest one present that is at least ``data.image_size`` (else the largest present). Nothing
present: downloaded there with ``data.download=true`` when the ``medmnist`` package is installed
(its INFO has the URLs and checksums). Offline, put the file there by hand.

Labels as training targets: binary sets give one column named after the positive class
(PneumoniaMNIST: ``pneumonia``); multi-label sets one column per label; multi-class and ordinal
sets one one-vs-rest column per class. Names come from ``medmnist.INFO`` when the package is
installed, else from a built-in table of the chest sets; for any other ``.npz`` they are
``class_<k>``. The arrays are used as they are (no decode cache: they are already uint8); a size
other than ``data.image_size`` is resized once with antialiased bilinear interpolation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Mapping
from zipfile import BadZipFile

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from .registry import register_dataset
from .base import DataBundle, Split, SplitPlan

log = logging.getLogger(__name__)

SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
# The chest sets, as in medmnist 3.0's INFO; used when the package is not installed.
BUILTIN_INFO: dict[str, dict] = {
    "pneumoniamnist": {"task": "binary-class", "label": {"0": "normal", "1": "pneumonia"}, "n_channels": 1},
    "chestmnist": {
        "task": "multi-label, binary-class", "n_channels": 1,
        "label": {str(i): name for i, name in enumerate((
            "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
            "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"))},
    },
}


def medmnist_info() -> dict[str, dict]:
    """``medmnist.INFO`` if the package is installed, else the built-in chest sets."""
    try:
        # medmnist.info alone: the package's __init__ also imports its torch datasets and scikit-image.
        from medmnist.info import INFO
    except ImportError:
        return BUILTIN_INFO
    return INFO


def _flag(cfg: Mapping) -> str:
    flag = str(cfg.flag).lower()
    if flag.endswith("3d"):
        raise UserError(f"data.flag={flag} is a 3D MedMNIST set; only the 2D sets are supported")
    return flag


def _file_name(flag: str, size: int) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def _npz_path(cfg: Mapping, flag: str) -> Path:
    if cfg.npz:
        path = Path(str(cfg["npz"])).expanduser()
        if not path.is_file():
            raise UserError(f"data.npz={path} does not exist")
        return path
    root = Path(str(cfg.root or "~/.medmnist")).expanduser()
    if cfg.size:
        size = int(cfg["size"])
        if size not in SIZES:
            raise UserError(f"data.size must be one of {', '.join(map(str, SIZES))}, got {size}")
        wanted = [size]
    else:
        present = [s for s in SIZES if (root / _file_name(flag, s)).is_file()]
        want = int(cfg.image_size)
        fits = [s for s in present if s >= want]
        if present:
            return root / _file_name(flag, min(fits) if fits else max(present))
        wanted = [next((s for s in SIZES if s >= want), SIZES[-1])]
    path = root / _file_name(flag, wanted[0])
    if not path.is_file():
        _download(cfg, flag, wanted[0], path)
    return path


def _download(cfg: Mapping, flag: str, size: int, path: Path) -> None:
    how = f"put {path.name} (from the MedMNIST site) in {path.parent}, or point data.npz at it"
    info = medmnist_info()
    if not cfg.download:
        raise UserError(f"{path} does not exist and data.download=false: {how}")
    key = "url" if size == 28 else f"url_{size}"
    if info is BUILTIN_INFO or key not in info.get(flag, {}):
        raise UserError(f"{path} does not exist and cannot be downloaded without the medmnist package "
                        f"(pip install 'rethink-tl[medmnist]'): {how}")
    from torchvision.datasets.utils import download_url

    log.info("downloading %s to %s", path.name, path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        md5 = info[flag].get("MD5" if size == 28 else f"MD5_{size}")
        download_url(info[flag][key], str(path.parent), filename=path.name, md5=md5)
    except (OSError, RuntimeError, ValueError) as err:
        raise UserError(f"could not download {path.name} ({err}): {how}") from None


def _task_and_names(cfg: Mapping, flag: str) -> tuple[str, list[str]]:
    info = medmnist_info().get(flag)
    if info is not None:
        names = [info["label"][k] for k in sorted(info["label"], key=int)]
        task = info["task"]
        return task, (names[1:] if task == "binary-class" else names)
    if not cfg.npz:
        known = ", ".join(sorted(k for k in medmnist_info() if not k.endswith("3d")))
        raise UserError(f"unknown MedMNIST set data.flag={flag}: known sets are {known} (pip install medmnist "
                        "for all of them), or give a file in the MedMNIST layout with data.npz=PATH")
    # A file of an unknown set: the label array alone says what kind of task it is (no images read).
    with _open(Path(str(cfg["npz"]))) as z:
        if "train_labels" not in z.files:
            raise UserError(f"{cfg['npz']} is not in the MedMNIST layout: no train_labels "
                            f"(it has {', '.join(z.files)})")
        y = z["train_labels"]
    if y.ndim == 2 and y.shape[1] > 1:
        return "multi-label, binary-class", [f"class_{k}" for k in range(y.shape[1])]
    k = int(y.max()) + 1 if y.size else 2
    if k <= 2:
        return "binary-class", ["class_1"]
    return "multi-class", [f"class_{j}" for j in range(k)]


def medmnist_labels(cfg: Mapping) -> list[str]:
    return _task_and_names(cfg, _flag(cfg))[1]


def _open(path: Path):
    try:
        return np.load(path)
    except (OSError, ValueError, BadZipFile, EOFError) as err:
        raise UserError(f"{path} is not a readable .npz file: {err}") from None


def _targets(y: np.ndarray, task: str, n_labels: int, where: str) -> np.ndarray:
    y = np.asarray(y).reshape(len(y), -1)
    if task.startswith("multi-label"):
        if y.shape[1] != n_labels or not np.isin(y, (0, 1)).all():
            raise UserError(f"{where}: expected {n_labels} 0/1 label columns, got shape {y.shape}")
        return y.astype(np.float32)
    if y.shape[1] != 1:
        raise UserError(f"{where}: expected one label per image, got shape {y.shape}")
    if task == "binary-class":
        if not np.isin(y, (0, 1)).all():
            raise UserError(f"{where}: a binary set has labels other than 0 and 1: {sorted(np.unique(y))[:10]}")
        return y.astype(np.float32)
    classes = y[:, 0].astype(np.int64)
    if classes.size and (classes.min() < 0 or classes.max() >= n_labels):
        raise UserError(f"{where}: class ids must lie in 0..{n_labels - 1}, found {classes.min()}..{classes.max()}")
    return np.eye(n_labels, dtype=np.float32)[classes]


def _images(x: np.ndarray, size: int, where: str) -> torch.Tensor:
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
        raise UserError(f"{where}: expected uint8 images (N, H, W) or (N, H, W, 3), got {x.dtype} {x.shape}")
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2)
    if tuple(t.shape[-2:]) == (size, size):
        return t.contiguous()
    out = torch.empty((t.shape[0], t.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, len(t), 4096):  # in chunks: the float copy of a whole set can be GBs
        chunk = t[start:start + 4096].float()
        chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start:start + 4096] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


SPLIT_RULE = "official MedMNIST splits"


def _check_layout(z, path: Path) -> None:
    missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in z.files]
    if missing:
        raise UserError(f"{path} is not in the MedMNIST layout: no {', '.join(missing)} (it has {', '.join(z.files)})")


def medmnist_plan(cfg: Mapping) -> SplitPlan:
    """The official splits from the label arrays alone (the images are not loaded)."""
    flag = _flag(cfg)
    task, names = _task_and_names(cfg, flag)
    path = _npz_path(cfg, flag)
    ys, ids = [], []
    with _open(path) as z:
        _check_layout(z, path)
        for split in SPLITS:
            ys.append(_targets(z[f"{split}_labels"], task, len(names), f"{path.name} {split}"))
            ids += [f"{flag}/{split}/{i}" for i in range(len(ys[-1]))]
    return SplitPlan.stacked(str(cfg.name), names, ys, ids, SPLIT_RULE)


def medmnist_channels(cfg: Mapping) -> Optional[int]:
    return medmnist_info().get(str(cfg.flag).lower(), {}).get("n_channels")


@register_dataset("medmnist", labels=medmnist_labels, plan=medmnist_plan, channels=medmnist_channels,
                  source_keys=("flag", "root"), path_keys=("root",))
def build_medmnist(cfg: Mapping) -> DataBundle:
    flag = _flag(cfg)
    task, names = _task_and_names(cfg, flag)
    path = _npz_path(cfg, flag)
    size = int(cfg["image_size"])
    splits = {}
    with _open(path) as z:
        _check_layout(z, path)
        for split in SPLITS:
            x, y = z[f"{split}_images"], z[f"{split}_labels"]
            where = f"{path.name} {split}"
            if len(x) != len(y):
                raise UserError(f"{where}: {len(x)} images but {len(y)} labels")
            labels = _targets(y, task, len(names), where)
            splits[split] = Split(images=_images(x, size, where), labels=torch.from_numpy(labels),
                                  mask=torch.ones(labels.shape, dtype=torch.bool),
                                  ids=[f"{flag}/{split}/{i}" for i in range(len(x))])
    log.info("medmnist: %s (%s, labels %s)", path, task, names)
    return DataBundle(name=str(cfg.name), label_names=names, split_rule=SPLIT_RULE, **splits)
