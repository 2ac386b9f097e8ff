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

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import runfiles as rf
from ..atomic_io import write_bytes, write_csv
from ..errors import UserError
from ..metrics import DEFAULT_METRICS, METRIC_NAMES
from .designs import Design, design
from .results import (CELL, ERROR_FILE, EXTERNAL_MARK, GROUP, PROVENANCE, RESULTS_FILE, SAME_WITHIN_GROUP,
                      BrokenRun, Run, is_metric, label_names, read_run, run_dirs)
from .stats import MAX_RESAMPLES, RESAMPLES, SEED

SUMMARY_FILE, SUMMARY_MD = rf.SUMMARY, rf.SUMMARY_MD
COMPARISONS_FILE, EXTERNAL_TABLE = rf.COMPARISONS, rf.EXTERNAL_TABLE
OPERATING_FILE = "operating_points.csv"
SUBGROUPS_FILE = "subgroups.csv"
CALIBRATION_FIGURE = "calibration"  # --figure calibration: reliability diagrams instead of a paper figure
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
    return [k for k in keys if len({_show(_get(s, k)) for s in group_settings}) > 1]


def _get(settings: dict, key: str):
    """A setting's value; a key added later (identity.LATER_DEFAULTS) is left out at its default: that value."""
    from ..identity import LATER_DEFAULTS

    return settings.get(key, LATER_DEFAULTS.get(key, _ABSENT))


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
        label = ", ".join(f"{k}={_show(_get(group_settings[i], k))}" for k in sorted(ks))
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
    """What ``report`` printed; what could not be trusted (``problems``: the CLI exits 2) and which runs of the
    tree are not in the tables yet (``incomplete``, unfinished or failed runs: exit 3)."""

    text: str
    problems: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)


@dataclass
class ReportOptions:
    """What ``rtl report`` was asked for (its flags; cli.py parses them)."""

    figure: str | None = None  # figN; None: the experiment the runs were made for, if any
    out: str | Path | None = None  # where the tables and figure go; None: the report's root
    note: str = ""  # a line under the figure's title
    metrics: tuple[str, ...] = DEFAULT_METRICS  # the tables' columns and the figure's rows of panels
    compare: list[tuple[str, str]] = field(default_factory=list)  # --compare A B pairs (compare.py)
    resamples: int = RESAMPLES  # bootstrap resamples; 0: no intervals, no comparisons
    seed: int = SEED
    operating_point: str | None = None  # youden | sens=X | spec=X (clinical.py): operating_points.csv
    by: str | None = None  # a group column (clinical.By): subgroups.csv

    def check(self) -> None:
        from .clinical import By, Rule

        self.metrics, self.compare = tuple(self.metrics), [tuple(pair) for pair in self.compare]
        self.rule = Rule.parse(self.operating_point) if self.operating_point is not None else None
        self.by_column = By.parse(self.by) if self.by is not None else None
        if self.resamples < 0 or (0 < self.resamples < 100) or self.resamples > MAX_RESAMPLES:
            raise UserError(f"--resamples {self.resamples}: use 0 (no intervals) or 100 to {MAX_RESAMPLES:,} "
                            f"({RESAMPLES} is the default)")
        if self.seed < 0:
            raise UserError(f"--seed {self.seed}: use a whole number of 0 or more")
        if self.compare and not self.resamples:
            raise UserError("--compare needs bootstrap resamples: drop --resamples 0")
        metrics = self.metrics
        unknown = [m for m in metrics if m not in METRIC_NAMES]
        if unknown or not metrics or len(set(metrics)) != len(metrics):
            what = ("an empty item" if "" in unknown else f"{','.join(repr(m) for m in unknown)} unknown" if unknown
                    else "nothing chosen" if not metrics else "a metric named twice")
            raise UserError(f"--metric {','.join(metrics)}: {what}; choose one or more of "
                            f"{', '.join(METRIC_NAMES)}, comma-separated")
        if self.figure == "fig2" and metrics != DEFAULT_METRICS:
            raise UserError("--metric does not apply to fig2: the toy example shows AUROC and average precision, "
                            "as the paper's Fig. 2")


@dataclass
class Notes:
    """What the report says below its tables, as (head, items): summary.md lists every item, the terminal the
    first SHOW; and the problems that make ``rtl report`` exit 2."""

    lines: list[tuple[str, list[str]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, head: str, items: list[str] | None = None) -> None:
        self.lines.append((head, list(items or [])))

    def markdown(self) -> str:
        return "\n\n".join(h + ", ".join(items) for h, items in self.lines)

    def terminal(self) -> str:
        def short(items: list[str]) -> str:
            more = len(items) - SHOW
            return ", ".join(items[:SHOW]) + (f" and {more} more (all in summary.md)" if more > 0 else "")

        return "\n".join(h + short(items) for h, items in self.lines)


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


def report(root: str | Path, options: ReportOptions | None = None, **asked) -> Report:
    """Write summary.csv, summary.md, comparisons.csv, external.csv and (for a paper experiment) the figure into
    ``options.out`` (default ``root``); return the text to print and what was left out. ``asked``: the fields
    of ReportOptions, for callers without one."""
    o = options if options is not None else ReportOptions(**asked)
    o.check()
    root = Path(root)
    out = Path(o.out) if o.out is not None else root
    if o.figure == "fig2":
        return _toy(out, o.note)
    notes = Notes()
    chosen = select(root, None if o.figure == CALIBRATION_FIGURE else o.figure, notes)
    if o.figure == CALIBRATION_FIGURE:
        chosen.plan = None  # the reliability diagram instead of a paper figure
    runs, duplicates = drop_duplicate_seeds(chosen.runs)
    lacking = lacking_metric(runs, o.metrics)
    summary = summarise(runs, chosen.settings)
    ev = _evidence(summary, runs, root, o)
    summary = summary if ev is None else ev.summary
    from . import clinical

    cal_notes: list[str] = []
    summary = clinical.with_calibration(summary, runs, root, o.resamples, o.seed, cal_notes)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(summary.drop(columns="run_dirs"), out / SUMMARY_FILE)
    tables = _tables(summary, o.metrics)
    ext_ev, external, external_rows = _external(root, runs, summary, o, out, tables, notes)
    _comparisons(ev, ext_ev, o, out, tables, notes)
    _clinical(summary, runs, root, o, out, tables, notes, cal_notes, (external, external_rows))
    _run_notes(notes, chosen, runs, summary, duplicates, lacking, root, o.metrics)
    if chosen.plan is not None:
        _figure(chosen, summary, lacking, ev, out, o, notes)
    write_bytes(out / SUMMARY_MD, ("\n".join(tables) + "\n\n" + notes.markdown() + "\n").encode())
    incomplete = [f"{len(x)} {what} run(s) ({', '.join(_rel(u.path, root) for u in x[:3])}"
                  + (", ..." if len(x) > 3 else "") + ")"
                  for x, what in ((chosen.unfinished, "unfinished"), (chosen.failed, "failed")) if x]
    return Report("\n".join(tables) + "\n\n" + notes.terminal(), notes.problems, incomplete)


@dataclass
class Selection:
    """The runs a report is about: those of the figure's design (all, without a figure), sorted by state."""

    runs: pd.DataFrame
    settings: dict[str, dict | None]
    unfinished: list[Run]
    failed: list[Run]
    broken: list[BrokenRun]
    figure: str | None
    plan: Design | None


def select(root: Path, figure: str | None, notes: Notes) -> Selection:
    """Gather the runs below ``root`` and keep those of the figure's design (the figure asked for, else the one
    the runs were made for); UserError when none is finished."""
    found = gather(root)
    runs, unfinished, failed, broken = found.runs, found.unfinished, found.failed, found.broken
    if figure is None and not runs.empty:
        figure, why_not = _which_figure(runs)
        if why_not:
            notes.add(why_not)
    plan = design(figure) if figure else None
    if plan is not None:
        if not runs.empty:
            keep = np.array([plan.contains(m, i, f) for m, i, f in zip(runs["model"], runs["init"], runs["fraction"])])
            if not keep.all():
                notes.add(f"{int((~keep).sum())} finished runs below {root} are outside {figure}'s design "
                          f"(models x inits x fractions of conf/experiment/{figure}.yaml) and left out")
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
        raise UserError(f"no finished run {where}({RESULTS_FILE}) below {root}{axes}"
                        + (f"; {', '.join(counts)}" if counts else "") + why)
    if plan is not None:
        datasets = sorted(runs["dataset"].astype(str).unique())
        if len(datasets) > 1:
            raise UserError(f"{figure} draws one dataset but {root} holds runs of {', '.join(datasets)}: "
                            f"point rtl report at {root}/<dataset>")
    return Selection(runs, found.settings, unfinished, failed, broken, figure, plan)


def _evidence(summary: pd.DataFrame, runs: pd.DataFrame, root: Path, o: ReportOptions):
    """Intervals of every row and the comparisons (compare.py), or None without resamples."""
    if not o.resamples:
        return None
    from .compare import check_asked, evidence

    check_asked(summary, o.compare)
    return evidence(summary, runs, root, o.compare, o.resamples, o.seed)


def _tables(summary: pd.DataFrame, metrics: tuple[str, ...]) -> list[str]:
    tables = [markdown(summary, metrics)]
    if len(label_names(summary.columns, "_mean")) > 1:
        for metric in metrics:
            tables.append(f"\ntest {METRIC_NAMES[metric]} per label (mean ± sd over seeds)\n\n"
                          + markdown_per_label(summary, metric))
    return tables


def _external(root: Path, runs: pd.DataFrame, summary: pd.DataFrame, o: ReportOptions, out: Path,
              tables: list[str], notes: Notes):
    """The external-validation table (rtl evaluate's results of these runs) and its evidence, or None."""
    external, external_rows, ext_notes = external_results(root, runs, summary)
    ext_ev = None
    if not external.empty:
        if o.resamples:
            from .compare import evidence

            ext_ev = evidence(external, external_rows, root, o.compare, o.resamples, o.seed, split="external")
            external = ext_ev.summary
        from .clinical import with_calibration

        cal_notes: list[str] = []
        external = with_calibration(external, external_rows, root, o.resamples, o.seed, cal_notes, "external")
        for n in dict.fromkeys(cal_notes):
            notes.add(n)
        write_csv(external.drop(columns="run_dirs"), out / EXTERNAL_TABLE)
        tables.append("\nexternal validation (rtl evaluate: each run's best checkpoint scored on another dataset; "
                      f"also in {EXTERNAL_TABLE})\n\n" + markdown_external(external))
    else:
        (out / EXTERNAL_TABLE).unlink(missing_ok=True)  # from an earlier report: no longer true
    for n in ext_notes:
        notes.add(f"WARNING: {n}")
        notes.problems.append(f"external results {n}")
    return ext_ev, external, external_rows


def _comparisons(ev, ext_ev, o: ReportOptions, out: Path, tables: list[str], notes: Notes) -> None:
    """comparisons.csv and its table (none without resamples: an earlier report's file would mislead)."""
    if ev is None:
        (out / COMPARISONS_FILE).unlink(missing_ok=True)
        return
    from .compare import COLUMNS, markdown as comparisons_markdown, method_note

    both = [e.comparisons for e in (ev, ext_ev) if e is not None and not e.comparisons.empty]
    comparisons = pd.concat(both, ignore_index=True) if both else pd.DataFrame(columns=COLUMNS)
    write_csv(comparisons, out / COMPARISONS_FILE)
    if not comparisons.empty:
        tables.append(f"\ncomparisons (paired, over the test images; also in {COMPARISONS_FILE})\n\n"
                      + comparisons_markdown(comparisons))
    tables.append("\n" + method_note(o.resamples, o.seed, ev.unit))
    for e in (ev, ext_ev):
        if e is not None:
            for n in e.notes:
                notes.add(n)
            notes.problems += e.problems


def _clinical(summary: pd.DataFrame, runs: pd.DataFrame, root: Path, o: ReportOptions, out: Path,
              tables: list[str], notes: Notes, cal_notes: list[str], external: tuple) -> None:
    """The calibration table (and figure), subgroups.csv and operating_points.csv with their tables when asked
    for; operating points on rtl evaluate's external images too, at each source run's own thresholds."""
    from . import clinical

    if "test_brier_mean" in summary.columns:
        tables.append("\ntest calibration (macro over labels, mean over seeds; per label in summary.csv)\n\n"
                      + markdown_calibration(summary) + "\n\n" + clinical.calibration_note())
    for n in dict.fromkeys(cal_notes):
        notes.add(n)
    if o.figure != CALIBRATION_FIGURE:  # an earlier report's diagram would no longer be of these runs
        for name in ("calibration.png", "calibration.pdf", "calibration.csv"):
            (out / name).unlink(missing_ok=True)
    else:
        from .figures import reliability_figure

        paths = reliability_figure(summary, runs, root, out, o.note)
        notes.add("figure: " + ", ".join(str(p) for p in paths) if paths else
                  "no reliability diagram: no setting has test predictions")
        if not paths:
            notes.problems.append(f"--figure calibration: no setting below {root} has readable test predictions")
    if o.by_column is None:
        (out / SUBGROUPS_FILE).unlink(missing_ok=True)
    else:
        table, sg_notes = clinical.subgroups(summary, runs, root, o.by_column, o.resamples, o.seed, o.rule,
                                             notes.problems)
        write_csv(table, out / SUBGROUPS_FILE)
        tables.append(f"\nsubgroups by {o.by_column} (test split; also in {SUBGROUPS_FILE})\n\n"
                      + clinical.markdown_subgroups(table) + "\n\n" + clinical.subgroup_note(o.by_column))
        for n in sg_notes:
            notes.add(n)
    if o.rule is None:
        (out / OPERATING_FILE).unlink(missing_ok=True)  # from an earlier report: not asked for now
        return
    points, op_notes = clinical.operating_points(summary, runs, root, o.rule, o.resamples, o.seed,
                                                 problems=notes.problems)
    ext_summary, ext_rows = external
    if not ext_summary.empty:
        ext_points, ext_notes = clinical.operating_points(ext_summary, ext_rows, root, o.rule, o.resamples, o.seed,
                                                          split="external", problems=notes.problems)
        points = pd.concat([points, ext_points], ignore_index=True) if not points.empty else ext_points
        op_notes += ext_notes
    write_csv(points, out / OPERATING_FILE)
    tables.append(f"\noperating points (also in {OPERATING_FILE})\n\n" + clinical.markdown_operating(points)
                  + "\n\n" + clinical.operating_note(o.rule))
    for n in op_notes:
        notes.add(n)


def markdown_calibration(summary: pd.DataFrame) -> str:
    show = _with_settings(summary)
    head = "| dataset | model | init | fraction | " + ("settings | " if show else "") + "n | Brier | ECE |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for _, r in summary.iterrows():
        cells = [_fmt(r.get(f"test_{m}_mean", np.nan), np.nan, r.get(f"test_{m}_ci_low", np.nan),
                      r.get(f"test_{m}_ci_high", np.nan)) for m in ("brier", "ece")]
        lines.append(f"| {r.dataset} | {r.model} | {r.init} | {r.fraction:g} | " + (f"{r.settings} | " if show else "")
                     + f"{r.n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _run_notes(notes: Notes, chosen: Selection, runs: pd.DataFrame, summary: pd.DataFrame, duplicates: list[str],
               lacking: list[str], root: Path, metrics: tuple[str, ...]) -> None:
    """What the tables hold and what they leave out: finished, broken, lacking a metric, failed, counted twice."""
    names = [_rel(u.path, root) for u in chosen.unfinished]
    done = f"{len(runs)} finished runs in {len(summary)} settings"
    notes.lines.insert(0, (done + (f"; {len(names)} unfinished (no {RESULTS_FILE}): " if names else ""), names))
    broken = chosen.broken
    if broken:
        what = f"{len(broken)} run director{'y' if len(broken) == 1 else 'ies'}"
        notes.lines.insert(0, (f"WARNING: {what} left out, their files broken: ", _broken_items(broken, root)))
        shown = ", ".join(_rel(b.path, root) for b in broken[:SHOW]) + (", ..." if len(broken) > SHOW else "")
        notes.problems.append(f"{what} below {root} left out of the report as broken (named above and in summary.md): "
                              f"{shown}")
    if lacking:
        notes.add(f"WARNING: {len(lacking)} finished run(s) have no test {'/'.join(metrics)} (shown as -): ", lacking)
        notes.problems.append(
            f"{len(lacking)} finished run(s) below {root} have no test {' or '.join(metrics)}, so their settings show "
            f"no value (named in summary.md): {', '.join(lacking[:3])}" + (", ..." if len(lacking) > 3 else "")
            + "; runs made before rtl recorded auprc_trapz lack it: run them again with runtime.force=true, or choose "
            "another --metric")
    if chosen.failed:
        notes.add(f"{len(chosen.failed)} failed ({ERROR_FILE}): ",
                  [f"{_rel(u.path, root)}: {u.error}" for u in chosen.failed])
    if duplicates:
        notes.add(f"WARNING: {len(duplicates)} seed(s) found twice in one setting, each counted once: ", duplicates)
    varying = settings_varying(summary)
    if varying:
        notes.add(f"rows differ in settings beyond model, init and fraction: {', '.join(varying)} "
                  "(the settings column says which row has which)")


def _figure(chosen: Selection, summary: pd.DataFrame, lacking: list[str], ev, out: Path, o: ReportOptions,
            notes: Notes) -> None:
    """The design's coverage, then the figure, unless some setting lacks a value for a seed (its bars would
    average fewer seeds than the subtitle states: named above instead) or the figure refuses the summary."""
    plan, figure = chosen.plan, chosen.figure
    have = {(m, i, round(f, 6)) for m, i, f in zip(summary["model"], summary["init"], summary["fraction"])}
    absent = [f"{m}/{i}/f{f:g}" for m, i, f in plan.cells() if (m, i, round(f, 6)) not in have]
    notes.add(f"{figure} design: {len(plan.cells())} settings, {len(plan.cells()) - len(absent)} with finished runs"
              + ("; none yet for " if absent else ""), absent)
    if lacking:
        notes.add(f"WARNING: {figure} not drawn: settings without a value for every seed")
        return
    varying = settings_varying(summary)
    fig_note = "; ".join(x for x in (o.note.rstrip(". "), f"bars differ in {', '.join(varying)}" if varying else "")
                         if x)
    try:
        paths = draw_figure(figure, summary, out, plan.models, fig_note, o.metrics,
                            None if ev is None else ev.comparisons)
    except UserError as err:
        notes.add(f"WARNING: {figure} not drawn: {err}")
        notes.problems.append(f"{figure} not drawn (the tables are written): {err}")
        return
    notes.add("figure: " + ", ".join(str(p) for p in paths))


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
                row = pd.read_csv(file, float_precision="round_trip",
                                  dtype={c: str for c in ("dataset", "model", "init", "strategy", "setting_id",
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
        cells = [_fmt(r.get(f"test_{m}_mean", np.nan), r.get(f"test_{m}_std", np.nan),
                      r.get(f"test_{m}_ci_low", np.nan),
                      r.get(f"test_{m}_ci_high", np.nan)) for m in ("auroc", "auprc")]
        n_test = "-" if pd.isna(r.get("n_test", np.nan)) else f"{int(r['n_test'])}"
        lines.append(f"| {r.trained_on} | {r.dataset} | {r.model} | {r.init} | {r.fraction:g} | {r.n} | {n_test} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


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
