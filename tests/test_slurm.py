"""A sweep on a real SLURM cluster: one node on this machine (scripts/slurm_local.sh: munge, MariaDB, slurmdbd,
slurmctld, slurmd from Debian's packages), jobs submitted through hydra/launcher=slurm (hydra-submitit-launcher).
Skipped, with the reason, where SLURM cannot be installed or started (not root, no apt, no Debian mirror)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY_DATA

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_local.sh"
RTL = shutil.which("rtl") or str(Path(sys.executable).parent / "rtl")
# The node has 2 CPUs and no GPU: a job asking for more would wait for ever rather than fail.
ON_NODE = ["hydra/launcher=slurm", "hydra.launcher.partition=local", "hydra.launcher.gpus_per_node=0",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=60",
           "runtime.threads=1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    where = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run(["bash", str(SCRIPT), "start", str(where)], capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"no SLURM cluster here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    conf = proc.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    env = {**os.environ, "SLURM_CONF": conf, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    yield env
    subprocess.run(["bash", str(SCRIPT), "stop", str(where)], capture_output=True, text=True, timeout=300)


def rtl(env, *args, cwd, timeout=1200):
    return subprocess.run([RTL, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def slurm(env, *cmd) -> str:
    return subprocess.run(list(cmd), capture_output=True, text=True, env=env, timeout=60).stdout.strip()


def test_a_sweep_on_the_cluster_lands_its_runs_and_names_a_failed_one(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    proc = rtl(cluster, "train", "-m", *TINY_DATA, "model=lite0_t2", "train.epochs=1", "train.seed=0,1,2", *ON_NODE,
               f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = sorted(sweep.rglob("results.csv"))
    assert len(found) == 3 and sorted(pd.read_csv(p).seed[0] for p in found) == [0, 1, 2]
    # Each ran as a SLURM job (submitit's log of it is under the sweep folder).
    assert len(list((sweep / ".submitit").glob("*/*_log.out"))) == 3

    failing = tmp_path / "failing"
    proc = rtl(cluster, "train", "-m", *TINY_DATA, "model=cbr_small,lite0_t2", "train.epochs=1", *ON_NODE,
               f"hydra.sweep.dir={failing}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    text = proc.stderr[proc.stderr.index("rtl: error:"):]
    assert "1 of 2 run(s) of the sweep did not finish" in text and "needs images of at least 121 px" in text, text


def test_a_job_requeued_mid_training_resumes_and_ends_as_an_uninterrupted_run(cluster, tmp_path):
    from conftest import compose_cfg
    from rethink_tl.train import run

    settings = [*TINY_DATA, "model=lite0_t2", "train.epochs=6", "data.num_samples=600"]
    reference = run(compose_cfg([*settings, "runtime.threads=1"]), tmp_path / "reference")

    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([RTL, "train", "-m", *settings, *ON_NODE, f"hydra.sweep.dir={sweep}"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster)
    deadline = time.time() + 600
    while not list(sweep.rglob("last.pt")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    (job,) = slurm(cluster, "squeue", "-h", "-o", "%A").split()
    # What SLURM sends before a job's time limit (--signal) and submitit turns into a requeue: USR2.
    slurm(cluster, "scancel", "--signal=USR2", job)
    deadline = time.time() + 300
    while slurm(cluster, "squeue", "-h", "-j", job, "-o", "%T") != "PENDING":
        assert time.time() < deadline, slurm(cluster, "squeue", "-j", job)
        time.sleep(0.2)
    # Release it (or wait out SLURM's hold of the requeue), but not within the second of the requeue: slurmd
    # revoked the job's old credential then, at one-second resolution, and a relaunch in that second is killed
    # as "non-startable: Job credential revoked" (slurmctld.log of a run under load).
    time.sleep(2.5)
    slurm(cluster, "scontrol", "update", f"JobId={job}", "StartTime=now")
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    (run_dir,) = [p.parent for p in sweep.rglob("results.csv")]
    (record,) = sweep.glob(".rtl_jobs/*/*.json")
    assert json.loads(record.read_text())["status"] == "finished"
    # The run's own log (both attempts append to it) and submitit's: cut mid-run, requeued, on from last.pt.
    log = (run_dir / "cli.log").read_text()
    assert "stopped by SIGUSR2 at epoch" in log and "state saved to" in log, log[-3000:]
    assert "Requeued job" in log and log.index("Requeued job") < log.index("resuming from"), log[-3000:]
    got = pd.read_csv(run_dir / "results.csv").iloc[0]
    for key in ("best_epoch", "val_auroc", "val_auprc", "test_auroc", "test_auprc"):
        assert got[key] == reference[key], key
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics.epoch.tolist() == list(range(1, 7))  # every epoch once
    ref = pd.read_csv(tmp_path / "reference" / "metrics.csv")
    pd.testing.assert_frame_equal(metrics.drop(columns=["seconds"]), ref.drop(columns=["seconds"]))
