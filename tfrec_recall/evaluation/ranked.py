"""Retrieval metrics from ranked id lists, so every retriever (brute force, IVF, ScaNN, a multi-query merge) is
measured by the same code (../shared/PROTOCOL.md).

A retriever returns per user the top of its ranking: ``scores`` [U, L] (best first) and ``ids`` [U, L], with
the user's training items already excluded and ``""`` / ``-inf`` padding the tail when it has fewer
candidates. A positive's rank is its EXPECTED rank under random tie-breaking, as in
:func:`~tfrec_recall.evaluation.metrics.full_corpus_metrics`: with h entries scoring strictly higher and a tie
block of t entries (itself included) at its score, it takes each rank h+1 .. h+t with probability 1 / t.

A tie block that reaches the end of a full list is not known from the list alone (the retriever may hold more
items at that score, and a positive missing from the list may be one of them). The list of a user is *closed*
when it is padded or when some entry scores strictly below the entry at rank D = max(ks); then every block
touching ranks 1..D is complete. :func:`evaluate_retriever` asks the retriever for longer lists until they
close; for an exact :class:`~tfrec_recall.retrievers.BruteForce` index it counts instead, for every positive,
the non-excluded candidates scoring higher than / equal to it (``exact``), and an approximate retriever whose
lists stay open at its ``max_k`` is an error naming how many users.

Metrics (averaged over users with a positive): HR@K (the best positive), Recall@K (mean over positives),
NDCG@K (expected DCG / ideal DCG), MRR (expected reciprocal rank within the top D = max(ks); a positive ranked
lower, or not returned, counts 0), Coverage@K (distinct ids in the top-K lists / ``num_candidates``).
NaN or infinite scores (other than the ``-inf`` of padding) are an error naming how many users have them.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tfrec_recall._validation import require_positive_int

Block = Tuple[int, int]  # (h: strictly higher, t: tie block size including the positive)


def check_ks(ks: Sequence[int]) -> List[int]:
    """Sorted distinct positive ``ks`` or ``ValueError`` naming them."""
    try:
        values = sorted(set(int(k) for k in ks))
    except (TypeError, ValueError):
        raise ValueError(f"ks must be a sequence of positive integers, got {ks!r}") from None
    if not values or values[0] < 1:
        raise ValueError(f"ks must be positive integers, got {list(ks)!r}")
    return values


def non_finite_users(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Bool [U]: rows with a NaN score, or an infinite score on a real (non-empty) id."""
    bad = np.isnan(scores) | (np.isinf(scores) & (ids != ""))
    return bad.any(axis=1)


def open_lists(scores: np.ndarray, ids: np.ndarray, depth: int) -> np.ndarray:
    """Bool [U]: lists whose tie block at rank ``depth`` may continue beyond their end (full, and the last
    entry ties with rank ``depth``)."""
    if scores.shape[1] < depth:
        return ids[:, -1] != ""
    return (ids[:, -1] != "") & (scores[:, -1] == scores[:, depth - 1])


def list_blocks(scores: np.ndarray, ids: np.ndarray, positives: Sequence[str], depth: int) -> List[Block]:
    """(h, t) of each positive from one closed list; a positive not in it ranks below ``depth`` (h = depth)."""
    found = {item: s for item, s in zip(ids, scores) if item != ""}
    out = []
    for item in positives:
        if item not in found:
            out.append((depth, 1))
            continue
        s = found[item]
        out.append((int(np.sum(scores > s)), int(np.sum(scores == s))))
    return out


class MetricSums:
    """Metrics accumulated over batches of users' ranked lists (:meth:`add`), in user order, so users evaluated in
    chunks give the numbers of one call over all of them while no chunk's lists outlive it."""

    def __init__(self, ks: Sequence[int] = (10, 50, 100)):
        self.ks = check_ks(ks)
        self.sums = {f"{m}@{k}": 0.0 for k in self.ks for m in ("HR", "Recall", "NDCG")}
        self.sums["MRR"], self.counted = 0.0, 0
        self.covered = {k: set() for k in self.ks}

    def add(self, scores, ids, positives: Sequence[Sequence[str]],
            exact: Optional[Mapping[int, Sequence[Block]]] = None) -> "MetricSums":
        """Adds lists ``scores`` / ``ids`` [U, L] against ``positives`` (see :func:`ranked_list_metrics`)."""
        scores, ids = np.asarray(scores, dtype=np.float64), np.asarray(ids).astype(str)
        exact, depth = dict(exact or {}), self.ks[-1]
        _check_lists(scores, ids, positives, depth, exact)
        for u, user_positives in enumerate(positives):
            unique = list(dict.fromkeys(str(p) for p in user_positives))
            if not unique:
                continue
            blocks = exact[u] if u in exact else list_blocks(scores[u], ids[u], unique, depth)
            _add_user(self.sums, np.asarray(blocks, dtype=np.int64).reshape(-1, 2), self.ks)
            self.counted += 1
        for k in self.ks:
            top = ids[:, :k]
            self.covered[k].update(top[top != ""].tolist())
        return self

    def result(self, num_candidates: int) -> Dict[str, float]:
        """The metrics of every user added (Coverage@K over ``num_candidates``)."""
        num_candidates = require_positive_int("num_candidates", num_candidates)
        if self.counted == 0:
            raise ValueError("no query has a positive item: nothing to evaluate")
        out = {name: value / self.counted for name, value in self.sums.items()}
        for k in self.ks:
            out[f"Coverage@{k}"] = float(len(self.covered[k]) / num_candidates)
        out["users"] = self.counted
        return out


def ranked_list_metrics(scores, ids, positives: Sequence[Sequence[str]], ks: Sequence[int] = (10, 50, 100), *,
                        num_candidates: int, exact: Optional[Mapping[int, Sequence[Block]]] = None
                        ) -> Dict[str, float]:
    """Metrics of ranked lists ``scores`` / ``ids`` [U, L] (best first, ``""`` / ``-inf`` padding) against
    ``positives[u]`` (ids). ``exact[u]`` gives user u's (h, t) per positive (in ``positives[u]`` order, after
    dropping duplicates) counted over the whole corpus; every other user's list must be closed at max(ks)."""
    require_positive_int("num_candidates", num_candidates)
    return MetricSums(ks).add(scores, ids, positives, exact).result(num_candidates)


def _check_lists(scores: np.ndarray, ids: np.ndarray, positives, depth: int, exact: Mapping) -> None:
    """Shapes, finiteness and closedness of the lists, or ``ValueError`` saying what is wrong."""
    if scores.ndim != 2 or ids.shape != scores.shape:
        raise ValueError(f"scores and ids must be 2-D of the same shape, got {scores.shape} and {ids.shape}")
    if len(positives) != len(scores):
        raise ValueError(f"positives has {len(positives)} rows but there are {len(scores)} ranked lists")
    bad = non_finite_users(scores, ids)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} of {len(scores)} users have NaN or infinite scores: the model is broken "
                         "(a non-finite loss or embedding), not rankable")
    unresolved = [u for u in np.flatnonzero(open_lists(scores, ids, depth)) if u not in exact]
    if unresolved:
        raise ValueError(f"{len(unresolved)} of {len(scores)} users have a tie block at rank {depth} reaching the "
                         "end of their list: their ranks need a longer list or exact counts")


def _prefix(values_at_rank, upto: int) -> np.ndarray:
    """[0, f(1), f(1)+f(2), ...] up to rank ``upto``."""
    ranks = np.arange(1, upto + 1, dtype=np.float64)
    return np.r_[0.0, np.cumsum(values_at_rank(ranks))]


def _add_user(sums: Dict[str, float], blocks: np.ndarray, ks: Sequence[int]) -> None:
    """Adds one user's expected metrics; ``blocks`` [P, 2] holds (h, t) per positive."""
    higher, tied = blocks[:, 0], blocks[:, 1]
    last = higher + tied
    depth = ks[-1]
    dcg = _prefix(lambda r: 1.0 / np.log2(r + 1), depth)
    rr = _prefix(lambda r: 1.0 / r, depth)

    def block_mean(prefix, upto):  # E over rank uniform in higher+1..last of the gain, counted up to ``upto``
        lo = np.minimum(higher, depth)
        hi = np.clip(upto, lo, depth)
        return (prefix[hi] - prefix[lo]) / tied

    sums["MRR"] += float(np.max(block_mean(rr, np.minimum(depth, last))))
    for k in ks:
        hit = np.clip(k - higher, 0, tied) / tied
        sums[f"HR@{k}"] += float(hit.max())
        sums[f"Recall@{k}"] += float(hit.mean())
        ideal = dcg[min(len(blocks), k)]
        sums[f"NDCG@{k}"] += float(np.sum(block_mean(dcg, np.minimum(k, last))) / ideal)
