import math
import warnings

import numpy as np
import pytest

from rethink_tl.metrics import SingleClassWarning, auprc_trapz, score, toy_classifiers


def test_hand_computed_case():
    # 2 positives, 3 negatives. Ranking by score: P(.9) N(.8) P(.7) N(.3) N(.1).
    y = np.array([1, 0, 1, 0, 0])
    s = np.array([0.9, 0.8, 0.7, 0.3, 0.1])
    r = score(y[:, None], s[:, None], ["x"])
    # AUROC: of the 6 (pos, neg) pairs only (0.7, 0.8) is misordered -> 5/6.
    assert r.macro["auroc"] == pytest.approx(5 / 6)
    # AP: precision at each positive = 1/1 and 2/3 -> mean 5/6.
    assert r.macro["auprc"] == pytest.approx((1 + 2 / 3) / 2)
    # Trapezoid PR area differs from AP and is named separately.
    assert auprc_trapz(y, s) != pytest.approx(r.macro["auprc"])


def test_per_label_macro_and_mask():
    y = np.array([[1, 1], [0, 0], [1, 0], [0, 1]])
    s = np.array([[0.9, 0.2], [0.1, 0.8], [0.8, 0.3], [0.2, 0.9]])
    r = score(y, s, ["a", "b"])
    assert r.per_label["auroc"] == {"a": 1.0, "b": pytest.approx(0.5)}
    assert r.macro["auroc"] == pytest.approx(0.75)
    # Masking out row 1 for label b leaves positives (rows 0, 3) and negative row 2 ranked 0.3 > 0.2 of row 0.
    mask = np.ones_like(y, dtype=bool)
    mask[1, 1] = False
    r = score(y, s, ["a", "b"], mask=mask)
    assert r.per_label["auroc"]["b"] == pytest.approx(0.5)
    assert r.flat("val")["val_auroc_a"] == 1.0


def test_single_class_label_is_nan_and_left_out_of_the_mean():
    y = np.array([[1, 0], [0, 0], [1, 0]])
    s = np.array([[0.9, 0.5], [0.1, 0.4], [0.8, 0.3]])
    with pytest.warns(SingleClassWarning, match="'b' has 0 positives among 3 images in the val split"):
        r = score(y, s, ["a", "b"], split="val")
    assert math.isnan(r.per_label["auprc"]["b"])
    assert r.macro["auprc"] == 1.0 and r.macro["auroc"] == 1.0


def test_toy_example_of_the_paper():
    y, scores = toy_classifiers()
    assert len(y) == 1000 and y.sum() == 10
    a = score(y[:, None], scores["A"][:, None], ["x"]).macro
    b = score(y[:, None], scores["B"][:, None], ["x"]).macro
    # Both look near-perfect by AUROC ...
    assert a["auroc"] > 0.99 and b["auroc"] > 0.99
    # ... exact values from the construction: A misorders 1 of 9,900 pairs, B 91.
    assert a["auroc"] == pytest.approx(1 - 1 / 9900)
    assert b["auroc"] == pytest.approx(1 - 91 / 9900)
    # ... while AUPRC separates them (paper: .990 vs .354).
    assert a["auprc"] == pytest.approx(0.990, abs=0.002)
    assert b["auprc"] == pytest.approx(0.354, abs=0.002)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # two-class labels never warn
        score(y[:, None], scores["A"][:, None], ["x"])
