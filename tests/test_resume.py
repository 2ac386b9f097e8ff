"""Kill a run anywhere, run the same command again, get the same results as if nothing happened."""

import os
import random
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from conftest import TINY

RUN = TINY + ["train.epochs=5", "data.num_samples=600", "runtime.threads=1"]
WITH_RESULTS = ("test_auroc", "test_auprc", "val_auprc", "best_epoch")

# Runs the CLI in a fresh interpreter; PATCH (python source) may first install a fault.
LAUNCH = """
import sys
{patch}
from rethink_tl.cli import main
main(sys.argv[1:])
"""


def start(run_dir, patch="", extra=()):
    code = LAUNCH.format(patch=patch)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", code, "train", *RUN, *extra, f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(run_dir, patch=""):
    proc = start(run_dir, patch)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return out + err


def rows(run_dir):
    path = run_dir / "metrics.csv"
    try:
        return len(pd.read_csv(path)) if path.exists() else 0
    except (pd.errors.EmptyDataError, OSError):
        return 0


def wait_for_rows(proc, run_dir, n, timeout=300):
    deadline = time.time() + timeout
    while rows(run_dir) < n:
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.02)


def comparable(run_dir):
    metrics = pd.read_csv(run_dir / "metrics.csv").drop(columns=["seconds"])
    results = pd.read_csv(run_dir / "results.csv")
    return metrics, {k: results[k][0] for k in WITH_RESULTS}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    finish(run_dir)
    return comparable(run_dir)


def assert_same_as_reference(run_dir, reference):
    metrics, results = comparable(run_dir)
    pd.testing.assert_frame_equal(metrics, reference[0])
    assert results == reference[1]
    assert not list(run_dir.glob(".*.tmp"))


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(tmp_path, reference):
    rng = random.Random(int(os.environ.get("RTL_TEST_SEED", "0")) or None)
    run_dir = tmp_path / "run"
    for target in sorted(rng.sample(range(0, 4), 3)):
        proc = start(run_dir)
        wait_for_rows(proc, run_dir, target)
        time.sleep(rng.uniform(0.0, 0.6))  # somewhere inside the next epoch: training, evaluation or saving
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    finish(run_dir)
    assert_same_as_reference(run_dir, reference)


# Faults inside the atomic writes: the process dies after the temporary file is complete but
# before the rename, or halfway through writing the temporary file.
KILL_BEFORE_RENAME = """
import os, signal
import rethink_tl.atomic_io as ck
real_replace = ck.os.replace
calls = {"n": 0}
def replace(src, dst):
    if str(dst).endswith("last.pt"):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
ck.os.replace = replace
"""

KILL_MID_WRITE = """
import os, signal
import rethink_tl.atomic_io as ck
real_fsync = ck.os.fsync
calls = {"n": 0}
def fsync(fd):
    calls["n"] += 1
    if calls["n"] == 4:  # the fourth file written (a checkpoint), cut in half as a power cut would leave it
        os.ftruncate(fd, os.fstat(fd).st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(fd)
ck.os.fsync = fsync
"""


@pytest.mark.slow
@pytest.mark.parametrize("patch", [KILL_BEFORE_RENAME, KILL_MID_WRITE], ids=["before-rename", "mid-write"])
def test_sigkill_while_writing_a_checkpoint(tmp_path, reference, patch):
    run_dir = tmp_path / "run"
    proc = start(run_dir, patch)
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert (run_dir / "last.pt").exists() or rows(run_dir) == 0
    finish(run_dir)
    assert_same_as_reference(run_dir, reference)


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_a_resumable_checkpoint(tmp_path, reference):
    run_dir = tmp_path / "run"
    # Slow each training step down so the signal lands inside an epoch, not in evaluation.
    slow = "import time, rethink_tl.train as t\nreal = t.masked_bce\n" \
           "t.masked_bce = lambda w: (lambda f: lambda *a: (time.sleep(0.05), f(*a))[1])(real(w))\n"
    proc = start(run_dir, slow)
    wait_for_rows(proc, run_dir, 1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM at epoch 2, step" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    state = torch.load(run_dir / "last.pt", weights_only=True)
    assert state["progress"]["epoch"] == 2 and state["progress"]["step"] > 0
    assert not (run_dir / "results.csv").exists()
    log = finish(run_dir)
    assert "resuming from" in log and "at epoch 2 step" in log
    assert_same_as_reference(run_dir, reference)


@pytest.mark.slow
def test_rerun_of_a_sweep_runs_only_what_is_missing(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "rethink_tl.cli", "train", "-m", *TINY, "train.epochs=1", "train.seed=0,1,2",
           f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    results = sorted(sweep.rglob("results.csv"))
    names = [p.parent.name for p in results]
    # One setting, three seeds: the seeds share the setting's hash.
    assert [n.split("-")[0] for n in names] == ["s0", "s1", "s2"] and len({n.split("-")[1] for n in names}) == 1
    stamps = {p: p.stat().st_mtime_ns for p in results}
    results[1].unlink()
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr
    assert (second.stdout + second.stderr).count("finished with the same settings, skipping") == 2
    assert results[1].exists()
    assert results[0].stat().st_mtime_ns == stamps[results[0]]
    assert results[2].stat().st_mtime_ns == stamps[results[2]]


# A launcher's own handler installed before rtl starts, as submitit installs its requeue handler for
# USR2: it must run after rtl has saved, and the run must go on if it returns.
EARLIER_HANDLER = """
import os, signal, sys
def launcher_handler(signum, frame):
    print(f"launcher handler saw {signal.Signals(signum).name}; last.pt exists: "
          f"{os.path.exists(sys.argv[-1].split('=', 1)[1] + '/last.pt')}", file=sys.stderr, flush=True)
    if os.environ.get("RTL_TEST_REQUEUE"):
        sys.exit(0)  # submitit requeues the job, then leaves
signal.signal(signal.SIGUSR2, launcher_handler)
"""


@pytest.mark.slow
@pytest.mark.parametrize("requeue", [False, True], ids=["handler-returns", "handler-exits"])
def test_signal_is_handed_on_to_an_earlier_handler(tmp_path, reference, requeue, monkeypatch):
    if requeue:
        monkeypatch.setenv("RTL_TEST_REQUEUE", "1")
    run_dir = tmp_path / "run"
    proc = start(run_dir, EARLIER_HANDLER)
    wait_for_rows(proc, run_dir, 1)
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert "launcher handler saw SIGUSR2; last.pt exists: True" in err
    assert "stopped by SIGUSR2" in out + err and "Traceback" not in err
    if requeue:
        assert proc.returncode == 0 and not (run_dir / "results.csv").exists()
        finish(run_dir)  # the requeued job
    else:
        assert proc.returncode == 0 and (run_dir / "results.csv").exists()
    assert_same_as_reference(run_dir, reference)


@pytest.mark.slow
def test_a_run_paused_at_stop_after_goes_on_to_the_same_results(tmp_path, reference):
    """runtime.stop_after (rtl advise's rungs) pauses after that epoch with nothing scored, and the same command
    without it (or with a larger one) continues from last.pt to exactly the uninterrupted run's numbers."""
    proc = start(tmp_path, extra=["runtime.stop_after=2"])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "paused after epoch 2 of 5" in out + err
    assert rows(tmp_path) == 2 and (tmp_path / "last.pt").exists()
    assert not (tmp_path / "results.csv").exists() and not (tmp_path / "predictions.csv.gz").exists()
    again = start(tmp_path, extra=["runtime.stop_after=2"])  # the same rung again: nothing to train
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0 and rows(tmp_path) == 2, err
    proc = start(tmp_path, extra=["runtime.stop_after=4"])
    assert proc.wait(timeout=600) == 0 and rows(tmp_path) == 4
    finish(tmp_path)
    assert_same_as_reference(tmp_path, reference)
