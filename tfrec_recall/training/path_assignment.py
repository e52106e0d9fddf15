"""Deep Retrieval's M-step: choosing each item's J paths (Gao et al. 2020, "Learning a Retrievable Structure for
Large-Scale Recommendations", sec. 3.2-3.3, the penalised M-step solved by coordinate descent).

With the structure model fixed, the M-step maximises over the item-to-path assignment pi

    sum_i log sum_j p(pi_j(y_i) | x_i)  -  alpha * sum_c f(|c|),      f(|c|) = |c|^4 / 4,

where |c| is the number of items on path c. The first term of an item v with N_v interactions is bounded above
(Jensen, log being concave) by

    N_v * log sum_j s[v, pi_j(v)]  (+ a constant),        s[v, c] = sum_{i: y_i = v} p(c | x_i),

and the M-step maximises that bound minus the penalty. s[v, c] is computed only for candidate paths: for each
interaction, the B paths beam search finds for its user (a path outside every beam of an item's users has a
negligible score); each item keeps its ``max_candidates`` best-scored candidates.

Coordinate descent then visits the items in turn and, for each of an item's J slots, takes the slot's path out
and puts back the candidate c (not already on another of the item's slots) maximising

    N_v * log(s_other + s[v, c]) - alpha * (f(|c| + 1) - f(|c|)),

the exact change of the objective (s_other: the scores of the item's other slots). Each update can keep the
old path, so the objective never decreases (tested). An item with fewer than J candidates gets fewer paths
(the rest of its slots are -1); an item with no interactions gets none here (see ``fill_unseen_items``).

The scoring is a map over interaction batches and a sum per (item, path) key; :mod:`path_assignment_beam` runs
the same functions as an Apache Beam pipeline. The coordinate descent runs in one process over the compact
candidate lists (items x ``max_candidates`` numbers), as the paper's algorithm is sequential over items.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Tuple

import numpy as np

from tfrec_recall._validation import require_finite_nonnegative, require_positive_int

MIN_SCORE = 1e-300  # floor of s before the log: a candidate whose probabilities all underflowed


@dataclasses.dataclass(frozen=True)
class PathScores:
    """Candidate paths of every item, grouped by item (CSR): item ``v``'s candidates are
    ``codes[offsets[v]:offsets[v + 1]]`` (path codes, see ``path_codes``) with scores s[v, c], best first;
    ``counts[v]`` is N_v, the item's number of interactions."""
    offsets: np.ndarray  # [V + 1] int64
    codes: np.ndarray  # [nnz] int64
    scores: np.ndarray  # [nnz] float64
    counts: np.ndarray  # [V] int64

    @property
    def num_items(self) -> int:
        return len(self.counts)


def interaction_scores(item_rows, beam_codes, beam_log_probs) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (item, path, p(path | user)) triples of a batch of interactions: ``item_rows`` [n] the items' rows,
    ``beam_codes`` [n, B] the path codes beam search found for each interaction's user, ``beam_log_probs``
    [n, B] their log-probabilities."""
    item_rows = np.asarray(item_rows, np.int64)
    beam_codes = np.asarray(beam_codes, np.int64)
    probs = np.exp(np.asarray(beam_log_probs, np.float64))
    if beam_codes.shape != probs.shape or beam_codes.shape[:1] != item_rows.shape:
        raise ValueError(f"item_rows [n], beam_codes [n, B] and beam_log_probs [n, B] disagree: "
                         f"{item_rows.shape}, {beam_codes.shape}, {probs.shape}")
    return np.repeat(item_rows, beam_codes.shape[1]), beam_codes.ravel(), probs.ravel()


def sum_by_key(items, codes, values) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``values`` summed over equal (item, code) keys; keys sorted by item, then code."""
    items, codes, values = (np.asarray(items, np.int64), np.asarray(codes, np.int64),
                            np.asarray(values, np.float64))
    if len(items) == 0:
        return items, codes, values
    order = np.lexsort((codes, items))
    items, codes, values = items[order], codes[order], values[order]
    starts = np.flatnonzero(np.r_[True, (items[1:] != items[:-1]) | (codes[1:] != codes[:-1])])
    return items[starts], codes[starts], np.add.reduceat(values, starts)


class ScoreAccumulator:
    """Sums the triples of :func:`interaction_scores` batch by batch (memory bounded by the distinct keys)."""

    def __init__(self, num_items: int, compact_every: int = 2_000_000):
        self.num_items = require_positive_int("num_items", num_items)
        self.compact_every = require_positive_int("compact_every", compact_every)
        self.counts = np.zeros(self.num_items, np.int64)
        self._parts: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending = self._compacted = 0  # triples added since the last compaction; distinct keys then

    def add(self, item_rows, beam_codes, beam_log_probs) -> None:
        rows = np.asarray(item_rows, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_items):
            raise ValueError(f"item rows must be in [0, {self.num_items}), got [{rows.min()}, {rows.max()}]")
        self.counts += np.bincount(rows, minlength=self.num_items)
        self.add_sums(*interaction_scores(rows, beam_codes, beam_log_probs))

    def add_sums(self, items, codes, values) -> None:
        """Adds already-summed (item, code, s) triples (e.g. a Beam pipeline's output)."""
        self._parts.append((np.asarray(items, np.int64), np.asarray(codes, np.int64),
                            np.asarray(values, np.float64)))
        self._pending += len(self._parts[-1][0])
        # Compacting once the new triples reach the compacted ones' number (or compact_every) keeps the total
        # sorting work O(n log n) and the memory within twice the distinct keys plus compact_every.
        if self._pending >= max(self.compact_every, self._compacted):
            self._parts = [sum_by_key(*map(np.concatenate, zip(*self._parts)))]
            self._compacted, self._pending = len(self._parts[0][0]), 0

    def result(self, max_candidates: int = 100) -> PathScores:
        require_positive_int("max_candidates", max_candidates)
        if not self._parts:
            empty = np.zeros(0, np.int64)
            return PathScores(np.zeros(self.num_items + 1, np.int64), empty, empty.astype(np.float64),
                              self.counts.copy())
        return top_candidates(*sum_by_key(*map(np.concatenate, zip(*self._parts))), counts=self.counts,
                              max_candidates=max_candidates)


def top_candidates(items, codes, scores, counts, max_candidates: int) -> PathScores:
    """The ``max_candidates`` best-scored codes of each item (ties: the smaller code), as :class:`PathScores`."""
    items, codes, scores = np.asarray(items, np.int64), np.asarray(codes, np.int64), np.asarray(scores)
    order = np.lexsort((codes, -scores, items))
    items, codes, scores = items[order], codes[order], scores[order]
    first = np.searchsorted(items, items, side="left")
    keep = (np.arange(len(items)) - first) < max_candidates
    items, codes, scores = items[keep], codes[keep], scores[keep]
    counts = np.asarray(counts, np.int64)
    offsets = np.r_[0, np.cumsum(np.bincount(items, minlength=len(counts)))].astype(np.int64)
    return PathScores(offsets, codes, scores.astype(np.float64), counts)


def penalty(sizes, exponent: float = 4.0) -> np.ndarray:
    """f(|c|) = |c|^exponent / exponent (the paper's f with exponent 4)."""
    return np.power(np.asarray(sizes, np.float64), exponent) / exponent


@dataclasses.dataclass
class Assignment:
    """The M-step's result: ``paths`` [V, J] path codes, each item's best-scored first (-1: no path in that
    slot, after the item's paths), the bound's value after each
    coordinate-descent sweep (``objective``), and the number of items on each used path (``path_sizes``)."""
    paths: np.ndarray
    objective: List[float]
    path_sizes: np.ndarray


def assign_paths(scores: PathScores, num_paths: int = 3, alpha: float = 0.0, iterations: int = 3,
                 exponent: float = 4.0) -> Assignment:
    """Coordinate descent over items (module docstring): J = ``num_paths`` paths per item, penalty weight
    ``alpha`` >= 0, ``iterations`` sweeps over all items."""
    num_paths = require_positive_int("num_paths", num_paths)
    alpha = require_finite_nonnegative("alpha", alpha)
    iterations = require_positive_int("iterations", iterations)
    exponent = require_finite_nonnegative("exponent", exponent)
    if exponent < 1:
        raise ValueError(f"exponent must be >= 1 (a convex penalty), got {exponent}")
    distinct, compact = np.unique(scores.codes, return_inverse=True)
    sizes = np.zeros(len(distinct), np.int64)
    slots = -np.ones((scores.num_items, num_paths), np.int64)  # positions into the item's candidate list
    objective = []
    for _ in range(iterations):
        for v in range(scores.num_items):
            lo, hi = scores.offsets[v], scores.offsets[v + 1]
            if hi > lo:
                _update_item(slots[v], compact[lo:hi], scores.scores[lo:hi], scores.counts[v], sizes, alpha,
                             exponent)
        objective.append(_objective(scores, slots, sizes, alpha, exponent))
    return Assignment(_slot_codes(scores, slots), objective, sizes[sizes > 0])


def _update_item(slots, candidates, s, count, sizes, alpha, exponent) -> None:
    """One pass over the item's J slots, in place (``slots``: its positions, ``sizes``: the global counts).
    Plain Python over the item's few candidates: numpy's per-call cost dominates at this size (1M items)."""
    weight, codes, scores = max(int(count), 1), candidates.tolist(), s.tolist()
    for j in range(len(slots)):
        if slots[j] >= 0:
            sizes[codes[slots[j]]] -= 1
        others = [int(slots[i]) for i in range(len(slots)) if i != j and slots[i] >= 0]
        base = sum(scores[o] for o in others)
        best, best_gain = -1, -math.inf
        for p, code in enumerate(codes):
            if p in others:
                continue
            n = float(sizes[code])
            gain = (weight * math.log(max(base + scores[p], MIN_SCORE))
                    - alpha * ((n + 1.0) ** exponent - n ** exponent) / exponent)
            if gain > best_gain:  # the first of equal gains, as argmax
                best, best_gain = p, gain
        slots[j] = best
        if best >= 0:
            sizes[codes[best]] += 1


def _objective(scores: PathScores, slots, sizes, alpha, exponent) -> float:
    v, j = np.nonzero(slots >= 0)
    chosen = np.zeros(scores.num_items)
    np.add.at(chosen, v, scores.scores[scores.offsets[v] + slots[v, j]])
    has = np.unique(v)
    weights = np.maximum(scores.counts[has], 1)
    return float((weights * np.log(np.maximum(chosen[has], MIN_SCORE))).sum() - alpha * penalty(sizes, exponent).sum())


def _slot_codes(scores: PathScores, slots) -> np.ndarray:
    """Path codes of the slots, each item's best-scored path first (candidates are stored best first)."""
    slots = np.sort(np.where(slots >= 0, slots, np.iinfo(np.int64).max), axis=1)
    slots[slots == np.iinfo(np.int64).max] = -1
    codes = -np.ones_like(slots)
    v, j = np.nonzero(slots >= 0)
    codes[v, j] = scores.codes[scores.offsets[v] + slots[v, j]]
    return codes


def fill_unseen_items(paths: np.ndarray, item_vectors: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Items without a path (no interaction in training) take the paths of their nearest item that has one, by
    cosine of ``item_vectors`` [V, d] (e.g. the candidate tower's embeddings of the items' features). Returns
    (paths, donor): ``donor[v]`` is the item whose paths ``v`` took (``v`` itself when it had its own, -1 when
    no item has paths or ``item_vectors`` is None: the item stays unreachable)."""
    paths = np.array(paths, np.int64)
    has = (paths >= 0).any(axis=1)
    donor = np.where(has, np.arange(len(paths)), -1)
    missing = np.flatnonzero(~has)
    if item_vectors is None or not has.any() or not len(missing):
        return paths, donor
    vectors = np.asarray(item_vectors, np.float64)
    if vectors.shape[0] != len(paths):
        raise ValueError(f"item_vectors has {vectors.shape[0]} rows, the items {len(paths)}")
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    trained = np.flatnonzero(has)
    for start in range(0, len(missing), 4096):
        block = missing[start:start + 4096]
        nearest = trained[np.argmax(unit[block] @ unit[trained].T, axis=1)]
        paths[block], donor[block] = paths[nearest], nearest
    return paths, donor


__all__ = ["PathScores", "ScoreAccumulator", "Assignment", "interaction_scores", "sum_by_key", "top_candidates",
           "penalty", "assign_paths", "fill_unseen_items"]
