"""inference/finished.py: a finished run loaded back, or one message saying why it cannot be."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import train_tiny
from rethink_tl import runfiles as rf
from rethink_tl.errors import UserError
from rethink_tl.inference.finished import finished_below, infer, load_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "sweep" / "s0"
    row = train_tiny(out, "train.epochs=1")
    return out, row


def test_a_finished_run_comes_back_with_its_best_checkpoint(run):
    out, row = run
    loaded = load_run(out)
    assert loaded.labels == ["opacity", "nodule"] and loaded.image_size == 32
    assert loaded.row["test_auroc"] == pytest.approx(row["test_auroc"])
    best = torch.load(out / rf.BEST, weights_only=True)["model"]
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, best[name]), name
    assert not loaded.model.training and loaded.name == "trunc-tf_efficientnet_lite0-cut1/random/f1/s0"


def test_infer_gives_the_probabilities_the_run_kept(run):
    out, _ = run
    from rethink_tl.evidence.predictions import read

    loaded = load_run(out)
    test = read(out / rf.PREDICTIONS).split("test")
    from rethink_tl.data import build_data

    images = build_data(loaded.cfg.data).test.images
    np.testing.assert_allclose(infer(loaded.model, images), test.probs, rtol=0, atol=1e-6)


def test_sweep_folders_list_their_finished_runs(run):
    out, _ = run
    assert finished_below(out.parent) == [out]


@pytest.mark.parametrize("damage, message", [
    ("rmdir", "is not a directory"),
    (rf.BEST, "has no best.pt"),
    (rf.CONFIG, "has no config.yaml"),
    (rf.RESULTS, r"not finished \(no results.csv\)"),
])
def test_what_is_not_a_finished_run_is_refused(run, tmp_path, damage, message):
    import shutil

    out, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    if damage == "rmdir":
        shutil.rmtree(copy)
    else:
        (copy / damage).unlink()
    with pytest.raises(UserError, match=message):
        load_run(copy)
