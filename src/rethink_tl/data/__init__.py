"""Dataset registry: ``build_data(cfg.data)`` -> DataBundle (train/val/test of uint8 images), and
``plan(cfg.data)``: the same split in words, from the tables alone (no image decoded).

The registry key is ``data.kind`` (set by each schema in config.py), not ``data.name``: a config can then
give its runs a name of their own (``name: ${.flag}`` for MedMNIST, ``data.name=covid`` for a CSV)
while still being built by the same code.

Every dataset registers three functions: ``build(cfg)`` (the bundle, images included), ``labels(cfg)``
(the label names without reading the data: the model is built first) and ``plan(cfg)`` (a SplitPlan:
rows, labels and split rule, no pixels). ``build`` computes its split through ``plan``, so what
``rtl data`` shows is what a run trains on (less any image skipped with ``data.on_bad_image=skip``).

And the hooks through which the rest of rtl asks what only the dataset knows, so that no module outside
``data/`` branches on a dataset's kind: ``check(cfg)`` (settings that must agree, run before anything is
read), ``channels(cfg)`` (the channels its images were decoded with: what a model trained on it expects),
``findings(cfg, split, ids, label)`` (where a finding was painted, for data that knows: ``rtl explain``) and
``source_keys`` (the settings that say which images these are: ``rtl evaluate`` refuses to call a run's own
data external).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from ..errors import UserError
from . import chexpert, csvlist, medmnist, synthetic  # noqa: F401  (register the built-in datasets)
from .base import SPLIT_NAMES, DataBundle, Split, SplitPlan, check_label_names, check_learnable
from .registry import DATASETS, Dataset, dataset, register_dataset
from .splits import stratified_index, subset_seed


def check_data(cfg: Mapping) -> None:
    """What the dataset's own settings must satisfy (shares that leave images, a date that is a date), checked
    before anything is read. Every entry point below runs it."""
    dataset(cfg).check(cfg)


def dataset_labels(cfg: Mapping) -> list[str]:
    """The label columns ``build_data(cfg)`` will produce, in order."""
    check_data(cfg)
    return list(dataset(cfg).labels(cfg))


def trained_channels(cfg: Mapping) -> Optional[int]:
    """The channels (1 or 3) the images of ``cfg`` were decoded with, i.e. what a model trained on them saw;
    None when that can no longer be told."""
    return dataset(cfg).channels(cfg)


def finding_masks(cfg: Mapping, split: str, ids: Sequence[str], label: str) -> Optional[np.ndarray]:
    """(N, H, W) bool masks of where ``label``'s finding is in images ``ids`` of ``split``, for data that knows
    (the synthetic data paints its findings); None for other data."""
    return dataset(cfg).findings(cfg, split, ids, label)


def same_images(a: Mapping, b: Mapping) -> bool:
    """Whether data configs ``a`` and ``b`` name the same images (the same kind and source settings)."""
    if str(a.get("kind")) != str(b.get("kind")):
        return False
    entry = dataset(b)
    if not entry.source_keys:
        return False

    def value(cfg: Mapping, key: str) -> str:
        v = cfg.get(key)
        if key in entry.path_keys and v:
            return str(Path(str(v)).expanduser().resolve())
        return str(v)

    return all(value(a, k) == value(b, k) for k in entry.source_keys)


def _check_sizes(name: str, sizes: Mapping[str, int]) -> None:
    for split_name, size in sizes.items():
        if size == 0:
            raise UserError(f"dataset '{name}': the {split_name} split is empty; check the data paths and "
                            "split settings")


def _subset(cfg: Mapping, labels: np.ndarray, mask: np.ndarray, label_names: list[str],
            train_seed: int) -> tuple[np.ndarray | None, int | None]:
    """(rows of the training split to keep, the seed that chose them); (None, None) at data.fraction=1."""
    seed = subset_seed(float(cfg.fraction), int(cfg.subset_seed), str(cfg.subset), train_seed)
    if seed is None:
        return None, None
    note = (f"subset seed {seed} = data.subset_seed {int(cfg.subset_seed)} + train.seed {train_seed}, "
            "data.subset=per_seed") if str(cfg.subset) == "per_seed" else None
    return stratified_index(labels, mask, float(cfg.fraction), seed, label_names, note), seed


def build_data(cfg: Mapping, *, train_seed: int = 0) -> DataBundle:
    """Build the dataset of kind ``cfg.kind``, then cut the training split to ``cfg.fraction``.

    ``train_seed`` is the run's ``train.seed``: only ``data.subset=per_seed`` reads it (the subset is then
    drawn with ``data.subset_seed + train.seed``). The seed used is ``bundle.subset_seed``.
    """
    check_data(cfg)
    bundle = dataset(cfg).build(cfg)
    _check_sizes(str(cfg["name"]), {k: len(v) for k, v in bundle.splits().items()})
    bundle.whole_fingerprint = bundle.fingerprint()
    index, seed = _subset(cfg, bundle.train.labels.numpy(), bundle.train.mask.numpy(), bundle.label_names,
                          int(train_seed))
    if index is not None:
        bundle.train = bundle.train.subset(index)
    bundle.subset_seed = seed
    return bundle


def plan(cfg: Mapping, *, train_seed: int = 0, check: bool = False) -> str:
    """The split ``build_data(cfg, train_seed=...)`` makes, as a few lines of text: the split rule, then
    images and class balance per split. Reads the tables only (CSV, CheXpert: no image is opened; MedMNIST:
    the label arrays; synthetic: the label draws), and raises the same UserError a run would for a missing
    column, a bad label or date, an empty split or a training subset without positives. With ``check``, also
    a label without positives or negatives in train or val (UnusableSplit, which carries the text)."""
    check_data(cfg)
    p = dataset(cfg).plan(cfg)
    if check:
        check_label_names(p.label_names)
    rows = dict(p.parts)
    _check_sizes(p.name, {k: len(v) for k, v in rows.items()})
    train = rows["train"]
    index, seed = _subset(cfg, p.labels[train], p.mask[train], p.label_names, int(train_seed))
    lines = [f"{p.name}: {p.split_rule}"]
    for name in SPLIT_NAMES:
        note = ""
        if name == "train" and index is not None:
            rows["train"] = train[index]
            rule = f", data.subset={cfg.subset}" + (f" with train.seed {int(train_seed)}"
                                                     if str(cfg.subset) == "per_seed" else "")
            note = f" (data.fraction={float(cfg.fraction):g} of {len(train)}: subset seed {seed}{rule})"
        lines.append(f"  {name}: {len(rows[name])} images{note}; balance {p.balance(name, rows[name])}")
    text = "\n".join(lines)
    if check:
        for name in SPLIT_NAMES:  # what rtl train checks before epoch 1
            try:
                check_learnable(p.label_names, p.labels[rows[name]], p.mask[rows[name]], name, p.name)
            except UserError as err:
                raise UnusableSplit(str(err), text) from None
    return text


class UnusableSplit(UserError):
    """The split can be computed (``text`` shows it) but a run could not train on it."""

    def __init__(self, message: str, text: str):
        super().__init__(message)
        self.text = text


__all__ = ["DATASETS", "DataBundle", "Dataset", "Split", "SplitPlan", "UnusableSplit", "build_data", "check_data",
           "check_label_names", "check_learnable", "dataset", "dataset_labels", "finding_masks", "plan",
           "register_dataset", "same_images", "trained_channels"]
