"""The installed ``rtl`` command, run as a user would: in a subprocess, from an unrelated folder."""

import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import TINY, TINY_DATA

RTL = shutil.which("rtl") or os.path.join(os.path.dirname(sys.executable), "rtl")


def rtl(*args, cwd, env=None):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([RTL, *args], cwd=cwd, capture_output=True, text=True, env=full_env, timeout=600)


def assert_user_error(proc, *fragments):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def test_prints_composed_config_from_any_folder(tmp_path):
    proc = rtl("train", "--cfg", "job", "model=dens_t1", "init=pretrained", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "name: dens_t1" in proc.stdout and "name: pretrained" in proc.stdout and "lr: 1.0e-05" in proc.stdout


def test_train_run_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    proc = rtl("train", *TINY, "train.epochs=2", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("metrics.csv", "results.csv", "best.pt", "last.pt", "identity.json", "config.yaml"):
        assert (out / name).is_file(), name
    assert len(list(out.glob(".hydra/*/config.yaml"))) == 1  # Hydra's record of this invocation
    assert len(pd.read_csv(out / "metrics.csv")) == 2
    # Nothing is written outside the run directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # Running the same command again finds the finished run and does not train it twice.
    before = (out / "results.csv").read_text()
    proc = rtl("train", *TINY, "train.epochs=2", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0 and (out / "results.csv").read_text() == before


def test_sweep_and_report(tmp_path):
    sweep = tmp_path / "sweep"
    proc = rtl("train", "-m", *TINY, "train.epochs=1", "train.seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = rtl("report", str(sweep), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(summary) == 1 and summary.n[0] == 2
    runs = [pd.read_csv(p) for p in sorted(sweep.rglob("results.csv"))]
    assert summary.test_auprc_mean[0] == pytest.approx((runs[0].test_auprc[0] + runs[1].test_auprc[0]) / 2)
    assert "| synthetic |" in proc.stdout


def test_unknown_model(tmp_path):
    proc = rtl("train", "model=dens_t9", cwd=tmp_path)
    assert_user_error(proc, "dens_t9")
    assert "dens_t1" in proc.stderr  # the choices are listed


def test_unknown_dataset(tmp_path):
    assert_user_error(rtl("train", "data=imagenet", cwd=tmp_path), "imagenet")


def test_image_too_small_for_the_model(tmp_path):
    proc = rtl("train", *TINY_DATA, "model=cbr_large_t", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_user_error(proc, "cbr_large_t", "217")


def test_missing_weights_offline(tmp_path):
    env = {"TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf")}
    proc = rtl("train", *TINY_DATA, "model=dens_t1", "init=pretrained", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path,
               env=env)
    assert_user_error(proc, "densenet121-a639ec97.pth", "init.weights")
    assert not (tmp_path / "r" / "results.csv").exists()


def test_weights_of_the_wrong_shape(tmp_path):
    import torchvision

    bad = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), bad)
    proc = rtl("train", *TINY_DATA, "model=res_t1", "init=pretrained", f"init.weights={bad}",
               f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_user_error(proc, "resnet18.pth")


def test_unknown_command(tmp_path):
    assert_user_error(rtl("fly", cwd=tmp_path), "unknown command 'fly'")


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = rtl("train", *TINY, f"hydra.run.dir={blocker / 'run'}", cwd=tmp_path)
    assert_user_error(proc, "cannot write", "hydra.run.dir")
    assert blocker.read_text() == "not a folder"


def test_a_failing_setting_does_not_cancel_the_rest_of_a_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    # cbr_small refuses 32 px images; trunc runs. The sweep finishes trunc, then reports the failure.
    proc = rtl("train", "-m", *TINY_DATA, "model=cbr_small,trunc", "train.epochs=1", f"hydra.sweep.dir={sweep}",
               cwd=tmp_path)
    assert_user_error(proc, "1 run(s) of the sweep failed", "at least 121 px")
    assert proc.returncode == 2
    assert len(list(sweep.rglob("results.csv"))) == 1
    (error,) = sweep.rglob("error.txt")
    assert "cbr_small" in error.parent.as_posix() and "121 px" in error.read_text()
