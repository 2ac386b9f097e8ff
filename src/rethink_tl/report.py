"""``rtl report DIR``: every run below DIR -> summary.csv (mean, std, n over seeds), a Markdown table
and, for a paper experiment, its figure.

    rtl report multirun                                   tables only, or the figure the runs were made for
    rtl report figures/full/runs/covid --figure fig7 --out figures/full/fig7
    rtl report figures/fig2 --figure fig2                 the toy example; needs no runs

Which figure: ``--figure``, else the ``experiment`` key that ``+experiment=figN`` wrote into every run's
config (when all runs agree). With a figure, only the runs of that experiment's design count (its
models x inits x fractions, read from ``conf/experiment/figN.yaml``): figures that share runs (fig3
and fig7 both need CBR TL at 5/10/100 %) can then share one run directory and train each setting once.
"""

from __future__ import annotations

import importlib.resources
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .checkpoint import write_csv
from .errors import UserError

GROUP = ["dataset", "model", "init", "strategy", "fraction"]
HEADLINE = ["test_auroc", "test_auprc", "val_auroc", "val_auprc"]
# Settings that must agree among the seeds of one summary row; if they differ, the runs were made
# with different configurations (an old sweep under the same directory) and the mean mixes them.
SAME_WITHIN_GROUP = ["image_size", "lr", "batch_size", "n_train", "n_test"]
SHOW = 10  # unfinished runs or missing settings named on the terminal; summary.md names them all


@dataclass
class Run:
    """What a run directory's config says about it; the key fields of a results row."""

    path: Path
    experiment: str | None
    dataset: str | None
    model: str | None
    init: str | None
    fraction: float | None


def _read_run(path: Path) -> Run:
    """The run's identity from its resolved config (written by ``rtl train``) or Hydra's copy of it."""
    for cfg_path in (path / "config.yaml", path / ".hydra" / "config.yaml"):
        if not cfg_path.is_file():
            continue
        cfg = OmegaConf.load(cfg_path)

        def get(key):
            try:
                return OmegaConf.select(cfg, key)
            except OmegaConfBaseException:  # an interpolation that only resolved inside the job
                return None

        fraction = get("data.fraction")
        return Run(path, get("experiment"), get("data.name"), get("model.tag") or get("model.name"),
                   get("init.name"), None if fraction is None else float(fraction))
    return Run(path, None, None, None, None, None)


def gather(root: str | Path) -> tuple[pd.DataFrame, list[Run]]:
    """All results rows below ``root`` (with run_dir and experiment columns) and the runs that have not
    finished: directories with a Hydra config, an epoch (metrics.csv) or a checkpoint but no results.csv."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory: pass a run or sweep output directory")
    rows = []
    for res in sorted(root.rglob("results.csv")):
        df = pd.read_csv(res)
        df["run_dir"] = str(res.parent.relative_to(root))
        df["experiment"] = _read_run(res.parent).experiment
        rows.append(df)
    markers = ("metrics.csv", "last.pt", ".hydra/config.yaml")
    started = {p.parent.parent if p.parent.name == ".hydra" else p.parent
               for m in markers for p in root.rglob(m)}
    unfinished = [_read_run(d) for d in sorted(started) if not (d / "results.csv").is_file()]
    if not rows:
        raise UserError(f"no finished run (results.csv) below {root}"
                        + (f"; {len(unfinished)} unfinished" if unfinished else ""))
    return pd.concat(rows, ignore_index=True), unfinished


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof=1; NaN for one seed) and n over seeds for every metric column, per
    dataset x model x init x fraction (macro and per label)."""
    metric_cols = [c for c in runs.columns if c.startswith(("val_au", "test_au"))]
    grouped = runs.groupby(GROUP, sort=True, dropna=False)
    out = grouped[metric_cols].agg(["mean", "std"])
    out.columns = [f"{col}_{stat}" for col, stat in out.columns]
    out.insert(0, "n", grouped.size())
    out.insert(1, "seeds", grouped["seed"].agg(lambda s: " ".join(str(int(v)) for v in sorted(s))))
    out.insert(2, "params", grouped["params"].first())
    return out.reset_index()


def mixed_settings(runs: pd.DataFrame) -> list[str]:
    """Summary rows whose seeds were run with different settings (see SAME_WITHIN_GROUP)."""
    cols = [c for c in SAME_WITHIN_GROUP if c in runs.columns]
    if not cols:
        return []
    varying = runs.groupby(GROUP, dropna=False)[cols].nunique(dropna=False)
    out = []
    for key, row in varying.iterrows():
        differ = [c for c in cols if row[c] > 1]
        if differ:
            out.append(f"{'/'.join(str(k) for k in key)}: runs differ in {', '.join(differ)}")
    return out


def _fmt(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "-"
    return f"{mean:.3f}" if np.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def markdown(summary: pd.DataFrame) -> str:
    head = "| dataset | model | init | strategy | fraction | n | params | test AUROC | test AUPRC | val AUROC | val AUPRC |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for _, r in summary.iterrows():
        lines.append(f"| {r.dataset} | {r.model} | {r.init} | {r.strategy} | {r.fraction:g} | {r.n} | "
                     f"{r.params / 1e6:.2f}M | "
                     + " | ".join(_fmt(r[f'{c}_mean'], r[f'{c}_std']) for c in HEADLINE) + " |")
    return "\n".join(lines)


def label_names(summary: pd.DataFrame) -> list[str]:
    """The labels of a summary, in column order: ``test_auroc_<label>_mean`` -> label."""
    head, tail = "test_auroc_", "_mean"
    return [c[len(head):-len(tail)] for c in summary.columns
            if c.startswith(head) and c.endswith(tail) and c != "test_auroc_mean"]


def markdown_per_label(summary: pd.DataFrame, metric: str) -> str:
    """Test ``metric`` per label, one column per label: the numbers behind per-pathology figures."""
    labels = label_names(summary)
    head = "| model | init | fraction | " + " | ".join(labels) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for _, r in summary.iterrows():
        cells = [_fmt(r[f"test_{metric}_{lab}_mean"], r[f"test_{metric}_{lab}_std"]) for lab in labels]
        lines.append(f"| {r.model} | {r.init} | {r.fraction:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- experiment designs --------------------------------------------------------------------------

@dataclass
class Design:
    """The sweep axes of a paper experiment (conf/experiment/<figure>.yaml, hydra.sweeper.params)."""

    figure: str
    models: list[str]  # model tags, as results.csv names them, in the experiment's order
    inits: list[str]
    fractions: list[float]

    def contains(self, model, init, fraction) -> bool:
        return (model in self.models and init in self.inits and fraction is not None
                and bool(np.isclose(self.fractions, float(fraction)).any()))

    def cells(self) -> list[tuple[str, str, float]]:
        return list(itertools.product(self.models, self.inits, self.fractions))


def _conf_dir():
    return importlib.resources.files("rethink_tl.conf")


def experiments() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in _conf_dir().joinpath("experiment").iterdir()
                  if p.name.endswith(".yaml"))


def _sweep_values(key: str, value) -> list[str]:
    """The values of one sweeper param as Hydra's sweeper would expand them (lists, ranges, choice)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_overrides([f"{key}={value}"])[0]
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    return [override.get_value_element_as_str()]


def _model_tag(name: str) -> str:
    """The tag results.csv records for ``model=name`` (aliases such as densenet121 record dens_f)."""
    path = _conf_dir().joinpath("model", f"{name}.yaml")
    if not path.is_file():
        return name
    cfg = OmegaConf.create(path.read_text())
    return str(cfg.get("tag", name))


def design(figure: str) -> Design:
    path = _conf_dir().joinpath("experiment", f"{figure}.yaml")
    if not path.is_file():
        raise UserError(f"no experiment {figure!r}: choose one of {', '.join(experiments())}")
    params = OmegaConf.select(OmegaConf.create(path.read_text()), "hydra.sweeper.params") or {}
    missing = [k for k in ("model", "init", "data.fraction") if k not in params]
    if missing:
        raise RuntimeError(f"{path} names no sweep values for {', '.join(missing)} under hydra.sweeper.params")
    return Design(figure, [_model_tag(m) for m in _sweep_values("model", params["model"])],
                  _sweep_values("init", params["init"]),
                  [float(f) for f in _sweep_values("data.fraction", params["data.fraction"])])


def _which_figure(runs: pd.DataFrame) -> tuple[str | None, str]:
    """The figure every run was made for (their ``experiment`` key), or None and why not."""
    marks = sorted(set(runs["experiment"].dropna().astype(str)))
    if not marks:
        return None, ""
    unmarked = runs["experiment"].isna().any()
    if len(marks) > 1 or unmarked:
        kinds = ", ".join(marks + (["no experiment"] if unmarked else []))
        return None, f"runs of several experiments ({kinds}): pass --figure to draw one"
    from .figures import FIGURES

    if marks[0] not in FIGURES:
        return None, f"the runs are of experiment {marks[0]}, which has no figure: tables only"
    return marks[0], ""


# --- the report ----------------------------------------------------------------------------------

def report(root: str | Path, figure: str | None = None, out: str | Path | None = None, note: str = "") -> str:
    """Write summary.csv, summary.md and (for a paper experiment) the figure into ``out`` (default
    ``root``); return the text to print."""
    root = Path(root)
    out = Path(out) if out is not None else root
    if figure == "fig2":
        from .figures import toy

        table, paths = toy(out, note)
        lines = ["toy example (paper Fig. 2): 10 positives, 990 negatives, scores = ranks",
                 "| classifier | AUROC | AUPRC | ranks of the 10 positives |", "|---|---|---|---|"]
        lines += [f"| {r.classifier} | {r.auroc:.4f} | {r.auprc:.3f} | {r.positive_ranks} |"
                  for r in table.itertuples()]
        lines.append("figure: " + ", ".join(str(p) for p in paths))
        return "\n".join(lines)

    runs, unfinished = gather(root)
    notes = []
    if figure is None:
        figure, why_not = _which_figure(runs)
        notes += [why_not] if why_not else []
    plan = design(figure) if figure else None
    if plan is not None:
        keep = np.array([plan.contains(m, i, f) for m, i, f in zip(runs["model"], runs["init"], runs["fraction"])])
        if not keep.all():
            notes.append(f"{int((~keep).sum())} finished runs below {root} are outside {figure}'s design "
                         f"(models x inits x fractions of conf/experiment/{figure}.yaml) and left out")
        runs = runs[keep]
        unfinished = [u for u in unfinished if plan.contains(u.model, u.init, u.fraction)]
        if runs.empty:
            raise UserError(f"no finished run of {figure}'s design below {root}: models {', '.join(plan.models)}; "
                            f"inits {', '.join(plan.inits)}; fractions {', '.join(f'{f:g}' for f in plan.fractions)}")
        datasets = sorted(runs["dataset"].astype(str).unique())
        if len(datasets) > 1:
            raise UserError(f"{figure} draws one dataset but {root} holds runs of {', '.join(datasets)}: "
                            f"point rtl report at {root}/<dataset>")
    summary = summarise(runs)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(summary, out / "summary.csv")

    tables = [markdown(summary)]
    if len(label_names(summary)) > 1:
        for metric, name in (("auroc", "AUROC"), ("auprc", "AUPRC")):
            tables.append(f"\ntest {name} per label (mean ± sd over seeds)\n\n" + markdown_per_label(summary, metric))

    # Each note is (head, items): summary.md lists every item, the terminal the first SHOW of them.
    done = f"{len(runs)} finished runs in {len(summary)} settings"
    names = [str(u.path.relative_to(root)) for u in unfinished]
    notes_with_items = [(done + (f"; {len(names)} unfinished (no results.csv): " if names else ""), names)]
    notes_with_items += [(n, []) for n in notes]
    notes_with_items += [(f"mixed settings in {m}", []) for m in mixed_settings(runs)]
    if plan is not None:
        have = {(m, i, round(f, 6)) for m, i, f in zip(summary["model"], summary["init"], summary["fraction"])}
        absent = [f"{m}/{i}/f{f:g}" for m, i, f in plan.cells() if (m, i, round(f, 6)) not in have]
        notes_with_items.append((f"{figure} design: {len(plan.cells())} settings, {len(plan.cells()) - len(absent)} "
                                 f"with finished runs" + ("; none yet for " if absent else ""), absent))
        paths = draw_figure(figure, summary, out, plan.models, note)
        notes_with_items.append(("figure: " + ", ".join(str(p) for p in paths), []))

    def short(items: list[str]) -> str:
        more = len(items) - SHOW
        return ", ".join(items[:SHOW]) + (f" and {more} more (all in summary.md)" if more > 0 else "")

    (out / "summary.md").write_text("\n".join(tables) + "\n\n"
                                    + "\n\n".join(h + ", ".join(items) for h, items in notes_with_items) + "\n")
    return "\n".join(tables) + "\n\n" + "\n".join(h + short(items) for h, items in notes_with_items)


def draw_figure(figure: str, summary: pd.DataFrame, out: Path, models: list[str], note: str) -> list[Path]:
    from .figures import draw  # matplotlib is imported only when a figure is drawn

    return draw(figure, summary, out, models, note)
