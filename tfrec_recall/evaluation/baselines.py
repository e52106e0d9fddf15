"""Reference rankers evaluated by the same protocol and the same code as the models (../shared/PROTOCOL.md,
``tfrec_recall.evaluation.retrieval``): every item of the corpus ranked, the user's training items excluded,
expected metrics under random tie-breaking (MRR within the top max(ks), as for a model).

* :func:`most_popular_metrics`: every user gets the same ranking, items by their number of training
  interactions. A retrieval model that does not beat it has learnt nothing beyond popularity; the TFX
  pipeline's evaluator refuses to bless such a model.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

from tfrec_recall.data.schema import ITEM_ID, USER_ID
from tfrec_recall.data.split import Split
from tfrec_recall.evaluation.ranked import check_ks
from tfrec_recall.evaluation.retrieval import evaluate_retriever_in_chunks
from tfrec_recall.retrievers.brute_force import BruteForce

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
    rank by expected rank, as for a model (:func:`most_popular_in_chunks`). Returns HR@K, Recall@K, NDCG@K,
    MRR, Coverage@K and users."""
    users, positives, exclude = evaluation_rows(split, which)
    if not users:
        raise ValueError(f"split.{which} has no rows: nothing to evaluate")
    items = np.asarray(split.data.items).astype(str)
    chunk = ([items[rows].tolist() for rows in positives], [items[rows].tolist() for rows in exclude])
    return most_popular_in_chunks(items, training_counts(split), [chunk], ks)


def most_popular_in_chunks(ids: np.ndarray, counts: np.ndarray, chunks: Iterable[tuple],
                           ks: Sequence[int] = (10, 50, 100)) -> Dict[str, float]:
    """The most-popular ranker's metrics for users given in ``chunks`` of ``(positives, exclude)`` (lists of ids
    per user): every candidate of ``ids`` scored by its training count ``counts``, a one-dimensional
    "embedding" searched exactly, so tied counts take their expected rank."""
    ids, counts = np.asarray(ids).astype(str), np.asarray(counts, dtype=np.float32)
    if counts.shape != ids.shape:
        raise ValueError(f"counts must have one value per id: shapes {counts.shape} and {ids.shape}")
    bad = np.flatnonzero(~np.isfinite(counts) | (counts < 0))
    if len(bad):
        raise ValueError(f"counts must be finite and non-negative (training interaction counts), got "
                         f"{counts[bad[0]]} for id {ids[bad[0]]!r} ({len(bad)} such)")
    index = BruteForce(max_k=max(check_ks(ks)) + 1).index(ids, counts[:, None])
    queries = ((np.ones((len(positives), 1), np.float32), positives, exclude, None) for positives, exclude in chunks)
    return evaluate_retriever_in_chunks(index, queries, ks)
