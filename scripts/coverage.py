"""How often rtl report's 95% intervals cover the truth with few positives (README, "Evidence"; issue 22).

    python scripts/coverage.py [--sims 300] [--positives 15] [--negatives 285] [--resamples 2000] [--methods ...]

Each simulation draws a test set of P positives and N negatives with binormal scores for two correlated models
(negatives N(0, 1), positives N(mu, 1), the two models' scores correlated rho within an image), so the true AUROC
of each is Phi(mu / sqrt 2) and the true difference is known. It computes the intervals of the single AUROC of
model A and of the paired difference A - B with each method, through rethink_tl.evidence.stats (the code rtl
report runs), and counts how often they cover the truth; beside them, for AUROC only, DeLong's Wald interval
of the difference and a logit-transformed DeLong interval of the single AUROC (the measured alternative); and it
compares DeLong's standard error of the difference with the empirical standard deviation of the estimates.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.special
import scipy.stats

from rethink_tl.evidence import stats


def simulate(rng: np.random.Generator, positives: int, negatives: int, mu: tuple[float, float], rho: float):
    y = np.r_[np.ones(positives, bool), np.zeros(negatives, bool)]
    z = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=len(y))
    scores = z + np.where(y[:, None], np.asarray(mu)[None, :], 0.0)
    return y, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sims", type=int, default=300)
    ap.add_argument("--positives", type=int, default=15)
    ap.add_argument("--negatives", type=int, default=285)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--mu", type=float, nargs=2, default=(1.5, 1.0), help="binormal separations of models A and B")
    ap.add_argument("--rho", type=float, default=0.5)
    ap.add_argument("--methods", nargs="+", default=list(stats.INTERVAL_METHODS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    truth_a, truth_b = (float(scipy.stats.norm.cdf(m / np.sqrt(2))) for m in args.mu)
    rng = np.random.default_rng(args.seed)
    covered = {m: {"single": 0, "diff": 0} for m in [*args.methods, "delong"]}
    z = float(scipy.stats.norm.ppf(0.975))
    estimates, ses = [], []
    t0 = time.perf_counter()
    for k in range(args.sims):
        y, s = simulate(rng, args.positives, args.negatives, tuple(args.mu), args.rho)
        test = stats.Holdout.of(y[:, None], np.ones((len(y), 1), bool), ["x"], None)
        settings = [stats.Scored("A", {0: s[:, :1]}), stats.Scored("B", {0: s[:, 1:]})]
        rows = [("mean", "auroc", 0), ("diff", "auroc", 0, 1)]
        for method in args.methods:
            single, diff = stats.bootstrap(test, settings, rows, args.resamples, seed=k, method=method)
            covered[method]["single"] += single.low <= truth_a <= single.high
            covered[method]["diff"] += diff.low <= truth_a - truth_b <= diff.high
        dl = stats.delong(test, settings, 0, 1)
        estimates.append(dl.estimate)
        ses.append(dl.se)
        covered["delong"]["diff"] += abs(dl.estimate - (truth_a - truth_b)) <= z * dl.se
        # A's own DeLong SE: against a constant score (AUROC 1/2, every placement term 0), then on the logit scale
        flat = stats.Scored("flat", {0: np.zeros((len(y), 1))})
        one = stats.delong(test, [settings[0], flat], 0, 1)
        auc = one.estimate + 0.5
        half = z * one.se / (auc * (1 - auc))
        low, high = scipy.special.expit(scipy.special.logit(auc) + np.array([-half, half]))
        covered["delong"]["single"] += low <= truth_a <= high
    seconds = time.perf_counter() - t0
    print(f"{args.sims} simulations, {args.positives} positives + {args.negatives} negatives, binormal mu "
          f"{args.mu[0]:g} / {args.mu[1]:g} (true AUROC {truth_a:.3f} / {truth_b:.3f}), rho {args.rho:g}, "
          f"{args.resamples} resamples ({seconds:.0f} s)")
    print("| interval | single AUROC covered | paired difference covered |")
    print("|---|---|---|")
    for method in [*args.methods, "delong"]:
        c = covered[method]
        name = "DeLong (logit for one AUROC, Wald for the difference)" if method == "delong" else f"bootstrap {method}"
        print(f"| {name} | {c['single'] / args.sims:.1%} | {c['diff'] / args.sims:.1%} |")
    print(f"DeLong: mean SE of the difference {np.mean(ses):.4f}; empirical sd of the estimates "
          f"{np.std(estimates, ddof=1):.4f} (ratio {np.mean(ses) / np.std(estimates, ddof=1):.2f})")


if __name__ == "__main__":
    main()
