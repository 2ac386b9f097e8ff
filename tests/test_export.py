"""rtl export: the exported file scores like best.pt (three kinds of model, ONNX and TorchScript), its
preprocessing spec alone gives the run's test AUROC / AUPRC back, the model card holds the run's numbers, and bad
input is one line, exit 2, nothing left behind."""

from __future__ import annotations

import dataclasses
import errno
import gzip
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn

from conftest import TINY_DATA, compose_cfg, fails_in_one_line
from datagen import write_image
from rethink_tl import atomic_io
from rethink_tl.cli import main
from rethink_tl.inference import export
from rethink_tl.inference.evaluate import evaluate_runs
from rethink_tl.inference.finished import load_run
from rethink_tl.train import run as train

try:
    import onnxruntime as ort
except ImportError:  # the export extra is missing: the TorchScript and bad-input tests still run
    ort = None

pytestmark = pytest.mark.usefixtures("one_thread")
needs_onnx = pytest.mark.skipif(ort is None, reason="--format onnx needs pip install 'rethink-tl[export]'")

# One tiny run per kind of model: a cut timm net, a cut DenseNet, a CBR net (91 px is cbr_tiny's smallest input).
KINDS = {
    "trunc": ["model=trunc", "model.cut=1"],
    "dens_t1": ["model=dens_t1", "train.epochs=1"],
    "cbr_tiny": ["model=cbr_tiny", "data.image_size=96", "data.num_samples=120", "train.epochs=1"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("export_runs")
    for name, extra in KINDS.items():
        train(compose_cfg(TINY_DATA + extra), base / name)
    return base


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    """A run on image files (8- and 16-bit PNG, JPEG; portrait and landscape, so the crop matters), two images per
    patient, ``opacity`` with uncertain cells (-1, left out with data.uncertain=ignore) and blank ones (negative):
    the spec must carry decoding and geometry, the card the patients and the unknowns."""
    folder = tmp_path_factory.mktemp("export_csv")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(120):
        kind = ("png8", "png16", "jpeg")[i % 3]
        rel = f"img/{i:03d}.{'jpg' if kind == 'jpeg' else 'png'}"
        write_image(folder / rel, kind, 36 + (i % 4) * 9, 40 + (i % 3) * 11, i)
        rows.append({"path": rel, "patient_id": f"p{i // 2:02d}", "covid": int(rng.random() < 0.4),
                     "opacity": ("1", "0", "", "-1")[int(rng.integers(4))]})
    pd.DataFrame(rows).to_csv(folder / "images.csv", index=False)
    run_dir = folder / "run"
    settings = [s for s in TINY_DATA if not s.startswith("data.")]  # the rest are the synthetic data's keys
    train(compose_cfg(settings + ["model=trunc", "model.cut=1", "data=csv", f"data.csv={folder / 'images.csv'}",
                                  "data.image_size=32", "data.cache=false", "data.name=films",
                                  "data.uncertain=ignore"]), run_dir)
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("last.pt", "export"))
    return copy


def _row(run_dir: Path) -> dict:
    # setting_id is text: an id of digits only ("00273019") must not be read as a number.
    return pd.read_csv(run_dir / "results.csv", dtype={"setting_id": str}).iloc[0].to_dict()


def _test_predictions(run_dir: Path) -> pd.DataFrame:
    with gzip.open(run_dir / "predictions.csv.gz", "rt") as fh:
        df = pd.read_csv(fh, dtype={"id": str, "patient": str}, keep_default_na=False)
    return df


def _listing(*roots: Path) -> list[str]:
    return sorted(str(p) for root in roots for p in Path(root).rglob("*"))


def _jit_load(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 calls torch.jit deprecated
        return torch.jit.load(str(path))


def _exported(run_dir: Path, fmt: str = "onnx") -> tuple[Path, dict, str]:
    folder = run_dir / "export" / fmt
    model = folder / ("model.onnx" if fmt == "onnx" else "model.pt")
    spec = json.loads((folder / "model.preprocessing.json").read_text())
    return model, spec, (folder / "MODEL_CARD.md").read_text()


# --- round trips --------------------------------------------------------------------------------------------

@needs_onnx
@pytest.mark.parametrize("kind", list(KINDS))
def test_onnx_scores_like_best_pt_for_every_kind(kind, runs, tmp_path, capsys):
    run_dir = _copy(runs / kind, tmp_path)
    main(["export", str(run_dir)])
    assert "largest probability difference" in capsys.readouterr().out
    model_file, spec, card = _exported(run_dir)
    check = spec["verification"]
    n = int(_row(run_dir)["n_test"])
    assert check["max_abs_diff"] <= 1e-4 and check["images"] == check["test_images"] == n
    assert check["batch_sizes"] == sorted({1, *(min(32, n - i) for i in range(0, n, 32))})
    assert f"{check['max_abs_diff']:.3g}" in card

    # Beyond the test images: new inputs, batch sizes the export never saw, against best.pt loaded by hand.
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == (spec["input"]["name"], spec["output"]["name"])
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == spec["input"]["shape"][1:]  # only the batch is free
    model = load_run(run_dir).model
    size = spec["image_size"]
    for n in (3, 7):
        x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            want = torch.sigmoid(model(x)).numpy()
        got = session.run(None, {inp.name: x.numpy()})[0]
        assert got.shape == (n, 2) and np.abs(got - want).max() <= 1e-4


def test_torchscript_scores_like_best_pt(runs, tmp_path):
    run_dir = _copy(runs / "dens_t1", tmp_path)
    main(["export", str(run_dir), "--format", "torchscript"])
    model_file, spec, card = _exported(run_dir, "torchscript")
    assert spec["model_format"] == "torchscript" and spec["verification"]["max_abs_diff"] <= 1e-4
    assert "TorchScript" in card and "torch.jit.trace" in card
    loaded = _jit_load(model_file)
    model = load_run(run_dir).model
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded(x) - torch.sigmoid(model(x))).abs().max() <= 1e-4


@needs_onnx
def test_the_spec_alone_gives_the_runs_test_metrics(csv_run, tmp_path):
    """Decode the run's test files with Pillow and numpy as the JSON says (no rtl code), score them with
    onnxruntime: sklearn's AUROC / AUPRC equal results.csv's."""
    run_dir = _copy(csv_run, tmp_path)
    main(["export", str(run_dir), "--out", str(tmp_path / "films.onnx")])
    spec = json.loads((tmp_path / "films.preprocessing.json").read_text())
    assert spec["geometry"]["resize"] == "crop" and spec["decode"]["channels"] == 1
    assert spec["channels"]["input_channels"] == 3 and spec["decode"]["rescale16"] == "minmax"

    def preprocess(path: Path) -> np.ndarray:
        size = spec["image_size"]
        with Image.open(path) as img:
            img.draft("L", (size, size))
            img.load()
            img = ImageOps.exif_transpose(img)
            a = np.asarray(img)
            if a.dtype != np.uint8:  # samples wider than 8 bits: the image's own min..max onto 0..255
                a = a.astype(np.float32)
                a = np.clip(np.rint((a - a.min()) * (255.0 / (a.max() - a.min()))), 0, 255).astype(np.uint8)
                img = Image.fromarray(a)
            img = img.convert("L")
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
        x = np.asarray(img, np.float32)[None] / np.float32(spec["scaling"]["divide_by"])
        x = np.repeat(x, spec["channels"]["input_channels"], axis=0)
        mean = np.asarray(spec["normalisation"]["mean"], np.float32)[:, None, None]
        std = np.asarray(spec["normalisation"]["std"], np.float32)[:, None, None]
        return (x - mean) / std

    df = _test_predictions(run_dir)
    test = df[df["split"] == "test"].reset_index(drop=True)
    folder = csv_run.parent
    x = np.stack([preprocess(folder / rel) for rel in test["id"]]).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "films.onnx"), providers=["CPUExecutionProvider"])
    probs = session.run(None, {spec["input"]["name"]: x})[0]
    labels = spec["labels"]
    assert labels == ["covid", "opacity"]
    assert np.abs(probs - test[[f"prob_{lab}" for lab in labels]].to_numpy()).max() <= 1e-4
    row = _row(run_dir)
    aurocs, auprcs = [], []
    for j, lab in enumerate(labels):
        keep = test[f"mask_{lab}"].to_numpy() == 1
        y = test[f"true_{lab}"].to_numpy()[keep]
        aurocs.append(roc_auc_score(y, probs[keep, j]))
        auprcs.append(average_precision_score(y, probs[keep, j]))
        assert aurocs[-1] == pytest.approx(row[f"test_auroc_{lab}"], abs=1e-6)
    assert np.mean(aurocs) == pytest.approx(row["test_auroc"], abs=1e-6)
    assert np.mean(auprcs) == pytest.approx(row["test_auprc"], abs=1e-6)


def test_model_card_holds_the_runs_numbers(csv_run, tmp_path):
    run_dir = _copy(csv_run, tmp_path)
    main(["export", str(run_dir), "--format", "torchscript"])
    _, spec, card = _exported(run_dir, "torchscript")
    row = _row(run_dir)
    assert card.count("Not for clinical use") >= 2
    assert f"{row['test_auprc']:.4f}" in card and f"{row['test_auroc']:.4f}" in card
    for lab in ("covid", "opacity"):
        line = next(ln for ln in card.splitlines() if ln.startswith(f"| {lab} | {row[f'test_auroc_{lab}']:.4f} ["))
        assert f"| {row[f'test_auprc_{lab}']:.4f} [" in line
    assert "outputs: 2 sigmoid probabilities, in this order: covid, opacity" in card
    # Class counts, worked out from the CSV and the run's predictions file: val and test as kept there, train
    # as the rest of the CSV (data.fraction=1).
    table = pd.read_csv(csv_run.parent / "images.csv", dtype={"opacity": str}, keep_default_na=False)
    df = _test_predictions(run_dir)
    for lab in ("covid", "opacity"):
        cells = table[lab].astype(str)
        totals = {"pos": int((cells == "1").sum()), "neg": int(cells.isin(["0", ""]).sum()),
                  "unk": int((cells == "-1").sum()), "n": len(table)}
        for split in ("val", "test"):
            part = df[df["split"] == split]
            pos = int(((part[f"true_{lab}"] == 1) & (part[f"mask_{lab}"] == 1)).sum())
            neg = int(((part[f"true_{lab}"] == 0) & (part[f"mask_{lab}"] == 1)).sum())
            unk = int((part[f"mask_{lab}"] == 0).sum())
            assert f"| {split} | {lab} | {len(part)} | {pos} | {neg} | {unk} |" in card
            totals = {"pos": totals["pos"] - pos, "neg": totals["neg"] - neg, "unk": totals["unk"] - unk,
                      "n": totals["n"] - len(part)}
        assert f"| train | {lab} | {totals['n']} | {totals['pos']} | {totals['neg']} | {totals['unk']} |" in card
    test_patients = df.loc[df["split"] == "test", "patient"].nunique()
    assert f"({test_patients} test patients)" in card and f"over the {test_patients} patients of the test split" in card
    assert "data=csv (data.csv=" in card and row["split_rule"] in card
    assert spec["run"]["setting_id"] == row["setting_id"] and spec["labels"] == ["covid", "opacity"]


def test_the_interval_is_rtl_reports(runs, tmp_path):
    """The card's macro interval is evidence.stats.bootstrap's on the run's test predictions, as rtl report
    computes it (patients where known; here images)."""
    from rethink_tl.evidence.predictions import read
    from rethink_tl.evidence.stats import Holdout, Scored, bootstrap

    run_dir = _copy(runs / "trunc", tmp_path)
    main(["export", str(run_dir), "--format", "torchscript"])
    _, _, card = _exported(run_dir, "torchscript")
    sp = read(run_dir / "predictions.csv.gz").split("test")
    holdout = Holdout.of(sp.labels, sp.mask, ["opacity", "nodule"], sp.patients)
    auroc, auprc = bootstrap(holdout, [Scored("x", {0: sp.probs})], [("mean", "auroc", 0), ("mean", "auprc", 0)])
    assert (f"| macro (mean over labels) | {auroc.estimate:.4f} [{auroc.low:.4f}, {auroc.high:.4f}] | "
            f"{auprc.estimate:.4f} [{auprc.low:.4f}, {auprc.high:.4f}] |") in card
    assert "over the 60 images of the test split" in card


def test_external_results_go_into_the_card(runs, tmp_path, capsys):
    run_dir = _copy(runs / "trunc", tmp_path)
    evaluate_runs(str(run_dir), ["data=synthetic", "data.seed=7", "data.num_samples=120"], label_map=[],
                  name="other_site", device="cpu", argv=[])
    ext = pd.read_csv(run_dir / "external" / "other_site" / "results.csv").iloc[0]
    main(["export", str(run_dir), "--format", "torchscript"])
    _, _, card = _exported(run_dir, "torchscript")
    section = card.split("## External results")[1].split("## This file")[0]
    assert "### other_site" in section and "data=synthetic, data.seed=7" in section
    assert f"{ext['test_auroc']:.4f} [" in section and f"{ext['test_auprc_nodule']:.4f} [" in section
    assert f"{int(ext['n_test'])} images" in section
    # Results of a checkpoint the run has replaced since are left out, and said.
    results = run_dir / "external" / "other_site" / "results.csv"
    pd.read_csv(results).assign(source_finished="2020-01-01T00:00:00+00:00").to_csv(results, index=False)
    main(["export", str(run_dir), "--format", "torchscript", "--force"])
    section = _exported(run_dir, "torchscript")[2].split("## External results")[1].split("## This file")[0]
    assert "### other_site" not in section and "external/other_site: left out" in section
    assert "None for this checkpoint" in section


# --- the spec follows the model's ModelInfo ------------------------------------------------------------------

def _with_info(monkeypatch, change):
    """rtl export sees the run's model changed by ``change(model)`` (another ModelInfo, another stem)."""
    real = export.one_run

    def changed(path, command):
        run = real(path, command)
        change(run.model)
        return run

    monkeypatch.setattr(export, "one_run", changed)


def test_the_spec_follows_model_info(runs, tmp_path, monkeypatch):
    """Mean, std and channel count come from the model's ModelInfo: a model with other statistics is exported with
    them, and the check of the spec against rtl's own pipeline (engine.Batcher) passes with them."""
    run_dir = _copy(runs / "trunc", tmp_path)

    def other_statistics(model):
        model.info = dataclasses.replace(model.info, mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))

    _with_info(monkeypatch, other_statistics)
    monkeypatch.setattr(export, "RECORDED_TOLERANCE", float("inf"))  # other statistics: other probabilities
    main(["export", str(run_dir), "--format", "torchscript"])
    _, spec, card = _exported(run_dir, "torchscript")
    assert spec["normalisation"] == {"mean": [0.1, 0.2, 0.3], "std": [0.3, 0.2, 0.1],
                                     "rule": "(x - mean[c]) / std[c] per input channel c"}
    assert spec["verification"]["spec_vs_rtl_pipeline"] <= 1e-5
    assert "mean [0.1, 0.2, 0.3], std [0.3, 0.2, 0.1]" in card


@needs_onnx
def test_a_one_channel_model_is_exported_with_one_channel(runs, tmp_path, monkeypatch):
    """A chest-X-ray style model (ModelInfo.in_chans = 1, its own mean and std; here Dens-T1 with a grey stem):
    the file takes one channel, the spec says so, and both agree with best.pt and with engine.Batcher."""
    run_dir = _copy(runs / "dens_t1", tmp_path)

    def grey(model):
        torch.manual_seed(0)
        model.trunk.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        model.info = dataclasses.replace(model.info, in_chans=1, mean=(0.45,), std=(0.25,))

    _with_info(monkeypatch, grey)
    monkeypatch.setattr(export, "RECORDED_TOLERANCE", float("inf"))  # a new stem: other probabilities
    main(["export", str(run_dir)])
    model_file, spec, card = _exported(run_dir)
    assert spec["input"]["shape"] == ["N", 1, 32, 32] and spec["channels"]["input_channels"] == 1
    assert spec["normalisation"]["mean"] == [0.45] and spec["normalisation"]["std"] == [0.25]
    assert spec["channels"]["grey_images"] == "its grey level in the one input channel"
    assert spec["verification"]["max_abs_diff"] <= 1e-4 and spec["verification"]["spec_vs_rtl_pipeline"] <= 1e-5
    assert "float32 (N, 1, 32, 32)" in card
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [1, 32, 32]
    grey_images = np.full((2, 1, 32, 32), 153, np.uint8)
    x = export.apply_spec(spec, grey_images)
    assert x.shape == (2, 1, 32, 32) and np.allclose(x, (0.6 - 0.45) / 0.25)
    assert session.run(None, {"image": x})[0].shape == (2, 2)


@pytest.mark.parametrize("stored,channels", [(1, 3), (3, 3), (1, 1), (3, 1)])
def test_the_spec_does_what_the_batcher_does(stored, channels):
    """Every pairing of stored and input channels: apply_spec (what the JSON says) equals engine.Batcher."""
    from rethink_tl.engine import Batcher

    mean, std = (0.5, 0.4, 0.3)[:channels], (0.2, 0.25, 0.3)[:channels]
    info = SimpleNamespace(mean=mean, std=std, in_chans=channels)
    spec = {"scaling": {"divide_by": 255.0}, "channels": {"input_channels": channels},
            "normalisation": {"mean": list(mean), "std": list(std)}}
    images = torch.from_numpy(np.random.default_rng(stored).integers(0, 256, (4, stored, 8, 8), dtype=np.uint8))
    want = Batcher.for_model(info, torch.device("cpu"), channels_last=False)(images).numpy()
    assert np.abs(export.apply_spec(spec, images.numpy()) - want).max() <= 1e-5
    grey, colour = export.channel_rules(stored, channels)
    assert ("one input channel" in grey) == (channels == 1)
    assert ("mean of R, G and B" in colour) == (stored == 3 and channels == 1)


@needs_onnx
def test_onnx_falls_back_to_the_torchscript_exporter():
    """A model torch.export cannot trace (a Python branch on a tensor's value) is exported by the older exporter."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)

        def forward(self, x):
            y = self.conv(x).mean((2, 3))
            if y.sum() > -1e9:
                y = y + 1
            return torch.sigmoid(y)

    model = Branchy().eval()
    data, how = export.onnx_bytes(model, torch.randn(2, 3, 8, 8))
    assert "dynamo=False" in how and "torch.export failed" in how
    x = torch.randn(5, 3, 8, 8)
    got = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - model(x).numpy()).max() <= 1e-6


# --- bad input ---------------------------------------------------------------------------------------------------

@pytest.fixture
def run_copy(runs, tmp_path):
    return _copy(runs / "trunc", tmp_path)


def _refused(capsys, argv, *roots) -> str:
    before = _listing(*roots)
    message = fails_in_one_line(capsys, ["export", *map(str, argv)])
    assert _listing(*roots) == before
    return message


def test_not_a_finished_run_is_refused(run_copy, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not an rtl train run" in _refused(capsys, [empty], tmp_path)
    assert "is not a directory" in _refused(capsys, [tmp_path / "nowhere"], tmp_path)
    killed = tmp_path / "killed"  # stopped in the middle of training: identity, config, last.pt, no results
    shutil.copytree(run_copy, killed)
    (killed / "results.csv").unlink()
    (killed / "best.pt").unlink()
    assert "not finished (no results.csv)" in _refused(capsys, [killed], tmp_path)
    assert "sweep folder with" in _refused(capsys, [tmp_path], tmp_path)
    changed = tmp_path / "changed"  # its config no longer gives its data
    shutil.copytree(run_copy, changed)
    config = changed / "config.yaml"
    kept = config.read_text()
    config.write_text(kept.replace("prevalence: 0.3\n", "prevalence: 0.4\n", 1))
    assert "changed since the run" in _refused(capsys, [changed], tmp_path)
    config.write_text(kept)
    (changed / "predictions.csv.gz").write_bytes(b"\x1f\x8b not gzip")
    assert "predictions.csv.gz is damaged" in _refused(capsys, [changed], tmp_path)
    (run_copy / "best.pt").write_bytes((run_copy / "best.pt").read_bytes()[:500])
    assert "best.pt is damaged" in _refused(capsys, [run_copy], tmp_path)
    (run_copy / "best.pt").unlink()
    assert "has no best.pt" in _refused(capsys, [run_copy], tmp_path)


def test_bad_options_are_refused(run_copy, tmp_path, capsys):
    message = _refused(capsys, [run_copy, "--format", "keras"], tmp_path)
    assert "--format 'keras' is not supported" in message and "onnx, torchscript" in message
    assert "does not exist" in _refused(capsys, [run_copy, "--out", tmp_path / "no" / "m.onnx"], tmp_path)
    assert "is a folder" in _refused(capsys, [run_copy, "--out", tmp_path], tmp_path)
    assert "ends in .onnx" in _refused(capsys, [run_copy, "--format", "torchscript", "--out", tmp_path / "m.onnx"],
                                       tmp_path)
    assert "beside the run's own files" in _refused(capsys, [run_copy, "--format", "torchscript", "--out",
                                                             run_copy / "best.pt", "--force"], tmp_path)
    taken = tmp_path / "m.pt"
    taken.write_text("mine")
    assert "m.pt exists" in _refused(capsys, [run_copy, "--format", "torchscript", "--out", taken], tmp_path)
    main(["export", str(run_copy), "--format", "torchscript", "--out", str(taken), "--force"])
    assert _jit_load(taken)(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
    assert (tmp_path / "m.preprocessing.json").is_file() and (tmp_path / "MODEL_CARD.md").is_file()
    # one card per folder: another model's export there is not paired with this card, not even with --force
    for force in ([], ["--force"]):
        assert "holds another export (m.pt)" in _refused(capsys, [run_copy, "--format", "torchscript", "--out",
                                                                  tmp_path / "n.pt", *force], tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    assert "ends in .pt" in _refused(capsys, [run_copy, "--format", "torchscript", "--out",
                                              other / "MODEL_CARD.md"], other)
    assert "ends in .pt or .pth or .ts" in _refused(capsys, [run_copy, "--format", "torchscript", "--out",
                                                             other / "noext"], other)
    another_run = tmp_path / "another_run"
    another_run.mkdir()
    (another_run / "results.csv").write_text("x\n1\n")
    assert "is an rtl run's folder (it holds results.csv)" in _refused(
        capsys, [run_copy, "--format", "torchscript", "--out", another_run / "best.pt", "--force"], another_run)


def test_changed_images_are_refused(run_copy, tmp_path, capsys):
    """The data fingerprint covers ids and labels, not pixels: best.pt scoring the test images away from the run's
    recorded probabilities means other inputs, and the card would state numbers that are not theirs."""
    cfg = (run_copy / "config.yaml").read_text()
    (run_copy / "config.yaml").write_text(cfg.replace("image_size: 32", "image_size: 48"))
    message = _refused(capsys, [run_copy], tmp_path)
    assert "away from the probabilities the run recorded" in message and "config.yaml changed" in message


def test_a_truncated_best_pt_is_named_damaged(run_copy, tmp_path, capsys):
    best = run_copy / "best.pt"
    best.write_bytes(best.read_bytes()[:5000])
    message = _refused(capsys, [run_copy], tmp_path)
    assert "best.pt is damaged or incomplete" in message and "cannot write" not in message


def test_a_forced_retrain_removes_the_old_export(run_copy):
    main(["export", str(run_copy), "--format", "torchscript"])
    assert (run_copy / "export" / "torchscript" / "MODEL_CARD.md").is_file()
    train(compose_cfg(TINY_DATA + KINDS["trunc"] + ["runtime.force=true"]), run_copy)
    assert not (run_copy / "export").exists()


def test_missing_onnx_packages_name_the_extra(run_copy, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    message = _refused(capsys, [run_copy], tmp_path)
    assert "needs onnxruntime, which is not installed" in message and "pip install 'rethink-tl[export]'" in message


def test_a_full_disk_leaves_nothing(run_copy, tmp_path, capsys, monkeypatch):
    calls = []

    def second_write_fails(fd):  # the first file is staged, the second does not fit
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_io.os, "fsync", second_write_fails)
    assert "No space left on device" in _refused(capsys, [run_copy, "--format", "torchscript"], tmp_path)
    assert len(calls) == 2 and not (run_copy / "export").exists()


def test_a_large_test_split_is_checked_on_its_first_images(run_copy, monkeypatch):
    monkeypatch.setattr(export, "MAX_CHECK", 10)
    done = export.export_run(str(run_copy), "torchscript")
    assert (done.verification.images, done.verification.of, done.verification.batch_sizes) == (10, 60, [1, 10])
    card = done.files.card.read_text()
    assert "the first 10 of the 60 test images (at most 10 are scored)" in card
    assert json.loads(done.files.spec.read_text())["verification"]["images"] == 10


@needs_onnx
def test_an_export_that_differs_is_refused(run_copy, tmp_path, capsys, monkeypatch):
    real = export.runner
    monkeypatch.setattr(export, "runner", lambda fmt, data: (lambda x: real(fmt, data)(x) + 2e-4))
    message = _refused(capsys, [run_copy], tmp_path)
    assert "differs from best.pt by 2.00e-04" in message and "nothing was written" in message


@needs_onnx
@pytest.mark.slow
def test_installed_command(run_copy, tmp_path):
    rtl = shutil.which("rtl") or os.path.join(os.path.dirname(sys.executable), "rtl")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([rtl, "export", str(run_copy)], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {run_copy / 'export' / 'onnx' / 'model.onnx'}") and done.stderr == ""
    bad = subprocess.run([rtl, "export", str(run_copy), "--out", str(tmp_path / "x" / "m.onnx")], capture_output=True,
                         text=True, timeout=300, env=env, cwd=tmp_path)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("rtl: error: "), bad.stderr
