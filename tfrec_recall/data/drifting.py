"""A synthetic interaction log with a time trend: items are released over time and their popularity decays
after release, so what is popular at the end of the log (when the model serves) differs from what was popular
on average over it. The data for Example Age (Covington et al. 2016, sec. 3.3), which lets a model learn the
time-dependence of popularity and serve at age 0, "now".

Item i is released on day r_i (uniform over the period) with base appeal w_i (log-normal); its popularity on day
t >= r_i is w_i * exp(-(t - r_i) / lifetime_days), 0 before release. Each user has one or two favourite
categories and interacts on days drawn uniformly over the period (sorted); each interaction picks an unseen item
with probability proportional to its popularity that day times ``1 + affinity`` for the user's categories.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from tfrec_recall._validation import require_int
from tfrec_recall.data.schema import ITEM_ID, TIMESTAMP, USER_ID, InteractionData

SECONDS_PER_DAY = 86400


def _check(num_items, num_categories, days, lifetime_days, affinity, mean_interactions):
    require_int("num_items", num_items, minimum=2)
    require_int("num_categories", num_categories)
    require_int("mean_interactions", mean_interactions, minimum=2)
    if num_categories > num_items:
        raise ValueError(f"num_categories must be <= num_items ({num_items}), got {num_categories}")
    for name, value in (("days", days), ("lifetime_days", lifetime_days)):
        if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not (isinstance(affinity, (int, float)) and np.isfinite(affinity) and affinity >= 0):
        raise ValueError(f"affinity must be a finite number >= 0, got {affinity!r}")


def _user_log(rng, days, count, release, appeal, boost, lifetime_days):
    """(items, days) of one user's interactions, in time order; a day with no released unseen item is skipped."""
    seen = np.zeros(len(release), dtype=bool)
    items, kept = [], []
    for t in np.sort(rng.uniform(0, days, size=count)):
        # The floor keeps long-released items reachable (their decayed weight underflows to 0 otherwise).
        decay = np.maximum(np.exp(-(t - release) / lifetime_days), 1e-12)
        weight = np.where((release <= t) & ~seen, appeal * decay * boost, 0.0)
        if weight.sum() <= 0:
            continue
        item = int(rng.choice(len(release), p=weight / weight.sum()))
        seen[item] = True
        items.append(item)
        kept.append(t)
    return items, kept


def make_drifting(num_users: int = 1000, num_items: int = 500, num_categories: int = 10, days: float = 100.0,
                  lifetime_days: float = 10.0, mean_interactions: int = 20, affinity: float = 3.0,
                  seed: int = 0) -> InteractionData:
    """The drifting-popularity log (module docstring). Same arguments and seed, same data. Item features:
    ``category`` and ``release_day`` (numeric, for analysis: the recent items of a period)."""
    require_int("num_users", num_users)
    _check(num_items, num_categories, days, lifetime_days, affinity, mean_interactions)
    rng = np.random.default_rng(seed)
    release = rng.uniform(0, days * 0.95, size=num_items)
    appeal = rng.lognormal(0.0, 1.0, size=num_items)
    category = rng.integers(0, num_categories, size=num_items)
    counts = np.clip(rng.poisson(mean_interactions, size=num_users), 3, num_items // 2)
    rows = []
    for u in range(num_users):
        liked = rng.choice(num_categories, size=min(num_categories, int(rng.integers(1, 3))), replace=False)
        boost = 1.0 + affinity * np.isin(category, liked)
        items, times = _user_log(rng, days, int(counts[u]), release, appeal, boost, lifetime_days)
        rows += [(f"u{u}", f"i{i}", int(np.ceil(t * SECONDS_PER_DAY))) for i, t in zip(items, times)]
    interactions = pd.DataFrame(rows, columns=[USER_ID, ITEM_ID, TIMESTAMP]).astype({TIMESTAMP: np.int64})
    item_features = pd.DataFrame({ITEM_ID: [f"i{i}" for i in range(num_items)],
                                  "category": [f"c{c}" for c in category],
                                  "release_day": release.astype(np.float64)}).set_index(ITEM_ID)
    return InteractionData(interactions, None, item_features, {"category": "categorical", "release_day": "numeric"},
                           name="drifting")
