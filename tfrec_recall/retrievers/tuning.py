"""Recall tuning of the approximate indexes (IVF, ScaNN), shared by both.

After the search structure is built, :func:`tune_search` measures recall@k of the index against exact search on
``tuning_queries`` queries drawn near the corpus, and raises the index's search knobs (IVF: ``num_probes``;
ScaNN: ``num_leaves_to_search`` and ``num_reordering_candidates``) until the measured recall reaches
``target_recall`` or every knob is at its maximum (searching everything).

Queries near the corpus: random corpus rows plus Gaussian noise whose standard deviation is ``tuning_noise``
times each dimension's standard deviation over the corpus. Rows alone would be too easy (each query's best
candidate is itself and its neighbours share its list); the noise moves queries between clusters the way a
query tower's outputs, which are not candidate vectors, are. The default 0.5 makes the tuning set harder than
rows with little noise, so the tuned setting errs towards more search.

Search: each step doubles one knob (with several knobs, the one whose doubling measures the higher recall),
then a bisection between the last failing and the first passing value of that knob finds the smallest value
that still meets the target (within 1/16 of the interval).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from tfrec_recall._validation import require_int, require_positive_int

DEFAULT_TARGET_RECALL = 0.95
Setting = Dict[str, int]


def check_tuning_arguments(target_recall, tuning_queries, tuning_noise) -> Tuple[Optional[float], int, float]:
    """Validated (target_recall, tuning_queries, tuning_noise); ``ValueError`` naming the argument and value."""
    if target_recall is not None and (isinstance(target_recall, bool) or not isinstance(target_recall, numbers.Real)
                                      or not 0.0 < target_recall <= 1.0):
        raise ValueError(f"target_recall must be None or a number in (0, 1], got {target_recall!r}")
    require_positive_int("tuning_queries", tuning_queries)
    if (isinstance(tuning_noise, bool) or not isinstance(tuning_noise, numbers.Real)
            or not math.isfinite(tuning_noise) or tuning_noise < 0):
        raise ValueError(f"tuning_noise must be a finite number >= 0, got {tuning_noise!r}")
    return (None if target_recall is None else float(target_recall)), int(tuning_queries), float(tuning_noise)


@dataclasses.dataclass(frozen=True)
class TuningResult:
    """What the tuning chose and measured: the setting, its recall@k, and every (setting, recall) tried."""
    setting: Setting
    recall: float
    k: int
    target_recall: float
    num_queries: int
    tried: Tuple[Tuple[Tuple[Tuple[str, int], ...], float], ...]

    def as_dict(self) -> dict:
        return {"k": self.k, "target_recall": self.target_recall, "measured_recall": round(self.recall, 4),
                "met_target": self.recall >= self.target_recall, "setting": dict(self.setting),
                "num_queries": self.num_queries,
                "tried": [{"setting": dict(s), "recall": round(r, 4)} for s, r in self.tried]}


def near_corpus_queries(embeddings: np.ndarray, num_queries: int, noise: float, seed: int) -> np.ndarray:
    """``num_queries`` random rows of ``embeddings`` plus N(0, (noise * per-dimension std)^2) noise, float32."""
    rng = np.random.default_rng(require_int("seed", seed, minimum=0))
    rows = rng.choice(len(embeddings), size=num_queries, replace=num_queries > len(embeddings))
    scale = noise * embeddings.std(axis=0, dtype=np.float64)
    return (embeddings[rows] + rng.normal(size=(num_queries, embeddings.shape[1])) * scale).astype(np.float32)


def exact_top_k(queries: np.ndarray, embeddings: np.ndarray, k: int, max_scores: int = 1 << 25) -> np.ndarray:
    """Row indices [B, k] of the ``k`` best inner products, by matmul over query chunks of at most
    ``max_scores`` scores each."""
    candidates = tf.constant(embeddings)
    chunk = max(1, max_scores // len(embeddings))
    out = []
    for start in range(0, len(queries), chunk):
        scores = tf.linalg.matmul(tf.constant(queries[start:start + chunk]), candidates, transpose_b=True)
        out.append(tf.math.top_k(scores, k=k).indices.numpy())
    return np.concatenate(out)


def recall_at_k(exact_rows: np.ndarray, found_rows: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / k (``-1`` in ``found_rows`` finds nothing)."""
    hits = (found_rows[:, :, None] == exact_rows[:, None, :]).any(axis=2).sum(axis=1)
    return float(np.mean(hits / exact_rows.shape[1]))


def _bisect(measure: Callable[[Setting], float], setting: Setting, knob: str, low: int, target: float,
            recall: float) -> Tuple[Setting, float, List]:
    """Smallest value of ``knob`` in (low, setting[knob]] meeting ``target`` (``low`` fails, the top passes)."""
    tried, high = [], setting[knob]
    tolerance = max(1, (high - low) // 16)
    while high - low > tolerance:
        middle = (low + high) // 2
        candidate = {**setting, knob: middle}
        value = measure(candidate)
        tried.append((candidate, value))
        if value >= target:
            high, setting, recall = middle, candidate, value
        else:
            low = middle
    return setting, recall, tried


def _double_once(measure, setting: Setting, maximum: Setting) -> Optional[Tuple[str, Setting, float, List]]:
    """Doubles the knob whose doubling measures the higher recall: (knob, setting, recall, tried), or None when
    every knob is at its maximum."""
    tried = []
    for knob in setting:
        if setting[knob] < maximum[knob]:
            candidate = {**setting, knob: min(2 * setting[knob], maximum[knob])}
            tried.append((knob, candidate, measure(candidate)))
    if not tried:
        return None
    knob, best, recall = max(tried, key=lambda item: item[2])  # first knob wins a tie
    return knob, best, recall, [(s, r) for _, s, r in tried]


def search_setting(measure: Callable[[Setting], float], start: Setting, maximum: Setting,
                   target: float) -> Tuple[Setting, float, List]:
    """The smallest setting found (doubling, then bisection) whose ``measure`` (recall) is >= ``target``, capped
    at ``maximum``: (setting, recall, [(setting, recall) tried])."""
    setting = {knob: min(value, maximum[knob]) for knob, value in start.items()}
    recall = measure(setting)
    tried = [(setting, recall)]
    while recall < target:
        step = _double_once(measure, setting, maximum)
        if step is None:
            return setting, recall, tried
        knob, doubled, doubled_recall, step_tried = step
        tried += step_tried
        if doubled_recall >= target:
            setting, recall, refined = _bisect(measure, doubled, knob, setting[knob], target, doubled_recall)
            return setting, recall, tried + refined
        setting, recall = doubled, doubled_recall
    return setting, recall, tried


def tune_search(search: Callable[[np.ndarray, Setting, int], np.ndarray], embeddings: np.ndarray, k: int,
                start: Setting, maximum: Setting, target_recall: float, num_queries: int, noise: float,
                seed: int) -> TuningResult:
    """Tunes an index's search knobs: ``search(queries, setting, k)`` returns row indices [B, k] (-1 for none)
    of the index searched with ``setting``; see the module docstring."""
    require_positive_int("k", k)
    queries = near_corpus_queries(embeddings, num_queries, noise, seed)
    exact = exact_top_k(queries, embeddings, k)
    measure = lambda setting: recall_at_k(exact, np.asarray(search(queries, setting, k)))  # noqa: E731
    setting, recall, tried = search_setting(measure, start, maximum, target_recall)
    frozen = tuple((tuple(sorted(s.items())), float(r)) for s, r in tried)
    return TuningResult(dict(setting), float(recall), k, target_recall, num_queries, frozen)
