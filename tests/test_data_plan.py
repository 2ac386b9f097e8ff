"""The split plan of every dataset kind (what ``rtl data`` prints, read without decoding images) agrees
with the data a run builds; class balance; the split rule each builder records."""

from __future__ import annotations

import numpy as np

from conftest import compose_cfg
from datagen import make_npz
from rethink_tl.data import build_data, plan
from rethink_tl.data.base import balance
from rethink_tl.data.renderer import generate_labels, generate_split


def test_balance_counts_negatives_per_positive_among_counted_cells():
    labels = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0]], dtype=np.float32)
    mask = np.ones_like(labels, dtype=bool)
    mask[3, 1] = mask[4, 1] = False  # two uncertain cells left out (data.uncertain=ignore)
    # a: 2 positives, 3 negatives; b: 2 positives, 1 counted negative; c: no positive.
    assert balance(["a", "b", "c"], labels, mask) == "a 1:1.50; b 1:0.50; c no positive"
    covid = np.zeros((173, 1), dtype=np.float32)
    covid[:10] = 1
    assert balance(["covid"], covid, np.ones_like(covid, dtype=bool)) == "covid 1:16.30"


def test_synthetic_labels_without_rendering():
    for seed, prevalence in ((0, 0.3), (4, (0.1, 0.5))):
        _, y = generate_split(40, 32, seed=seed, prevalence=prevalence)
        np.testing.assert_array_equal(generate_labels(40, seed=seed, prevalence=prevalence), y)
    _, y = generate_split(30, 32, seed=2, prevalence=0.4, labels=("nodule",))
    np.testing.assert_array_equal(generate_labels(30, seed=2, prevalence=0.4, labels=("nodule",)), y)


def test_synthetic_plan_is_the_built_data():
    cfg = compose_cfg(["data.image_size=32", "data.num_samples=120", "data.prevalence=0.3",
                       "data.test_prevalence=0.2", "data.seed=3"]).data
    data = build_data(cfg)
    lines = plan(cfg).splitlines()
    assert data.split_rule == "generated: each split its own images (data.seed 3); prevalence 0.3 (test 0.2)"
    assert lines[0] == f"synthetic: {data.split_rule}"
    # 120 images: round(0.1 * 120) = 12 val, round(0.25 * 120) = 30 test, 78 train.
    assert [len(s) for s in data.splits().values()] == [78, 12, 30]
    assert lines[1:] == [f"  {k}: {len(s)} images; balance {data.balance(k)}" for k, s in data.splits().items()]


def test_medmnist_plan_is_the_official_splits(tmp_path):
    make_npz(tmp_path / "pneumoniamnist.npz", counts=(20, 7, 9))  # labels 0, 1, 0, 1, ... per split
    cfg = compose_cfg(["data=medmnist", f"data.root={tmp_path}", "data.image_size=28"]).data
    data = build_data(cfg)
    assert data.split_rule == "official MedMNIST splits"
    # train 10 of 20 positive; val 3 of 7; test 4 of 9.
    assert plan(cfg).splitlines() == [
        "pneumoniamnist: official MedMNIST splits",
        "  train: 20 images; balance pneumonia 1:1.00",
        "  val: 7 images; balance pneumonia 1:1.33",
        "  test: 9 images; balance pneumonia 1:1.25",
    ]
    assert [data.balance(k) for k in ("train", "val", "test")] == [
        "pneumonia 1:1.00", "pneumonia 1:1.33", "pneumonia 1:1.25"]


def test_plan_refuses_what_a_run_would_refuse_label_names_and_a_test_split_without_positives(tmp_path):
    import pytest

    from rethink_tl.data import UnusableSplit
    from rethink_tl.errors import UserError

    rows = ["path,covid,trapz_x,date"] + [f"i{k}.png,{k % 2},{k % 2},2020-03-{k + 1:02d}" for k in range(20)]
    (tmp_path / "a.csv").write_text("\n".join(rows) + "\n")
    cfg = compose_cfg(["data=csv", f"data.csv={tmp_path / 'a.csv'}", "data.cutoff_date=2020-03-15"]).data
    with pytest.raises(UserError, match="'trapz_x': the names 'trapz' and 'trapz_...' are taken by the metric"):
        plan(cfg, check=True)
    cfg = compose_cfg(["data=csv", f"data.csv={tmp_path / 'a.csv'}", "data.cutoff_date=2020-03-20",
                       "data.labels=[covid]"]).data
    # The last image (2020-03-20, k = 19, positive) alone is the test split: no negative, no AUROC.
    with pytest.raises(UnusableSplit, match="1 positive.*and 0 negative.*test split.*cannot be scored") as err:
        plan(cfg, check=True)
    assert "  test: 1 images; balance covid 1:0.00" in err.value.text
