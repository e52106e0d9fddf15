"""The interaction schema every reader produces.

An :class:`InteractionData` holds

* ``interactions``: a DataFrame with columns ``user_id`` (str), ``item_id`` (str), ``timestamp`` (int64,
  seconds or any monotone clock) and optionally ``weight`` (float, a reward; 1.0 when absent). Row order is
  the file order, which breaks timestamp ties.
* ``user_features`` / ``item_features``: optional DataFrames indexed by ``user_id`` / ``item_id``, one row per
  entity, whose columns are side features.
* ``feature_kinds``: for every side-feature column, one of ``categorical`` (a string), ``multi_categorical``
  (a tuple of strings, e.g. genres) or ``numeric`` (a float).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import numpy as np
import pandas as pd

USER_ID = "user_id"
ITEM_ID = "item_id"
TIMESTAMP = "timestamp"
WEIGHT = "weight"
FEATURE_KINDS = ("categorical", "multi_categorical", "numeric")


class DataError(ValueError):
    """Bad input data. The message names the file, the line (1-based) and the field when they are known."""

    def __init__(self, message: str, *, path=None, line: Optional[int] = None, field: Optional[str] = None):
        where = []
        if path is not None:
            where.append(f"{path}")
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)
        self.path, self.line, self.field = path, line, field


@dataclasses.dataclass
class InteractionData:
    interactions: pd.DataFrame
    user_features: Optional[pd.DataFrame] = None
    item_features: Optional[pd.DataFrame] = None
    feature_kinds: Dict[str, str] = dataclasses.field(default_factory=dict)
    name: str = "data"
    skipped_rows: int = 0
    # Display names of items (e.g. movie titles), indexed by item_id: metadata for people (the TensorBoard
    # projector, recommendation printouts), never a model feature.
    item_titles: Optional[pd.Series] = None

    def __post_init__(self):
        validate_interactions(self.interactions, source=self.name)
        for table, key in ((self.user_features, USER_ID), (self.item_features, ITEM_ID)):
            if table is None:
                continue
            if table.index.name != key:
                raise DataError(f"feature table must be indexed by {key!r}, got index {table.index.name!r}",
                                path=self.name)
            for column in table.columns:
                kind = self.feature_kinds.get(column)
                if kind not in FEATURE_KINDS:
                    raise DataError(f"feature column {column!r} has kind {kind!r}; expected one of {FEATURE_KINDS}",
                                    path=self.name, field=column)

    @property
    def user_feature_names(self):
        return [] if self.user_features is None else list(self.user_features.columns)

    @property
    def item_feature_names(self):
        return [] if self.item_features is None else list(self.item_features.columns)

    @property
    def items(self) -> np.ndarray:
        """All item ids of the corpus: items with features plus items seen in interactions, sorted."""
        ids = set(self.interactions[ITEM_ID].unique())
        if self.item_features is not None:
            ids |= set(self.item_features.index)
        return np.array(sorted(ids), dtype=object)

    def summary(self) -> str:
        df = self.interactions
        return (f"{self.name}: {len(df):,} interactions, {df[USER_ID].nunique():,} users, "
                f"{len(self.items):,} items; user features {self.user_feature_names}, "
                f"item features {self.item_feature_names}")


def validate_interactions(df: pd.DataFrame, source: str = "interactions") -> None:
    for column in (USER_ID, ITEM_ID, TIMESTAMP):
        if column not in df.columns:
            raise DataError(f"missing required column {column!r} (columns: {list(df.columns)})",
                            path=source, field=column)
    if len(df) == 0:
        raise DataError("no interactions", path=source)
    if not pd.api.types.is_integer_dtype(df[TIMESTAMP]):
        raise DataError(f"timestamp column must be integer, got dtype {df[TIMESTAMP].dtype}",
                        path=source, field=TIMESTAMP)
    if WEIGHT in df.columns:
        if not pd.api.types.is_float_dtype(df[WEIGHT]):
            raise DataError(f"weight column must be float, got dtype {df[WEIGHT].dtype}", path=source, field=WEIGHT)
        bad = ~np.isfinite(df[WEIGHT].to_numpy()) | (df[WEIGHT].to_numpy() < 0)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"weight must be a finite non-negative number, got {df[WEIGHT].iloc[row]!r}",
                            path=source, line=row + 1, field=WEIGHT)
