"""The embedded synthetic data set: API contract, determinism, and that it is learnable
by a small CNN while global intensity statistics carry no label information."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from torch import nn

from rethink_tl.data.renderer import LABELS, generate_split
from rethink_tl.errors import UserError


def test_labels_constant():
    assert isinstance(LABELS, tuple) and len(LABELS) == 2
    assert LABELS == ("opacity", "nodule")


@pytest.mark.parametrize("size", [32, 57, 256])
def test_shapes_and_dtypes(size):
    images, labels = generate_split(3, size, 0, 0.5)
    assert images.shape == (3, size, size) and images.dtype == np.uint8
    assert labels.shape == (3, len(LABELS)) and labels.dtype == np.float32
    assert set(np.unique(labels)) <= {0.0, 1.0}


def test_empty_split():
    images, labels = generate_split(0, 32, 0, 0.5)
    assert images.shape == (0, 32, 32) and labels.shape == (0, 2)


def test_same_seed_same_arrays():
    a = generate_split(12, 40, 3, 0.3)
    b = generate_split(12, 40, 3, 0.3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_image_independent_of_batch_size():
    small_x, small_y = generate_split(10, 48, 5, 0.3)
    big_x, big_y = generate_split(100, 48, 5, 0.3)
    np.testing.assert_array_equal(small_x, big_x[:10])
    np.testing.assert_array_equal(small_y, big_y[:10])


def test_different_seeds_differ():
    a, _ = generate_split(8, 32, 0, 0.5)
    b, _ = generate_split(8, 32, 1, 0.5)
    assert all(not np.array_equal(a[i], b[i]) for i in range(8))
    # Images within one split differ from each other too.
    assert len({a[i].tobytes() for i in range(8)}) == 8


def test_prevalence_only_adds_findings():
    """Raising the prevalence turns some negatives positive; it never changes the
    anatomy, so images that stay negative are bit-identical."""
    x0, y0 = generate_split(60, 32, 9, 0.0)
    x1, y1 = generate_split(60, 32, 9, 0.4)
    assert y0.sum() == 0
    still_negative = y1.sum(axis=1) == 0
    assert 0 < still_negative.sum() < 60
    np.testing.assert_array_equal(x0[still_negative], x1[still_negative])
    assert all(not np.array_equal(x0[i], x1[i]) for i in np.flatnonzero(~still_negative))


def test_same_scene_at_every_size():
    """One seed gives the same films at 32 and 128 px: labels are identical and the
    128 px image, averaged down to 32 px, matches the 32 px rendering closely
    (much more closely than another film of the same split does)."""
    x32, y32 = generate_split(30, 32, 4, 0.3)
    x128, y128 = generate_split(30, 128, 4, 0.3)
    np.testing.assert_array_equal(y32, y128)
    down = x128.reshape(30, 32, 4, 32, 4).mean(axis=(2, 4))

    def corr(a, b):
        return np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1]

    same = [corr(x32[i], down[i]) for i in range(30)]
    other = [corr(x32[i], down[(i + 1) % 30]) for i in range(30)]
    assert min(same) > 0.95, min(same)
    assert min(same) > max(other)


def test_label_subset_and_order():
    x, y = generate_split(30, 32, 2, (0.3, 0.6))
    x_rev, y_rev = generate_split(30, 32, 2, (0.6, 0.3), labels=("nodule", "opacity"))
    np.testing.assert_array_equal(x, x_rev)
    np.testing.assert_array_equal(y, y_rev[:, ::-1])

    x_op, y_op = generate_split(30, 32, 2, 0.3, labels=("opacity",))
    assert y_op.shape == (30, 1)
    np.testing.assert_array_equal(y_op[:, 0], y[:, 0])
    # Without the nodule label, no image carries a nodule: images negative for
    # opacity equal the default split's images that were negative for both.
    both_neg = y.sum(axis=1) == 0
    np.testing.assert_array_equal(x_op[both_neg], x[both_neg])


@pytest.mark.parametrize(
    "prevalence",
    [1 / 17, (0.05, 0.3)],
)
def test_prevalence_honoured(prevalence):
    n = 3200
    _, y = generate_split(n, 32, 11, prevalence)
    expected = np.broadcast_to(np.asarray(prevalence, dtype=float), (2,))
    for j, p in enumerate(expected):
        # Labels are independent Bernoulli draws: allow 4 binomial standard errors
        # (false-failure rate ~6e-5 per check).
        tol = 4.0 * math.sqrt(p * (1.0 - p) / n)
        assert abs(y[:, j].mean() - p) <= tol, (j, y[:, j].mean(), p, tol)


def test_prevalence_extremes():
    _, y0 = generate_split(50, 32, 0, 0.0)
    _, y1 = generate_split(50, 32, 0, 1.0)
    assert y0.sum() == 0 and y1.min() == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n=4, size=16, seed=0, prevalence=0.1),
        dict(n=4, size=300, seed=0, prevalence=0.1),
        dict(n=-1, size=32, seed=0, prevalence=0.1),
        dict(n=4, size=32, seed=-3, prevalence=0.1),
        dict(n=4, size=32, seed=0, prevalence=1.5),
        dict(n=4, size=32, seed=0, prevalence=float("nan")),
        dict(n=4, size=32, seed=0, prevalence=(0.1, 0.2, 0.3)),
        dict(n=4, size=32, seed=0, prevalence=0.1, labels=("effusion",)),
        dict(n=4, size=32, seed=0, prevalence=0.1, labels=()),
        dict(n=4, size=32, seed=0, prevalence=0.1, labels="opacity"),
        dict(n=4, size=32, seed=0, prevalence=0.1, labels=("nodule", "nodule")),
    ],
)
def test_bad_arguments_give_user_error(kwargs):
    with pytest.raises(UserError, match="synthetic data"):
        generate_split(**kwargs)


# --- learnable, but not through global statistics -----------------------------

_SIZE = 48
_N_TRAIN = 2000
_N_TEST = 1000


@pytest.fixture(scope="module")
def balanced():
    """Balanced splits for statistical power; train and test use different seeds."""
    train = generate_split(_N_TRAIN, _SIZE, 101, 0.5)
    test = generate_split(_N_TEST, _SIZE, 202, 0.5)
    return train, test


@pytest.mark.slow
def test_global_intensity_statistics_carry_no_label(balanced):
    (xtr, ytr), (xte, yte) = balanced
    x = np.concatenate([xtr, xte]).astype(np.float64)
    y = np.concatenate([ytr, yte])
    for name, score in (("mean", x.mean(axis=(1, 2))), ("std", x.std(axis=(1, 2)))):
        for j, label in enumerate(LABELS):
            auc = roc_auc_score(y[:, j], score)
            assert 0.4 <= auc <= 0.6, f"image {name} predicts {label}: AUROC {auc:.3f}"


def _standardise(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(x).float().unsqueeze(1) / 255.0
    return (t - t.mean(dim=(2, 3), keepdim=True)) / t.std(dim=(2, 3), keepdim=True)


class _TinyCNN(nn.Module):
    def __init__(self, n_out: int):
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.features = nn.Sequential(block(1, 16), block(16, 32), block(32, 32))
        # Average and max pooling: findings are small and can sit anywhere in a lung.
        self.head = nn.Linear(64, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x)
        return self.head(torch.cat([z.mean(dim=(2, 3)), z.amax(dim=(2, 3))], dim=1))


def _auroc_per_label(model: nn.Module, x: torch.Tensor, y: np.ndarray) -> list[float]:
    model.eval()
    with torch.no_grad():
        scores = torch.cat([model(x[k : k + 250]) for k in range(0, len(x), 250)]).numpy()
    return [roc_auc_score(y[:, j], scores[:, j]) for j in range(y.shape[1])]


@pytest.mark.slow
def test_small_cnn_learns_both_findings(balanced, record_property):
    (xtr, ytr), (xte, yte) = balanced
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        xtr_t, xte_t, ytr_t = _standardise(xtr), _standardise(xte), torch.from_numpy(ytr)
        model = _TinyCNN(len(LABELS))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        loss_fn = nn.BCEWithLogitsLoss()
        history = []
        start = time.perf_counter()
        for _ in range(8):
            model.train()
            perm = torch.randperm(len(xtr_t))
            for k in range(0, len(perm), 32):
                idx = perm[k : k + 32]
                xb = xtr_t[idx]
                # Left-right flips: the findings may sit in either lung.
                xb = torch.where(torch.rand(len(xb), 1, 1, 1) < 0.5, xb.flip(3), xb)
                opt.zero_grad()
                loss_fn(model(xb), ytr_t[idx]).backward()
                opt.step()
            history.append(_auroc_per_label(model, xte_t, yte))
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)

    record_property("cnn_auroc_after_1_epoch", history[0])
    record_property("cnn_auroc_final", history[-1])
    record_property("cnn_train_seconds", seconds)
    print(f"CNN test AUROC per epoch {[[round(a, 3) for a in h] for h in history]} in {seconds:.1f}s")
    for label, auc in zip(LABELS, history[-1]):
        assert auc > 0.75, f"tiny CNN reaches only AUROC {auc:.3f} on {label}"


def test_linear_readout_of_pixels_is_weak(balanced, record_property):
    """A linear model on raw pixels stays far below the CNN: the findings are local
    textures at random places, not a fixed pixel pattern."""
    (xtr, ytr), (xte, yte) = balanced
    ftr = xtr.reshape(len(xtr), -1) / 255.0
    fte = xte.reshape(len(xte), -1) / 255.0
    aucs = []
    for j in range(len(LABELS)):
        clf = LogisticRegression(C=0.01, max_iter=200).fit(ftr, ytr[:, j])
        aucs.append(roc_auc_score(yte[:, j], clf.decision_function(fte)))
    record_property("logreg_pixels_auroc", aucs)
    print(f"logistic regression on pixels: AUROC {[round(a, 3) for a in aucs]}")
    assert max(aucs) < 0.7
