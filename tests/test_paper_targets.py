"""The figure targets run the paper's protocol: which models, which split, and a data check before any run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from rethink_tl.evidence import figures

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make(*args, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["make", "-s", *args, "STAMP=", f"BIN={BIN}"], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def sweeps(dry_run: str) -> list[dict[str, str]]:
    """The `rtl train -m` lines of a dry run, as {key: value} of their overrides."""
    out = []
    for line in dry_run.splitlines():
        if " train -m " in line:
            out.append(dict(re.findall(r"'?([\w.+/]+)=([^\s']+)'?", line.split(" train -m ", 1)[1])))
    return out


@pytest.mark.slow
def test_fig5_runs_exactly_the_papers_five_models_with_tl():
    proc = make("-n", "fig5", "CHEXPERT_ROOT=/x", "CBR_WEIGHTS=/w")
    deep, cbr = sweeps(proc.stdout)
    assert deep["model"] == "dens_t1,dens_t2,dens_t3,dens_f" and deep["init"] == "pretrained"
    assert cbr["model"] == "cbr_small" and cbr["init"] == "pretrained"
    assert cbr["init.weights"] == "/w/${model.name}.pth" and "init.weights" not in deep
    assert "rtl data +experiment=fig5 data=chexpert data.root=/x" in proc.stdout  # data checked before the sweeps
    # Without CBR_WEIGHTS the CBR-Small TL sweep runs on the weights rtl pretrain installed, if any.
    proc = make("-n", "fig5", "CHEXPERT_ROOT=/x")
    deep, cbr = sweeps(proc.stdout)
    assert "weights check cbr_small" in proc.stdout and cbr["model"] == "$have" and "init.weights" not in cbr


@pytest.mark.slow
@pytest.mark.parametrize("target", ["fig3", "fig6", "fig7"])
def test_covid_targets_use_the_papers_cutoff_unless_told_none(target):
    lines = sweeps(make("-n", target, "COVID_CSV=x.csv").stdout)
    assert lines and all(s["data.cutoff_date"] == "2020-06-30" for s in lines)
    assert all("data.cutoff_date" not in s for s in sweeps(make("-n", target, "COVID_CSV=x.csv",
                                                                "COVID_CUTOFF=none").stdout))


@pytest.mark.slow
def test_a_csv_without_dates_stops_fig3_before_any_training(tmp_path):
    csv = tmp_path / "images.csv"
    csv.write_text("path,covid,patient_id\na.png,1,p1\nb.png,0,p2\n")
    out = tmp_path / "figs"
    proc = make("fig3", f"COVID_CSV={csv}", f"FIG_DIR={out}", check=False)
    assert proc.returncode == 2
    assert "has no column 'date'" in proc.stderr and "COVID_CUTOFF=none" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_the_figure_subtitle_states_the_split_rule():
    summary = pd.DataFrame({"dataset": ["covid"], "n": [3], "split_rule": ["random by patient (seed 0)"]})
    text = figures.subtitle(summary)
    assert "split: random by patient (seed 0)" in text and "mean ± 1 sd over 3 seeds" in text


@pytest.mark.slow
def test_rtl_data_prints_the_split_then_stops_on_a_label_a_run_could_not_learn(tmp_path):
    # 6 patients before the cutoff (all covid-negative but p0, p1), 2 after; the val holdout of 0.34 of the
    # patients before the cutoff has a positive with split seed 0 and none with seed 5 (which rtl train would
    # refuse at epoch 1).
    rows = ["path,covid,patient_id,date"]
    rows += [f"i{k}.png,{int(k < 2)},p{k},2020-03-0{k + 1}" for k in range(6)]
    rows += ["j0.png,1,q0,2020-07-01", "j1.png,0,q1,2020-07-02"]
    (tmp_path / "images.csv").write_text("\n".join(rows) + "\n")
    rtl = shutil.which("rtl") or str(BIN / "rtl")
    base = [rtl, "data", "data=csv", f"data.csv={tmp_path / 'images.csv'}", "data.cutoff_date=2020-06-30",
            "data.val_share=0.34"]
    ok, bad = (subprocess.run([*base, f"data.split_seed={seed}"], capture_output=True, text=True, timeout=120)
               for seed in (0, 5))
    assert ok.returncode == 0 and bad.returncode == 2
    assert ok.stdout.startswith("csv: date: train/val before 2020-06-30, test on or after")
    assert "  test: 2 images; balance covid 1:1.00" in ok.stdout
    assert "  val: 3 images; balance covid no positive" in bad.stdout
    assert bad.stderr.startswith("rtl: error: label 'covid' has 0 positive(s) and 3 negative(s) in the val split")
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_the_data_check_takes_the_sweeps_own_overrides(tmp_path):
    # A date column under another name: SWEEP_ARGS reaches the check as it reaches the sweeps.
    rows = ["path,covid,patient_id,study_date"] + [f"i{k}.png,{k % 2},p{k},2020-0{3 + k // 3}-01" for k in range(16)]
    (tmp_path / "sd.csv").write_text("\n".join(rows) + "\n")
    dry = make("-n", "fig3", f"COVID_CSV={tmp_path / 'sd.csv'}", "SWEEP_ARGS=data.date_column=study_date").stdout
    check = next(line for line in dry.splitlines() if " data +experiment=fig3 " in line)
    assert "data.date_column=study_date" in check and "data.cutoff_date=2020-06-30" in check
    # Every data fraction of fig3's design is checked (a 5 % subset without positives stops it here).
    rtl = shutil.which("rtl") or str(BIN / "rtl")
    proc = subprocess.run([rtl, "data", "+experiment=fig3", "data=csv", f"data.csv={tmp_path / 'sd.csv'}",
                           "data.cutoff_date=2020-06-30", "data.date_column=study_date", "data.val_share=0.3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "data.fraction=0.05 of 8 training images keeps no image" in proc.stderr, proc.stderr
