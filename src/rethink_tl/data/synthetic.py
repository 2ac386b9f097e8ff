"""``data=synthetic``: the embedded default dataset, generated on the fly by renderer.py."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ..errors import UserError
from .registry import register_dataset
from .base import SPLIT_NAMES, DataBundle, Split, SplitPlan
from .renderer import LABELS, finding_masks, generate_labels, generate_split


def synthetic_labels(cfg: Mapping) -> list[str]:
    labels = list(cfg.labels)
    unknown = [lab for lab in labels if lab not in LABELS]
    if unknown or not labels or len(set(labels)) != len(labels):
        raise UserError(f"data.labels for synthetic data must be distinct names from {list(LABELS)}, got {labels}")
    return labels


def check_synthetic(cfg: Mapping) -> None:
    if float(cfg.val_share) + float(cfg.test_share) >= 1:
        raise UserError(f"data.val_share + data.test_share = {float(cfg.val_share) + float(cfg.test_share):g} "
                        "leaves no training images: they must add up to less than 1")


def synthetic_findings(cfg: Mapping, split: str, ids, label: str) -> np.ndarray:
    """(N, H, W) masks of where ``label``'s finding was painted in images ``ids`` of ``split``."""
    (_, _, seed, prevalence), = [s for s in _streams(cfg) if s[0] == split]
    index = [int(i.rsplit("-", 1)[1]) for i in ids]
    labels = list(cfg.labels)
    return finding_masks(index, int(cfg.image_size), seed, prevalence, labels)[:, labels.index(label)]


def _streams(cfg: Mapping) -> list[tuple[str, int, int, float]]:
    """(split, count, generator seed, prevalence) of each split. Each split has its own stream of images;
    image i of a split is a pure function of (seed, split, i)."""
    n = int(cfg.num_samples)
    seed = int(cfg.seed)
    n_val = int(round(n * float(cfg.val_share)))
    n_test = int(round(n * float(cfg.test_share)))
    n_train = n - n_val - n_test
    if min(n_train, n_val, n_test) <= 0:
        raise UserError(f"data.num_samples={n} is too small for the val/test shares: every split needs images")
    counts = (n_train, n_val, n_test)
    prevalence = (float(cfg.prevalence), float(cfg.prevalence), float(cfg.test_prevalence))
    return [(split, counts[k], seed * 3 + k, prevalence[k]) for k, split in enumerate(SPLIT_NAMES)]


def _split_rule(cfg: Mapping) -> str:
    return (f"generated: each split its own images (data.seed {int(cfg.seed)}); prevalence "
            f"{float(cfg.prevalence):g} (test {float(cfg.test_prevalence):g})")


def synthetic_plan(cfg: Mapping) -> SplitPlan:
    """The generated splits' sizes and labels (label draws only: no image is rendered)."""
    labels = synthetic_labels(cfg)
    ys, ids = [], []
    for split, count, seed, prev in _streams(cfg):
        ys.append(generate_labels(count, seed=seed, prevalence=prev, labels=labels))
        ids += [f"{split}-{i:06d}" for i in range(count)]
    return SplitPlan.stacked("synthetic", labels, ys, ids, _split_rule(cfg))


@register_dataset("synthetic", labels=synthetic_labels, plan=synthetic_plan, check=check_synthetic,
                  channels=lambda cfg: 1, findings=synthetic_findings, source_keys=("seed",))
def build_synthetic(cfg: Mapping) -> DataBundle:
    labels = synthetic_labels(cfg)
    size = int(cfg["image_size"])
    splits = {}
    for split, count, seed, prev in _streams(cfg):
        images, y = generate_split(count, size, seed=seed, prevalence=prev, labels=labels)
        splits[split] = Split(
            images=torch.from_numpy(np.ascontiguousarray(images))[:, None],
            labels=torch.from_numpy(y.astype(np.float32)),
            mask=torch.ones(y.shape, dtype=torch.bool),
            ids=[f"{split}-{i:06d}" for i in range(count)],
        )
    return DataBundle(name="synthetic", label_names=labels, split_rule=_split_rule(cfg), **splits)
