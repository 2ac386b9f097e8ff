"""What the image-list datasets (CheXpert, CSV) share: reading the label table, checking it,
turning label values into (labels, mask), and assembling a split plan's rows from decoded images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import UserError
from .base import SPLIT_NAMES, DataBundle, Split, SplitPlan
from .cache import load_images

UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")
_ALLOWED = {1.0, 0.0, -1.0}
_SHOW = 5


def read_table(path: str | os.PathLike, what: str) -> pd.DataFrame:
    """A CSV as strings (values are checked column by column, so nothing is guessed here)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: {path} does not exist")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{what}: {path} is not a readable CSV: {str(err).strip()}") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def require_columns(df: pd.DataFrame, columns: Sequence[str], source: str, hint: str = "") -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"{source} has no column {', '.join(repr(c) for c in missing)} "
                        f"(its columns: {', '.join(df.columns)}){hint}")


def label_values(df: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(values as float with NaN for blank, bool mask of cells that are not 1, 0, -1 or blank)."""
    text = df[column].astype(str).str.strip()
    blank = text.eq("")
    num = pd.to_numeric(text.where(~blank), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~blank.to_numpy() & ~np.isin(num, list(_ALLOWED))
    return num, bad


def parse_labels(df: pd.DataFrame, columns: Sequence[str], uncertain: str,
                 source: str) -> tuple[np.ndarray, np.ndarray]:
    """0/1 labels and the loss/metric mask from 1 / 0 / -1 (uncertain) / blank (= 0).

    ``uncertain``: ``ones`` (U-Ones, the paper) counts -1 as positive, ``zeros`` as negative,
    ``ignore`` masks the cell out of the loss and the metrics. Any other value names its rows.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise UserError(f"data.uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, got {uncertain}")
    labels = np.zeros((len(df), len(columns)), dtype=np.float32)
    mask = np.ones_like(labels, dtype=bool)
    problems = []
    for j, col in enumerate(columns):
        num, bad = label_values(df, col)
        for i in np.flatnonzero(bad):
            # Data row i sits on line i + 2 of the file (line 1 is the header).
            problems.append(f"row {i + 1} (line {i + 2}) {col}={df[col].iat[i]!r}")
        unc = num == -1.0
        labels[:, j] = (num == 1.0) | (unc & (uncertain == "ones"))
        if uncertain == "ignore":
            mask[:, j] = ~unc
    if problems:
        more = f"; and {len(problems) - _SHOW} more" if len(problems) > _SHOW else ""
        raise UserError(f"{source}: label values must be 1, 0, -1 or blank; {len(problems)} are not: "
                        f"{'; '.join(problems[:_SHOW])}{more}")
    return labels, mask


def check_splits(parts: Mapping[str, np.ndarray], source: str, hint: str) -> None:
    """An empty split is an error before any image is decoded."""
    for name, rows in parts.items():
        if len(rows) == 0:
            sizes = ", ".join(f"{k} {len(v)}" for k, v in parts.items())
            raise UserError(f"{source}: the {name} split is empty ({sizes}); {hint}")


def assemble(plan: SplitPlan, cfg: Mapping) -> DataBundle:
    """Decode (or read cached) images for every row of ``plan.parts`` and build the bundle.

    Splits are fixed before the images are checked, so skipping a bad image
    (``data.on_bad_image=skip``) removes that image only and moves no patient between splits.
    """
    parts = plan.parts
    order = np.concatenate([parts[k] for k in SPLIT_NAMES])
    loaded = load_images([plan.paths[i] for i in order], cfg, label=plan.cache_label, anchor=plan.anchor)
    position = np.empty(len(plan.paths), dtype=np.int64)
    position[order] = np.arange(len(order))
    splits = {}
    for split_name in SPLIT_NAMES:
        rows = parts[split_name]
        rows = rows[loaded.ok[position[rows]]]
        if len(rows) == 0:
            raise UserError(f"{plan.cache_label}: the {split_name} split has no readable image left "
                            "after skipping the bad ones")
        splits[split_name] = Split(
            images=loaded.take(position[rows]),
            labels=torch.from_numpy(plan.labels[rows]),
            mask=torch.from_numpy(plan.mask[rows]),
            ids=[str(plan.ids[i]) for i in rows],
            patients=None if plan.patients is None else [str(plan.patients[i]) for i in rows],
            groups=None if plan.groups is None else {k: [str(v[i]) for i in rows] for k, v in plan.groups.items()},
        )
    return DataBundle(name=plan.name, label_names=list(plan.label_names), split_rule=plan.split_rule, **splits)
