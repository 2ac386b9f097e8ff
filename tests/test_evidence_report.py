"""``rtl report``: summary.csv against numbers computed by hand from fabricated run directories."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from rethink_tl.identity import setting_id
from rethink_tl.errors import UserError
from rethink_tl.evidence.report import design, drop_duplicate_seeds, gather, report, summarise

LABELS = ["opacity", "nodule"]


def write_run(root, dataset="synthetic", model="dens_f", init="pretrained", fraction=1.0, seed=0,
              experiment=None, finished=True, values=None, settings=None, legacy=False, name=None, **extra):
    """A run directory as ``rtl train`` leaves it: the resolved config, identity.json, metrics.csv and (when
    finished) a one-row results.csv whose metrics are ``values`` (split_metric[_label] -> number).
    ``settings`` overrides identity settings (another setting_id); ``legacy`` writes a run from before
    identity.json and setting_id."""
    ident = {"data.name": dataset, "data.fraction": float(fraction), "model.name": model, "model.tag": model,
             "init.name": init, "train.seed": seed, "train.epochs": 3, "train.lr": 1e-3, **(settings or {})}
    sid = setting_id(ident)
    run = root / dataset / model / init / f"f{fraction:g}" / (name or (f"s{seed}" if legacy else f"s{seed}-{sid}"))
    run.mkdir(parents=True)
    cfg = {"model": {"name": model, "tag": model}, "init": {"name": init},
           "data": {"name": dataset, "fraction": fraction},
           "train": {"seed": seed, "epochs": ident["train.epochs"], "lr": ident["train.lr"]}, "experiment": experiment}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    if not legacy:
        (run / "identity.json").write_text(json.dumps({"setting_id": sid, "settings": ident}))
    pd.DataFrame([{"epoch": 1, "val_auroc": 0.5}]).to_csv(run / "metrics.csv", index=False)
    if finished:
        strategy = "RI" if init == "random" else "TL"
        row = {"dataset": dataset, "model": model, "init": init, "strategy": strategy, "fraction": fraction,
               "seed": seed, **({} if legacy else {"setting_id": sid}), "params": 1000, "best_epoch": 1,
               "epochs": ident["train.epochs"], **(values or {}), "image_size": 32, "lr": ident["train.lr"],
               "batch_size": 16, "n_train": 100, "n_test": 50, **extra}
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
    stopped = write_run(tmp_path, model="res_f", init="random", fraction=0.1, seed=1, finished=False)

    done = report(tmp_path)
    text = done.text
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
    assert "1 unfinished" in text and str(stopped.relative_to(tmp_path)) in text and done.problems == []
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
    text = report(tmp_path).text  # every run says experiment: fig7
    assert (tmp_path / "fig7.png").stat().st_size > 10_000 and (tmp_path / "fig7.pdf").is_file()
    assert "fig7 design: 24 settings, 24 with finished runs" in text
    # An RI run below the same folder (another figure's) is left out of fig7's table.
    write_run(tmp_path, model="dens_f", init="random", experiment="fig3", values=metric_values(rng))
    assert "runs of several experiments (fig3, fig7): pass --figure" in report(tmp_path).text
    out = tmp_path / "fig7-only"
    text = report(tmp_path, figure="fig7", out=out).text
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 24 and set(summary.init) == {"pretrained"} and (summary.n == 2).all()
    assert "1 finished runs below" in text and (out / "fig7.png").is_file()


def test_missing_settings_and_old_runs_with_other_settings(tmp_path):
    # Runs from before identity.json: no setting_id, so the results columns tell settings apart.
    rng = np.random.default_rng(2)
    write_run(tmp_path, model="dens_t1", fraction=0.05, values=metric_values(rng), legacy=True)
    write_run(tmp_path, model="dens_t1", fraction=0.05, seed=1, values=metric_values(rng), legacy=True, image_size=64)
    write_run(tmp_path, model="dens_f", fraction=0.05, values=metric_values(rng), legacy=True)
    done = report(tmp_path, figure="fig6")
    assert "fig6 design: 21 settings, 2 with finished runs; none yet for dens_t1/pretrained/f0.1," in done.text
    assert "dens_t2/pretrained/f0.05" in done.text
    summary = pd.read_csv(tmp_path / "summary.csv", keep_default_na=False)
    t1 = summary[summary.model == "dens_t1"]
    assert sorted(t1.settings) == ["data.image_size=32", "data.image_size=64"] and list(t1.n) == [1, 1]
    assert (summary.setting_id == "").all()
    # One point per model and fraction: two settings of dens_t1 at 5 % are not averaged into one.
    assert not (tmp_path / "fig6.png").exists()
    assert done.problems and "fig6 not drawn" in done.problems[0]
    assert "dens_t1/pretrained/f0.05 has 2: data.image_size=32 | data.image_size=64" in done.problems[0]
    assert "| dens_t1 | pretrained | TL | 0.05 | data.image_size=64 | 1 |" in (tmp_path / "summary.md").read_text()


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
    text = report(tmp_path / "fig2", figure="fig2").text
    table = pd.read_csv(tmp_path / "fig2" / "summary.csv").set_index("classifier")
    assert table.auroc["A"] == pytest.approx(0.9999, abs=1e-4) and table.auroc["B"] == pytest.approx(0.9908, abs=1e-4)
    assert table.auprc["A"] == pytest.approx(0.991, abs=1e-3) and table.auprc["B"] == pytest.approx(0.355, abs=1e-3)
    assert "| A | 0.9999 | 0.991 |" in text and "| B | 0.9908 | 0.355 |" in text
    scores = pd.read_csv(tmp_path / "fig2" / "scores.csv")
    assert len(scores) == 1000 and scores.y_true.sum() == 10
    assert (tmp_path / "fig2" / "fig2.png").is_file() and (tmp_path / "fig2" / "fig2.pdf").is_file()


def rtl_report(*args, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    return subprocess.run([sys.executable, "-m", "rethink_tl.cli", "report", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


def macro(test_auroc):
    """Metrics of one run: every one equal to ``test_auroc`` but for test AUPRC, which is 1 - it."""
    out = {}
    for split in ("val", "test"):
        for metric in ("auroc", "auprc"):
            v = 1 - test_auroc if (split, metric) == ("test", "auprc") else test_auroc
            out[f"{split}_{metric}"] = v
            out.update({f"{split}_{metric}_{lab}": v for lab in LABELS})
    return out


@pytest.mark.slow
def test_cli_report_leaves_out_broken_runs_names_them_and_exits_2(tmp_path):
    root = tmp_path / "runs"
    six = {"train.epochs": 6}
    for seed, v in ((0, 0.7), (1, 0.8), (2, 0.9)):
        kept = write_run(root, seed=seed, settings=six, values=macro(v))
    # The same seed and setting in a copied folder must not count twice (its numbers would weigh double).
    copy = write_run(root / "zz-copy", seed=2, settings=six, values=macro(0.1))
    for seed, v in ((0, 0.6), (1, 0.65)):
        write_run(root, seed=seed, settings={"train.epochs": 1}, values=macro(v))
    garbage = write_run(root, model="res_f", values=macro(0.5))
    (garbage / "results.csv").write_bytes(b'\x89PNG\r\n\x1a\n\x00\xff\xfe"unclosed, quote\n\x00')
    empty = write_run(root, model="res_f", seed=1, values=macro(0.5))
    (empty / "results.csv").write_text("")
    wrong = write_run(root, model="res_f", seed=2, values=macro(0.5))
    (wrong / "results.csv").write_text("epoch,loss\n1,0.5\n")
    bad_config = write_run(root, model="cbr_small", finished=False, legacy=True)
    (bad_config / "config.yaml").write_text("data:\n  name: synthetic\n  fraction: lots\n")
    bad_identity = write_run(root, model="cbr_small", seed=1, values=macro(0.5))
    (bad_identity / "identity.json").write_text("{not json")
    failed = write_run(root, model="cbr_tiny", finished=False)
    (failed / "error.txt").write_text("label 'nodule' has 0 positive(s) in val\nsecond line\n")

    proc = rtl_report(root, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "rtl: error: 5 run directories below" in proc.stderr and "left out" in proc.stderr
    reasons = {garbage: "results.csv is not a readable CSV table", empty: "results.csv is empty",
               wrong: "results.csv lacks the column(s) dataset, model", bad_identity: "identity.json cannot be read",
               bad_config: "unfinished, and its config cannot be placed: data.fraction='lots' is not a number"}
    for run, why in reasons.items():
        name = str(run.relative_to(root))
        assert name in proc.stderr and f"{name} ({why}" in proc.stdout, name
    assert f"{failed.relative_to(root)}: label 'nodule' has 0 positive(s) in val" in proc.stdout
    assert "second line" not in proc.stdout
    assert f"{kept.relative_to(root)} and {copy.relative_to(root)} (counted: {kept.relative_to(root)})" in proc.stdout

    summary = pd.read_csv(root / "summary.csv").set_index("settings")
    assert sorted(summary.index) == ["train.epochs=1", "train.epochs=6"]
    six_row, one_row = summary.loc["train.epochs=6"], summary.loc["train.epochs=1"]
    assert (six_row.n, six_row.seeds, one_row.n, one_row.seeds) == (3, "0 1 2", 2, "0 1")
    # By hand: 0.7, 0.8, 0.9 -> mean 0.8, sd sqrt((0.01 + 0 + 0.01) / 2) = 0.1; 0.6, 0.65 -> 0.625, sd 0.025 * sqrt(2).
    assert six_row.test_auroc_mean == pytest.approx(0.8) and six_row.test_auroc_std == pytest.approx(0.1)
    assert six_row.test_auprc_mean == pytest.approx(0.2) and six_row.test_auprc_std == pytest.approx(0.1)
    assert one_row.test_auroc_mean == pytest.approx(0.625)
    assert one_row.test_auroc_std == pytest.approx(0.025 * math.sqrt(2))
    assert one_row.test_auroc_nodule_mean == pytest.approx(0.625)
    md = (root / "summary.md").read_text()
    assert "| synthetic | dens_f | pretrained | TL | 1 | train.epochs=6 | 3 |" in md
    assert "WARNING: 5 run directories left out" in md and "results.csv is empty" in md
    assert "1 failed (error.txt)" in md


@pytest.mark.slow
def test_cli_report_refuses_a_figure_of_mixed_settings_but_writes_the_tables(tmp_path):
    rng = np.random.default_rng(3)
    plan = design("fig7")
    for model in plan.models:
        for fraction in plan.fractions:
            write_run(tmp_path, model=model, fraction=fraction, experiment="fig7", values=metric_values(rng))
    write_run(tmp_path, model="dens_f", fraction=0.1, experiment="fig7", values=metric_values(rng),
              settings={"train.lr": 1e-5})
    proc = rtl_report(tmp_path, "--out", tmp_path / "fig7", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "fig7 not drawn" in proc.stderr
    assert "dens_f/pretrained/f0.1 has 2: train.lr=0.001 | train.lr=1e-05" in proc.stderr
    summary = pd.read_csv(tmp_path / "fig7" / "summary.csv")
    assert len(summary) == 25 and (summary.n == 1).all()
    assert not (tmp_path / "fig7" / "fig7.png").exists()
    # Without the extra setting the figure is drawn, and exit status 0 says the report is complete.
    extra = next(p for p in tmp_path.rglob("identity.json") if '"train.lr": 1e-05' in p.read_text()).parent
    extra.rename(tmp_path / "elsewhere")
    proc = rtl_report(tmp_path / "synthetic", "--figure", "fig7", "--out", tmp_path / "fig7", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "fig7" / "fig7.png").is_file() and "24 finished runs in 24 settings" in proc.stdout


def test_seeds_from_other_weights_files_are_not_averaged_and_tl_vs_ri_weights_need_no_label(tmp_path):
    rng = np.random.default_rng(1)
    write_run(tmp_path, init="random", seed=0, values=metric_values(rng), weights="random")
    for seed, source in ((0, "/cache/a/densenet121.pth"), (1, "/cache/a/densenet121.pth"),
                         (2, "/elsewhere/densenet121.pth")):
        write_run(tmp_path, init="pretrained", seed=seed, values=metric_values(rng), weights=source)
    found = gather(tmp_path)
    runs, _ = drop_duplicate_seeds(found.runs)
    summary = summarise(runs, found.settings).set_index(["init", "seeds"])
    # The seed trained from another file is a row of its own, named by the file; RI vs TL differ in their
    # weights as they must, which is no setting to point out.
    assert summary.loc[("pretrained", "0 1"), "settings"] == "weights=/cache/a/densenet121.pth"
    assert summary.loc[("pretrained", "2"), "settings"] == "weights=/elsewhere/densenet121.pth"
    assert summary.loc[("random", "0"), "settings"] == ""


def test_a_seed_without_the_chosen_metric_is_named_not_averaged_away(tmp_path):
    rng = np.random.default_rng(2)
    for seed in (0, 1, 2):
        values = metric_values(rng)
        if seed != 1:  # seed 1 was made before auprc_trapz was recorded
            values.update({"test_auprc_trapz": 0.1 * (seed + 1), "val_auprc_trapz": 0.2})
        write_run(tmp_path, model="dens_f", init="pretrained", fraction=1.0, seed=seed, values=values,
                  experiment="fig7")
    done = report(tmp_path, figure="fig7", metrics=("auroc", "auprc_trapz"))
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary.n[0] == 3 and math.isnan(summary.test_auprc_trapz_mean[0])  # not (0.1 + 0.3) / 2 with n 3
    assert not math.isnan(summary.test_auroc_mean[0])
    assert len(done.problems) == 1 and "have no test auroc or auprc_trapz" in done.problems[0]
    assert "s1-" in done.problems[0] and "(no test_auprc_trapz)" in done.problems[0]
    assert not (tmp_path / "fig7.png").exists() and "fig7 not drawn" in done.text
    assert "| test AUROC | test AUPRC (trapezoid) | val AUROC | val AUPRC (trapezoid) |" in done.text
