"""Measures of multi-interest user models (MIND, Li et al. 2019; ComiRec, Cen et al. 2020) beyond hit rates.

* :func:`interest_recovery`: how well a user's learned interest vectors cover the interests that generated its
  history (known on synthetic data, :func:`tfrec_recall.data.make_multi_interest`): for each true interest c of
  user u, the best cosine ``max_k cos(v_u^(k), mu_c)`` between a valid learned interest vector and the cluster
  centroid ``mu_c``; averaged over u's true interests, then over users.
* :func:`cluster_centroids`: the centroids ``mu_c``, the mean learned embedding of each cluster's items.
* :func:`intra_list_diversity`: ComiRec's Diversity@N (Cen et al. 2020, sec. 4.1),
  ``sum_{j<k} [CATE(i_j) != CATE(i_k)] / (N (N - 1) / 2)`` over a user's N recommended items, averaged over
  users.

A zero vector has cosine 0 with everything. Ids may be str or bytes (decoded as UTF-8); ``""`` is padding.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from tfrec_recall._validation import require_int


def _as_str(ids) -> np.ndarray:
    """``ids`` as an object array of str (bytes decoded as UTF-8), same shape."""
    ids = np.asarray(ids, dtype=object)
    out = np.empty(ids.shape, dtype=object)
    out.flat[:] = [i.decode("utf-8") if isinstance(i, bytes) else str(i) for i in ids.flat]
    return out


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm along the last axis; zero rows stay zero (cosine 0, never NaN)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def _require_finite(name: str, values: np.ndarray) -> None:
    if not np.all(np.isfinite(values)):
        where = np.argwhere(~np.isfinite(values))[0]
        raise ValueError(f"{name} must be finite; entry {tuple(int(i) for i in where)} is {values[tuple(where)]}")


def _interest_inputs(interests, interest_mask, centroids):
    """(interests [U, K, d], mask [U, K], centroids [C, d]) as float64 / bool, or ``ValueError``."""
    interests = np.asarray(interests, dtype=np.float64)
    single = interests.ndim == 2
    if single:
        interests = interests[:, None, :]
    if interests.ndim != 3:
        raise ValueError(f"interests must be [users, interests, dim] or [users, dim], got shape {interests.shape}")
    centroids = np.asarray(centroids, dtype=np.float64)
    if centroids.ndim != 2 or centroids.shape[1] != interests.shape[2]:
        raise ValueError(f"centroids must be [clusters, dim] with dim {interests.shape[2]} (that of interests), "
                         f"got shape {centroids.shape}")
    if interest_mask is None:
        mask = np.ones(interests.shape[:2], dtype=bool)
    else:
        mask = np.asarray(interest_mask)
        shapes = [interests.shape[:2]] + ([interests.shape[:1]] if single else [])
        if mask.dtype != bool or mask.shape not in shapes:
            raise ValueError(f"interest_mask must be bool of shape {' or '.join(map(str, shapes))}, got "
                             f"{mask.dtype} of shape {mask.shape}")
        mask = mask.reshape(interests.shape[:2])
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise ValueError(f"interest_mask row {int(empty[0])} has no valid interest ({empty.size} such rows)")
    _require_finite("interests", np.where(mask[:, :, None], interests, 0.0))
    _require_finite("centroids", centroids)
    return interests, mask, centroids


def _pairs(user_clusters, num_users: int, num_clusters: int):
    """(user row, cluster) of every distinct true interest, or ``ValueError`` naming the bad row."""
    if len(user_clusters) != num_users:
        raise ValueError(f"user_clusters must hold one sequence per user ({num_users}), got {len(user_clusters)}")
    rows, clusters = [], []
    for u, true in enumerate(user_clusters):
        true = sorted(set(int(c) for c in true))
        if not true:
            raise ValueError(f"user_clusters row {u} is empty: every user needs at least one true interest")
        if true[0] < 0 or true[-1] >= num_clusters:
            raise ValueError(f"user_clusters row {u} holds cluster {true[0] if true[0] < 0 else true[-1]}, outside "
                             f"[0, {num_clusters}) (the rows of centroids)")
        rows += [u] * len(true)
        clusters += true
    return np.array(rows, dtype=np.int64), np.array(clusters, dtype=np.int64)


def interest_recovery(interests, interest_mask: Optional[np.ndarray], user_clusters: Sequence[Sequence[int]],
                      centroids) -> float:
    """Mean over users of the mean over the user's true clusters c of ``max_k cos(interests[u, k], centroids[c])``
    over its valid interests k (``interest_mask[u, k]``; None: all valid). ``interests`` [U, K, d] or [U, d]
    (one vector per user), ``user_clusters`` U sequences of cluster rows of ``centroids`` [C, d]. Masked
    interests are ignored (they may hold anything); NaN or infinite valid interests or centroids are an error."""
    interests, mask, centroids = _interest_inputs(interests, interest_mask, centroids)
    rows, clusters = _pairs(user_clusters, interests.shape[0], centroids.shape[0])
    cosines = np.einsum("pkd,pd->pk", _unit_rows(interests)[rows], _unit_rows(centroids)[clusters])
    best = np.max(np.where(mask[rows], cosines, -np.inf), axis=1)
    per_user = np.bincount(rows, weights=best, minlength=interests.shape[0]) / np.bincount(rows)
    return float(per_user.mean())


def cluster_centroids(item_ids, embeddings, item_cluster: Mapping[str, int], num_clusters: int) -> np.ndarray:
    """[C, d]: row c is the mean of ``embeddings`` [N, d] over the items (``item_ids`` [N]) of cluster c
    (``item_cluster[id]``). Every item must have a cluster in [0, num_clusters) and every cluster an item."""
    num_clusters = require_int("num_clusters", num_clusters)
    ids = _as_str(item_ids)
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 2 or ids.shape != (embeddings.shape[0],):
        raise ValueError(f"item_ids [N] and embeddings [N, dim] must match, got shapes {ids.shape} and "
                         f"{embeddings.shape}")
    _require_finite("embeddings", embeddings)
    missing = [i for i in ids if i not in item_cluster]
    if missing:
        raise ValueError(f"item {missing[0]!r} has no cluster in item_cluster ({len(missing)} such items)")
    labels = np.array([int(item_cluster[i]) for i in ids], dtype=np.int64)
    outside = labels[(labels < 0) | (labels >= num_clusters)]
    if outside.size:
        raise ValueError(f"item_cluster holds cluster {int(outside[0])}, outside [0, {num_clusters})")
    sizes = np.bincount(labels, minlength=num_clusters)
    if not sizes.all():
        raise ValueError(f"cluster {int(np.flatnonzero(sizes == 0)[0])} has no item among item_ids")
    sums = np.zeros((num_clusters, embeddings.shape[1]))
    np.add.at(sums, labels, embeddings)
    return sums / sizes[:, None]


def intra_list_diversity(ids, categories: Mapping[str, str]) -> float:
    """Diversity@N of Cen et al. 2020 (ComiRec, sec. 4.1): per row of ``ids`` [U, N], the share of pairs of its
    real (non-``""``) items whose categories differ, ``sum_{j<k} [CATE(i_j) != CATE(i_k)] / (n (n - 1) / 2)``
    with n real items; the mean over rows with n >= 2 (other rows are left out). An id missing from
    ``categories`` is an error."""
    ids = _as_str(ids)
    if ids.ndim != 2:
        raise ValueError(f"ids must be [users, N], got shape {ids.shape}")
    scores = []
    for row in ids:
        items = [i for i in row if i != ""]
        missing = [i for i in items if i not in categories]
        if missing:
            raise ValueError(f"item {missing[0]!r} has no category in categories")
        n = len(items)
        if n < 2:
            continue
        _, counts = np.unique([str(categories[i]) for i in items], return_counts=True)
        same = float(np.sum(counts * (counts - 1) / 2))
        total = n * (n - 1) / 2
        scores.append((total - same) / total)
    if not scores:
        raise ValueError("no row of ids has 2 or more real (non-empty) items: Diversity@N is undefined")
    return float(np.mean(scores))


def split_interest_recovery(model, split, truth, which: str = "test") -> float:
    """:func:`interest_recovery` of ``model`` (with ``query_tower`` / ``candidate_tower``) for the users of
    ``split``'s ``which`` rows, against the centroids of the model's own item embeddings of each true cluster
    (``truth``: a :class:`~tfrec_recall.data.interests.InterestTruth`)."""
    from tfrec_recall.evaluation.evaluate import corpus_arrays, embed, embed_queries
    from tfrec_recall.features import feature_arrays
    users = getattr(split, which).drop_duplicates("user_id").reset_index(drop=True)
    queries, mask = embed_queries(model.query_tower, feature_arrays(users, split.data,
                                                                    model.query_tower.input_specs))
    items = np.asarray(split.data.items).astype(str)
    embeddings = embed(model.candidate_tower, corpus_arrays(split, model.candidate_tower.input_specs))
    centroids = cluster_centroids(items, embeddings, truth.item_cluster, truth.num_clusters)
    return interest_recovery(queries, mask, [truth.user_interests[u] for u in users["user_id"]], centroids)
