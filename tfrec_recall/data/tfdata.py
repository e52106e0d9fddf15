"""tf.data input pipelines and tf.Example TFRecords for the same feature dictionaries.

A feature dictionary maps names to NumPy arrays with one row per example: 1-D string (object) or float32
arrays, or 2-D padded string arrays for multi-valued features. ``write_tfrecords`` stores them as
``tf.Example`` (bytes_list / float_list / int64_list, fixed widths) and ``read_tfrecords`` parses them back into
the same dictionary structure, so the TFX pipeline can reuse them.
"""
from __future__ import annotations

import os
from typing import Dict, Mapping

import numpy as np
import tensorflow as tf

from tfrec_recall import storage
from tfrec_recall._atomic import atomic_directory
from tfrec_recall._validation import require_int

SPEC_FILE = "features.json"


def _check_columns(arrays: Mapping[str, np.ndarray]) -> int:
    if not arrays:
        raise ValueError("feature dictionary is empty")
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"feature arrays must have the same number of rows, got {lengths}")
    return next(iter(lengths.values()))


def to_tensors(arrays: Mapping[str, np.ndarray]) -> Dict[str, tf.Tensor]:
    out = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype == object or a.dtype.kind in "US":
            out[name] = tf.constant(a.astype(str).astype(object), dtype=tf.string)
        elif a.dtype.kind == "f":
            out[name] = tf.constant(a, dtype=tf.float32)
        else:
            out[name] = tf.constant(a)
    return out


def make_dataset(arrays: Mapping[str, np.ndarray], batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 drop_remainder: bool = False, repeat: bool = False) -> tf.data.Dataset:
    """A batched dataset of feature dictionaries. Shuffling is seeded and reshuffles each epoch."""
    require_int("batch_size", batch_size)
    n = _check_columns(arrays)
    tensors = to_tensors(arrays)
    # Shuffle and batch row indices, then gather each batch's rows at once: much faster than shuffling
    # dictionaries of string tensors element by element.
    ds = tf.data.Dataset.range(n)
    if shuffle:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.map(lambda index: {k: tf.gather(v, index) for k, v in tensors.items()},
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def _feature_layout(arrays: Mapping[str, np.ndarray]) -> Dict[str, dict]:
    layout = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        dtype = "string" if (a.dtype == object or a.dtype.kind in "US") else ("float" if a.dtype.kind == "f" else "int64")
        layout[name] = {"dtype": dtype, "shape": list(a.shape[1:])}
    return layout


def write_tfrecords(arrays: Mapping[str, np.ndarray], path, *, num_shards: int = 1) -> Dict[str, dict]:
    """Writes ``arrays`` as tf.Example records into ``path`` (a directory): ``part-XXXXX.tfrecord`` shards and
    ``features.json`` (names, dtypes, widths). Written to a temporary directory and renamed, so a failure leaves
    no half-written output. Returns the layout."""
    n = _check_columns(arrays)
    require_int("num_shards", num_shards)
    path = storage.path_str(path).rstrip("/")
    if storage.exists(path):
        raise FileExistsError(f"{path} exists; refusing to overwrite TFRecords")
    layout = _feature_layout(arrays)
    with atomic_directory(path, last=(SPEC_FILE,)) as tmp:
        columns = {name: np.asarray(a) for name, a in arrays.items()}
        bounds = np.linspace(0, n, num_shards + 1).astype(int)
        for shard in range(num_shards):
            with tf.io.TFRecordWriter(storage.join(tmp, f"part-{shard:05d}.tfrecord")) as writer:
                for row in range(bounds[shard], bounds[shard + 1]):
                    feature = {}
                    for name, a in columns.items():
                        value = np.reshape(a[row], [-1])
                        kind = layout[name]["dtype"]
                        if kind == "string":
                            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(
                                value=[str(v).encode("utf-8") for v in value]))
                        elif kind == "float":
                            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=value.tolist()))
                        else:
                            feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=value.tolist()))
                    writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
        storage.write_json(storage.join(tmp, SPEC_FILE), layout)
    return layout


def parse_spec(layout: Mapping[str, dict]) -> Dict[str, tf.io.FixedLenFeature]:
    dtypes = {"string": tf.string, "float": tf.float32, "int64": tf.int64}
    return {name: tf.io.FixedLenFeature(v["shape"], dtypes[v["dtype"]]) for name, v in layout.items()}


def read_tfrecords(path, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> tf.data.Dataset:
    """Reads a directory written by :func:`write_tfrecords` back into batched feature dictionaries."""
    spec_file = storage.join(path, SPEC_FILE)
    if not storage.exists(spec_file):
        raise FileNotFoundError(f"{spec_file} not found: {path} was not written by write_tfrecords")
    spec = parse_spec(storage.read_json(spec_file))
    files = storage.files_matching(path, "part-", ".tfrecord")
    ds = tf.data.TFRecordDataset(files)
    if shuffle:
        ds = ds.shuffle(10_000, seed=seed)
    return ds.batch(batch_size).map(lambda x: tf.io.parse_example(x, spec),
                                    num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
