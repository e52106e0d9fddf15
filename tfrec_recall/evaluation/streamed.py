"""Evaluation streamed from split-example files (../shared/PROTOCOL.md): the validation / test examples the
pipeline writes hold one row per user, with the held-out item (``item_id``), the query inputs (history, side
columns) and the user's training items to exclude (``exclude``). Users are read and ranked ``users_per_chunk``
at a time, so memory is bounded by one chunk and the corpus, not by the number of users or interactions; the
metrics are those of one pass (``evaluate_retriever_in_chunks``).

* :func:`evaluate_examples`: a query tower against candidate embeddings (a model being trained, or a saved run's
  towers and ``candidates.npz``);
* :func:`most_popular_examples`: the most-popular ranker (every item scored by its training count, ties by
  expected rank), as :func:`~tfrec_recall.evaluation.baselines.most_popular_metrics` on the in-memory split;
* :func:`corpus_inputs` (a candidate tower's inputs for every corpus item) and :func:`count_items` (training
  counts read from the train files), for ranking a saved run over another corpus than its own.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Sequence

import numpy as np
import tensorflow as tf

from tfrec_recall._validation import require_positive_int
from tfrec_recall.data.protocol import EXCLUDE
from tfrec_recall.data.schema import ITEM_ID
from tfrec_recall.evaluation.evaluate import decoded_strings, embed_queries, indexed_retriever, query_rows
from tfrec_recall.evaluation.ranked import check_ks
from tfrec_recall.evaluation.retrieval import evaluate_retriever_in_chunks

DEFAULT_USERS_PER_CHUNK = 8192  # a multiple of the retrieval batch (256): the numbers are those of one pass


def check_chunking(max_users: Optional[int], users_per_chunk: int) -> None:
    """``ValueError`` naming ``users_per_chunk`` or ``max_users`` when not a positive integer (None: every user)."""
    require_positive_int("users_per_chunk", users_per_chunk)
    if max_users is not None:
        require_positive_int("max_users", max_users)


def example_chunks(files: Sequence[str], widths: Dict[str, Optional[int]], schema, *, max_users: Optional[int] = None,
                   users_per_chunk: int = DEFAULT_USERS_PER_CHUNK) -> Iterator[Dict[str, np.ndarray]]:
    """The ``widths`` columns of the example ``files`` (plus ``item_id`` and ``exclude``, as lists of ids),
    ``users_per_chunk`` examples at a time; only the first ``max_users`` when given. No example at all is an
    error naming the files."""
    from tfrec_recall.data.streaming import RAGGED, examples_dataset
    check_chunking(max_users, users_per_chunk)
    seen = 0
    widths = {**widths, ITEM_ID: None, EXCLUDE: RAGGED}
    for batch in examples_dataset(files, widths, users_per_chunk, schema=schema):
        size = int(batch[ITEM_ID].shape[0])
        keep = size if max_users is None else min(size, max_users - seen)
        yield {name: (_id_rows(value) if name == EXCLUDE else decoded_strings(value.numpy()))[:keep]
               for name, value in batch.items()}
        seen += keep
        if max_users is not None and seen >= max_users:
            return
    if not seen:
        raise ValueError(f"the example files {list(files)[:3]} hold no example (of {len(files)} files)")


def _id_rows(ragged: tf.RaggedTensor) -> np.ndarray:
    """A ragged batch of byte-string ids as a 1-D object array of lists of str."""
    out = np.empty(int(ragged.nrows()), dtype=object)
    for i, row in enumerate(ragged.to_list()):  # element by element: equal-length rows must not become 2-D
        out[i] = [v.decode("utf-8") for v in row]
    return out


def evaluate_examples(query_tower, ids: np.ndarray, embeddings: np.ndarray, files: Sequence[str], schema,
                      ks: Sequence[int] = (10, 50, 100), *, retriever=None, max_users: Optional[int] = None,
                      users_per_chunk: int = DEFAULT_USERS_PER_CHUNK) -> Dict[str, float]:
    """Metrics of ``query_tower`` ranking the candidates ``ids`` / ``embeddings`` (exact search, or ``retriever``)
    for the users of the example ``files``: their held-out item the positive, their training items excluded."""
    check_chunking(max_users, users_per_chunk)
    multi_query = getattr(query_tower, "multi_interest", False)
    index = indexed_retriever(retriever, np.asarray(ids).astype(str), embeddings, max(check_ks(ks)),
                              multi_query=multi_query)
    widths = {spec.name: spec.width for spec in query_tower.serving_specs}

    def chunks():
        for rows in example_chunks(files, widths, schema, max_users=max_users, users_per_chunk=users_per_chunk):
            features, positives, exclude = query_rows(rows, ITEM_ID, EXCLUDE)
            queries, mask = embed_queries(query_tower, features)
            yield queries, positives, exclude, mask
    return evaluate_retriever_in_chunks(index, chunks(), ks)


def most_popular_examples(ids: np.ndarray, counts: np.ndarray, files: Sequence[str], schema,
                          ks: Sequence[int] = (10, 50, 100), *,
                          users_per_chunk: int = DEFAULT_USERS_PER_CHUNK) -> Dict[str, float]:
    """Metrics of the most-popular ranker (every candidate of ``ids`` scored by its training count ``counts``,
    :func:`~tfrec_recall.evaluation.baselines.most_popular_in_chunks`) for the users of the example ``files``,
    their training items excluded."""
    from tfrec_recall.evaluation.baselines import most_popular_in_chunks
    chunks = (([[i] for i in rows[ITEM_ID]], rows[EXCLUDE])
              for rows in example_chunks(files, {}, schema, users_per_chunk=users_per_chunk))
    return most_popular_in_chunks(ids, counts, chunks, ks)


def corpus_inputs(specs, ids: np.ndarray, corpus_files: Sequence[str] = (), side=None, batch_size: int = 4096
                  ) -> Dict[str, np.ndarray]:
    """The candidate inputs ``specs`` of the corpus ``ids``: the ids alone (in their order) when the specs read
    nothing else, else the ``corpus_files`` examples sorted by id (the corpus split of examples joined with
    side-feature tables, whose ``side`` columns they carry), which must hold exactly the ``ids``."""
    from tfrec_recall.data.streaming import corpus_schema, examples_dataset
    ids = np.asarray(ids, dtype=object)
    if [spec.name for spec in specs] == [ITEM_ID]:
        return {ITEM_ID: ids}
    if not corpus_files:
        raise ValueError(f"the candidate tower reads {[spec.name for spec in specs]}: its inputs come from the "
                         "corpus split of examples joined with side-feature tables, and there is none")
    parts: Dict[str, list] = {spec.name: [] for spec in specs}
    widths = {spec.name: spec.width for spec in specs}
    for batch in examples_dataset(corpus_files, widths, batch_size, schema=corpus_schema(side)):
        for name, value in batch.items():
            parts[name].append(value.numpy())
    arrays = {name: decoded_strings(np.concatenate(values)) for name, values in parts.items()}
    order = np.argsort(arrays[ITEM_ID].astype(str), kind="stable")
    arrays = {name: value[order] for name, value in arrays.items()}
    if not np.array_equal(arrays[ITEM_ID].astype(str), np.sort(ids.astype(str))):
        raise ValueError(f"the corpus split holds {len(arrays[ITEM_ID])} items, not the {len(ids)} corpus ids asked "
                         "for (or other ones)")
    return arrays


def count_items(files: Sequence[str], schema, ids: np.ndarray, batch_size: int = 65536) -> np.ndarray:
    """Training interactions of each of ``ids`` (0 for an id never seen) in the example ``files``, read in
    batches (memory: one batch and one count per distinct item)."""
    from tfrec_recall.data.streaming import examples_dataset
    counts: Dict[str, int] = {}
    for batch in examples_dataset(files, {ITEM_ID: None}, batch_size, schema=schema):
        values, found = np.unique(batch[ITEM_ID].numpy(), return_counts=True)
        for value, n in zip(values, found):
            key = value.decode("utf-8")
            counts[key] = counts.get(key, 0) + int(n)
    return np.asarray([counts.get(str(i), 0) for i in ids], dtype=np.int64)
