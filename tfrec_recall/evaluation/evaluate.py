"""Offline evaluation of retrieval models (PROTOCOL.md): every query goes through a retriever (by default an
exact :class:`~tfrec_recall.retrievers.BruteForce` index over the whole corpus) and is measured on the ranked
ids it returns (:func:`~tfrec_recall.evaluation.retrieval.evaluate_retriever`), so an IVF, ScaNN or
multi-query retriever passed as ``retriever=`` is measured by the same code.

``data`` is a :class:`~tfrec_recall.data.split.Split` (its ``valid`` or ``test`` rows, one query per user,
training items excluded), or a ``tf.data.Dataset`` / dict of arrays of query features with a positive item-id
column ``label_column`` (1-D, or 2-D padded with ``""`` for several positives) and optionally an
``exclude_column`` (2-D, ``""``-padded item ids per row); then ``candidates`` is required: item feature arrays
(with an ``item_id`` column) or an ``(ids, embeddings)`` pair.
"""
from __future__ import annotations

from typing import Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrec_recall.data.schema import ITEM_ID, USER_ID
from tfrec_recall.data.split import Split
from tfrec_recall.data.tfdata import make_dataset
from tfrec_recall.evaluation.ranked import check_ks
from tfrec_recall.evaluation.retrieval import evaluate_retriever
from tfrec_recall.features import feature_arrays
from tfrec_recall.retrievers.brute_force import BruteForce
from tfrec_recall.retrievers.multi_query import MultiQueryRetriever
from tfrec_recall.retrievers.protocol import Retriever


def corpus_arrays(split: Split, specs) -> Dict[str, np.ndarray]:
    """Raw candidate features of every item in the corpus (sorted ids)."""
    return feature_arrays(pd.DataFrame({ITEM_ID: split.data.items}), split.data, specs)


def evaluate(model, data, which: str = "test", ks: Sequence[int] = (10, 50, 100), progress: bool = False, *,
             retriever=None, label_column: str = ITEM_ID, exclude_column: Optional[str] = None,
             candidates=None, positives_in: Optional[Collection[str]] = None) -> Dict[str, float]:
    """PROTOCOL.md metrics of ``model`` (with ``query_tower`` / ``candidate_tower``) on ``data``: a Split's
    ``which`` rows ("valid" or "test"), or a ``tf.data.Dataset`` / dict of arrays (see the module docstring).
    ``positives_in`` (Split only) measures a segment: the held-out items in that set of item ids (e.g. the
    tail, a genre), still ranked against the whole corpus."""
    if isinstance(data, Split):
        return evaluate_towers(model.query_tower, model.candidate_tower, data, which, ks, progress,
                               retriever=retriever, positives_in=positives_in)
    if positives_in is not None:
        raise ValueError("positives_in applies to a Split's rows; filter the rows of a dataset yourself")
    features, positives, exclude = query_rows(data, label_column, exclude_column)
    ids, embeddings = candidate_embeddings(model.candidate_tower, candidates)
    queries, mask = embed_queries(model.query_tower, _tower_inputs(model.query_tower, features, "data"))
    index = indexed_retriever(retriever, ids, embeddings, max(check_ks(ks)), multi_query=mask is not None)
    return evaluate_retriever(index, queries, positives, exclude, ks, query_mask=mask, progress=progress)


def evaluate_towers(query_tower, candidate_tower, split: Split, which: str = "test",
                    ks: Sequence[int] = (10, 50, 100), progress: bool = False, *, retriever=None,
                    positives_in: Optional[Collection[str]] = None) -> Dict[str, float]:
    """Metrics of the split's ``which`` users: one query per user, its held-out items as positives (several
    with a random split), its training items excluded; with ``positives_in``, only held-out items in that set
    count (users with none are left out) and the user's other held-out items are excluded too (neither hits nor
    misses)."""
    if which not in ("valid", "test"):
        raise ValueError(f"which must be 'valid' or 'test', got {which!r}")
    rows = getattr(split, which)
    held_out = rows.groupby(USER_ID, sort=False)[ITEM_ID].agg(list)
    if positives_in is not None:
        rows = rows[rows[ITEM_ID].isin(set(map(str, positives_in)))]
        if rows.empty:
            raise ValueError(f"positives_in: none of the {which} rows' items is in the given set "
                             f"({len(set(positives_in))} ids)")
    positives_by_user = rows.groupby(USER_ID, sort=False)[ITEM_ID].agg(list)
    users = rows.drop_duplicates(USER_ID).reset_index(drop=True)
    embeddings = None if _is_built(retriever) else embed(candidate_tower,  # a built one: nothing to embed
                                                         corpus_arrays(split, candidate_tower.input_specs))
    queries, mask = embed_queries(query_tower, feature_arrays(users, split.data, query_tower.input_specs))
    positives = [positives_by_user[u] for u in users[USER_ID]]
    exclude = [list(split.train_items.get(u, [])) + [i for i in held_out[u] if i not in set(positives_by_user[u])]
               for u in users[USER_ID]]
    index = indexed_retriever(retriever, split.data.items.astype(str), embeddings, max(check_ks(ks)),
                     multi_query=mask is not None)
    return evaluate_retriever(index, queries, positives, exclude, ks, query_mask=mask, progress=progress)


def embed(tower, arrays: Mapping[str, np.ndarray], batch_size: int = 4096) -> np.ndarray:
    outputs = [tower(batch, training=False).numpy() for batch in make_dataset(arrays, batch_size)]
    return np.concatenate(outputs, axis=0)


def embed_queries(tower, arrays: Mapping[str, np.ndarray], batch_size: int = 4096
                  ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(query embeddings, interest mask): ``[U, d]`` and None for a single-vector tower; ``[U, K, d]`` and
    ``[U, K]`` bool for a multi-interest one."""
    if not getattr(tower, "multi_interest", False):
        return embed(tower, arrays, batch_size), None
    queries, masks = [], []
    for batch in make_dataset(arrays, batch_size):
        queries.append(tower(batch, training=False).numpy())
        masks.append(tower.interest_mask(batch).numpy())
    return np.concatenate(queries, axis=0), np.concatenate(masks, axis=0)


def _is_built(retriever) -> bool:
    return isinstance(retriever, Retriever) and retriever.is_built


def indexed_retriever(retriever, ids: np.ndarray, embeddings: Optional[np.ndarray], depth: int,
                      multi_query: bool = False):
    """``retriever`` built over the candidates (an unbuilt one is built here; a built one is used as is, and
    ``embeddings`` may then be None), or a new exact BruteForce index with one id of look-ahead beyond ``depth``;
    with ``multi_query`` (K queries per user), an index that is not a MultiQueryRetriever is wrapped in one
    (max-score merge)."""
    if embeddings is None and not _is_built(retriever):
        raise ValueError("embeddings are needed unless retriever is an index already built")
    bad = 0 if embeddings is None else int(np.sum(~np.isfinite(embeddings).all(axis=1)))
    if bad:
        raise ValueError(f"{bad} of {len(embeddings)} candidate embeddings are NaN or infinite: the model is broken "
                         "(a non-finite loss or embedding), not rankable")
    if retriever is None:
        retriever = BruteForce(max_k=depth + 1).index(ids, embeddings)
    if not isinstance(retriever, Retriever):
        raise TypeError(f"retriever must be a Retriever (BruteForce, IVF, ScaNN, MultiQueryRetriever), got "
                        f"{type(retriever).__name__}")
    if not retriever.is_built:  # an unbuilt index (or the index inside a multi-query retriever) gets the corpus
        (retriever.index if isinstance(retriever, MultiQueryRetriever) else retriever).index(ids, embeddings)
    if multi_query and not isinstance(retriever, MultiQueryRetriever):
        retriever = MultiQueryRetriever(retriever)
    return retriever


def query_rows(data, label_column: str = ITEM_ID, exclude_column: Optional[str] = None
               ) -> Tuple[Dict[str, np.ndarray], List[List[str]], Optional[List[List[str]]]]:
    """(query feature arrays, positives per row, exclusions per row or None) of a dataset or dict of arrays."""
    if not isinstance(label_column, str) or not label_column:
        raise ValueError(f"label_column must be a non-empty column name, got {label_column!r}")
    if exclude_column is not None and (not isinstance(exclude_column, str) or exclude_column == label_column):
        raise ValueError(f"exclude_column must be None or a column name other than label_column, got "
                         f"{exclude_column!r}")
    arrays = _as_arrays(data)
    for argument, column in (("label_column", label_column), ("exclude_column", exclude_column)):
        if column is not None and column not in arrays:
            raise KeyError(f"{argument} {column!r} is not a column of data (columns: {sorted(arrays)})")
    positives = _id_lists(arrays.pop(label_column))
    exclude = None if exclude_column is None else _id_lists(arrays.pop(exclude_column))
    if not arrays:
        raise ValueError(f"data has no query feature columns besides {label_column!r}")
    return arrays, positives, exclude


def _as_arrays(data) -> Dict[str, np.ndarray]:
    """Columns of a dict of arrays or of a (batched or unbatched) dataset of feature dictionaries."""
    if isinstance(data, tf.data.Dataset):
        parts: Dict[str, list] = {}
        for element in data.as_numpy_iterator():
            if not isinstance(element, Mapping):
                raise TypeError(f"data must yield dictionaries of features, got {type(element).__name__}")
            for name, value in element.items():
                value = np.asarray(value)
                parts.setdefault(name, []).append(value[None] if value.ndim == 0 else value)
        if not parts:
            raise ValueError("data (a tf.data.Dataset) is empty")
        return {name: decoded_strings(np.concatenate(values)) for name, values in parts.items()}
    if isinstance(data, Mapping):
        return {str(name): decoded_strings(np.asarray(value)) for name, value in data.items()}
    raise TypeError(f"data must be a Split, a tf.data.Dataset or a dict of arrays, got {type(data).__name__}")


def decoded_strings(values: np.ndarray) -> np.ndarray:
    """Byte strings (UTF-8) as str objects; other arrays unchanged."""
    if values.dtype.kind == "S" or (values.dtype == object and values.size and isinstance(values.flat[0], bytes)):
        return np.char.decode(values.astype(bytes), "utf-8").astype(object)
    return values


def _id_lists(column: np.ndarray) -> List[List[str]]:
    """One list of non-empty ids per row of a 1-D column, a 2-D padded column or a column of sequences."""
    rows = [np.asarray(row, dtype=object).reshape(-1) for row in column]
    return [[str(v) for v in row if str(v) != ""] for row in rows]


def _tower_inputs(tower, arrays: Mapping[str, np.ndarray], argument: str) -> Dict[str, np.ndarray]:
    """The columns ``tower`` is served (its serving specs: an input the model fills in at serving time, such as
    the example age, is left out even when present, so evaluation asks as a server does), or ``KeyError``
    naming the missing ones."""
    specs = getattr(tower, "serving_specs", None)
    if specs is None:
        return dict(arrays)
    missing = [spec.name for spec in specs if spec.name not in arrays]
    if missing:
        raise KeyError(f"{argument} lacks the columns {missing} that the tower reads (columns: {sorted(arrays)})")
    return {spec.name: arrays[spec.name] for spec in specs}


def candidate_embeddings(candidate_tower, candidates) -> Tuple[np.ndarray, np.ndarray]:
    """(ids, embeddings) from ``candidates``: an (ids, embeddings) pair or item feature arrays with item_id."""
    if candidates is None:
        raise ValueError("candidates is required when data is not a Split: item feature arrays (with an "
                         f"{ITEM_ID!r} column) or an (ids, embeddings) pair")
    if isinstance(candidates, tuple) and len(candidates) == 2:
        ids, embeddings = candidates
        return decoded_strings(np.asarray(ids)).astype(str), np.asarray(embeddings, dtype=np.float32)
    if isinstance(candidates, Mapping):
        arrays = _as_arrays(candidates)
        if ITEM_ID not in arrays:
            raise KeyError(f"candidates has no {ITEM_ID!r} column (columns: {sorted(arrays)})")
        embeddings = embed(candidate_tower, _tower_inputs(candidate_tower, arrays, "candidates"))
        return arrays[ITEM_ID].astype(str), embeddings
    raise TypeError(f"candidates must be an (ids, embeddings) pair or a dict of item feature arrays, got "
                    f"{type(candidates).__name__}")
