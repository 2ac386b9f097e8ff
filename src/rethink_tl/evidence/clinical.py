"""What a clinician or a reviewer asks of a classifier beyond its AUROC: operating points and calibration.

**Operating points** (``rtl report --operating-point RULE``): for each run and label, the threshold is chosen on
that run's *validation* predictions only, then sensitivity, specificity, PPV and NPV are counted on its test
predictions at that threshold (an image is called positive when its probability is >= the threshold), averaged
over the seeds of a setting, each with a 95% interval from the same patient bootstrap of the test set that
``rtl report``'s AUROC intervals use (every seed keeps its own threshold: the threshold is part of the model).
The rules, over the validation scores as candidate thresholds:

* ``youden``: the largest threshold maximising sensitivity + specificity - 1 (Youden's J);
* ``sens=X``: the largest threshold whose validation sensitivity is at least X (the most specific that reaches
  it: a screening rule);
* ``spec=X``: the smallest threshold whose validation specificity is at least X (the most sensitive that
  reaches it: a rule-in rule).

**Calibration**: per label the Brier score (mean squared difference of probability and truth) and the expected
calibration error over ``ECE_BINS`` equal-width bins of the probability, [0, 0.1), [0.1, 0.2), ... [0.9, 1.0]:
ECE = sum over bins of (images in the bin / images) x |positive rate - mean probability| (Naeini et al. 2015,
Guo et al. 2017). Both are averaged over seeds (and over labels for the macro value) with bootstrap intervals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

from ..errors import UserError
from .stats import Holdout, Interval, UnitStatistic, intervals, minority_units

ECE_BINS = 10
OP_METRICS = ("sensitivity", "specificity", "ppv", "npv")
CAL_METRICS = ("brier", "ece")


# --- operating points ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    kind: str  # youden | sens | spec
    target: Optional[float] = None

    @classmethod
    def parse(cls, text: str) -> "Rule":
        t = str(text).strip().lower()
        if t == "youden":
            return cls("youden")
        key, sep, value = t.partition("=")
        if sep and key in ("sens", "spec"):
            try:
                x = float(value)
            except ValueError:
                x = float("nan")
            if 0.0 < x <= 1.0:
                return cls(key, x)
            raise UserError(f"--operating-point {text}: {key}= needs a share between 0 and 1 (e.g. {key}=0.9)")
        raise UserError(f"--operating-point {text}: use youden, sens=X (the threshold reaching validation "
                        "sensitivity X) or spec=X (reaching validation specificity X), X between 0 and 1")

    def __str__(self) -> str:
        return "youden" if self.kind == "youden" else f"{self.kind}={self.target:g}"


def choose_threshold(y: np.ndarray, p: np.ndarray, rule: Rule, label: str = "the label") -> float:
    """The threshold ``rule`` picks on validation truth ``y`` and probabilities ``p`` (positive: p >= t)."""
    y, p = np.asarray(y, dtype=bool), np.asarray(p, dtype=np.float64)
    if y.all() or not y.any():
        raise UserError(f"the validation split has no {'negative' if y.all() else 'positive'} image of {label}: "
                        "an operating point cannot be chosen on it")
    # candidates, descending: one above every validation score (no image called positive), then each score
    t = np.r_[np.nextafter(p.max(), np.inf), np.unique(p)[::-1]]
    order = np.argsort(-p, kind="stable")
    ys, ps = y[order], p[order]
    # called positive at threshold t: the images with p >= t; counted by a search in the sorted scores
    called = np.searchsorted(-ps, -t, side="right")
    tps = np.r_[0, np.cumsum(ys)][called]
    fps = called - tps
    sens, spec = tps / y.sum(), 1.0 - fps / (~y).sum()
    if rule.kind == "youden":
        j = sens + spec - 1.0
        return float(t[np.flatnonzero(j >= j.max() - 1e-12)[0]])  # the largest of the best
    if rule.kind == "sens":
        return float(t[np.flatnonzero(sens >= rule.target - 1e-12)[0]])  # largest reaching it
    return float(t[np.flatnonzero(spec >= rule.target - 1e-12)[-1]])  # smallest reaching it


def confusion_rates(y: np.ndarray, called: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(4, B) sensitivity, specificity, PPV, NPV under image weights ``w`` (B, n); NaN where undefined."""
    y, called = np.asarray(y, dtype=bool), np.asarray(called, dtype=bool)
    tp, fn = w @ (y & called), w @ (y & ~called)
    fp, tn = w @ (~y & called), w @ (~y & ~called)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([tp / (tp + fn), tn / (tn + fp), tp / (tp + fp), tn / (tn + fn)])


class OperatingStatistic(UnitStatistic):
    """Seed-mean sensitivity, specificity, PPV, NPV of one label at each seed's own threshold."""

    def __init__(self, test: Holdout, j: int, probs: dict[int, np.ndarray], thresholds: dict[int, float]):
        self.test, self.keep = test, np.flatnonzero(test.mask[:, j])
        self.y = test.labels[self.keep, j]
        self.called = {s: probs[s][self.keep, j] >= thresholds[s] for s in probs}

    def values(self, w: np.ndarray) -> np.ndarray:
        w = w[:, self.keep]
        return np.mean([confusion_rates(self.y, c, w) for c in self.called.values()], axis=0)


# --- calibration -----------------------------------------------------------------------------------------

def bins_of(p: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """The equal-width bin of each probability: [k/bins, (k+1)/bins), the last one closed."""
    return np.minimum((np.asarray(p, dtype=np.float64) * bins).astype(np.int64), bins - 1)


def brier(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B,) weighted Brier scores."""
    sq = (np.asarray(p, dtype=np.float64) - np.asarray(y, dtype=np.float64)) ** 2
    return (w @ sq) / w.sum(axis=1)


def ece(y: np.ndarray, p: np.ndarray, w: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """(B,) weighted expected calibration errors over equal-width bins."""
    onehot = np.zeros((len(p), bins))
    onehot[np.arange(len(p)), bins_of(p, bins)] = 1.0
    n_b = w @ onehot
    pos_b = w @ (onehot * np.asarray(y, dtype=np.float64)[:, None])
    prob_b = w @ (onehot * np.asarray(p, dtype=np.float64)[:, None])
    return np.abs(pos_b - prob_b).sum(axis=1) / n_b.sum(axis=1)


class CalibrationStatistic(UnitStatistic):
    """Rows: for each label Brier and ECE, then the macro Brier and ECE; each the mean over seeds."""

    def __init__(self, test: Holdout, probs: dict[int, np.ndarray]):
        self.test, self.probs = test, probs

    def values(self, w: np.ndarray) -> np.ndarray:
        rows = []
        for j in range(len(self.test.label_names)):
            keep = np.flatnonzero(self.test.mask[:, j])
            y, wk = self.test.labels[keep, j], w[:, keep]
            rows.append(np.mean([brier(y, p[keep, j], wk) for p in self.probs.values()], axis=0))
            rows.append(np.mean([ece(y, p[keep, j], wk) for p in self.probs.values()], axis=0))
        n = len(self.test.label_names)
        rows.append(np.mean(rows[0:2 * n:2], axis=0))
        rows.append(np.mean(rows[1:2 * n:2], axis=0))
        return np.stack(rows)


def calibration(test: Holdout, probs: dict[int, np.ndarray], resamples: int, seed: int) -> dict[tuple, Interval]:
    """(metric, label or "macro") -> Interval; without resamples, the point values with NaN bounds."""
    stat = CalibrationStatistic(test, probs)
    keys = [(m, lab) for lab in test.label_names for m in CAL_METRICS] + [(m, "macro") for m in CAL_METRICS]
    minority = [minority_units(test, labels=[j]) for j in range(len(test.label_names)) for _ in CAL_METRICS]
    minority += [minority_units(test)] * len(CAL_METRICS)
    return dict(zip(keys, intervals(test, stat, resamples, seed, minority=minority, bounds=[(0.0, 1.0)] * len(keys))))


def reliability(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> pd.DataFrame:
    """Per bin: images, mean probability, positive rate (the points of a reliability diagram)."""
    b = bins_of(p, bins)
    df = pd.DataFrame({"bin": b, "p": np.asarray(p, dtype=np.float64), "y": np.asarray(y, dtype=np.float64)})
    g = df.groupby("bin").agg(images=("p", "size"), mean_probability=("p", "mean"), positive_rate=("y", "mean"))
    return g.reindex(range(bins)).reset_index().assign(low=lambda d: d["bin"] / bins,
                                                       high=lambda d: (d["bin"] + 1) / bins)


# --- from a report's runs -----------------------------------------------------------------------------------

OPERATING_COLUMNS = ["dataset", "scored_on", "fraction", "model", "init", "settings", "setting", "label", "rule",
                     "seeds",
                     "threshold", "thresholds_per_seed", *[f"{m}{x}" for m in OP_METRICS for x in ("", "_ci_low",
                                                                                                  "_ci_high")],
                     "test_positives", "test_negatives", "units", "resamples", "seed"]


def readable_sides(summary: pd.DataFrame, runs: pd.DataFrame, root, notes: list[str], what: str,
                   split: str = "test", problems: Optional[list[str]] = None):
    """(summary index, row, Side) of every row whose ``split`` predictions ("test", or "external" for rtl
    evaluate's) can be read and belong to their runs. The others are said in ``notes``; with ``problems`` (the
    evidence was asked for: rtl report exits 2) in it too."""
    from ..runfiles import PREDICTIONS
    from .compare import PredictionLoader, describe, read_side

    loader = PredictionLoader(root, split)
    for i, row in summary.iterrows():
        where = f"{describe(row)} ({row['dataset']} f{row['fraction']:g})"
        missing = [d for d in row["run_dirs"] if not (root / d / PREDICTIONS).is_file()]
        if missing:  # said once by the intervals' note, unless this evidence was asked for
            if problems is not None:
                problems.append(f"{where}: no {what}: {missing[0]} has no {PREDICTIONS} (run it again with "
                                "runtime.force=true)")
            continue
        try:
            yield i, row, read_side(loader, row, runs)
        except UserError as err:
            notes.append(f"{where}: no {what}: {err}")
            if problems is not None:
                problems.append(f"{where}: no {what}: {err}")


def holdout_of(side, split: str = "test") -> Holdout:
    sp = side.split
    return Holdout.of(sp.labels, sp.mask, side.labels, sp.patients,
                      "test split" if split == "test" else "external images")


def source_run(run_dir: str) -> str:
    """The run an rtl evaluate folder (<run>/external/<name>) belongs to; a run folder itself otherwise."""
    parts = str(run_dir).split("/")
    return "/".join(parts[:-2]) if len(parts) >= 3 and parts[-2] == "external" else str(run_dir)


def run_thresholds(runs: pd.DataFrame, row: pd.Series, val, rule: Rule, labels: list[str]) -> dict[int, list[float]]:
    """seed -> the threshold ``rule`` picks per label on that run's own validation predictions (``val``: a
    PredictionLoader of split val; an rtl evaluate folder's are its source run's). UserError where it cannot."""
    thresholds = {}
    for _, run in runs[runs["run_dir"].isin(row["run_dirs"])].iterrows():
        sp, have = val(source_run(run["run_dir"]))
        if have != labels:
            raise UserError(f"{run['run_dir']}: its validation predictions have labels {have}, its scored ones "
                            f"{labels}")
        thresholds[int(run["seed"])] = [choose_threshold(sp.labels[sp.mask[:, j], j] > 0.5,
                                                         sp.probs[sp.mask[:, j], j], rule, have[j])
                                        for j in range(len(have))]
    return thresholds


def operating_points(summary: pd.DataFrame, runs: pd.DataFrame, root, rule: Rule, resamples: int,
                     seed: int, split: str = "test", problems: Optional[list[str]] = None
                     ) -> tuple[pd.DataFrame, list[str]]:
    """operating_points.csv's rows (one per setting and label) and notes on the settings left out. On external
    images (``split="external"``) the thresholds are still each source run's, from its own validation split."""
    from .compare import PredictionLoader, describe

    notes: list[str] = []
    val = PredictionLoader(root, "val")
    rows = []
    problems = [] if problems is None else problems
    for _, row, side in readable_sides(summary, runs, root, notes, "operating point", split, problems):
        test = holdout_of(side, split)
        try:
            thresholds = run_thresholds(runs, row, val, rule, side.labels)
        except UserError as err:
            notes.append(f"{describe(row)} ({row['dataset']} f{row['fraction']:g}): no operating point: {err}")
            problems.append(notes[-1])
            continue
        base = {"dataset": row["dataset"], "fraction": row["fraction"], "model": row["model"], "init": row["init"],
                "settings": row.get("settings", ""), "setting": describe(row),
                "scored_on": "test split" if split == "test" else f"external (trained on {row.get('trained_on', '?')})"}
        rows += [{**base, **r} for r in points_of(test, side.scored.probs, thresholds, rule, resamples, seed)]
    return pd.DataFrame(rows, columns=OPERATING_COLUMNS), notes


def points_of(test: Holdout, probs: dict[int, np.ndarray], thresholds: dict[int, list[float]], rule: Rule,
              resamples: int, seed: int) -> list[dict]:
    """One row per label: each seed's test probabilities ``probs`` called at its own ``thresholds`` (chosen on
    validation: the test labels only count), the seed-mean rates with their bootstrap intervals."""
    seeds = sorted(thresholds)
    rows = []
    for j, label in enumerate(test.label_names):
        stat = OperatingStatistic(test, j, {s: probs[s] for s in seeds}, {s: thresholds[s][j] for s in seeds})
        ivs = intervals(test, stat, resamples, seed, undefined_ok=True,
                        minority=[minority_units(test, labels=[j])] * len(OP_METRICS),
                        bounds=[(0.0, 1.0)] * len(OP_METRICS))
        keep = test.mask[:, j]
        out = {"label": label, "rule": str(rule), "seeds": " ".join(map(str, seeds)),
               "threshold": float(np.mean([thresholds[s][j] for s in seeds])),
               "thresholds_per_seed": " ".join(repr(float(thresholds[s][j])) for s in seeds),
               "test_positives": int((keep & test.labels[:, j]).sum()),
               "test_negatives": int((keep & ~test.labels[:, j]).sum()),
               "units": f"{test.n_units} {test.unit_kind}", "resamples": resamples, "seed": seed}
        for m, iv in zip(OP_METRICS, ivs):
            out.update({m: iv.estimate, f"{m}_ci_low": iv.low, f"{m}_ci_high": iv.high})
        rows.append(out)
    return rows


def _cell(value: float, low: float, high: float) -> str:
    if np.isnan(value):
        return "-"
    return f"{value:.3f}" + ("" if np.isnan(low) else f" [{low:.3f}, {high:.3f}]")


def markdown_operating(points: pd.DataFrame) -> str:
    head = ("| dataset | scored on | fraction | setting | label | rule | threshold | sensitivity | specificity | PPV "
            "| NPV |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for _, r in points.iterrows():
        cells = [_cell(r[m], r[f"{m}_ci_low"], r[f"{m}_ci_high"]) for m in OP_METRICS]
        lines.append(f"| {r.dataset} | {r.scored_on} | {r.fraction:g} | {r.setting} | {r.label} | {r.rule} | {r.threshold:.4g} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def operating_note(rule: Rule) -> str:
    return (f"operating points ({rule}): each run's threshold chosen on its own validation predictions only "
            "(youden: the largest maximising sensitivity + specificity - 1; sens=X: the largest reaching validation "
            "sensitivity X; spec=X: the smallest reaching validation specificity X), then counted on its test "
            "predictions (positive: probability >= threshold) and averaged over seeds; threshold shows their mean. "
            "Intervals: the same bootstrap of the test set as the AUROC intervals; '-' where the value is undefined "
            "(PPV without a positive call).")


def with_calibration(summary: pd.DataFrame, runs: pd.DataFrame, root, resamples: int, seed: int,
                     notes: list[str], split: str = "test") -> pd.DataFrame:
    """summary with test Brier and ECE columns (macro and per label: _mean, _ci_low, _ci_high) where the
    predictions can be read; NaN elsewhere."""
    summary = summary.copy()
    for i, row, side in readable_sides(summary, runs, root, notes, "calibration", split):
        found = calibration(holdout_of(side, split), side.scored.probs, resamples, seed)
        for (metric, label), iv in found.items():
            base = f"test_{metric}" if label == "macro" else f"test_{metric}_{label}"
            for suffix, v in (("_mean", iv.estimate), ("_ci_low", iv.low), ("_ci_high", iv.high)):
                if base + suffix not in summary.columns:
                    summary[base + suffix] = np.nan
                summary.loc[i, base + suffix] = v
    return summary


def calibration_note() -> str:
    return (f"calibration (summary.csv test_brier_*, test_ece_*): Brier score and expected calibration error over "
            f"{ECE_BINS} equal-width probability bins ([0, 0.1), ..., [0.9, 1]; ECE = sum of bin share x |positive "
            "rate - mean probability|), per label and their mean, averaged over seeds, with the same bootstrap "
            "intervals")


# --- subgroups -------------------------------------------------------------------------------------------

MAX_GROUPS = 12  # a column with more distinct values needs bins (--by COLUMN:EDGES)
SUBGROUP_COLUMNS = ["dataset", "fraction", "setting", "column", "group", "reference", "images", "units",
                    "positives", "metric", "value", "ci_low", "ci_high", "gap", "gap_ci_low", "gap_ci_high",
                    "p_gap", "note", "resamples", "seed"]


@dataclass(frozen=True)
class By:
    """--by COLUMN or --by COLUMN:E1,E2,... (numeric bins [E1, E2), [E2, E3), ...; values outside are unknown)."""

    column: str
    edges: Optional[tuple[float, ...]] = None

    @classmethod
    def parse(cls, text: str) -> "By":
        column, sep, rest = str(text).strip().partition(":")
        if not column:
            raise UserError(f"--by {text}: name a group column (e.g. --by sex, or --by age:0,40,60,80,120)")
        if not sep:
            return cls(column)
        try:
            edges = tuple(float(e) for e in rest.split(","))
        except ValueError:
            edges = ()
        if len(edges) < 2 or not all(np.isfinite(edges)) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise UserError(f"--by {text}: bins are increasing numbers, at least two, e.g. --by age:0,40,60,80,120")
        return cls(column, edges)

    def values(self, raw: list[str]) -> np.ndarray:
        """The group of each image ("" where unknown): the value itself, or its bin [a, b) named "a-b"."""
        raw_a = np.asarray([str(v).strip() for v in raw], dtype=object)
        if self.edges is None:
            return raw_a
        nums = pd.to_numeric(pd.Series(raw_a), errors="coerce").to_numpy(dtype=float)
        out = np.full(len(raw_a), "", dtype=object)
        for a, b in zip(self.edges, self.edges[1:]):
            out[(nums >= a) & (nums < b)] = f"{a:g}-{b:g}"
        return out

    def __str__(self) -> str:
        return self.column + ("" if self.edges is None else ":" + ",".join(f"{e:g}" for e in self.edges))


class GroupStatistic(UnitStatistic):
    """Per group: ``inner``'s rows on that group's images only (the others weigh 0); then each group's gap to
    the reference group (the largest), row by row."""

    def __init__(self, test: Holdout, inner: UnitStatistic, member: list[np.ndarray], reference: int):
        self.test, self.inner, self.member, self.reference = test, inner, member, reference

    def values(self, w: np.ndarray) -> np.ndarray:
        per = [self.inner.values(w * m[None, :]) for m in self.member]
        gaps = [v - per[self.reference] for v in per]
        return np.concatenate([*per, *gaps])


def subgroup_rows(test: Holdout, probs: dict[int, np.ndarray], raw: list[str], by: By, resamples: int, seed: int,
                  thresholds: Optional[dict[int, list[float]]] = None) -> tuple[list[dict], list[str]]:
    """Rows of subgroups.csv for one setting: per group its AUROC, AUPRC (macro, seed mean) and, with
    ``thresholds``, per label the operating-point rates; each with its interval and its gap to the largest group
    with the gap's interval and bootstrap p, all from one bootstrap of the test set's units."""
    from .stats import STAT_METRICS, Scored, Statistic

    values = by.values(raw)
    names = sorted(v for v in set(values) if v != "")
    notes = []
    if not names:
        raise UserError(f"--by {by}: no test image has a value of {by.column}")
    if len(names) > MAX_GROUPS:
        raise UserError(f"--by {by}: {by.column} has {len(names)} distinct values on the test images; bin it, e.g. "
                        f"--by {by.column}:0,40,60,80,120 (numeric bins [a, b))")
    unknown = int((values == "").sum())
    if unknown:
        notes.append(f"{unknown} test image(s) have no {by.column} and are in no group")
    member = [(values == g).astype(np.float64) for g in names]
    sizes = [int(m.sum()) for m in member]
    reference = int(np.argmax(sizes))
    inners: list[tuple[str, str, UnitStatistic]] = [
        ("macro", m, Statistic(test, [Scored("s", probs)], [("mean", m, 0)])) for m in STAT_METRICS]
    if thresholds is not None:
        for j, label in enumerate(test.label_names):
            op = OperatingStatistic(test, j, probs, {s: thresholds[s][j] for s in thresholds})
            inners.append((label, "operating", op))
    rows = []
    for label, metric, inner in inners:
        stat = GroupStatistic(test, inner, member, reference)
        metric_names = [metric] if metric != "operating" else list(OP_METRICS)
        k = len(metric_names)
        which = None if label == "macro" else [test.label_names.index(label)]
        own = [minority_units(test, m > 0, which) for m in member]
        minority = [own[g] for g in range(len(names)) for _ in metric_names]
        minority += [min(own[g], own[reference]) for g in range(len(names)) for _ in metric_names]
        bounds = [(0.0, 1.0)] * (len(names) * k) + [(-1.0, 1.0)] * (len(names) * k)
        ivs = intervals(test, stat, resamples, seed, undefined_ok=True, minority=minority, bounds=bounds)
        n = len(names)
        for gi, g in enumerate(names):
            keep = member[gi] > 0
            units = len(np.unique(test.units[keep]))
            pos = " ".join(f"{lab}:{len(np.unique(test.units[keep & test.mask[:, j] & test.labels[:, j]]))}"
                           for j, lab in enumerate(test.label_names))
            for mi, mname in enumerate(metric_names):
                iv, gap = ivs[gi * k + mi], ivs[(n + gi) * k + mi]
                small = np.isnan(iv.low) and resamples > 0
                rows.append({"column": str(by), "group": g, "reference": names[reference], "images": sizes[gi],
                             "units": f"{units} {test.unit_kind}", "positives": pos,
                             "metric": mname if label == "macro" else f"{mname} {label}", "value": iv.estimate,
                             "ci_low": iv.low, "ci_high": iv.high,
                             "gap": np.nan if gi == reference else gap.estimate,
                             "gap_ci_low": np.nan if gi == reference else gap.low,
                             "gap_ci_high": np.nan if gi == reference else gap.high,
                             "p_gap": np.nan if gi == reference else gap.p,
                             "note": (f"too small for an interval: in {iv.undefined} of {iv.resamples} resamples the "
                                      "value is undefined (no positive or no negative)") if small else "",
                             "resamples": resamples, "seed": seed})
    return rows, notes


def subgroups(summary: pd.DataFrame, runs: pd.DataFrame, root, by: By, resamples: int, seed: int,
              rule: Optional[Rule] = None, problems: Optional[list[str]] = None) -> tuple[pd.DataFrame, list[str]]:
    """subgroups.csv's rows for every setting whose test predictions carry group_<column>; a setting that cannot
    give them is in ``problems`` too (asked for: rtl report exits 2)."""
    problems = [] if problems is None else problems
    from .compare import PredictionLoader, describe

    notes: list[str] = []
    rows = []
    val = PredictionLoader(root, "val")
    lacking, have = [], set()
    for _, row, side in readable_sides(summary, runs, root, notes, "subgroup evidence", problems=problems):
        groups = side.split.groups or {}
        have |= set(groups)
        if by.column not in groups:
            lacking.append(describe(row))
            continue
        try:
            thresholds = None if rule is None else run_thresholds(runs, row, val, rule, side.labels)
            found, why = subgroup_rows(holdout_of(side), side.scored.probs, groups[by.column], by, resamples, seed,
                                       thresholds)
        except UserError as err:
            notes.append(f"{describe(row)}: no subgroup evidence: {err}")
            problems.append(notes[-1])
            continue
        notes += [f"{describe(row)}: {w}" for w in why]
        rows += [{"dataset": row["dataset"], "fraction": row["fraction"], "setting": describe(row), **r} for r in found]
    if lacking:
        notes.append(f"--by {by}: the test predictions of {len(lacking)} setting(s) carry no {by.column} (kept only "
                     "from data.group_columns of a CSV, or CheXpert's sex and age; runs made before need "
                     f"runtime.force=true; columns kept: {', '.join(sorted(have)) or 'none'}): {', '.join(lacking[:5])}")
        problems.append(notes[-1])
    return pd.DataFrame(rows, columns=SUBGROUP_COLUMNS), notes


def subgroup_note(by: By) -> str:
    return (f"subgroups ({by}): each group's metrics on its own test images (macro AUROC / AUPRC averaged over seeds; "
            "with --operating-point, the rates per label at each run's validation threshold), and each group's gap "
            "to the largest group, with 95% intervals and bootstrap p-values from one bootstrap of the test set's "
            "units (the groups' images are resampled together, so a patient in two groups is counted once per "
            "resample); a group too small for an interval says so")


def markdown_subgroups(table: pd.DataFrame) -> str:
    head = "| dataset | fraction | setting | group | images | metric | value | gap to the largest group | p |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for _, r in table.iterrows():
        gap = "(reference)" if r.group == r.reference else (
            "-" if np.isnan(r.gap) else f"{r.gap:+.3f}" + ("" if np.isnan(r.gap_ci_low)
                                                          else f" [{r.gap_ci_low:+.3f}, {r.gap_ci_high:+.3f}]"))
        p = "" if r.group == r.reference or np.isnan(r.p_gap) else f"{r.p_gap:.3g}"
        lines.append(f"| {r.dataset} | {r.fraction:g} | {r.setting} | {r.column} = {r.group} | {r.images} | {r.metric} "
                     f"| {_cell(r.value, r.ci_low, r.ci_high)}{' (' + r.note + ')' if r.note else ''} | {gap} | {p} |")
    return "\n".join(lines)
