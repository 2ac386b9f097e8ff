"""``data=synthetic``: the embedded default dataset, generated on the fly (see synthetic.py)."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ..errors import UserError
from . import register_dataset
from .base import DataBundle, Split
from .synthetic import LABELS, generate_split


def synthetic_labels(cfg: Mapping) -> list[str]:
    labels = list(cfg.labels)
    unknown = [lab for lab in labels if lab not in LABELS]
    if unknown or not labels or len(set(labels)) != len(labels):
        raise UserError(f"data.labels for synthetic data must be distinct names from {list(LABELS)}, got {labels}")
    return labels


@register_dataset("synthetic", labels=synthetic_labels)
def build_synthetic(cfg: Mapping) -> DataBundle:
    labels = synthetic_labels(cfg)
    n = int(cfg.num_samples)
    size = int(cfg["image_size"])
    seed = int(cfg.seed)
    n_val = int(round(n * float(cfg.val_share)))
    n_test = int(round(n * float(cfg.test_share)))
    n_train = n - n_val - n_test
    if min(n_train, n_val, n_test) <= 0:
        raise UserError(f"data.num_samples={n} is too small for the val/test shares: every split needs images")
    prevalence = float(cfg.prevalence)
    test_prevalence = float(cfg.test_prevalence)
    splits = {}
    # Each split has its own stream of images; image i of a split is a pure function of (seed, split, i).
    for k, (split, count, prev) in enumerate(
        (("train", n_train, prevalence), ("val", n_val, prevalence), ("test", n_test, test_prevalence))
    ):
        images, y = generate_split(count, size, seed=seed * 3 + k, prevalence=prev, labels=labels)
        splits[split] = Split(
            images=torch.from_numpy(np.ascontiguousarray(images))[:, None],
            labels=torch.from_numpy(y.astype(np.float32)),
            mask=torch.ones(y.shape, dtype=torch.bool),
            ids=[f"{split}-{i:06d}" for i in range(count)],
        )
    return DataBundle(name="synthetic", label_names=labels, **splits)
