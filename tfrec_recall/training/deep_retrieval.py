"""Deep Retrieval's EM training (Gao et al. 2020, "Learning a Retrievable Structure for Large-Scale
Recommendations", sec. 3.3, Algorithm 1) for a two-tower model carrying a :class:`PathStructureLoss`.

Each round alternates

* the E-step: ``model.fit`` for ``epochs_per_round`` epochs with the paths fixed. The structure model (on the
  query tower's user vector), the user encoder and the model's own retrieval task (the softmax reranker,
  trained jointly) all learn from ``retrieval_loss + weight * structure loss``;
* the M-step (:func:`m_step`): beam search of width ``MStep.beam_width`` for every training interaction's user,
  the scores s[v, c] summed per item, and the penalised coordinate descent of :mod:`path_assignment`; items
  without an interaction take their nearest trained item's paths (cosine of the candidate tower's vectors).

The paths start random (the loss's seeded initial assignment). Each round is logged and returned: the E-step's
mean structure loss, the M-step bound after each coordinate-descent sweep, and the path sizes.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import List, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from tfrec_recall._validation import require_finite_nonnegative, require_positive_int
from tfrec_recall.data.tfdata import make_dataset
from tfrec_recall.layers.structure import check_beam_width, path_codes
from tfrec_recall.retrievers.deep_retrieval import DeepRetrievalIndex
from tfrec_recall.tasks.path_likelihood import PathStructureLoss
from tfrec_recall.training.path_assignment import (Assignment, PathScores, ScoreAccumulator, assign_paths,
                                                   fill_unseen_items)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MStep:
    """The M-step's settings: ``beam_width`` candidate paths per interaction, ``max_candidates`` kept per item,
    penalty weight ``alpha`` (f(|c|) = |c|^``exponent`` / ``exponent``), ``iterations`` coordinate-descent
    sweeps, ``batch_size`` interactions per beam-search batch."""
    beam_width: int = 10
    max_candidates: int = 100
    alpha: float = 0.0
    iterations: int = 3
    exponent: float = 4.0
    batch_size: int = 1024

    def __post_init__(self):
        for name in ("beam_width", "max_candidates", "iterations", "batch_size"):
            require_positive_int(name, getattr(self, name))
        require_finite_nonnegative("alpha", self.alpha)
        if require_finite_nonnegative("exponent", self.exponent) < 1:
            raise ValueError(f"exponent must be >= 1 (a convex penalty), got {self.exponent}")


@dataclasses.dataclass
class EMRound:
    """One round's log: ``structure_loss`` (the E-step's last-epoch mean), ``bound`` (the M-step objective after
    each sweep), path sizes (``used_paths`` distinct paths, ``max_path_size``, ``mean_path_size``),
    ``items_without_paths`` (unreachable items) and ``items_filled`` (items given a neighbour's paths)."""
    round: int
    structure_loss: float
    bound: List[float]
    used_paths: int
    max_path_size: int
    mean_path_size: float
    items_without_paths: int
    items_filled: int


def structure_loss_of(model) -> PathStructureLoss:
    """The model's :class:`PathStructureLoss` (exactly one)."""
    found = [loss for loss in getattr(model, "auxiliary_losses", []) if isinstance(loss, PathStructureLoss)]
    if len(found) != 1:
        raise ValueError(f"Deep Retrieval's EM needs a model with one PathStructureLoss among its auxiliary losses, "
                         f"got {len(found)}")
    return found[0]


def path_scores(model, arrays: Mapping[str, np.ndarray], step: MStep):
    """s[v, c] of every item (:class:`~tfrec_recall.training.path_assignment.PathScores`) from the training
    interactions ``arrays`` (raw features, one row per interaction)."""
    loss = structure_loss_of(model)
    structure = loss.structure
    width = check_beam_width(step.beam_width, structure.num_codes, structure.num_layers)

    @tf.function
    def beams(batch):
        return structure.beam_search(model(batch, training=False), width)

    accumulator = ScoreAccumulator(len(loss.items))
    for batch in make_dataset(arrays, step.batch_size):
        paths, log_probs = beams(batch)
        rows = loss.item_rows(batch[loss.item_feature]).numpy()
        known = rows >= 0
        accumulator.add(rows[known], path_codes(paths.numpy()[known], structure.num_codes),
                        log_probs.numpy()[known])
    return accumulator.result(step.max_candidates)


def m_step(model, arrays: Mapping[str, np.ndarray], step: MStep = MStep(),
           item_vectors: Optional[np.ndarray] = None) -> tuple:
    """Computes and installs new paths (scoring in this process); returns :func:`install_paths`'s result."""
    return install_paths(model, path_scores(model, arrays, step), step, item_vectors)


def install_paths(model, scores: PathScores, step: MStep, item_vectors: Optional[np.ndarray] = None) -> tuple:
    """Coordinate descent over ``scores``, then the paths of items without any from their nearest trained item
    (by ``item_vectors`` [V, d] in the order of the loss's ``items``), installed in the model's loss. Returns
    (Assignment, donor): ``donor[v]`` the item whose paths item v took (itself, a neighbour, or -1: none)."""
    loss = structure_loss_of(model)
    result: Assignment = assign_paths(scores, num_paths=loss.num_paths, alpha=step.alpha,
                                      iterations=step.iterations, exponent=step.exponent)
    result.paths, donor = fill_unseen_items(result.paths, item_vectors)
    loss.assign(result.paths)
    return result, donor


def path_sizes(codes: np.ndarray) -> np.ndarray:
    """The number of items on each used path of an assignment ``codes`` [V, J] (-1: none)."""
    codes = np.asarray(codes)
    return np.unique(codes[codes >= 0], return_counts=True)[1]


def deep_retrieval_index(model, ids, candidates, *, beam_width: int = 20, rerank: bool = True,
                         max_k: int = 100) -> DeepRetrievalIndex:
    """Builds a :class:`DeepRetrievalIndex` over ``ids`` (``candidates``: their raw features or embeddings, as
    ``index_candidates`` takes) with each id's paths from the model's :class:`PathStructureLoss`, and makes it
    what ``model.recommend`` searches. An id the loss does not know, or with no path, is unreachable (counted in
    the index's ``unreachable``, never silently dropped)."""
    loss = structure_loss_of(model)
    ids = np.asarray(ids).astype(str)
    paths = loss.paths_of(ids)
    index = DeepRetrievalIndex(loss.structure, beam_width=beam_width, rerank=rerank, max_k=max_k)
    return model.index_candidates(ids, candidates, index=index, paths=paths)


class PathEMStep(tf.keras.callbacks.Callback):
    """Deep Retrieval's M-step inside ``model.fit``: after every ``every`` epochs (the E-steps) it assigns new
    paths from ``arrays`` (the training interactions) and logs the round (``path_bound``, ``paths_used``,
    ``max_path_size``, ``unreachable_items``; the rounds are kept in ``rounds``). ``item_vectors``: None, an
    array [V, d] or a callable giving one (the candidate tower's vectors of the loss's items). Put it before
    callbacks that evaluate the model at the epoch's end, so that they see the new paths."""

    def __init__(self, arrays: Mapping[str, np.ndarray], step: MStep = MStep(), every: int = 1, item_vectors=None):
        super().__init__()
        self.arrays, self.step, self.item_vectors = arrays, step, item_vectors
        self.every = require_positive_int("every", every)
        self.rounds: List[EMRound] = []

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        vectors = self.item_vectors() if callable(self.item_vectors) else self.item_vectors
        result, donor = m_step(self.model, self.arrays, self.step, vectors)
        sizes = path_sizes(result.paths)
        loss_name = structure_loss_of(self.model).name
        self.rounds.append(EMRound(
            round=len(self.rounds) + 1, structure_loss=float((logs or {}).get(loss_name, np.nan)),
            bound=result.objective, used_paths=len(sizes), max_path_size=int(sizes.max(initial=0)),
            mean_path_size=float(sizes.mean()) if len(sizes) else 0.0,
            items_without_paths=int((donor < 0).sum()),
            items_filled=int(((donor >= 0) & (donor != np.arange(len(donor)))).sum())))
        r = self.rounds[-1]
        if logs is not None:
            logs.update(path_bound=r.bound[-1], paths_used=r.used_paths, max_path_size=r.max_path_size,
                        unreachable_items=r.items_without_paths)
        log.info("Deep Retrieval round %d: structure loss %.4f, M-step bound %.4g, %d paths used (max %d items, "
                 "mean %.2f), %d items unreachable", r.round, r.structure_loss, r.bound[-1], r.used_paths,
                 r.max_path_size, r.mean_path_size, r.items_without_paths)


def fit_em(model, arrays: Mapping[str, np.ndarray], *, rounds: int = 3, epochs_per_round: int = 1,
           batch_size: int = 256, step: MStep = MStep(), item_vectors=None, seed: int = 0, verbose: int = 0,
           callbacks: Sequence[tf.keras.callbacks.Callback] = ()) -> List[EMRound]:
    """Runs ``rounds`` E/M rounds on a compiled ``model`` (module docstring): ``model.fit`` with a
    :class:`PathEMStep` after every ``epochs_per_round`` epochs. Returns the rounds' logs."""
    rounds = require_positive_int("rounds", rounds)
    epochs_per_round = require_positive_int("epochs_per_round", epochs_per_round)
    structure_loss_of(model)
    em = PathEMStep(arrays, step, every=epochs_per_round, item_vectors=item_vectors)
    model.fit(make_dataset(arrays, batch_size, shuffle=True, seed=seed), epochs=rounds * epochs_per_round,
              verbose=verbose, callbacks=[em, *callbacks])
    return em.rounds


__all__ = ["MStep", "EMRound", "PathEMStep", "fit_em", "deep_retrieval_index", "m_step", "install_paths", "path_scores",
           "path_sizes", "structure_loss_of"]
