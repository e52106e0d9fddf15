"""Reference rankers evaluated by the same protocol as the models (../shared/PROTOCOL.md): every item of the
corpus ranked, the user's training items excluded, expected metrics under random tie-breaking
(``tfrec_recall.evaluation.metrics.full_corpus_metrics``).

* :func:`most_popular_metrics`: every user gets the same ranking, items by their number of training
  interactions. A retrieval model that does not beat it has learnt nothing beyond popularity; the TFX
  pipeline's evaluator refuses to bless such a model.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from tfrec_recall.data.schema import ITEM_ID, USER_ID
from tfrec_recall.data.split import Split
from tfrec_recall.evaluation.metrics import full_corpus_metrics

WHICH = ("valid", "test")


def evaluation_rows(split: Split, which: str = "valid") -> Tuple[List[str], List[List[int]], List[List[int]]]:
    """The users of ``split.<which>`` (in first-appearance order), each user's held-out items (positives) and
    training items (excluded) as row indices into ``split.data.items``: the queries
    ``tfrec_recall.training.evaluate_towers`` builds."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    rows = getattr(split, which)
    positives_by_user = rows.groupby(USER_ID, sort=False)[ITEM_ID].agg(list)
    users = rows.drop_duplicates(USER_ID)[USER_ID].tolist()
    index = {item: i for i, item in enumerate(split.data.items)}
    positives = [[index[i] for i in positives_by_user[u]] for u in users]
    exclude = [[index[i] for i in split.train_items.get(u, [])] for u in users]
    return users, positives, exclude


def training_counts(split: Split) -> np.ndarray:
    """Number of training interactions of every corpus item (``split.data.items`` order; 0 if never trained
    on)."""
    counts = split.train[ITEM_ID].value_counts().reindex(split.data.items, fill_value=0)
    return counts.to_numpy(dtype=np.float32)


def most_popular_metrics(split: Split, which: str = "valid", ks: Sequence[int] = (10, 50, 100)) -> Dict[str, float]:
    """Full-corpus metrics of the most-popular ranker on ``split.<which>`` ("valid" or "test"): an item's score
    is its training count, the same for every user; the user's training items are excluded and tied counts
    rank by expected rank, as for a model. Returns the keys of ``full_corpus_metrics`` (HR@K, Recall@K,
    NDCG@K, MRR, Coverage@K, users)."""
    users, positives, exclude = evaluation_rows(split, which)
    if not users:
        raise ValueError(f"split.{which} has no rows: nothing to evaluate")
    counts = training_counts(split)[:, None]  # (items, 1): the count is a 1-d candidate "embedding"
    queries = np.ones((len(users), 1), dtype=np.float32)  # score = 1 * count
    return full_corpus_metrics(queries, counts, positives, exclude, ks=ks)
