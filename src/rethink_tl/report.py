"""``rtl report DIR``: every run below DIR -> summary.csv (mean, sd, n over seeds), a Markdown table
and, for a paper experiment, its figure.

    rtl report multirun                                   tables only, or the figure the runs were made for
    rtl report figures/full/runs/covid --figure fig7 --out figures/full/fig7
    rtl report figures/fig2 --figure fig2                 the toy example; needs no runs

Which figure: ``--figure``, else the ``experiment`` key that ``+experiment=figN`` wrote into every run's
config (when all runs agree). With a figure, only the runs of that experiment's design count (its
models x inits x fractions, read from ``conf/experiment/figN.yaml``): figures that share runs (fig3
and fig7 both need CBR TL at 5/10/100 %) can then share one run directory and train each setting once.

What a row is: the seeds of one setting, i.e. runs whose result-affecting settings are equal apart from
``train.seed`` (equal ``setting_id``; runs older than identity.json are grouped by their model, init,
fraction and the SAME_WITHIN_GROUP columns instead). Two settings of one model x init x fraction (an
earlier sweep with other epochs under the same folder) are two rows, and the ``settings`` column names
the keys that tell them apart. A seed found twice in one setting (a copied run folder) counts once.

What the report will not do: average or pick silently. A run folder whose files cannot be read
(a damaged results.csv, identity.json or config.yaml) is named with the reason on the terminal and in
summary.md and left out; the tables are still written, and ``rtl report`` exits 2. A figure has one bar
per model x init x fraction, so when a cell holds several settings the figure is refused (not drawn),
with a message naming them; the tables, which show every setting, are written all the same.
"""

from __future__ import annotations

import importlib.resources
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from .atomic_io import write_bytes, write_csv
from .errors import UserError
from .results import (CELL, EXTERNAL_MARK, GROUP, PROVENANCE, RESULTS_FILE, SAME_WITHIN_GROUP, BrokenRun, Run,
                      is_metric, label_names, read_run, run_dirs)
from .stats import MAX_RESAMPLES, RESAMPLES, SEED

# The metrics' names in tables and figures; the first two are what tables and figures show by default.
METRIC_NAMES = {"auroc": "AUROC", "auprc": "AUPRC", "auprc_trapz": "AUPRC (trapezoid)"}
DEFAULT_METRICS = ("auroc", "auprc")
SHOW = 10  # problem runs named on the terminal; summary.md names them all
# Old results columns -> the identity key they stand for, so old and new runs label alike.
LEGACY_KEYS = {"epochs": "train.epochs", "image_size": "data.image_size", "lr": "train.lr",
               "batch_size": "train.batch_size"}
# The axes a table or figure shows anyway: their differences need no settings label between cells
# (n_train of old runs follows from the fraction).
# The weights file follows from model and init (random for RI, the architecture's file for TL), so it
# differs across a table's rows as they do; within one cell it is still compared.
AXES = ("model.", "init.", "data.fraction", "data.name", "train.seed", "n_train", "weights")


@dataclass
class Gathered:
    """Every run directory below a root, sorted by what can be done with it."""

    runs: pd.DataFrame  # one row per finished run: its results row, run_dir (relative) and experiment
    settings: dict[str, dict | None] = field(default_factory=dict)  # run_dir -> identity.json settings
    unfinished: list[Run] = field(default_factory=list)
    failed: list[Run] = field(default_factory=list)
    broken: list[BrokenRun] = field(default_factory=list)


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path != root else "."


def gather(root: str | Path) -> Gathered:
    """Read every run directory below ``root``; a broken one is set aside, never fatal."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory: pass a run or sweep output directory")
    out = Gathered(pd.DataFrame())
    rows = []
    for path in run_dirs(root):
        try:
            run = read_run(path)
        except BrokenRun as err:
            out.broken.append(err)
            continue
        name = _rel(path, root)
        if run.status == "finished":
            rows.append({**run.row, "run_dir": name, "experiment": run.experiment})
            out.settings[name] = run.settings
        else:
            (out.failed if run.status == "failed" else out.unfinished).append(run)
    out.runs = pd.DataFrame(rows)
    return out


def _group_key(runs: pd.DataFrame) -> pd.Series:
    """setting_id; for runs older than it, the columns that stood for it."""
    legacy = [c for c in GROUP + SAME_WITHIN_GROUP if c in runs.columns]
    ids = runs["setting_id"] if "setting_id" in runs.columns else pd.Series(None, index=runs.index, dtype=object)
    old = runs[legacy].astype(str).agg("/".join, axis=1)
    return ids.where(ids.notna() & (ids.astype(str) != ""), "old:" + old).astype(str)


def _provenance(runs: pd.DataFrame) -> list[str]:
    """What a run used beyond its settings (PROVENANCE) that can still differ between the seeds of one
    setting: data files edited under the same config, weights found in another cache, another precision.
    Seeds that differ in any of them are not averaged together."""
    return [c for c in PROVENANCE if c in runs.columns]


def drop_duplicate_seeds(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One run per seed of a setting (the first by folder name), and a note naming each pair: the same
    seed twice would count one run's numbers double."""
    runs = runs.sort_values("run_dir", kind="stable").assign(_key=_group_key(runs))
    same = ["_key", *_provenance(runs), "seed"]
    dup = runs.duplicated(same, keep="first")
    notes = []
    for _, r in runs[dup].iterrows():
        kept = runs[(runs[same].astype(str) == r[same].astype(str)).all(axis=1)].iloc[0]
        notes.append(f"{kept.run_dir} and {r.run_dir} (counted: {kept.run_dir})")
    return runs[~dup].drop(columns="_key"), notes


def _setting_of(run_dirs: list[str], runs: pd.DataFrame, settings: dict[str, dict | None]) -> dict:
    """The settings of one group: identity.json's (without the seed), else what its results row records."""
    row = runs[runs["run_dir"] == run_dirs[0]].iloc[0]
    used = {c: row[c] for c in _provenance(runs) if pd.notna(row[c])}
    for d in run_dirs:
        if settings.get(d):
            return {**{k: v for k, v in settings[d].items() if k != "train.seed"}, **used}
    return {**{LEGACY_KEYS.get(c, c): row[c] for c in SAME_WITHIN_GROUP if c in row.index and pd.notna(row[c])},
            **used}


def _show(value) -> str:
    if value is _ABSENT:
        return "(absent)"
    if isinstance(value, np.generic):  # old runs' settings come from a pandas row
        value = value.item()
    if isinstance(value, float):
        return f"{value:g}"
    # Compact JSON: a label is "k=v, k=v", so a list value must not contain ", ".
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


_ABSENT = object()


def _differing(group_settings: list[dict], skip=()) -> list[str]:
    keys = sorted({k for s in group_settings for k in s if not k.startswith(skip)})
    return [k for k in keys if len({_show(s.get(k, _ABSENT)) for s in group_settings}) > 1]


def setting_labels(summary: pd.DataFrame, group_settings: list[dict]) -> list[str]:
    """Per summary row, ``key=value`` for the settings that tell it apart: those that differ from the other
    settings of its cell (any key), and those that differ across the dataset's rows beyond the axes the
    table shows anyway (a figure would otherwise compare bars trained differently without saying so)."""
    keys: list[set[str]] = [set() for _ in range(len(summary))]
    for by, skip in ((CELL, ()), (["dataset"], AXES)):
        for idx in summary.groupby(by, dropna=False, sort=False).indices.values():
            for k in _differing([group_settings[i] for i in idx], skip):
                for i in idx:
                    keys[i].add(k)
    labels = []
    for i, ks in enumerate(keys):
        label = ", ".join(f"{k}={_show(group_settings[i].get(k, _ABSENT))}" for k in sorted(ks))
        same_cell = summary[(summary[CELL] == summary.iloc[i][CELL]).all(axis=1)]
        if not label and len(same_cell) > 1:  # different setting_ids with no settings on record to show
            label = f"setting {summary.iloc[i]['setting_id']}"
        labels.append(label)
    return labels


def _mean(values: pd.Series) -> float:
    return values.mean(skipna=False)


def _std(values: pd.Series) -> float:
    return values.std(skipna=False)


def summarise(runs: pd.DataFrame, settings: dict[str, dict | None] | None = None) -> pd.DataFrame:
    """Mean, sample sd (ddof=1; NaN for one seed) and n over the seeds of each setting, for every metric
    column (macro and per label). ``runs`` holds one run per seed of a setting (drop_duplicate_seeds)."""
    runs = runs.assign(_key=_group_key(runs))
    metric_cols = [c for c in runs.columns if is_metric(str(c))]
    grouped = runs.groupby([*GROUP, "_key", *_provenance(runs)], sort=True, dropna=False)
    # A seed without a value (a run made before the metric was recorded, an undefined metric) makes the
    # setting's value undefined too, rather than a mean over fewer seeds than n says (report names such runs).
    out = grouped[metric_cols].agg([_mean, _std])
    out.columns = [f"{col}_{stat.strip('_')}" for col, stat in out.columns]
    out.insert(0, "n", grouped.size())
    out.insert(1, "seeds", grouped["seed"].agg(lambda s: " ".join(str(int(v)) for v in sorted(s))))
    out.insert(2, "params", grouped["params"].first())
    if "split_rule" in runs.columns:  # how train/val/test were drawn (the seeds of a setting share it)
        out.insert(3, "split_rule", grouped["split_rule"].first())
    dirs = grouped["run_dir"].agg(list) if "run_dir" in runs.columns else None
    out = out.reset_index()
    out.insert(len(GROUP), "setting_id", [k if not k.startswith("old:") else "" for k in out["_key"]])
    group_settings = [_setting_of(d, runs, settings or {}) for d in dirs] if dirs is not None \
        else [{} for _ in range(len(out))]
    out.insert(len(GROUP), "settings", setting_labels(out, group_settings))
    if dirs is not None:  # the run folders of each row (for the intervals); not written to summary.csv
        out["run_dirs"] = list(dirs)
    return out.drop(columns="_key").sort_values([*GROUP, "settings"], kind="stable", ignore_index=True)


def settings_varying(summary: pd.DataFrame) -> list[str]:
    """The setting keys that the settings column shows, i.e. that differ between rows."""
    keys = {part.split("=", 1)[0] for label in summary["settings"] for part in str(label).split(", ") if "=" in part}
    return sorted(keys)


def _fmt(mean: float, std: float, low: float = np.nan, high: float = np.nan) -> str:
    if np.isnan(mean):
        return "-"
    text = f"{mean:.3f}" if np.isnan(std) else f"{mean:.3f} ± {std:.3f}"
    return text if np.isnan(low) else f"{text} [{low:.3f}, {high:.3f}]"


def _with_settings(summary: pd.DataFrame) -> bool:
    return "settings" in summary.columns and summary["settings"].astype(str).str.len().gt(0).any()


def headline(metrics: tuple[str, ...]) -> list[str]:
    return [f"{split}_{m}" for split in ("test", "val") for m in metrics]


def markdown(summary: pd.DataFrame, metrics: tuple[str, ...] = DEFAULT_METRICS) -> str:
    show = _with_settings(summary)
    cols = headline(metrics)
    names = " | ".join(f"{c.split('_', 1)[0]} {METRIC_NAMES[c.split('_', 1)[1]]}" for c in cols)
    head = ("| dataset | model | init | strategy | fraction | " + ("settings | " if show else "")
            + f"n | params | {names} |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for _, r in summary.iterrows():
        cells = [_fmt(r.get(f"{c}_mean", np.nan), r.get(f"{c}_std", np.nan), r.get(f"{c}_ci_low", np.nan),
                      r.get(f"{c}_ci_high", np.nan)) for c in cols]
        lines.append(f"| {r.dataset} | {r.model} | {r.init} | {r.strategy} | {r.fraction:g} | "
                     + (f"{r.settings} | " if show else "") + f"{r.n} | {r.params / 1e6:.2f}M | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_per_label(summary: pd.DataFrame, metric: str) -> str:
    """Test ``metric`` per label, one column per label: the numbers behind per-pathology figures."""
    labels = label_names(summary.columns, "_mean")
    show = _with_settings(summary)
    head = "| model | init | fraction | " + ("settings | " if show else "") + " | ".join(labels) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for _, r in summary.iterrows():
        cells = [_fmt(r.get(f"test_{metric}_{lab}_mean", np.nan), r.get(f"test_{metric}_{lab}_std", np.nan))
                 for lab in labels]
        lines.append(f"| {r.model} | {r.init} | {r.fraction:g} | " + (f"{r.settings} | " if show else "")
                     + " | ".join(cells) + " |")
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


def sweep_values(key: str, value) -> list[str]:
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
    return Design(figure, [_model_tag(m) for m in sweep_values("model", params["model"])],
                  sweep_values("init", params["init"]),
                  [float(f) for f in sweep_values("data.fraction", params["data.fraction"])])


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

@dataclass
class Report:
    """What ``report`` printed, and why it is incomplete (the CLI exits 2 when ``problems`` is not empty)."""

    text: str
    problems: list[str] = field(default_factory=list)


def _toy(out: Path, note: str) -> Report:
    from .figures import toy

    table, paths = toy(out, note)
    lines = ["toy example (paper Fig. 2): 10 positives, 990 negatives, scores = ranks",
             "| classifier | AUROC | AUPRC | ranks of the 10 positives |", "|---|---|---|---|"]
    lines += [f"| {r.classifier} | {r.auroc:.4f} | {r.auprc:.3f} | {r.positive_ranks} |" for r in table.itertuples()]
    lines.append("figure: " + ", ".join(str(p) for p in paths))
    return Report("\n".join(lines))


def _broken_items(broken: list[BrokenRun], root: Path) -> list[str]:
    return [f"{_rel(b.path, root)} ({b.reason})" for b in broken]


def report(root: str | Path, figure: str | None = None, out: str | Path | None = None, note: str = "",
           metrics: tuple[str, ...] = DEFAULT_METRICS, compare: list[tuple[str, str]] | None = None,
           resamples: int = RESAMPLES, seed: int = SEED) -> Report:
    """Write summary.csv, summary.md, comparisons.csv and (for a paper experiment) the figure into ``out``
    (default ``root``); return the text to print and what was left out. ``metrics`` are the columns of the
    tables and the rows of panels of the figure (summary.csv has every metric the runs recorded).
    ``resamples`` bootstrap resamples (0: no intervals, no comparisons) drawn from ``seed``; ``compare`` adds
    comparisons of MODEL/INIT pairs to the paper's (compare.py)."""
    metrics = tuple(metrics)
    compare = [tuple(pair) for pair in (compare or [])]
    if resamples < 0 or (0 < resamples < 100) or resamples > MAX_RESAMPLES:
        raise UserError(f"--resamples {resamples}: use 0 (no intervals) or 100 to {MAX_RESAMPLES:,} (2000 is the "
                        "default)")
    if seed < 0:
        raise UserError(f"--seed {seed}: use a whole number of 0 or more")
    if compare and not resamples:
        raise UserError("--compare needs bootstrap resamples: drop --resamples 0")
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown or not metrics or len(set(metrics)) != len(metrics):
        what = ("an empty item" if "" in unknown else f"{','.join(repr(m) for m in unknown)} unknown" if unknown else
                "nothing chosen" if not metrics else "a metric named twice")
        raise UserError(f"--metric {','.join(metrics)}: {what}; choose one or more of {', '.join(METRIC_NAMES)}, "
                        "comma-separated")
    root = Path(root)
    out = Path(out) if out is not None else root
    if figure == "fig2":
        if metrics != DEFAULT_METRICS:
            raise UserError("--metric does not apply to fig2: the toy example shows AUROC and average precision, "
                            "as the paper's Fig. 2")
        return _toy(out, note)

    found = gather(root)
    runs, unfinished, failed, broken = found.runs, found.unfinished, found.failed, found.broken
    notes: list[tuple[str, list[str]]] = []  # (head, items): summary.md lists every item, the terminal SHOW
    if figure is None and not runs.empty:
        figure, why_not = _which_figure(runs)
        notes += [(why_not, [])] if why_not else []
    plan = design(figure) if figure else None
    if plan is not None:
        if not runs.empty:
            keep = np.array([plan.contains(m, i, f) for m, i, f in zip(runs["model"], runs["init"], runs["fraction"])])
            if not keep.all():
                notes.append((f"{int((~keep).sum())} finished runs below {root} are outside {figure}'s design "
                              f"(models x inits x fractions of conf/experiment/{figure}.yaml) and left out", []))
            runs = runs[keep]
        # A run of another figure's design is not this report's business; one whose setting cannot be
        # told (its config is the damaged file) might be this figure's, so it is named.
        unfinished = [u for u in unfinished if plan.contains(*u.where[1:])]
        failed = [u for u in failed if u.where[1] is None or plan.contains(*u.where[1:])]
        broken = [b for b in broken if b.where[1] is None or plan.contains(*b.where[1:])]
    if runs.empty:
        counts = [f"{len(x)} {what}" for x, what in ((unfinished, "unfinished"), (failed, "failed"),
                                                    (broken, "broken")) if x]
        where = f"of {figure}'s design " if plan is not None else ""
        axes = (f": models {', '.join(plan.models)}; inits {', '.join(plan.inits)}; fractions "
                f"{', '.join(f'{f:g}' for f in plan.fractions)}") if plan is not None else ""
        why = f"; broken: {'; '.join(_broken_items(broken, root)[:SHOW])}" if broken else ""
        raise UserError(f"no finished run {where}(results.csv) below {root}{axes}"
                        + (f"; {', '.join(counts)}" if counts else "") + why)
    if plan is not None:
        datasets = sorted(runs["dataset"].astype(str).unique())
        if len(datasets) > 1:
            raise UserError(f"{figure} draws one dataset but {root} holds runs of {', '.join(datasets)}: "
                            f"point rtl report at {root}/<dataset>")

    runs, duplicates = drop_duplicate_seeds(runs)
    lacking = lacking_metric(runs, metrics)
    summary = summarise(runs, found.settings)
    ev = None
    if resamples:
        from .compare import check_asked, evidence

        check_asked(summary, compare)
        ev = evidence(summary, runs, root, compare, resamples, seed)
        summary = ev.summary
    out.mkdir(parents=True, exist_ok=True)
    write_csv(summary.drop(columns="run_dirs"), out / "summary.csv")

    tables = [markdown(summary, metrics)]
    if len(label_names(summary.columns, "_mean")) > 1:
        for metric in metrics:
            tables.append(f"\ntest {METRIC_NAMES[metric]} per label (mean ± sd over seeds)\n\n"
                          + markdown_per_label(summary, metric))

    problems = []
    if ev is None:
        (out / "comparisons.csv").unlink(missing_ok=True)  # --resamples 0: an earlier report's would mislead
    external, external_rows, ext_notes = external_results(root, runs, summary)
    ext_ev = None
    if not external.empty:
        if resamples:
            from .compare import evidence

            ext_ev = evidence(external, external_rows, root, compare, resamples, seed, split="external")
            external = ext_ev.summary
        write_csv(external.drop(columns="run_dirs"), out / "external.csv")
        tables.append("\nexternal validation (rtl evaluate: each run's best checkpoint scored on another dataset; "
                      "also in external.csv)\n\n" + markdown_external(external))
    else:
        (out / "external.csv").unlink(missing_ok=True)  # from an earlier report: no longer true
    notes += [(f"WARNING: {n}", []) for n in ext_notes]
    problems += [f"external results {n}" for n in ext_notes]
    if ev is not None:
        from .compare import COLUMNS, markdown as comparisons_markdown, method_note

        both = [e.comparisons for e in (ev, ext_ev) if e is not None and not e.comparisons.empty]
        comparisons = pd.concat(both, ignore_index=True) if both else pd.DataFrame(columns=COLUMNS)
        write_csv(comparisons, out / "comparisons.csv")
        if not comparisons.empty:
            tables.append("\ncomparisons (paired, over the test images; also in comparisons.csv)\n\n"
                          + comparisons_markdown(comparisons))
        tables.append("\n" + method_note(resamples, seed, ev.unit))
        for e in (ev, ext_ev):
            if e is not None:
                notes += [(n, []) for n in e.notes]
                problems += e.problems
    names = [_rel(u.path, root) for u in unfinished]
    done = f"{len(runs)} finished runs in {len(summary)} settings"
    notes.insert(0, (done + (f"; {len(names)} unfinished (no results.csv): " if names else ""), names))
    if broken:
        head = f"WARNING: {len(broken)} run director{'y' if len(broken) == 1 else 'ies'} left out, their files broken: "
        notes.insert(0, (head, _broken_items(broken, root)))
        shown = ", ".join(_rel(b.path, root) for b in broken[:SHOW]) + (", ..." if len(broken) > SHOW else "")
        problems.append(f"{len(broken)} run director{'y' if len(broken) == 1 else 'ies'} below {root} left out of "
                        f"the report as broken (named above and in summary.md): {shown}")
    if lacking:
        head = f"WARNING: {len(lacking)} finished run(s) have no test {'/'.join(metrics)} (shown as -): "
        notes.append((head, lacking))
        problems.append(f"{len(lacking)} finished run(s) below {root} have no test {' or '.join(metrics)}, so their "
                        f"settings show no value (named in summary.md): {', '.join(lacking[:3])}"
                        + (", ..." if len(lacking) > 3 else "") + "; runs made before rtl recorded auprc_trapz lack it: "
                        "run them again with runtime.force=true, or choose another --metric")
    if failed:
        notes.append((f"{len(failed)} failed (error.txt): ", [f"{_rel(u.path, root)}: {u.error}" for u in failed]))
    if duplicates:
        notes.append((f"WARNING: {len(duplicates)} seed(s) found twice in one setting, each counted once: ",
                      duplicates))
    varying = settings_varying(summary)
    if varying:
        notes.append((f"rows differ in settings beyond model, init and fraction: {', '.join(varying)} "
                      "(the settings column says which row has which)", []))
    if plan is not None:
        have = {(m, i, round(f, 6)) for m, i, f in zip(summary["model"], summary["init"], summary["fraction"])}
        absent = [f"{m}/{i}/f{f:g}" for m, i, f in plan.cells() if (m, i, round(f, 6)) not in have]
        notes.append((f"{figure} design: {len(plan.cells())} settings, {len(plan.cells()) - len(absent)} "
                      f"with finished runs" + ("; none yet for " if absent else ""), absent))
        if lacking:  # bars over fewer seeds than the subtitle states would misreport: named above instead
            notes.append((f"WARNING: {figure} not drawn: settings without a value for every seed", []))
        fig_note = "; ".join(x for x in (note.rstrip(". "), f"bars differ in {', '.join(varying)}" if varying else "") if x)
        try:
            if lacking:
                raise SkipFigure
            paths = draw_figure(figure, summary, out, plan.models, fig_note, metrics,
                                None if ev is None else ev.comparisons)
            notes.append(("figure: " + ", ".join(str(p) for p in paths), []))
        except SkipFigure:
            pass
        except UserError as err:
            notes.append((f"WARNING: {figure} not drawn: {err}", []))
            problems.append(f"{figure} not drawn (the tables are written): {err}")

    def short(items: list[str]) -> str:
        more = len(items) - SHOW
        return ", ".join(items[:SHOW]) + (f" and {more} more (all in summary.md)" if more > 0 else "")

    write_bytes(out / "summary.md", ("\n".join(tables) + "\n\n"
                                     + "\n\n".join(h + ", ".join(items) for h, items in notes) + "\n").encode())
    return Report("\n".join(tables) + "\n\n" + "\n".join(h + short(items) for h, items in notes), problems)


EXTERNAL_KEY = ["trained_on", "dataset", "model", "init", "strategy", "fraction", "setting_id"]


def external_results(root: Path, runs: pd.DataFrame,
                     summary: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """rtl evaluate's results of the reported runs (<run>/external/<name>/results.csv): one row per source setting
    and external dataset (mean and sd over seeds, like the summary), the results rows themselves (what
    compare.evidence pairs seeds by), and why any were left out (a file that cannot be read, or results of a
    checkpoint the run has replaced since)."""
    rows, notes = [], []
    labels = {str(k): v for k, v in zip(summary.get("setting_id", []), summary.get("settings", []))}
    finished = runs["finished"] if "finished" in runs.columns else pd.Series(None, index=runs.index)
    for run_dir, run_finished in zip(runs["run_dir"], finished):
        for file in sorted((root / run_dir / "external").glob(f"*/{RESULTS_FILE}")):
            if not (file.parent / EXTERNAL_MARK).exists():
                continue
            try:
                row = pd.read_csv(file, dtype={c: str for c in ("dataset", "model", "init", "strategy", "setting_id",
                                                                "trained_on")}).iloc[0].to_dict()
                missing = [c for c in (*EXTERNAL_KEY, "seed", "test_auroc", "test_auprc") if c not in row]
                if missing:
                    raise ValueError(f"no column {', '.join(missing)}")
                if str(row.get("source_finished")) != str(run_finished):
                    raise ValueError(f"it scored the checkpoint of a run that finished {row.get('source_finished')}, "
                                     f"but {run_dir} was trained again since (finished {run_finished}): run rtl "
                                     "evaluate again")
            except (pd.errors.ParserError, pd.errors.EmptyDataError, IndexError) as err:
                notes.append(f"{_rel(file.parent, root)} left out: its results.csv cannot be read ({err})")
                continue
            except (OSError, ValueError) as err:
                notes.append(f"{_rel(file.parent, root)} left out: {err}")
                continue
            rows.append({**row, "run_dir": _rel(file.parent, root)})
    if not rows:
        return pd.DataFrame(), pd.DataFrame(), notes
    ext = pd.DataFrame(rows)
    ext["setting_id"] = ext["setting_id"].fillna("")
    metric_cols = [c for c in ext.columns if is_metric(str(c)) and str(c).startswith("test_")]
    grouped = ext.groupby(EXTERNAL_KEY, sort=True, dropna=False)
    out = grouped[metric_cols].agg([_mean, _std])
    out.columns = [f"{col}_{stat.strip('_')}" for col, stat in out.columns]
    out.insert(0, "n", grouped.size())
    out.insert(1, "seeds", grouped["seed"].agg(lambda s: " ".join(str(int(v)) for v in sorted(s))))
    out.insert(2, "n_test", grouped["n_test"].first() if "n_test" in ext.columns else np.nan)
    out["run_dirs"] = grouped["run_dir"].agg(list)
    out = out.reset_index()
    out.insert(len(EXTERNAL_KEY), "settings", [labels.get(str(k), "") for k in out["setting_id"]])
    return out, ext, notes


def markdown_external(external: pd.DataFrame) -> str:
    head = "| trained on | scored on | model | init | fraction | n | images | test AUROC | test AUPRC |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for _, r in external.iterrows():
        cells = [_fmt(r.get(f"test_{m}_mean", np.nan), r.get(f"test_{m}_std", np.nan), r.get(f"test_{m}_ci_low", np.nan),
                      r.get(f"test_{m}_ci_high", np.nan)) for m in ("auroc", "auprc")]
        n_test = "-" if pd.isna(r.get("n_test", np.nan)) else f"{int(r['n_test'])}"
        lines.append(f"| {r.trained_on} | {r.dataset} | {r.model} | {r.init} | {r.fraction:g} | {r.n} | {n_test} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


class SkipFigure(Exception):
    """The figure is not drawn for a reason already noted."""


def lacking_metric(runs: pd.DataFrame, metrics: tuple[str, ...]) -> list[str]:
    """``run_dir (no test_<m>)`` for every run without a macro test value of a chosen metric: made before
    the metric was recorded (auprc_trapz), or undefined (a test split with one class for every label)."""
    out = []
    for _, r in runs.iterrows():
        missing = [m for m in metrics if pd.isna(r.get(f"test_{m}", np.nan))]
        if missing:
            out.append(f"{r.run_dir} (no test_{', test_'.join(missing)})")
    return out


def draw_figure(figure: str, summary: pd.DataFrame, out: Path, models: list[str], note: str,
                metrics: tuple[str, ...] = DEFAULT_METRICS, comparisons: pd.DataFrame | None = None) -> list[Path]:
    from .figures import draw  # matplotlib is imported only when a figure is drawn

    return draw(figure, summary, out, models, note, metrics, comparisons)
