"""The embedded default dataset: a seeded synthetic interaction log in the package's schema.

Items fall into categories of imbalanced sizes and have power-law popularity inside their category. Each user
has 1-3 latent interests (categories) with Dirichlet weights; a user's sequence mostly stays on the current
interest (``stickiness``), sometimes switches, and sometimes picks a globally popular item (``noise``), so both
the history and the side features carry signal. Timestamps increase along each sequence.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from tfrec_recall.data.schema import ITEM_ID, TIMESTAMP, USER_ID, InteractionData
from tfrec_recall._validation import require_int


def make_synthetic(num_users: int = 2000, num_items: int = 1000, num_categories: int = 20,
                   mean_interactions: int = 30, min_interactions: int = 5, popularity_exponent: float = 1.0,
                   category_imbalance: float = 1.0, stickiness: float = 0.8, noise: float = 0.1,
                   seed: int = 0) -> InteractionData:
    """Generates the synthetic default. Same arguments and seed, same data."""
    require_int("num_users", num_users)
    require_int("num_items", num_items, minimum=2)
    require_int("num_categories", num_categories)
    require_int("mean_interactions", mean_interactions)
    require_int("min_interactions", min_interactions)
    if num_categories > num_items:
        raise ValueError(f"num_categories must be <= num_items ({num_items}), got {num_categories}")
    if min_interactions > num_items // 2:
        raise ValueError(f"min_interactions must be <= num_items // 2 ({num_items // 2}), got {min_interactions}")
    for name, value in (("stickiness", stickiness), ("noise", noise)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    for name, value in (("popularity_exponent", popularity_exponent), ("category_imbalance", category_imbalance)):
        if not value >= 0.0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    rng = np.random.default_rng(seed)

    # Imbalanced categories: sizes proportional to rank^-imbalance, each at least 1 item.
    shares = np.arange(1, num_categories + 1, dtype=float) ** -category_imbalance
    sizes = np.maximum(1, np.floor(shares / shares.sum() * num_items).astype(int))
    sizes[0] += num_items - sizes.sum()
    item_category = np.repeat(np.arange(num_categories), sizes)
    rng.shuffle(item_category)
    # Power-law popularity within each category.
    popularity = np.empty(num_items)
    members = [np.flatnonzero(item_category == c) for c in range(num_categories)]
    for idx in members:
        ranks = rng.permutation(len(idx)) + 1
        popularity[idx] = ranks.astype(float) ** -popularity_exponent
    within = [popularity[idx] / popularity[idx].sum() for idx in members]
    global_p = popularity / popularity.sum()
    category_p = sizes / sizes.sum()

    users, items, stamps = [], [], []
    segments = []
    lengths = np.maximum(min_interactions, rng.geometric(1.0 / mean_interactions, size=num_users))
    lengths = np.minimum(lengths, num_items // 2)
    for u in range(num_users):
        k = rng.integers(1, 4)
        interests = rng.choice(num_categories, size=k, replace=False, p=category_p)
        weights = rng.dirichlet(np.ones(k))
        segments.append(interests[0])
        seen = set()
        current = rng.choice(k, p=weights)
        t = int(rng.integers(0, 10_000_000))
        while len(seen) < lengths[u]:
            if rng.random() < noise:
                item = int(rng.choice(num_items, p=global_p))
            else:
                if rng.random() > stickiness:
                    current = rng.choice(k, p=weights)
                idx = members[interests[current]]
                item = int(idx[rng.choice(len(idx), p=within[interests[current]])])
            if item in seen:
                continue
            seen.add(item)
            t += int(rng.integers(1, 5000))
            users.append(u)
            items.append(item)
            stamps.append(t)
    interactions = pd.DataFrame({
        USER_ID: np.array([f"u{u}" for u in users], dtype=object),
        ITEM_ID: np.array([f"i{i}" for i in items], dtype=object),
        TIMESTAMP: np.asarray(stamps, dtype=np.int64),
    })
    # Side features: a user segment that is the first interest 70 % of the time, and a random region.
    noisy = rng.random(num_users) < 0.3
    segment = np.where(noisy, rng.integers(0, num_categories, num_users), np.asarray(segments))
    user_features = pd.DataFrame({
        USER_ID: [f"u{u}" for u in range(num_users)],
        "segment": [f"s{s}" for s in segment],
        "region": [f"r{r}" for r in rng.integers(0, 8, num_users)],
        "activity": np.log1p(lengths).astype(np.float64),
    }).set_index(USER_ID)
    tags = [tuple(sorted({f"c{c}", f"t{rng.integers(0, 50)}"})) for c in item_category]
    item_features = pd.DataFrame({
        ITEM_ID: [f"i{i}" for i in range(num_items)],
        "category": [f"c{c}" for c in item_category],
        "tags": tags,
        "price": np.round(rng.lognormal(mean=1.0 + item_category % 5 * 0.3, sigma=0.5), 2).astype(np.float64),
    }).set_index(ITEM_ID)
    kinds = {"segment": "categorical", "region": "categorical", "activity": "numeric",
             "category": "categorical", "tags": "multi_categorical", "price": "numeric"}
    return InteractionData(interactions, user_features, item_features, kinds, name="synthetic")
