"""A stratified split of labelled items into named parts (train / val / test), exact per class to one sample."""
from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Split sample indices into named parts, each class in the given proportions.

    Guarantees: every index is in exactly one split; for every class c and split s the count is
    floor or ceil of n_c * f_s (within one sample of exact); deterministic for a given seed.
    Splits are apportioned per class in one pass (rather than chaining sklearn's train_test_split,
    whose second rounding compounds the first); each class's leftover samples go to the splits
    furthest behind their overall target, so split totals also track N * f_s closely.
    Indices within a split come in a seeded random order so that consecutive shards mix classes.
    """
    labels = np.asarray(labels)
    _check_fractions(fractions)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    names = list(fractions)
    frac = np.array([fractions[n] for n in names], dtype=np.float64)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in names]
    deficit = np.zeros(len(names))  # expected minus assigned so far, per split
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        counts = _apportion(len(members), frac, deficit)
        deficit += len(members) * frac - counts
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for i in range(len(names)):
            parts[i].append(members[bounds[i]:bounds[i + 1]])
    return {name: rng.permutation(np.concatenate(p)).astype(np.int64) for name, p in zip(names, parts)}


def _check_fractions(fractions: dict[str, float]) -> None:
    if not fractions:
        raise ValueError("no split fractions given")
    bad = {k: v for k, v in fractions.items() if not (isinstance(v, (int, float)) and 0 < v <= 1)}
    if bad:
        raise ValueError(f"split fractions must be in (0, 1], got {bad}")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {total:.6g} ({fractions})")


def _apportion(n: int, frac: np.ndarray, deficit: np.ndarray) -> np.ndarray:
    """Counts per split summing to n, each floor or ceil of n * frac; the leftover units go to
    the splits with the largest (own remainder + running deficit), ties to the earlier split."""
    exact = n * frac
    counts = np.floor(exact + 1e-9).astype(np.int64)
    leftover = n - int(counts.sum())
    if leftover > 0:
        priority = (exact - counts) + deficit
        order = np.argsort(-priority, kind="stable")
        counts[order[:leftover]] += 1
    return counts
