"""rtl predict: probabilities for a folder or CSV of new images equal ``infer`` on the same images decoded by
hand as the run decoded its training images; bad files, sweep folders and data.channels=auto."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from conftest import fails_in_one_line, compose_cfg, train_tiny
from datagen import make_csv, write_image
from rethink_tl import cli
from rethink_tl.data.images import ImageSpec, decode_image
from rethink_tl.inference.finished import infer, load_run
from rethink_tl.data import trained_channels

pytestmark = pytest.mark.usefixtures("one_thread")

# Grey PNG, grey JPEG, RGB PNG, 12-bit-in-16 PNG (in a subfolder), RGB JPEG; sorted by path.
FILES = {"a.png": "png8", "b.jpg": "jpeg", "c.png": "rgb", "sub/d.png": "png16", "sub/e.JPG": "rgbjpeg"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "run"
    train_tiny(out)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("new")
    for k, (name, kind) in enumerate(FILES.items()):
        write_image(folder / name, kind, 40 + 8 * k, 56 - 4 * k, k)  # portrait, landscape: crop matters
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def expected(run_dir, paths, channels=1):
    """What the model says of ``paths`` decoded by hand: the synthetic run trained on grey 32 px images,
    and a file is cropped and 16-bit images min-max rescaled by the schema's defaults."""
    spec = ImageSpec(size=32, resize="crop", channels=channels, rescale16="minmax")
    model = load_run(run_dir).model
    return infer(model, torch.from_numpy(np.stack([decode_image(str(p), spec) for p in paths])))


def predict(*args):
    cli.main(["predict", *map(str, args), "--device", "cpu"])


def fail(capsys, *args) -> str:
    return fails_in_one_line(capsys, ["predict", *args, "--device", "cpu"])


def test_folder_rows_equal_infer_on_the_decoded_images(run, images, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out is RUN_DIR/predict/<name of IMAGES>.csv, whatever the folder
    predict(run, images)
    out = capsys.readouterr().out
    default = Path(run) / "predict" / f"{Path(images).name}.csv"
    assert "5 image files" in out and "1 other file(s) left out: notes.txt" in out
    assert f"wrote 5 rows to {default}" in out
    df = pd.read_csv(default)
    assert list(df.columns) == ["path", "prob_opacity", "prob_nodule"]
    assert df.path.tolist() == [str(images / name) for name in FILES]
    probs = df[["prob_opacity", "prob_nodule"]].to_numpy(np.float32)
    assert ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_array_equal(probs, expected(run, [images / name for name in FILES]))
    # An existing --out is kept unless --force.
    assert f"{default} exists" in fail(capsys, run, images)
    predict(run, images, "--force")


def test_csv_of_paths_keeps_its_order_and_spelling(run, images, tmp_path, capsys):
    listed = tmp_path / "list.csv"
    rel = [os.path.relpath(images / "sub/d.png", tmp_path), str(images / "a.png")]  # relative and absolute
    pd.DataFrame({"file": rel, "age": [40, 50]}).to_csv(listed, index=False)
    out = tmp_path / "out.csv"
    predict(run, listed, "--path-column", "file", "--out", out)
    df = pd.read_csv(out)
    assert df.path.tolist() == rel
    np.testing.assert_array_equal(df[["prob_opacity", "prob_nodule"]].to_numpy(np.float32),
                                  expected(run, [images / "sub/d.png", images / "a.png"]))
    assert "has no column 'path'" in fail(capsys, run, listed, "--out", tmp_path / "other.csv")


def test_bad_image_is_named_or_skipped(run, images, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(images, folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    truncated = (images / "b.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(truncated[:len(truncated) // 2])  # the header reads, the pixels do not
    out = tmp_path / "out.csv"
    err = fail(capsys, run, folder, "--out", out)
    assert "broken.png" in err and "--skip-bad" in err and not out.exists()
    predict(run, folder, "--out", out, "--skip-bad")
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "cut.jpg" in captured.err
    assert "wrote 5 rows" in captured.out and "2 image(s) left out" in captured.out
    assert pd.read_csv(out).path.tolist() == [str(folder / name) for name in FILES]


def test_a_sweep_folder_is_not_one_run(run, images, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for name in ("s0", "s1"):
        shutil.copytree(run, sweep / name)
    assert "pass one run's folder" in fail(capsys, sweep, images, "--out", tmp_path / "o.csv")
    assert "does not exist" in fail(capsys, run, tmp_path / "nothing", "--out", tmp_path / "o.csv")


def grey_is_colour_replicated(path: Path) -> bool:
    one = decode_image(str(path), ImageSpec(32, "crop", 1))
    three = decode_image(str(path), ImageSpec(32, "crop", 3))
    return np.array_equal(np.repeat(one, 3, axis=0), three)


def test_channels_auto_follows_what_training_resolved(run, images, tmp_path, capsys):
    # Why grey new images need no look at the training data: decoded as 3 channels they are the 1-channel
    # image repeated, which is what the model's input broadcast makes of one channel.
    assert all(grey_is_colour_replicated(images / name) for name, kind in FILES.items() if "rgb" not in kind)
    grey = make_csv(tmp_path / "grey", n=6)
    colour = make_csv(tmp_path / "colour", n=6, kinds=("png8", "rgb"))
    assert trained_channels(compose_cfg(["data=csv", f"data.csv={grey}"]).data) == 1
    assert trained_channels(compose_cfg(["data=csv", f"data.csv={colour}"]).data) == 3
    assert trained_channels(compose_cfg(["data=csv", "data.csv=/gone/images.csv"]).data) is None

    # A run trained on a CSV with data.channels=auto (its config rewritten: training takes longer).
    def trained_on(csv):
        copy = tmp_path / f"run_{Path(csv).parent.name}"
        shutil.copytree(run, copy, dirs_exist_ok=True)
        cfg = OmegaConf.load(copy / "config.yaml")
        cfg.data = compose_cfg(["data=csv", f"data.csv={csv}", "data.image_size=32"]).data
        OmegaConf.save(cfg, copy / "config.yaml")
        return copy

    names = list(FILES)
    for csv, channels in ((grey, 1), (colour, 3)):
        out = tmp_path / f"out{channels}.csv"
        predict(trained_on(csv), images, "--out", out)
        got = pd.read_csv(out)[["prob_opacity", "prob_nodule"]].to_numpy(np.float32)
        np.testing.assert_array_equal(got, expected(run, [images / n for n in names], channels))
    # Training images gone and new colour images: the command cannot know, and says how to tell it.
    gone = trained_on(tmp_path / "gone" / "images.csv")
    assert "--channels" in fail(capsys, gone, images, "--out", tmp_path / "o.csv")
    predict(gone, images, "--out", tmp_path / "o.csv", "--channels", "3")
    capsys.readouterr()
    predict(gone, images / "a.png", "--out", tmp_path / "one.csv")  # grey only: nothing to ask
    assert "wrote 1 rows" in capsys.readouterr().out


@pytest.mark.slow
def test_installed_command_names_the_bad_file(run, tmp_path):
    (tmp_path / "x.png").write_text("text, not pixels")
    rtl_cmd = shutil.which("rtl") or os.path.join(os.path.dirname(sys.executable), "rtl")
    proc = subprocess.run([rtl_cmd, "predict", str(run), str(tmp_path / "x.png"), "--device", "cpu"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rtl: error: ") and "x.png" in lines[0], proc.stderr
    assert not (tmp_path / "predictions.csv").exists()
