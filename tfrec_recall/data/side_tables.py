"""Side-feature tables (user and item attributes) as their own ``tf.Example`` files, joined onto the split examples
in Beam, with their training statistics computed in Beam, so side-feature models train from streamed examples.

* Table examples (:func:`write_feature_table`): one per entity, holding its key (``user_id`` / ``item_id``, one
  bytes or int64 value) and each declared column: ``categorical`` one bytes / int64 value, ``multi_categorical``
  any number of them, ``numeric`` one float / int64 value. An absent column is a missing value; a column the
  :class:`SideFeatures` does not declare is not read.
* ``side_jobs.JoinSideFeatures`` (Beam; ``add_join`` / ``run_join_side_features``): the split examples keyed
  by item and by user, joined with the tables (``CoGroupByKey``). Every joined example carries every declared
  column: a categorical one ``""`` when missing, a numeric one NaN, a multi-categorical one its list (empty when
  missing), which is what the in-memory path feeds for an entity without a table row. The join also writes the
  ``corpus`` split: one example per corpus item (the items of the three splits and of the item table, as
  ``InteractionData.items``), with its item columns: the candidates evaluation ranks. ``side_features.json`` at
  the root of the joined examples names the columns and their kinds, so the examples describe themselves.
* ``side_jobs.SideStatistics`` (``run_side_statistics``): from the joined training examples, over the entities
  of the training rows (one value per entity, as ``specs_from_split`` takes them from the tables): a vocabulary
  file per categorical / multi-categorical column (sorted distinct non-empty tokens), the widest list of a
  multi-categorical column, the mean and (population) variance of the finite values of a numeric column, in
  ``statistics.json``. :func:`side_specs` turns them into feature specs whose lookups read the files.

This module holds the format (no Beam import); the jobs are in :mod:`tfrec_recall.data.side_jobs`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrec_recall import storage
from tfrec_recall.data.protocol import EXCLUDE, HISTORY, POSITION, ROW_NUMBER
from tfrec_recall.data.schema import FEATURE_KINDS, ITEM_ID, TIMESTAMP, USER_ID, WEIGHT, DataError

SIDE_FEATURES_FILE = "side_features.json"
STATISTICS_FILE = "statistics.json"
CORPUS = "corpus"  # the split of joined examples holding one example per corpus item
ENTITIES = {"user": USER_ID, "item": ITEM_ID}  # entity -> its key column
RESERVED = (USER_ID, ITEM_ID, TIMESTAMP, WEIGHT, POSITION, HISTORY, EXCLUDE, ROW_NUMBER, "history_times",
            "example_age")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
Columns = Tuple[Tuple[str, str], ...]  # (column, kind), in table order


def _columns(entity: str, columns, seen: set) -> Columns:
    if isinstance(columns, (str, bytes)) or not isinstance(columns, Iterable):
        raise ValueError(f"{entity} side features must be (name, kind) pairs, got {columns!r}")
    out = []
    for pair in columns:
        name, kind = pair if isinstance(pair, (tuple, list)) and len(pair) == 2 else (pair, None)
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in RESERVED:
            raise ValueError(f"{entity} side-feature name must be a letter then letters, digits or '_', and none "
                             f"of {list(RESERVED)}; got {name!r}")
        if name in seen:
            raise ValueError(f"side feature {name!r} is declared twice")
        if kind not in FEATURE_KINDS:
            raise ValueError(f"side feature {name!r}: kind must be one of {list(FEATURE_KINDS)}, got {kind!r}")
        seen.add(name)
        out.append((name, kind))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class SideFeatures:
    """The side-feature columns of the user and the item tables, ``(name, kind)`` in table order."""
    user: Columns = ()
    item: Columns = ()

    def __post_init__(self):
        seen: set = set()
        for entity in ENTITIES:
            object.__setattr__(self, entity, _columns(entity, getattr(self, entity), seen))

    @classmethod
    def of_data(cls, data) -> "SideFeatures":
        """The columns of an ``InteractionData``'s user and item tables."""
        return cls(tuple((c, data.feature_kinds[c]) for c in data.user_feature_names),
                   tuple((c, data.feature_kinds[c]) for c in data.item_feature_names))

    def __bool__(self) -> bool:
        return bool(self.user or self.item)

    @property
    def kinds(self) -> Dict[str, str]:
        return dict(self.user + self.item)

    def to_json(self) -> str:
        return json.dumps({entity: [list(c) for c in getattr(self, entity)] for entity in ENTITIES}, indent=2)

    def to_dict(self) -> dict:
        return {entity: [list(c) for c in getattr(self, entity)] for entity in ENTITIES}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, value, source: str = "side features") -> "SideFeatures":
        """From ``{"user": [[name, kind], ...], "item": [...]}``; errors name ``source``."""
        if not isinstance(value, dict) or not set(value) <= set(ENTITIES) or not all(
                isinstance(value.get(e) or [], list) for e in ENTITIES):
            raise ValueError(f"{source}: expected an object with keys {list(ENTITIES)} holding lists of "
                             f"[name, kind] pairs, got {str(value)[:200]}")
        try:
            return cls(**{entity: tuple(tuple(c) if isinstance(c, list) else c for c in value.get(entity) or ())
                          for entity in ENTITIES})
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "side features") -> "SideFeatures":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} is not JSON: {error}") from None
        return cls.from_dict(value, source)


def read_side_features(examples_uri: str) -> Optional[SideFeatures]:
    """The side features of joined examples (their ``side_features.json``); ``None`` for examples without."""
    path = storage.join(examples_uri, SIDE_FEATURES_FILE)
    return SideFeatures.from_json(storage.read_text(path), path) if storage.exists(path) else None


def read_statistics(statistics_dir: str) -> Optional[dict]:
    """``statistics.json`` of the side statistics job (``None`` when absent), its ``side_features`` parsed."""
    path = storage.join(statistics_dir, STATISTICS_FILE)
    if not storage.exists(path):
        return None
    statistics = storage.read_json(path)
    return {**statistics, "side_features": SideFeatures.from_dict(statistics["side_features"], path)}


# -- values -----------------------------------------------------------------------------------------------------
def missing_value(kind: str):
    return {"categorical": "", "multi_categorical": (), "numeric": float("nan")}[kind]


def _text(value, name: str) -> str:
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise DataError(f"holds {value[:50]!r}, which is not UTF-8", field=name) from None


def _token(value, name: str) -> str:
    token = _text(value, name)
    if "\n" in token or "\r" in token:
        raise DataError(f"holds {token!r}: a token must not contain a line break (vocabulary files hold one token "
                        "per line)", field=name)
    return token


def column_value(example, name: str, kind: str):
    """The value of side column ``name`` (of ``kind``) in an example, the kind's missing value when absent."""
    feature = example.features.feature.get(name)
    which = feature.WhichOneof("kind") if feature is not None else None
    values = list(getattr(feature, which).value) if which else []
    if not values:
        return missing_value(kind)
    allowed = ("float_list", "int64_list") if kind == "numeric" else ("bytes_list", "int64_list")
    if which not in allowed:
        raise DataError(f"a {kind} side feature holds {which} {values[:3]}, expected one of {list(allowed)}",
                        field=name)
    if kind == "multi_categorical":
        return tuple(_token(v, name) for v in values)
    if len(values) != 1:
        raise DataError(f"a {kind} side feature must hold one value, got {len(values)}: {values[:3]}", field=name)
    return float(values[0]) if kind == "numeric" else _token(values[0], name)


def key_of(example, key: str) -> str:
    """The entity id ``key`` of an example (one bytes / int64 value), as str; errors name the field."""
    feature = example.features.feature.get(key)
    which = feature.WhichOneof("kind") if feature is not None else None
    if which not in ("bytes_list", "int64_list") or len(getattr(feature, which).value) != 1:
        found = f"{which} {list(getattr(feature, which).value)[:3]}" if which else "nothing"
        raise DataError(f"must hold one bytes or int64 value in every example, found {found}", field=key)
    return _text(getattr(feature, which).value[0], key)


def parse_table_row(record, entity: str, columns: Columns) -> Tuple[str, tuple]:
    """A table example (serialized or not) -> (its id, the values of ``columns``, missing ones filled)."""
    example = tf.train.Example.FromString(record) if isinstance(record, bytes) else record
    return key_of(example, ENTITIES[entity]), tuple(column_value(example, n, k) for n, k in columns)


def _set(example, name: str, kind: str, value) -> None:
    feature = example.features.feature[name]
    if kind == "numeric":
        feature.float_list.value.append(float(value))
    elif kind == "categorical":
        feature.bytes_list.value.append(str(value).encode("utf-8"))
    else:
        feature.bytes_list.value.extend(str(v).encode("utf-8") for v in value)


def with_features(record: bytes, values: tuple, columns: Columns) -> bytes:
    """A serialized example with ``columns`` set to ``values`` (which are complete: no column left out)."""
    example = tf.train.Example.FromString(record)
    for (name, kind), value in zip(columns, values):
        example.features.feature[name].Clear()
        _set(example, name, kind, value)
    return example.SerializeToString(deterministic=True)


def _keyed_example(key: str, key_name: str, pairs) -> bytes:
    example = tf.train.Example()
    example.features.feature[key_name].bytes_list.value.append(key.encode("utf-8"))
    for (name, kind), value in pairs:
        _set(example, name, kind, value)
    return example.SerializeToString(deterministic=True)


def corpus_example(item: str, values: tuple, columns: Columns) -> bytes:
    """The corpus split's example of one item: its id and item columns."""
    return _keyed_example(item, ITEM_ID, zip(columns, values))


def _cell(value, kind: str, name: str, key: str):
    """A table cell (pandas: NaN / None / NA for missing, tuples for lists) as a complete value."""
    if kind == "multi_categorical":
        return tuple(str(v) for v in value) if isinstance(value, (tuple, list, np.ndarray)) else ()
    if pd.isna(value):
        return missing_value(kind)
    if kind != "numeric":
        return str(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"the numeric side feature of {key!r} is {value!r}, not a number", field=name) from None


def table_rows(table: pd.DataFrame, columns: Columns) -> Iterable[Tuple[str, tuple]]:
    """(id, complete values) per row of a side table indexed by its key."""
    cells = [table[name].to_numpy(dtype=object) for name, _ in columns]
    for row, key in enumerate(table.index):
        yield str(key), tuple(_cell(c[row], kind, name, key) for c, (name, kind) in zip(cells, columns))


def write_feature_table(table: pd.DataFrame, entity: str, columns: Columns, path: str) -> str:
    """Writes a side table (indexed by ``user_id`` / ``item_id``) as gzipped TFRecords of table examples: the
    pipeline's ``user_features_root`` / ``item_features_root`` input. Missing values are left out. Atomic;
    never overwrites."""
    from tfrec_recall._atomic import atomic_new_file
    if entity not in ENTITIES or table.index.name != ENTITIES[entity]:
        raise ValueError(f"entity must be one of {list(ENTITIES)} and the table indexed by its key, got "
                         f"{entity!r} and index {table.index.name!r}")
    with atomic_new_file(path) as tmp, tf.io.TFRecordWriter(tmp, options="GZIP") as writer:
        for key, values in table_rows(table, columns):
            writer.write(_keyed_example(key, ENTITIES[entity], [(c, v) for c, v in zip(columns, values)
                                                                if not _is_missing(v, c[1])]))
    return path


def _is_missing(value, kind: str) -> bool:
    if kind == "numeric":
        return math.isnan(value)
    return value == missing_value(kind)


def write_side_features_file(output_dir: str, side: SideFeatures) -> str:
    """Writes ``side_features.json`` into joined examples' ``output_dir``."""
    path = storage.join(output_dir, SIDE_FEATURES_FILE)
    storage.write_text(path, side.to_json())
    return path


def side_specs(statistics_dir: str, side_embedding_dim: int) -> Dict[str, list]:
    """``{"query": user-column specs, "candidate": item-column specs}`` from ``statistics.json`` under
    ``statistics_dir``, as ``specs_from_split`` builds them from the tables (lookups read the vocabulary files)."""
    from tfrec_recall.data.beam_jobs import vocabulary_path
    from tfrec_recall.features.specs import IdFeature, MultiCategoricalFeature, NumericFeature, padded_width
    statistics = read_statistics(statistics_dir)
    if statistics is None:
        raise FileNotFoundError(f"{storage.join(statistics_dir, STATISTICS_FILE)} does not exist: run the side "
                                "statistics job (tfrec_recall.data.side_jobs.run_side_statistics)")
    side = statistics["side_features"]
    out: Dict[str, list] = {"query": [], "candidate": []}
    for entity, role in (("user", "query"), ("item", "candidate")):
        for name, kind in getattr(side, entity):
            stats = statistics["columns"][name]
            if kind == "numeric":
                out[role].append(NumericFeature.from_moments(name, stats.get("count", 0), stats.get("mean", 0.0),
                                                             stats.get("variance", 0.0)))
                continue
            if not stats.get("vocabulary_size"):
                raise ValueError(f"side feature {name!r} has no value in any training {entity}: no vocabulary")
            vocabulary = vocabulary_path(statistics_dir, name)
            if kind == "categorical":
                out[role].append(IdFeature(name, side_embedding_dim, vocabulary_file=vocabulary))
            else:
                out[role].append(MultiCategoricalFeature(name, side_embedding_dim, vocabulary_file=vocabulary,
                                                         max_len=padded_width(stats.get("max_length", 0))))
    return out
