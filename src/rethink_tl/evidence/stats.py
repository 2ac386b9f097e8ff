"""Confidence intervals and paired tests over the test images, from the runs' per-image predictions.

The quantity is what a summary row shows: a macro metric (mean over labels) averaged over the seeds of a
setting; for a comparison of settings A and B, the mean over their common seeds of (A's metric - B's).
Its sampling error comes from the test images, so both are resampled over test images:

* **Bootstrap** (``bootstrap``): ``scipy.stats.bootstrap`` draws the resamples and gives the BCa interval
  (percentile where BCa is undefined or the units too many), widened for small samples (``intervals``). The
  resampled unit is the patient where the dataset knows patients (all of one patient's
  images go in or out together), else the image. A resample is turned into a weight per image (how often
  it was drawn) and every model, seed and label is scored on the same weights, so a comparison is paired.
  The two-sided p-value is ``2 * min(share of resamples <= 0, share >= 0)``, each share counted as
  (k + 1) / (B + 1) so that it is never 0.
* **DeLong** (``delong``), for AUROC: DeLong, DeLong and Clarke-Pearson (1988) in the midrank form of Sun
  and Xu (2014). For one label and one seed it is the classical test of two correlated AUROCs. For the
  mean over labels and seeds, each image's placement terms are summed over them before squaring (they
  share images, so their covariance counts), and with patients, summed over the patient's images
  (Obuchowski 1997).

The weighted metrics equal scikit-learn's ``roc_auc_score`` / ``average_precision_score`` with
``sample_weight`` (a test checks them on random cases with ties); they are computed here only because
sklearn scores one weight vector at a time, and a bootstrap needs thousands.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import scipy.stats

from ..errors import UserError

RESAMPLES = 2000
MAX_RESAMPLES = 100_000  # the bootstrap distribution is kept: 8 bytes x rows x resamples
SEED = 0
LEVEL = 0.95
BATCH = 100  # resamples scored at once (memory: BATCH x images x 8 bytes per array)
STAT_METRICS = ("auroc", "auprc")
INTERVAL_METHODS = ("bca", "percentile")  # bootstrap intervals: scipy's BCa (the default) and percentile
_SCIPY_METHOD = {"percentile": "percentile", "bca": "BCa"}
# BCa's jackknife scores the statistic once per unit: units x images work. Above this many units it would dwarf the
# resamples (a CheXpert test split: minutes become hours), and the percentile interval is used; by then the
# minority class is usually large enough for it (and the small-sample widening still applies).
BCA_MAX_UNITS = 5000


class TooFewImages(UserError):
    """A bootstrap or test that the data cannot support (a label without enough positives or negatives)."""


# --- weighted metrics over many weight vectors at once ---------------------------------------------

@dataclass
class Ranked:
    """One score vector sorted once (descending), with its tie groups: what every resample reuses."""

    order: np.ndarray  # indices sorting the scores descending
    starts: np.ndarray  # start of each group of equal scores in the sorted order
    positive: np.ndarray  # bool, sorted order

    @classmethod
    def of(cls, y: np.ndarray, s: np.ndarray) -> "Ranked":
        order = np.argsort(-np.asarray(s, dtype=np.float64), kind="stable")
        sorted_s = np.asarray(s, dtype=np.float64)[order]
        starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
        return cls(order, starts, np.asarray(y, dtype=bool)[order])

    def group_sums(self, w: np.ndarray, index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Weighted positives and negatives per tie group, (B, G) each, for weights (B, n) (of the images
        ``index`` picks from the columns of ``w``, when given)."""
        ws = w[:, self.order if index is None else index[self.order]]
        tp = np.add.reduceat(ws * self.positive, self.starts, axis=1)
        return tp, np.add.reduceat(ws, self.starts, axis=1) - tp


def _auroc(tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    tps = np.cumsum(tp, axis=1)
    pos, neg = tps[:, -1], fp.sum(axis=1)
    area = (fp * (tps - tp / 2.0)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((pos > 0) & (neg > 0), area / (pos * neg), np.nan)


def _ap(tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    tps, fps = np.cumsum(tp, axis=1), np.cumsum(fp, axis=1)
    pos, neg = tps[:, -1:], fps[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tps + fps > 0, tps / (tps + fps), 0.0)
        ap = (tp / pos * precision).sum(axis=1)
    return np.where((pos[:, 0] > 0) & (neg > 0), ap, np.nan)


FROM_SUMS = {"auroc": _auroc, "auprc": _ap}


def weighted_auroc(ranked: Ranked, w: np.ndarray) -> np.ndarray:
    """AUROC for each row of weights ``w`` (B, n): the trapezoid ROC area, ties counting one half.
    NaN where a row weighs no positive or no negative."""
    return _auroc(*ranked.group_sums(w))


def weighted_ap(ranked: Ranked, w: np.ndarray) -> np.ndarray:
    """Average precision (sklearn's step-wise sum, no interpolation) for each row of ``w`` (B, n).
    NaN where a row weighs no positive or no negative (where sklearn warns or returns a degenerate value)."""
    return _ap(*ranked.group_sums(w))


# --- what is compared --------------------------------------------------------------------------------

@dataclass
class Scored:
    """One setting on one test set: per seed, the (N, L) probabilities; shared truth, mask and units."""

    name: str
    probs: dict[int, np.ndarray]  # seed -> (N, L) float32


@dataclass
class Holdout:
    """The images every compared run was scored on, and the unit a bootstrap resamples."""

    labels: np.ndarray  # (N, L) 0/1
    mask: np.ndarray  # (N, L) bool
    label_names: list[str]
    units: np.ndarray  # (N,) int: the patient (or image) of each image, 0..U-1
    unit_kind: str  # "patients" or "images"
    where: str = "test split"  # what the images are, for messages

    @classmethod
    def of(cls, labels: np.ndarray, mask: np.ndarray, label_names: Sequence[str],
           patients: Optional[Sequence[str]], where: str = "test split") -> "Holdout":
        if patients is not None:
            from ..identity import own_unit_if_blank  # a blank id: a patient of its own

            _, units = np.unique(np.asarray(own_unit_if_blank(patients), dtype=object).astype(str),
                                 return_inverse=True)
            kind = "patients"
        else:
            units, kind = np.arange(len(labels)), "images"
        return cls(np.asarray(labels) > 0.5, np.asarray(mask, dtype=bool), list(label_names), units.astype(np.int64),
                   kind, where)

    @property
    def n_units(self) -> int:
        return int(self.units.max()) + 1 if len(self.units) else 0

    def check(self, minimum: int = 2) -> None:
        """Every label needs ``minimum`` units with a positive and with a negative (counted cells), or a
        resample has nothing to rank."""
        for j, label in enumerate(self.label_names):
            keep = self.mask[:, j]
            pos = len(np.unique(self.units[keep & self.labels[:, j]]))
            neg = len(np.unique(self.units[keep & ~self.labels[:, j]]))
            if min(pos, neg) < minimum:
                raise TooFewImages(
                    f"label {label!r} has {pos} {self.unit_kind} with a positive and {neg} with a negative in the "
                    f"{self.where}: too few for a bootstrap interval or a test (at least {minimum} of each are "
                    "needed; at 15 the 95% intervals covered the truth in 94-95% of simulations, below that they "
                    "are rough: python scripts/coverage.py --positives N measures them)"
                    + (": use a larger test split" if self.where == "test split" else ""))


class UnitStatistic:
    """scipy.stats.bootstrap's vectorised statistic over the units (patients or images) of ``self.test``: a
    resample of units becomes a weight per image (how often its unit was drawn); subclasses give
    ``values(w) -> (rows, B)`` for weights ``w`` (B, N)."""

    test: Holdout

    def values(self, w: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, drawn: np.ndarray, axis: int = -1) -> np.ndarray:
        """``drawn`` (B, U) unit indices -> (rows, B); (U,) -> (rows,) (scipy's convention; a jackknife sample
        has U - 1 units)."""
        one = np.ndim(drawn) == 1
        drawn = np.atleast_2d(drawn)
        n_units = self.test.n_units
        flat = (drawn + n_units * np.arange(len(drawn))[:, None]).ravel()
        counts = np.bincount(flat, minlength=len(drawn) * n_units).reshape(len(drawn), n_units)
        out = self.values(counts[:, self.test.units].astype(np.float64))
        return out[:, 0] if one else out


class Statistic(UnitStatistic):
    """Macro metrics of scored settings under resample weights; the callable scipy.stats.bootstrap needs.

    ``rows`` lists what to return, one value per row: ("mean", metric, a) the seed-mean macro metric of setting
    a, or ("diff", metric, a, b) the mean over common seeds of a's minus b's. Each run and label is ranked once
    and scored once per resample, however many rows use it."""

    def __init__(self, test: Holdout, settings: list[Scored], rows: list[tuple]):
        self.test, self.settings, self.rows = test, settings, rows
        used = {k for row in rows for k in row[2:]}
        self.ranked: dict[tuple[int, int], list[tuple[np.ndarray, Ranked]]] = {}
        for k in sorted(used):
            for seed, probs in settings[k].probs.items():
                self.ranked[k, seed] = []
                for j in range(len(test.label_names)):
                    keep = np.flatnonzero(test.mask[:, j])
                    self.ranked[k, seed].append((keep, Ranked.of(test.labels[keep, j], probs[keep, j])))

    def values(self, w: np.ndarray) -> np.ndarray:
        """(len(rows), B) for image weights ``w`` (B, N)."""
        sums: dict[tuple[int, int], list] = {}
        macro: dict[tuple[str, int, int], np.ndarray] = {}

        def m(metric: str, k: int, seed: int) -> np.ndarray:
            if (metric, k, seed) not in macro:
                if (k, seed) not in sums:
                    sums[k, seed] = [ranked.group_sums(w, keep) for keep, ranked in self.ranked[k, seed]]
                macro[metric, k, seed] = np.mean([FROM_SUMS[metric](tp, fp) for tp, fp in sums[k, seed]], axis=0)
            return macro[metric, k, seed]

        out = []
        for row in self.rows:
            kind, metric, a = row[:3]
            if kind == "mean":
                out.append(np.mean([m(metric, a, seed) for seed in sorted(self.settings[a].probs)], axis=0))
            else:
                b = row[3]
                seeds = sorted(set(self.settings[a].probs) & set(self.settings[b].probs))
                out.append(np.mean([m(metric, a, seed) - m(metric, b, seed) for seed in seeds], axis=0))
        return np.stack(out)


@dataclass
class Interval:
    estimate: float
    low: float
    high: float
    p: float  # two-sided bootstrap p-value of "equal to 0" (meaningful for differences)
    undefined: int  # resamples whose value is undefined (a label without positives or negatives), left out
    resamples: int
    method: str = "bca"  # the interval: bca, or percentile where BCa is undefined (see intervals)
    factor: float = 1.0  # the small-sample widening applied (small_sample_factor)


def minority_units(test: Holdout, members: Optional[np.ndarray] = None, labels: Optional[Sequence[int]] = None) -> int:
    """The fewest units (patients or images) with a positive, or with a negative, over ``labels`` (default all),
    counting the images ``members`` (bool (N,)) picks: the sample size that limits an interval."""
    keep_rows = np.ones(len(test.labels), bool) if members is None else np.asarray(members, bool)
    counts = []
    for j in (range(len(test.label_names)) if labels is None else labels):
        keep = keep_rows & test.mask[:, j]
        counts.append(len(np.unique(test.units[keep & test.labels[:, j]])))
        counts.append(len(np.unique(test.units[keep & ~test.labels[:, j]])))
    return int(min(counts)) if counts else 0


def small_sample_factor(m: int, level: float = LEVEL) -> float:
    """sqrt(m / (m - 1)) x t(m - 1) / z at ``level``: the expanded bootstrap interval (Hesterberg 2015), with m
    the minority units: the bootstrap's plug-in variance lacks the m / (m - 1) of the unbiased one, and the
    normal quantile the uncertainty of a variance estimated from m units. 1.0 for large m; NaN below 2."""
    if m < 2:
        return float("nan")
    q = (1 + level) / 2
    return float(np.sqrt(m / (m - 1)) * scipy.stats.t.ppf(q, m - 1) / scipy.stats.norm.ppf(q))


def bootstrap(test: Holdout, settings: list[Scored], rows: list[tuple], resamples: int = RESAMPLES,
              seed: int = SEED, level: float = LEVEL, method: str = "bca") -> list[Interval]:
    """Intervals (and p-values) of ``rows`` (see Statistic; ``intervals`` for which) from one scipy.stats.bootstrap
    over the test set's units with ``np.random.default_rng(seed)``. The resamples depend only on the seed and the number
    of units, so every row gets the same interval whether it is computed alone or with others."""
    test.check()
    bounds = [(0.0, 1.0) if row[0] == "mean" else (-1.0, 1.0) for row in rows]
    return intervals(test, Statistic(test, settings, rows), resamples, seed, level, method=method, bounds=bounds)


def intervals(test: Holdout, stat: UnitStatistic, resamples: int = RESAMPLES, seed: int = SEED,
              level: float = LEVEL, undefined_ok: bool = False, method: str = "bca",
              minority: Optional[Sequence[int]] = None, bounds: Optional[Sequence[tuple[float, float]]] = None
              ) -> list[Interval]:
    """One scipy.stats.bootstrap of ``stat``'s rows over the units of ``test``: an Interval per row.

    The interval is scipy's BCa (``method="bca"``; its jackknife costs one more statistic per unit) or percentile
    one, then widened about the estimate by ``small_sample_factor(m)``, m the row's ``minority`` units (default:
    the holdout's, ``minority_units``), and kept within the row's ``bounds`` (default none). On simulated test sets
    of 15 positives and 285 negatives this brought the coverage of 95% AUROC intervals from 90-93% to 94-95%
    (scripts/coverage.py, README). Where BCa is undefined (every resample equal, or some resamples undefined) the
    row gets the percentile interval of its defined resamples, and says so in ``method``. A row whose value is
    undefined (NaN) in more than 1% of the resamples raises TooFewImages, or, with ``undefined_ok`` (a PPV where a
    resample has no positive call), gets a NaN interval with the count in ``undefined``. Without resamples
    (``resamples=0``): the observed values, with NaN bounds."""
    if method not in INTERVAL_METHODS:
        raise UserError(f"interval method {method!r}: choose one of {', '.join(INTERVAL_METHODS)}")
    units = np.arange(test.n_units)
    observed = np.atleast_1d(stat(units))
    if not resamples:
        return [Interval(float(v), np.nan, np.nan, np.nan, 0, 0) for v in observed]
    if method == "bca" and test.n_units > BCA_MAX_UNITS:
        method = "percentile"
    with warnings.catch_warnings():  # scipy warns of a NaN interval; those rows are handled below
        warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # BCa's acceleration of a constant row: 0 / 0
        res = scipy.stats.bootstrap((units,), stat, n_resamples=resamples, batch=BATCH, vectorized=True,
                                    method=_SCIPY_METHOD[method], confidence_level=level,
                                    rng=np.random.default_rng(seed))
    dist = np.atleast_2d(res.bootstrap_distribution)
    scipy_low, scipy_high = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
    m_rows = [minority_units(test)] * len(observed) if minority is None else list(minority)
    out = []
    for i, value in enumerate(observed):
        ok = dist[i][~np.isnan(dist[i])]
        undefined = resamples - len(ok)
        if undefined > 0.01 * resamples:
            if undefined_ok:
                out.append(Interval(float(value), np.nan, np.nan, np.nan, undefined, resamples, method))
                continue
            raise TooFewImages(f"{undefined} of {resamples} bootstrap resamples of the {test.unit_kind} of the "
                               f"{test.where} leave a label without a positive or a negative: too few for a bootstrap "
                               "interval")
        used = method
        low, high = scipy_low[i], scipy_high[i]
        if undefined or not (np.isfinite(low) and np.isfinite(high)):  # percentile over the defined resamples
            low, high = np.quantile(ok, [(1 - level) / 2, (1 + level) / 2])
            used = "percentile"
        f = small_sample_factor(m_rows[i], level)
        low, high = value - f * (value - low), value + f * (high - value)
        if bounds is not None:
            lo_b, hi_b = bounds[i]
            low, high = min(max(low, lo_b), hi_b), min(max(high, lo_b), hi_b)
        b = len(ok)
        p = min(1.0, 2 * min((np.sum(ok <= 0) + 1) / (b + 1), (np.sum(ok >= 0) + 1) / (b + 1)))
        out.append(Interval(float(value), float(low), float(high), float(p), undefined, resamples, used, f))
    return out


# --- DeLong --------------------------------------------------------------------------------------------

def placements(y: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(AUROC, V10 for each positive, V01 for each negative) by midranks (Sun and Xu 2014): V10_i is the share
    of negatives scored below positive i (ties one half), V01_j the share of positives scored above negative j."""
    y = np.asarray(y, dtype=bool)
    s = np.asarray(s, dtype=np.float64)
    pos, neg = s[y], s[~y]
    m, n = len(pos), len(neg)
    r_all = scipy.stats.rankdata(np.r_[pos, neg])
    r_pos, r_neg = scipy.stats.rankdata(pos), scipy.stats.rankdata(neg)
    v10 = (r_all[:m] - r_pos) / n
    v01 = 1.0 - (r_all[m:] - r_neg) / m
    return float(v10.mean()), v10, v01


@dataclass
class DeLong:
    estimate: float
    se: float
    z: float
    p: float


def delong(test: Holdout, settings: list[Scored], a: int, b: int) -> DeLong:
    """DeLong's test of (mean over common seeds and labels of AUROC_a - AUROC_b) = 0.

    Each AUROC's placement terms are scaled as in DeLong's variance, (V10_i - A)/m x sqrt(P/(P-1)) for the m
    positives and (V01_j - A)/n x sqrt(Q/(Q-1)) for the n negatives, and summed per unit (patient) before they
    are squared, so that for one label and one seed the sum of squares of their differences is var(A_a - A_b) =
    var A_a + var A_b - 2 cov. P and Q count the units (patients) with a positive and with a negative image:
    with one image per unit P = m and Q = n, DeLong's m/(m-1) and n/(n-1) exactly; with patients, Obuchowski's
    (1997) clustered S10/M and S01/N, whose small-sample factors count patients, not images. The terms of a
    patient with both positive and negative images meet with the factor sqrt(PQ/((P-1)(Q-1))), at least
    Obuchowski's I/(I-1) for the cross term S11 (I the patients): if anything a little wider."""
    test.check()
    seeds = sorted(set(settings[a].probs) & set(settings[b].probs))
    n_labels = len(test.label_names)
    coef = 1.0 / (len(seeds) * n_labels)
    psi = np.zeros(len(test.labels))
    estimate = 0.0
    for seed in seeds:
        for j in range(n_labels):
            keep = np.flatnonzero(test.mask[:, j])
            y = test.labels[keep, j]
            m, n = int(y.sum()), int((~y).sum())
            units_pos, units_neg = len(np.unique(test.units[keep][y])), len(np.unique(test.units[keep][~y]))
            for k, sign in ((a, 1.0), (b, -1.0)):
                auc, v10, v01 = placements(y, settings[k].probs[seed][keep, j])
                estimate += sign * coef * auc
                term = np.empty(len(keep))
                term[y] = (v10 - auc) / m * np.sqrt(units_pos / (units_pos - 1))
                term[~y] = (v01 - auc) / n * np.sqrt(units_neg / (units_neg - 1))
                psi[keep] += sign * coef * term
    per_unit = np.bincount(test.units, weights=psi, minlength=test.n_units)
    se = float(np.sqrt(np.sum(per_unit ** 2)))
    z = estimate / se if se > 0 else (0.0 if estimate == 0 else np.inf * np.sign(estimate))
    p = float(2 * scipy.stats.norm.sf(abs(z))) if np.isfinite(z) else 0.0
    return DeLong(float(estimate), se, float(z), p)
