"""How images are divided: patient-level train/val/test, prospective (by date), and the
stratified training fraction."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupShuffleSplit

from ..errors import UserError
from ..identity import own_unit_if_blank
from .base import Split


def subset_seed(fraction: float, seed: int, rule: str, train_seed: int) -> int | None:
    """The seed that draws the training subset: ``data.subset_seed`` (``data.subset=fixed``, the same
    images for every training seed), or ``data.subset_seed + train.seed`` (``per_seed``: a run with
    ``data.subset=fixed data.subset_seed=<that sum>`` trains on the same images). None at fraction 1."""
    if float(fraction) == 1.0:
        return None
    return int(seed) + (int(train_seed) if str(rule) == "per_seed" else 0)


def stratified_index(labels: np.ndarray, mask: np.ndarray, fraction: float, seed: int,
                     label_names: list[str], seed_note: str | None = None) -> np.ndarray:
    """Sorted row indices of ``fraction`` of the rows, stratified by each row's combination of labels.

    The subset depends only on ``seed`` (see :func:`subset_seed`) and the labels; ``seed_note`` says in
    an error where the seed came from (default ``data.subset_seed=<seed>``).
    """
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"data.fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    labels = (labels > 0.5) & mask
    # Rows with the same label combination form one stratum. With the rarest label as the most
    # significant column, np.unique lists the strata so that all those sharing a rare positive
    # are neighbours.
    rarest_first = np.argsort(labels.sum(0), kind="stable")
    _, stratum = np.unique(labels[:, rarest_first], axis=0, return_inverse=True)
    stratum = stratum.reshape(-1)
    sizes = np.bincount(stratum)
    # Systematic sampling along that order from a seeded random start: exactly
    # round(fraction * N) images, each stratum gets floor or ceil of its share, and so does every
    # run of neighbouring strata, i.e. every rare label keeps its share of positives (+-1).
    # Rounding each stratum on its own instead would drop every stratum smaller than
    # 1 / fraction: multi-label data such as CheXpert, with thousands of label combinations,
    # would end up far below the requested fraction and short of rare positives.
    n = int(round(fraction * len(labels)))
    edges = np.concatenate([[0.0], np.cumsum(sizes * (n / len(labels)))])
    points = rng.random() + np.arange(n)
    hit = np.clip(np.searchsorted(edges, points, side="right") - 1, 0, len(sizes) - 1)
    take = np.minimum(np.bincount(hit, minlength=len(sizes)), sizes)
    keep = [rng.permutation(np.flatnonzero(stratum == s))[:k] for s, k in enumerate(take) if k > 0]
    index = np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=int)
    if len(index) == 0:
        raise UserError(f"data.fraction={fraction} of {len(labels)} training images keeps no image: "
                        "use a larger fraction")
    missing = [lab for lab, p in zip(label_names, labels[index].sum(0)) if p == 0]
    if missing:
        raise UserError(
            f"data.fraction={fraction} ({seed_note or f'data.subset_seed={seed}'}) keeps {len(index)} training "
            f"images but no positive for {', '.join(missing)}: use a larger fraction or drop that label"
        )
    return index


def stratified_fraction(split: Split, fraction: float, seed: int, label_names: list[str]) -> Split:
    """Keep ``fraction`` of a split (:func:`stratified_index`); the split itself at fraction 1."""
    if fraction == 1.0:
        return split
    return split.subset(stratified_index(split.labels.numpy(), split.mask.numpy(), fraction, seed, label_names))


def split_groups(patients, split_by: str) -> np.ndarray:
    """What a split keeps together: the patient of each image (``data.split_by=patient``), or each image
    on its own (``image``: the paper's random split, which puts one patient's images on both sides)."""
    if str(split_by) == "image":
        return np.array([f"row{i}" for i in range(len(patients))], dtype=object)
    return np.asarray(own_unit_if_blank(patients), dtype=object)


def _holdout(groups: np.ndarray, share: float, seed: int, what: str) -> np.ndarray:
    """Boolean mask of the rows of ``share`` of the groups (patients), chosen by ``seed``.

    scikit-learn's GroupShuffleSplit holds out ceil(share * number of groups) whole groups, so a
    patient's images never straddle the two sides.
    """
    if not 0.0 <= share < 1.0:
        raise UserError(f"{what} must be in [0, 1), got {share}")
    held = np.zeros(len(groups), dtype=bool)
    if share == 0.0 or len(groups) == 0:
        return held
    n_groups = len(pd.unique(groups))
    if n_groups < 2:
        raise UserError(f"{what}={share} needs images of at least 2 patients, found {n_groups}")
    try:
        _, out = next(GroupShuffleSplit(n_splits=1, test_size=share, random_state=seed)
                      .split(np.zeros(len(groups)), groups=groups))
    except ValueError as err:  # e.g. so few patients that one side would be empty
        raise UserError(f"{what}={share} cannot be applied to {n_groups} patients: {err}") from None
    held[out] = True
    return held


def patient_split(groups, test_share: float, val_share: float, seed: int) -> dict[str, np.ndarray]:
    """Random split by patient: ``test_share`` of the patients for test, then ``val_share`` of the
    remaining ones for val (CheXpert default 0.2 and 0.1: the paper's 72/8/20). Returns row indices."""
    groups = np.asarray(groups, dtype=object)
    test = _holdout(groups, test_share, seed, "data.test_share")
    pool = np.flatnonzero(~test)
    val = np.zeros(len(groups), dtype=bool)
    val[pool] = _holdout(groups[pool], val_share, seed + 1, "data.val_share")
    return {"train": np.flatnonzero(~test & ~val), "val": np.flatnonzero(val), "test": np.flatnonzero(test)}


def prospective_split(dates: pd.Series, cutoff: pd.Timestamp, groups, val_share: float,
                      seed: int) -> dict[str, np.ndarray]:
    """The paper's COVID-19 protocol: test = images dated on or after ``cutoff``; train and val from
    the images before it, val = ``val_share`` of their patients. Returns row indices."""
    groups = np.asarray(groups, dtype=object)
    before = (pd.to_datetime(dates) < cutoff).to_numpy()
    pool = np.flatnonzero(before)
    val = np.zeros(len(groups), dtype=bool)
    val[pool] = _holdout(groups[pool], val_share, seed, "data.val_share")
    return {"train": np.flatnonzero(before & ~val), "val": np.flatnonzero(val), "test": np.flatnonzero(~before)}
