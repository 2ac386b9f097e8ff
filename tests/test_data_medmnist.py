"""data=medmnist offline: .npz files in the MedMNIST layout that the tests write themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import compose_cfg
from datagen import make_npz
from rethink_tl.data import build_data, dataset_labels
from rethink_tl.data.medmnist import BUILTIN_INFO, medmnist_info
from rethink_tl.errors import UserError


def data_cfg(*extra):
    return compose_cfg(["data=medmnist", *extra]).data


def test_pneumoniamnist_from_root(tmp_path):
    arrays = make_npz(tmp_path / "pneumoniamnist.npz")  # the 28 px file name
    cfg = data_cfg(f"data.root={tmp_path}", "data.image_size=28")
    assert cfg.name == "pneumoniamnist"  # runs land in runs/pneumoniamnist/...
    assert dataset_labels(cfg) == ["pneumonia"]
    data = build_data(cfg)
    assert data.name == "pneumoniamnist" and data.label_names == ["pneumonia"]
    assert [len(s) for s in data.splits().values()] == [20, 6, 8]
    for name, split in data.splits().items():
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 28, 28)
        np.testing.assert_array_equal(split.images[:, 0].numpy(), arrays[f"{name}_images"])  # untouched at 28 px
        np.testing.assert_array_equal(split.labels.numpy(), arrays[f"{name}_labels"].astype(np.float32))
        assert split.mask.all() and split.ids[0] == f"pneumoniamnist/{name}/0"


def test_resized_to_the_image_size(tmp_path):
    make_npz(tmp_path / "pneumoniamnist_64.npz", size=64)
    data = build_data(data_cfg(f"data.root={tmp_path}", "data.image_size=32"))
    assert data.train.images.shape == (20, 1, 32, 32)


def test_picks_the_smallest_file_at_least_the_image_size(tmp_path):
    make_npz(tmp_path / "pneumoniamnist.npz", size=28)
    make_npz(tmp_path / "pneumoniamnist_64.npz", size=64, counts=(10, 4, 4))
    make_npz(tmp_path / "pneumoniamnist_128.npz", size=128, counts=(2, 2, 2))
    assert len(build_data(data_cfg(f"data.root={tmp_path}", "data.image_size=48")).train) == 10
    assert len(build_data(data_cfg(f"data.root={tmp_path}", "data.image_size=24")).train) == 20
    assert len(build_data(data_cfg(f"data.root={tmp_path}", "data.image_size=224")).train) == 2  # largest
    assert len(build_data(data_cfg(f"data.root={tmp_path}", "data.size=64", "data.image_size=32")).train) == 10


def test_chestmnist_is_multi_label(tmp_path):
    arrays = make_npz(tmp_path / "chest.npz", n_labels=14)
    cfg = data_cfg("data.flag=chestmnist", f"data.npz={tmp_path / 'chest.npz'}", "data.image_size=28")
    names = dataset_labels(cfg)
    assert len(names) == 14 and names[0] == "atelectasis" and names[-1] == "hernia"
    data = build_data(cfg)
    assert data.name == "chestmnist" and data.test.labels.shape == (8, 14)
    np.testing.assert_array_equal(data.test.labels.numpy(), arrays["test_labels"])


def test_unknown_npz_multi_class_rgb(tmp_path):
    arrays = make_npz(tmp_path / "mine.npz", rgb=True, n_classes=4)
    cfg = data_cfg("data.flag=myset", f"data.npz={tmp_path / 'mine.npz'}", "data.image_size=28")
    assert dataset_labels(cfg) == ["class_0", "class_1", "class_2", "class_3"]
    data = build_data(cfg)
    assert data.train.images.shape == (20, 3, 28, 28)
    np.testing.assert_array_equal(data.train.images.permute(0, 2, 3, 1).numpy(), arrays["train_images"])
    # One-vs-rest columns of the class ids.
    np.testing.assert_array_equal(data.train.labels.argmax(1).numpy(), arrays["train_labels"][:, 0])
    assert (data.train.labels.sum(1) == 1).all()


def test_builtin_names_match_the_medmnist_package():
    info = medmnist_info()
    if info is BUILTIN_INFO:
        pytest.skip("medmnist is not installed: the built-in table is what is used")
    for flag, entry in BUILTIN_INFO.items():
        assert entry["label"] == info[flag]["label"] and entry["task"] == info[flag]["task"]


def test_missing_and_bad_files(tmp_path, monkeypatch):
    monkeypatch.setattr("rethink_tl.data.medmnist.medmnist_info", lambda: BUILTIN_INFO)  # as without medmnist
    with pytest.raises(UserError, match=r"pneumoniamnist_64.npz does not exist .*put pneumoniamnist_64.npz"):
        build_data(data_cfg(f"data.root={tmp_path}", "data.image_size=64"))
    with pytest.raises(UserError, match="data.download=false"):
        build_data(data_cfg(f"data.root={tmp_path}", "data.image_size=64", "data.download=false"))
    with pytest.raises(UserError, match="data.npz=.*nothing.npz does not exist"):
        build_data(data_cfg(f"data.npz={tmp_path / 'nothing.npz'}"))
    (tmp_path / "broken.npz").write_bytes(b"PK not really")
    with pytest.raises(UserError, match="not a readable .npz"):
        build_data(data_cfg(f"data.npz={tmp_path / 'broken.npz'}", "data.image_size=28"))
    np.savez(tmp_path / "partial.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(UserError, match="not in the MedMNIST layout: no train_labels"):
        build_data(data_cfg(f"data.npz={tmp_path / 'partial.npz'}", "data.image_size=28"))
    with pytest.raises(UserError, match="unknown MedMNIST set data.flag=dermamnistt"):
        dataset_labels(data_cfg("data.flag=dermamnistt"))
    with pytest.raises(UserError, match="3D"):
        dataset_labels(data_cfg("data.flag=organmnist3d"))
    make_npz(tmp_path / "x.npz", n_classes=3)  # labels 0..2 in a set declared binary
    with pytest.raises(UserError, match="binary set has labels other than 0 and 1"):
        build_data(data_cfg(f"data.npz={tmp_path / 'x.npz'}", "data.image_size=28"))
