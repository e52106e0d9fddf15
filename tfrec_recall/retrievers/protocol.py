"""The Retriever interface: what evaluation, ``recommend`` and the export call on every retriever.

A retriever is built once over a candidate corpus and then answers ``call(queries, k=None, exclude=None)`` with
``(scores [batch, k] float32, ids [batch, k] string)``, best first: ``k`` up to its ``max_k``, ``exclude`` a
``[batch, E]`` string tensor of ids to leave out (``""`` padding). It knows its ``max_k``, its
``num_candidates`` and whether it ``is_built``; it is a Keras model, so it saves with the SavedModel it is part
of, and a registered Keras serializable whose config rebuilds it unbuilt. Implementations: the top-k indexes
(:class:`~tfrec_recall.retrievers.base.TopKIndex`: ``BruteForce``, ``IVF``, ``ScaNN``) and
:class:`~tfrec_recall.retrievers.multi_query.MultiQueryRetriever` (K query vectors per user); Deep Retrieval's
beam search is to be another.
"""
from __future__ import annotations

import abc
from typing import Optional, Tuple

import tensorflow as tf


class Retriever(tf.keras.Model, metaclass=abc.ABCMeta):
    """Base of every retriever; subclasses set ``max_k`` and implement :meth:`call` and :attr:`is_built`."""

    max_k: int

    @property
    @abc.abstractmethod
    def is_built(self) -> bool:
        """Whether the retriever holds a corpus (built by its ``index`` step)."""

    @property
    @abc.abstractmethod
    def corpus_size(self) -> int:
        """The number of candidates it searches."""

    @abc.abstractmethod
    def call(self, queries, k: Optional[int] = None, exclude=None) -> Tuple[tf.Tensor, tf.Tensor]:
        """(scores [batch, k], ids [batch, k]) of the best non-excluded candidates, best first."""
