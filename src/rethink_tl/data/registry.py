"""The one registry of datasets, keyed by ``data.kind``, with the hooks each dataset may give (see the package's
docstring). Dataset modules register themselves here; the package imports them all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from ..errors import UserError
from .base import DataBundle, SplitPlan
from .images import channels_of_files


def _no_check(cfg: Mapping) -> None:
    return None


def _no_findings(cfg: Mapping, split: str, ids: Sequence[str], label: str) -> None:
    return None


def _file_channels(cfg: Mapping) -> Optional[int]:
    """Datasets of image files: ``data.channels`` when fixed; for ``auto`` what the decode cache resolved (3 if
    any readable image of the dataset is colour, else 1), read again from the files' headers; None when auto
    and the files cannot be read any more."""
    if str(cfg.channels) != "auto":
        return int(cfg.channels)
    try:
        paths = dataset(cfg).plan(cfg).paths
    except UserError:
        return None
    return channels_of_files(paths)


@dataclass(frozen=True)
class Dataset:
    build: Callable[[Mapping], DataBundle]
    labels: Callable[[Mapping], list[str]]
    plan: Callable[[Mapping], SplitPlan]
    check: Callable[[Mapping], None] = _no_check
    channels: Callable[[Mapping], Optional[int]] = _file_channels
    findings: Callable[[Mapping, str, Sequence[str], str], Optional[np.ndarray]] = _no_findings
    source_keys: tuple[str, ...] = ()  # settings naming the images; paths among them compared resolved
    path_keys: tuple[str, ...] = ()


DATASETS: dict[str, Dataset] = {}


def register_dataset(name: str, labels: Callable[[Mapping], list[str]], plan: Callable[[Mapping], SplitPlan],
                     **hooks):
    """Register ``build(cfg)`` with its cheap ``labels(cfg)``, image-free ``plan(cfg)`` and the optional hooks
    of ``Dataset`` (module docstring)."""

    def wrap(fn):
        DATASETS[name] = Dataset(fn, labels, plan, **hooks)
        return fn

    return wrap


def dataset(cfg: Mapping) -> Dataset:
    """The registered dataset that builds ``cfg`` (by ``data.kind``)."""
    name = str(cfg.kind)
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}': choose one of {', '.join(sorted(DATASETS))}")
    return DATASETS[name]
