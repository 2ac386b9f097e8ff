"""The paper's figures, drawn from the summary table of ``rtl report``: one function per figure.

    rtl report figures/full/runs/covid --figure fig3 --out figures/full/fig3

Each ``figN(summary, models, note)`` takes the summary (one row per dataset x model x init x
fraction, columns ``<split>_<metric>[_<label>]_mean`` / ``_std`` and ``n``) and returns a
matplotlib Figure; ``draw`` refuses a summary with several settings in one such cell rather than
average or pick among them (``one_setting_per_cell``); ``save`` writes it as PNG and PDF. Error bars
are one sample standard deviation over the seeds of a setting; a setting with one seed has none, and
the subtitle says so.
fig2 needs no runs: ``toy`` draws the two classifiers of ``metrics.toy_classifiers``.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # figures are files: never ask for a display, also on a headless cluster node

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve  # noqa: E402

from ..atomic_io import write_bytes, write_csv  # noqa: E402
from ..errors import UserError  # noqa: E402
from ..metrics import DEFAULT_METRICS, METRIC_NAMES, TOY_POSITIVE_RANKS, toy_classifiers  # noqa: E402
from .results import CELL, label_names, metric_column  # noqa: E402

# pretrained: ImageNet TL; xrv: TL from torchxrayvision's chest X-ray DenseNet121 (init=xrv)
INIT_LABEL = {"random": "RI", "pretrained": "TL", "xrv": "TL-CXR"}
INIT_COLOR = {"random": "#a9a9a9", "pretrained": "#1f77b4", "xrv": "#d95f02"}
MODEL_LABELS = {
    "cbr_large_t": "CBR-LargeT", "cbr_large_w": "CBR-LargeW", "cbr_small": "CBR-Small", "cbr_tiny": "CBR-Tiny",
    "dens_f": "DenseNet121", "res_f": "ResNet50",
    **{f"dens_t{k}": f"Dens-T{k}" for k in range(1, 4)},
    **{f"dens_s{k}": f"Dens-S{k}" for k in range(1, 4)},
    **{f"res_t{k}": f"Res-T{k}" for k in range(1, 6)},
    **{f"res_s{k}": f"Res-S{k}" for k in range(1, 4)},
    "timm-tf_efficientnet_lite0": "EfficientNet-Lite0",
    **{f"trunc-tf_efficientnet_lite0-cut{k}": f"Lite0 to stage {k}" for k in range(7)},
}
REFERENCE = "dens_f"  # fig5 compares every model with DenseNet121 TL, as the paper does
FIG5_COLORS = {"cbr_small": "#7f7f7f", "dens_t1": "#9ecae1", "dens_t2": "#4292c6", "dens_t3": "#08519c"}


def _named(metrics) -> list[tuple[str, str]]:
    return [(m, METRIC_NAMES[m]) for m in metrics]


def pretty(tag: str) -> str:
    return MODEL_LABELS.get(tag, tag)


def col(metric: str, label: str | None = None, split: str = "test") -> str:
    """Summary column prefix of a metric, macro (label None) or of one label."""
    return metric_column(split, metric, label)


def ordered(present, order: list[str] | None) -> list[str]:
    """``present`` in the order the experiment lists them; anything else after, alphabetically."""
    present = list(dict.fromkeys(present))
    order = [m for m in (order or []) if m in present]
    return order + sorted(m for m in present if m not in order)


def fraction_title(fraction: float) -> str:
    return f"{fraction:.0%} of the training data"


def subtitle(summary: pd.DataFrame, note: str = "", width: int = 110, spread_note: str = "") -> str:
    """What the reader must know to read the figure: data, split, what the error bars are, the note."""
    datasets = ", ".join(sorted(summary["dataset"].astype(str).unique()))
    lo, hi = int(summary["n"].min()), int(summary["n"].max())
    if hi == 1:
        spread = "1 seed per setting, so no error bars"
    else:
        seeds = f"{lo}" if lo == hi else f"{lo}-{hi}"
        spread = f"mean ± 1 sd over {seeds} seeds" + ("" if lo > 1 else " (settings with 1 seed: no error bar)")
        spread += f"; {spread_note}" if spread_note else ""
    split = ""
    if "split_rule" in summary.columns:
        rules = sorted(set(summary["split_rule"].dropna().astype(str)) - {""})
        split = f"; split: {' | '.join(rules)}" if rules else ""
    return "\n".join(textwrap.wrap(f"data: {datasets}{split}; test split; {spread}", width)
                     + textwrap.wrap(note, width))


def finish(fig: Figure, title: str, summary: pd.DataFrame, note: str = "", spread_note: str = "") -> Figure:
    # About 12 characters of an 11 pt title per inch of figure: wrap so no line runs off the page.
    width = max(60, int(fig.get_figwidth() * 12))
    title = "\n".join(textwrap.wrap(title, width))
    fig.suptitle(f"{title}\n{subtitle(summary, note, width, spread_note)}", fontsize=11)
    return fig


def save(fig: Figure, out_dir: str | Path, name: str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]

    def render(**kwargs):
        def draw() -> bytes:
            buf = io.BytesIO()
            fig.savefig(buf, format=kwargs.pop("format"), **kwargs)
            return buf.getvalue()

        return draw

    try:  # rendered in memory, then written atomically: a full disk never leaves half a figure
        write_bytes(paths[0], render(format="png", dpi=150))
        write_bytes(paths[1], render(format="pdf"))
    finally:
        plt.close(fig)
    return paths


def legend_below(fig: Figure, ax, title: str | None = None) -> None:
    """One legend for the whole figure, under the panels: inside a panel it would hide bars."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, title=title, loc="outside lower center", ncols=min(len(labels), 6), frameon=False)


def _zoom(axes, lows: list[float], highs: list[float]) -> None:
    """One y range for a row of bar panels: from a round value below the lowest bar (or error bar) to
    just above the highest, within [0, 1]. AUROC bars from 0 would hide the differences that matter."""
    lows, highs = np.asarray(lows, dtype=float), np.asarray(highs, dtype=float)
    if not np.isfinite(lows).any():
        return  # nothing drawn yet (no finished run in these panels): keep matplotlib's range
    lo, hi = np.nanmin(lows), np.nanmax(highs)
    bottom = max(0.0, np.floor((lo - 0.03) * 20) / 20)
    top = min(1.0, np.ceil((hi + 0.02) * 20) / 20)
    for ax in np.atleast_1d(axes):
        ax.set_ylim(bottom, max(top, bottom + 0.05))


def bar_panel(ax, mean: pd.DataFrame, std: pd.DataFrame, colors: list[str], ylabel: str,
              title: str) -> tuple[float, float]:
    """Grouped bars: one group per row of ``mean``, one bar per column, error bars from ``std``.
    Returns the lowest and highest bar extent, for a shared y range."""
    yerr = std if std.notna().to_numpy().any() else None
    mean.plot.bar(ax=ax, yerr=yerr, color=colors, capsize=3, width=0.8, legend=False, rot=0,
                  error_kw={"elinewidth": 1, "ecolor": "black"})
    ax.set_ylabel(ylabel)
    ax.set_xlabel("")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.tick_params(axis="x", labelrotation=40)
    for tick in ax.get_xticklabels():
        tick.set_horizontalalignment("right")
        tick.set_rotation_mode("anchor")
    spread = std.fillna(0.0)
    low, high = (mean - spread).to_numpy(dtype=float), (mean + spread).to_numpy(dtype=float)
    if not np.isfinite(low).any():
        return float("nan"), float("nan")
    return float(np.nanmin(low)), float(np.nanmax(high))


def _inits(summary: pd.DataFrame) -> list[str]:
    return [i for i in INIT_LABEL if i in set(summary["init"])] + sorted(set(summary["init"]) - set(INIT_LABEL))


def _init_frames(sub: pd.DataFrame, metric: str, models: list[str], inits: list[str]):
    """(mean, std) tables with one row per model and one column per init, labelled for the legend."""
    frames = []
    for stat in ("mean", "std"):
        table = sub.pivot(index="model", columns="init", values=f"{col(metric)}_{stat}")
        table = table.reindex(index=models, columns=inits)
        frames.append(table.rename(index=pretty, columns=lambda i: INIT_LABEL.get(i, i)))
    return frames


def fig3(summary: pd.DataFrame, models: list[str] | None = None, note: str = "",
         metrics: tuple[str, ...] = DEFAULT_METRICS) -> Figure:
    """TL vs RI: one panel per metric (rows) and data fraction (columns), grouped bars per model."""
    return tl_vs_ri(summary, models, note, metrics, "TL vs RI by model and amount of training data")


def claims(summary: pd.DataFrame, models: list[str] | None = None, note: str = "",
           metrics: tuple[str, ...] = DEFAULT_METRICS) -> Figure:
    """``make claims``: fig3's bars for EfficientNet-Lite0 whole and truncated, RI vs TL."""
    return tl_vs_ri(summary, models, note, metrics, "Claims 2 and 3 in miniature: RI vs TL, whole vs truncated "
                    "EfficientNet-Lite0 (real ImageNet weights)")


def xrv(summary: pd.DataFrame, models: list[str] | None = None, note: str = "",
        metrics: tuple[str, ...] = DEFAULT_METRICS) -> Figure:
    """``+experiment=xrv``: fig3's bars for the DenseNet ladder, RI vs ImageNet TL vs chest X-ray TL."""
    return tl_vs_ri(summary, models, note, metrics, "RI vs ImageNet TL vs chest X-ray TL (TL-CXR: torchxrayvision) "
                    "by depth kept and amount of training data")


def tl_vs_ri(summary: pd.DataFrame, models: list[str] | None, note: str, metrics: tuple[str, ...],
             title: str) -> Figure:
    fractions = sorted(summary["fraction"].unique())
    models = ordered(summary["model"], models)
    inits = _inits(summary)
    width = max(6.5, 1.0 + len(fractions) * (1.5 + 0.55 * len(models)))
    fig, axes = plt.subplots(len(metrics), len(fractions), figsize=(width, 1.0 + 3.5 * len(metrics)), squeeze=False,
                             sharey="row", layout="constrained")
    for i, (metric, name) in enumerate(_named(metrics)):
        lows, highs = [], []
        for j, fraction in enumerate(fractions):
            mean, std = _init_frames(summary[summary["fraction"] == fraction], metric, models, inits)
            lo, hi = bar_panel(axes[i, j], mean, std, [INIT_COLOR.get(c, "C2") for c in inits],
                               f"test {name}", fraction_title(fraction))
            lows.append(lo)
            highs.append(hi)
            top = (mean + std.fillna(0.0)).max(axis=1).to_numpy(dtype=float)
            for x, model in enumerate(models):
                mark = tl_ri_stars(model, fraction, metric)
                _star(axes[i, j], x, top[x], mark)
                if mark and np.isfinite(top[x]):
                    highs[-1] = max(highs[-1], top[x] + 0.02)
        _zoom(axes[i], lows, highs)
    legend_below(fig, axes[0, 0], "init")
    stars_note = f"TL vs RI {stars_meaning()}" if not _MARKS.empty else ""
    return finish(fig, title, summary, "; ".join(x for x in (note, stars_note) if x))


def fig4(summary: pd.DataFrame, models: list[str] | None = None, note: str = "",
         metrics: tuple[str, ...] = DEFAULT_METRICS) -> Figure:
    """TL vs RI per pathology: one row per model, one column per metric, grouped bars per label."""
    fraction = summary["fraction"].max()
    summary = summary[summary["fraction"] == fraction]
    models = ordered(summary["model"], models)
    inits = _inits(summary)
    labels = label_names(summary.columns, "_mean")
    groups = [*labels, "macro mean"]
    width = 1.5 + 0.3 * len(groups) * max(len(inits), 1)
    fig, axes = plt.subplots(len(models), len(metrics), figsize=(max(9.0, 2 * width), 1.0 + 2.6 * len(models)),
                             squeeze=False, layout="constrained")
    for i, model in enumerate(models):
        sub = summary[summary["model"] == model].set_index("init")
        for j, (metric, name) in enumerate(_named(metrics)):
            frames = []
            for stat in ("mean", "std"):
                cols = [f"{col(metric, lab)}_{stat}" for lab in labels] + [f"{col(metric)}_{stat}"]
                table = sub.reindex(inits)[cols].T
                table.index = groups
                frames.append(table.rename(columns=lambda c: INIT_LABEL.get(c, c)))
            lo, hi = bar_panel(axes[i, j], frames[0], frames[1], [INIT_COLOR.get(c, "C2") for c in inits],
                               f"test {name}", f"{pretty(model)}")
            mark = tl_ri_stars(model, fraction, metric)  # over the macro-mean pair, as the comparison is of macros
            top = float((frames[0] + frames[1].fillna(0.0)).iloc[-1].max())
            _star(axes[i, j], len(groups) - 1, top, mark)
            _zoom(axes[i, j], [lo], [hi + (0.02 if mark else 0.0)])
            if i < len(models) - 1:
                axes[i, j].tick_params(labelbottom=False)
    legend_below(fig, axes[0, 0], "init")
    stars_note = f"TL vs RI (macro mean) {stars_meaning()}" if not _MARKS.empty else ""
    return finish(fig, f"TL vs RI per label, {fraction_title(fraction)}", summary,
                  "; ".join(x for x in (note, stars_note) if x))


def relative_change(model: pd.DataFrame | pd.Series, ref: pd.Series, cols: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(100 * (m / ref - 1), its sd) per column ``c`` from the ``c_mean`` / ``c_std`` summary columns.

    The sd is the delta method's for a ratio of two independent means: the relative spreads of model
    and reference add in quadrature, ``100 * m/ref * sqrt((sd_m/m)^2 + (sd_ref/ref)^2)``; NaN where
    either has a single seed (no sd), so such bars have no error bar.
    """
    m = model[[f"{c}_mean" for c in cols]].to_numpy(dtype=float)
    r = ref[[f"{c}_mean" for c in cols]].to_numpy(dtype=float)
    sm = model[[f"{c}_std" for c in cols]].to_numpy(dtype=float)
    sr = ref[[f"{c}_std" for c in cols]].to_numpy(dtype=float)
    ratio = m / r
    spread = 100.0 * np.abs(ratio) * np.sqrt((sm / m) ** 2 + (sr / r) ** 2)
    return 100.0 * (ratio - 1.0), spread


def fig5(summary: pd.DataFrame, models: list[str] | None = None, note: str = "",
         metrics: tuple[str, ...] = DEFAULT_METRICS) -> Figure:
    """Paper Fig. 5: each TL model of the design (CBR-Small, Dens-T1, Dens-T2, Dens-T3) per pathology and
    macro mean, as the relative change (%) of its mean test metric over that of DenseNet121 TL."""
    fraction = summary["fraction"].max()
    tl = summary[(summary["fraction"] == fraction) & (summary["init"] == "pretrained")]
    ref = tl[tl["model"] == REFERENCE]
    if ref.empty:
        raise UserError(f"fig5 compares with DenseNet121 TL: no finished run of model={REFERENCE} init=pretrained "
                        f"at fraction {fraction:g}")
    ref = ref.iloc[0]
    rivals = tl[tl["model"] != REFERENCE].set_index("model")
    if rivals.empty:
        raise UserError("fig5 needs TL runs of at least one model besides DenseNet121 (CBR-Small, Dens-T1..T3)")
    rivals = rivals.loc[ordered(rivals.index, models)]
    labels = label_names(summary.columns, "_mean")
    groups = [*labels, "macro mean"]
    legend = [pretty(m) for m in rivals.index]
    colors = [FIG5_COLORS.get(m, f"C{k + 4}") for k, m in enumerate(rivals.index)]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(8.0, 2.5 + 0.3 * len(groups) * len(rivals)),
                                                       1.0 + 3.5 * len(metrics)), squeeze=False, layout="constrained")
    for i, metric in enumerate(metrics):
        name = METRIC_NAMES[metric]
        change, spread = relative_change(rivals, ref, [col(metric, lab) for lab in labels] + [col(metric)])
        mean = pd.DataFrame(change.T, index=groups, columns=legend)
        std = pd.DataFrame(spread.T, index=groups, columns=legend)
        ax = axes[i, 0]
        bar_panel(ax, mean, std, colors, f"change in test {name} (%)",
                  f"test {name} relative to DenseNet121 TL (macro {ref[f'{col(metric)}_mean']:.3f})")
        ax.axhline(0.0, color="black", linewidth=0.8)
        for k, model in enumerate(rivals.index):  # the macro-mean bars of truncated models vs DenseNet121 TL
            x = len(groups) - 1 - 0.4 + (k + 0.5) * 0.8 / len(rivals)
            value, sd = mean.iloc[-1, k], (0.0 if np.isnan(std.iloc[-1, k]) else std.iloc[-1, k])
            _star(ax, x, value + sd if value >= 0 else 0.0,
                  tl_ri_stars(model, fraction, metric, "truncated/slim vs full TL", "pretrained"))
    legend_below(fig, axes[0, 0], "TL model")
    absent = [pretty(m) for m in (models or []) if m != REFERENCE and m not in rivals.index]
    note = "; ".join(x for x in (f"no finished runs of {', '.join(absent)}" if absent else "", note) if x)
    if not _MARKS.empty:
        note = "; ".join(x for x in (note, f"Dens-T* vs DenseNet121 (macro mean) {stars_meaning()}") if x)
    return finish(fig, f"{', '.join(legend)} vs DenseNet121, all TL, {fraction_title(fraction)}",
                  summary, note, spread_note="bars: 100 (mean / mean of DenseNet121 - 1); error bars: delta-method sd "
                  "of that ratio")


def fig6(summary: pd.DataFrame, models: list[str] | None = None, note: str = "",
         metrics: tuple[str, ...] = DEFAULT_METRICS) -> Figure:
    """Truncated TL (Dens-T1..T3) vs Transfusion (Dens-S1..S3) by how many dense blocks keep their
    pretrained weights; both lines end at DenseNet121 TL, which reuses all four."""
    tl = summary[summary["init"] == "pretrained"]
    fractions = sorted(tl["fraction"].unique())
    levels = [1, 2, 3, 4]
    lines = {"Truncated TL (Dens-T1..T3)": ("dens_t", "o", "C0"), "Transfusion (Dens-S1..S3)": ("dens_s", "s", "C3")}
    size = (1.5 + 4.2 * len(fractions), 0.5 + 3.5 * len(metrics))
    fig, axes = plt.subplots(len(metrics), len(fractions), figsize=size, squeeze=False, sharey="row",
                             layout="constrained")
    for j, fraction in enumerate(fractions):
        sub = tl[tl["fraction"] == fraction].set_index("model")
        for i, (metric, name) in enumerate(_named(metrics)):
            ax = axes[i, j]
            for label, (prefix, marker, color) in lines.items():
                tags = [f"{prefix}{k}" for k in levels[:-1]] + [REFERENCE]
                rows = sub.reindex(tags)
                ax.errorbar(levels, rows[f"{col(metric)}_mean"], yerr=rows[f"{col(metric)}_std"], marker=marker,
                            color=color, capsize=3, label=label)
            ax.set_xticks(levels, ["block 1", "blocks 1-2", "blocks 1-3", "all\n(DenseNet121)"])
            ax.set_xlabel("pretrained dense blocks reused")
            ax.set_ylabel(f"test {name}")
            ax.set_title(fraction_title(fraction), fontsize=10)
            ax.grid(alpha=0.3)
    legend_below(fig, axes[0, 0])
    return finish(fig, "Truncated TL vs Transfusion by level of reused pretrained weights", summary, note)


def fig7(summary: pd.DataFrame, models: list[str] | None = None, note: str = "",
         metrics: tuple[str, ...] = DEFAULT_METRICS) -> Figure:
    """Every TL model (full, truncated, CBR) at each data fraction: bars per model, one per fraction."""
    tl = summary[summary["init"] == "pretrained"]
    models = ordered(tl["model"], models)
    fractions = sorted(tl["fraction"].unique())
    params = tl.groupby("model")["params"].first()
    ticks = {m: f"{pretty(m)} ({params[m] / 1e6:.1f}M)" for m in models}
    colors = list(plt.get_cmap("Blues")(np.linspace(0.35, 0.9, len(fractions))))
    size = (max(8.0, 2.0 + 0.5 * len(models) * len(fractions)), 1.0 + 3.5 * len(metrics))
    fig, axes = plt.subplots(len(metrics), 1, figsize=size, squeeze=False, layout="constrained")
    for i, (metric, name) in enumerate(_named(metrics)):
        frames = []
        for stat in ("mean", "std"):
            table = tl.pivot(index="model", columns="fraction", values=f"{col(metric)}_{stat}")
            table = table.reindex(index=models, columns=fractions).rename(index=ticks, columns=lambda f: f"{f:.0%}")
            frames.append(table)
        lo, hi = bar_panel(axes[i, 0], frames[0], frames[1], colors, f"test {name}", f"test {name} of TL models")
        _zoom(axes[i, 0], [lo], [hi])
    legend_below(fig, axes[0, 0], "training data")
    axes[-1, 0].set_xlabel("model (parameters)")
    return finish(fig, "All TL models, full and truncated, at three amounts of training data", summary, note)


FIGURES: dict[str, Callable[..., Figure]] = {"fig3": fig3, "fig4": fig4, "fig5": fig5, "fig6": fig6, "fig7": fig7,
                                              "claims": claims, "xrv": xrv}


def one_setting_per_cell(name: str, summary: pd.DataFrame) -> None:
    """A figure has one bar (or point) per model x init x fraction. Where a cell holds several settings
    (the summary's ``settings`` column tells them apart), averaging them or drawing one would misreport,
    so the figure is refused, naming them."""
    cells = [(key, sub) for key, sub in summary.groupby(CELL, dropna=False, sort=True) if len(sub) > 1]
    if not cells:
        return
    parts = []
    for (_, model, init, fraction), sub in cells[:5]:
        labels = sub["settings"] if "settings" in sub.columns else sub.get("setting_id", pd.Series(dtype=str))
        parts.append(f"{model}/{init}/f{fraction:g} has {len(sub)}: " + " | ".join(map(str, labels)))
    more = f"; and {len(cells) - 5} more" if len(cells) > 5 else ""
    raise UserError(f"{name} draws one bar per model x init x fraction, but {len(cells)} of them hold runs of "
                    f"several settings ({'; '.join(parts)}{more}): move the run folders of the settings you do not "
                    "want drawn out of the report's folder (a folder's name ends in its setting_id; summary.md "
                    "lists every setting)")


def has_metric(name: str, summary: pd.DataFrame, metric: str) -> None:
    """Every row must have the metric: runs made before a metric was recorded (auprc_trapz) would otherwise
    be missing bars without a word."""
    column = f"{col(metric)}_mean"
    lacking = summary if column not in summary.columns else summary[summary[column].isna()]
    if len(lacking):
        shown = ", ".join(f"{r.model}/{r.init}/f{r.fraction:g}" for r in lacking.head(5).itertuples())
        raise UserError(f"{name} with {metric}: {len(lacking)} of {len(summary)} settings have no test {metric} "
                        f"({shown}{', ...' if len(lacking) > 5 else ''}); runs made before rtl recorded it lack it: "
                        "run them again with runtime.force=true, or draw another --metric")


def draw(name: str, summary: pd.DataFrame, out_dir: str | Path, models: list[str] | None = None,
         note: str = "", metrics: tuple[str, ...] = DEFAULT_METRICS,
         comparisons: pd.DataFrame | None = None) -> list[Path]:
    """Draw figure ``name``; with ``comparisons`` (rtl report's paired tests), TL vs RI bars carry stars."""
    global _MARKS
    _MARKS = comparisons if comparisons is not None else pd.DataFrame()
    try:
        return _draw(name, summary, out_dir, models, note, metrics)
    finally:
        _MARKS = pd.DataFrame()


# The comparisons of the figure being drawn (draw sets it): TL vs RI panels mark significant differences.
_MARKS = pd.DataFrame()


def tl_ri_stars(model: str, fraction: float, metric: str, kind: str = "TL vs RI", a_init: str | None = None) -> str:
    """``*`` / ``**`` / ``***`` when rtl report's paired bootstrap finds a difference: TL vs RI of this model, or
    (kind="truncated/slim vs full TL") this model with ``a_init`` vs its full model with TL."""
    from .compare import stars

    c = _MARKS
    if c.empty:
        return ""
    hit = c[(c["comparison"] == kind) & (c["a_model"] == model) & np.isclose(c["fraction"], fraction)
            & (c["metric"] == metric) & (c.get("scored_on", "test split") == "test split")]
    if a_init is not None:
        hit = hit[hit["a_init"] == a_init]
    return stars(float(hit["p_bootstrap"].iloc[0])) if len(hit) == 1 else ""


def _star(ax, x: float, top: float, mark: str) -> None:
    if mark and np.isfinite(top):
        ax.annotate(mark, (x, top), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=11)


def stars_meaning() -> str:
    """What the stars of the figure being drawn mean: which p, over which units, uncorrected."""
    units = sorted({str(u).split(" ", 1)[-1] for u in _MARKS.get("units", pd.Series(dtype=str)).dropna()})
    tests = int(_MARKS["p_bootstrap"].notna().sum()) if "p_bootstrap" in _MARKS else 0
    return (f"* differ by a paired bootstrap over the test {' or '.join(units) or 'images'}: * p<0.05, ** p<0.01, "
            f"*** p<0.001, uncorrected (p_bootstrap; {tests} tests in comparisons.csv, p_holm there corrects for them)")


def _draw(name: str, summary: pd.DataFrame, out_dir: str | Path, models: list[str] | None = None,
          note: str = "", metrics: tuple[str, ...] = DEFAULT_METRICS) -> list[Path]:
    if name not in FIGURES:
        raise UserError(f"no figure {name!r}: choose one of fig2, {', '.join(FIGURES)}")
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown or not metrics:
        raise UserError(f"--metric {','.join(unknown) or '(none)'}: choose from {', '.join(METRIC_NAMES)}")
    one_setting_per_cell(name, summary)
    for metric in metrics:
        has_metric(name, summary, metric)
    return save(FIGURES[name](summary, models, note, tuple(metrics)), out_dir, name)


def _ranks(ranks: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> '0-2, 5': the rank lists as the README writes them."""
    parts, start = [], ranks[0]
    for prev, cur in zip(ranks, [*ranks[1:], None]):
        if cur != prev + 1:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(parts)


def toy(out_dir: str | Path, note: str = "") -> tuple[pd.DataFrame, list[Path]]:
    """Paper Fig. 2: ROC and PR curves of toy classifiers A and B; both AUROCs near 1, AUPRCs far apart.

    Writes fig2.png/.pdf, scores.csv (the labels and both score lists) and summary.csv (AUROC, AUPRC).
    """
    y, scores = toy_classifiers()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    listing = pd.DataFrame({"y_true": y, **{f"score_{k}": v for k, v in scores.items()}})
    write_csv(listing, out_dir / "scores.csv")
    rows = []
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(11, 5), layout="constrained")
    inset = roc_ax.inset_axes([0.42, 0.42, 0.53, 0.4])
    for (name, s), color in zip(scores.items(), ("C0", "C3")):
        auroc, auprc = roc_auc_score(y, s), average_precision_score(y, s)
        rows.append({"classifier": name, "auroc": auroc, "auprc": auprc,
                     "positive_ranks": _ranks(TOY_POSITIVE_RANKS[name])})
        fpr, tpr, _ = roc_curve(y, s)
        precision, recall, _ = precision_recall_curve(y, s)
        label = f"{name}: AUROC {auroc:.4f}, AUPRC {auprc:.3f}"
        roc_ax.plot(fpr, tpr, color=color, label=label)
        inset.plot(fpr, tpr, color=color)
        # Average precision is the step-wise sum, so the PR curve is drawn as steps, not interpolated.
        pr_ax.step(recall, precision, where="post", color=color, label=label)
    prevalence = float(np.mean(y))
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    inset.set_xlim(0, 0.025)
    inset.set_ylim(0, 1.02)
    inset.set_title("zoom: false positive rate 0-0.025", fontsize=8)
    inset.tick_params(labelsize=7)
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate (recall)", title="ROC curve")
    pr_ax.axhline(prevalence, color="grey", linestyle=":", label=f"chance (prevalence {prevalence:.2f})")
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision-recall curve", ylim=(0, 1.02))
    # Legends where no curve runs: bottom right of the ROC plot, middle of the PR plot.
    roc_ax.legend(loc="lower right", fontsize=9)
    pr_ax.legend(loc="center", bbox_to_anchor=(0.5, 0.72), fontsize=9)
    for ax in (roc_ax, pr_ax):
        ax.grid(alpha=0.3)
    n_pos = int(y.sum())
    text = (f"{n_pos} positives among {len(y)} images; the scores are the ranks (rank 0 = highest). "
            f"A ranks its positives {rows[0]['positive_ranks']}, B {rows[1]['positive_ranks']}; "
            "negatives fill the other ranks. Paper: A .999/.990, B .991/.354 (AUROC/AUPRC).")
    fig.suptitle("Toy classifiers A and B: AUROC near 1 for both, AUPRC tells them apart\n"
                 + "\n".join(textwrap.wrap(text + (f" {note}" if note else ""), 120)), fontsize=11)
    table = pd.DataFrame(rows)
    write_csv(table, out_dir / "summary.csv")
    return table, save(fig, out_dir, "fig2")


# --- calibration ---------------------------------------------------------------------------------------

def reliability_figure(summary: pd.DataFrame, runs: pd.DataFrame, root: Path, out_dir: str | Path,
                       note: str = "") -> list[Path]:
    """calibration.png/.pdf: per label, the positive rate against the mean probability in each of the
    ECE bins (clinical.ECE_BINS), the seeds of a setting pooled, one line per setting; the diagonal is perfect
    calibration. Also calibration.csv with the points. [] when no setting has test predictions."""
    from .clinical import ECE_BINS, readable_sides, reliability
    from .compare import describe

    points = []
    for _, row, side in readable_sides(summary, runs, Path(root), [], "reliability diagram"):
        sp = side.split
        for j, label in enumerate(side.labels):
            keep = sp.mask[:, j]
            y = np.concatenate([sp.labels[keep, j] for _ in side.scored.probs])
            p = np.concatenate([probs[keep, j] for probs in side.scored.probs.values()])
            points.append(reliability(y, p).assign(dataset=row["dataset"], fraction=row["fraction"],
                                                   setting=describe(row), label=label))
    if not points:
        return []
    table = pd.concat(points, ignore_index=True)
    labels = list(dict.fromkeys(table["label"]))
    cols = min(len(labels), 4)
    rows = -(-len(labels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows + 1.2), squeeze=False,
                             layout="constrained")
    for ax, label in zip(axes.ravel(), labels):
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
        for (setting, dataset, fraction), g in table[table["label"] == label].groupby(
                ["setting", "dataset", "fraction"], sort=False):
            g = g[g["images"].fillna(0) > 0]
            ax.plot(g["mean_probability"], g["positive_rate"], marker="o", ms=3,
                    label=f"{setting} ({dataset} f{fraction:g})")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="observed positive rate",
               title=label)
    for ax in axes.ravel()[len(labels):]:
        ax.set_visible(False)
    legend_below(fig, axes.ravel()[0])
    fig.suptitle(f"Reliability on the test split ({ECE_BINS} equal-width bins, seeds pooled)"
                 + (f"\n{note}" if note else ""), fontsize=11)
    write_csv(table, Path(out_dir) / "calibration.csv")
    return save(fig, out_dir, "calibration")
