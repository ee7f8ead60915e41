"""Cutting an agglomerative clustering (a scipy linkage) into exactly k clusters."""

from __future__ import annotations

import numpy as np


def first_merges_labels(merges: np.ndarray, n: int, k: int) -> np.ndarray:
    """Cluster labels of the ``n`` leaves after the first ``n - k`` merges of a linkage matrix.

    Labels are numbered by each cluster's smallest leaf. Replaying merges gives exactly ``k``
    clusters; cutting by height (``cut_tree``, ``fcluster``) can blur that where heights tie.
    """
    if not 1 <= k <= n:
        raise ValueError(f"cannot cut {n} leaves into {k} clusters")
    parent = np.arange(2 * n - 1)
    for i in range(n - k):
        parent[int(merges[i, 0])] = parent[int(merges[i, 1])] = n + i
    # A cluster's parent was formed after it (higher id): resolve roots from the top down.
    root = np.arange(2 * n - 1)
    for c in range(2 * n - 2, -1, -1):
        if parent[c] != c:
            root[c] = root[parent[c]]
    uniq, inv = np.unique(root[:n], return_inverse=True)
    first = np.full(len(uniq), n)
    np.minimum.at(first, inv, np.arange(n))
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(uniq))
    return rank[inv]
