"""Agreement of two clusterings: the adjusted Rand index (Hubert & Arabie 1985, "Comparing partitions",
J. Classification 2, eq. 5), used to check that Deep Retrieval puts the items of one known cluster on one path.

    ARI = (sum_ij C(n_ij, 2) - E) / (0.5 * (sum_i C(a_i, 2) + sum_j C(b_j, 2)) - E),
    E   = sum_i C(a_i, 2) * sum_j C(b_j, 2) / C(n, 2),

with n_ij the contingency table of the two labelings, a_i and b_j its row and column sums. 1 for identical
partitions (up to renaming), about 0 for independent ones.
"""
from __future__ import annotations

import numpy as np


def _pairs(counts: np.ndarray) -> float:
    counts = np.asarray(counts, np.float64)
    return float((counts * (counts - 1) / 2).sum())


def adjusted_rand_index(labels_a, labels_b) -> float:
    """The adjusted Rand index of two labelings of the same items (any hashable labels)."""
    a, b = np.asarray(labels_a), np.asarray(labels_b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"labels_a and labels_b must be 1-d and of one length, got shapes {a.shape}, {b.shape}")
    if len(a) < 2:
        raise ValueError(f"the adjusted Rand index needs at least 2 items, got {len(a)}")
    _, rows = np.unique(a, return_inverse=True)
    _, cols = np.unique(b, return_inverse=True)
    table = np.zeros((rows.max() + 1, cols.max() + 1), np.int64)
    np.add.at(table, (rows, cols), 1)
    index, sum_a, sum_b = _pairs(table), _pairs(table.sum(1)), _pairs(table.sum(0))
    expected = sum_a * sum_b / _pairs([len(a)])
    maximum = (sum_a + sum_b) / 2
    if maximum == expected:  # both labelings trivial (one cluster, or all singletons): identical partitions
        return 1.0
    return (index - expected) / (maximum - expected)


__all__ = ["adjusted_rand_index"]
