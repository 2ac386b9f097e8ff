"""Subsets of the training split."""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from .base import Split


def stratified_fraction(split: Split, fraction: float, seed: int, label_names: list[str]) -> Split:
    """Keep ``fraction`` of a split, stratified by each image's combination of labels.

    The subset depends only on ``seed`` (data.subset_seed), not on the training seed, so
    the repeated training seeds of one setting all see the same images.
    """
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"data.fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return split
    rng = np.random.default_rng(seed)
    labels = (split.labels.numpy() > 0.5) & split.mask.numpy()
    # Rows with the same label combination form one stratum.
    _, stratum = np.unique(labels, axis=0, return_inverse=True)
    stratum = stratum.reshape(-1)
    keep = []
    for s in np.unique(stratum):
        members = np.flatnonzero(stratum == s)
        k = int(round(fraction * len(members)))
        keep.append(rng.permutation(members)[:k])
    index = np.sort(np.concatenate(keep))
    if len(index) == 0:
        raise UserError(f"data.fraction={fraction} of {len(split)} training images keeps no image: use a larger fraction")
    sub = split.subset(index)
    missing = [lab for lab, p in zip(label_names, sub.positives()) if p == 0]
    if missing:
        raise UserError(
            f"data.fraction={fraction} (data.subset_seed={seed}) keeps {len(index)} training images but no positive "
            f"for {', '.join(missing)}: use a larger fraction or drop that label"
        )
    return sub
