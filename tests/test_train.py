import math

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from rethink_tl import atomic_io as checkpoint
from rethink_tl.data import build_data
from rethink_tl.models import build_model
from sklearn.metrics import auc, precision_recall_curve

from rethink_tl.engine import Batcher, make_optimizer, predict_probs, score_split
from rethink_tl.train import run


def test_plateau_halves_the_learning_rate():
    model = torch.nn.Linear(2, 1)
    tc = OmegaConf.create({"lr": 1e-5, "lr_factor": 0.5, "patience": 2, "weight_decay": 0.0})
    opt, sched = make_optimizer(model, tc)
    lrs = []
    for auprc in [0.50, 0.60, 0.60, 0.60, 0.60, 0.61, 0.61, 0.61, 0.61]:
        sched.step(auprc)
        lrs.append(opt.param_groups[0]["lr"])
    # Best 0.60 at step 2; steps 3, 4 are patience; step 5 is the third without a gain -> halve.
    # 0.61 at step 6 is a new best; 3 more flat steps halve again.
    assert lrs == pytest.approx([1e-5] * 4 + [5e-6] * 4 + [2.5e-6])


@pytest.mark.slow
def test_run_writes_outputs_and_tests_the_best_validation_epoch(tmp_path, tiny_cfg):
    cfg = tiny_cfg("train.epochs=4", "train.patience=0")
    row = run(cfg, tmp_path)
    for name in ("metrics.csv", "results.csv", "best.pt", "last.pt", "config.yaml"):
        assert (tmp_path / name).is_file(), name
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert list(metrics.epoch) == [1, 2, 3, 4]
    for col in ("lr", "train_loss", "val_auroc", "val_auprc", "val_auroc_opacity", "val_auprc_nodule", "seconds"):
        assert col in metrics.columns
    best_epoch = int(metrics.val_auprc.idxmax()) + 1
    assert row["best_epoch"] == best_epoch
    assert row["val_auprc"] == pytest.approx(metrics.val_auprc.max())

    # The lr column is what a ReduceLROnPlateau fed the logged val AUPRCs produces (patience 0).
    opt, sched = make_optimizer(torch.nn.Linear(1, 1), cfg.train)
    expected = []
    for v in metrics.val_auprc:
        expected.append(opt.param_groups[0]["lr"])
        sched.step(v)
    assert list(metrics.lr) == pytest.approx(expected)

    # Test metrics are those of best.pt, not of the last epoch.
    data = build_data(cfg.data)
    model = build_model(cfg.model, num_labels=2)
    model.load_state_dict(checkpoint.load(tmp_path / "best.pt")["model"])
    batcher = Batcher(torch.tensor(model.info.mean).view(1, 3, 1, 1), torch.tensor(model.info.std).view(1, 3, 1, 1),
                      torch.device("cpu"), True)
    test = score_split(model, data.test, batcher, 64, data.label_names, "test")
    assert row["test_auprc"] == pytest.approx(test.macro["auprc"], abs=1e-6)
    assert row["test_auroc"] == pytest.approx(test.macro["auroc"], abs=1e-6)

    results = pd.read_csv(tmp_path / "results.csv")
    assert len(results) == 1
    for col in ("dataset", "model", "init", "strategy", "fraction", "seed", "params", "best_epoch", "val_auroc",
                "val_auprc", "test_auroc", "test_auprc", "test_auprc_opacity", "train_seconds", "images_per_s"):
        assert col in results.columns, col
    assert results.strategy[0] == "RI" and results.params[0] == sum(p.numel() for p in model.parameters())

    # The trapezoid AUPRC (the paper's authors' code) is recorded beside average precision, macro and per label,
    # and is sklearn.metrics.auc(recall, precision) of best.pt's test predictions.
    probs = predict_probs(model, data.test, batcher, 64)
    trapz = []
    for j, label in enumerate(data.label_names):
        precision, recall, _ = precision_recall_curve(data.test.labels[:, j].numpy(), probs[:, j])
        trapz.append(auc(recall, precision))
        assert results[f"test_auprc_trapz_{label}"][0] == pytest.approx(trapz[-1], abs=1e-6)
        assert results[f"test_auprc_{label}"][0] != pytest.approx(trapz[-1], abs=1e-6)
    assert results["test_auprc_trapz"][0] == pytest.approx(sum(trapz) / len(trapz), abs=1e-6)
    assert {"val_auprc_trapz", "val_auprc_trapz_nodule"} <= set(metrics.columns)


@pytest.mark.slow
def test_same_seed_gives_identical_metrics(tmp_path, tiny_cfg):
    a = run(tiny_cfg("train.epochs=2"), tmp_path / "a")
    b = run(tiny_cfg("train.epochs=2"), tmp_path / "b")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a/metrics.csv").drop(columns="seconds"),
                                  pd.read_csv(tmp_path / "b/metrics.csv").drop(columns="seconds"))
    for key in ("test_auroc", "test_auprc", "val_auprc", "best_epoch"):
        assert a[key] == b[key]
    c = run(tiny_cfg("train.epochs=2", "train.seed=1"), tmp_path / "c")
    assert c["val_auprc"] != a["val_auprc"] or c["test_auprc"] != a["test_auprc"]


def test_fraction_is_stratified_and_independent_of_the_training_seed(tiny_cfg):
    full = build_data(tiny_cfg().data)
    cfg = tiny_cfg("data.fraction=0.5")
    half = build_data(cfg.data)
    assert len(half.train) == pytest.approx(len(full.train) / 2, abs=3)
    assert (half.train.positives() > 0).all()
    assert len(half.val) == len(full.val) and len(half.test) == len(full.test)
    again = build_data(tiny_cfg("data.fraction=0.5", "train.seed=7").data)
    assert again.train.ids == half.train.ids
    other = build_data(tiny_cfg("data.fraction=0.5", "data.subset_seed=1").data)
    assert other.train.ids != half.train.ids


# A setting learnable by a wide margin on any CPU (issue 9: no test may depend on one seed's outcome). One label
# (nodule: small dense spots), balanced classes, 2000 images at 48 px (1300 train, 500 test), model.cut=1,
# lr 1e-2, 12 epochs, no augmentation: about 15-20 s on one CPU thread. Measured with runtime.threads=1 over
# train.seed 0-4 x data.seed 0-2 (15 runs): test AUROC min 0.858, mean 0.881, max 0.915 (sd 0.015); the same
# models before training 0.436-0.550, so training gains at least 0.311. Both asserts leave >= 0.15 of margin,
# ten seed-to-seed standard deviations; the old setting (two labels, 600 images, cut 2, 6 epochs) gave 0.52-0.60.
LEARNABLE = ("data.labels=[nodule]", "data.prevalence=0.5", "data.test_prevalence=0.5", "data.num_samples=2000",
             "data.image_size=48", "model.cut=1", "train.epochs=12", "train.batch_size=32", "train.lr=1e-2",
             "train.rotate_degrees=0", "train.scale_jitter=0")


@pytest.mark.slow
def test_learns_above_chance(tmp_path, tiny_cfg):
    from rethink_tl.train import setup

    cfg = tiny_cfg(*LEARNABLE)
    untrained = setup(cfg)  # the model run() starts from: same seed, same data
    before = score_split(untrained.model, untrained.data.test, untrained.eval_batcher, 256, untrained.labels,
                      "test").macro["auroc"]
    row = run(cfg, tmp_path)
    assert row["test_auroc"] > 0.70 and not math.isnan(row["test_auprc"]), (before, row["test_auroc"])
    assert row["test_auroc"] - before > 0.15, (before, row["test_auroc"])


@pytest.mark.slow
def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_cfg,
                                                                                        monkeypatch):
    import rethink_tl.train as train_module
    from rethink_tl.errors import UserError

    cfg = tiny_cfg("train.epochs=3")
    steps_per_epoch = math.ceil(len(build_data(cfg.data).train) / cfg.train.batch_size)
    real = train_module.masked_bce
    calls = {"n": 0}
    snapshots = {}
    real_save = train_module.atomic_io.save

    def remember(obj, path):  # the state after epoch 2, as last.pt held it
        if path.name == "last.pt" and obj["progress"]["epoch"] == 3:
            snapshots["epoch2"] = {k: v.clone() for k, v in obj["model"].items()}
        real_save(obj, path)

    def poisoned(pos_weight):
        fn = real(pos_weight)

        def loss(logits, y, m):
            calls["n"] += 1
            value = fn(logits, y, m)
            return value * float("nan") if calls["n"] == 2 * steps_per_epoch + 2 else value

        return loss

    monkeypatch.setattr(train_module.atomic_io, "save", remember)
    monkeypatch.setattr(train_module, "masked_bce", poisoned)
    with pytest.raises(UserError, match=r"NaN or infinite at epoch 3, step 2.*last.pt still holds"):
        run(cfg, tmp_path)
    after = checkpoint.load(tmp_path / "last.pt")
    assert after["progress"]["epoch"] == 3 and after["progress"]["step"] == 0
    for key, value in snapshots["epoch2"].items():
        assert torch.equal(after["model"][key], value)
    assert len(pd.read_csv(tmp_path / "metrics.csv")) == 2


@pytest.mark.slow
def test_force_starts_over(tmp_path, tiny_cfg):
    first = run(tiny_cfg("train.epochs=1"), tmp_path)
    again = run(tiny_cfg("train.epochs=2", "runtime.force=true"), tmp_path)
    assert again["epochs_run"] == 2 and first["epochs_run"] == 1
    assert list(pd.read_csv(tmp_path / "metrics.csv").epoch) == [1, 2]


@pytest.mark.slow
def test_early_stop_after_epochs_without_a_better_validation_auprc(tmp_path, tiny_cfg):
    row = run(tiny_cfg("train.epochs=8", "train.early_stop=2", "train.lr=1e-9"), tmp_path)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    best = int(metrics.val_auprc.idxmax()) + 1
    assert row["best_epoch"] == best
    assert row["epochs_run"] == len(metrics) == min(best + 2, 8)
