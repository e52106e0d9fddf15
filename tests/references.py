"""NumPy reference implementations the TensorFlow code is tested against."""
import numpy as np


def frequency_estimate(bucket_stream, size, alpha):
    """Yi et al. 2019, Algorithm 2 (update B <- (1 - alpha) B + alpha (t - A), A <- t), applied once per
    OCCURRENCE: a bucket hit c times at step t has had c occurrences in the t - A steps since it was last seen,
    each credited the gap (t - A) / c; B is normalised by its weight mass W (same update with gap 1), the
    bias-corrected moving average. ``bucket_stream``: one int array per step of state indices in [0, size).
    Returns (A, B, W, t)."""
    a, b, w = np.zeros(size), np.zeros(size), np.zeros(size)
    t = 0
    for buckets in bucket_stream:
        t += 1
        hits = {}
        for bucket in np.asarray(buckets).ravel():
            hits[int(bucket)] = hits.get(int(bucket), 0) + 1
        for bucket, c in hits.items():
            share = (t - a[bucket]) / c
            for _ in range(c):  # one paper update per occurrence
                b[bucket] = (1 - alpha) * b[bucket] + alpha * share
                w[bucket] = (1 - alpha) * w[bucket] + alpha
            a[bucket] = t
    return a, b, w, t


def expected_count_from_state(b, w, buckets):
    """Expected occurrences per step: 1 / (largest period B / W over an id's buckets); 0 if one is unseen.
    ``buckets``: [num_hashes, n] state indices."""
    buckets = np.asarray(buckets)
    seen = np.all(w[buckets] > 0, axis=0)
    period = np.max(b[buckets] / np.where(w[buckets] > 0, w[buckets], 1.0), axis=0)
    return np.where(seen, 1.0 / np.where(seen, period, 1.0), 0.0)


def mixed_log_q(batch_counts, corpus_weights, num_negatives, candidate_rows):
    """Yang et al. 2020 (mixed negative sampling) with Yi et al. 2019's correction: the in-batch and sampled
    candidates form one set, so candidate y's logit is corrected by log(B q(y) + M u(y)), B q(y) its expected
    count among the batch's positives and M u(y) = M w(y) / sum(w) its expected count among M corpus samples.
    ``batch_counts[i]`` is B q of candidate i, ``candidate_rows[i]`` its row in ``corpus_weights``."""
    u = np.asarray(corpus_weights, np.float64) / np.sum(corpus_weights)
    return np.log(np.asarray(batch_counts, np.float64) + num_negatives * u[np.asarray(candidate_rows)])


def retrieval_loss(q, c, ids=None, log_q=None, weights=None, temperature=1.0, remove_hits=False,
                   neg=None, neg_ids=None, neg_log_q=None, num_hard=None, in_batch=True):
    """sum_i w_i * CE_i of the sampled softmax (Yi et al. 2019, eq. 3 with the corrected logit
    s(x_i, y_j) / temperature - log q_j), computed row by row with plain loops."""
    q, c = np.asarray(q, np.float64), np.asarray(c, np.float64)
    cands = c if neg is None else np.concatenate([c, np.asarray(neg, np.float64)])
    all_ids = None if ids is None else (list(ids) + ([] if neg is None else list(neg_ids)))
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
