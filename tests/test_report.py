"""``rtl report``: summary.csv against numbers computed by hand from fabricated run directories."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from rethink_tl.errors import UserError
from rethink_tl.report import design, report

LABELS = ["opacity", "nodule"]


def write_run(root, dataset="synthetic", model="dens_f", init="pretrained", fraction=1.0, seed=0,
              experiment=None, finished=True, values=None, **extra):
    """A run directory as ``rtl train`` leaves it: the resolved config, metrics.csv, and (when
    finished) a one-row results.csv whose metrics are ``values`` (split_metric[_label] -> number)."""
    run = root / dataset / model / init / f"f{fraction}" / f"s{seed}"
    run.mkdir(parents=True)
    cfg = {"model": {"name": model, "tag": "${.name}"}, "init": {"name": init},
           "data": {"name": dataset, "fraction": fraction}, "train": {"seed": seed}}
    if experiment:
        cfg["experiment"] = experiment
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    pd.DataFrame([{"epoch": 1, "val_auroc": 0.5}]).to_csv(run / "metrics.csv", index=False)
    if finished:
        strategy = "RI" if init == "random" else "TL"
        row = {"dataset": dataset, "model": model, "init": init, "strategy": strategy, "fraction": fraction,
               "seed": seed, "params": 1000, "best_epoch": 1, "image_size": 32, "lr": 1e-3, "batch_size": 16,
               "n_train": 100, "n_test": 50, **(values or {}), **extra}
        pd.DataFrame([row]).to_csv(run / "results.csv", index=False)
    return run


def metric_values(rng):
    """Random macro and per-label metrics for one run, with the column names results.csv uses."""
    out = {}
    for split in ("val", "test"):
        for metric in ("auroc", "auprc"):
            per = {lab: float(rng.uniform(0.5, 1.0)) for lab in LABELS}
            out[f"{split}_{metric}"] = float(np.mean(list(per.values())))
            out.update({f"{split}_{metric}_{lab}": v for lab, v in per.items()})
    return out


def test_summary_means_and_stds_match_hand_computation(tmp_path):
    rng = np.random.default_rng(0)
    made = {}
    for model in ("dens_f", "cbr_small"):
        for init in ("random", "pretrained"):
            for seed in (0, 1, 2):
                values = metric_values(rng)
                write_run(tmp_path, model=model, init=init, seed=seed, values=values)
                made.setdefault((model, init), []).append(values)
    # A setting with one seed: its std is undefined, not 0.
    single = metric_values(rng)
    write_run(tmp_path, model="res_f", init="random", fraction=0.1, values=single)
    # An interrupted run: counted and named, not averaged.
    write_run(tmp_path, model="res_f", init="random", fraction=0.1, seed=1, finished=False)

    text = report(tmp_path)
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert len(summary) == 5
    for (model, init), runs in made.items():
        row = summary[(summary.model == model) & (summary.init == init)].iloc[0]
        assert row.n == 3 and row.seeds == "0 1 2"
        for key in runs[0]:
            xs = [r[key] for r in runs]
            mean = sum(xs) / 3
            std = math.sqrt(sum((x - mean) ** 2 for x in xs) / 2)  # sample std: n - 1 = 2
            assert row[f"{key}_mean"] == pytest.approx(mean, abs=1e-12), key
            assert row[f"{key}_std"] == pytest.approx(std, abs=1e-12), key
    row = summary[summary.model == "res_f"].iloc[0]
    assert row.n == 1 and row.fraction == 0.1
    assert row.test_auprc_mean == pytest.approx(single["test_auprc"]) and math.isnan(row.test_auprc_std)
    assert "1 unfinished" in text and "synthetic/res_f/random/f0.1/s1" in text
    md = (tmp_path / "summary.md").read_text()
    assert "| synthetic | cbr_small | pretrained | TL | 1 | 3 |" in md
    assert "test AUROC per label" in md  # two labels: per-label tables too
    assert not list(tmp_path.glob("*.png"))  # no experiment marker: tables only


def test_figure_from_marker_and_design_filter(tmp_path):
    rng = np.random.default_rng(1)
    plan = design("fig7")
    for model in plan.models:
        for fraction in plan.fractions:
            for seed in (0, 1):
                write_run(tmp_path, model=model, fraction=fraction, seed=seed, experiment="fig7",
                          values=metric_values(rng))
    text = report(tmp_path)  # every run says experiment: fig7
    assert (tmp_path / "fig7.png").stat().st_size > 10_000 and (tmp_path / "fig7.pdf").is_file()
    assert "fig7 design: 24 settings, 24 with finished runs" in text
    # An RI run below the same folder (another figure's) is left out of fig7's table.
    write_run(tmp_path, model="dens_f", init="random", experiment="fig3", values=metric_values(rng))
    assert "runs of several experiments (fig3, fig7): pass --figure" in report(tmp_path)
    out = tmp_path / "fig7-only"
    text = report(tmp_path, figure="fig7", out=out)
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 24 and set(summary.init) == {"pretrained"} and (summary.n == 2).all()
    assert "1 finished runs below" in text and (out / "fig7.png").is_file()


def test_missing_settings_and_mixed_settings_are_reported(tmp_path):
    rng = np.random.default_rng(2)
    write_run(tmp_path, model="dens_t1", fraction=0.05, values=metric_values(rng))
    write_run(tmp_path, model="dens_t1", fraction=0.05, seed=1, values=metric_values(rng), image_size=64)
    write_run(tmp_path, model="dens_f", fraction=0.05, values=metric_values(rng))
    text = report(tmp_path, figure="fig6")
    assert "fig6 design: 21 settings, 2 with finished runs; none yet for dens_t1/pretrained/f0.1," in text
    assert "dens_t2/pretrained/f0.05" in text
    assert "runs differ in image_size" in text


def test_report_errors(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        report(tmp_path / "nothing")
    write_run(tmp_path, finished=False)
    with pytest.raises(UserError, match="no finished run.*1 unfinished"):
        report(tmp_path)
    write_run(tmp_path, seed=1, values=metric_values(np.random.default_rng(0)))
    with pytest.raises(UserError, match="no experiment 'fig9'"):
        report(tmp_path, figure="fig9")
    write_run(tmp_path, dataset="other", seed=1, values=metric_values(np.random.default_rng(0)))
    with pytest.raises(UserError, match="holds runs of other, synthetic"):
        report(tmp_path, figure="fig7")


def test_fig2_prints_both_classifiers(tmp_path):
    text = report(tmp_path / "fig2", figure="fig2")
    table = pd.read_csv(tmp_path / "fig2" / "summary.csv").set_index("classifier")
    assert table.auroc["A"] == pytest.approx(0.9999, abs=1e-4) and table.auroc["B"] == pytest.approx(0.9908, abs=1e-4)
    assert table.auprc["A"] == pytest.approx(0.991, abs=1e-3) and table.auprc["B"] == pytest.approx(0.355, abs=1e-3)
    assert "| A | 0.9999 | 0.991 |" in text and "| B | 0.9908 | 0.355 |" in text
    scores = pd.read_csv(tmp_path / "fig2" / "scores.csv")
    assert len(scores) == 1000 and scores.y_true.sum() == 10
    assert (tmp_path / "fig2" / "fig2.png").is_file() and (tmp_path / "fig2" / "fig2.pdf").is_file()
