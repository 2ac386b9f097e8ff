"""Dataset registry: ``build_data(cfg.data)`` -> DataBundle (train/val/test of uint8 images).

The registry key is ``data.kind`` (set by each schema in config.py), not ``data.name``: a config can then
give its runs a name of their own (``name: ${.flag}`` for MedMNIST, ``data.name=covid`` for a CSV)
while still being built by the same code.
"""

from __future__ import annotations

from typing import Callable, Mapping

from ..errors import UserError
from .base import DataBundle, Split
from .splits import stratified_fraction

# name -> (build(cfg) -> DataBundle, labels(cfg) -> label names without reading the data)
DATASETS: dict[str, tuple[Callable[[Mapping], DataBundle], Callable[[Mapping], list[str]]]] = {}


def register_dataset(name: str, labels: Callable[[Mapping], list[str]]):
    """Register ``build(cfg)``; ``labels(cfg)`` must name the label columns cheaply (the model is built first)."""

    def wrap(fn):
        DATASETS[name] = (fn, labels)
        return fn

    return wrap


def _lookup(cfg: Mapping):
    from . import chexpert, csvlist, medmnist, synthetic_data  # noqa: F401  (register the built-in datasets)

    name = str(cfg.kind)
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}': choose one of {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def dataset_labels(cfg: Mapping) -> list[str]:
    """The label columns ``build_data(cfg)`` will produce, in order."""
    return list(_lookup(cfg)[1](cfg))


def build_data(cfg: Mapping) -> DataBundle:
    """Build the dataset named ``cfg.name`` (``cfg.kind``), then cut the training split to ``cfg.fraction``."""
    name = cfg["name"]
    bundle = _lookup(cfg)[0](cfg)
    for split_name, split in bundle.splits().items():
        if len(split) == 0:
            raise UserError(f"dataset '{name}': the {split_name} split is empty; check the data paths and split settings")
    bundle.train = stratified_fraction(
        bundle.train, float(cfg.fraction), int(cfg.subset_seed), bundle.label_names
    )
    return bundle


__all__ = ["DATASETS", "DataBundle", "Split", "build_data", "dataset_labels", "register_dataset"]
