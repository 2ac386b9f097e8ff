"""Per-image predictions: what the best checkpoint said about every val and test image, kept beside the results.

``predictions.csv.gz`` (one gzip-compressed CSV, written atomically) has one row per image and split:

    split, id, patient, true_<label>, mask_<label>, prob_<label>  (for every label, in the model's order)
    group_<name>  (for every column kept for subgroup evidence: data.group_columns, CheXpert's sex and age)

``true`` is 1 / 0, ``mask`` 1 where the label counts (0: unknown, e.g. CheXpert's U-Ignore; the truth is
then 0 and ignored), ``prob`` the sigmoid output as float32, written with 9 significant digits so that it
reads back bit for bit. ``patient`` is empty where the dataset does not know it. Every metric of
``results.csv`` can be recomputed from this file (``recompute``); ``rtl report`` bootstraps its intervals
and paired tests from it, ``rtl evaluate`` writes the same file for an external dataset (split
``external``), and ``rtl explain`` picks its images from it.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from .. import atomic_io, runfiles as rf
from ..errors import DamagedFile, UserError
from ..metrics import Scores, score

PREDICTIONS_FILE = rf.PREDICTIONS
KINDS = ("true", "mask", "prob")
GROUP_PREFIX = "group_"


@dataclass
class SplitPredictions:
    """One split's predictions: (N,) ids and patients, (N, L) truth, mask and probabilities."""

    ids: list[str]
    patients: Optional[list[str]]
    labels: np.ndarray  # float (N, L) of 0/1
    mask: np.ndarray  # bool (N, L)
    probs: np.ndarray  # float32 (N, L)
    groups: Optional[dict[str, list[str]]] = None  # name -> (N,) values, "" where unknown

    def __len__(self) -> int:
        return len(self.ids)


def frame(splits: dict[str, SplitPredictions], label_names: Sequence[str]) -> pd.DataFrame:
    parts = []
    for name, sp in splits.items():
        n = len(sp)
        if sp.labels.shape != (n, len(label_names)) or sp.probs.shape != sp.labels.shape:
            raise ValueError(f"{name}: {n} ids, labels {sp.labels.shape}, probs {sp.probs.shape}, "
                             f"{len(label_names)} label names")
        cols: dict[str, object] = {"split": [name] * n, "id": list(sp.ids),
                                   "patient": list(sp.patients) if sp.patients is not None else [""] * n}
        for j, label in enumerate(label_names):
            cols[f"true_{label}"] = (np.asarray(sp.labels[:, j]) > 0.5).astype(np.int8)
            cols[f"mask_{label}"] = np.asarray(sp.mask[:, j], dtype=bool).astype(np.int8)
            cols[f"prob_{label}"] = np.asarray(sp.probs[:, j], dtype=np.float32)
        for group, values in (sp.groups or {}).items():
            if len(values) != n:
                raise ValueError(f"{name}: {n} ids but {len(values)} values of group {group}")
            cols[f"{GROUP_PREFIX}{group}"] = [str(v) for v in values]
        parts.append(pd.DataFrame(cols))
    return pd.concat(parts, ignore_index=True)


def write(path: Path, splits: dict[str, SplitPredictions], label_names: Sequence[str]) -> None:
    """Write ``splits`` to ``path`` (predictions.csv.gz) atomically."""
    df = frame(splits, label_names)

    def serialise() -> bytes:
        text = df.to_csv(index=False, float_format="%.9g")
        # mtime=0: the same predictions give the same bytes (and sha256) whenever they are written.
        return gzip.compress(text.encode(), compresslevel=6, mtime=0)

    atomic_io.write_bytes(Path(path), serialise)


@dataclass
class Predictions:
    """A predictions file read back."""

    path: Path
    label_names: list[str]
    df: pd.DataFrame

    def splits(self) -> list[str]:
        return list(dict.fromkeys(self.df["split"]))

    def split(self, name: str) -> SplitPredictions:
        part = self.df[self.df["split"] == name]
        if part.empty:
            raise UserError(f"{self.path} has no {name} predictions (it has: {', '.join(self.splits())})")
        patients = part["patient"].fillna("").astype(str)
        labels = np.stack([part[f"true_{lab}"].to_numpy(np.float32) for lab in self.label_names], axis=1)
        mask = np.stack([part[f"mask_{lab}"].to_numpy() == 1 for lab in self.label_names], axis=1)
        probs = np.stack([part[f"prob_{lab}"].to_numpy(np.float32) for lab in self.label_names], axis=1)
        groups = {c[len(GROUP_PREFIX):]: part[c].fillna("").astype(str).tolist() for c in self.df.columns
                  if c.startswith(GROUP_PREFIX)}
        return SplitPredictions(ids=part["id"].astype(str).tolist(),
                                patients=None if patients.eq("").all() else patients.tolist(),
                                labels=labels, mask=mask, probs=probs, groups=groups or None)


def read(path: str | Path) -> Predictions:
    """Read a predictions file; UserError saying what is wrong with a damaged one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist: the run was made before rtl kept per-image predictions (run it "
                        "again with runtime.force=true), or the file was removed")
    try:
        with gzip.open(path, "rb") as fh:
            text = fh.read()
        df = pd.read_csv(io.BytesIO(text), dtype={"split": str, "id": str, "patient": str}, keep_default_na=False,
                         float_precision="round_trip")
    except (OSError, EOFError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise DamagedFile(f"{path} is damaged ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): "
                        "run the run again with runtime.force=true") from None
    labels = [c[len("prob_"):] for c in df.columns if c.startswith("prob_")]
    missing = [c for c in ("split", "id", "patient") if c not in df.columns]
    missing += [f"{k}_{lab}" for lab in labels for k in KINDS if f"{k}_{lab}" not in df.columns]
    if missing or not labels:
        raise DamagedFile(f"{path} is not an rtl predictions file (missing columns: {', '.join(missing) or 'prob_*'})")
    for lab in labels:
        for k in KINDS:
            col = pd.to_numeric(df[f"{k}_{lab}"], errors="coerce")
            if col.isna().any():
                raise DamagedFile(f"{path}: column {k}_{lab} holds values that are not numbers: the file is damaged; "
                                "run the run again with runtime.force=true")
            df[f"{k}_{lab}"] = col
    return Predictions(path, labels, df)


def recompute(pred: Predictions, split: str) -> Scores:
    """The metrics of one split, from the file alone: equal to what the run wrote into results.csv."""
    sp = pred.split(split)
    return score(sp.labels, sp.probs, pred.label_names, mask=sp.mask, split=split)
