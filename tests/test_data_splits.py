"""Split helpers: stratified training fractions on multi-label data, patient and prospective splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from rethink_tl.data.base import Split
from rethink_tl.data.splits import patient_split, prospective_split, split_groups, stratified_fraction
from rethink_tl.errors import UserError


def split_of(labels: np.ndarray) -> Split:
    n = len(labels)
    return Split(images=torch.zeros((n, 1, 2, 2), dtype=torch.uint8),
                 labels=torch.from_numpy(labels.astype(np.float32)),
                 mask=torch.ones(labels.shape, dtype=torch.bool), ids=[str(i) for i in range(n)])


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.5])
def test_fraction_is_exact_and_keeps_rare_labels(fraction):
    # 8 labels, two of them rare: ~150 label combinations, most with a handful of images, as in
    # CheXpert. Rounding per combination would keep far fewer images and often lose the rare labels.
    prevalence = np.array([0.3, 0.02, 0.5, 0.1, 0.2, 0.05, 0.4, 0.3])
    labels = np.random.default_rng(0).random((1000, 8)) < prevalence
    split = split_of(labels)
    names = [f"l{i}" for i in range(8)]
    for seed in range(10):
        sub = stratified_fraction(split, fraction, seed, names)
        assert len(sub) == round(fraction * 1000)
        expected = fraction * split.positives()
        # The rarest label is the outermost stratum: its share is exact to one image; the next
        # rarest is split over two runs of strata.
        assert abs(sub.positives()[1] - expected[1]) < 1 and abs(sub.positives()[5] - expected[5]) < 2
        assert (sub.positives() > 0).all()
    assert stratified_fraction(split, fraction, 0, names).ids == stratified_fraction(split, fraction, 0, names).ids
    assert stratified_fraction(split, fraction, 1, names).ids != stratified_fraction(split, fraction, 0, names).ids


def test_large_strata_are_split_proportionally():
    labels = np.zeros((200, 1))
    labels[:40] = 1  # 40 positives, 160 negatives
    sub = stratified_fraction(split_of(labels), 0.25, 3, ["x"])
    assert len(sub) == 50 and sub.positives()[0] == 10


def test_fraction_without_positives_says_so():
    labels = np.zeros((100, 2))
    labels[0, 1] = 1
    labels[:, 0] = np.arange(100) % 2  # a: half positive; b: one positive in 100
    with pytest.raises(UserError, match="keeps 10 training images but no positive for b"):
        stratified_fraction(split_of(labels), 0.1, 0, ["a", "b"])


def test_patient_split_keeps_patients_whole():
    groups = np.repeat([f"p{i}" for i in range(50)], np.arange(50) % 4 + 1)  # 1 to 4 images per patient
    parts = patient_split(groups, 0.2, 0.1, seed=5)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(len(groups)))
    seen = [set(groups[rows]) for rows in parts.values()]
    assert [len(s) for s in seen] == [36, 4, 10]  # ceil(0.2 * 50) test, ceil(0.1 * 40) val
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    with pytest.raises(UserError, match="at least 2 patients"):
        patient_split(np.array(["p0"] * 5), 0.2, 0.1, 0)
    with pytest.raises(UserError, match=r"data.test_share must be in \[0, 1\)"):
        patient_split(groups, 1.0, 0.1, 0)


def test_images_without_a_patient_id_are_split_one_by_one():
    groups = split_groups(np.array(["p1"] * 4 + [""] * 40 + ["p2"] * 4, dtype=object), "patient")
    assert len(set(groups)) == 42
    parts = patient_split(groups, 0.25, 0.0, seed=0)
    blank_test = [r for r in parts["test"] if 4 <= r < 44]
    assert 0 < len(blank_test) < 40  # the 40 blank-id images are 40 patients, not one on one side
    assert len({tuple(groups[rows]) for rows in [parts["train"], parts["test"]]}) == 2


def test_prospective_split_by_date():
    dates = pd.Series(pd.date_range("2020-01-01", periods=20, freq="D"))
    groups = np.array([f"p{i // 2}" for i in range(20)])
    parts = prospective_split(dates, pd.Timestamp("2020-01-15"), groups, 0.2, 0)
    assert parts["test"].tolist() == list(range(14, 20))
    assert len(parts["val"]) == 4 and len(parts["train"]) == 10  # ceil(0.2 * 7 patients) = 2 patients
    assert not set(groups[parts["val"]]) & set(groups[parts["train"]])
