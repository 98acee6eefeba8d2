"""Multi-class statistics: merged sums against scikit-learn on the pooled cases."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score

from radfed.config import RunConfig
from radfed.metrics.multiclass import MulticlassStats, multiclass_metrics
from radfed.tasks.classification import TASK

BINS = 1000


def _cases(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), labels] += 1.5  # informative but imperfect
    scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return scores, labels


def test_pooled_metrics_of_merged_sites_match_sklearn_on_pooled_cases() -> None:
    # Prepare: two sites of a 3-class problem
    a_scores, a_labels = _cases(300, 3, seed=1)
    b_scores, b_labels = _cases(200, 3, seed=2)
    # Execute
    pooled = MulticlassStats.from_scores(
        a_scores, a_labels, bins=BINS
    ) + MulticlassStats.from_scores(b_scores, b_labels, bins=BINS)
    values = multiclass_metrics(pooled)
    # Assert
    scores, labels = np.concatenate([a_scores, b_scores]), np.concatenate([a_labels, b_labels])
    predicted = scores.argmax(axis=1)
    assert np.array_equal(np.array(pooled.confusion), confusion_matrix(labels, predicted))
    assert values["accuracy"] == pytest.approx(np.mean(predicted == labels), abs=1e-6)
    assert values["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(labels, predicted), abs=1e-6
    )
    exact = roc_auc_score(labels, scores, multi_class="ovr", average="macro")
    assert values["auc_tie_bound"] is not None and values["auc_tie_bound"] < 0.01
    assert abs(values["auc"] - exact) <= values["auc_tie_bound"] + 1e-6  # type: ignore[operator]
    for c in range(3):
        one = roc_auc_score(labels == c, scores[:, c])
        assert values[f"auc_class_{c}"] == pytest.approx(one, abs=0.01)


def test_small_cells_are_suppressed_and_histograms_coarsened() -> None:
    scores, labels = _cases(40, 3, seed=3)
    stats = MulticlassStats.from_scores(scores, labels, bins=BINS)
    assert stats.with_min_cell(41).suppressed and stats.with_min_cell(41).n == 0
    coarse = stats.with_min_cell(10)
    assert coarse.confusion == stats.confusion
    for part in coarse.per_class:
        both = np.array(part.pos_hist) + np.array(part.neg_hist)
        assert both[both > 0].min() >= 10


def test_record_values_round_trip_and_reject_inconsistent_counts() -> None:
    config = RunConfig(num_classes=3, score_bins=BINS)
    scores, labels = _cases(50, 3, seed=4)
    stats = MulticlassStats.from_scores(scores, labels, bins=BINS)
    values = TASK.to_values(stats)
    assert TASK.from_values(values, config) == stats
    broken = dict(values, confusion=[*values["confusion"][:-1], 99])  # type: ignore[misc]
    with pytest.raises(ValueError, match="histograms disagree"):
        TASK.from_values(broken, config)
    with pytest.raises(ValueError, match="list of 9 counts"):
        TASK.from_values(dict(values, confusion=[1, 2]), config)
    assert TASK.empty_stats(dataclasses.replace(config, num_classes=2)).n == 0
