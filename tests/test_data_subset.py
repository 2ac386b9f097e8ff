"""data.subset: one training subset for every training seed (fixed, the paper), or one per seed
(per_seed); the seed that drew it is recorded, and the setting stays one setting across seeds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_DATA, compose_cfg
from rethink_tl import config as C
from rethink_tl import identity as ID
from rethink_tl.data import build_data, plan
from rethink_tl.data.splits import subset_seed
from rethink_tl.errors import UserError
from rethink_tl.train import run


def cfg(*extra):
    # 240 synthetic images, 32 px: 156 train / 24 val / 60 test; labels only would be enough, but the
    # test goes through build_data as a run does.
    return compose_cfg([*TINY_DATA, "data.fraction=0.25", "data.subset_seed=5", *extra])


def built(*extra, seed=0):
    return build_data(cfg(*extra).data, train_seed=seed)


def test_the_seed_rule():
    assert subset_seed(0.1, 5, "fixed", 3) == 5
    assert subset_seed(0.1, 5, "per_seed", 3) == 8
    assert subset_seed(1.0, 5, "per_seed", 3) is None  # no subset, no seed


def test_the_rule_is_a_choice():
    assert str(cfg().data.subset) == "fixed"  # the paper: one subset for the 3 training seeds
    with pytest.raises(Exception) as err:
        cfg("data.subset=sometimes")
    assert "expected one of [fixed, per_seed]" in str(err.value.__cause__)


def test_fixed_subset_is_shared_by_the_training_seeds():
    a, b = built(seed=0), built(seed=1)
    assert len(a.train) == 39 and a.train.ids == b.train.ids  # round(0.25 * 156)
    assert a.subset_seed == b.subset_seed == 5
    assert a.val.ids == b.val.ids and a.test.ids == b.test.ids


def test_per_seed_subsets_differ_keep_their_size_and_positives():
    full = build_data(cfg("data.fraction=1").data)
    subsets = [built("data.subset=per_seed", seed=s) for s in (0, 1)]
    assert subsets[0].train.ids != subsets[1].train.ids
    assert [d.subset_seed for d in subsets] == [5, 6]
    expected = full.train.positives() / 4
    for data in subsets:
        assert len(data.train) == 39 and set(data.train.ids) <= set(full.train.ids)
        assert (data.train.positives() > 0).all() and (np.abs(data.train.positives() - expected) < 2).all()
        assert data.val.ids == full.val.ids and data.test.ids == full.test.ids
    # The recorded seed reproduces the subset with data.subset=fixed.
    assert build_data(cfg("data.subset_seed=6").data).train.ids == subsets[1].train.ids
    # Without a subset there is no subset seed.
    assert full.subset_seed is None


def test_per_seed_runs_are_one_setting():
    ids = [ID.identity(cfg("data.subset=per_seed", f"train.seed={s}")) for s in (0, 1)]
    assert ids[0] != ids[1] and ids[0]["data.subset"] == "per_seed"
    assert ID.setting_id(ids[0]) == ID.setting_id(ids[1])
    assert ID.setting_id(ID.identity(cfg("train.seed=0"))) != ID.setting_id(ids[0])  # fixed is another setting


def test_plan_shows_the_subset_a_run_would_train_on():
    data = built("data.subset=per_seed", seed=2)
    lines = plan(cfg("data.subset=per_seed").data, train_seed=2).splitlines()
    assert lines[1] == (f"  train: 39 images (data.fraction=0.25 of 156: subset seed 7, data.subset=per_seed with "
                        f"train.seed 2); balance {data.balance('train')}")


def test_per_seed_without_positives_names_where_the_seed_came_from():
    with pytest.raises(UserError, match=r"data.fraction=0.01 \(subset seed 6 = data.subset_seed 5 \+ train.seed 1, "
                                        r"data.subset=per_seed\) keeps 2 training images but no positive"):
        build_data(cfg("data.subset=per_seed", "data.fraction=0.01").data, train_seed=1)


def test_results_row_records_the_split_and_the_subset(tmp_path, tiny_cfg):
    c = tiny_cfg("train.epochs=1", "data.fraction=0.5", "data.subset=per_seed", "train.seed=1")
    row = run(c, tmp_path)
    data = build_data(c.data, train_seed=1)
    written = pd.read_csv(tmp_path / "results.csv", keep_default_na=False).iloc[0]
    expected = {"split_rule": "generated: each split its own images (data.seed 0); prevalence 0.3 (test 0.3)",
                "subset_seed": 1, "train_balance": data.balance("train"), "val_balance": data.balance("val"),
                "test_balance": data.balance("test")}
    assert {k: row[k] for k in expected} == expected
    assert {k: written[k] for k in expected} == expected
    assert row["n_train"] == len(data.train) == 78  # round(0.5 * 156)
