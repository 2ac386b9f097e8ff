"""The results file of a run, and reading a run directory back: the one place that knows the column names.

``results_row`` builds the one row of ``results.csv``: what the run was (its IDENTITY columns), the HEADLINE
metrics, the other metrics macro and per label, then what the run used (``RunFacts``, whose fields are the
column names). A finished run directory (runfiles.py) also holds identity.json (every result-affecting
setting) and config.yaml (the resolved config; its ``experiment`` key says which figure the run was made for).

A run that failed in a sweep holds ``error.txt`` instead of results.csv; one that is still going (or was
stopped) holds metrics.csv or checkpoints. ``read_run`` turns any of them into a ``Run``, or raises
``BrokenRun`` saying what is wrong, so that one damaged folder costs one run, never the whole report.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import yaml

from .. import runfiles as rf
from ..config import init_tag
from ..errors import UserError
from ..metrics import METRICS, Scores

RESULTS_FILE, IDENTITY_FILE, CONFIG_FILE, ERROR_FILE = rf.RESULTS, rf.IDENTITY, rf.CONFIG, rf.ERROR

# A summary row is one setting of one cell; the cell is what the paper's figures have one bar for.
GROUP = ["dataset", "model", "init", "strategy", "fraction"]
CELL = ["dataset", "model", "init", "fraction"]
IDENTITY = [*GROUP, "seed", "setting_id"]
SPLITS = ("val", "test")
# METRICS (metrics.py): auprc_trapz is a metric of its own (the trapezoid PR area), never a label "trapz" of
# auprc: label names that would make such columns ambiguous are refused before a run starts
# (data.base.check_label_names).
HEADLINE = ["test_auroc", "test_auprc", "val_auroc", "val_auprc"]
# Runs written before identity.json existed have no setting_id; these columns stand in for it, so that
# seeds run with another learning rate or image size still end up in separate summary rows.
SAME_WITHIN_GROUP = ["epochs", "image_size", "lr", "batch_size", "n_train", "n_test"]

# What a run used that its settings do not fix: the seeds of one summary row must agree on these too.
PROVENANCE = ["data_fingerprint", "weights", "weights_sha256", "precision"]
# Without these a row cannot be placed in a table or drawn; setting_id is absent from older runs.
REQUIRED = [*GROUP, "seed", "params", *HEADLINE]
NUMERIC = ["fraction", "seed", "params"]
# A run's files that say it was started, beside the results; a lone config.yaml does not (any folder may have one).
# (Not Hydra's .hydra/: a command refused before it claimed the folder, or one that was sent to another
# run's folder, leaves only that behind.)
STARTED = rf.TRAIN_STARTED
# The results columns that the identity settings of a run must agree with.
# (Not dataset: the synthetic data calls itself "synthetic" whatever data.name says. Not init.name itself: the init
# column is its tag, config.init_tag of init.name and init.source: random, pretrained or xrv.)
AGREE = {"model": "model.tag", "init": "init.tag", "fraction": "data.fraction",
         "seed": "train.seed"}


def _with_init_tag(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (identity.json's) with the init's tag as "init.tag", when they name the init."""
    if settings.get("init.name") is None:
        return settings
    return {**settings, "init.tag": init_tag(settings["init.name"], settings.get("init.source"))}


# --- the results row ---------------------------------------------------------------------------------

@dataclass
class RunFacts:
    """What a run was and what it used: every column of results.csv but the metrics, named as the columns.
    The first block (down to ``epochs``) comes before the metrics, the rest after them."""

    dataset: str
    model: str  # model.tag
    init: str
    strategy: str  # RI, TL, Truncated-TL, Transfusion
    fraction: float
    seed: int
    setting_id: str
    params: int
    best_epoch: int
    epochs_run: int
    epochs: int  # train.epochs
    # --- the metrics go here ---
    n_train: int
    n_val: int
    n_test: int
    split_rule: str
    subset_seed: Optional[int]  # the seed that drew the training subset; None (an empty cell) at data.fraction=1
    train_balance: str
    val_balance: str
    test_balance: str
    image_size: int
    batch_size: int
    lr: float
    train_seconds: float
    images_per_s: float
    device: str
    precision: str
    weights: str
    weights_sha256: str
    data_fingerprint: str
    started: str
    finished: str
    git_commit: str
    rethink_tl: str
    torch: str
    torchvision: str
    timm: str
    python: str


_FACTS = [f.name for f in dataclasses.fields(RunFacts)]
_BEFORE_METRICS = _FACTS[:_FACTS.index("epochs") + 1]


def results_row(facts: RunFacts, val: Scores, test: Scores) -> dict[str, Any]:
    """The results.csv row: identity, the HEADLINE metrics (val then test, macro), every other val and test
    metric (macro and per label), then the rest of ``facts``."""
    known = dataclasses.asdict(facts)
    row: dict[str, Any] = {k: known.pop(k) for k in _BEFORE_METRICS}
    macro = {**val.flat("val"), **test.flat("test")}
    for column in ("val_auroc", "val_auprc", "test_auroc", "test_auprc"):
        row[column] = macro[column]
    row.update({k: v for k, v in val.flat("val").items() if k not in row})
    row.update({k: v for k, v in test.flat("test").items() if k not in row})
    row.update(known)
    return row


def metric_column(split: str, metric: str, label: str | None = None) -> str:
    return f"{split}_{metric}" + (f"_{label}" if label else "")


def is_metric(column: str) -> bool:
    """Macro (``test_auroc``) or per-label (``test_auroc_<label>``) metric of a results row."""
    return any(column == metric_column(s, m) or column.startswith(metric_column(s, m) + "_")
               for s in SPLITS for m in METRICS)


def label_names(columns, suffix: str = "") -> list[str]:
    """The labels, in column order, from a results row's columns (``test_auroc_<label>``) or, with
    ``suffix="_mean"``, from a summary's (``test_auroc_<label>_mean``)."""
    head = metric_column("test", "auroc") + "_"
    out = []
    for c in map(str, columns):
        if c.startswith(head) and c.endswith(suffix) and c != metric_column("test", "auroc") + suffix:
            out.append(c[len(head):len(c) - len(suffix)])
    return out


class BrokenRun(UserError):
    """A run directory that cannot be read as what it claims to be. ``where`` is what is known of its
    setting (dataset, model, init, fraction; None where unknown), for filtering by a figure's design."""

    def __init__(self, path: Path, reason: str, where: tuple | None = None):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason
        self.where = where or (None, None, None, None)


@dataclass
class Run:
    """One run directory: finished (``row``), failed (``error``) or neither (still running or stopped)."""

    path: Path
    row: dict[str, Any] | None
    settings: dict[str, Any] | None  # identity.json's; None for runs made before it existed
    experiment: str | None
    where: tuple  # (dataset, model, init, fraction)
    setting_id: str | None = None  # identity.json's
    error: str | None = None  # first line of error.txt

    @property
    def status(self) -> str:
        return "finished" if self.row is not None else "failed" if self.error is not None else "unfinished"


# ``rtl evaluate`` writes a run's scores on another dataset into <run>/external/<name>/ (results.csv and
# predictions, marked by this file): results of a run, not runs of their own.
EXTERNAL_MARK = rf.EXTERNAL_MARK


def run_dirs(root: Path) -> list[Path]:
    """Every directory below ``root`` (itself included) that a run has written to."""
    found = set()
    for name in STARTED:
        for p in root.rglob(name):
            found.add(p.parent.parent if name.startswith(".hydra/") else p.parent)
    return sorted(p for p in found if not (p / EXTERNAL_MARK).exists())


def _identity(path: Path) -> tuple[str | None, dict[str, Any] | None]:
    """identity.json's setting_id and settings; (None, None) for a run made before it existed."""
    file = path / IDENTITY_FILE
    if not file.exists():
        return None, None
    try:
        stored = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{IDENTITY_FILE} cannot be read ({_first_line(err)})") from err
    if not isinstance(stored, dict) or not isinstance(stored.get("settings"), dict):
        raise ValueError(f"{IDENTITY_FILE} has no 'settings' mapping")
    sid = stored.get("setting_id")
    return (None if sid is None else str(sid)), dict(stored["settings"])


def _config(path: Path) -> dict[str, Any] | None:
    """The run's resolved config, as ``rtl train`` wrote it when it claimed the folder."""
    for file in (path / CONFIG_FILE,):
        if not file.exists():
            continue
        try:
            cfg = yaml.safe_load(file.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise ValueError(f"{file.relative_to(path)} cannot be read ({_first_line(err)})") from err
        if cfg is not None and not isinstance(cfg, dict):
            raise ValueError(f"{file.relative_to(path)} is not a mapping")
        return cfg or {}
    return None


def _select(cfg: dict | None, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    # An interpolation that only resolved inside the job (Hydra's own copy of the config) says nothing.
    return None if isinstance(node, str) and "${" in node else node


def _where(settings: dict | None, cfg: dict | None) -> tuple:
    """(dataset, model tag, init, fraction) from identity.json, else the config. Raises ValueError on a
    fraction that is not a number: such a run cannot be placed in any design."""
    def get(*keys):
        for key in keys:
            for value in ((settings or {}).get(key), _select(cfg, key)):
                if value is not None:
                    return value
        return None

    fraction = get("data.fraction")
    if fraction is not None:
        try:
            fraction = float(fraction)
        except (TypeError, ValueError):
            raise ValueError(f"data.fraction={fraction!r} is not a number") from None
    text = [get(*keys) for keys in (("data.name",), ("model.tag", "model.name"), ("init.name",))]
    if text[2] is not None:
        text[2] = init_tag(text[2], get("init.source"))
    return (*[None if v is None else str(v) for v in text], fraction)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _results_row(file: Path) -> dict[str, Any]:
    """The one row of a results.csv, typed; ValueError saying what is wrong with it."""
    try:
        # A hex id such as 0001e123 would otherwise be read as a number and lose its digits.
        # round_trip: the floats written, exactly (pandas 2's default parser can be one ulp off)
        df = pd.read_csv(file, float_precision="round_trip",
                         dtype={c: str for c in ("dataset", "model", "init", "strategy", "setting_id")})
    except pd.errors.EmptyDataError:
        raise ValueError(f"{RESULTS_FILE} is empty") from None
    except (UnicodeDecodeError, pd.errors.ParserError, ValueError, OSError) as err:
        raise ValueError(f"{RESULTS_FILE} is not a readable CSV table ({_first_line(err)})") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        have = ", ".join(map(str, df.columns[:6])) + (", ..." if len(df.columns) > 6 else "")
        raise ValueError(f"{RESULTS_FILE} lacks the column(s) {', '.join(missing)} (it has: {have})")
    if len(df) != 1:
        raise ValueError(f"{RESULTS_FILE} has {len(df)} rows; a run writes exactly one")
    row = df.iloc[0].to_dict()
    for c in [*NUMERIC, *(c for c in df.columns if is_metric(str(c)))]:
        value = row[c]
        number = pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]
        # An empty metric cell is a metric the run could not define (one class only); text is damage.
        if math.isnan(number) and not pd.isna(value):
            raise ValueError(f"{RESULTS_FILE}: {c}={value!r} is not a number")
        row[c] = float(number)
    for c in NUMERIC:
        if math.isnan(row[c]):
            raise ValueError(f"{RESULTS_FILE}: {c} is empty")
        if math.isinf(row[c]):
            raise ValueError(f"{RESULTS_FILE}: {c} is infinite")
    if row["seed"] != int(row["seed"]):
        raise ValueError(f"{RESULTS_FILE}: seed={row['seed']:g} is not a whole number")
    row["seed"], row["params"] = int(row["seed"]), int(row["params"])
    for c in ("dataset", "model", "init", "strategy"):
        if pd.isna(row[c]) or not str(row[c]).strip():
            raise ValueError(f"{RESULTS_FILE}: {c} is empty")
        row[c] = str(row[c])
    sid = row.get("setting_id")
    row["setting_id"] = None if sid is None or pd.isna(sid) else str(sid)
    return row


def _check_agree(row: dict, sid: str | None, settings: dict) -> None:
    """A results row and identity.json from different runs (a folder reused by hand) must not be mixed."""
    if row["setting_id"] and sid and row["setting_id"] != sid:
        raise ValueError(f"{RESULTS_FILE} has setting_id {row['setting_id']} but {IDENTITY_FILE} {sid}: "
                         "the folder holds files of two different runs")
    settings = _with_init_tag(settings)
    for col, key in AGREE.items():
        if key in settings and settings[key] is not None:
            a, b = row[col], settings[key]
            try:
                same = math.isclose(float(a), float(b)) if col in ("fraction", "seed") else str(a) == str(b)
            except (TypeError, ValueError, OverflowError):
                raise ValueError(f"{IDENTITY_FILE}: {key}={b!r} is not a number") from None
            if not same:
                raise ValueError(f"{RESULTS_FILE} says {col}={a} but {IDENTITY_FILE} {key}={b}: "
                                 "the folder holds files of two different runs")


def read_run(path: str | Path) -> Run:
    """What a run directory holds; BrokenRun (a UserError) when a file it needs cannot be trusted."""
    path = Path(path)
    try:
        sid, settings = _identity(path)
        cfg = _config(path)
        row = _results_row(path / RESULTS_FILE) if (path / RESULTS_FILE).exists() else None
        if row is not None and settings is not None:
            _check_agree(row, sid, settings)
            row["setting_id"] = row["setting_id"] or sid
    except (ValueError, TypeError, OverflowError) as err:  # whatever a damaged file makes of a value
        raise BrokenRun(path, str(err), _guess_where(path)) from None
    experiment = _select(cfg, "experiment")
    experiment = None if experiment is None else str(experiment)
    if row is not None:
        return Run(path, row, settings, experiment, (row["dataset"], row["model"], row["init"], row["fraction"]), sid)
    if (path / ERROR_FILE).exists():
        # The error says why the run failed, a bad value in its config included: report it, do not judge it.
        try:
            lines = (path / ERROR_FILE).read_text(errors="replace").strip().splitlines()
        except OSError as err:
            lines = [f"({ERROR_FILE} cannot be read: {_first_line(err)})"]
        error = lines[0] if lines else f"({ERROR_FILE} is empty)"
        return Run(path, None, settings, experiment, _guess_where(path), sid, error)
    try:
        where = _where(settings, cfg)
    except ValueError as err:
        raise BrokenRun(path, f"unfinished, and its config cannot be placed: {err}", _guess_where(path)) from None
    return Run(path, None, settings, experiment, where, sid)


def _guess_where(path: Path) -> tuple:
    """What can still be learnt of a broken run's setting; None for what cannot."""
    parts = []
    for read in (lambda p: _identity(p)[1], _config):
        try:
            parts.append(read(path))
        except ValueError:
            parts.append(None)
    try:
        return _where(*parts)
    except ValueError:
        return (None, None, None, None)
