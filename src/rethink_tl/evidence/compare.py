"""The evidence ``rtl report`` adds to a table: a 95% interval per row and paired comparisons of settings.

From every run's ``predictions.csv.gz`` (the best checkpoint's test probabilities), for each summary row
the seed-mean macro AUROC / AUPRC gets a percentile bootstrap interval over the test patients (images
where the dataset has no patient ids); and for each comparison, the paired difference A - B with its
interval, a bootstrap p-value and, for AUROC, DeLong's test (stats.py says how).

Which comparisons: those the paper makes, wherever a sweep has both sides,

* TL vs RI: the same model, dataset, fraction and other settings, init=pretrained minus init=random;
* truncated or slim vs full: each truncated or slim model (either init) minus its full model with TL
  (Res-T* -> ResNet50, Dens-T* / Dens-S* -> DenseNet121, a timm backbone cut at a stage -> the whole one);

and any pair named with ``rtl report --compare A B`` (``MODEL/INIT``, e.g. ``dens_t1/pretrained``), at every
dataset and fraction that has both. Each side pools its seeds: the difference is averaged over the seeds
the two sides share, each scored on the same resampled images.
"""

from __future__ import annotations

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
INIT_SHORT = {"pretrained": "TL", "random": "RI"}
# comparisons.csv
COLUMNS = ["dataset", "scored_on", "fraction", "comparison", "a", "b", "a_model", "a_init", "b_model", "b_init",
           "seeds", "metric", "difference", "ci_low", "ci_high", "p_bootstrap", "p_delong", "se_delong", "units",
           "resamples", "seed"]


def full_model(tag: str) -> str | None:
    for pattern, full in FULL_OF:
        if pattern.match(tag):
            return pattern.sub(full, tag)
    return None


def describe(row: pd.Series) -> str:
    label = f"{row['model']} {INIT_SHORT.get(row['init'], row['init'])}"
    return label + (f" [{row['settings']}]" if isinstance(row.get("settings"), str) and row["settings"] else "")


@dataclass
class Evidence:
    """What ``evidence`` found: per-row intervals (added to the summary), the comparisons, and notes."""

    summary: pd.DataFrame
    comparisons: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unit: str = "images"


class _Loader:
    """One split of each run folder's predictions file, with its label names: read once."""

    def __init__(self, root: Path, split: str = "test"):
        self.root, self.split, self.cache = root, split, {}

    def __call__(self, run_dir: str):
        if run_dir not in self.cache:
            pred = read_predictions(self.root / run_dir / PREDICTIONS_FILE)
            self.cache[run_dir] = pred.split(self.split), pred.label_names
        return self.cache[run_dir]


def _check_file(run: pd.Series, sp, labels: list[str], path: Path) -> None:
    """The predictions file must give the run's results row back: a file copied from another run must not lend
    its predictions to this one."""
    got = score(sp.labels, sp.probs, labels, mask=sp.mask)
    for m in STAT_METRICS:
        want = run.get(f"test_{m}")
        if want is not None and not pd.isna(want) and not np.isclose(got.macro[m], float(want), rtol=0, atol=1e-9):
            raise BadPredictions(f"{path} gives test {m} {got.macro[m]:.6f}, but its results.csv says {float(want):.6f}: "
                                 "the file is not this run's; run the run again with runtime.force=true")


class BadPredictions(UserError):
    """A predictions file that does not belong to its run."""


def _side(loader: _Loader, row: pd.Series, runs: pd.DataFrame) -> tuple[Scored, object, list[str]]:
    """A summary row as Scored (seed -> test probabilities), its first run's test split and label names."""
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
    return Scored(describe(row), probs), *first


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


def pairs(summary: pd.DataFrame, asked: list[tuple[str, str]]) -> tuple[list[tuple[str, int, int]], list[str]]:
    """(kind, index of A, index of B) for every comparison, and notes on pairs that could not be made."""
    out, notes = [], []
    # External rows (rtl evaluate) of models trained on different datasets are never paired.
    key = ["dataset", "fraction", *(["trained_on"] if "trained_on" in summary.columns else [])]
    for values, cell in summary.groupby(key, sort=False):
        where = f"{values[0]} f{values[1]:g}"
        for model, rows in cell.groupby("model", sort=False):
            tl, ri = rows[rows["init"] == "pretrained"], rows[rows["init"] == "random"]
            for i, a in tl.iterrows():
                match = ri[ri["settings"] == a["settings"]]  # the same settings apart from init, or no pair
                if len(match) == 1:
                    out.append(("TL vs RI", i, match.index[0]))
                elif len(ri):
                    notes.append(f"{where}: {describe(a)} has no RI counterpart with the same settings: TL vs RI "
                                 "not compared")
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
        for left, right in asked:
            a_rows, b_rows = _select(cell, left), _select(cell, right)
            if len(a_rows) == 1 and len(b_rows) == 1:
                out.append(("asked", a_rows.index[0], b_rows.index[0]))
            elif len(a_rows) > 1 or len(b_rows) > 1:
                raise UserError(f"{where}: --compare {left} {right} matches several settings; name MODEL/INIT")
    seen, unique = set(), []
    for kind, i, j in out:
        if (i, j) not in seen:
            seen.add((i, j))
            unique.append((kind, i, j))
    return unique, notes


def _select(cell: pd.DataFrame, selector: str) -> pd.DataFrame:
    model, _, init = selector.partition("/")
    init = {"TL": "pretrained", "RI": "random"}.get(init, init)
    return cell[(cell["model"] == model) & ((cell["init"] == init) if init else True)]


def check_asked(summary: pd.DataFrame, asked: list[tuple[str, str]]) -> None:
    """A --compare side that matches no row of the table is a typo: say what there is."""
    for left, right in asked:
        same = _select(summary, left).index
        if len(same) and same.equals(_select(summary, right).index):
            raise UserError(f"--compare {left} {right}: both sides are the same settings; compare two different ones")
    for selector in {s for pair in asked for s in pair}:
        model, _, init = selector.partition("/")
        if not model or not len(_select(summary, selector)):
            have = sorted({f"{m}/{i}" for m, i in zip(summary["model"], summary["init"])})
            raise UserError(f"--compare {selector}: no setting of the report is MODEL/INIT {selector!r}; "
                            f"there are: {', '.join(have)}")


def evidence(summary: pd.DataFrame, runs: pd.DataFrame, root: Path, asked: list[tuple[str, str]],
             resamples: int, seed: int, split: str = "test") -> Evidence:
    """Intervals for every summary row and the comparisons, on the runs' ``split`` predictions ("test", or
    "external" for rtl evaluate's); what cannot be computed is said in notes (and, when asked for with
    --compare or for lack of images, in problems).

    The rows and comparisons tested on the same images share one bootstrap call (every run and label is scored
    once per resample); its resamples depend only on the seed and the number of units, so each value equals
    what a call for that row or comparison alone gives."""
    loader = _Loader(root, split)
    summary = summary.copy()
    ev = Evidence(summary, pd.DataFrame())
    for m in STAT_METRICS:
        summary[f"test_{m}_ci_low"] = np.nan
        summary[f"test_{m}_ci_high"] = np.nan
    sides, lacking = {}, []
    for i, row in summary.iterrows():
        missing = [d for d in row["run_dirs"] if not (root / d / PREDICTIONS_FILE).is_file()]
        if missing:
            lacking += missing
            continue
        try:
            sides[i] = _side(loader, row, runs)
        except UserError as err:
            ev.notes.append(f"{describe(row)} ({row['dataset']} f{row['fraction']:g}): no interval: {err}")
            if isinstance(err, (BadPredictions, DamagedFile)):
                ev.problems.append(str(err))
    if lacking:
        ev.notes.append(f"{len(lacking)} run(s) have no {PREDICTIONS_FILE} (made before rtl kept per-image predictions), "
                        f"so their settings have no interval and no comparison; run them again with runtime.force=true: "
                        + ", ".join(lacking[:10]) + (" ..." if len(lacking) > 10 else ""))
    found, why = pairs(summary, asked)
    ev.notes += why
    compared = []
    for kind, a, b in found:
        ra, rb = summary.loc[a], summary.loc[b]
        what = f"{ra['dataset']} f{ra['fraction']:g}: {describe(ra)} vs {describe(rb)}"
        reason = ("a side has no usable predictions (see above)" if a not in sides or b not in sides else
                  "they were tested on different images or labels" if _test_key(*sides[a][1:]) != _test_key(*sides[b][1:]) else
                  "the two sides share no seed" if not set(sides[a][0].probs) & set(sides[b][0].probs) else "")
        if reason:
            ev.notes.append(f"{what}: not compared: {reason}")
            if kind == "asked":
                ev.problems.append(f"--compare: {what} could not be compared: {reason}")
            continue
        compared.append((kind, a, b))

    groups: dict[str, list[int]] = {}
    for i in sides:
        groups.setdefault(_test_key(*sides[i][1:]), []).append(i)
    rows, units = [], set()
    for members in groups.values():
        index = {i: k for k, i in enumerate(members)}
        settings = [sides[i][0] for i in members]
        mine = [(kind, a, b) for kind, a, b in compared if a in index]
        spec = [("mean", m, index[i]) for i in members for m in STAT_METRICS]
        spec += [("diff", m, index[a], index[b]) for _, a, b in mine for m in STAT_METRICS]
        _, sp, names = sides[members[0]]
        test = Holdout.of(sp.labels, sp.mask, names, sp.patients, "test split" if split == "test" else "external images")
        try:
            found_iv = bootstrap(test, settings, spec, resamples, seed)
        except TooFewImages as err:
            names = ", ".join(describe(summary.loc[i]) for i in members)
            where = f"{summary.loc[members[0], 'dataset']} f{summary.loc[members[0], 'fraction']:g}"
            ev.notes.append(f"{where}: no interval and no comparison for {names}: {err}")
            ev.problems.append(f"{where}: {err}")
            continue
        units.add(test.unit_kind)
        intervals = dict(zip(spec, found_iv))
        for i in members:
            for m in STAT_METRICS:
                iv = intervals["mean", m, index[i]]
                summary.loc[i, [f"test_{m}_ci_low", f"test_{m}_ci_high"]] = iv.low, iv.high
        for kind, a, b in mine:
            ra, rb = summary.loc[a], summary.loc[b]
            common = sorted(set(sides[a][0].probs) & set(sides[b][0].probs))
            dl = delong(test, settings, index[a], index[b])
            for m in STAT_METRICS:
                iv = intervals["diff", m, index[a], index[b]]
                rows.append({"dataset": ra["dataset"], "scored_on": "test split" if split == "test" else
                             f"external (trained on {ra.get('trained_on', '?')})",
                             "fraction": ra["fraction"], "comparison": kind,
                             "a": describe(ra), "b": describe(rb), "a_model": ra["model"], "a_init": ra["init"],
                             "b_model": rb["model"], "b_init": rb["init"], "seeds": " ".join(map(str, common)),
                             "metric": m, "difference": iv.estimate, "ci_low": iv.low, "ci_high": iv.high,
                             "p_bootstrap": iv.p, "p_delong": dl.p if m == "auroc" else np.nan,
                             "se_delong": dl.se if m == "auroc" else np.nan,
                             "units": f"{test.n_units} {test.unit_kind}", "resamples": resamples, "seed": seed})
    ev.summary = summary
    ev.comparisons = pd.DataFrame(rows, columns=COLUMNS)
    ev.unit = " or ".join(sorted(units)) or "images"
    return ev


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
            "| p (DeLong) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for _, r in comparisons.iterrows():
        lines.append(f"| {r.dataset} | {r.scored_on} | {r.fraction:g} | {r.comparison} | {r.a} | {r.b} | {r.seeds} | "
                     f"{names.get(r.metric, r.metric)} | {r.difference:+.3f} | [{r.ci_low:+.3f}, {r.ci_high:+.3f}] | "
                     f"{_fmt_p(r.p_bootstrap)}{stars(r.p_bootstrap)} | {_fmt_p(r.p_delong)} |")
    return "\n".join(lines)


def method_note(resamples: int, seed: int, unit: str) -> str:
    return (f"Intervals: {LEVEL:.0%} percentile bootstrap over the test {unit} (scipy.stats.bootstrap, {resamples} "
            f"resamples, seed {seed}; rtl report --resamples N --seed S), of the macro metric averaged over the seeds "
            "of a setting; a comparison scores both sides on the same resamples (paired) and averages A - B over "
            "their common seeds. p (bootstrap): two-sided, 2 x the smaller share of resamples on either side of 0. "
            "p (DeLong): DeLong's test of correlated AUROCs, extended to the mean over labels and seeds. "
            "* p < 0.05, ** p < 0.01, *** p < 0.001 (bootstrap; no correction for multiple comparisons). With few "
            "resamples an interval can just exclude 0 while p is a little above 0.05 (the +1 in each share): use more "
            "resamples for a borderline case.")
