"""Issue 9's examples, as a user would meet them through the installed ``rtl``: a run, a sweep, a resume or
a forced rerun does exactly what was asked, or it stops with one message (exit 2, no traceback) and
nothing already written is lost."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from filelock import FileLock

from conftest import TINY

RTL = shutil.which("rtl") or os.path.join(os.path.dirname(sys.executable), "rtl")
ONE = [*TINY, "train.epochs=1"]


def rtl(*args, cwd, umask=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([RTL, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def error_line(proc) -> str:
    """The one ``rtl: error:`` line of a user error (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("rtl: error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != ".rtl.lock"}


@pytest.mark.slow
def test_a_sweep_over_any_key_gives_each_value_its_own_run(tmp_path):
    sweep = tmp_path / "sweep"
    proc = rtl("train", "-m", *ONE, "train.lr=1e-3,1e-2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = sorted(sweep.rglob("results.csv"))
    assert len(results) == 2, results
    lrs = sorted(float(pd.read_csv(p).lr[0]) for p in results)
    assert lrs == [1e-3, 1e-2]
    # One readable prefix, two settings: the hash part of the directory names differs.
    assert len({p.parent.name for p in results}) == 2
    # 1 and 1.0 are one setting, in one directory.
    again = rtl("train", "-m", *ONE, "train.lr=1e-3", "data.fraction=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert again.returncode == 0 and "skipping" in again.stdout + again.stderr, again.stderr
    assert len(sorted(sweep.rglob("results.csv"))) == 2


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch run, copied fresh into each test that changes it."""
    base = tmp_path_factory.mktemp("finished")
    proc = rtl("train", *TINY, "train.epochs=2", f"hydra.run.dir={base / 'run'}", cwd=base)
    assert proc.returncode == 0, proc.stderr
    return base / "run"


def copy_of(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


@pytest.mark.slow
def test_resume_with_changed_settings_is_refused_and_nothing_is_recorded(finished, tmp_path, rtl_here):
    run = copy_of(finished, tmp_path)
    (run / "results.csv").unlink()  # as if killed after epoch 2: last.pt is there to resume from
    before = snapshot(run)
    proc = rtl_here("train", *TINY, "train.epochs=2", "train.lr=1e-2", "train.batch_size=4", f"hydra.run.dir={run}",
                    cwd=tmp_path)
    line = error_line(proc)
    assert "holds a run with other settings" in line and "runtime.force=true" in line
    assert "train.batch_size: 16 -> 4" in line and "train.lr: 0.001 -> 0.01" in line
    after = snapshot(run)
    # Only Hydra's record of this invocation is added (a folder of its own) and its log appended to.
    assert {k: v for k, v in after.items() if k.parts[0] != ".hydra" and k.suffix != ".log"} == \
        {k: v for k, v in before.items() if k.parts[0] != ".hydra" and k.suffix != ".log"}
    assert all(after[k] == v for k, v in before.items() if k.parts[0] == ".hydra")
    assert not (run / "results.csv").exists()


@pytest.mark.slow
def test_force_with_a_typo_or_missing_data_leaves_the_finished_run_intact(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    before = {k: v for k, v in snapshot(run).items() if k.parts[0] != ".hydra" and k.suffix != ".log"}
    typo = rtl("train", *TINY, "train.force=true", "train.epochs=2O", f"hydra.run.dir={run}", cwd=tmp_path)
    assert "train.epochs" in error_line(typo)
    missing = rtl("train", *TINY, "train.epochs=2", "runtime.force=true", "data.test_share=0.3",
                  "init=pretrained", f"init.weights={tmp_path / 'nope.pth'}", f"hydra.run.dir={run}", cwd=tmp_path)
    assert "nope.pth" in error_line(missing)
    assert {k: v for k, v in snapshot(run).items() if k.parts[0] != ".hydra" and k.suffix != ".log"} == before


@pytest.mark.parametrize("override, key", [
    ("train.epochs=abc", "train.epochs"), ("data.image_size=abc", "data.image_size"),
    ("train.batch_size=0", "train.batch_size"), ("train.batch_size=-4", "train.batch_size"),
    ("train.lr=-0.01", "train.lr"), ("train.epochs=0", "train.epochs"), ("+train.lr_rate=1", "train.lr_rate"),
    ("runtime.amp=fp8", "runtime.amp"), ("data.fraction=1.5", "data.fraction"), ("init=imagenet", "init"),
    ("train.lr=nan", "train.lr"), ("train.weight_decay=inf", "train.weight_decay"), ("train.lr=1e308", "train.lr"),
    ("train.seed=4294967296", "train.seed"), ("data.kind=csv", "data.kind"), ("model.tag=${oops}", "oops"),
    ("runtime.threads=100000", "runtime.threads"), ("model.cut=null", "model.cut"), ("+foo=1", "foo"),
])
@pytest.mark.slow
def test_bad_values_are_one_line_naming_the_key(tmp_path, override, key, rtl_here):
    proc = rtl_here("train", *ONE, override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert key in error_line(proc)
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.slow
def test_a_bad_value_inside_a_sweep_fails_that_run_and_the_sweep_at_the_end(tmp_path):
    sweep = tmp_path / "sweep"
    proc = rtl("train", "-m", *ONE, "train.lr=-0.01,1e-3,nan", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    line = error_line(proc)
    assert "2 of 3 run(s) of the sweep did not finish" in line
    assert len(list(sweep.rglob("results.csv"))) == 1
    errors = sorted(p.read_text() for p in sweep.rglob("error.txt"))
    assert len(errors) == 2 and "train.lr=-0.01 is out of range" in errors[0] and "train.lr=nan" in errors[1]


@pytest.mark.slow
def test_a_sweep_job_sent_into_another_runs_folder_writes_nothing_there(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    before = {k: v for k, v in snapshot(run).items() if k.parts[0] != ".hydra" and k.suffix != ".log"}
    proc = rtl("train", "-m", *TINY, "train.epochs=2", "train.lr=1e-2", f"hydra.sweep.dir={run.parent}",
               f"hydra.sweep.subdir={run.name}", cwd=tmp_path)
    assert "1 of 1 run(s) of the sweep did not finish" in error_line(proc)
    assert {k: v for k, v in snapshot(run).items() if k.parts[0] != ".hydra" and k.suffix != ".log"} == before
    assert not (run / "error.txt").exists()


@pytest.mark.slow
def test_mixed_precision_is_part_of_a_runs_identity(tmp_path):
    sweep = tmp_path / "sweep"
    proc = rtl("train", "-m", *ONE, "runtime.amp=off,bf16", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(pd.read_csv(p).precision[0] for p in sweep.rglob("results.csv")) == ["bf16", "fp32"]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["empty", "garbage"])
def test_a_damaged_results_file_of_a_finished_run_is_named(finished, tmp_path, damage, rtl_here):
    run = copy_of(finished, tmp_path)
    (run / "results.csv").write_bytes(b"" if damage == "empty" else b"\x00\xff garbage")
    line = error_line(rtl_here("train", *TINY, "train.epochs=2", f"hydra.run.dir={run}", cwd=tmp_path))
    assert "results.csv" in line and "runtime.force=true" in line


@pytest.mark.slow
def test_a_damaged_last_checkpoint_is_named_with_the_fix(finished, tmp_path, rtl_here):
    run = copy_of(finished, tmp_path)
    (run / "results.csv").unlink()
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 3])
    line = error_line(rtl_here("train", *TINY, "train.epochs=2", f"hydra.run.dir={run}", cwd=tmp_path))
    assert f"{run / 'last.pt'} is damaged or incomplete" in line and "delete it to start this run over" in line


@pytest.mark.slow
def test_a_label_without_training_positives_stops_before_epoch_1(tmp_path, rtl_here):
    run = tmp_path / "run"
    proc = rtl_here("train", *ONE, "data.prevalence=0.0001", "data.test_prevalence=0.3", f"hydra.run.dir={run}",
                    cwd=tmp_path)
    line = error_line(proc)
    assert "has 0 positive(s)" in line and "train split" in line
    assert not (run / "metrics.csv").exists() and not (run / "last.pt").exists()


@pytest.mark.slow
def test_a_second_process_on_the_same_run_directory_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with FileLock(str(run / ".rtl.lock")):  # as a first rtl process holds it while it trains
        line = error_line(rtl("train", *ONE, f"hydra.run.dir={run}", cwd=tmp_path))
    assert "another rtl process is training in" in line
    assert not (run / "metrics.csv").exists()


@pytest.mark.slow
def test_result_files_follow_the_umask(tmp_path):
    run = tmp_path / "run"
    proc = rtl("train", *ONE, f"hydra.run.dir={run}", cwd=tmp_path, umask=0o022)
    assert proc.returncode == 0, proc.stderr
    for name in ("results.csv", "metrics.csv", "last.pt", "best.pt", "identity.json", "config.yaml"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare and tmpfs mounts (a private mount namespace)")
def test_a_full_disk_gives_the_message_and_keeps_what_was_written(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    # A 96 KiB tmpfs in a private mount namespace: the config and settings fit, the first checkpoint does not.
    script = (f"mount -t tmpfs -o size=96k tmpfs {disk} && "
              f"{RTL} train {' '.join(ONE)} hydra.run.dir={disk}/run; echo rc=$?; "
              f"ls {disk}/run; cat {disk}/run/identity.json > /dev/null && echo identity-ok")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "rc=2" in proc.stdout, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("rtl: error: ")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "is intact" in lines[0], proc.stderr
    assert "identity-ok" in proc.stdout
    assert ".tmp" not in proc.stdout  # no half-written temporary file left behind


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare and tmpfs mounts (a private mount namespace)")
def test_a_full_disk_under_the_image_cache_gives_the_message(tmp_path):
    from datagen import make_csv

    csv = make_csv(tmp_path / "data", n=40)
    disk = tmp_path / "disk"
    disk.mkdir()
    args = ["model=trunc", "model.cut=1", "data=csv", f"data.csv={csv}", "data.image_size=64", "train.epochs=1",
            "train.batch_size=8", "init=random", "runtime.device=cpu", "runtime.progress=false",
            f"data.cache_dir={disk}/cache", f"hydra.run.dir={tmp_path}/run"]
    # 40 images of 64 x 64 need 160 KiB of cache; the disk has 64 KiB.
    script = f"mount -t tmpfs -o size=64k tmpfs {disk} && {RTL} train {' '.join(args)}; echo rc=$?; ls -a {disk}/cache"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "rc=2" in proc.stdout and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("rtl: error: ")]
    assert len(lines) == 1 and "could not write the image cache" in lines[0], proc.stderr
    assert "No space left on device" in lines[0]
    assert ".tmp-" not in proc.stdout  # the half-built entry is gone
