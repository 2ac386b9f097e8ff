"""sweeps.py and the launchers: whatever runs a sweep's jobs, a failed, crashed or interrupted run is named and the
sweep exits 2 (130 when interrupted); a parallel local sweep gives the results of the same runs one at a time;
the value a job returns to Hydra's sweeper is its best validation AUPRC."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY_DATA

BIN = Path(sys.executable).parent
RTL = shutil.which("rtl") or str(BIN / "rtl")
# cbr_small refuses 32 px images (it needs 121 px); lite0_t2 (EfficientNet-Lite0 cut after stage 2) trains.
MIXED = [*TINY_DATA, "model=cbr_small,lite0_t2", "train.epochs=1", "runtime.threads=1"]
LAUNCHERS = {
    "basic": [],
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "submitit_local": ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
}
PLUGINS = {"joblib": "hydra_plugins.hydra_joblib_launcher", "submitit_local": "hydra_plugins.hydra_submitit_launcher"}


def rtl(*args, cwd, timeout=900, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([RTL, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=timeout, **kw)


def error_lines(proc) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("rtl: error:")]


def workers_of(pid: int) -> list[int]:
    """The processes started for the sweep of command ``pid`` (its launcher's workers) that are still alive."""
    found = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"RTL_SWEEP_PARENT={pid}\0".encode() in env.read_bytes() and int(env.parent.name) != pid:
                found.append(int(env.parent.name))
        except OSError:
            continue
    return found


def holds_torch(pid: int) -> bool:
    """Whether process ``pid`` has loaded torch (a worker that ran a job), from its memory maps."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def results(sweep: Path) -> dict[str, pd.Series]:
    return {p.parent.relative_to(sweep).as_posix(): pd.read_csv(p).iloc[0] for p in sorted(sweep.rglob("results.csv"))
            if "external" not in p.parts}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_a_failed_run_is_named_whatever_the_launcher(launcher, tmp_path):
    if launcher in PLUGINS:
        pytest.importorskip(PLUGINS[launcher])
    sweep = tmp_path / "sweep"
    proc = rtl("train", "-m", *MIXED, *LAUNCHERS[launcher], f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    text = proc.stderr[proc.stderr.index("rtl: error:"):]
    assert "1 of 2 run(s) of the sweep did not finish" in text, text
    assert "cbr_small/random/f1/s0-" in text and "needs images of at least 121 px" in text, text
    done = results(sweep)
    assert len(done) == 1 and next(iter(done)).startswith("synthetic/trunc-tf_efficientnet_lite0-cut2/")
    (error,) = sweep.rglob("error.txt")
    assert "cbr_small" in str(error) and "121 px" in error.read_text()


@pytest.mark.slow
def test_a_sweep_whose_runs_all_finish_exits_0_and_returns_validation_auprc(tmp_path):
    pytest.importorskip(PLUGINS["joblib"])
    sweep = tmp_path / "sweep"
    proc = rtl("train", "-m", *TINY_DATA, "model=lite0_t2", "train.epochs=1", "train.seed=0,1",
               *LAUNCHERS["joblib"], f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sweep.glob(".rtl_jobs/*/*.json")]
    assert sorted(r["status"] for r in records) == ["finished", "finished"]
    by_dir = {Path(r["run_dir"]).resolve(): r["value"] for r in records}
    for path, row in results(sweep).items():
        assert by_dir[(sweep / path).resolve()] == pytest.approx(row.val_auprc, abs=0)  # never a test metric


@pytest.mark.slow
def test_a_killed_job_is_reported_as_crashed(tmp_path):
    pytest.importorskip(PLUGINS["joblib"])
    sweep = tmp_path / "sweep"
    args = [*TINY_DATA, "model=lite0_t2", "train.epochs=40", "data.num_samples=600", "train.seed=0,1",
            *LAUNCHERS["joblib"], f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen([RTL, "train", "-m", *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    victim = None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        for rec in sweep.glob(".rtl_jobs/*/*.json"):
            r = json.loads(rec.read_text())
            if r["status"] == "running" and (Path(r["run_dir"]) / "last.pt").exists():
                victim = r
                break
        time.sleep(0.2)
    os.kill(victim["pid"], signal.SIGKILL)  # as the kernel's out-of-memory killer would
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 2, out[-2000:] + err[-3000:]
    text = err[err.index("rtl: error:"):]
    assert f"{victim['run_dir']}: crashed: the job's process ended without an outcome" in text, text
    assert "the launcher reported:" in text


# --- parallel local runs on a device pool -----------------------------------------------------------------------

FOUR = [*TINY_DATA, "model=lite0_t2", "train.epochs=2", "train.seed=0,1", "train.lr=1e-3,3e-3"]


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("serial") / "sweep"
    proc = rtl("train", "-m", *FOUR, "runtime.threads=1", f"hydra.sweep.dir={sweep}", cwd=sweep.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


def same_metrics(a: pd.Series, b: pd.Series) -> None:
    metrics = [c for c in a.index if c.startswith(("val_", "test_"))] + ["best_epoch", "epochs_run"]
    assert metrics and all(a[c] == b[c] or (pd.isna(a[c]) and pd.isna(b[c])) for c in metrics), \
        [(c, a[c], b[c]) for c in metrics if a[c] != b[c]]


@pytest.mark.slow
def test_two_jobs_at_once_give_the_results_of_one_at_a_time(tmp_path, one_at_a_time):
    pytest.importorskip(PLUGINS["joblib"])
    sweep = tmp_path / "sweep"
    proc = rtl("train", "-m", *FOUR, *LAUNCHERS["joblib"], f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parallel, serial = results(sweep), results(one_at_a_time)
    assert sorted(parallel) == sorted(serial) and len(parallel) == 4
    for key in serial:
        same_metrics(parallel[key], serial[key])
        # Each job took half the cores (runtime.threads = 2 cores / 2 jobs unless set).
        assert parallel[key].device == f"cpu:{max(1, (os.cpu_count() or 1) // 2)}threads"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9 of the command", "Ctrl-C"])
def test_a_stopped_parallel_sweep_run_again_finishes_every_run_once(how, tmp_path, one_at_a_time):
    pytest.importorskip(PLUGINS["joblib"])
    sweep = tmp_path / "sweep"
    cmd = [RTL, "train", "-m", *FOUR, "train.epochs=2", *LAUNCHERS["joblib"], f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.time() + 300
    while not list(sweep.rglob("last.pt")):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    if how == "Ctrl-C":
        os.killpg(proc.pid, signal.SIGINT)  # the terminal sends it to the whole process group
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 130, err[-3000:]
        assert "the sweep was interrupted" in err and "run the same command again to resume" in err, err[-6000:]
    else:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        # The workers notice, save at their next step and end: no process of the sweep is left behind, training
        # or waiting on the dead command's pipes with its memory.
        # A worker that never received a job (under load the command can die while loky is still starting one) has
        # imported neither rtl nor torch, so nothing watches it: loky ends it after its idle timeout (300 s), and
        # loky's resource tracker with the last worker. Workers that hold torch must be gone within two minutes.
        start = time.time()
        while workers_of(proc.pid):
            heavy = [pid for pid in workers_of(proc.pid) if holds_torch(pid)]
            assert not heavy or time.time() < start + 120, f"worker(s) {heavy} outlived the command"
            assert time.time() < start + 330, f"idle worker(s) {workers_of(proc.pid)} outlived loky's idle timeout"
            time.sleep(0.2)
    again = rtl(*cmd[1:], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    done, serial = results(sweep), results(one_at_a_time)
    assert sorted(done) == sorted(serial)  # none lost
    for key in serial:
        same_metrics(done[key], serial[key])  # an interrupted run resumed exactly
        assert len(pd.read_csv(sweep / key / "metrics.csv")) == 2  # each epoch trained once


# --- a validation objective for Hydra's sweepers ------------------------------------------------------------------

@pytest.mark.slow
def test_optuna_maximises_validation_auprc(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    fixed = [a for a in TINY_DATA if not a.startswith("train.lr=")]  # a fixed train.lr would override the search
    proc = rtl("train", "-m", "hydra/sweeper=tune", *fixed, "model=lite0_t2", "train.epochs=1",
               "runtime.threads=1", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import yaml

    found = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    vals = [row.val_auprc for row in results(sweep).values()]
    assert len(vals) == 3 and found["best_value"] == pytest.approx(max(vals), abs=0)
    assert (sweep / "optuna.db").is_file()  # sqlite storage under the sweep folder: the study resumes
