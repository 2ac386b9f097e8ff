"""rtl evaluate: a finished tiny run scored on a CSV dataset of PNGs with other label names, on a sweep
folder, and refused inputs; metrics checked against scikit-learn on the written predictions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from conftest import fails_in_one_line, train_tiny
from rethink_tl import cli
from rethink_tl.data.renderer import generate_split
from rethink_tl.inference.finished import finished_below
from rethink_tl.evidence.predictions import read as read_predictions
from rethink_tl.evidence.results import run_dirs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate") / "run"
    train_tiny(out)
    return out


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    """Another hospital's export: 40 PNGs (48 px, so they are resized to the run's 32) listed in a CSV whose
    label columns are named Opacity (the model's opacity), Effusion (unknown to the model) and Normal (all
    0); no nodule column."""
    folder = tmp_path_factory.mktemp("hospital")
    images, y = generate_split(40, 48, seed=11, prevalence=0.4, labels=["opacity", "nodule"])
    rows = []
    for i, img in enumerate(images):
        rel = f"img/{i:02d}.png"
        (folder / "img").mkdir(exist_ok=True)
        Image.fromarray(img[0]).save(folder / rel)
        rows.append({"path": rel, "patient_id": f"p{i // 2}", "Opacity": int(y[i, 0]), "Effusion": int(y[i, 1]),
                     "Normal": 0})
    pd.DataFrame(rows).to_csv(folder / "images.csv", index=False)
    return folder / "images.csv"


def rtl(*args):
    cli.main(["evaluate", *map(str, args), "--device", "cpu"])


def fail(capsys, *args) -> str:
    return fails_in_one_line(capsys, ["evaluate", *args, "--device", "cpu"])


def test_external_scores_are_sklearns_on_the_written_predictions(run, hospital, capsys):
    rtl(run, "data=csv", f"data.csv={hospital}", "--map", "opacity=Opacity", "--name", "hospital")
    out = capsys.readouterr().out
    # The model's nodule is not in the data, the data's Effusion and Normal not in the model: said, not a crash.
    assert "not in hospital: nodule; skipped" in out
    assert "hospital labels the model lacks: Effusion, Normal (not scored)" in out
    where = run / "external" / "hospital"
    assert f"-> {where}" in out and "(all, 40 images)" in out

    row = pd.read_csv(where / "results.csv").iloc[0]
    pred = read_predictions(where / "predictions.csv.gz")
    assert pred.label_names == ["opacity"] and pred.splits() == ["external"]
    sp = pred.split("external")
    assert len(sp) == 40 == row.n_test  # --split all: every image, train + val + test of the CSV's split
    # Truth is the data's Opacity column, matched by image path.
    truth = pd.read_csv(hospital).set_index("path").Opacity
    assert sp.labels[:, 0].tolist() == truth.loc[sp.ids].tolist()
    assert sorted(sp.ids) == sorted(truth.index) and sp.patients is not None
    assert 0 < truth.sum() < 40
    auroc = roc_auc_score(sp.labels[:, 0], sp.probs[:, 0])
    auprc = average_precision_score(sp.labels[:, 0], sp.probs[:, 0])
    assert row.test_auroc == row.test_auroc_opacity == auroc
    assert row.test_auprc == row.test_auprc_opacity == auprc
    assert f"AUROC {auroc:.4f} AUPRC {auprc:.4f}" in out
    assert (row.dataset, row.trained_on, row.split, row.labels_missing, row.label_map) == (
        "hospital", "synthetic", "all", "nodule", "opacity=Opacity")
    source = pd.read_csv(run / "results.csv").iloc[0]
    for col in ("model", "init", "strategy", "fraction", "seed", "setting_id", "params"):
        assert row[col] == source[col], col
    assert not any(c.endswith("_nodule") for c in row.index)
    record = json.loads((where / "external.json").read_text())
    assert record["label_map"] == {"opacity": "Opacity"} and record["labels_missing"] == ["nodule"]
    assert record["data"]["image_size"] == 32 and record["data"]["csv"] == str(hospital)
    # The external folder is a result of the run, not a run: rtl report (run_dirs) does not see it.
    assert run_dirs(run) == [run] and finished_below(run) == [run]

    # The test split only, under another name.
    rtl(run, "data=csv", f"data.csv={hospital}", "--map", "opacity=Opacity", "--name", "hospital_test",
        "--split", "test")
    row_test = pd.read_csv(run / "external" / "hospital_test" / "results.csv").iloc[0]
    assert row_test.split == "test" and 0 < row_test.n_test < 40


def test_same_name_replaces_same_data_and_refuses_other_data(run, hospital, capsys):
    args = [run, "data=csv", f"data.csv={hospital}", "--map", "opacity=Opacity", "--name", "again"]
    rtl(*args)
    rtl(*args)  # the same data again: replaced
    capsys.readouterr()
    err = fail(capsys, *args, "data.labels=[Opacity]")
    assert "again holds an evaluation on other data" in err and "data.labels" in err and "--force" in err
    rtl(*args, "data.labels=[Opacity]", "--force")
    assert json.loads((run / "external" / "again" / "external.json").read_text())["data"]["labels"] == ["Opacity"]


def test_a_single_class_label_is_nan_and_said(run, hospital, capsys):
    rtl(run, "data=csv", f"data.csv={hospital}", "--map", "opacity=Opacity", "--map", "nodule=Normal",
        "--name", "single")
    out = capsys.readouterr().out
    assert "label nodule has 0 positive(s) among the 40 scored images of single" in out
    row = pd.read_csv(run / "external" / "single" / "results.csv").iloc[0]
    assert np.isnan(row.test_auroc_nodule) and np.isnan(row.test_auprc_nodule)
    assert row.test_auroc == row.test_auroc_opacity  # the macro mean leaves the undefined label out


def test_sweep_folder_builds_the_data_once(tmp_path, monkeypatch, capsys):
    import rethink_tl.inference.evaluate as evaluate_module

    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        train_tiny(sweep / f"s{seed}", f"train.seed={seed}", "train.epochs=1")
    built = []
    real = evaluate_module.build_data
    monkeypatch.setattr(evaluate_module, "build_data", lambda cfg, **kw: built.append(cfg) or real(cfg, **kw))
    rtl(sweep, "data.seed=7", "data.num_samples=40", "data.prevalence=0.4", "--name", "syn7")
    out = capsys.readouterr().out
    assert len(built) == 1
    runs = [sweep / "s0", sweep / "s1"]
    for r in runs:
        assert (r / "external" / "syn7" / "results.csv").is_file()
        assert f"{r}: syn7 (all, 40 images) AUROC" in out
    assert "2 runs evaluated on syn7" in out
    # rtl report sees the two runs and nothing of their external folders.
    assert run_dirs(sweep) == runs and finished_below(sweep) == runs


@pytest.fixture
def no_best(run, tmp_path):
    copy = tmp_path / "no_best"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("external"))
    (copy / "best.pt").unlink()
    return copy


@pytest.mark.parametrize("args, fragment", [
    (["{tmp}/nowhere"], "nowhere is not a directory"),
    (["{no_best}"], "has no best.pt"),
    (["{run}", "data=csv", "data.csv={csv}", "--map", "tumour=Opacity"], "the model has no label 'tumour' (its "
     "labels: opacity, nodule)"),
    (["{run}", "data=csv", "data.csv={csv}", "--map", "opacity=Haze"], "has no label 'Haze' (its labels: "
     "Opacity, Effusion, Normal)"),
    (["{run}", "data=csv", "data.csv={csv}", "--map", "opacity"], "write --map MODEL_LABEL=DATA_LABEL"),
    (["{run}", "data=csv", "data.csv={csv}", "data.labels=[Effusion]"], "no label of the model (opacity, nodule)"),
    (["{run}", "data=csv", "data.csv={csv}", "data.colour=3"], "data.colour"),
    (["{run}", "train.lr=0.1"], "takes overrides of the data group only"),
    (["{run}", "data.image_size=64"], "the run was trained at 32 px"),
    (["{run}", "data.seed=1,2"], "one value per key"),
    (["{run}", "data.seed=3", "--name", "../up"], "cannot name a folder"),
    (["{run}"], "needs the external data"),
    (["{run}", "data=synthetic", "data.num_samples=4000"], "is the dataset the run was trained and tested on"),
    # Opacity=Normal: a column of zeros, nothing to validate; nothing is written.
    (["{run}", "data=csv", "data.csv={csv}", "--map", "opacity=Normal", "data.labels=[Normal]", "--name", "none"],
     "no label scored on none has both positive and negative images"),
])
def test_bad_input_is_one_line_and_exit_2(args, fragment, run, hospital, no_best, tmp_path, capsys):
    filled = [a.format(tmp=tmp_path, run=run, csv=hospital, no_best=no_best) for a in args]
    assert fragment in fail(capsys, *filled)
    assert not (run / "external" / "synthetic").exists() and not (run / "external" / "none").exists()


@pytest.mark.slow
def test_installed_command_fails_cleanly(run, tmp_path):
    rtl_cmd = shutil.which("rtl") or os.path.join(os.path.dirname(sys.executable), "rtl")
    proc = subprocess.run([rtl_cmd, "evaluate", str(run), "model=dens_f"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rtl: error: model=dens_f:"), proc.stderr
