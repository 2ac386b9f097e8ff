"""data=chexpert on a generated tree in the official layout: label sets, uncertainty policies,
the frontal filter, patient-level splits and the official validation set."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose_cfg
from datagen import make_chexpert
from rethink_tl.data import build_data, dataset_labels
from rethink_tl.data.chexpert import LABEL_SETS, OBSERVATIONS
from rethink_tl.errors import UserError


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_chexpert(tmp_path_factory.mktemp("chexpert"))


def data_cfg(root, *extra):
    return compose_cfg(["data=chexpert", f"data.root={root}", "data.image_size=24", *extra]).data


def patient(path):
    return re.search(r"patient\d+", path).group(0)


def test_label_sets_are_cheap_and_exact(tmp_path):
    # No data at all is needed to name the labels: the model is built before the data is read.
    assert dataset_labels(data_cfg(tmp_path / "nowhere")) == list(OBSERVATIONS[:13])
    assert "Support Devices" not in dataset_labels(data_cfg(tmp_path, "data.labels=paper13"))
    assert dataset_labels(data_cfg(tmp_path, "data.labels=all14")) == list(OBSERVATIONS)
    assert dataset_labels(data_cfg(tmp_path, "data.labels=competition5")) == [
        "Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion"]
    assert dataset_labels(data_cfg(tmp_path, "data.labels=[Edema,Fracture]")) == ["Edema", "Fracture"]
    with pytest.raises(UserError, match="paper13, all14, competition5"):
        dataset_labels(data_cfg(tmp_path, "data.labels=paper12"))
    with pytest.raises(UserError, match="distinct CheXpert observations"):
        dataset_labels(data_cfg(tmp_path, "data.labels=[Edema,Flu]"))


@pytest.mark.parametrize("labels", ["paper13", "all14", "competition5"])
def test_label_matrix_follows_the_csv(tree, labels):
    data = build_data(data_cfg(tree, f"data.labels={labels}", "data.uncertain=zeros"))
    assert data.label_names == list(LABEL_SETS[labels])
    csv = pd.read_csv(tree / "train.csv").set_index("Path")
    for split in data.splits().values():
        assert split.labels.shape == (len(split), len(LABEL_SETS[labels])) and split.mask.all()
        expected = (csv.loc[split.ids, list(LABEL_SETS[labels])] == 1.0).to_numpy(dtype=np.float32)
        np.testing.assert_array_equal(split.labels.numpy(), expected)


@pytest.mark.parametrize("policy", ["ones", "zeros", "ignore"])
def test_uncertainty_policies(tree, policy):
    data = build_data(data_cfg(tree, "data.labels=all14", f"data.uncertain={policy}"))
    csv = pd.read_csv(tree / "train.csv").set_index("Path")
    raw = csv.loc[data.train.ids, list(OBSERVATIONS)].to_numpy()
    y, m = data.train.labels.numpy(), data.train.mask.numpy()
    unc, blank = raw == -1.0, np.isnan(raw)
    assert unc.any() and blank.any() and (raw == 1.0).any()
    assert (y[raw == 1.0] == 1).all() and (y[raw == 0.0] == 0).all()
    assert (y[blank] == 0).all() and m[blank].all()  # blank = negative, counted
    if policy == "ones":
        assert (y[unc] == 1).all() and m.all()
    elif policy == "zeros":
        assert (y[unc] == 0).all() and m.all()
    else:
        assert (~m[unc]).all() and m[~unc].all()  # masked exactly where uncertain


def test_patient_split_counts_and_no_shared_patient(tree):
    data = build_data(data_cfg(tree))
    # 40 patients, one frontal image each: ceil(0.2 * 40) = 8 test patients, then
    # ceil(0.1 * 32) = 4 val patients, 28 train: the paper's 72/8/20.
    assert [len(s) for s in data.splits().values()] == [28, 4, 8]
    groups = {name: {patient(i) for i in s.ids} for name, s in data.splits().items()}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    assert not (groups["val"] & groups["test"])
    assert all(i.endswith("frontal.jpg") for s in data.splits().values() for i in s.ids)
    # The same split again, another split with another seed.
    assert build_data(data_cfg(tree)).test.ids == data.test.ids
    assert build_data(data_cfg(tree, "data.split_seed=1")).test.ids != data.test.ids


def test_lateral_views_kept_without_the_frontal_filter(tree):
    data = build_data(data_cfg(tree, "data.frontal_only=false"))
    ids = [i for s in data.splits().values() for i in s.ids]
    assert len(ids) == 60 and sum(i.endswith("lateral.jpg") for i in ids) == 20
    patients = {name: [patient(i) for i in s.ids] for name, s in data.splits().items()}
    assert [len(set(p)) for p in patients.values()] == [28, 4, 8]  # still split by patient
    assert not set(patients["train"]) & (set(patients["val"]) | set(patients["test"]))
    for name, s in data.splits().items():  # every image of a chosen patient comes along
        assert len(s) == sum(2 if int(p[7:]) % 2 == 0 else 1 for p in set(patients[name]))


def test_official_valid_as_test_set(tree):
    data = build_data(data_cfg(tree, "data.use_official_valid=true"))
    # 40 train patients: ceil(0.1 * 40) = 4 for val; test = the 5 images of valid.csv.
    assert [len(s) for s in data.splits().values()] == [36, 4, 5]
    assert all("/valid/" in i for i in data.test.ids)
    assert data.test.images.shape == (5, 1, 24, 24)


def test_images_are_decoded_into_the_cache_next_to_the_data(tree):
    data = build_data(data_cfg(tree))
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (1, 24, 24)
    assert list((tree / ".rtl_cache").glob("chexpert-*/images.npy"))
    # Padded, not stretched: frontal films are 40, 48 or 56 px wide and 48 px tall.
    for img, path in zip(data.train.images[:, 0], data.train.ids):
        width = 40 + int(patient(path)[7:]) % 3 * 8
        if width == 40:  # portrait: black bars left and right
            assert (img[:, 0] == 0).all() and (img[:, -1] == 0).all() and img[:, 3:-3].float().mean() > 30
        elif width == 56:  # landscape: bars top and bottom
            assert (img[0] == 0).all() and (img[-1] == 0).all()
        else:
            assert img[:, 0].float().mean() > 10 and img[0].float().mean() > 10


def test_paths_resolve_with_a_renamed_root_or_csvs_moved_up(tree, tmp_path):
    renamed = tmp_path / "my_chexpert"
    shutil.copytree(tree, renamed, ignore=shutil.ignore_patterns(".rtl_cache"))
    assert [len(s) for s in build_data(data_cfg(renamed)).splits().values()] == [28, 4, 8]
    # The CSVs one level above the dataset folder that their paths name.
    up = tmp_path / "up"
    shutil.copytree(tree, up / tree.name, ignore=shutil.ignore_patterns(".rtl_cache"))
    for name in ("train.csv", "valid.csv"):
        shutil.copy(tree / name, up / name)
    assert [len(s) for s in build_data(data_cfg(up)).splits().values()] == [28, 4, 8]


def test_fraction_is_a_stratified_subset_of_train_only(tree):
    full = build_data(data_cfg(tree, "data.labels=competition5"))
    part = build_data(data_cfg(tree, "data.labels=competition5", "data.fraction=0.5"))
    assert len(part.train) == 14 and set(part.train.ids) <= set(full.train.ids)
    assert part.val.ids == full.val.ids and part.test.ids == full.test.ids


def test_bad_configs(tree, tmp_path):
    with pytest.raises(UserError, match="data.root is not set"):
        build_data(compose_cfg(["data=chexpert"]).data)
    with pytest.raises(UserError, match="train.csv does not exist"):
        build_data(data_cfg(tmp_path))
    (tmp_path / "train.csv").write_text("Path,Sex\nx.jpg,Male\n")
    with pytest.raises(UserError, match="no column 'No Finding', 'Enlarged Cardiomediastinum'"):
        build_data(data_cfg(tmp_path))
