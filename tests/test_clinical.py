"""Clinical evidence (issue 22, items 2 and 3): operating points chosen on validation only, and calibration
(Brier, ECE), against hand-worked cases and simulations."""

from __future__ import annotations

import numpy as np
import pytest

from rethink_tl.errors import UserError
from rethink_tl.evidence.clinical import (Rule, brier, calibration, choose_threshold, confusion_rates, ece,
                                          points_of)
from rethink_tl.evidence.stats import Holdout

# Validation: positives at 0.9, 0.8, 0.4; negatives at 0.7, 0.3, 0.2, 0.1. By hand, threshold -> (sens, spec):
# 0.9 (1/3, 1), 0.8 (2/3, 1), 0.7 (2/3, 3/4), 0.4 (1, 3/4), 0.3 (1, 1/2) ...: Youden's J is largest, 0.75, at 0.4;
# sensitivity 0.9 is first reached at 0.4; specificity 0.95 last holds at 0.8.
VAL_Y = np.array([1, 1, 1, 0, 0, 0, 0])
VAL_P = np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.2, 0.1])


@pytest.mark.parametrize("rule, want", [("youden", 0.4), ("sens=0.9", 0.4), ("sens=0.5", 0.8), ("spec=0.95", 0.8),
                                        ("spec=0.7", 0.4), ("spec=0.5", 0.3), ("sens=1", 0.4)])
def test_thresholds_by_hand(rule, want):
    assert choose_threshold(VAL_Y, VAL_P, Rule.parse(rule)) == want


def test_a_specificity_of_one_above_every_negative_calls_no_negative():
    y, p = np.array([1, 0, 0]), np.array([0.5, 0.9, 0.1])  # a negative scores highest: spec 1 calls nobody
    t = choose_threshold(y, p, Rule.parse("spec=1"))
    assert t > 0.9 and not (p >= t).any()


def test_rates_at_a_threshold_by_hand():
    # test truth 1 1 0 0 0, probabilities .5 .3 .45 .2 .9 at 0.4: called 1 0 1 0 1 -> TP 1, FN 1, FP 2, TN 1
    y, p = np.array([1, 1, 0, 0, 0]), np.array([0.5, 0.3, 0.45, 0.2, 0.9])
    sens, spec, ppv, npv = confusion_rates(y, p >= 0.4, np.ones((1, 5)))[:, 0]
    assert (sens, spec, ppv, npv) == pytest.approx((1 / 2, 1 / 3, 1 / 3, 1 / 2))
    # weights: the second positive drawn twice, the last negative not at all
    sens, spec, ppv, npv = confusion_rates(y, p >= 0.4, np.array([[1, 2, 1, 1, 0]]))[:, 0]
    assert (sens, spec, ppv, npv) == pytest.approx((1 / 3, 1 / 2, 1 / 2, 1 / 3))


def test_the_threshold_never_reads_the_test_labels():
    rng = np.random.default_rng(0)
    n = 120
    test_y = (rng.random((n, 1)) < 0.3)
    probs = {0: np.clip(test_y * 0.3 + rng.random((n, 1)) * 0.7, 0, 1).astype(np.float32)}
    th = {0: [choose_threshold(VAL_Y, VAL_P, Rule.parse("youden"))]}
    holdout = Holdout.of(test_y, np.ones_like(test_y), ["x"], None)
    row = points_of(holdout, probs, th, Rule.parse("youden"), 200, 0)[0]
    shuffled = Holdout.of(rng.permutation(test_y), np.ones_like(test_y), ["x"], None)
    other = points_of(shuffled, probs, th, Rule.parse("youden"), 200, 0)[0]
    assert row["threshold"] == other["threshold"] == 0.4 and row["thresholds_per_seed"] == "0.4"
    assert row["sensitivity"] != other["sensitivity"]  # the test labels count, only after the threshold is set
    called = probs[0][:, 0] >= 0.4
    assert row["sensitivity"] == pytest.approx(called[test_y[:, 0]].mean())
    assert row["specificity"] == pytest.approx((~called[~test_y[:, 0]]).mean())
    assert row["ppv"] == pytest.approx(test_y[called, 0].mean())
    assert row["sensitivity_ci_low"] <= row["sensitivity"] <= row["sensitivity_ci_high"]
    assert row["test_positives"] == int(test_y.sum()) and row["units"] == f"{n} images"


@pytest.mark.parametrize("text", ["yuden", "sens=0", "sens=1.5", "spec=x", "sens", "ppv=0.9"])
def test_a_bad_rule_says_what_rules_there_are(text):
    with pytest.raises(UserError, match="--operating-point"):
        Rule.parse(text)


def test_no_threshold_without_both_classes_in_validation():
    with pytest.raises(UserError, match="no positive image of nodule"):
        choose_threshold(np.zeros(4), np.linspace(0, 1, 4), Rule.parse("youden"), "nodule")


def test_brier_and_ece_by_hand():
    # bins of width 0.1: 0.95 -> bin 9, 0.05 -> bin 0, 0.65 and 0.62 -> bin 6
    y, p = np.array([1, 0, 1, 0]), np.array([0.95, 0.05, 0.65, 0.62])
    w = np.ones((1, 4))
    assert brier(y, p, w)[0] == pytest.approx((0.05 ** 2 + 0.05 ** 2 + 0.35 ** 2 + 0.62 ** 2) / 4)  # 0.127975
    # |1 - 0.95| + |0 - 0.05| + |1 - (0.65 + 0.62)| over 4 images
    assert ece(y, p, w)[0] == pytest.approx((0.05 + 0.05 + 0.27) / 4)  # 0.0925
    assert ece(np.array([1]), np.array([1.0]), np.ones((1, 1)))[0] == 0.0  # 1.0 is in the last bin


def test_calibrated_by_construction_gives_ece_near_zero_and_a_skewed_model_does_not():
    rng = np.random.default_rng(1)
    p = rng.random(50_000)
    y = rng.random(50_000) < p  # P(y = 1 | p) = p: calibrated
    holdout = Holdout.of(y[:, None], np.ones((len(y), 1), bool), ["x"], None)
    good = calibration(holdout, {0: p[:, None]}, 200, 0)
    assert good["ece", "x"].estimate < 0.01 and good["ece", "x"].low >= 0
    assert good["brier", "x"].estimate == pytest.approx(1 / 6, abs=0.005)  # E[p(1-p)] for p ~ U(0, 1)
    bad = calibration(holdout, {0: (p ** 2)[:, None]}, 200, 0)  # over-confident negatives
    assert bad["ece", "x"].estimate > 0.1 and bad["ece", "x"].low > good["ece", "x"].high
    assert good["ece", "macro"].estimate == good["ece", "x"].estimate


def _two_groups(shuffle: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = 600
    y = rng.random(n) < 0.2
    sex = np.where(np.arange(n) % 2 == 0, "F", "M")
    scores = y * 1.5 + rng.normal(size=n)
    if shuffle:  # the model knows nothing about the men: their scores are shuffled among them
        men = np.flatnonzero(sex == "M")
        scores[men] = scores[rng.permutation(men)]
    holdout = Holdout.of(y[:, None], np.ones((n, 1), bool), ["finding"], None)
    return holdout, {0: scores[:, None].astype(np.float32)}, sex.tolist()


def test_a_group_whose_scores_are_shuffled_has_a_gap_whose_interval_excludes_zero():
    from rethink_tl.evidence.clinical import By, subgroup_rows

    for shuffle in (True, False):
        holdout, probs, sex = _two_groups(shuffle)
        rows, notes = subgroup_rows(holdout, probs, sex, By.parse("sex"), 500, 0)
        assert notes == []
        men = next(r for r in rows if r["group"] == "M" and r["metric"] == "auroc")
        women = next(r for r in rows if r["group"] == "F" and r["metric"] == "auroc")
        assert women["reference"] == "F" and np.isnan(women["gap"]) and women["images"] == men["images"] == 300
        # the group's own AUROC, exactly sklearn's on its images
        from sklearn.metrics import roc_auc_score

        m = np.array(sex) == "M"
        assert men["value"] == pytest.approx(roc_auc_score(holdout.labels[m, 0], probs[0][m, 0]))
        assert men["gap"] == pytest.approx(men["value"] - women["value"])
        if shuffle:
            assert men["gap_ci_high"] < 0 and men["p_gap"] < 0.01 and abs(men["value"] - 0.5) < 0.1
        else:
            assert men["gap_ci_low"] < 0 < men["gap_ci_high"] and men["p_gap"] > 0.05


def test_groups_too_small_or_too_many_say_so():
    from rethink_tl.evidence.clinical import By, subgroup_rows

    holdout, probs, sex = _two_groups(False)
    tiny = ["F"] * 596 + ["X"] * 4  # 4 images: in most resamples no positive
    rows, _ = subgroup_rows(holdout, probs, tiny, By.parse("sex"), 300, 0)
    x = next(r for r in rows if r["group"] == "X" and r["metric"] == "auprc")
    assert np.isnan(x["ci_low"]) and x["note"].startswith("too small for an interval")
    with pytest.raises(UserError, match="600 distinct values.*--by age:0,40,60,80,120"):
        subgroup_rows(holdout, probs, [str(i) for i in range(600)], By.parse("age"), 300, 0)
    ages = [str(20 + i % 70) for i in range(600)]
    rows, _ = subgroup_rows(holdout, probs, ages, By.parse("age:0,40,60,120"), 200, 0)
    assert {r["group"] for r in rows} == {"0-40", "40-60", "60-120"}
    assert next(r for r in rows if r["group"] == "0-40")["images"] == sum(20 + i % 70 < 40 for i in range(600))
    for bad in ("age:60,40", "age:nan,40", "age:0,inf"):
        with pytest.raises(UserError, match="bins are increasing numbers"):
            By.parse(bad)


@pytest.mark.slow
def test_a_csv_run_keeps_its_group_columns_and_report_by_uses_them(tmp_path, capsys):
    import pandas as pd

    from conftest import compose_cfg, fails_in_one_line
    from datagen import make_csv
    from rethink_tl.evidence.predictions import read
    from rethink_tl.evidence.report import report
    from rethink_tl.identity import identity
    from rethink_tl.train import run

    csv = make_csv(tmp_path, n=60)
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    over = ["model=trunc", "model.cut=1", "data=csv", f"data.csv={csv}", "data.image_size=32", "data.labels=[covid]",
            "train.epochs=2", "train.batch_size=8", "runtime.progress=false", "data.val_share=0.3",
            "data.test_share=0.4"]
    assert identity(compose_cfg(over)) == identity(compose_cfg([*over, "data.group_columns=[sex,age]"]))
    for seed in (0, 1):
        run(compose_cfg([*over, "data.group_columns=[sex,age]", f"train.seed={seed}"]), tmp_path / "runs" / f"s{seed}")
    test = read(tmp_path / "runs" / "s0" / "predictions.csv.gz").split("test")
    by_path = table.set_index("path")
    assert test.groups["sex"] == [by_path.loc[i, "sex"] for i in test.ids]
    assert test.groups["age"] == [by_path.loc[i, "age"] for i in test.ids]

    out = tmp_path / "report"
    done = report(tmp_path / "runs", out=out, resamples=200, by="sex", operating_point="youden")
    sub = pd.read_csv(out / "subgroups.csv")
    assert set(sub["group"]) == {"F", "M"} and set(sub["column"]) == {"sex"}
    assert {"auroc", "auprc", "sensitivity covid", "npv covid"} <= set(sub["metric"])
    assert sub["images"].groupby(sub["group"]).first().sum() == len(test.ids)
    assert "subgroups by sex" in (out / "summary.md").read_text()
    report(tmp_path / "runs", out=out, resamples=200, by="age:0,50,100")
    assert set(pd.read_csv(out / "subgroups.csv")["group"]) <= {"0-50", "50-100"}
    err = fails_in_one_line(capsys, ["report", str(tmp_path / "runs"), "--by", "age:9,1"])
    assert "bins are increasing numbers" in err
    assert done.problems == []
