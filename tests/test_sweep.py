"""Sweeps as users run them: through hydra-submitit-launcher, and the figure targets of the Makefile
(a cut-down `make figures PROFILE=smoke`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY
from rethink_tl.evidence.report import design

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RTL = shutil.which("rtl") or str(BIN / "rtl")


def run(cmd, cwd, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_submitit_local_sweep_is_reported(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    # Each job runs in its own process started by submitit, as it would on a SLURM node.
    run([RTL, "train", "-m", *TINY, "train.epochs=1", "train.seed=0,1", "hydra/launcher=submitit_local",
         "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2
    proc = run([RTL, "report", str(sweep)], cwd=tmp_path)
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 1 and summary.n[0] == 2 and summary.seeds[0] == "0 1"
    runs = [pd.read_csv(p) for p in sorted(sweep.rglob("results.csv"))]
    assert summary.test_auroc_mean[0] == pytest.approx((runs[0].test_auroc[0] + runs[1].test_auroc[0]) / 2)
    assert "2 finished runs in 1 settings" in proc.stdout


@pytest.mark.slow
def test_slurm_launcher_config_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = run([RTL, "train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra",
                "-p", "hydra.launcher"], cwd=tmp_path)
    assert "SlurmLauncher" in proc.stdout and "partition: gpu" in proc.stdout and "gpus_per_node: 1" in proc.stdout


# The smoke profile cut down to what a test can afford: one CBR net, the fewest deep nets each figure
# can be drawn with, two fractions, 1 epoch. The full smoke profile is `make figures PROFILE=smoke`.
SHORT = {"CBR_MODELS": "cbr_tiny", "FIG3_DEEP": "dens_f", "FIG5_DEEP": "dens_f,dens_t1",
         "FIG6_DEEP": "dens_t1,dens_s1,dens_f", "FIG7_DEEP": "dens_t1,dens_f", "SMOKE_SAMPLES": "160",
         "SMOKE_EPOCHS": "1", "SWEEP_ARGS": "data.fraction=0.1,1.0"}
EXPECTED = {  # figure -> (models, inits) drawn, at the design's fractions that were run
    "fig3": ({"cbr_tiny", "dens_f"}, {"random", "pretrained"}),
    "fig4": ({"cbr_tiny", "dens_f"}, {"random", "pretrained"}),
    "fig5": ({"cbr_small", "dens_f", "dens_t1"}, {"pretrained"}),  # fig5's CBR net is CBR-Small (FIG5_CBR)
    "fig6": ({"dens_t1", "dens_s1", "dens_f"}, {"pretrained"}),
    "fig7": ({"cbr_tiny", "cbr_small", "dens_t1", "dens_f"}, {"pretrained"}),  # cbr_small: fig5's runs
}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_figures_smoke_profile(tmp_path):
    out = tmp_path / "figs"
    # STAMP= and BIN=: use this interpreter's environment instead of creating .venv.
    args = [f"{k}={v}" for k, v in SHORT.items()]
    proc = run(["make", "-s", "figures", "PROFILE=smoke", f"FIG_DIR={out}", "STAMP=", f"BIN={BIN}", *args], cwd=REPO)
    assert "| A | 0.9999 | 0.991 |" in proc.stdout and "| B | 0.9908 | 0.355 |" in proc.stdout
    for figure in ("fig2", *EXPECTED):
        for ext in ("png", "pdf"):
            assert (out / figure / f"{figure}.{ext}").stat().st_size > 5_000, (figure, ext)
    for figure, (models, inits) in EXPECTED.items():
        summary = pd.read_csv(out / figure / "summary.csv")
        fractions = {f for f in design(figure).fractions if f in (0.1, 1.0)}
        assert set(zip(summary.model, summary.init, summary.fraction)) == {
            (m, i, f) for m in models for i in inits for f in fractions}, figure
        assert (summary.n == 1).all() and (summary.dataset == "synthetic").all()
    # Runs are shared: the 100 % CBR and DenseNet121 runs of fig3 served fig4, fig5 and fig7 as well
    # (12 runs), and fig5 added CBR-Small TL at both fractions (SWEEP_ARGS), which fig7 draws too.
    runs = list((out / "runs").rglob("results.csv"))
    assert len(runs) == 14
    (dens_f_tl,) = (out / "runs/synthetic/dens_f/pretrained/f1").glob("s0-*/results.csv")
    stand_in = pd.read_csv(dens_f_tl).weights[0]
    assert "standin-weights/dens_f.pth" in stand_in
