"""The evidence ``rtl report`` adds to a table: a 95% interval per row and paired comparisons of settings.

From every run's ``predictions.csv.gz`` (the best checkpoint's test probabilities), for each summary row
the seed-mean macro AUROC / AUPRC gets a percentile bootstrap interval over the test patients (images
where the dataset has no patient ids); and for each comparison, the paired difference A - B with its
interval, a bootstrap p-value and, for AUROC, DeLong's test (stats.py says how).

Which comparisons: those the paper makes, wherever a sweep has both sides,

* TL vs RI: the same model, dataset, fraction and other settings, init=pretrained minus init=random (and with
  chest X-ray runs, init=xrv minus init=random and minus init=pretrained: TL-CXR vs RI, TL-CXR vs TL);
* truncated or slim vs full: each truncated or slim model (either init) minus its full model with TL
  (Res-T* -> ResNet50, Dens-T* / Dens-S* -> DenseNet121, a timm backbone cut at a stage -> the whole one);

and any pair named with ``rtl report --compare A B``, at every dataset and fraction that has both. A side is
``MODEL[/INIT][:KEY=VALUE[,KEY=VALUE...]]`` (Selector): ``dens_t1/pretrained``, ``dens_t1/TL``, ``dens_t1/xrv``
(or ``dens_t1/TL-CXR``, torchxrayvision's chest X-ray weights), or
``dens_t1/random:train.lr=0.001`` for one of several settings of a model x init (the KEY=VALUE parts as the
report's settings column prints them). Each side pools its seeds: the difference is averaged over the seeds
the two sides share, each scored on the same resampled images.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DamagedFile, UserError
from ..metrics import SingleClassWarning, score
from .predictions import PREDICTIONS_FILE, read as read_predictions
from .stats import LEVEL, STAT_METRICS, Scored, Holdout, TooFewImages, bootstrap, delong

# A truncated or slim model's full counterpart (results.csv model tags).
FULL_OF = ((re.compile(r"^res_[ts]\d+$"), "res_f"), (re.compile(r"^dens_[ts]\d+$"), "dens_f"),
           (re.compile(r"^trunc-(.+)-cut\d+$"), r"timm-\1"))
INIT_SHORT = {"pretrained": "TL", "random": "RI", "xrv": "TL-CXR"}  # xrv: chest X-ray weights (torchxrayvision)
INIT_OF_SHORT = {short: init for init, short in INIT_SHORT.items()}
# The inits compared wherever one model has both (A minus B): ImageNet TL vs RI, as the paper; where there are chest
# X-ray runs, chest X-ray TL vs RI and vs ImageNet TL.
INIT_PAIRS = (("pretrained", "random"), ("xrv", "random"), ("xrv", "pretrained"))
Pair = tuple[str, int, int]  # a comparison: its kind, the summary index of A and of B
# comparisons.csv
COLUMNS = ["dataset", "scored_on", "fraction", "comparison", "a", "b", "a_model", "a_init", "b_model", "b_init",
           "seeds", "metric", "difference", "ci_low", "ci_high", "p_bootstrap", "p_holm", "p_delong", "se_delong", "units",
           "resamples", "seed", "interval"]


def full_model(tag: str) -> str | None:
    for pattern, full in FULL_OF:
        if pattern.match(tag):
            return pattern.sub(full, tag)
    return None


def describe(row: pd.Series) -> str:
    label = f"{row['model']} {INIT_SHORT.get(row['init'], row['init'])}"
    return label + (f" [{row['settings']}]" if isinstance(row.get("settings"), str) and row["settings"] else "")


# --- which rows a --compare side names ---------------------------------------------------------------

class BadSelector(UserError):
    """A --compare side that names no setting of the report, or several in one dataset x fraction."""


def settings_parts(label) -> dict[str, str]:
    """KEY -> VALUE of a settings label ("train.lr=0.001, train.epochs=3"), values as the label prints them."""
    parts = str(label).split(", ") if isinstance(label, str) else []
    return dict(part.split("=", 1) for part in parts if "=" in part)


# A comma starts a new part only where KEY= follows, so that a list value ("[1,2]") stays whole.
_PART_BREAK = re.compile(r",\s*(?=[^,=\s]+=)")


@dataclass(frozen=True)
class Selector:
    """One side of --compare, ``MODEL[/INIT][:KEY=VALUE[,KEY=VALUE...]]``: the rows of that model (and init;
    TL / RI stand for pretrained / random) whose settings label has every KEY=VALUE part."""

    text: str
    model: str
    init: str  # "" for either
    parts: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Selector:
        head, colon, tail = text.partition(":")
        model, _, init = head.partition("/")
        parts: dict[str, str] = {}
        for part in _PART_BREAK.split(tail) if colon else []:
            key, eq, value = (piece.strip() for piece in part.partition("="))
            if not key or not eq:
                raise BadSelector(f"--compare {text}: {part.strip()!r} is not KEY=VALUE; a side is MODEL/INIT or "
                                  "MODEL/INIT:KEY=VALUE[,KEY=VALUE], e.g. dens_t1/random:train.lr=0.001")
            if key in parts:
                raise BadSelector(f"--compare {text}: {key} is given twice")
            parts[key] = value
        return cls(text, model, INIT_OF_SHORT.get(init, init), tuple(parts.items()))

    @property
    def head(self) -> str:
        return self.text.partition(":")[0]

    def of_model(self, table: pd.DataFrame) -> pd.DataFrame:
        """The rows of MODEL/INIT, whatever their settings."""
        return table[(table["model"] == self.model) & ((table["init"] == self.init) if self.init else True)]

    def rows(self, table: pd.DataFrame) -> pd.DataFrame:
        rows = self.of_model(table)
        if not self.parts:
            return rows
        want = dict(self.parts)
        has = [want.items() <= settings_parts(label).items() for label in rows["settings"]]
        return rows[np.array(has, dtype=bool)]

    def check(self, table: pd.DataFrame) -> None:
        """Refuse a side that names no row of the table, saying what there is."""
        mine = self.of_model(table)
        if not self.model or not len(mine):
            have = sorted({f"{m}/{i}" for m, i in zip(table["model"], table["init"])})
            raise BadSelector(f"--compare {self.text}: no setting of the report is MODEL/INIT {self.head!r}; "
                              f"there are: {', '.join(have)}")
        labels = [settings_parts(label) for label in mine["settings"]]
        for key, value in self.parts:
            values = sorted({parts[key] for parts in labels if key in parts})
            if not values:
                keys = sorted({k for parts in labels for k in parts})
                raise BadSelector(f"--compare {self.text}: the settings of {self.head} have no {key}; "
                                  + (f"they have: {', '.join(keys)}" if keys else
                                     "they differ in nothing the settings column shows: name it as MODEL/INIT"))
            if value not in values:
                raise BadSelector(f"--compare {self.text}: no setting of {self.head} has {key}={value}; "
                                  f"{key} is one of: {', '.join(values)}")
        if not len(self.rows(table)):
            shown = sorted({str(label) for label in mine["settings"]})
            raise BadSelector(f"--compare {self.text}: no setting of {self.head} has all of "
                              f"{', '.join(f'{k}={v}' for k, v in self.parts)}; its settings are: {'; '.join(shown)}")

    def at_most_one(self, cell: pd.DataFrame, pair: tuple[str, str]) -> pd.DataFrame:
        """The side's rows in one dataset x fraction cell: none or one, else a message on how to name one."""
        rows = self.rows(cell)
        if len(rows) > 1:
            raise BadSelector(self._several(rows, pair))
        return rows

    def _several(self, rows: pd.DataFrame, pair: tuple[str, str]) -> str:
        labels = [settings_parts(label) for label in rows["settings"]]
        keys = sorted({k for parts in labels for k in parts})
        differ = [k for k in keys if len({parts.get(k) for parts in labels}) > 1]
        by_init = rows["init"].nunique() > 1
        shown = [", ".join([f"init={init}"] * by_init + [f"{k}={parts[k]}" for k in differ if k in parts])
                 for init, parts in zip(rows["init"], labels)]
        start = f"--compare {' '.join(pair)}: {self.text} is {len(rows)} settings of this report"
        if not differ and not by_init:
            shown = sorted({str(label) for label in rows["settings"]})
            return (f"{start} ({'; '.join(shown)}) that differ in nothing the settings column shows: report a "
                    "directory that holds only one of them")
        head = f"{self.model}/{rows['init'].iloc[0]}" if by_init else self.head
        named = [*(f"{k}={v}" for k, v in self.parts), *(f"{k}={labels[0][k]}" for k in differ if k in labels[0])]
        example = head + (":" + ",".join(named) if named else "")
        what = " and ".join(["init"] * by_init + ["settings"] * bool(differ))
        return f"{start} ({'; '.join(shown)}): name one side with its {what}, e.g. {example}"


def _cells(summary: pd.DataFrame):
    """(where, rows) per dataset x fraction; external rows (rtl evaluate) of models trained on different
    datasets are cells of their own, never paired."""
    key = ["dataset", "fraction", *(["trained_on"] if "trained_on" in summary.columns else [])]
    for values, cell in summary.groupby(key, sort=False):
        yield f"{values[0]} f{values[1]:g}", cell


def check_asked(summary: pd.DataFrame, asked: list[tuple[str, str]]) -> None:
    """Every --compare side must name rows of the table, at most one per dataset x fraction, and the two sides
    different ones: a typo or an ambiguous side is refused before any bootstrap."""
    for left, right in asked:
        sides = Selector.parse(left), Selector.parse(right)
        for side in sides:
            side.check(summary)
        for _, cell in _cells(summary):
            for side in sides:
                side.at_most_one(cell, (left, right))
        same = sides[0].rows(summary).index
        if len(same) and same.equals(sides[1].rows(summary).index):
            raise BadSelector(f"--compare {left} {right}: both sides are the same settings; compare two different ones")


# --- which rows are compared -------------------------------------------------------------------------

def pairs(summary: pd.DataFrame, asked: list[tuple[str, str]]) -> tuple[list[Pair], list[str]]:
    """(kind, index of A, index of B) for every comparison, and notes on pairs that could not be made."""
    out, notes = [], []
    selectors = [(Selector.parse(left), Selector.parse(right)) for left, right in asked]
    for where, cell in _cells(summary):
        for found, why in (_tl_vs_ri(cell, where), _against_full(cell, where), _asked(cell, where, selectors)):
            out += found
            notes += why
    seen, unique = set(), []
    for kind, i, j in out:
        if (i, j) not in seen:
            seen.add((i, j))
            unique.append((kind, i, j))
    return unique, notes


def _tl_vs_ri(cell: pd.DataFrame, where: str) -> tuple[list[Pair], list[str]]:
    out, notes = [], []
    for _, rows in cell.groupby("model", sort=False):
        for a_init, b_init in INIT_PAIRS:
            kind = f"{INIT_SHORT[a_init]} vs {INIT_SHORT[b_init]}"
            tl, ri = rows[rows["init"] == a_init], rows[rows["init"] == b_init]
            for i, a in tl.iterrows():
                match = ri[ri["settings"] == a["settings"]]  # the same settings apart from init, or no pair
                if len(match) == 1:
                    out.append((kind, i, match.index[0]))
                elif len(ri):
                    notes.append(f"{where}: {describe(a)} has no {INIT_SHORT[b_init]} counterpart with the same "
                                 f"settings: {kind} not compared")
    return out, notes


def _against_full(cell: pd.DataFrame, where: str) -> tuple[list[Pair], list[str]]:
    out, notes = [], []
    for i, a in cell.iterrows():
        full = full_model(str(a["model"]))
        if full is None:
            continue
        ref = cell[(cell["model"] == full) & (cell["init"] == "pretrained")]
        same = ref[ref["settings"] == a["settings"]]
        if len(same) == 1:
            out.append(("truncated/slim vs full TL", i, same.index[0]))
        elif len(ref):
            notes.append(f"{where}: {describe(a)} has no {full} TL with the same settings: not compared")
    return out, notes


def _asked(cell: pd.DataFrame, where: str,
           selectors: list[tuple[Selector, Selector]]) -> tuple[list[Pair], list[str]]:
    out, notes = [], []
    for left, right in selectors:
        pair = (left.text, right.text)
        a, b = left.at_most_one(cell, pair), right.at_most_one(cell, pair)
        if len(a) != 1 or len(b) != 1:
            continue
        if a.index[0] == b.index[0]:  # both sides name the same row here (not everywhere: check_asked refuses that)
            notes.append(f"{where}: --compare {' '.join(pair)}: both sides are {describe(a.iloc[0])} here: "
                         "not compared")
            continue
        out.append(("asked", a.index[0], b.index[0]))
    return out, notes


# --- intervals and comparisons from the runs' predictions -------------------------------------------

@dataclass
class Evidence:
    """What ``evidence`` found: per-row intervals (added to the summary), the comparisons, and notes."""

    summary: pd.DataFrame
    comparisons: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unit: str = "images"


def evidence(summary: pd.DataFrame, runs: pd.DataFrame, root: Path, asked: list[tuple[str, str]],
             resamples: int, seed: int, split: str = "test") -> Evidence:
    """Intervals for every summary row and the comparisons, on the runs' ``split`` predictions ("test", or
    "external" for rtl evaluate's); what cannot be computed is said in notes (and, when asked for with
    --compare or for lack of images, in problems).

    The rows and comparisons tested on the same images share one bootstrap call (every run and label is scored
    once per resample); its resamples depend only on the seed and the number of units, so each value equals
    what a call for that row or comparison alone gives."""
    ev = Evidence(_with_interval_columns(summary), pd.DataFrame())
    sides = _load_sides(ev, runs, root, split)
    found, why = pairs(ev.summary, asked)
    ev.notes += why
    compared = _vet(ev, sides, found)
    rows, units = [], set()
    for ts in _test_sets(sides, compared, split):
        intervals = _bootstrap(ev, ts, resamples, seed)
        if intervals is None:
            continue
        units.add(ts.holdout.unit_kind)
        _write_intervals(ev.summary, ts, intervals)
        rows += _comparison_rows(ev.summary, ts, intervals, resamples, seed, split)
    ev.comparisons = pd.DataFrame(rows, columns=COLUMNS)
    ev.comparisons["p_holm"] = holm(ev.comparisons["p_bootstrap"].to_numpy(dtype=float))
    ev.unit = " or ".join(sorted(units)) or "images"
    return ev


def _with_interval_columns(summary: pd.DataFrame) -> pd.DataFrame:
    summary = summary.copy()
    for m in STAT_METRICS:
        summary[f"test_{m}_ci_low"] = np.nan
        summary[f"test_{m}_ci_high"] = np.nan
    return summary


@functools.lru_cache(maxsize=64)
def _read_file(path: str, mtime_ns: int, size: int):
    """A predictions file parsed once per process while it is unchanged: a report's intervals, calibration,
    operating points and subgroups, on test and val, all read the same files."""
    return read_predictions(path)


class PredictionLoader:
    """One split of each run folder's predictions file, with its label names."""

    def __init__(self, root: Path, split: str = "test"):
        self.root, self.split, self.cache = root, split, {}

    def __call__(self, run_dir: str):
        if run_dir not in self.cache:
            path = self.root / run_dir / PREDICTIONS_FILE
            try:
                st = os.stat(path)
            except OSError:
                pred = read_predictions(path)  # says what is missing
            else:
                pred = _read_file(str(path), st.st_mtime_ns, st.st_size)
            self.cache[run_dir] = pred.split(self.split), pred.label_names
        return self.cache[run_dir]


class BadPredictions(UserError):
    """A predictions file that does not belong to its run."""


def _check_file(run: pd.Series, sp, labels: list[str], path: Path) -> None:
    """The predictions file must give the run's results row back: a file copied from another run must not lend
    its predictions to this one."""
    got = score(sp.labels, sp.probs, labels, mask=sp.mask)
    for m in STAT_METRICS:
        want = run.get(f"test_{m}")
        if want is not None and not pd.isna(want) and not np.isclose(got.macro[m], float(want), rtol=0, atol=1e-9):
            raise BadPredictions(f"{path} gives test {m} {got.macro[m]:.6f}, but its results.csv says "
                                 f"{float(want):.6f}: the file is not this run's; run the run again with "
                                 "runtime.force=true")


@dataclass
class Side:
    """A summary row ready for the bootstrap: its seeds' test probabilities, and its first run's test split
    (images, truth, mask, patients) with the label names."""

    scored: Scored
    split: object
    labels: list[str]
    key: str = field(init=False)  # _test_key: equal for rows tested on the same images with the same labels

    def __post_init__(self):
        self.key = _test_key(self.split, self.labels)


def _test_key(sp, names: list[str]) -> str:
    """Equal for predictions of the same images with the same labels: such settings share one bootstrap."""
    import hashlib

    h = hashlib.sha256()
    for part in ("\n".join(sp.ids), "\n".join(names), "\n".join(sp.patients or [])):
        h.update(part.encode())
        h.update(b"\0")
    h.update(np.ascontiguousarray(sp.labels, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(sp.mask, dtype=bool).tobytes())
    return h.hexdigest()


def read_side(loader: PredictionLoader, row: pd.Series, runs: pd.DataFrame) -> Side:
    """A summary row's runs read and checked against their results rows."""
    members = runs[runs["run_dir"].isin(row["run_dirs"])]
    probs, first = {}, None
    for _, run in members.iterrows():
        sp, labels = loader(run["run_dir"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SingleClassWarning)  # results.csv has NaN there too; compared as such
            _check_file(run, sp, labels, loader.root / run["run_dir"] / PREDICTIONS_FILE)
        if first is None:
            first = (sp, labels)
        elif _test_key(sp, labels) != _test_key(*first):
            raise UserError(f"the seeds of {describe(row)} were tested on different images or labels")
        probs[int(run["seed"])] = sp.probs
    return Side(Scored(describe(row), probs), *first)


def _load_sides(ev: Evidence, runs: pd.DataFrame, root: Path, split: str) -> dict[int, Side]:
    """Every summary row whose runs' predictions can be used; the others are said in ev's notes (and a file
    that is not its run's, or damaged, in its problems)."""
    loader = PredictionLoader(root, split)
    sides, lacking = {}, []
    for i, row in ev.summary.iterrows():
        missing = [d for d in row["run_dirs"] if not (root / d / PREDICTIONS_FILE).is_file()]
        if missing:
            lacking += missing
            continue
        try:
            sides[i] = read_side(loader, row, runs)
        except UserError as err:
            ev.notes.append(f"{describe(row)} ({row['dataset']} f{row['fraction']:g}): no interval: {err}")
            if isinstance(err, (BadPredictions, DamagedFile)):
                ev.problems.append(str(err))
    if lacking:
        ev.notes.append(f"{len(lacking)} run(s) have no {PREDICTIONS_FILE} (made before rtl kept per-image "
                        "predictions), so their settings have no interval and no comparison; run them again with "
                        "runtime.force=true: " + ", ".join(lacking[:10]) + (" ..." if len(lacking) > 10 else ""))
    return sides


def _vet(ev: Evidence, sides: dict[int, Side], found: list[Pair]) -> list[Pair]:
    """The pairs whose two sides can be compared; why the others cannot goes to ev's notes (and, for a pair
    asked for with --compare, to its problems)."""
    compared = []
    for kind, a, b in found:
        reason = _why_not(sides, a, b)
        if not reason:
            compared.append((kind, a, b))
            continue
        ra, rb = ev.summary.loc[a], ev.summary.loc[b]
        what = f"{ra['dataset']} f{ra['fraction']:g}: {describe(ra)} vs {describe(rb)}"
        ev.notes.append(f"{what}: not compared: {reason}")
        if kind == "asked":
            ev.problems.append(f"--compare: {what} could not be compared: {reason}")
    return compared


def _why_not(sides: dict[int, Side], a: int, b: int) -> str:
    if a not in sides or b not in sides:
        return "a side has no usable predictions (see above)"
    if sides[a].key != sides[b].key:
        return "they were tested on different images or labels"
    if not set(sides[a].scored.probs) & set(sides[b].scored.probs):
        return "the two sides share no seed"
    return ""


# --- one bootstrap per test set ----------------------------------------------------------------------

@dataclass
class _TestSet:
    """The summary rows tested on the same images and the comparisons among them: one bootstrap call scores
    every run and label once per resample."""

    members: list[int]  # summary indexes
    compared: list[Pair]
    holdout: Holdout
    settings: list[Scored]  # in the order of members
    at: dict[int, int] = field(init=False)  # summary index -> position in settings

    def __post_init__(self):
        self.at = {i: k for k, i in enumerate(self.members)}

    def spec(self) -> list[tuple]:
        """The bootstrap's rows: each member's mean, then each comparison's difference, per metric."""
        spec = [("mean", m, self.at[i]) for i in self.members for m in STAT_METRICS]
        return spec + [("diff", m, self.at[a], self.at[b]) for _, a, b in self.compared for m in STAT_METRICS]


def _test_sets(sides: dict[int, Side], compared: list[Pair], split: str) -> list[_TestSet]:
    groups: dict[str, list[int]] = {}
    for i, side in sides.items():
        groups.setdefault(side.key, []).append(i)
    where = "test split" if split == "test" else "external images"
    out = []
    for members in groups.values():
        first = sides[members[0]]
        test = Holdout.of(first.split.labels, first.split.mask, first.labels, first.split.patients, where)
        mine = [c for c in compared if c[1] in members]
        out.append(_TestSet(members, mine, test, [sides[i].scored for i in members]))
    return out


def _bootstrap(ev: Evidence, ts: _TestSet, resamples: int, seed: int) -> dict | None:
    """The intervals of a test set (bootstrap row -> Interval), or None with a note and a problem when its
    images are too few for one."""
    spec = ts.spec()
    try:
        return dict(zip(spec, bootstrap(ts.holdout, ts.settings, spec, resamples, seed)))
    except TooFewImages as err:
        first = ev.summary.loc[ts.members[0]]
        where = f"{first['dataset']} f{first['fraction']:g}"
        names = ", ".join(describe(ev.summary.loc[i]) for i in ts.members)
        ev.notes.append(f"{where}: no interval and no comparison for {names}: {err}")
        ev.problems.append(f"{where}: {err}")
        return None


def _write_intervals(summary: pd.DataFrame, ts: _TestSet, intervals: dict) -> None:
    for i in ts.members:
        for m in STAT_METRICS:
            iv = intervals["mean", m, ts.at[i]]
            summary.loc[i, [f"test_{m}_ci_low", f"test_{m}_ci_high"]] = iv.low, iv.high


def _comparison_rows(summary: pd.DataFrame, ts: _TestSet, intervals: dict, resamples: int, seed: int,
                     split: str) -> list[dict]:
    """comparisons.csv rows of a test set's comparisons, one per metric."""
    rows = []
    for kind, a, b in ts.compared:
        ra, rb = summary.loc[a], summary.loc[b]
        common = sorted(set(ts.settings[ts.at[a]].probs) & set(ts.settings[ts.at[b]].probs))
        dl = delong(ts.holdout, ts.settings, ts.at[a], ts.at[b])
        scored_on = "test split" if split == "test" else f"external (trained on {ra.get('trained_on', '?')})"
        for m in STAT_METRICS:
            iv = intervals["diff", m, ts.at[a], ts.at[b]]
            rows.append({"dataset": ra["dataset"], "scored_on": scored_on, "fraction": ra["fraction"],
                         "comparison": kind, "a": describe(ra), "b": describe(rb), "a_model": ra["model"],
                         "a_init": ra["init"], "b_model": rb["model"], "b_init": rb["init"],
                         "seeds": " ".join(map(str, common)), "metric": m, "difference": iv.estimate,
                         "ci_low": iv.low, "ci_high": iv.high, "p_bootstrap": iv.p,
                         "p_delong": dl.p if m == "auroc" else np.nan, "se_delong": dl.se if m == "auroc" else np.nan,
                         "units": f"{ts.holdout.n_units} {ts.holdout.unit_kind}", "resamples": resamples, "seed": seed,
                         "interval": f"{iv.method} x{iv.factor:.3f}"})
    return rows


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's (1979) step-down adjustment of the p-values of one family (NaN: not a test, left out): the i-th
    smallest of k is multiplied by k - i + 1, made non-decreasing, capped at 1. Controls the chance of any false
    finding among the k at the level used."""
    out = np.full(len(p), np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    k = len(order)
    out[order] = np.minimum(1.0, np.maximum.accumulate(p[order] * (k - np.arange(k))))
    return out


def _fmt_p(p: float) -> str:
    if np.isnan(p):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def stars(p: float) -> str:
    if np.isnan(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


def markdown(comparisons: pd.DataFrame) -> str:
    names = {"auroc": "AUROC", "auprc": "AUPRC"}
    head = ("| dataset | scored on | fraction | comparison | A | B | seeds | metric | A - B | 95% CI | p (bootstrap) "
            "| p (Holm) | p (DeLong) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for _, r in comparisons.iterrows():
        lines.append(f"| {r.dataset} | {r.scored_on} | {r.fraction:g} | {r.comparison} | {r.a} | {r.b} | {r.seeds} | "
                     f"{names.get(r.metric, r.metric)} | {r.difference:+.3f} | [{r.ci_low:+.3f}, {r.ci_high:+.3f}] | "
                     f"{_fmt_p(r.p_bootstrap)}{stars(r.p_bootstrap)} | {_fmt_p(r.p_holm)} | {_fmt_p(r.p_delong)} |")
    return "\n".join(lines)


def method_note(resamples: int, seed: int, unit: str) -> str:
    return (f"Intervals: {LEVEL:.0%} BCa bootstrap over the test {unit} (scipy.stats.bootstrap, {resamples} "
            f"resamples, seed {seed}; rtl report --resamples N --seed S), widened by the small-sample factor "
            "sqrt(m/(m-1)) x t(m-1)/z with m the fewest test units with a positive or a negative (1.01 at 150, 1.13 at "
            "15; comparisons.csv's interval column gives it, and 'percentile' where BCa is undefined), of the macro "
            "metric averaged over the seeds "
            "of a setting; a comparison scores both sides on the same resamples (paired) and averages A - B over "
            "their common seeds. p (bootstrap): two-sided, 2 x the smaller share of resamples on either side of 0. "
            "p (DeLong): DeLong's test of correlated AUROCs, extended to the mean over labels and seeds. "
            "p (Holm): the bootstrap p adjusted by Holm's step-down for every comparison of the table (the family), so "
            "that the chance of any false finding among them stays at the level. "
            "* p < 0.05, ** p < 0.01, *** p < 0.001 (the bootstrap p, not corrected for multiple comparisons: read p "
            "(Holm) for a claim that any of them differs). With few "
            "resamples an interval can just exclude 0 while p is a little above 0.05 (the +1 in each share): use more "
            "resamples for a borderline case.")
