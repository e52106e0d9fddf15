"""The evaluation protocol (../shared/PROTOCOL.md) on ``tf.Example`` records, one user at a time.

The TFX pipeline computes the leave-last-out split and the causal history features in a Beam transform that
groups interactions by user (``pipelines/transforms.py``). The per-user logic lives here, in plain Python, so
the Beam transform, the tests and :func:`read_split_examples` share it, and it gives the same rows and
histories as :func:`tfrec_recall.data.split.leave_last_out`.

Raw interaction examples carry ``user_id`` and ``item_id`` (bytes or int64), ``timestamp`` (int64) and
optionally ``weight`` (float) and ``row_number`` (int64: the position in the source file, which breaks
timestamp ties as PROTOCOL.md asks; without it ties break by item id). Split examples carry ``user_id``,
``item_id``, ``timestamp``, ``weight``, ``position`` (the interaction's index in the user's time order) and
``history`` (the user's previous training items, most recent first, at most ``history_length``); ``eval`` and
``test`` examples also carry ``exclude``: all the user's training items, in time order, which ranking removes
from the candidates (so evaluation can stream these examples without the training split beside them).
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from tfrec_recall import storage
from tfrec_recall._atomic import atomic_new_file
from tfrec_recall._validation import require_positive_int
from tfrec_recall.data.schema import ITEM_ID, TIMESTAMP, USER_ID, WEIGHT, DataError, InteractionData
from tfrec_recall.data.split import Split

ROW_NUMBER = "row_number"
POSITION = "position"
HISTORY = "history"
EXCLUDE = "exclude"
TRAIN, EVAL, TEST = "train", "eval", "test"
SPLITS = (TRAIN, EVAL, TEST)


def _single(example, name: str, kinds: Sequence[str], required: bool = True):
    feature = example.features.feature.get(name)
    kind = feature.WhichOneof("kind") if feature is not None else None
    if kind is None or len(getattr(feature, kind).value) == 0:
        if required:
            raise DataError("missing in an interaction example", field=name)
        return None
    if kind not in kinds:
        raise DataError(f"has type {kind}, expected one of {list(kinds)}", field=name)
    values = getattr(feature, kind).value
    if len(values) != 1:
        raise DataError(f"must hold one value, got {len(values)}", field=name)
    value = values[0]
    return value.decode("utf-8") if isinstance(value, bytes) else value


def parse_interaction(example) -> Dict[str, object]:
    """A raw interaction ``tf.train.Example`` -> dict of the fields above (ids as str). Errors name the field."""
    return {
        USER_ID: str(_single(example, USER_ID, ("bytes_list", "int64_list"))),
        ITEM_ID: str(_single(example, ITEM_ID, ("bytes_list", "int64_list"))),
        TIMESTAMP: int(_single(example, TIMESTAMP, ("int64_list",))),
        WEIGHT: float(_single(example, WEIGHT, ("float_list", "int64_list"), required=False) or 1.0),
        ROW_NUMBER: _single(example, ROW_NUMBER, ("int64_list",), required=False),
    }


def assign_user(events: Iterable[Mapping[str, object]], history_length: int = 50) -> List[Tuple[str, dict]]:
    """One user's interactions -> ``(split, record)`` pairs by PROTOCOL.md: sorted by timestamp (ties by
    ``row_number``, then item id), the last is ``test``, the one before ``eval``, the rest ``train``; users with
    fewer than 3 interactions stay in training only. Histories are causal (see the module docstring)."""
    require_positive_int("history_length", history_length)
    ordered = sorted(events, key=lambda e: (e[TIMESTAMP], -1 if e.get(ROW_NUMBER) is None else e[ROW_NUMBER],
                                            e[ITEM_ID]))
    n = len(ordered)
    held_out = 2 if n >= 3 else 0
    out: List[Tuple[str, dict]] = []
    sequence: List[str] = []
    for position, event in enumerate(ordered):
        record = {USER_ID: event[USER_ID], ITEM_ID: event[ITEM_ID], TIMESTAMP: int(event[TIMESTAMP]),
                  WEIGHT: float(event.get(WEIGHT, 1.0)), POSITION: position,
                  HISTORY: sequence[::-1][:history_length]}
        if position < n - held_out:
            out.append((TRAIN, record))
            sequence.append(event[ITEM_ID])
        else:
            out.append((TEST if position == n - 1 else EVAL, {**record, EXCLUDE: list(sequence)}))
    return out


def _example(strings: Mapping[str, Sequence], ints: Mapping[str, Sequence], floats: Mapping[str, Sequence]):
    import tensorflow as tf
    feature = {name: tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(v).encode("utf-8") for v in values]))
               for name, values in strings.items()}
    feature.update({name: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
                    for name, values in ints.items()})
    feature.update({name: tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))
                    for name, values in floats.items()})
    return tf.train.Example(features=tf.train.Features(feature=feature))


def to_example(record: Mapping[str, object]):
    """A split record (see :func:`assign_user`) as a ``tf.train.Example``."""
    strings = {USER_ID: [record[USER_ID]], ITEM_ID: [record[ITEM_ID]], HISTORY: record[HISTORY]}
    if EXCLUDE in record:
        strings[EXCLUDE] = record[EXCLUDE]
    return _example(strings,
                    {TIMESTAMP: [record[TIMESTAMP]], POSITION: [record[POSITION]]}, {WEIGHT: [record[WEIGHT]]})


def split_files(examples_uri: str, split: str) -> List[str]:
    """The record files of one split of a TFX ``Examples`` artifact (``<uri>/Split-<name>/*``)."""
    files = storage.files_matching(storage.join(examples_uri, f"Split-{split}"))
    if not files:
        raise FileNotFoundError(f"no files for split {split!r} under {examples_uri}")
    return files


def _read_split(files: Sequence[str]) -> pd.DataFrame:
    import tensorflow as tf
    spec = {USER_ID: tf.io.FixedLenFeature([], tf.string), ITEM_ID: tf.io.FixedLenFeature([], tf.string),
            TIMESTAMP: tf.io.FixedLenFeature([], tf.int64), WEIGHT: tf.io.FixedLenFeature([], tf.float32),
            POSITION: tf.io.FixedLenFeature([], tf.int64), HISTORY: tf.io.VarLenFeature(tf.string)}
    compression = "GZIP" if files[0].endswith(".gz") else ""
    columns: Dict[str, list] = {k: [] for k in spec}
    dataset = tf.data.TFRecordDataset(list(files), compression_type=compression).batch(8192)
    for batch in dataset.map(lambda x: tf.io.parse_example(x, spec)):
        for key in (USER_ID, ITEM_ID):
            columns[key].extend(v.decode("utf-8") for v in batch[key].numpy())
        for key in (TIMESTAMP, WEIGHT, POSITION):
            columns[key].extend(batch[key].numpy().tolist())
        history = tf.RaggedTensor.from_sparse(batch[HISTORY]).to_list()
        columns[HISTORY].extend(tuple(v.decode("utf-8") for v in row) for row in history)
    frame = pd.DataFrame(columns)
    frame[TIMESTAMP] = frame[TIMESTAMP].astype(np.int64)
    return frame


def _read_side(files: Sequence[str], key: str, columns) -> pd.DataFrame:
    """The ``key`` and side ``columns`` of joined examples as a table indexed by ``key`` (first row per id)."""
    import tensorflow as tf
    kinds = {"categorical": tf.io.FixedLenFeature([], tf.string), "numeric": tf.io.FixedLenFeature([], tf.float32),
             "multi_categorical": tf.io.VarLenFeature(tf.string)}
    spec = {key: tf.io.FixedLenFeature([], tf.string), **{name: kinds[kind] for name, kind in columns}}
    parts: Dict[str, list] = {name: [] for name in spec}
    dataset = tf.data.TFRecordDataset(list(files), compression_type="GZIP" if files[0].endswith(".gz") else "")
    for batch in dataset.batch(8192).map(lambda x: tf.io.parse_example(x, spec)):
        for name, value in batch.items():
            if isinstance(value, tf.SparseTensor):
                parts[name].extend(tuple(v.decode("utf-8") for v in row)
                                   for row in tf.RaggedTensor.from_sparse(value).to_list())
            elif value.dtype == tf.string:
                parts[name].extend(v.decode("utf-8") for v in value.numpy())
            else:
                parts[name].extend(value.numpy().astype(np.float64).tolist())
    return pd.DataFrame(parts).drop_duplicates(key).set_index(key)


def _side_tables(examples_uri: str, side) -> Dict[str, Optional[pd.DataFrame]]:
    """The user and item tables behind joined examples: users from the three splits, items from the corpus
    split (a missing value stays ``""`` / NaN / ``()``, which the features treat as missing)."""
    from tfrec_recall.data.side_tables import CORPUS
    users = [f for split in SPLITS for f in split_files(examples_uri, split)]
    return {"user_features": _read_side(users, USER_ID, side.user) if side.user else None,
            "item_features": _read_side(split_files(examples_uri, CORPUS), ITEM_ID, side.item) if side.item else None}


def read_split_examples(examples_uri: str, history_length: int, name: str = "examples") -> Split:
    """The train / eval / test splits written by the pipeline's protocol transform, as a :class:`Split`
    (``valid`` = the ``eval`` split). The corpus is every item of the three splits, as in ``leave_last_out``.
    Joined examples (``side_features.json``, :mod:`tfrec_recall.data.side_tables`) bring their user and item
    tables, and the corpus split's items."""
    from tfrec_recall.data.side_tables import read_side_features
    require_positive_int("history_length", history_length)
    frames = {split: _read_split(split_files(examples_uri, split)) for split in SPLITS}
    train = frames[TRAIN].sort_values([USER_ID, POSITION], kind="mergesort").reset_index(drop=True)
    train_items = {user: list(items) for user, items in train.groupby(USER_ID, sort=False)[ITEM_ID]}
    everything = pd.concat([frames[s] for s in SPLITS], ignore_index=True)
    side = read_side_features(examples_uri)
    tables = _side_tables(examples_uri, side) if side else {}
    data = InteractionData(everything[[USER_ID, ITEM_ID, TIMESTAMP, WEIGHT]].reset_index(drop=True), name=name,
                           feature_kinds=side.kinds if side else {}, **tables)
    keep = [USER_ID, ITEM_ID, TIMESTAMP, WEIGHT, HISTORY]
    valid, test = (frames[s].sort_values(USER_ID, kind="mergesort")[keep].reset_index(drop=True)
                   for s in (EVAL, TEST))
    return Split(data, train[keep], valid, test, history_length, train_items)


def write_interactions_csv(data: InteractionData, path) -> "os.PathLike":
    """Writes ``data``'s interactions as the pipeline's input CSV (``user_id, item_id, timestamp[, weight],
    row_number``; ``row_number`` keeps the file order that breaks timestamp ties). Written to a temporary file
    and renamed; an existing file is never overwritten (ExampleGen's cache keys on the input files)."""
    columns = [USER_ID, ITEM_ID, TIMESTAMP] + ([WEIGHT] if WEIGHT in data.interactions.columns else [])
    frame = data.interactions[columns].assign(**{ROW_NUMBER: np.arange(len(data.interactions), dtype=np.int64)})
    with atomic_new_file(path) as tmp:
        storage.write_text(tmp, frame.to_csv(index=False))
    return path


def write_interactions_tfrecord(data: InteractionData, path) -> "os.PathLike":
    """Writes ``data``'s interactions as gzipped ``tf.Example`` TFRecords (the ImportExampleGen input): the same
    fields as :func:`write_interactions_csv`, ids as bytes. Atomic; never overwrites."""
    import tensorflow as tf
    frame = data.interactions
    weights = frame[WEIGHT].to_numpy() if WEIGHT in frame.columns else None
    with atomic_new_file(path) as tmp:
        with tf.io.TFRecordWriter(tmp, options="GZIP") as writer:
            for row, (user, item, stamp) in enumerate(zip(frame[USER_ID], frame[ITEM_ID], frame[TIMESTAMP])):
                floats = {WEIGHT: [weights[row]]} if weights is not None else {}
                writer.write(_example({USER_ID: [user], ITEM_ID: [item]}, {TIMESTAMP: [stamp], ROW_NUMBER: [row]},
                                      floats).SerializeToString())
    return path
