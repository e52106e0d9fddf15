"""NumPy reference implementations the TensorFlow code is tested against."""
import numpy as np


def frequency_estimate(bucket_stream, num_buckets, alpha, initial_steps=0.0):
    """Yi et al. 2019, Algorithm 2/3 with batched steps: each distinct bucket is updated once per step.
    ``bucket_stream``: one int array [num_hashes, batch] per step. Returns (A, B, t)."""
    stream = [np.asarray(b) for b in bucket_stream]
    num_hashes = stream[0].shape[0]
    a = np.zeros((num_hashes, num_buckets))
    b = np.full((num_hashes, num_buckets), float(initial_steps))
    t = 0.0
    for buckets in stream:
        t += 1.0
        for j in range(num_hashes):
            for bucket in np.unique(buckets[j]):
                b[j, bucket] = (1 - alpha) * b[j, bucket] + alpha * (t - a[j, bucket])
                a[j, bucket] = t
    return a, b, t


def probability_from_state(b, buckets):
    """p = 1 / max_j B_j[h_j(y)], clipped to at most 1. ``buckets``: [num_hashes, n]."""
    period = np.max(np.stack([b[j, buckets[j]] for j in range(b.shape[0])]), axis=0)
    return 1.0 / np.maximum(period, 1.0)


def retrieval_loss(q, c, ids=None, log_q=None, weights=None, temperature=1.0, remove_hits=False,
                   neg=None, neg_ids=None, neg_log_q=None, num_hard=None, in_batch=True):
    """sum_i w_i * CE_i of the sampled softmax, computed row by row with plain loops."""
    q, c = np.asarray(q, np.float64), np.asarray(c, np.float64)
    cands = c if neg is None else np.concatenate([c, np.asarray(neg, np.float64)])
    all_ids = None if ids is None else (list(ids) + ([] if neg is None else list(neg_ids)))
    if log_q is None and neg_log_q is not None:
        log_q = np.zeros(len(c))
    if neg is not None and neg_log_q is None and log_q is not None:
        neg_log_q = np.zeros(len(neg))
    all_log_q = None if log_q is None else np.concatenate([log_q, [] if neg is None else neg_log_q])
    total = 0.0
    for i in range(len(q)):
        logits = []
        for j in range(len(cands)):
            s = float(q[i] @ cands[j]) / temperature
            if all_log_q is not None:
                s -= all_log_q[j]
            if j != i and remove_hits and all_ids[j] == all_ids[i]:
                continue
            if j != i and not in_batch and j < len(c):
                continue
            logits.append((s, j == i))
        positive = [s for s, p in logits if p][0]
        negatives = sorted([s for s, p in logits if not p], reverse=True)
        if num_hard is not None:
            negatives = negatives[:num_hard]
        values = np.array([positive] + negatives)
        ce = np.log(np.sum(np.exp(values - values.max()))) + values.max() - positive
        total += (1.0 if weights is None else weights[i]) * ce
    return total
