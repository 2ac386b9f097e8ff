"""Bad data through ``rtl train``: one clear message, exit code 2, no traceback, and nothing trained. The refusals
run the command in this process (``rtl_here``: no interpreter start-up each); one real run on a CSV data set with
bad images skipped goes through the installed ``rtl`` command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from datagen import make_chexpert, make_csv

RTL = shutil.which("rtl") or os.path.join(os.path.dirname(sys.executable), "rtl")
TINY = ["model=trunc", "model.cut=1", "data.image_size=32", "train.epochs=1", "train.batch_size=16",
        "runtime.progress=false", "init=random", "runtime.device=cpu"]


def rtl_command(tmp_path, *overrides):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([RTL, "train", *TINY, f"hydra.run.dir={tmp_path / 'run'}", *overrides], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def rtl(rtl_here):
    """``rtl train`` of a tiny run in ``tmp_path/run``, in this process."""
    def call(tmp_path, *overrides):
        return rtl_here("train", *TINY, f"hydra.run.dir={tmp_path / 'run'}", *overrides, cwd=tmp_path)

    return call


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("rtl: error: ")]
    assert len(line) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in line[0], line[0]


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    return make_csv(tmp_path_factory.mktemp("data"), n=40)


def variant(csv, tmp_path, edit):
    """A copy of the CSV (same image folder) changed by ``edit(table)``."""
    table = pd.read_csv(csv, keep_default_na=False)
    table["path"] = [str(csv.parent / p) for p in table["path"]]
    edit(table)
    out = tmp_path / "list.csv"
    table.to_csv(out, index=False)
    return out


def with_bad_images(table, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    table.loc[5, "path"] = str(tmp_path / "gone_a.png")
    table.loc[9, "path"] = str(tmp_path / "gone_b.jpg")
    table.loc[13, "path"] = str(corrupt)


@pytest.mark.slow
def test_missing_and_unreadable_images_are_listed_together(csv, tmp_path, rtl):
    path = variant(csv, tmp_path, lambda t: with_bad_images(t, tmp_path))
    proc = rtl(tmp_path, "data=csv", f"data.csv={path}")
    assert_user_error(proc, "3 of 40 images cannot be used", "gone_a.png (missing)", "gone_b.jpg (missing)",
                      "corrupt.png (unreadable", "data.on_bad_image=skip")
    assert not (tmp_path / "run" / "results.csv").exists()


@pytest.mark.slow
def test_skipping_bad_images_warns_and_trains(csv, tmp_path):
    path = variant(csv, tmp_path, lambda t: with_bad_images(t, tmp_path))
    proc = rtl_command(tmp_path, "data=csv", f"data.csv={path}", "data.on_bad_image=skip", "data.name=hospital")
    assert proc.returncode == 0, proc.stderr
    assert "skipping 3 of 40 images that cannot be used (data.on_bad_image=skip)" in proc.stdout + proc.stderr
    row = pd.read_csv(tmp_path / "run" / "results.csv").iloc[0]
    assert row["dataset"] == "hospital" and row["n_train"] + row["n_val"] + row["n_test"] == 37


@pytest.mark.slow
def test_csv_without_the_needed_columns(csv, tmp_path, rtl):
    proc = rtl(tmp_path, "data=csv", f"data.csv={csv}", "data.labels=[covid,fever]")
    assert_user_error(proc, "has no column 'fever'", "its columns: path, patient_id, date")
    path = variant(csv, tmp_path, lambda t: t.rename(columns={"path": "file"}, inplace=True))
    assert_user_error(rtl(tmp_path, "data=csv", f"data.csv={path}", "data.labels=[covid]"), "no column 'path'")


@pytest.mark.slow
def test_label_values_outside_the_allowed_set_name_the_row(csv, tmp_path, rtl):
    path = variant(csv, tmp_path, lambda t: t.__setitem__("covid", ["2" if i == 3 else v
                                                                     for i, v in enumerate(t["covid"])]))
    proc = rtl(tmp_path, "data=csv", f"data.csv={path}", "data.labels=[covid,opacity]")
    assert_user_error(proc, "label values must be 1, 0, -1 or blank", "row 4 (line 5) covid='2'")


@pytest.mark.slow
def test_empty_split_says_which(csv, tmp_path, rtl):
    proc = rtl(tmp_path, "data=csv", f"data.csv={csv}", "data.cutoff_date=2030-01-01")
    assert_user_error(proc, "the test split is empty", "data.cutoff_date=2030-01-01")


@pytest.mark.slow
def test_fraction_without_positives(csv, tmp_path, rtl):
    path = variant(csv, tmp_path, lambda t: t.__setitem__("rare", [1 if i == 0 else 0 for i in range(len(t))]))
    proc = rtl(tmp_path, "data=csv", f"data.csv={path}", "data.labels=[covid,rare]", "data.fraction=0.1",
               "data.split_seed=3")
    assert_user_error(proc, "data.fraction=0.1", "no positive for rare")


@pytest.mark.slow
def test_chexpert_missing_images(tmp_path, rtl):
    root = make_chexpert(tmp_path / "cx", n_patients=10, n_valid=2)
    for p in sorted(root.glob("train/patient0000[1-3]/study1/view1_frontal.jpg")):
        p.unlink()
    assert_user_error(rtl(tmp_path, "data=chexpert"), "data.root is not set")
    proc = rtl(tmp_path, "data=chexpert", f"data.root={root}")
    # 10 patients, a lateral view for the even ones: 15 images, all of train.csv.
    assert_user_error(proc, "3 of 15 images cannot be used", "patient00001/study1/view1_frontal.jpg (missing)")
