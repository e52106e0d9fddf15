"""Exact full-corpus retrieval evaluation (../shared/PROTOCOL.md).

Every query is scored against the whole candidate corpus (batched matmul), the user's training items are
excluded (its own positives never are), and each metric is its EXPECTED value under random tie-breaking:
a positive y with h non-excluded candidates scoring strictly higher and t others tied with it takes each rank
r in h+1 .. h+t+1 with probability 1 / (t + 1) (its expected rank is 1 + h + t / 2, PROTOCOL.md). Hence

* P(rank(y) <= K) = clip(K - h, 0, t + 1) / (t + 1);
* HR@K = P(rank <= K) of the positive (with several positives, the largest of theirs);
  Recall@K = mean over positives of P(rank <= K);
* NDCG@K = sum over positives of E[1{rank <= K} / log2(rank + 1)], divided by the ideal
  sum_{i=1..min(|positives|, K)} 1 / log2(i + 1);
* MRR = E[1 / rank] of the positive (with several, the largest); full ranking, no cut-off;
* coverage@K = distinct items in all users' top-K lists / corpus size.

So a constant model scores chance, HR@K = K / #ranked items, never 1. A NaN or infinite score (before
exclusion) is an error naming how many users have one, not a ranking. Metrics are averaged over users.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm



def _check_ks(ks: Sequence[int], num_candidates: int) -> List[int]:
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def full_corpus_metrics(query_embeddings: np.ndarray, candidate_embeddings: np.ndarray,
                        positives: Sequence[Sequence[int]], exclude: Optional[Sequence[Sequence[int]]] = None,
                        ks: Sequence[int] = (10, 50, 100), batch_size: int = 1024,
                        progress: bool = False) -> Dict[str, float]:
    """Metrics of queries against all candidates. ``positives[u]`` / ``exclude[u]`` are candidate row indices."""
    q = np.asarray(query_embeddings, dtype=np.float32)
    c = tf.constant(np.asarray(candidate_embeddings, dtype=np.float32))
    n_users, n_items = q.shape[0], int(c.shape[0])
    if len(positives) != n_users:
        raise ValueError(f"positives has {len(positives)} rows but there are {n_users} queries")
    if exclude is not None and len(exclude) != n_users:
        raise ValueError(f"exclude has {len(exclude)} rows but there are {n_users} queries")
    ks = _check_ks(ks, n_items)
    max_k = min(max(ks), n_items)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("HR", "Recall", "NDCG")}
    sums["MRR"] = 0.0
    seen_in_top = {k: np.zeros(n_items, dtype=bool) for k in ks}
    gains = _cumulative_gains(n_items)
    counted, bad_users = 0, 0
    starts = range(0, n_users, batch_size)
    for start in tqdm(starts, desc="evaluating", disable=not progress, leave=False):
        stop = min(start + batch_size, n_users)
        scores = tf.linalg.matmul(tf.constant(q[start:stop]), c, transpose_b=True).numpy()
        finite = np.isfinite(scores).all(axis=1)
        bad_users += int(np.sum(~finite))
        if bad_users:
            continue
        for row in range(stop - start):
            user = start + row
            pos = np.unique(np.asarray(positives[user], dtype=np.int64))
            if exclude is not None and len(exclude[user]):
                ex = np.setdiff1d(np.asarray(exclude[user], dtype=np.int64), pos)
                scores[row, ex] = -np.inf
            if len(pos) == 0:
                continue
            counted += 1
            _add_user(sums, scores[row], pos, ks, gains)
        top = tf.math.top_k(tf.constant(scores), k=max_k).indices.numpy()
        for k in ks:
            seen_in_top[k][np.unique(top[:, :k])] = True
    if bad_users:
        raise ValueError(f"{bad_users} of {n_users} users have NaN or infinite scores: the model is broken "
                         "(a non-finite loss or embedding), not rankable")
    if counted == 0:
        raise ValueError("no query has a positive item: nothing to evaluate")
    out = {name: value / counted for name, value in sums.items()}
    for k in ks:
        out[f"Coverage@{k}"] = float(seen_in_top[k].mean())
    out["users"] = counted
    return out


def _cumulative_gains(n: int) -> Dict[str, np.ndarray]:
    """Prefix sums over ranks 1..n (index m = sum over ranks 1..m): DCG gains and reciprocal ranks."""
    ranks = np.arange(1, n + 1, dtype=np.float64)
    return {"dcg": np.r_[0.0, np.cumsum(1.0 / np.log2(ranks + 1))], "rr": np.r_[0.0, np.cumsum(1.0 / ranks)]}


def _add_user(sums, s: np.ndarray, pos: np.ndarray, ks: Sequence[int], gains) -> None:
    """Adds one user's expected metrics (ranks uniform over each positive's tie block) to ``sums``."""
    higher = np.array([np.sum(s > s[p]) for p in pos])
    tied = np.array([np.sum(s == s[p]) for p in pos])  # the positive itself included: t + 1
    last = higher + tied  # the block of equally likely ranks is higher+1 .. last

    def block_mean(prefix, upto):
        top = np.clip(upto, higher, last)
        return (prefix[top] - prefix[higher]) / tied

    sums["MRR"] += float(np.max(block_mean(gains["rr"], last)))
    for k in ks:
        hit = np.clip(k - higher, 0, tied) / tied
        sums[f"HR@{k}"] += float(hit.max())
        sums[f"Recall@{k}"] += float(hit.mean())
        ideal = gains["dcg"][min(len(pos), k)]
        sums[f"NDCG@{k}"] += float(np.sum(block_mean(gains["dcg"], np.minimum(k, last))) / ideal)
