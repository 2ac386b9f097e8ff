"""``rtl report DIR``: every finished run below DIR -> summary.csv (mean, std, n over seeds) + a Markdown table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoint import write_csv
from .errors import UserError

GROUP = ["dataset", "model", "init", "strategy", "fraction"]
HEADLINE = ["test_auroc", "test_auprc", "val_auroc", "val_auprc"]


def gather(root: str | Path) -> tuple[pd.DataFrame, list[Path]]:
    """All results rows below ``root`` (with their run dir) and the run dirs that have not finished."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory: pass a run or sweep output directory")
    rows, unfinished = [], []
    for res in sorted(root.rglob("results.csv")):
        df = pd.read_csv(res)
        df["run_dir"] = str(res.parent.relative_to(root))
        rows.append(df)
    done = {Path(r).resolve() for r in (root.rglob("results.csv"))}
    for metrics in sorted(root.rglob("metrics.csv")):
        if (metrics.parent / "results.csv").resolve() not in done:
            unfinished.append(metrics.parent)
    if not rows:
        raise UserError(f"no finished run (results.csv) below {root}" +
                        (f"; {len(unfinished)} unfinished" if unfinished else ""))
    return pd.concat(rows, ignore_index=True), unfinished


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof=1; NaN for one seed) and n over seeds for every metric column."""
    metric_cols = [c for c in runs.columns if c.startswith(("val_au", "test_au"))]
    grouped = runs.groupby(GROUP, sort=True, dropna=False)
    out = grouped[metric_cols].agg(["mean", "std"])
    out.columns = [f"{col}_{stat}" for col, stat in out.columns]
    out.insert(0, "n", grouped.size())
    out.insert(1, "params", grouped["params"].first())
    return out.reset_index()


def markdown(summary: pd.DataFrame) -> str:
    head = "| dataset | model | init | strategy | fraction | n | params | test AUROC | test AUPRC | val AUROC | val AUPRC |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def fmt(row, col):
        m, s = row[f"{col}_mean"], row[f"{col}_std"]
        return f"{m:.3f}" if np.isnan(s) else f"{m:.3f} ± {s:.3f}"

    for _, r in summary.iterrows():
        lines.append(f"| {r.dataset} | {r.model} | {r.init} | {r.strategy} | {r.fraction:g} | {r.n} | "
                     f"{r.params / 1e6:.2f}M | " + " | ".join(fmt(r, c) for c in HEADLINE) + " |")
    return "\n".join(lines)


def report(root: str | Path) -> str:
    root = Path(root)
    runs, unfinished = gather(root)
    summary = summarise(runs)
    write_csv(summary, root / "summary.csv")
    table = markdown(summary)
    note = f"\n\n{len(runs)} finished runs"
    if unfinished:
        note += f"; {len(unfinished)} unfinished: " + ", ".join(str(p.relative_to(root)) for p in unfinished[:5])
        note += " ..." if len(unfinished) > 5 else ""
    (root / "summary.md").write_text(table + note + "\n")
    return table + note
