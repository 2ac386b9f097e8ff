"""rtl advise side by side with the full grid it stands in for (README, "rtl advise").

    python scripts/advise_vs_grid.py GRID_DIR ADVISE_DIR [--resamples N]

GRID_DIR holds the grid's runs (rtl train -m over every candidate x init x seed, to train.epochs); ADVISE_DIR is
rtl advise's folder on the same settings. Prints one Markdown row per side: its winner by mean best validation
AUPRC over seeds, that winner's mean test AUPRC, and the image passes (training images processed, from every
metrics.csv below the folder); then whether the winners agree and, when they do not, the grid's own paired
bootstrap of the two on test AUPRC (can its runs tell them apart?).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from rethink_tl.evidence.compare import evidence
from rethink_tl.evidence.report import drop_duplicate_seeds, gather, summarise

INIT = {"pretrained": "TL", "random": "RI"}


def passes(folder: Path) -> int:
    return int(sum(pd.read_csv(p)["images_seen"].sum() for p in folder.rglob("metrics.csv")))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path)
    parser.add_argument("advise", type=Path)
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args(argv)

    if not (args.advise / "advice.csv").is_file():
        print(f"{args.advise}: no advice.csv: run rtl advise to the end first", file=sys.stderr)
        return 2
    g = gather(args.grid)
    runs, _ = drop_duplicate_seeds(g.runs)
    if g.unfinished or g.failed:
        print(f"{args.grid}: {len(g.unfinished)} unfinished and {len(g.failed)} failed run(s): finish the grid first",
              file=sys.stderr)
        return 2
    summary = summarise(runs, g.settings)
    best = summary.sort_values("val_auprc_mean", ascending=False, kind="stable").iloc[0]
    grid_winner = (best["model"], best["init"])

    advice = pd.read_csv(args.advise / "advice.csv")
    chosen = advice[advice["recommended"]].iloc[0]
    advise_winner = (chosen["model"], chosen["init"])
    grid_passes, advise_passes = passes(args.grid), passes(args.advise)

    print("| | winner (mean val AUPRC) | its test AUPRC | image passes | share of the grid's |")
    print("|---|---|---|---|---|")
    print(f"| grid ({len(runs)} runs) | {grid_winner[0]} {INIT[grid_winner[1]]} ({best['val_auprc_mean']:.3f}) | "
          f"{best['test_auprc_mean']:.3f} | {grid_passes:,} | 100% |")
    print(f"| rtl advise | {advise_winner[0]} {INIT[advise_winner[1]]} ({chosen['val_auprc_e' + str(int(chosen['rung_reached']))]:.3f}) | "
          f"{chosen['test_auprc']:.3f} | {advise_passes:,} | {100 * advise_passes / grid_passes:.0f}% |")
    if advise_winner == grid_winner:
        print("\nThe winners agree.")
        return 0
    a = f"{advise_winner[0]}/{advise_winner[1]}"
    b = f"{grid_winner[0]}/{grid_winner[1]}"
    ev = evidence(summary, runs, args.grid, [(a, b)], args.resamples, 0)
    row = ev.comparisons[(ev.comparisons["comparison"] == "asked") & (ev.comparisons["metric"] == "auprc")]
    if not len(row):
        row = ev.comparisons[(ev.comparisons["metric"] == "auprc")
                             & (ev.comparisons["a_model"].isin([advise_winner[0], grid_winner[0]]))
                             & (ev.comparisons["b_model"].isin([advise_winner[0], grid_winner[0]]))]
    r = row.iloc[0]
    print(f"\nThe winners differ. On the grid's own runs, {r['a']} - {r['b']}: test AUPRC {r['difference']:+.3f} "
          f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}], bootstrap p {r['p_bootstrap']:.3f} "
          f"({'cannot' if r['ci_low'] <= 0 <= r['ci_high'] else 'can'} be told apart at 95%).")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
