"""Per-image predictions, bootstrap intervals, paired comparisons and DeLong's test (issue 12).

The sweep fixture is the issue's must-show: 2 models x 2 inits x 3 seeds of tiny runs, then ``rtl report``
writes the comparisons table; one of its intervals is recomputed here independently, from the saved
predictions files and scikit-learn, with the same seed.
"""

from __future__ import annotations

import gzip
import io
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from sklearn.metrics import average_precision_score, roc_auc_score

from conftest import TINY_DATA, compose_cfg, fails_in_one_line, train_tiny
from rethink_tl.evidence import stats
from rethink_tl.cli import main
from rethink_tl.evidence.predictions import PREDICTIONS_FILE, SplitPredictions, read, recompute, write
from rethink_tl.evidence.report import report
from rethink_tl.evidence.stats import Ranked, Scored, Holdout, TooFewImages, bootstrap, delong, weighted_ap, weighted_auroc

pytestmark = pytest.mark.usefixtures("one_thread")

CUT0, CUT1 = "trunc-tf_efficientnet_lite0-cut0", "trunc-tf_efficientnet_lite0-cut1"


# --- the metrics the bootstrap uses -------------------------------------------------------------------

def test_weighted_metrics_equal_sklearn_with_sample_weight_ties_and_zero_weights():
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(150):
        n = int(rng.integers(4, 50))
        y = rng.random(n) < 0.4
        s = np.round(rng.random(n), 1)  # many ties
        w = rng.integers(0, 3, (3, n)).astype(float)  # zeros: images left out of a resample
        ranked = Ranked.of(y, s)
        auroc, ap = weighted_auroc(ranked, w), weighted_ap(ranked, w)
        for b in range(3):
            if (w[b][y] > 0).any() and (w[b][~y] > 0).any():
                assert auroc[b] == pytest.approx(roc_auc_score(y, s, sample_weight=w[b]), abs=1e-12)
                assert ap[b] == pytest.approx(average_precision_score(y, s, sample_weight=w[b]), abs=1e-12)
                checked += 1
            else:
                assert math.isnan(auroc[b]) and math.isnan(ap[b])
    assert checked > 300


def test_delong_against_a_hand_computed_case():
    # 3 positives, 2 negatives. Model A: positives 0.9 0.6 0.4, negatives 0.5 0.3; model B: 0.8 0.1 0.7 / 0.6 0.2.
    # A: V10 = 1, 1, 1/2 (share of negatives below each positive), AUROC 5/6; V01 = 2/3, 1.
    # B: V10 = 1, 0, 1; AUROC 2/3; V01 = 2/3, 2/3.
    # A - B = 1/6. Positives: V10 differences 0, 1, -1/2, minus 1/6: squares 1/36 + 25/36 + 16/36 = 7/6,
    # over m(m-1) = 6: 7/36. Negatives: 0, 1/3 minus 1/6: squares 2/36, over n(n-1) = 2: 1/36.
    # var = 8/36 = 2/9 (as DeLong's S10/m + S01/n with S10 = [[1/12, -1/12], [-1/12, 1/3]], S01 = [[1/18, 0], [0, 0]]),
    # z = (1/6) / sqrt(2/9) = 0.353553, p = 2 (1 - Phi(z)) = 0.723674.
    y = np.array([1, 1, 1, 0, 0])
    a = np.array([0.9, 0.6, 0.4, 0.5, 0.3])
    b = np.array([0.8, 0.1, 0.7, 0.6, 0.2])
    auc, v10, v01 = stats.placements(y, a)
    assert auc == pytest.approx(5 / 6) and v10 == pytest.approx([1, 1, 0.5]) and v01 == pytest.approx([2 / 3, 1])
    test = Holdout.of(y[:, None], np.ones((5, 1), bool), ["x"], None)
    result = delong(test, [Scored("A", {0: a[:, None]}), Scored("B", {0: b[:, None]})], 0, 1)
    assert result.estimate == pytest.approx(1 / 6)
    assert result.se == pytest.approx(math.sqrt(2 / 9))
    assert result.z == pytest.approx(0.353553, abs=1e-6)
    assert result.p == pytest.approx(0.723674, abs=1e-6)


def test_clustered_delong_counts_patients_as_obuchowski():
    # Positives 0.9 0.6 (patient p1) and 0.4 (p2); negatives 0.5 (n1) and 0.3 (n2); B scores every image 0.5.
    # A: V10 = 1, 1, 1/2, AUROC 5/6; V01 = 2/3, 1. Obuchowski (1997), per patient: V10 sums 2 and 1/2 less
    # m_i A = 5/3 and 5/6: 1/3, -1/3; S10 = I10 / ((I10 - 1) M) x 2/9 = 2 / 3 x 2/9 = 4/27, over M = 3: 4/81.
    # V01: 2/3 - 5/6, 1 - 5/6: squares 1/18; S01 = 2 / 2 x 1/18, over N = 2: 1/36. S11 = 0 (no patient has
    # both). var = 4/81 + 1/36 = 25/324, se 5/18; B's terms are all 0 (AUROC 1/2, every V 1/2); z = (1/3)/(5/18).
    # Counted in images (m/(m-1) = 3/2 for the positives) the variance would be 21/324: 0.84 of it.
    y = np.array([[1], [1], [1], [0], [0]])
    a = np.array([0.9, 0.6, 0.4, 0.5, 0.3])[:, None]
    test = Holdout.of(y, np.ones((5, 1), bool), ["x"], ["p1", "p1", "p2", "n1", "n2"])
    out = delong(test, [Scored("A", {0: a}), Scored("B", {0: np.full((5, 1), 0.5)})], 0, 1)
    assert out.estimate == pytest.approx(1 / 3) and out.se == pytest.approx(5 / 18, abs=1e-12)
    assert out.z == pytest.approx(1.2)


def test_patients_are_resampled_whole():
    labels = np.array([[1], [0], [1], [0], [0], [1]])
    test = Holdout.of(labels, np.ones((6, 1), bool), ["x"], ["p1", "p1", "p2", "p2", "p3", "p3"])
    assert test.unit_kind == "patients" and test.n_units == 3
    probs = np.linspace(0, 1, 6)[:, None]
    stat = stats.Statistic(test, [Scored("A", {0: probs})], [("mean", "auroc", 0)])
    seen = []
    stat.values = lambda w: seen.append(w) or np.zeros((1, len(w)))
    stat(np.array([[0, 0, 2], [1, 2, 2]]))
    assert seen[0].tolist() == [[2, 2, 0, 0, 1, 1], [0, 0, 1, 1, 2, 2]]  # every image weighs its patient's count


def test_an_image_with_a_blank_patient_id_is_a_patient_of_its_own():
    """Not one giant patient of every image without an id (which a bootstrap would resample as one)."""
    ids = ["p1", "p1", "", " ", None, float("nan"), "p2", "p3"]
    test = Holdout.of(np.zeros((8, 1)), np.ones((8, 1), bool), ["x"], ids)
    u = test.units.tolist()
    assert test.n_units == 7 and u[0] == u[1] and len(set(u[2:])) == 6


def test_too_few_positives_for_a_bootstrap_is_refused():
    labels = np.array([[1], [0], [0], [0]])
    test = Holdout.of(labels, np.ones((4, 1), bool), ["nodule"], None)
    with pytest.raises(TooFewImages, match="'nodule' has 1 images with a positive"):
        bootstrap(test, [Scored("A", {0: np.ones((4, 1))})], [("mean", "auroc", 0)], resamples=100)


# --- a tiny sweep, and rtl report ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """2 models (Lite0 cut after stage 0 and after stage 1) x RI / TL (real ImageNet weights) x 3 seeds."""
    from rethink_tl.train import run

    root = tmp_path_factory.mktemp("sweep")
    for cut in (0, 1):
        for init in ("random", "pretrained"):
            for seed in (0, 1, 2):
                cfg = compose_cfg([*TINY_DATA, "model=trunc", f"model.cut={cut}", f"init={init}", f"train.seed={seed}",
                                   "train.epochs=2"])
                run(cfg, root / f"cut{cut}" / init / f"s{seed}")
    return root


@pytest.mark.slow
def test_predictions_recompute_the_results_row(sweep):
    run_dir = sweep / "cut1" / "pretrained" / "s0"
    row = pd.read_csv(run_dir / "results.csv").iloc[0]
    pred = read(run_dir / PREDICTIONS_FILE)
    assert pred.splits() == ["val", "test"] and pred.label_names == ["opacity", "nodule"]
    for split in ("val", "test"):
        scores = recompute(pred, split)
        assert len(pred.split(split)) == row[f"n_{split}"]
        for metric in ("auroc", "auprc", "auprc_trapz"):
            assert scores.macro[metric] == row[f"{split}_{metric}"]  # exactly: the file keeps the float32 values
            for label in pred.label_names:
                assert scores.per_label[metric][label] == row[f"{split}_{metric}_{label}"]


def _independent(sweep, a: str, b: str, metric: str, resamples: int, seed: int):
    """The paired bootstrap of (mean over seeds of macro metric a - b), straight from the files with sklearn:
    scipy draws the resamples (same rng, same batches), one sklearn call per resample, label and run."""
    def load(side):
        out = {}
        for s in (0, 1, 2):
            with gzip.open(sweep / side / f"s{s}" / PREDICTIONS_FILE) as fh:
                df = pd.read_csv(io.BytesIO(fh.read()))
            out[s] = df[df["split"] == "test"].reset_index(drop=True)
        return out

    A, B = load(a), load(b)
    score = {"auroc": roc_auc_score, "auprc": average_precision_score}[metric]
    n = len(A[0])

    def statistic(drawn):
        w = np.bincount(drawn, minlength=n).astype(float)
        diffs = []
        for s in (0, 1, 2):
            per = []
            for side in (A, B):
                df = side[s]
                per.append(np.mean([score(df[f"true_{lab}"], df[f"prob_{lab}"], sample_weight=w)
                                    for lab in ("opacity", "nodule")]))
            diffs.append(per[0] - per[1])
        return np.mean(diffs)

    res = scipy.stats.bootstrap((np.arange(n),), statistic, n_resamples=resamples, batch=stats.BATCH,
                                vectorized=False, method="BCa", rng=np.random.default_rng(seed))
    # widened about the estimate by sqrt(m/(m-1)) t(m-1)/z, m the fewest positive or negative test images of a label
    m = min(min(int(A[0][f"true_{lab}"].sum()), int((A[0][f"true_{lab}"] == 0).sum())) for lab in ("opacity", "nodule"))
    f = np.sqrt(m / (m - 1)) * scipy.stats.t.ppf(0.975, m - 1) / scipy.stats.norm.ppf(0.975)
    est = statistic(np.arange(n))
    low, high = res.confidence_interval.low, res.confidence_interval.high
    return est, max(-1.0, est - f * (est - low)), min(1.0, est + f * (high - est))


@pytest.mark.slow
def test_report_writes_intervals_and_the_comparisons_table(sweep, tmp_path):
    out = tmp_path / "report"
    done = report(sweep, out=out, resamples=300, seed=7, compare=[(f"{CUT1}/pretrained", f"{CUT0}/pretrained")])
    assert done.problems == []
    comp = pd.read_csv(out / "comparisons.csv")
    kinds = comp.groupby("comparison").size().to_dict()
    assert kinds == {"TL vs RI": 4, "asked": 2}  # 2 models x 2 metrics; the asked pair x 2 metrics
    assert set(comp["seeds"]) == {"0 1 2"} and set(comp["resamples"]) == {300} and set(comp["seed"]) == {7}
    assert comp[comp["metric"] == "auroc"]["p_delong"].between(0, 1).all()
    assert comp[comp["metric"] == "auprc"]["p_delong"].isna().all()
    from rethink_tl.evidence.compare import holm
    assert comp["p_holm"].to_numpy() == pytest.approx(holm(comp["p_bootstrap"].to_numpy()))  # the table's 6 tests
    assert (comp["p_holm"] >= comp["p_bootstrap"]).all()

    # One interval, recomputed independently from the predictions files with the same seed.
    asked = comp[(comp["comparison"] == "asked") & (comp["metric"] == "auprc")].iloc[0]
    estimate, low, high = _independent(sweep, "cut1/pretrained", "cut0/pretrained", "auprc", 300, 7)
    assert asked["difference"] == pytest.approx(estimate, abs=1e-12)
    assert (asked["ci_low"], asked["ci_high"]) == pytest.approx((low, high), abs=1e-12)
    assert asked["ci_low"] <= asked["difference"] <= asked["ci_high"]

    summary = pd.read_csv(out / "summary.csv")
    assert (summary["test_auroc_ci_low"] <= summary["test_auroc_mean"]).all()
    assert (summary["test_auroc_mean"] <= summary["test_auroc_ci_high"]).all()
    md = (out / "summary.md").read_text()
    assert "| synthetic | test split | 1 | TL vs RI |" in md and "p (DeLong)" in md
    assert "300 resamples, seed 7" in md and "test images" in md
    # Reproducible: the same call writes the same numbers.
    again = tmp_path / "again"
    report(sweep, out=again, resamples=300, seed=7, compare=[(f"{CUT1}/pretrained", f"{CUT0}/pretrained")])
    assert (again / "comparisons.csv").read_bytes() == (out / "comparisons.csv").read_bytes()
    report(sweep, out=again, resamples=0)  # no intervals asked for: the earlier comparisons must not stay behind
    assert not (again / "comparisons.csv").exists() and "test_auroc_ci_low" not in pd.read_csv(again / "summary.csv")


def test_report_cli_refuses_an_unknown_compare_side_and_too_few_images(sweep, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(sweep), "--out", str(tmp_path / "a"), "--compare", "dens_t1/pretrained", f"{CUT0}/random"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "--compare dens_t1/pretrained: no setting" in err[0]

    for argv, words in ((["--seed", "-1"], "--seed -1: use a whole number"),
                        (["--resamples", "10000000"], "use 0 (no intervals) or 100 to 100,000"),
                        (["--compare", f"{CUT0}/TL", f"{CUT0}/pretrained"], "both sides are the same settings"),
                        (["--compare", CUT0, f"{CUT1}/pretrained"], f"{CUT0} is 2 settings of this report")):
        assert words in fails_in_one_line(capsys, ["report", sweep, "--out", tmp_path / "b", *argv])

    # A predictions file copied from another run (same test images) must not lend it its predictions.
    swapped = tmp_path / "swapped"
    for side in ("cut0", "cut1"):
        shutil.copytree(sweep / side / "pretrained", swapped / side / "pretrained")
    (swapped / "cut0" / "pretrained" / "s1" / PREDICTIONS_FILE).write_bytes(
        (swapped / "cut1" / "pretrained" / "s1" / PREDICTIONS_FILE).read_bytes())
    done = report(swapped, resamples=100)
    assert len(done.problems) == 1 and "is not this run's" in done.problems[0] and "cut0/pretrained/s1" in done.problems[0]
    summary = pd.read_csv(swapped / "summary.csv").set_index("model")
    assert np.isnan(summary.loc[CUT0, "test_auroc_ci_low"]) and not np.isnan(summary.loc[CUT1, "test_auroc_ci_low"])

    # A run whose test split has one positive nodule: its row gets no interval, and the report exits 2.
    run_dir = sweep / "cut0" / "random" / "s0"
    few = tmp_path / "few" / "run"
    few.mkdir(parents=True)
    for name in ("results.csv", "identity.json", "config.yaml"):
        (few / name).write_bytes((run_dir / name).read_bytes())
    pred = read(run_dir / PREDICTIONS_FILE)
    test = pred.split("test")
    test.labels[:, 1] = 0
    test.labels[0, 1] = 1
    write(few / PREDICTIONS_FILE, {"val": pred.split("val"), "test": test}, pred.label_names)
    row = pd.read_csv(few / "results.csv")  # consistent with the edited file, as a run with such a split would be
    for metric, value in recompute(read(few / PREDICTIONS_FILE), "test").macro.items():
        row[f"test_{metric}"] = value
    row.to_csv(few / "results.csv", index=False)
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path / "few"), "--resamples", "100"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1
    assert "'nodule' has 1 images with a positive" in err[0] and "too few for a bootstrap" in err[0]
    assert (tmp_path / "few" / "summary.md").exists()  # the tables are still written


def test_predictions_file_round_trips_float32_and_patients(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.random((5, 2)).astype(np.float32)
    labels = (rng.random((5, 2)) < 0.5).astype(np.float32)
    mask = np.array([[1, 1], [1, 0], [1, 1], [0, 1], [1, 1]], bool)
    sp = SplitPredictions([f"img{i}.png" for i in range(5)], ["p1", "p1", "p2", "p3", "p3"], labels, mask, probs)
    write(tmp_path / PREDICTIONS_FILE, {"test": sp}, ["a b", "c"])
    back = read(tmp_path / PREDICTIONS_FILE).split("test")
    assert back.ids == sp.ids and back.patients == sp.patients
    assert np.array_equal(back.probs, probs) and np.array_equal(back.mask, mask)
    assert np.array_equal(back.labels[mask], labels[mask])
    first = (tmp_path / PREDICTIONS_FILE).read_bytes()
    write(tmp_path / PREDICTIONS_FILE, {"test": sp}, ["a b", "c"])
    assert (tmp_path / PREDICTIONS_FILE).read_bytes() == first  # no timestamp inside


@pytest.mark.slow
def test_report_includes_external_results_and_leaves_out_stale_ones(sweep, tmp_path, capsys):
    root = tmp_path / "sweep"
    shutil.copytree(sweep, root)
    main(["evaluate", str(root), "data=synthetic", "data.num_samples=200", "data.seed=11", "--name", "site2"])
    assert "12 runs evaluated on site2" in capsys.readouterr().out
    out = tmp_path / "report"
    done = report(root, out=out, resamples=200, seed=0)
    assert done.problems == []
    external = pd.read_csv(out / "external.csv")
    assert len(external) == 4 and set(external["n"]) == {3} and set(external["dataset"]) == {"site2"}
    # Each row's mean is the mean of its three runs' external results.
    row = external[(external["model"] == CUT1) & (external["init"] == "pretrained")].iloc[0]
    values = [pd.read_csv(root / "cut1" / "pretrained" / f"s{s}" / "external" / "site2" / "results.csv")["test_auprc"][0]
              for s in (0, 1, 2)]
    assert row["test_auprc_mean"] == pytest.approx(np.mean(values), abs=1e-12)
    assert row["test_auprc_ci_low"] <= row["test_auprc_mean"] <= row["test_auprc_ci_high"]
    comp = pd.read_csv(out / "comparisons.csv")
    assert (comp["scored_on"] == "external (trained on synthetic)").sum() == 4  # TL vs RI, 2 models x 2 metrics
    assert "external validation" in (out / "summary.md").read_text()
    # Calibration on the external images too; operating points there at each source run's validation threshold.
    assert row["test_brier_mean"] > 0 and row["test_ece_ci_low"] <= row["test_ece_mean"] <= row["test_ece_ci_high"]
    report(root, out=out, resamples=200, seed=0, operating_point="youden")
    points = pd.read_csv(out / "operating_points.csv")
    ext = points[points["scored_on"] == "external (trained on synthetic)"]
    assert len(ext) == 4 * 2 and (points["scored_on"] == "test split").sum() == 4 * 2
    for (model, init), grp in ext.groupby(["model", "init"]):
        own = points[(points["scored_on"] == "test split") & (points["model"] == model) & (points["init"] == init)]
        assert list(grp["thresholds_per_seed"]) == list(own["thresholds_per_seed"])  # the source runs' thresholds

    # The run is trained again: its external results belong to the old checkpoint and are left out, loudly.
    results = root / "cut0" / "random" / "s1" / "results.csv"
    df = pd.read_csv(results)
    df["finished"] = "2031-01-01T00:00:00+00:00"
    df.to_csv(results, index=False)
    done = report(root, out=out, resamples=200, seed=0)
    assert len(done.problems) == 1 and "trained again since" in done.problems[0]
    assert pd.read_csv(out / "external.csv").set_index(["model", "init"]).loc[(CUT0, "random"), "n"] == 2


def test_holm_adjusts_a_family_of_p_values_step_down():
    from rethink_tl.evidence.compare import holm

    # Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (never below the one
    # before); NaN is not a test and does not count in k.
    p = np.array([0.01, 0.04, 0.03, np.nan, 0.005])
    out = holm(p)
    assert out[[0, 1, 2, 4]] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and np.isnan(out[3])
    assert holm(np.array([0.5, 0.6])) == pytest.approx([1.0, 1.0])  # capped at 1
    assert len(holm(np.array([]))) == 0


def test_tl_vs_ri_figure_marks_significant_differences(sweep, tmp_path):
    from rethink_tl.evidence import figures
    from rethink_tl.evidence.report import gather, summarise

    found = gather(sweep)
    summary = summarise(found.runs, found.settings)
    base = {"comparison": "TL vs RI", "fraction": 1.0, "metric": "auprc"}
    marks = pd.DataFrame([{**base, "a_model": CUT1, "p_bootstrap": 0.004},
                          {**base, "a_model": CUT0, "p_bootstrap": 0.3}])  # not significant: no mark
    figures._MARKS = marks
    try:
        fig = figures.fig3(summary, [CUT0, CUT1], "", ("auroc", "auprc"))
    finally:
        figures._MARKS = pd.DataFrame()
    texts = {(i, t.get_text(), t.xy[0]) for i, ax in enumerate(fig.axes) for t in ax.texts}
    assert texts == {(1, "**", 1)}  # the AUPRC panel (second row), above the second model's bars
    note = " ".join(" ".join(t.get_text() for t in fig.texts).split())  # wrapped to the figure's width
    assert "paired bootstrap" in note and "uncorrected (p_bootstrap; 2 tests in comparisons.csv, p_holm" in note


def test_compare_names_one_setting_of_an_lr_sweep(tmp_path, capsys):
    """Two learning rates of one model x init are two settings: --compare X/random X/random is ambiguous, and
    X/random:train.lr=A X/random:train.lr=B compares exactly those two."""
    root = tmp_path / "lr"
    for lr in ("0.001", "0.01"):
        for seed in (0, 1):
            train_tiny(root / f"lr{lr}" / f"s{seed}", f"train.lr={lr}", f"train.seed={seed}", "train.epochs=1")
    err = fails_in_one_line(capsys, ["report", root, "--out", tmp_path / "refused", "--compare", f"{CUT1}/random",
                                     f"{CUT1}/random"])
    assert err.endswith(f"{CUT1}/random is 2 settings of this report (train.lr=0.001; train.lr=0.01): name one side "
                        f"with its settings, e.g. {CUT1}/random:train.lr=0.001")

    out = tmp_path / "report"
    done = report(root, out=out, resamples=100, seed=0,
                  compare=[(f"{CUT1}/random:train.lr=0.01", f"{CUT1}/RI:train.lr=0.001")])
    assert done.problems == []
    comp = pd.read_csv(out / "comparisons.csv", dtype={"seeds": str})
    assert comp[["comparison", "a", "b", "metric", "seeds"]].values.tolist() == [
        ["asked", f"{CUT1} RI [train.lr=0.01]", f"{CUT1} RI [train.lr=0.001]", metric, "0 1"]
        for metric in ("auroc", "auprc")]
    # A - B is the difference of the two rows' seed means, both over seeds 0 and 1.
    mean = pd.read_csv(out / "summary.csv").set_index("settings")
    for _, row in comp.iterrows():
        want = mean.loc["train.lr=0.01", f"test_{row.metric}_mean"] - mean.loc["train.lr=0.001", f"test_{row.metric}_mean"]
        assert row["difference"] == pytest.approx(want, abs=1e-9)


@pytest.mark.slow
def test_report_writes_operating_points_and_calibration(sweep, tmp_path, capsys):
    """Issue 22: each run's threshold from its own validation predictions, its rates on test; Brier and ECE per
    label in summary.csv, equal to the seed-mean recomputed here from the predictions files; the diagram."""
    from rethink_tl.evidence.clinical import Rule, choose_threshold

    out = tmp_path / "report"
    done = report(sweep, out=out, resamples=200, seed=3, operating_point="sens=0.8", figure="calibration")
    assert done.problems == []
    points = pd.read_csv(out / "operating_points.csv")
    assert len(points) == 4 * 2 and set(points["rule"]) == {"sens=0.8"} and set(points["seeds"]) == {"0 1 2"}
    row = points[(points["model"] == CUT1) & (points["init"] == "pretrained") & (points["label"] == "nodule")].iloc[0]
    sens, spec, thresholds = [], [], []
    briers = []
    for seed in (0, 1, 2):
        pred = read(sweep / "cut1" / "pretrained" / f"s{seed}" / PREDICTIONS_FILE)
        val, test = pred.split("val"), pred.split("test")
        t = choose_threshold(val.labels[:, 1] > 0.5, val.probs[:, 1], Rule("sens", 0.8))
        assert (val.probs[:, 1][val.labels[:, 1] > 0.5] >= t).mean() >= 0.8
        called, y = test.probs[:, 1] >= t, test.labels[:, 1] > 0.5
        thresholds.append(t)
        sens.append(called[y].mean())
        spec.append((~called[~y]).mean())
        briers.append(np.mean((test.probs[:, 1].astype(np.float64) - y) ** 2))
    assert row["thresholds_per_seed"] == " ".join(repr(t) for t in thresholds)  # exactly: applied by hand, the same
    assert row["sensitivity"] == pytest.approx(np.mean(sens)) and row["specificity"] == pytest.approx(np.mean(spec))
    assert row["sensitivity_ci_low"] <= row["sensitivity"] <= row["sensitivity_ci_high"]
    summary = pd.read_csv(out / "summary.csv")
    mine = summary[(summary["model"] == CUT1) & (summary["init"] == "pretrained")].iloc[0]
    assert mine["test_brier_nodule_mean"] == pytest.approx(np.mean(briers))
    assert mine["test_ece_nodule_ci_low"] <= mine["test_ece_nodule_mean"] <= mine["test_ece_nodule_ci_high"]
    assert mine["test_brier_mean"] == pytest.approx((mine["test_brier_nodule_mean"] + mine["test_brier_opacity_mean"]) / 2)
    md = (out / "summary.md").read_text()
    assert "operating points (also in operating_points.csv)" in md and "10 equal-width probability bins" in md
    assert (out / "calibration.png").stat().st_size > 10_000 and len(pd.read_csv(out / "calibration.csv")) == 4 * 2 * 10
    # Not asked for again: the earlier operating points and diagram do not stay behind; a bad rule is one line.
    report(sweep, out=out, resamples=0)
    assert not (out / "operating_points.csv").exists() and not (out / "calibration.png").exists()
    # Asked for, but no setting carries the column: the tables are written, and the report exits 2 saying so.
    done = report(sweep, out=out, resamples=0, by="sex")
    assert len(done.problems) == 1 and "carry no sex" in done.problems[0] and "columns kept: none" in done.problems[0]
    # A damaged predictions file, with operating points asked for: named, exit 2.
    broken = tmp_path / "broken"
    shutil.copytree(sweep, broken)
    victim = broken / "cut0" / "random" / "s1" / PREDICTIONS_FILE
    victim.write_bytes(victim.read_bytes()[:300])
    done = report(broken, out=tmp_path / "b", resamples=0, operating_point="youden")
    assert any("no operating point" in p and "damaged" in p for p in done.problems)
    err = fails_in_one_line(capsys, ["report", str(sweep), "--out", str(tmp_path / "x"), "--operating-point", "sens=2"])
    assert "sens= needs a share between 0 and 1" in err
