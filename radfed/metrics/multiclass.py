"""Multi-class classification metrics from mergeable sufficient statistics.

A site summarises its per-case class probabilities as the confusion matrix of the argmax
decision plus, per class, one-vs-rest score histograms of that class's probability (a
``BinaryStats`` per class whose counts are those of the argmax decision). The server sums
them; macro one-vs-rest AUC, accuracy and per-class rates come from the sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from radfed.metrics.binary import BinaryStats, auc_from_histograms, auc_tie_bound

__all__ = ["MulticlassStats", "multiclass_metrics"]


@dataclass(frozen=True)
class MulticlassStats:
    """Sufficient statistics of C-class predictions; adding two gives the pooled statistics.

    Attributes:
        confusion: ``confusion[true][predicted]`` case counts of the argmax decision, C x C.
        per_class: one-vs-rest statistics of each class: histograms of that class's
            probability for cases of the class (``pos_hist``) and of other classes
            (``neg_hist``); counts from the argmax decision.
        suppressed: the cell held fewer cases than the site's minimum cell size.
    """

    confusion: tuple[tuple[int, ...], ...]
    per_class: tuple[BinaryStats, ...]
    suppressed: bool = False

    @classmethod
    def empty(cls, classes: int, bins: int, *, suppressed: bool = False) -> MulticlassStats:
        zeros = tuple((0,) * classes for _ in range(classes))
        return cls(zeros, tuple(BinaryStats.empty(bins) for _ in range(classes)), suppressed)

    @classmethod
    def from_scores(cls, scores: np.ndarray, labels: np.ndarray, *, bins: int) -> MulticlassStats:
        """Summarise per-case probabilities.

        Args:
            scores: class probabilities, shape ``(N, C)``, rows summing to 1.
            labels: class numbers in ``0 .. C-1``, shape ``(N,)``.
            bins: equal-width score bins on [0, 1].
        """
        scores = np.asarray(scores, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
            msg = f"scores must be (N, C) for N={labels.shape[0]} labels, got {scores.shape}"
            raise ValueError(msg)
        classes = scores.shape[1]
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            msg = f"labels must be class numbers in 0..{classes - 1}"
            raise ValueError(msg)
        if scores.size and (not np.isfinite(scores).all() or scores.min() < 0 or scores.max() > 1):
            raise ValueError("scores must be finite probabilities in [0, 1]")
        predicted = scores.argmax(axis=1) if scores.size else np.zeros(0, dtype=np.int64)
        confusion = np.zeros((classes, classes), dtype=np.int64)
        np.add.at(confusion, (labels, predicted), 1)
        per_class = []
        for c in range(classes):
            truth, decided = labels == c, predicted == c
            index = np.minimum((scores[:, c] * bins).astype(np.int64), bins - 1)
            per_class.append(
                BinaryStats(
                    tp=int(np.sum(decided & truth)),
                    fp=int(np.sum(decided & ~truth)),
                    tn=int(np.sum(~decided & ~truth)),
                    fn=int(np.sum(~decided & truth)),
                    pos_hist=tuple(int(v) for v in np.bincount(index[truth], minlength=bins)),
                    neg_hist=tuple(int(v) for v in np.bincount(index[~truth], minlength=bins)),
                )
            )
        return cls(tuple(tuple(int(v) for v in row) for row in confusion), tuple(per_class))

    @property
    def classes(self) -> int:
        return len(self.confusion)

    @property
    def n(self) -> int:
        return sum(sum(row) for row in self.confusion)

    def with_min_cell(self, k: int) -> MulticlassStats:
        """What may leave a site under minimum cell size ``k``: suppressed below ``k`` cases,
        else every class's histograms coarsened as ``BinaryStats.with_min_cell`` does."""
        if k <= 1:
            return self
        if self.n < k:
            return MulticlassStats.empty(
                self.classes, len(self.per_class[0].pos_hist), suppressed=True
            )
        return MulticlassStats(self.confusion, tuple(s.with_min_cell(k) for s in self.per_class))

    def withholding(self, part: str) -> MulticlassStats:
        """No part, as for ``BinaryStats.withholding``."""
        raise ValueError(f"multi-class statistics have no part {part!r} to withhold")

    def __add__(self, other: MulticlassStats) -> MulticlassStats:
        if self.classes != other.classes:
            msg = f"cannot merge statistics of {self.classes} and {other.classes} classes"
            raise ValueError(msg)
        confusion = tuple(
            tuple(a + b for a, b in zip(r, s, strict=True))
            for r, s in zip(self.confusion, other.confusion, strict=True)
        )
        per_class = tuple(a + b for a, b in zip(self.per_class, other.per_class, strict=True))
        return MulticlassStats(confusion, per_class)


def multiclass_metrics(s: MulticlassStats) -> dict[str, float | None]:
    """Accuracy, balanced accuracy, macro one-vs-rest AUC and per-class AUC and sensitivity.

    ``auc`` is the unweighted mean of the per-class one-vs-rest AUCs over classes with both
    positives and negatives (scikit-learn's ``multi_class="ovr", average="macro"``);
    ``auc_tie_bound`` bounds its distance from the exact value.
    """
    n = s.n
    diagonal = [s.confusion[c][c] for c in range(s.classes)]
    support = [sum(row) for row in s.confusion]
    recalls = [d / t if t else None for d, t in zip(diagonal, support, strict=True)]
    present = [r for r in recalls if r is not None]
    aucs = [auc_from_histograms(c.pos_hist, c.neg_hist) for c in s.per_class]
    bounds = [auc_tie_bound(c.pos_hist, c.neg_hist) for c in s.per_class]
    defined = [a for a in aucs if a is not None]
    defined_bounds = [
        b for a, b in zip(aucs, bounds, strict=True) if a is not None and b is not None
    ]
    out: dict[str, float | None] = {
        "auc": sum(defined) / len(defined) if defined else None,
        "accuracy": sum(diagonal) / n if n else None,
        "balanced_accuracy": sum(present) / len(present) if present else None,
        "auc_tie_bound": sum(defined_bounds) / len(defined_bounds) if defined_bounds else None,
    }
    for c in range(s.classes):
        out[f"auc_class_{c}"] = aucs[c]
        out[f"sensitivity_class_{c}"] = recalls[c]
        out[f"prevalence_class_{c}"] = support[c] / n if n else None
    return {k: (None if v is None else round(v, 6)) for k, v in out.items()}
