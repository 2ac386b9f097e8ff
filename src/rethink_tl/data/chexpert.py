"""``data=chexpert``: CheXpert (Irvin et al. 2019) in its official layout.

``data.root`` is the folder that holds ``train.csv`` and ``valid.csv`` (``CheXpert-v1.0-small`` or
``CheXpert-v1.0``). The CSV's ``Path`` column starts with the dataset folder's own name
(``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``); paths are resolved against
the root's parent, or against the root with that first folder dropped, whichever finds the files,
so a renamed or moved root works too.

Images: every row of ``train.csv``, frontal and lateral views, as in the paper (its 160,858 / 17,875 /
44,684 split is the whole file); ``frontal_only=true`` keeps the frontal views only.

Split: the images of ``train.csv`` are divided into train / val / test, 72 / 8 / 20 as in the paper
(``test_share``, then ``val_share`` of the rest). By default by patient (``split_by=patient``: all
images of a patient land in one split), a documented deviation: the paper split at random by image,
which puts one patient's images (other views, follow-up studies) on both sides of the train/test line
and can flatter the test scores; ``split_by=image`` reproduces that. ``use_official_valid=true`` instead
tests on ``valid.csv`` (radiologist-labelled, 234 images of 200 other patients) and divides
``train.csv`` into train and val only.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from ..errors import UserError
from .registry import register_dataset
from .base import DataBundle, SplitPlan
from .splits import patient_split, split_groups
from .tables import assemble, check_splits, parse_labels, read_table, require_columns

log = logging.getLogger(__name__)

# The 14 observations, in the order of the CSV columns.
OBSERVATIONS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
LABEL_SETS: dict[str, tuple[str, ...]] = {
    "paper13": OBSERVATIONS[:-1],  # the paper leaves out Support Devices
    "all14": OBSERVATIONS,
    # The CheXpert competition tasks, in CSV order.
    "competition5": ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion"),
}
_VIEW = "Frontal/Lateral"
_PATIENT = re.compile(r"(patient\d+)")


def chexpert_labels(cfg: Mapping) -> list[str]:
    chosen = cfg.labels or "paper13"
    if isinstance(chosen, str):
        if chosen not in LABEL_SETS:
            raise UserError(f"data.labels for chexpert must be one of {', '.join(LABEL_SETS)} or a list of "
                            f"observations, got {chosen}")
        return list(LABEL_SETS[chosen])
    chosen = [str(c) for c in chosen]
    unknown = [c for c in chosen if c not in OBSERVATIONS]
    if unknown or len(set(chosen)) != len(chosen):
        raise UserError(f"data.labels must be distinct CheXpert observations ({', '.join(OBSERVATIONS)}), "
                        f"got {chosen}")
    return chosen


def _root(cfg: Mapping) -> Path:
    if not cfg.root:
        raise UserError("data.root is not set: point it at the folder that holds train.csv and valid.csv "
                        "(CheXpert-v1.0-small or CheXpert-v1.0)")
    root = Path(str(cfg["root"])).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"data.root={root} is not a folder")
    return root


def _resolver(root: Path, rel_paths: list[str]):
    """Pick how CSV paths map to files by trying each way on the first rows."""
    ways = [
        lambda p: root.parent / p,  # root is the dataset folder named in the paths
        lambda p: root.joinpath(*Path(p).parts[1:]),  # the folder was renamed
        lambda p: root / p,  # root is the folder above the dataset folder
    ]
    probe = rel_paths[:50]
    return max(ways, key=lambda way: sum(way(p).is_file() for p in probe))


def _patients(rel_paths: list[str]) -> list[str]:
    out = []
    for p in rel_paths:
        m = _PATIENT.search(p)
        # Fallback for a non-standard tree: .../<patient>/<study>/<view>.jpg
        parts = Path(p).parts
        out.append(m.group(1) if m else (parts[-3] if len(parts) >= 3 else p))
    return out


def _read(root: Path, name: str, labels: list[str], cfg: Mapping):
    source = str(root / name)
    df = read_table(root / name, "data=chexpert")
    frontal_only = bool(cfg.frontal_only)
    require_columns(df, ["Path", *labels, *([_VIEW] if frontal_only else [])], source)
    if frontal_only:
        df = df[df[_VIEW].str.strip().str.lower() == "frontal"].reset_index(drop=True)
    y, mask = parse_labels(df, labels, str(cfg.uncertain), source)
    rel = df["Path"].str.strip().tolist()
    return rel, y, mask, _groups(df)


# CheXpert's demographics, kept for subgroup evidence (rtl report --by sex / --by age): age in the bins below.
AGE_BINS = ((0, 40, "<40"), (40, 60, "40-59"), (60, 80, "60-79"), (80, 1000, "80+"))


def age_bin(text: str) -> str:
    try:
        age = float(text)
    except ValueError:
        return ""
    return next((name for lo, hi, name in AGE_BINS if lo <= age < hi), "")


def _groups(df: pd.DataFrame) -> dict[str, list[str]]:
    out = {}
    if "Sex" in df.columns:
        out["sex"] = [s if s in ("Male", "Female") else "" for s in df["Sex"].str.strip()]
    if "Age" in df.columns:
        out["age"] = [age_bin(a) for a in df["Age"].str.strip()]
    return out


def chexpert_plan(cfg: Mapping) -> SplitPlan:
    """The split of ``train.csv`` (and ``valid.csv``) from the tables alone: no image is opened."""
    labels = chexpert_labels(cfg)
    root = _root(cfg)
    rel, y, mask, kept = _read(root, "train.csv", labels, cfg)
    seed = int(cfg.split_seed)
    val_share = float(cfg.val_share)
    by = str(cfg.split_by)
    unit = "patients" if by == "patient" else "images"
    patients = _patients(rel)
    groups = split_groups(patients, by)
    views = "frontal views only" if cfg.frontal_only else "frontal and lateral views"
    if cfg.use_official_valid:
        parts = patient_split(groups, 0.0, val_share, seed)
        v_rel, v_y, v_mask, v_kept = _read(root, "valid.csv", labels, cfg)
        kept = {k: kept[k] + v_kept.get(k, [""] * len(v_rel)) for k in kept}
        shared = set(patients) & set(_patients(v_rel))
        if shared:
            log.warning("chexpert: %d patients are in both train.csv and valid.csv", len(shared))
        parts["test"] = np.arange(len(rel), len(rel) + len(v_rel))
        rel, y, mask = rel + v_rel, np.concatenate([y, v_y]), np.concatenate([mask, v_mask])
        rule = (f"test: official valid.csv; train/val random by {by} from train.csv (val: {val_share:g} of "
                f"{unit}, split seed {seed}); {views}")
    else:
        parts = patient_split(groups, float(cfg.test_share), val_share, seed)
        rule = (f"random by {by}: test {float(cfg.test_share):g} of {unit}, val {val_share:g} of the rest "
                f"(split seed {seed}); {views}")
    check_splits(parts, f"data=chexpert ({root})",
                 "check data.root, data.frontal_only and data.val_share / data.test_share (too few patients?)")
    resolve = _resolver(root, rel)
    return SplitPlan(name=str(cfg.name), label_names=labels, labels=y, mask=mask, ids=rel, parts=parts,
                     split_rule=rule, paths=[str(resolve(p)) for p in rel], anchor=str(root),
                     cache_label="chexpert", patients=_patients(rel), groups=kept or None)


@register_dataset("chexpert", labels=chexpert_labels, plan=chexpert_plan, source_keys=("root",), path_keys=("root",))
def build_chexpert(cfg: Mapping) -> DataBundle:
    return assemble(chexpert_plan(cfg), cfg)
