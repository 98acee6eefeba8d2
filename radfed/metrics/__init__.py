"""Metrics as pure functions over mergeable statistics."""

from radfed.metrics.binary import (
    BinaryStats,
    BinaryStatsAccumulator,
    accuracy,
    auc_from_histograms,
    auc_tie_bound,
    binary_metrics,
    sensitivity,
    specificity,
)

__all__ = [
    "BinaryStats",
    "BinaryStatsAccumulator",
    "accuracy",
    "auc_from_histograms",
    "auc_tie_bound",
    "binary_metrics",
    "sensitivity",
    "specificity",
]
