"""What every dataset hands to the training loop: three splits of uint8 images in memory; and the split
plan they are cut from (rows, labels and the rule, no pixels), which ``rtl data`` shows before any run."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

SPLIT_NAMES = ("train", "val", "test")
WHY = {"train": "learned", "val": "used to pick the best epoch", "test": "scored"}


def balance(label_names: Sequence[str], labels: np.ndarray, mask: np.ndarray) -> str:
    """``"covid 1:16.30; opacity 1:3.00"``: per label, negatives per positive among the counted cells
    (a masked, i.e. ignored uncertain, cell is neither); ``no positive`` for a label without any."""
    pos = ((labels > 0.5) & mask).sum(0)
    neg = mask.sum(0) - pos
    return "; ".join(f"{lab} 1:{n / p:.2f}" if p else f"{lab} no positive" for lab, p, n in zip(label_names, pos, neg))


def check_label_names(labels: Sequence[str]) -> None:
    """Per-label result columns are ``<split>_<metric>_<label>``: a label named ``trapz`` or ``trapz_...``
    would read as the metric auprc_trapz, so such a name is refused (by ``rtl data`` and ``rtl train``)."""
    from ..errors import UserError

    for label in labels:
        if str(label) == "trapz" or str(label).startswith("trapz_"):
            raise UserError(f"label {label!r}: the names 'trapz' and 'trapz_...' are taken by the metric auprc_trapz "
                            "in results.csv; rename that column of your CSV (or leave it out with data.labels=[...])")


def check_learnable(label_names: Sequence[str], labels: np.ndarray, mask: np.ndarray, split: str,
                    dataset: str) -> None:
    """Every label needs positives and negatives in train (to learn it), in val (to select the epoch) and in
    test (to be scored): ``rtl train`` checks this before epoch 1, ``rtl data`` before any run."""
    from ..errors import UserError

    pos = ((labels > 0.5) & mask).sum(0)
    counted = mask.sum(0)
    for label, p, n in zip(label_names, pos, counted):
        if p == 0 or p == n:
            raise UserError(f"label {label!r} has {int(p)} positive(s) and {int(n - p)} negative(s) in the "
                            f"{split} split of {dataset}: it cannot be {WHY[split]}; drop it "
                            "(data.labels=[...]), use more data (data.fraction, data.num_samples) or another split")


@dataclass
class Split:
    """One split. Images stay uint8 until the batch is on the training device."""

    images: torch.Tensor  # uint8 (N, C, H, W), C = 1 (grayscale) or 3
    labels: torch.Tensor  # float32 (N, L) of 0/1
    mask: torch.Tensor  # bool (N, L): False where the label is unknown and must not count
    ids: list[str]
    # The patient of each image where the dataset knows it (a CSV's patient column, CheXpert's paths); None
    # where it does not. Bootstrap intervals resample patients, not images, when it is set.
    patients: Optional[list[str]] = None
    # Columns kept for subgroup evidence (a CSV's data.group_columns, CheXpert's Sex and Age): name -> the value
    # of each image ("" where unknown). Written to predictions.csv.gz as group_<name>; never an input.
    groups: Optional[dict[str, list[str]]] = None

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: np.ndarray) -> "Split":
        index_t = torch.as_tensor(index, dtype=torch.long)
        patients = None if self.patients is None else [self.patients[i] for i in index]
        groups = None if self.groups is None else {k: [v[i] for i in index] for k, v in self.groups.items()}
        return Split(self.images[index_t], self.labels[index_t], self.mask[index_t], [self.ids[i] for i in index],
                     patients, groups)

    def positives(self) -> np.ndarray:
        """Counted positives per label."""
        return ((self.labels > 0.5) & self.mask).sum(0).numpy()


@dataclass
class DataBundle:
    name: str
    label_names: list[str]
    train: Split
    val: Split
    test: Split
    # How the images were divided, in words (results.csv's split_rule): each builder says it; empty only
    # for bundles made by hand (rtl bench).
    split_rule: str = ""
    # The seed that chose the training subset (build_data sets it); None = no subset (data.fraction=1).
    subset_seed: Optional[int] = None
    # fingerprint() of the splits before the training subset was cut (build_data sets it): what a run's
    # data_fingerprint records, so that the seeds of data.subset=per_seed (other subsets of the same data)
    # share it; the subset itself follows from the settings.
    whole_fingerprint: Optional[str] = None

    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def fingerprint(self) -> str:
        """Hash of every split's ids and labels: two runs with equal fingerprints saw the same data split."""
        h = hashlib.sha256()
        for name, split in self.splits().items():
            h.update(name.encode())
            h.update("\n".join(split.ids).encode())
            h.update(split.labels.numpy().tobytes())
            h.update(split.mask.numpy().tobytes())
        return h.hexdigest()[:16]

    def balance(self, split: str) -> str:
        """Class balance of one split, e.g. ``"covid 1:16.30"`` (see :func:`balance`)."""
        part = self.splits()[split]
        return balance(self.label_names, part.labels.numpy(), part.mask.numpy())

    def describe(self) -> str:
        parts = []
        for name, split in self.splits().items():
            pos = ", ".join(f"{lab} {int(p)}" for lab, p in zip(self.label_names, split.positives()))
            parts.append(f"{name} {len(split)} ({pos})")
        subset = "" if self.subset_seed is None else f", training subset seed {self.subset_seed}"
        return f"{self.name} ({self.split_rule or 'split not stated'}{subset}): " + "; ".join(parts)


@dataclass
class SplitPlan:
    """Which rows of a dataset go to which split, with their labels: a DataBundle without the pixels.

    Builders compute it first and decode only the rows it names; ``rtl data`` shows it (:func:`plan`).
    """

    name: str
    label_names: list[str]
    labels: np.ndarray  # float32 (N, L) of 0/1, every row of the dataset
    mask: np.ndarray  # bool (N, L)
    ids: list[str]  # N
    parts: dict[str, np.ndarray]  # split name -> row indices
    split_rule: str
    # Image-file datasets: the file of each row, where the decode cache goes and its name.
    paths: list[str] = field(default_factory=list)
    anchor: Optional[str] = None
    cache_label: str = ""
    patients: Optional[list[str]] = None  # N, where the dataset knows each image's patient
    groups: Optional[dict[str, list[str]]] = None  # name -> N values: columns kept for subgroup evidence

    @classmethod
    def stacked(cls, name: str, label_names: list[str], labels: Sequence[np.ndarray], ids: list[str],
                split_rule: str) -> "SplitPlan":
        """A plan of fixed splits given one after the other (train, val, test labels), every cell counted."""
        ends = np.cumsum([0] + [len(y) for y in labels])
        y = np.concatenate(labels)
        return cls(name=name, label_names=label_names, labels=y, mask=np.ones(y.shape, dtype=bool), ids=ids,
                   parts={s: np.arange(ends[k], ends[k + 1]) for k, s in enumerate(SPLIT_NAMES)},
                   split_rule=split_rule)

    def balance(self, split: str, rows: Optional[np.ndarray] = None) -> str:
        rows = self.parts[split] if rows is None else rows
        return balance(self.label_names, self.labels[rows], self.mask[rows])
