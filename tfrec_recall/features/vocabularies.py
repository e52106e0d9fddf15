"""Feature specs from a split's training rows, and raw feature arrays for rows of a split."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from tfrec_recall.data.schema import ITEM_ID, TIMESTAMP, USER_ID, InteractionData
from tfrec_recall.features.specs import (EXAMPLE_AGE, HISTORY, ExampleAgeFeature, FeatureSpec, IdFeature,
                                         SequenceFeature, spec_for_table_kind, vocabulary_of)


def _side_specs(data: InteractionData, train: pd.DataFrame, side_embedding_dim: int) -> Dict[str, List[FeatureSpec]]:
    out: Dict[str, List[FeatureSpec]] = {"query": [], "candidate": []}
    for table, key, side in ((data.user_features, USER_ID, "query"), (data.item_features, ITEM_ID, "candidate")):
        if table is None:
            continue
        rows = table.reindex(pd.Index(train[key].unique()))
        for column in table.columns:
            spec_class = spec_for_table_kind(data.feature_kinds[column])
            out[side].append(spec_class.from_column(column, rows[column], side_embedding_dim))
    return out


def specs_from_split(split, *, embedding_dim: int = 32, side_embedding_dim: int = 16,
                     history_length: Optional[int] = None, pooling: str = "mean",
                     use_side_features: bool = True, use_user_id: bool = True,
                     use_history: bool = True, use_example_age: bool = False) -> Dict[str, List[FeatureSpec]]:
    """Feature specs for the query and candidate sides, with vocabularies and statistics from training rows;
    ``use_example_age`` adds the query-side :class:`ExampleAgeFeature` (``example_age``)."""
    train = split.train
    query: List[FeatureSpec] = []
    item_vocab = vocabulary_of(train[ITEM_ID])
    if use_user_id:
        query.append(IdFeature(USER_ID, embedding_dim, vocabulary=vocabulary_of(train[USER_ID])))
    if use_history:
        query.append(SequenceFeature(HISTORY, embedding_dim, vocabulary=item_vocab,
                                     max_len=history_length or split.history_length, pooling=pooling))
    if use_example_age:
        query.append(ExampleAgeFeature.from_timestamps(EXAMPLE_AGE, train[TIMESTAMP].to_numpy()))
    candidate: List[FeatureSpec] = [IdFeature(ITEM_ID, embedding_dim, vocabulary=item_vocab)]
    if use_side_features:
        side = _side_specs(split.data, train, side_embedding_dim)
        query += side["query"]
        candidate += side["candidate"]
    return {"query": query, "candidate": candidate}


def _column(rows: pd.DataFrame, data: InteractionData, name: str) -> pd.Series:
    if name in rows.columns:
        return rows[name]
    if data.user_features is not None and name in data.user_features.columns and USER_ID in rows.columns:
        return data.user_features[name].reindex(rows[USER_ID].to_numpy())
    if data.item_features is not None and name in data.item_features.columns and ITEM_ID in rows.columns:
        return data.item_features[name].reindex(rows[ITEM_ID].to_numpy())
    raise KeyError(f"feature {name!r} is neither a column of the rows ({list(rows.columns)}) nor a user or "
                   f"item feature of {data.name!r}")


def _array(rows: pd.DataFrame, data: InteractionData, spec: FeatureSpec, training: bool) -> np.ndarray:
    derived = spec.training_array(rows) if training else None
    if derived is not None:
        return derived
    if spec.serving_default is not None and spec.name not in rows.columns:
        return np.full(len(rows), spec.serving_default, dtype=spec.dtype.as_numpy_dtype)
    return spec.raw_array(_column(rows, data, spec.name))


def feature_arrays(rows: pd.DataFrame, data: InteractionData, specs: Sequence[FeatureSpec],
                   weight_column: Optional[str] = None, training: bool = False) -> Dict[str, np.ndarray]:
    """Raw input arrays for ``specs`` over ``rows`` (which hold ``user_id`` and/or ``item_id``, and ``history``).

    Side features are joined from the data's user / item tables; unknown entities get ``""`` (OOV) or NaN
    (the training mean). With ``weight_column``, that column of ``rows`` is added under its own name (the
    sample weight); it must exist. With ``training``, features derived from training rows (the example age)
    take their training values; otherwise features with a serving default take it."""
    out: Dict[str, np.ndarray] = {spec.name: _array(rows, data, spec, training) for spec in specs}
    if weight_column is not None:
        if weight_column not in rows.columns:
            raise KeyError(f"weight_column {weight_column!r} is not a column of the rows ({list(rows.columns)})")
        out[weight_column] = rows[weight_column].to_numpy(dtype=np.float32)
    return out
