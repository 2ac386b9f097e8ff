"""What every dataset hands to the training loop: three splits of uint8 images in memory."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Split:
    """One split. Images stay uint8 until the batch is on the training device."""

    images: torch.Tensor  # uint8 (N, C, H, W), C = 1 (grayscale) or 3
    labels: torch.Tensor  # float32 (N, L) of 0/1
    mask: torch.Tensor  # bool (N, L): False where the label is unknown and must not count
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: np.ndarray) -> "Split":
        index_t = torch.as_tensor(index, dtype=torch.long)
        return Split(self.images[index_t], self.labels[index_t], self.mask[index_t], [self.ids[i] for i in index])

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

    def describe(self) -> str:
        parts = []
        for name, split in self.splits().items():
            pos = ", ".join(f"{lab} {int(p)}" for lab, p in zip(self.label_names, split.positives()))
            parts.append(f"{name} {len(split)} ({pos})")
        return f"{self.name}: " + "; ".join(parts)
