"""Evaluation of any retriever by the ranked lists it returns (:mod:`tfrec_recall.evaluation.ranked`).

:func:`evaluate_retriever` queries a built :class:`~tfrec_recall.retrievers.TopKIndex` (``BruteForce``, ``IVF``,
``ScaNN``) or :class:`~tfrec_recall.retrievers.MultiQueryRetriever` with every user's query (the user's training
items excluded, its positives never), asks for ``max(ks) + 1`` ids (one more, to see whether the tie block at
rank max(ks) continues), and for lists still open doubles the request up to the retriever's ``max_k``. An exact
``BruteForce`` index instead counts, for the open users, the candidates scoring above / equal to each positive
(over the whole corpus, exclusions applied), so a constant model scores chance at any corpus size.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from tfrec_recall._validation import require_positive_int
from tfrec_recall.evaluation.ranked import Block, MetricSums, check_ks, open_lists
from tfrec_recall.retrievers.brute_force import BruteForce
from tfrec_recall.retrievers.multi_query import MultiQueryRetriever
from tfrec_recall.retrievers.protocol import Retriever


def evaluate_retriever(retriever, queries, positives: Sequence[Sequence[str]],
                       exclude: Optional[Sequence[Sequence[str]]] = None, ks: Sequence[int] = (10, 50, 100), *,
                       query_mask=None, batch_size: int = 256, progress: bool = False) -> Dict[str, float]:
    """Metrics of ``retriever`` (built) for ``queries`` ([U, d], or [U, K, d] for a MultiQueryRetriever) with
    ``positives[u]`` / ``exclude[u]`` item ids; ``query_mask`` [U, K] marks a multi-query user's interests.
    Returns HR@K, Recall@K, NDCG@K, MRR (within the top max(ks)), Coverage@K and users."""
    return evaluate_retriever_in_chunks(retriever, [(queries, positives, exclude, query_mask)], ks,
                                        batch_size=batch_size, progress=progress)


def evaluate_retriever_in_chunks(retriever, chunks: Iterable[tuple], ks: Sequence[int] = (10, 50, 100), *,
                                 batch_size: int = 256, progress: bool = False) -> Dict[str, float]:
    """:func:`evaluate_retriever` over users given in ``chunks`` of ``(queries, positives, exclude, query_mask)``
    (``exclude`` / ``query_mask`` may be None): only one chunk's queries and ranked lists are held at a time, and
    the metrics are those of one call over every user in order (coverage over the union of the lists)."""
    ks = check_ks(ks)
    num_candidates = _check_retriever(retriever, ks[-1])
    sums = MetricSums(ks)
    for queries, positives, exclude, query_mask in chunks:
        if not len(queries):
            continue
        scores, ids, exact, positives = _ranked_lists(retriever, queries, positives, exclude, ks[-1], query_mask,
                                                      batch_size, progress)
        sums.add(scores, ids, positives, exact)
    return sums.result(num_candidates)


def _ranked_lists(retriever, queries, positives, exclude, depth: int, query_mask, batch_size: int, progress: bool):
    """(scores, ids, exact blocks, positives without duplicates) of one chunk of users (see evaluate_retriever)."""
    queries = np.asarray(queries, dtype=np.float32)
    n = len(queries)
    positives = [list(dict.fromkeys(str(p) for p in row)) for row in _rows("positives", positives, n)]
    exclude = [[] for _ in range(n)] if exclude is None else _rows("exclude", exclude, n)
    exclude = [[str(e) for e in row if str(e) not in set(pos)] for row, pos in zip(exclude, positives)]
    bad = int(np.sum(~np.isfinite(queries.reshape(n, -1)).all(axis=1)))
    if bad:
        raise ValueError(f"{bad} of {n} users have NaN or infinite scores: the model is broken (a non-finite loss "
                         "or embedding), not rankable")
    _check_query_shapes(retriever, queries, query_mask)
    # K queries per user: K times the rows per search, so the batch holds batch_size queries, not users.
    batch_size = max(1, require_positive_int("batch_size", batch_size) // (queries.shape[1] if queries.ndim == 3
                                                                           else 1))
    scores, ids, exact = [], [], {}
    for start in tqdm(range(0, n, batch_size), desc="evaluating", disable=not progress, leave=False):
        rows = slice(start, min(start + batch_size, n))
        mask = None if query_mask is None else np.asarray(query_mask)[rows]
        s, i, blocks = _closed_lists(retriever, queries[rows], positives[rows], exclude[rows], depth, mask)
        scores.append(s)
        ids.append(i)
        exact.update({start + u: b for u, b in blocks.items()})
    width = max(s.shape[1] for s in scores)
    scores = np.concatenate([np.pad(s, [(0, 0), (0, width - s.shape[1])], constant_values=-np.inf) for s in scores])
    ids = np.concatenate([np.pad(i, [(0, 0), (0, width - i.shape[1])], constant_values="") for i in ids])
    return scores, ids, exact, positives


def _check_retriever(retriever, depth: int) -> int:
    """The number of candidates of a built retriever whose ``max_k`` reaches ``depth``; errors name it."""
    if not isinstance(retriever, Retriever):
        raise TypeError(f"retriever must be a Retriever (BruteForce, IVF, ScaNN, MultiQueryRetriever), got "
                        f"{type(retriever).__name__}")
    if not retriever.is_built:
        raise ValueError(f"retriever {type(retriever).__name__} is not built: call index(ids, embeddings) first")
    if retriever.max_k < depth:
        raise ValueError(f"retriever has max_k={retriever.max_k} but ks go up to {depth}: build it with "
                         f"max_k >= {depth}")
    return retriever.corpus_size


def _check_query_shapes(retriever, queries: np.ndarray, query_mask) -> None:
    """[U, d] queries for an index, [U, K, d] (and a [U, K] query_mask or none) for a MultiQueryRetriever."""
    multi = isinstance(retriever, MultiQueryRetriever)
    if queries.ndim != (3 if multi else 2):
        want = "[users, K, d] for a MultiQueryRetriever" if multi else (
            "[users, d] for a single index (wrap the index in a MultiQueryRetriever for K queries per user)")
        raise ValueError(f"queries must be {want}, got shape {queries.shape}")
    if query_mask is not None and not multi:
        raise ValueError("query_mask marks the interests of [users, K, d] queries to a MultiQueryRetriever; a "
                         f"single index ({type(retriever).__name__}) takes none")
    if query_mask is not None and np.shape(query_mask) != queries.shape[:2]:
        raise ValueError(f"query_mask must be [users, K] = {list(queries.shape[:2])}, got shape "
                         f"{list(np.shape(query_mask))}")


def _rows(name: str, rows, n: int) -> List[list]:
    rows = [list(np.asarray(r).reshape(-1)) for r in rows]
    if len(rows) != n:
        raise ValueError(f"{name} has {len(rows)} rows but there are {n} queries")
    return rows


def _search(retriever, queries: np.ndarray, k: int, exclude: Sequence[Sequence[str]], mask):
    """(scores float64 [B, k], ids str [B, k]) of one batch."""
    width = max([len(row) for row in exclude] + [1])
    padded = np.array([row + [""] * (width - len(row)) for row in exclude], dtype=object).reshape(len(queries), width)
    kwargs = {"k": k, "exclude": tf.constant(padded, tf.string)}
    if mask is not None:
        kwargs["query_mask"] = tf.constant(mask, tf.bool)
    scores, ids = retriever(tf.constant(queries), **kwargs)
    return scores.numpy().astype(np.float64), np.char.decode(ids.numpy().astype(bytes), "utf-8")


def _closed_lists(retriever, queries, positives, exclude, depth: int, mask):
    """One batch's lists, lengthened until closed at ``depth``; a BruteForce index's open users get exact
    blocks instead. Returns (scores, ids, {row: blocks})."""
    k = min(depth + 1, retriever.max_k)
    scores, ids = _search(retriever, queries, k, exclude, mask)
    still = open_lists(scores, ids, depth)
    exact = _exact_index(retriever)
    if exact is not None:
        rows = np.flatnonzero(still)
        blocks = _exact_blocks(exact, queries[rows], [positives[r] for r in rows], [exclude[r] for r in rows],
                               None if mask is None else np.asarray(mask)[rows])
        return scores, ids, dict(zip(rows.tolist(), blocks))
    while still.any() and k < retriever.max_k:
        k = min(2 * k, retriever.max_k)
        scores, ids = _search(retriever, queries, k, exclude, mask)
        still = open_lists(scores, ids, depth)
    if still.any():
        raise ValueError(f"{int(still.sum())} of {len(queries)} users' lists end inside the tie block at rank "
                         f"{depth} even at the retriever's max_k={retriever.max_k}: their expected ranks are "
                         "unknown; build the retriever with a larger max_k")
    return scores, ids, {}


def _exact_index(retriever) -> Optional[BruteForce]:
    """The BruteForce index whose scores rank the whole corpus exactly: the retriever itself, or the index of a
    max-merging MultiQueryRetriever (an item's merged score is its best score over the interests, and each
    interest searches at least as deep as the list: the merged top equals the corpus ranked by that score)."""
    if isinstance(retriever, BruteForce):
        return retriever
    if (isinstance(retriever, MultiQueryRetriever) and isinstance(retriever.index, BruteForce)
            and retriever.diversity == 0 and retriever.per_query_k == retriever.max_k):
        return retriever.index
    return None


def _exact_blocks(index: BruteForce, queries: np.ndarray, positives, exclude, mask=None) -> List[List[Block]]:
    """(h, t) of every positive over the whole corpus with the user's exclusions, scored as the index scores
    (K queries per user ``[U, K, d]``: an item's score is its best over the valid interests of ``mask``)."""
    if not len(queries):
        return []
    candidates = index.candidates
    flat = queries.reshape(-1, queries.shape[-1])
    scores = tf.cast(tf.linalg.matmul(tf.cast(flat, candidates.dtype), candidates, transpose_b=True), tf.float32)
    scores = scores.numpy()
    if queries.ndim == 3:
        scores = scores.reshape(queries.shape[0], queries.shape[1], -1)
        valid = np.ones(queries.shape[:2], bool) if mask is None else np.asarray(mask, bool)
        scores = np.where(valid[:, :, None], scores, -np.inf).max(axis=1)
    row_of = {item: r for r, item in enumerate(np.char.decode(index.ids.numpy().astype(bytes), "utf-8"))}
    out = []
    for s, user_positives, user_exclude in zip(scores, positives, exclude):
        s = s.copy()
        s[[row_of[e] for e in user_exclude if e in row_of]] = -np.inf
        blocks = []
        for item in user_positives:
            if item not in row_of:  # never retrievable: ranks below every list
                blocks.append((index.num_candidates, 1))
                continue
            value = s[row_of[item]]
            blocks.append((int(np.sum(s > value)), int(np.sum(s == value))))
        out.append(blocks)
    return out
