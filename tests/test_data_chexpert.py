"""data=chexpert on a generated tree in the official layout: label sets, uncertainty policies,
all views or the frontal filter, patient-level and image-level splits, the official validation set,
and the split plan read from the CSVs alone."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import compose_cfg
from datagen import make_chexpert
from rethink_tl.data import build_data, dataset_labels, plan
from rethink_tl.data.chexpert import LABEL_SETS, OBSERVATIONS
from rethink_tl.data.splits import patient_split
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


def patients_of(data):
    return {name: [patient(i) for i in s.ids] for name, s in data.splits().items()}


def images_of(patients):
    """Images per patient in the generated tree: a frontal view, plus a lateral one for even patients."""
    return sum(2 if int(p[7:]) % 2 == 0 else 1 for p in set(patients))


def test_default_is_every_view_of_train_csv_split_by_patient(tree):
    # The paper's 160,858 / 17,875 / 44,684 images are all of train.csv, frontal and lateral.
    data = build_data(data_cfg(tree))
    ids = [i for s in data.splits().values() for i in s.ids]
    rows = pd.read_csv(tree / "train.csv")
    assert len(rows) == 60 and sorted(ids) == sorted(rows["Path"])
    assert sum(i.endswith("lateral.jpg") for i in ids) == 20
    # 40 patients: ceil(0.2 * 40) = 8 test patients, then ceil(0.1 * 32) = 4 val, 28 train: the paper's 72/8/20.
    pats = patients_of(data)
    assert [len(set(p)) for p in pats.values()] == [28, 4, 8]
    assert not set(pats["train"]) & set(pats["val"]) and not set(pats["train"]) & set(pats["test"])
    assert not set(pats["val"]) & set(pats["test"])
    assert [len(s) for s in data.splits().values()] == [images_of(p) for p in pats.values()] == [43, 6, 11]
    assert data.split_rule == ("random by patient: test 0.2 of patients, val 0.1 of the rest (split seed 0); "
                               "frontal and lateral views")
    # The same split again, another split with another seed.
    assert build_data(data_cfg(tree)).test.ids == data.test.ids
    assert build_data(data_cfg(tree, "data.split_seed=1")).test.ids != data.test.ids


def test_frontal_filter_keeps_the_frontal_views_of_the_same_patients(tree):
    data = build_data(data_cfg(tree, "data.frontal_only=true"))
    assert [len(s) for s in data.splits().values()] == [28, 4, 8]  # one frontal view per patient
    assert all(i.endswith("frontal.jpg") for s in data.splits().values() for i in s.ids)
    assert data.split_rule.endswith("; frontal views only")
    # The filter drops images, not patients: every patient stays in its split.
    every_view = patients_of(build_data(data_cfg(tree)))
    assert {k: sorted(set(v)) for k, v in patients_of(data).items()} == {k: sorted(set(v))
                                                                         for k, v in every_view.items()}


def test_split_by_image_is_the_papers_random_split(tree):
    by_image = build_data(data_cfg(tree, "data.split_by=image"))
    # Exactly the split of 60 single images: ceil(0.2 * 60) = 12 test, ceil(0.1 * 48) = 5 val.
    rows = pd.read_csv(tree / "train.csv")["Path"].tolist()
    parts = patient_split(np.arange(len(rows)).astype(str), 0.2, 0.1, 0)
    assert {k: [rows[i] for i in v] for k, v in parts.items()} == {k: s.ids for k, s in by_image.splits().items()}
    assert [len(s) for s in by_image.splits().values()] == [43, 5, 12]
    # So some patient's frontal and lateral views land in different splits (never with split_by=patient).
    pats = {k: set(v) for k, v in patients_of(by_image).items()}
    assert pats["train"] & pats["test"] or pats["train"] & pats["val"] or pats["val"] & pats["test"]
    assert by_image.split_rule.startswith("random by image: test 0.2 of images, val 0.1 of the rest")


def test_official_valid_as_test_set(tree):
    data = build_data(data_cfg(tree, "data.use_official_valid=true"))
    # 40 train patients: ceil(0.1 * 40) = 4 (with 7 images) for val, the 36 others (53 images) for
    # train; test = the 5 images of valid.csv.
    pats = patients_of(data)
    assert [len(set(p)) for p in pats.values()] == [36, 4, 5]
    assert [len(s) for s in data.splits().values()] == [53, 7, 5]
    assert images_of(pats["val"]) == 7
    assert all("/valid/" in i for i in data.test.ids)
    assert data.test.images.shape == (5, 1, 24, 24)
    assert data.split_rule.startswith("test: official valid.csv; train/val random by patient from train.csv")


def test_images_are_decoded_into_the_cache_next_to_the_data(tree):
    data = build_data(data_cfg(tree, "data.resize=pad"))
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (1, 24, 24)
    assert list((tree / ".rtl_cache").glob("chexpert-*/images.npy"))
    # Padded, not stretched: frontal films are 40, 48 or 56 px wide and 48 px tall.
    for img, path in zip(data.train.images[:, 0], data.train.ids):
        if not path.endswith("frontal.jpg"):
            continue
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
    assert [len(s) for s in build_data(data_cfg(renamed)).splits().values()] == [43, 6, 11]
    # The CSVs one level above the dataset folder that their paths name.
    up = tmp_path / "up"
    shutil.copytree(tree, up / tree.name, ignore=shutil.ignore_patterns(".rtl_cache"))
    for name in ("train.csv", "valid.csv"):
        shutil.copy(tree / name, up / name)
    assert [len(s) for s in build_data(data_cfg(up)).splits().values()] == [43, 6, 11]


def test_fraction_is_a_stratified_subset_of_train_only(tree):
    full = build_data(data_cfg(tree, "data.labels=competition5"))
    part = build_data(data_cfg(tree, "data.labels=competition5", "data.fraction=0.5"))
    assert len(part.train) == 22 and set(part.train.ids) <= set(full.train.ids)  # round(0.5 * 43)
    assert part.val.ids == full.val.ids and part.test.ids == full.test.ids
    assert (full.subset_seed, part.subset_seed) == (None, 0)


def test_plan_reads_the_csvs_only(tree, tmp_path):
    # The CSVs without a single image: the plan is still complete (a run would stop at the images).
    bare = tmp_path / tree.name
    bare.mkdir()
    for name in ("train.csv", "valid.csv"):
        shutil.copy(tree / name, bare / name)
    text = plan(data_cfg(bare, "data.labels=[Edema,Fracture]"))
    data = build_data(data_cfg(tree, "data.labels=[Edema,Fracture]"))
    assert text.splitlines() == [
        f"chexpert: {data.split_rule}",
        f"  train: 43 images; balance {data.balance('train')}",
        f"  val: 6 images; balance {data.balance('val')}",
        f"  test: 11 images; balance {data.balance('test')}",
    ]
    # Hand-counted from the generated labels (U-Ones: 1 and -1 count as positive, blank as negative).
    csv = pd.read_csv(tree / "train.csv").set_index("Path")
    for name, split in data.splits().items():
        pos = np.isin(csv.loc[split.ids, ["Edema", "Fracture"]].to_numpy(), (1.0, -1.0)).sum(0)
        neg = len(split) - pos
        assert data.balance(name) == f"Edema 1:{neg[0] / pos[0]:.2f}; Fracture 1:{neg[1] / pos[1]:.2f}"
    with pytest.raises(UserError, match="none of the 60 image files exists"):
        build_data(data_cfg(bare))


def test_bad_configs(tree, tmp_path):
    with pytest.raises(UserError, match="data.root is not set"):
        build_data(compose_cfg(["data=chexpert"]).data)
    with pytest.raises(UserError, match="train.csv does not exist"):
        build_data(data_cfg(tmp_path))
    (tmp_path / "train.csv").write_text("Path,Sex\nx.jpg,Male\n")
    with pytest.raises(UserError, match="no column 'No Finding', 'Enlarged Cardiomediastinum'"):
        build_data(data_cfg(tmp_path))


def test_sex_and_age_are_kept_for_subgroups_with_age_in_stated_bins(tree):
    from rethink_tl.data.chexpert import age_bin

    data = build_data(data_cfg(tree, "data.use_official_valid=true"))
    # make_chexpert: patient p is Female when p is odd, aged 40 + p; valid.csv holds patients 41..45
    for split in data.splits().values():
        for i, path in enumerate(split.ids):
            p = int(patient(path)[7:])
            assert split.groups["sex"][i] == ("Female" if p % 2 else "Male")
            assert split.groups["age"][i] == ("40-59" if 40 + p < 60 else "60-79" if 40 + p < 80 else "80+")
    assert [age_bin(a) for a in ("0", "39.5", "40", "79", "80", "", "unknown")] == ["<40", "<40", "40-59", "60-79",
                                                                                    "80+", "", ""]
