"""compare.py without training: which rows a --compare side names, which rows are paired, the tags and stars.

Every summary here is made by hand, with the columns ``pairs`` and ``check_asked`` read (dataset, fraction,
model, init and the settings label as ``rtl report`` prints it).
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from rethink_tl.errors import UserError
from rethink_tl.evidence.compare import BadSelector, Selector, check_asked, full_model, pairs, stars


def table(*rows, dataset="d", fraction=1.0) -> pd.DataFrame:
    """A summary of (model, init, settings label) rows."""
    return pd.DataFrame([{"dataset": dataset, "fraction": fraction, "model": m, "init": i, "settings": s}
                         for m, i, s in rows])


# An lr sweep of dens_t1 RI, with the epochs label a wider sweep adds; one dens_t1 TL; one dens_f TL.
LR_SWEEP = table(("dens_f", "pretrained", "train.epochs=3, train.lr=0.001"),
                 ("dens_t1", "pretrained", "train.epochs=3, train.lr=0.001"),
                 ("dens_t1", "random", "train.epochs=3, train.lr=0.001"),
                 ("dens_t1", "random", "train.epochs=3, train.lr=0.01"),
                 ("dens_t1", "random", "train.epochs=5, train.lr=0.01"))


def named(summary: pd.DataFrame, found) -> set[tuple]:
    """(kind, A model, A init, A settings, B model, B init, B settings) of each pair."""
    out = set()
    for kind, a, b in found:
        ra, rb = summary.loc[a], summary.loc[b]
        out.add((kind, ra["model"], ra["init"], ra["settings"], rb["model"], rb["init"], rb["settings"]))
    return out


# --- the selector grammar ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, model, init, parts", [
    ("dens_t1/random", "dens_t1", "random", ()),
    ("dens_t1/TL", "dens_t1", "pretrained", ()),
    ("dens_t1/RI", "dens_t1", "random", ()),
    ("dens_t1", "dens_t1", "", ()),
    ("dens_t1/random:train.lr=0.001", "dens_t1", "random", (("train.lr", "0.001"),)),
    ("dens_t1/RI:train.lr=0.01,train.epochs=5", "dens_t1", "random", (("train.lr", "0.01"), ("train.epochs", "5"))),
    # the settings column's own ", " between parts; a list value keeps its comma
    ("dens_t1/TL:train.epochs=3, model.keep=[1,2]", "dens_t1", "pretrained",
     (("train.epochs", "3"), ("model.keep", "[1,2]"))),
])
def test_a_side_parses_into_model_init_and_settings_parts(text, model, init, parts):
    side = Selector.parse(text)
    assert (side.model, side.init, side.parts, side.text) == (model, init, parts, text)


@pytest.mark.parametrize("text, words", [("dens_t1/random:train.lr", "'train.lr' is not KEY=VALUE"),
                                         ("dens_t1/random:", "'' is not KEY=VALUE"),
                                         ("dens_t1/random:train.lr=0.1,train.lr=0.01", "train.lr is given twice")])
def test_a_malformed_side_is_refused(text, words):
    with pytest.raises(BadSelector, match=words):
        Selector.parse(text)


def test_a_side_selects_the_rows_with_every_part_as_the_label_prints_it():
    def models(text):
        return [(r.model, r.init, r.settings) for r in Selector.parse(text).rows(LR_SWEEP).itertuples()]

    assert models("dens_t1/TL") == [("dens_t1", "pretrained", "train.epochs=3, train.lr=0.001")]
    assert [s for _, _, s in models("dens_t1/random")] == ["train.epochs=3, train.lr=0.001",
                                                           "train.epochs=3, train.lr=0.01", "train.epochs=5, train.lr=0.01"]
    assert len(models("dens_t1")) == 4  # either init
    assert models("dens_t1/RI:train.lr=0.001") == [("dens_t1", "random", "train.epochs=3, train.lr=0.001")]
    assert len(models("dens_t1/RI:train.lr=0.01")) == 2
    assert models("dens_t1/RI:train.lr=0.01,train.epochs=5") == [("dens_t1", "random", "train.epochs=5, train.lr=0.01")]
    assert models("dens_t1/RI:train.lr=1e-3") == []  # not as the label prints it
    assert models("dens_t1/RI:train.lr=0.001,train.epochs=5") == []  # no row has both


def test_check_asked_names_what_there_is():
    def refused(a, b):
        with pytest.raises(BadSelector) as err:
            check_asked(LR_SWEEP, [(a, b)])
        return str(err.value)

    assert refused("dens_t2/TL", "dens_f/TL") == ("--compare dens_t2/TL: no setting of the report is MODEL/INIT "
                                                  "'dens_t2/TL'; there are: dens_f/pretrained, dens_t1/pretrained, "
                                                  "dens_t1/random")
    assert refused("dens_t1/RI:train.wd=0", "dens_f/TL") == (
        "--compare dens_t1/RI:train.wd=0: the settings of dens_t1/RI have no train.wd; they have: train.epochs, train.lr")
    assert refused("dens_t1/RI:train.lr=1e-3", "dens_f/TL") == (
        "--compare dens_t1/RI:train.lr=1e-3: no setting of dens_t1/RI has train.lr=1e-3; train.lr is one of: 0.001, 0.01")
    assert refused("dens_t1/RI:train.lr=0.001,train.epochs=5", "dens_f/TL") == (
        "--compare dens_t1/RI:train.lr=0.001,train.epochs=5: no setting of dens_t1/RI has all of train.lr=0.001, "
        "train.epochs=5; its settings are: train.epochs=3, train.lr=0.001; train.epochs=3, train.lr=0.01; "
        "train.epochs=5, train.lr=0.01")
    assert "both sides are the same settings" in refused("dens_t1/TL", "dens_t1/pretrained:train.lr=0.001")
    assert "both sides are the same settings" in refused("dens_t1/RI:train.epochs=5", "dens_t1/random:train.lr=0.01,"
                                                         "train.epochs=5")
    check_asked(LR_SWEEP, [("dens_t1/RI:train.lr=0.001", "dens_t1/RI:train.epochs=5"), ("dens_t1/TL", "dens_f/TL")])


def test_a_side_of_several_settings_says_how_to_name_one():
    two = table(("dens_t1", "random", "train.lr=0.001"), ("dens_t1", "random", "train.lr=0.01"))
    with pytest.raises(BadSelector) as err:
        check_asked(two, [("dens_t1/random", "dens_t1/random")])
    assert str(err.value) == ("--compare dens_t1/random dens_t1/random: dens_t1/random is 2 settings of this report "
                              "(train.lr=0.001; train.lr=0.01): name one side with its settings, e.g. "
                              "dens_t1/random:train.lr=0.001")
    # Only what the rows differ in is shown; the parts already given stay in the example.
    with pytest.raises(BadSelector) as err:
        check_asked(LR_SWEEP, [("dens_t1/RI:train.lr=0.01", "dens_f/TL")])
    assert str(err.value) == ("--compare dens_t1/RI:train.lr=0.01 dens_f/TL: dens_t1/RI:train.lr=0.01 is 2 settings "
                              "of this report (train.epochs=3; train.epochs=5): name one side with its settings, e.g. "
                              "dens_t1/RI:train.lr=0.01,train.epochs=3")
    # A side without INIT that holds both inits.
    with pytest.raises(BadSelector) as err:
        check_asked(table(("res_f", "pretrained", ""), ("res_f", "random", ""), ("res_t1", "pretrained", "")),
                    [("res_f", "res_t1/TL")])
    assert str(err.value) == ("--compare res_f res_t1/TL: res_f is 2 settings of this report (init=pretrained; "
                              "init=random): name one side with its init, e.g. res_f/pretrained")
    # One row per dataset x fraction is not several: the side is compared in each.
    fractions = pd.concat([table(("dens_t1", "random", ""), ("dens_f", "pretrained", ""), fraction=f)
                           for f in (0.1, 1.0)], ignore_index=True)
    check_asked(fractions, [("dens_f/TL", "dens_t1/RI")])
    found, _ = pairs(fractions, [("dens_f/TL", "dens_t1/RI")])
    assert [(fractions.loc[a, "fraction"], fractions.loc[b, "model"]) for k, a, b in found if k == "asked"] == [
        (0.1, "dens_t1"), (1.0, "dens_t1")]


def test_bad_selector_is_a_user_error():
    assert issubclass(BadSelector, UserError)


# --- which rows are compared -------------------------------------------------------------------------

def test_only_settings_equal_apart_from_init_or_model_are_paired():
    summary = table(("res_f", "pretrained", "train.lr=0.1"), ("res_f", "random", "train.lr=0.01"),  # other lr: no pair
                    ("dens_f", "pretrained", ""), ("dens_f", "random", ""), ("dens_t1", "pretrained", ""),
                    ("dens_t1", "random", ""), ("res_t1", "pretrained", "train.lr=0.01"))  # no res_f TL at lr 0.01
    found, notes = pairs(summary, [])
    assert named(summary, found) == {
        ("TL vs RI", "dens_f", "pretrained", "", "dens_f", "random", ""),
        ("TL vs RI", "dens_t1", "pretrained", "", "dens_t1", "random", ""),
        ("truncated/slim vs full TL", "dens_t1", "pretrained", "", "dens_f", "pretrained", ""),
        ("truncated/slim vs full TL", "dens_t1", "random", "", "dens_f", "pretrained", "")}
    assert notes == ["d f1: res_f TL [train.lr=0.1] has no RI counterpart with the same settings: TL vs RI not compared",
                     "d f1: res_t1 TL [train.lr=0.01] has no res_f TL with the same settings: not compared"]
    # External rows trained on different datasets are not paired.
    ext = summary.iloc[2:4].assign(trained_on=["a", "b"])
    assert pairs(ext, []) == ([], [])


def test_asked_pairs_use_the_selector_and_are_not_repeated():
    found, notes = pairs(LR_SWEEP, [("dens_t1/RI:train.lr=0.001", "dens_t1/random:train.epochs=5"),
                                    ("dens_t1/TL", "dens_f/TL")])  # already a truncated vs full pair: kept once
    assert named(LR_SWEEP, found) == {
        ("TL vs RI", "dens_t1", "pretrained", "train.epochs=3, train.lr=0.001",
         "dens_t1", "random", "train.epochs=3, train.lr=0.001"),
        ("truncated/slim vs full TL", "dens_t1", "pretrained", "train.epochs=3, train.lr=0.001",
         "dens_f", "pretrained", "train.epochs=3, train.lr=0.001"),
        ("truncated/slim vs full TL", "dens_t1", "random", "train.epochs=3, train.lr=0.001",
         "dens_f", "pretrained", "train.epochs=3, train.lr=0.001"),
        ("asked", "dens_t1", "random", "train.epochs=3, train.lr=0.001",
         "dens_t1", "random", "train.epochs=5, train.lr=0.01")}
    assert len(found) == 4 and notes[0].startswith("d f1: dens_t1 RI [train.epochs=3, train.lr=0.01] has no dens_f TL")
    # pairs refuses a side of several settings in a cell (external tables reach it without check_asked).
    with pytest.raises(BadSelector, match="dens_t1/RI is 3 settings of this report"):
        pairs(LR_SWEEP, [("dens_t1/RI", "dens_f/TL")])


def test_sides_naming_the_same_row_in_one_cell_are_not_compared_there():
    # Different rows in dataset a, the same row in dataset b (where only one dens_t1 RI setting has lr 0.01).
    summary = pd.concat([table(("dens_t1", "random", "train.epochs=3, train.lr=0.01"),
                               ("dens_t1", "random", "train.epochs=5, train.lr=0.001"), dataset="a"),
                         table(("dens_t1", "random", "train.epochs=5, train.lr=0.01"), dataset="b")], ignore_index=True)
    asked = [("dens_t1/RI:train.lr=0.01", "dens_t1/RI:train.epochs=5")]
    check_asked(summary, asked)
    found, notes = pairs(summary, asked)
    assert found == [("asked", 0, 1)]
    assert notes == ["b f1: --compare dens_t1/RI:train.lr=0.01 dens_t1/RI:train.epochs=5: both sides are dens_t1 RI "
                     "[train.epochs=5, train.lr=0.01] here: not compared"]


# --- tags and stars ----------------------------------------------------------------------------------

@pytest.mark.parametrize("tag, full", [("res_t1", "res_f"), ("res_s3", "res_f"), ("dens_t2", "dens_f"),
                                       ("dens_s1", "dens_f"), ("trunc-tf_efficientnet_lite0-cut2",
                                                               "timm-tf_efficientnet_lite0"),
                                       ("trunc-resnet18-cut0", "timm-resnet18"), ("res_f", None), ("dens_f", None),
                                       ("cbr_small", None), ("timm-resnet18", None), ("dens_t", None)])
def test_full_model_of_each_truncated_or_slim_tag(tag, full):
    assert full_model(tag) == full


@pytest.mark.parametrize("p, marks", [(0.0, "***"), (0.0009, "***"), (0.001, "**"), (0.0099, "**"), (0.01, "*"),
                                      (0.0499, "*"), (0.05, ""), (0.7, ""), (math.nan, "")])
def test_stars_of_a_p_value(p, marks):
    assert stars(p) == marks
