"""``rtl bench-pretrain``: the pretraining input pipeline against a plain torchvision loader, run as a user would."""

import math
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from rethink_tl.bench.pipeline import PIPELINE_COLUMNS

pytestmark = pytest.mark.usefixtures("one_thread")

RTL = shutil.which("rtl") or os.path.join(os.path.dirname(sys.executable), "rtl")

# cbr_tiny needs at least 91 px; one worker, two timed batches of 8 on 48 generated JPEGs.
SMALL = ["model=cbr_tiny", "data.image_size=91", "data.val_resize=104", "recipe.batch_size=8", "bench.images=48",
         "bench.batches=2", "bench.steps=2", "runtime.workers=1", "runtime.device=cpu", "runtime.progress=false"]


def rtl(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RTL_WEIGHTS": str(cwd / "weights")}
    return subprocess.run([RTL, "bench-pretrain", *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
def test_bench_pretrain_writes_one_row_of_positive_rates(tmp_path):
    out = tmp_path / "run"
    proc = rtl(*SMALL, f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "p/n =" in proc.stdout and "(loop)" in proc.stdout
    df = pd.read_csv(out / "bench_pretrain.csv")
    assert len(df) == 1
    row = df.iloc[0]
    assert set(PIPELINE_COLUMNS) <= set(df.columns)
    assert (row["model"], row["image_size"], row["batch_size"], row["workers"]) == ("cbr_tiny", 91, 8, 1)
    assert row["device"].startswith("cpu") and row["precision"] == "fp32"
    for col in PIPELINE_COLUMNS:
        if col not in ("model", "device", "precision"):
            assert math.isfinite(float(row[col])) and float(row[col]) > 0, (col, row[col])
    assert row["train_images"] == 48
    assert row["p_over_n"] == pytest.approx(row["p_img_s"] / row["n_img_s"], rel=1e-6)
    for phase in ("p", "n"):  # the median of the rounds, which ran in turns
        rounds = [float(v) for v in str(row[f"{phase}_rounds"]).split()]
        assert len(rounds) == row["loader_rounds"] == 3
        assert row[f"{phase}_img_s"] == pytest.approx(sorted(rounds)[1], abs=0.06)
    assert row["loop_over_min_p_m"] == pytest.approx(row["loop_img_s"] / min(row["p_img_s"], row["m_img_s"]),
                                                     rel=1e-6)
    # The generated images: ImageNet-like sizes, kept for the next run in the same folder.
    assert 300 < row["jpeg_width_mean"] < 500 and 300 < row["jpeg_height_mean"] < 500
    assert len(list((out / "images" / "train").glob("*/*.JPEG"))) == 48


@pytest.mark.slow
def test_bench_pretrain_on_a_folder_without_train_is_a_user_error(tmp_path, rtl_here):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = rtl_here("bench-pretrain", *SMALL, f"data.root={empty}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                    env={"RTL_WEIGHTS": tmp_path / "weights"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rtl: error:"), proc.stderr
    assert "train/" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bench_pretrain_keys_are_typed(tmp_path):
    proc = rtl("bench.images=abc", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("rtl: error:") and "bench.images" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
