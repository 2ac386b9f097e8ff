"""Paper figures from fabricated summaries: what is drawn is the summary's numbers, with legend,
axis labels and error bars."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer

from rethink_tl.evidence import figures
from rethink_tl.errors import UserError
from rethink_tl.evidence.report import design, gather, summarise
from test_evidence_report import metric_values, write_run


def fabricated_summary(tmp_path, figure, seeds=(0, 1, 2), values=None):
    """The summary of a complete fabricated sweep of ``figure``'s design."""
    rng = np.random.default_rng(0)
    plan = design(figure)
    for model in plan.models:
        for init in plan.inits:
            for fraction in plan.fractions:
                for seed in seeds:
                    v = values(model, init, fraction, seed) if values else metric_values(rng)
                    write_run(tmp_path, model=model, init=init, fraction=fraction, seed=seed, values=v)
    found = gather(tmp_path)
    return summarise(found.runs, found.settings), plan


def bars(ax) -> list[BarContainer]:
    return [c for c in ax.containers if isinstance(c, BarContainer)]


def assert_readable(fig):
    assert fig._suptitle is not None and fig._suptitle.get_text()
    assert fig.legends or any(ax.get_legend() for ax in fig.axes)
    for ax in fig.axes:
        if ax.has_data():
            assert ax.get_ylabel(), ax.get_title()


@pytest.mark.slow
@pytest.mark.parametrize("figure", ["fig3", "fig4", "fig5", "fig6", "fig7", "claims"])
def test_every_figure_draws_with_error_bars(tmp_path, figure):
    summary, plan = fabricated_summary(tmp_path, figure)
    fig = figures.FIGURES[figure](summary, plan.models, "a note")
    assert_readable(fig)
    assert "mean ± 1 sd over 3 seeds" in fig._suptitle.get_text() and "a note" in fig._suptitle.get_text()
    assert all(any(isinstance(c, ErrorbarContainer) for c in ax.containers) for ax in fig.axes)
    paths = figures.save(fig, tmp_path / "out", figure)
    assert all(p.stat().st_size > 5_000 for p in paths)


def test_fig3_bars_are_the_summary_means(tmp_path):
    summary, plan = fabricated_summary(tmp_path, "fig3")
    fig = figures.fig3(summary, plan.models)
    ax = fig.axes[0]  # AUROC at 5 %
    ri, tl = bars(ax)
    assert [t.get_text() for t in ax.get_xticklabels()] == [figures.pretty(m) for m in plan.models]
    at = summary[summary.fraction == 0.05].set_index(["model", "init"])
    for drawn, init in ((ri, "random"), (tl, "pretrained")):
        expected = [at.loc[(m, init), "test_auroc_mean"] for m in plan.models]
        assert [b.get_height() for b in drawn] == pytest.approx(expected)


def test_one_seed_has_no_error_bars_and_says_so(tmp_path):
    summary, plan = fabricated_summary(tmp_path, "fig7", seeds=(0,))
    fig = figures.fig7(summary, plan.models)
    assert "1 seed per setting, so no error bars" in fig._suptitle.get_text()
    assert all(len(bars(ax)) == 3 for ax in fig.axes)


def test_fig5_is_the_relative_change_over_densenet121_tl_of_the_papers_four_models(tmp_path):
    # Every metric of a model is BASE[model] + 0.01 * (seed - 1): means BASE, sd 0.01 over the 3 seeds.
    base = {"dens_f": 0.80, "cbr_small": 0.76, "dens_t1": 0.80, "dens_t2": 0.88, "dens_t3": 0.84}

    def values(model, init, fraction, seed):
        v = base[model] + 0.01 * (seed - 1)
        return {f"{split}_{metric}{lab}": v for split in ("val", "test") for metric in ("auroc", "auprc", "auprc_trapz")
                for lab in ("", "_opacity", "_nodule")}

    summary, plan = fabricated_summary(tmp_path, "fig5", values=values)
    assert plan.models == ["cbr_small", "dens_t1", "dens_t2", "dens_t3", "dens_f"] and plan.inits == ["pretrained"]
    fig = figures.fig5(summary, plan.models)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["CBR-Small", "Dens-T1", "Dens-T2", "Dens-T3"]
    assert len(fig.axes) == 2 and "AUROC" in fig.axes[0].get_title() and "AUPRC" in fig.axes[1].get_title()
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["opacity", "nodule", "macro mean"]
    for ax in fig.axes:
        drawn = bars(ax)
        errors = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        for model, container, err in zip(["cbr_small", "dens_t1", "dens_t2", "dens_t3"], drawn, errors):
            ratio = base[model] / 0.80
            assert [b.get_height() for b in container] == pytest.approx([100 * (ratio - 1)] * 3)
            # delta method: 100 * ratio * sqrt((0.01 / m)^2 + (0.01 / ref)^2), drawn as +- that around the bar
            sd = 100 * ratio * np.hypot(0.01 / base[model], 0.01 / 0.80)
            lengths = [seg[1][1] - seg[0][1] for seg in err.lines[2][0].get_segments()]
            assert lengths == pytest.approx([2 * sd] * 3)
    metrics = figures.fig5(summary, plan.models, metrics=("auprc_trapz",))
    assert len(metrics.axes) == 1 and "AUPRC (trapezoid)" in metrics.axes[0].get_title()
    title = fig._suptitle.get_text()
    assert title.startswith("CBR-Small, Dens-T1, Dens-T2, Dens-T3 vs DenseNet121, all TL") and "no finished" not in title
    partial = figures.fig5(summary[~summary.model.isin(["cbr_small", "dens_t2"])], plan.models)
    title = partial._suptitle.get_text()
    assert title.startswith("Dens-T1, Dens-T3 vs DenseNet121") and "no finished runs of CBR-Small, Dens-T2" in title
    without_reference = summary[summary.model != "dens_f"]
    with pytest.raises(UserError, match="DenseNet121 TL"):
        figures.fig5(without_reference, plan.models)


def test_a_metric_the_runs_did_not_record_is_refused_not_left_blank(tmp_path):
    summary, plan = fabricated_summary(tmp_path, "fig7", seeds=(0, 1))  # write_run records auroc and auprc only
    with pytest.raises(UserError, match="have no test auprc_trapz"):
        figures.draw("fig7", summary, tmp_path / "out", plan.models, metrics=("auprc_trapz",))
    with pytest.raises(UserError, match="choose from auroc, auprc, auprc_trapz"):
        figures.draw("fig7", summary, tmp_path / "out", plan.models, metrics=("ap",))


def test_fig6_lines_end_at_densenet121(tmp_path):
    summary, plan = fabricated_summary(tmp_path, "fig6")
    fig = figures.fig6(summary, plan.models)
    ax = fig.axes[0]  # AUROC at 5 %
    full = summary[(summary.model == "dens_f") & (summary.fraction == 0.05)].test_auroc_mean.item()
    truncated = summary.set_index(["model", "fraction"]).test_auroc_mean
    lines = [c.lines[0] for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(lines) == 2
    for line, prefix in zip(lines, ("dens_t", "dens_s")):
        y = line.get_ydata()
        assert y[-1] == pytest.approx(full)
        assert list(y[:3]) == pytest.approx([truncated[(f"{prefix}{k}", 0.05)] for k in (1, 2, 3)])


def test_several_settings_in_one_cell_are_refused_not_averaged(tmp_path):
    summary, plan = fabricated_summary(tmp_path, "fig7", seeds=(0,))
    write_run(tmp_path, model="dens_f", fraction=0.05, values=metric_values(np.random.default_rng(1)),
              settings={"train.epochs": 50})
    found = gather(tmp_path)
    mixed = summarise(found.runs, found.settings)
    assert len(mixed) == len(summary) + 1
    cell = mixed[(mixed.model == "dens_f") & (mixed.fraction == 0.05)]
    assert sorted(cell.settings) == ["train.epochs=3", "train.epochs=50"]
    with pytest.raises(UserError, match=r"fig7 draws one bar .* 1 of them hold runs of several settings "
                                        r"\(dens_f/pretrained/f0.05 has 2: train.epochs=3 \| train.epochs=50\)"):
        figures.draw("fig7", mixed, tmp_path / "out", plan.models)
    assert not (tmp_path / "out").exists()
    assert figures.draw("fig7", summary, tmp_path / "out", plan.models)[0].is_file()


def test_fig2_toy_curves(tmp_path):
    table, paths = figures.toy(tmp_path)
    assert list(table.classifier) == ["A", "B"]
    assert table.auprc[0] - table.auprc[1] > 0.6 and min(table.auroc) > 0.99
    assert table.positive_ranks[0] == "0-8, 10" and table.positive_ranks[1] == "5, 8-9, 11-12, 14-17, 29"
    assert all(p.is_file() for p in paths)
    scores = pd.read_csv(tmp_path / "scores.csv")
    # Rank r has score N - 1 - r: A's lowest-ranked positive (rank 10) scores 989.
    assert scores[scores.y_true == 1].score_A.min() == 989
