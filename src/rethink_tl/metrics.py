"""AUROC and AUPRC per label and macro-averaged.

AUPRC is scikit-learn's average precision (the step-wise sum over thresholds, no
interpolation): the default everywhere. Every run also records ``auprc_trapz``, the trapezoid
area under the PR curve (``sklearn.metrics.auc(recall, precision)``), which is what the paper's
authors' public code computes: results can then be put on their scale (``rtl report --metric
auprc_trapz``). The trapezoid joins PR points linearly, which over-states precision between
them; with few positives the two differ by more than the differences the paper discusses.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

METRICS = ("auroc", "auprc", "auprc_trapz")
# How tables and figures name them; the DEFAULT_METRICS are what they show unless asked (rtl report --metric).
METRIC_NAMES = {"auroc": "AUROC", "auprc": "AUPRC", "auprc_trapz": "AUPRC (trapezoid)"}
DEFAULT_METRICS = ("auroc", "auprc")


class SingleClassWarning(UserWarning):
    """A label has only positives or only negatives in a split: its AUROC/AUPRC is undefined."""


@dataclass
class Scores:
    """Per-label and macro metrics of one split."""

    labels: list[str]
    per_label: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> label -> value
    macro: dict[str, float] = field(default_factory=dict)  # metric -> mean over defined labels

    def flat(self, prefix: str) -> dict[str, float]:
        """``{prefix_auroc: macro, prefix_auroc_<label>: value, ...}`` for CSV rows."""
        row: dict[str, float] = {}
        for metric in self.macro:
            row[f"{prefix}_{metric}"] = self.macro[metric]
        for metric in self.macro:
            for label in self.labels:
                row[f"{prefix}_{metric}_{label}"] = self.per_label[metric][label]
        return row


def auprc_trapz(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Trapezoid area under the precision-recall curve (not average precision)."""
    precision, recall, _ = precision_recall_curve(y_true, y_score)
    return float(auc(recall, precision))


_FUNCS = {
    "auroc": lambda y, s: float(roc_auc_score(y, s)),
    "auprc": lambda y, s: float(average_precision_score(y, s)),
    "auprc_trapz": auprc_trapz,
}


def score(
    y_true: np.ndarray,
    y_score: np.ndarray,
    labels: list[str],
    mask: np.ndarray | None = None,
    metrics: tuple[str, ...] = METRICS,
    split: str = "",
) -> Scores:
    """Score (N, L) targets against (N, L) scores.

    ``mask`` (N, L) marks the entries that count (False = unknown label, e.g.
    CheXpert's U-Ignore). A label whose counted entries hold a single class gets NaN
    with a warning and is left out of the macro mean.
    """
    y_true = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    y_score = np.asarray(y_score, dtype=np.float64).reshape(len(y_score), -1)
    if y_true.shape != y_score.shape or y_true.shape[1] != len(labels):
        raise ValueError(f"shape mismatch: targets {y_true.shape}, scores {y_score.shape}, {len(labels)} labels")
    if mask is None:
        mask = np.ones_like(y_true, dtype=bool)
    out = Scores(labels=list(labels), per_label={m: {} for m in metrics})
    for j, label in enumerate(labels):
        keep = np.asarray(mask[:, j], dtype=bool)
        y, s = y_true[keep, j], y_score[keep, j]
        n_pos = int(y.sum())
        if n_pos == 0 or n_pos == len(y):
            where = f" in the {split} split" if split else ""
            warnings.warn(
                f"label '{label}' has {n_pos} positives among {len(y)} images{where}: "
                "its AUROC/AUPRC are undefined (NaN) and left out of the macro mean",
                SingleClassWarning,
                stacklevel=2,
            )
            for m in metrics:
                out.per_label[m][label] = float("nan")
            continue
        for m in metrics:
            out.per_label[m][label] = _FUNCS[m](y, s)
    for m in metrics:
        values = np.array([out.per_label[m][label] for label in labels], dtype=np.float64)
        defined = values[~np.isnan(values)]
        out.macro[m] = float(defined.mean()) if len(defined) else float("nan")
    return out


# Ranks (0 = highest score) of the 10 positives among 1,000 images. A keeps its positives
# in the top 11, B spreads them over the top 30. The rank lists were chosen to land on
# the values the paper prints (A: AUROC .999 / AUPRC .990, B: .991 / .354); every other
# rank holds a negative.
TOY_POSITIVE_RANKS = {
    "A": (0, 1, 2, 3, 4, 5, 6, 7, 8, 10),
    "B": (5, 8, 9, 11, 12, 14, 15, 16, 17, 29),
}


def toy_classifiers(n_neg: int = 990) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The paper's Fig. 2 toy example: two classifiers that both look near-perfect by AUROC.

    The N = 10 + n_neg images get the distinct scores N-1 ... 0 (rank r has score N-1-r);
    positives sit at ``TOY_POSITIVE_RANKS`` and negatives fill the other ranks in order.
    Returns (y_true, {"A": scores, "B": scores}) with the 10 positives first.
    """
    n_pos = 10
    n = n_pos + n_neg
    y_true = np.zeros(n, dtype=np.int64)
    y_true[:n_pos] = 1
    out = {}
    for name, pos_ranks in TOY_POSITIVE_RANKS.items():
        neg_ranks = np.setdiff1d(np.arange(n), pos_ranks)
        ranks = np.concatenate([np.asarray(pos_ranks), neg_ranks])
        out[name] = (n - 1 - ranks).astype(np.float64)
    return y_true, out
