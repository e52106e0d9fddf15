"""Exact full-corpus retrieval evaluation (../shared/PROTOCOL.md).

Every query is scored against the whole candidate corpus (batched matmul), the user's training items are
excluded (its own positives never are), and per user:

* rank(y) = 1 + number of non-excluded candidates scoring strictly higher than positive y;
* HR@K = 1 if some positive has rank <= K;  Recall@K = |positives with rank <= K| / |positives|;
* NDCG@K = sum over positives with rank <= K of 1 / log2(rank + 1), divided by the ideal
  sum_{i=1..min(|positives|, K)} 1 / log2(i + 1);
* MRR = 1 / (best rank)  (full ranking, no cut-off);
* coverage@K = distinct items in all users' top-K lists / corpus size.

Metrics are averaged over users.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from tfrec_recall._validation import require_positive_int


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
    counted = 0
    starts = range(0, n_users, batch_size)
    for start in tqdm(starts, desc="evaluating", disable=not progress, leave=False):
        stop = min(start + batch_size, n_users)
        scores = tf.linalg.matmul(tf.constant(q[start:stop]), c, transpose_b=True).numpy()
        for row in range(stop - start):
            user = start + row
            pos = np.unique(np.asarray(positives[user], dtype=np.int64))
            if exclude is not None and len(exclude[user]):
                ex = np.setdiff1d(np.asarray(exclude[user], dtype=np.int64), pos)
                scores[row, ex] = -np.inf
            if len(pos) == 0:
                continue
            counted += 1
            s = scores[row]
            ranks = np.array([1 + int(np.sum(s > s[p])) for p in pos])
            sums["MRR"] += 1.0 / ranks.min()
            for k in ks:
                hits = ranks[ranks <= k]
                sums[f"HR@{k}"] += float(len(hits) > 0)
                sums[f"Recall@{k}"] += len(hits) / len(pos)
                ideal = np.sum(1.0 / np.log2(np.arange(2, min(len(pos), k) + 2)))
                sums[f"NDCG@{k}"] += float(np.sum(1.0 / np.log2(hits + 1)) / ideal)
        top = tf.math.top_k(tf.constant(scores), k=max_k).indices.numpy()
        for k in ks:
            seen_in_top[k][np.unique(top[:, :k])] = True
    if counted == 0:
        raise ValueError("no query has a positive item: nothing to evaluate")
    out = {name: value / counted for name, value in sums.items()}
    for k in ks:
        out[f"Coverage@{k}"] = float(seen_in_top[k].mean())
    out["users"] = counted
    return out


class RetrievalEvaluation(tf.keras.callbacks.Callback):
    """Runs an evaluation function at the end of every ``every`` epochs and adds its metrics to the logs
    (prefixed ``val_``), so ``History`` and other callbacks see them."""

    def __init__(self, evaluate_fn, every: int = 1, prefix: str = "val_", keys: Optional[Sequence[str]] = None):
        super().__init__()
        require_positive_int("every", every)
        self.evaluate_fn, self.every, self.prefix, self.keys = evaluate_fn, every, prefix, keys

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        metrics = self.evaluate_fn()
        if logs is not None:
            for name, value in metrics.items():
                if name != "users" and (self.keys is None or name in self.keys):
                    logs[self.prefix + name] = float(value)
