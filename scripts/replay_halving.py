"""Replay rtl advise's successive halving on a full grid's own curves (README, "rtl advise").

    python scripts/replay_halving.py GRID_DIR [--eta 3] [--min-epochs 1,3,9]

GRID_DIR holds a finished grid: every candidate x init x seed trained to train.epochs (rtl train -m). For each
first rung (advise.min_epochs) the replay makes advise's decisions from the grid's metrics.csv files: at each rung
the best 1/eta by the mean over seeds of each run's best validation AUPRC so far go on; the reference arms (the
whole network with TL, the winner with the other init) are trained to the end. It prints each schedule's winner
and its cost in epochs as a share of the grid's, beside each candidate's score at every rung, so that a user can
see where a candidate that wins late was dropped and what a later first rung would cost.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from rethink_tl import advise as A

INIT = {"pretrained": "TL", "random": "RI"}


def curves(grid: Path) -> dict[tuple[str, str], list[pd.Series]]:
    """(model tag, init) -> each seed's best validation AUPRC so far, per epoch (index 1..n)."""
    out: dict[tuple[str, str], list[pd.Series]] = {}
    for ident in sorted(grid.rglob("identity.json")):
        if not (ident.parent / "results.csv").is_file():
            raise SystemExit(f"{ident.parent}: unfinished: finish the grid first")
        s = json.loads(ident.read_text())["settings"]
        m = pd.read_csv(ident.parent / "metrics.csv")
        out.setdefault((s["model.tag"], s["init.name"]), []).append(m.set_index("epoch")["val_auprc"].cummax())
    return out


def whole(tag: str) -> str:
    from rethink_tl.evidence.compare import full_model

    return full_model(tag) or tag


def replay(c: dict, eta: int, schedule: list[int]) -> tuple[tuple[str, str], int, dict]:
    score = {k: {r: sum(s[r] for s in v) / len(v) for r in schedule} for k, v in c.items()}
    alive, epochs, dropped = sorted(c), {k: 0 for k in c}, {}
    for r in schedule[:-1]:
        if len(alive) <= 1:
            break
        for k in alive:
            epochs[k] = r
        ranked = sorted(alive, key=lambda k: -score[k][r])
        for k in ranked[A.keep(len(alive), eta):]:
            dropped[k] = r
        alive = ranked[:A.keep(len(alive), eta)]
    winner = max(alive, key=lambda k: score[k][schedule[-1]])
    other = "random" if winner[1] == "pretrained" else "pretrained"
    for k in {*alive, (whole(winner[0]), "pretrained"), (winner[0], other)} & set(c):
        epochs[k] = schedule[-1]
    return winner, sum(epochs[k] * len(c[k]) for k in c), dropped


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path)
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--min-epochs", default="", help="first rungs to replay, e.g. 1,3,9 (default: advise's)")
    args = parser.parse_args(argv)
    c = curves(args.grid)
    total = min(len(s) for v in c.values() for s in v)
    full = sum(total * len(v) for v in c.values())
    firsts = [int(x) for x in args.min_epochs.split(",") if x] or [None]
    schedules = [A.rungs(len(c), args.eta, total, f) for f in firsts]
    shown = sorted({r for s in schedules for r in s})
    print("| candidate | " + " | ".join(f"val AUPRC @{r}" for r in shown) + " |")
    print("|---|" + "---|" * len(shown))
    final = {k: sum(s[total] for s in v) / len(v) for k, v in c.items()}
    for k in sorted(c, key=lambda k: -final[k]):
        print(f"| {k[0]} {INIT.get(k[1], k[1])} | "
              + " | ".join(f"{sum(s[r] for s in c[k]) / len(c[k]):.3f}" for r in shown) + " |")
    print("\n| rungs | winner | epochs (share of the grid's) | where the grid's winner was dropped |")
    print("|---|---|---|---|")
    best = max(c, key=lambda k: final[k])
    for sched in schedules:
        winner, spent, dropped = replay(c, args.eta, sched)
        where = f"epoch {dropped[best]}" if best in dropped else "kept"
        print(f"| {', '.join(map(str, sched))} | {winner[0]} {INIT.get(winner[1], winner[1])} | {spent:,} "
              f"({100 * spent / full:.0f}%) | {where} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
