"""A synthetic interaction log with known multiple interests per user: the data for multi-interest user models
(MIND, Li et al. 2019; ComiRec, Cen et al. 2020), whose learned interest vectors can be compared with the
interests that generated each history (:func:`tfrec_recall.evaluation.interest_recovery`).

The generative process, every draw from one ``numpy.random.default_rng(seed)`` in this order:

1. Clusters. Item i (id ``"i{i}"``) gets cluster ``(i mod C)`` before a seeded shuffle of the labels, so the C
   clusters hold ``floor(N / C)`` or ``ceil(N / C)`` items each, spread over the ids at random.
2. Popularity within a cluster. The items of each cluster get the ranks 1..n_c in a seeded random order and the
   Zipf weight ``rank ** -within_cluster_zipf`` (exponent 0: uniform).
3. Lengths. User u (id ``"u{u}"``) gets ``Poisson(mean_interactions)`` interactions, clipped to [3, num_items // 2]
   and then to the number of items of its clusters (it never repeats an item).
4. Interests, per user: their number m uniform in [min_interests, max_interests], m distinct clusters uniformly
   without replacement, and weights ``Dirichlet(1, ..., 1)`` over them.
5. History, per user and interaction: an interest with probability proportional to its weight (among the
   interests whose cluster still holds an unseen item), then an unseen item of that cluster with probability
   proportional to its Zipf weight.
6. Timestamps, per user: a start uniform over the first 30 days, then gaps of 1 .. 86399 seconds (uniform
   integers), so each user's timestamps (int64 seconds) increase strictly in the order of its history.

A user's items all lie in its clusters; an interest of small weight may have no interaction (the truth still
lists it). Item feature: ``category`` (categorical), the cluster label ``"c{cluster}"``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import numpy as np
import pandas as pd

from tfrec_recall._validation import require_finite_nonnegative, require_int
from tfrec_recall.data.schema import ITEM_ID, TIMESTAMP, USER_ID, InteractionData

SECONDS_PER_DAY = 86400
MIN_INTERACTIONS = 3


@dataclasses.dataclass(frozen=True)
class InterestTruth:
    """The interests that generated a :func:`make_multi_interest` log: each user's clusters (sorted), each item's
    cluster, and the number of clusters."""
    user_interests: Dict[str, Tuple[int, ...]]
    item_cluster: Dict[str, int]
    num_clusters: int


def _check(num_users, num_items, num_clusters, min_interests, max_interests, mean_interactions, within_cluster_zipf):
    require_int("num_users", num_users)
    require_int("num_items", num_items, minimum=MIN_INTERACTIONS)
    require_int("num_clusters", num_clusters)
    require_int("min_interests", min_interests)
    require_int("max_interests", max_interests)
    require_int("mean_interactions", mean_interactions)
    require_finite_nonnegative("within_cluster_zipf", within_cluster_zipf)
    if num_clusters > num_items // MIN_INTERACTIONS:
        raise ValueError(f"num_clusters must be <= num_items // {MIN_INTERACTIONS} ({num_items // MIN_INTERACTIONS}"
                         f", so that every cluster holds at least {MIN_INTERACTIONS} items), got {num_clusters}")
    if max_interests > num_clusters:
        raise ValueError(f"max_interests must be <= num_clusters ({num_clusters}), got {max_interests}")
    if min_interests > max_interests:
        raise ValueError(f"min_interests must be <= max_interests ({max_interests}), got {min_interests}")


def _user_log(rng, count, interests, weights, members, popularity) -> List[int]:
    """``count`` distinct items of one user, in time order (steps 4-5 of the module docstring)."""
    unseen = [np.ones(len(members[c]), dtype=bool) for c in interests]
    items = []
    for _ in range(count):
        open_weights = weights * np.array([mask.any() for mask in unseen])
        k = int(rng.choice(len(interests), p=open_weights / open_weights.sum()))
        cluster = interests[k]
        weight = popularity[members[cluster]] * unseen[k]
        j = int(rng.choice(len(weight), p=weight / weight.sum()))
        unseen[k][j] = False
        items.append(int(members[cluster][j]))
    return items


def make_multi_interest(num_users: int = 500, num_items: int = 400, num_clusters: int = 20, min_interests: int = 1,
                        max_interests: int = 4, mean_interactions: int = 30, within_cluster_zipf: float = 1.0,
                        seed: int = 0) -> Tuple[InteractionData, InterestTruth]:
    """The multi-interest log and its truth (module docstring). Same arguments and seed, same data."""
    _check(num_users, num_items, num_clusters, min_interests, max_interests, mean_interactions, within_cluster_zipf)
    rng = np.random.default_rng(seed)
    cluster_of = rng.permutation(np.arange(num_items) % num_clusters)
    members = [np.flatnonzero(cluster_of == c) for c in range(num_clusters)]
    popularity = np.empty(num_items)
    for idx in members:
        popularity[idx] = (rng.permutation(len(idx)) + 1.0) ** -float(within_cluster_zipf)
    counts = np.clip(rng.poisson(mean_interactions, size=num_users), MIN_INTERACTIONS, num_items // 2)
    rows, user_interests = [], {}
    for u in range(num_users):
        interests = rng.choice(num_clusters, size=int(rng.integers(min_interests, max_interests + 1)), replace=False)
        weights = rng.dirichlet(np.ones(len(interests)))
        count = min(int(counts[u]), sum(len(members[c]) for c in interests))
        items = _user_log(rng, count, interests, weights, members, popularity)
        times = rng.integers(0, 30 * SECONDS_PER_DAY) + np.cumsum(rng.integers(1, SECONDS_PER_DAY, size=count))
        rows += [(f"u{u}", f"i{i}", int(t)) for i, t in zip(items, times)]
        user_interests[f"u{u}"] = tuple(sorted(int(c) for c in interests))
    interactions = pd.DataFrame(rows, columns=[USER_ID, ITEM_ID, TIMESTAMP]).astype({TIMESTAMP: np.int64})
    item_features = pd.DataFrame({ITEM_ID: [f"i{i}" for i in range(num_items)],
                                  "category": [f"c{c}" for c in cluster_of]}).set_index(ITEM_ID)
    data = InteractionData(interactions, None, item_features, {"category": "categorical"}, name="multi_interest")
    truth = InterestTruth(user_interests, {f"i{i}": int(c) for i, c in enumerate(cluster_of)}, num_clusters)
    return data, truth
