"""``data=csv``: any images listed in a CSV, e.g. a hospital's own export.

One row per image: a path column (relative to ``data.root``, by default the CSV's folder, or
absolute), one or more label columns holding 1 / 0 / -1 (uncertain) / blank (= 0), and
optionally a patient id and a date. Images may be PNG or JPEG of any size, 8- or 16-bit grey or
RGB (see images.py for how each is stored).

Split: with ``data.cutoff_date`` set, the paper's prospective COVID-19 protocol (train and val
from the images dated before the cutoff, val = ``val_share`` of their patients; test = the images
on or after it); otherwise random by patient (``test_share`` of the patients, then ``val_share``
of the rest). Without a patient column every image counts as its own patient; so does every image
with ``data.split_by=image`` (the val holdout before a cutoff too), which lets one patient's images
land in two splits.
"""

from __future__ import annotations

from datetime import date

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from ..errors import UserError
from .registry import register_dataset
from .base import DataBundle, SplitPlan
from .splits import patient_split, prospective_split, split_groups
from .tables import assemble, check_splits, label_values, parse_labels, read_table, require_columns

log = logging.getLogger(__name__)

_PATIENT_GUESSES = ("patient_id", "patient", "patientid", "subject_id", "subject")


def _csv_path(cfg: Mapping) -> Path:
    if not cfg.csv:
        raise UserError("data.csv is not set: give the CSV that lists the images (data.csv=PATH)")
    return Path(str(cfg["csv"])).expanduser().resolve()


def _columns(cfg: Mapping, df: pd.DataFrame) -> tuple[str, str | None, str]:
    """(path column, patient column or None, date column) as they are named in this CSV."""
    path_col = str(cfg.path_column)
    patient_col = cfg.patient_column
    if patient_col is None:
        lower = {c.lower(): c for c in df.columns}
        patient_col = next((lower[g] for g in _PATIENT_GUESSES if g in lower), None)
    return path_col, (str(patient_col) if patient_col is not None else None), str(cfg.date_column)


# A column whose cells are labels but for at most this share is taken for a label column with typos.
NEAR_LABEL_SHARE = 0.05


def csv_labels(cfg: Mapping, df: pd.DataFrame | None = None) -> list[str]:
    """``data.labels`` as given, or every column (other than path, patient and date) whose values are
    all 1 / 0 / -1 / blank. Reads the CSV only, never an image."""
    path = _csv_path(cfg)
    df = read_table(path, "data.csv") if df is None else df
    chosen = cfg.labels
    if chosen is not None:
        chosen = [chosen] if isinstance(chosen, str) else [str(c) for c in chosen]
        if not chosen or len(set(chosen)) != len(chosen):
            raise UserError(f"data.labels must be a list of distinct column names of {path}, got {chosen}")
        require_columns(df, chosen, str(path), " (asked for by data.labels)")
        return chosen
    path_col, patient_col, date_col = _columns(cfg, df)
    reserved = {path_col, patient_col, date_col, *group_columns(cfg)}
    labels, ignored = [], []
    for col in df.columns:
        if col in reserved:
            continue
        _, bad = label_values(df, col)
        filled = ~df[col].str.strip().eq("").to_numpy()
        if bad.any() and bad.sum() <= NEAR_LABEL_SHARE * filled.sum():
            # Nearly all its cells are labels: a typo, not a column of other data. Leaving it out would
            # train on fewer labels than the CSV holds, silently.
            raise UserError(f"{path}: column {col!r} holds 1/0/-1/blank in {int(filled.sum() - bad.sum())} of its "
                            f"{int(filled.sum())} filled rows but not in {int(bad.sum())}: "
                            f"{_rows(df, np.flatnonzero(bad), col)}; correct those cells, or name the label columns "
                            "with data.labels=[...] to leave it out")
        (ignored if bad.any() or not filled.any() else labels).append(col)
    if ignored:
        log.info("data.csv: columns %s hold values other than 1/0/-1/blank and are not labels", ignored)
    if not labels:
        raise UserError(f"{path} has no label column: no column besides {path_col!r} holds only 1, 0, -1 or blank "
                        f"(its columns: {', '.join(df.columns)}); name them with data.labels=[...]")
    return labels


def group_columns(cfg: Mapping) -> list[str]:
    """data.group_columns as a list (columns kept for subgroup evidence, never labels or inputs)."""
    cols = cfg.get("group_columns")
    if cols is None:
        return []
    cols = [cols] if isinstance(cols, str) else [str(c) for c in cols]
    if len(set(cols)) != len(cols):
        raise UserError(f"data.group_columns names a column twice: {cols}")
    return cols


def _rows(df: pd.DataFrame, rows: np.ndarray, col: str) -> str:
    shown = "; ".join(f"row {i + 1} (line {i + 2}) {col}={df[col].iat[i]!r}" for i in rows[:5])
    return shown + (f"; and {len(rows) - 5} more" if len(rows) > 5 else "")


def csv_plan(cfg: Mapping) -> SplitPlan:
    """The split of ``data.csv`` from the table alone: no image is opened."""
    path = _csv_path(cfg)
    df = read_table(path, "data.csv")
    labels = csv_labels(cfg, df)
    path_col, patient_col, date_col = _columns(cfg, df)
    require_columns(df, [path_col, *([patient_col] if patient_col else [])], str(path),
                    " (set data.path_column / data.patient_column)")
    if df.empty:
        raise UserError(f"{path} lists no image")
    rel = df[path_col].str.strip()
    empty = np.flatnonzero(rel.eq("").to_numpy())
    if len(empty):
        raise UserError(f"{path}: {len(empty)} rows have no image path: {_rows(df, empty, path_col)}")
    base = Path(str(cfg["root"])).expanduser().resolve() if cfg.root else path.parent
    paths = [str(base / p) for p in rel]  # an absolute p replaces base
    y, mask = parse_labels(df, labels, str(cfg.uncertain), str(path))
    kept = group_columns(cfg)
    clash = [c for c in kept if c in (*labels, path_col)]
    if clash:
        raise UserError(f"data.group_columns: {clash[0]!r} is {'the path column' if clash[0] == path_col else 'a label'}; "
                        "a group column is a description of the image (sex, age, site), kept for rtl report --by")
    require_columns(df, kept, str(path), " (named by data.group_columns)")
    if patient_col:
        patients = df[patient_col].str.strip().to_numpy(dtype=object)
    else:
        log.info("data.csv: no patient column, so every image counts as its own patient")
        patients = np.array([f"row{i}" for i in range(len(df))], dtype=object)
    by = str(cfg.split_by)
    groups = split_groups(patients, by)
    unit = "patients" if by == "patient" and patient_col else "images"
    seed = int(cfg.split_seed)
    val_share = float(cfg.val_share)
    cutoff = cfg.cutoff_date
    if cutoff is not None and str(cutoff).strip():
        require_columns(df, [date_col], str(path), " (needed by data.cutoff_date; set data.date_column)")
        try:
            cut = pd.Timestamp(str(cutoff))
        except ValueError:
            raise UserError(f"data.cutoff_date={cutoff} is not a date (use YYYY-MM-DD)") from None
        # ISO 8601 only (2020-06-30, optionally with a time): 03/07/2020 is March 7th in one hospital's export
        # and July 3rd in another's, and guessing per row would move images across the cutoff silently.
        dates = pd.to_datetime(df[date_col].str.strip(), errors="coerce", format="ISO8601")
        bad = np.flatnonzero(dates.isna().to_numpy())
        if len(bad):
            raise UserError(f"{path}: {len(bad)} rows have no readable {date_col!r} (dates must be YYYY-MM-DD, "
                            f"ISO 8601: day/month orders are ambiguous): {_rows(df, bad, date_col)}")
        parts = prospective_split(dates, cut, groups, val_share, seed)
        both = set(patients[parts["test"]]) & set(patients[np.concatenate([parts["train"], parts["val"]])])
        if patient_col and both:
            log.warning("data.csv: %d patients have images both before and after data.cutoff_date=%s", len(both),
                        cut.date())
        hint = (f"data.cutoff_date={cut.date()} but the images date from {dates.min().date()} to "
                f"{dates.max().date()}")
        rule = (f"date: train/val before {cut.date()}, test on or after (val: {val_share:g} of {unit}, "
                f"split seed {seed})")
    else:
        parts = patient_split(groups, float(cfg.test_share), val_share, seed)
        hint = f"{len(set(groups))} {unit} are too few for data.val_share / data.test_share"
        rule = (f"random by {'patient' if unit == 'patients' else 'image'}: test {float(cfg.test_share):g} of "
                f"{unit}, val {val_share:g} of the rest (split seed {seed})")
    check_splits(parts, str(path), hint)
    return SplitPlan(name=str(cfg.name), label_names=labels, labels=y, mask=mask, ids=rel.tolist(), parts=parts,
                     split_rule=rule, paths=paths, anchor=str(path.parent), cache_label=path.stem,
                     patients=[str(p) for p in patients] if patient_col else None,
                     groups={c: df[c].str.strip().tolist() for c in kept} or None)


def check_csv(cfg: Mapping) -> None:
    """data.cutoff_date: null (a random split) or a date."""
    cutoff = cfg.get("cutoff_date")
    if cutoff is not None and not str(cutoff).strip():
        raise UserError("data.cutoff_date is empty: give YYYY-MM-DD for the prospective split, or null (leave it "
                        "out) for a random split")
    if cutoff:
        try:
            date.fromisoformat(str(cutoff))
        except ValueError as err:
            raise UserError(f"data.cutoff_date={cutoff} is not a date: write YYYY-MM-DD") from err


@register_dataset("csv", labels=csv_labels, plan=csv_plan, check=check_csv, source_keys=("csv",),
                  path_keys=("csv",))
def build_csv(cfg: Mapping) -> DataBundle:
    return assemble(csv_plan(cfg), cfg)
