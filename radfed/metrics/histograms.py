"""Histogram helpers shared by every task's statistics: privacy coarsening of sparse bins."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["merge_mixed_bins", "merge_sparse_bins"]


def merge_sparse_bins(
    histograms: Sequence[Sequence[int]], k: int, *, split_at: int | None = None
) -> list[tuple[int, ...]]:
    """Merge adjacent bins of aligned histograms until every non-empty bin holds ``k`` entries.

    The histograms share their bin edges (e.g. positive and negative score histograms) and
    are merged jointly, from low to high bins: a run of bins is closed once the entries of
    all histograms in it together reach ``k``, and stored in the run's first bin. A short
    last run joins the run before it. So no bin pins down fewer than ``k`` entries.

    Args:
        histograms: equally long count sequences.
        k: the minimum entries per non-empty merged bin; ``k <= 1`` returns them unchanged.
        split_at: a bin index no run crosses: the bins below it and from it on are merged
            apart (the operating threshold, whose counts each side are released anyway: a
            run across it would be cut by them into parts of fewer than ``k``).

    Raises:
        ValueError: histograms of different lengths, or ``split_at`` outside them.
    """
    lengths = {len(h) for h in histograms}
    if len(lengths) > 1:
        msg = f"histograms to merge differ in length: {sorted(lengths)}"
        raise ValueError(msg)
    if k <= 1 or not histograms:
        return [tuple(int(v) for v in h) for h in histograms]
    width = lengths.pop()
    if split_at is not None and not 0 <= split_at <= width:
        raise ValueError(f"split_at {split_at} is outside the {width} bins")
    out = [[0] * width for _ in histograms]
    parts = [(0, width)] if split_at is None else [(0, split_at), (split_at, width)]
    for begin, end in parts:
        for first, counts in _runs(histograms, k, begin, end):
            for h, count in enumerate(counts):
                out[h][first] = count
    return [tuple(h) for h in out]


def _runs(
    histograms: Sequence[Sequence[int]], k: int, begin: int, end: int
) -> list[tuple[int, list[int]]]:
    """The merged runs of bins ``begin..end - 1``: (first bin, counts per histogram)."""
    runs: list[tuple[int, list[int]]] = []
    start, run = begin, [0] * len(histograms)
    for index in range(begin, end):
        if sum(run) == 0:
            start = index
        run = [r + int(h[index]) for r, h in zip(run, histograms, strict=True)]
        if sum(run) >= k:
            runs.append((start, run))
            run = [0] * len(histograms)
    if sum(run):
        if runs:
            first, before = runs.pop()
            runs.append((first, [a + b for a, b in zip(before, run, strict=True)]))
        else:  # fewer than k entries in all: one bin
            runs.append((start, run))
    return runs


def merge_mixed_bins(
    pos: Sequence[int], neg: Sequence[int], k: int, *, split_at: int | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Merge adjacent non-empty bins of a positive and a negative histogram until every bin
    holding both classes holds at least ``k`` of each (each side of ``split_at`` apart), so
    that an exact pair count orders no fewer than ``k`` cases of a class inside a bin.

    A merged run is stored in its first bin. Returns None when a side cannot meet the
    rule (it holds both classes but fewer than ``k`` of one in all).
    """
    width = len(pos)
    if len(neg) != width:
        raise ValueError(f"histograms to merge differ in length: {width} vs {len(neg)}")
    out_pos, out_neg = [0] * width, [0] * width
    parts = [(0, width)] if split_at is None else [(0, split_at), (split_at, width)]
    for begin, end in parts:
        runs: list[list[int]] = []  # [first bin, positives, negatives]
        for index in range(begin, end):
            if not (pos[index] or neg[index]):
                continue
            if runs and not _clean_run(runs[-1], k):
                runs[-1][1] += int(pos[index])
                runs[-1][2] += int(neg[index])
            else:
                runs.append([index, int(pos[index]), int(neg[index])])
        while len(runs) > 1 and not _clean_run(runs[-1], k):  # a short last run joins back
            _, p, n = runs.pop()
            runs[-1][1] += p
            runs[-1][2] += n
        if runs and not _clean_run(runs[-1], k):
            return None
        for first, p, n in runs:
            out_pos[first], out_neg[first] = p, n
    return tuple(out_pos), tuple(out_neg)


def _clean_run(run: list[int], k: int) -> bool:
    """A run holding one class only, or at least ``k`` of each."""
    _, p, n = run
    return p == 0 or n == 0 or (p >= k and n >= k)
