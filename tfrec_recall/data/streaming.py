"""Streaming input: the protocol split's ``tf.Example`` files read batch by batch through TFXIO, never whole.

The TFX pipeline's ProtocolSplit (a Beam transform over users, :mod:`tfrec_recall.data.protocol`) writes the
split examples with the history already built, and the Beam jobs of :mod:`tfrec_recall.data.beam_jobs` write the
vocabulary and frequency files. A :class:`StreamingSplit` names those files; training reads them with
``tfx_bsl``'s ``TFExampleRecord.TensorFlowDataset`` (``tf.data``: the files listed and interleaved, records
shuffled in a bounded buffer, parsed by batch, prefetched), or in a TFX Trainer with the ``DataAccessor``'s
``tf_dataset_factory`` over the same schema (:func:`split_schema`). Memory is bounded by the shuffle buffer and
the vocabularies, not by the number of interactions.

Files under a :class:`StreamingSplit`'s ``vocabulary_dir`` (:func:`write_vocabularies` runs the Beam jobs):

* ``train/user_id.vocab``, ``train/item_id.vocab`` and ``train/item_id.counts.tsv``: the training examples' ids,
  as the in-memory ``specs_from_split`` takes them from the training rows (the model's lookups read these files);
* ``corpus/item_id.vocab``: every item of the three splits (and of the ``corpus`` split when the examples have
  one), the candidates that evaluation ranks (as ``split.data.items`` in memory: an item seen only in validation
  or test is ranked with the unknown-id vector);
* ``side/statistics.json`` and ``side/<column>.vocab`` when the examples carry side features (joined by
  :mod:`tfrec_recall.data.side_tables`, which also writes the ``corpus`` split: each corpus item with its item
  columns, which evaluation embeds when the candidate tower reads more than the id).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import tensorflow as tf

from tfrec_recall import storage
from tfrec_recall._validation import require_positive_int
from tfrec_recall.data.protocol import EVAL, EXCLUDE, HISTORY, POSITION, SPLITS, TEST, TRAIN, split_files
from tfrec_recall.data.schema import ITEM_ID, TIMESTAMP, USER_ID, WEIGHT
from tfrec_recall.data.side_tables import (CORPUS, STATISTICS_FILE, SideFeatures, read_side_features, read_statistics,
                                           side_specs)

TRAIN_VOCABULARIES = "train"
CORPUS_VOCABULARY = "corpus"
SIDE_STATISTICS = "side"
SINGLE = {USER_ID: "bytes", ITEM_ID: "bytes", TIMESTAMP: "int", WEIGHT: "float", POSITION: "int"}
LISTS = (HISTORY, EXCLUDE)
RAGGED = "ragged"  # a width: the list as it is, of any length
Width = Union[None, int, str]
DatasetFactory = Callable[..., tf.data.Dataset]  # a TFX DataAccessor's tf_dataset_factory(files, options, schema)


def _side_schema(schema, columns) -> None:
    from tensorflow_metadata.proto.v0 import schema_pb2
    for name, kind in columns:
        feature = schema.feature.add(name=name, type=schema_pb2.FLOAT if kind == "numeric" else schema_pb2.BYTES)
        if kind != "multi_categorical":  # joined examples always hold one value (missing: "" or NaN)
            feature.presence.min_fraction = 1.0
            feature.shape.dim.add(size=1)


def split_schema(side: Optional[SideFeatures] = None):
    """The TFMD schema of split examples: single-valued ids, time, weight and position (dense ``[batch, 1]``),
    the variable-length ``history`` / ``exclude`` (sparse; ``exclude`` only in eval and test examples), and the
    ``side`` columns of joined examples (categorical / numeric dense, multi-categorical sparse)."""
    from tensorflow_metadata.proto.v0 import schema_pb2
    kinds = {"bytes": schema_pb2.BYTES, "int": schema_pb2.INT, "float": schema_pb2.FLOAT}
    schema = schema_pb2.Schema()
    for name, kind in SINGLE.items():
        feature = schema.feature.add(name=name, type=kinds[kind])
        feature.presence.min_fraction = 1.0  # every example holds it: dense
        feature.shape.dim.add(size=1)
    for name in LISTS:
        schema.feature.add(name=name, type=schema_pb2.BYTES)
    if side:
        _side_schema(schema, side.user + side.item)
    return schema


def corpus_schema(side: SideFeatures):
    """The TFMD schema of the ``corpus`` split: ``item_id`` and the item columns."""
    from tensorflow_metadata.proto.v0 import schema_pb2
    schema = schema_pb2.Schema()
    feature = schema.feature.add(name=ITEM_ID, type=schema_pb2.BYTES)
    feature.presence.min_fraction = 1.0
    feature.shape.dim.add(size=1)
    _side_schema(schema, side.item)
    return schema


def _first_missing(paths: Sequence[str]) -> Optional[str]:
    return next((p for p in paths if not storage.exists(p)), None)


def _files(name: str, files: Sequence[str]) -> Tuple[str, ...]:
    files = tuple(str(f) for f in files)
    if not files:
        raise ValueError(f"{name} is empty: a streaming split needs the record files of every split")
    missing = _first_missing(files)
    if missing is not None:
        raise FileNotFoundError(f"{name}: {missing} does not exist")
    return files


@dataclasses.dataclass(frozen=True)
class StreamingSplit:
    """The record files of the three splits and the directory of their vocabularies (module docstring)."""
    train_files: Tuple[str, ...]
    valid_files: Tuple[str, ...]
    test_files: Tuple[str, ...]
    vocabulary_dir: str
    history_length: int
    corpus_files: Tuple[str, ...] = ()  # the corpus split (items with their item columns), when written
    side: Optional[SideFeatures] = None  # the side columns the examples carry (their side_features.json)

    def __post_init__(self):
        for name in ("train_files", "valid_files", "test_files"):
            object.__setattr__(self, name, _files(name, getattr(self, name)))
        if self.corpus_files:
            object.__setattr__(self, "corpus_files", _files("corpus_files", self.corpus_files))
        require_positive_int("history_length", self.history_length)
        needed = [self.vocabulary_file(USER_ID), self.vocabulary_file(ITEM_ID), self.counts_file(ITEM_ID),
                  self.corpus_file()]
        missing = _first_missing(needed)
        if missing is not None:
            raise FileNotFoundError(f"vocabulary_dir {self.vocabulary_dir!r} lacks {missing}: write it with "
                                    "tfrec_recall.data.streaming.write_vocabularies")
        self._check_side()

    def _check_side(self) -> None:
        """The side statistics must exist for examples that carry side columns, and describe the same columns."""
        statistics = read_statistics(self.statistics_dir)
        if self.side and statistics is None:
            raise FileNotFoundError(f"the examples carry side features {sorted(self.side.kinds)} but "
                                    f"{storage.join(self.statistics_dir, STATISTICS_FILE)} does not exist: write it "
                                    "with tfrec_recall.data.streaming.write_vocabularies")
        if statistics is not None and self.side is not None and statistics["side_features"] != self.side:
            raise ValueError(f"the side statistics in {self.statistics_dir} describe "
                             f"{statistics['side_features'].to_dict()}, the examples {self.side.to_dict()}")
        if not self.side:
            object.__setattr__(self, "side", None)

    @classmethod
    def from_examples(cls, examples_uri: str, vocabulary_dir: str, history_length: int) -> "StreamingSplit":
        """The split of a TFX ``Examples`` artifact (``<uri>/Split-{train,eval,test}/*``)."""
        files = {name: split_files(examples_uri, name) for name in SPLITS}
        corpus = (split_files(examples_uri, CORPUS) if storage.exists(storage.join(examples_uri, f"Split-{CORPUS}"))
                  else ())
        return cls(files[TRAIN], files[EVAL], files[TEST], vocabulary_dir, history_length, tuple(corpus),
                   read_side_features(examples_uri))

    @property
    def statistics_dir(self) -> str:
        """Where the side-feature statistics and vocabularies are (when the examples carry side features)."""
        return storage.join(self.vocabulary_dir, SIDE_STATISTICS)

    def schema(self):
        """The TFMD schema of the split examples (with the side columns when there are any)."""
        return split_schema(self.side)

    def side_specs(self, side_embedding_dim: int) -> Dict[str, list]:
        """The side-feature specs of the query and candidate sides (empty without side features)."""
        if self.side is None:
            return {"query": [], "candidate": []}
        return side_specs(self.statistics_dir, side_embedding_dim)

    def vocabulary_file(self, feature: str) -> str:
        from tfrec_recall.data.beam_jobs import vocabulary_path
        return vocabulary_path(storage.join(self.vocabulary_dir, TRAIN_VOCABULARIES), feature)

    def counts_file(self, feature: str) -> str:
        from tfrec_recall.data.beam_jobs import counts_path
        return counts_path(storage.join(self.vocabulary_dir, TRAIN_VOCABULARIES), feature)

    def corpus_file(self) -> str:
        from tfrec_recall.data.beam_jobs import vocabulary_path
        return vocabulary_path(storage.join(self.vocabulary_dir, CORPUS_VOCABULARY), ITEM_ID)

    def files(self, which: str) -> Tuple[str, ...]:
        names = {"train": self.train_files, "valid": self.valid_files, "test": self.test_files}
        if which not in names:
            raise ValueError(f"which must be one of {sorted(names)}, got {which!r}")
        return names[which]

    def corpus(self) -> np.ndarray:
        """The ids evaluation ranks (every item of the three splits), in vocabulary order."""
        from tfrec_recall.data.beam_jobs import read_vocabulary
        return np.asarray(read_vocabulary(self.corpus_file()), dtype=object)

    def item_counts(self) -> Tuple[np.ndarray, np.ndarray]:
        """(training item ids, their training counts), in training-vocabulary order."""
        from tfrec_recall.data.beam_jobs import read_counts
        counts = read_counts(self.counts_file(ITEM_ID))
        ids = np.asarray(list(counts), dtype=object)
        return ids, np.asarray([counts[i] for i in ids], dtype=np.int64)

    def describe(self) -> str:
        side = f", side features {sorted(self.side.kinds)}" if self.side else ""
        return (f"streaming split: {len(self.train_files)} train / {len(self.valid_files)} valid / "
                f"{len(self.test_files)} test files, history length {self.history_length}{side}")


def write_vocabularies(examples_uri: str, output_dir: str, runner="direct") -> str:
    """Runs the Beam jobs that a :class:`StreamingSplit` reads over the split examples under ``examples_uri``
    (``Split-<name>/*`` files): vocabularies and item counts of the training split, and the corpus vocabulary
    of all three (and of the ``corpus`` split when there is one); for joined examples (``side_features.json``),
    the side-feature statistics of the training split (:func:`~tfrec_recall.data.side_tables.run_side_statistics`).
    ``runner``: a :mod:`tfrec_recall.beam_runners` name or ``PipelineOptions``. Returns ``output_dir``."""
    from tfrec_recall.data.beam_jobs import run_token_tables, run_vocabularies
    from tfrec_recall.data.side_jobs import run_side_statistics
    root = storage.path_str(examples_uri).rstrip("/")
    run_token_tables(f"{root}/Split-{TRAIN}/*", storage.join(output_dir, TRAIN_VOCABULARIES), runner)
    run_vocabularies(f"{root}/Split-*/*", storage.join(output_dir, CORPUS_VOCABULARY), runner,
                     features=(ITEM_ID,))
    side = read_side_features(root)
    if side:
        run_side_statistics(f"{root}/Split-{TRAIN}/*", storage.join(output_dir, SIDE_STATISTICS), side, runner)
    return output_dir


def _dense_list(values, width: int) -> tf.Tensor:
    """A sparse (or ragged) string list feature as ``[batch, width]``, padded / cut with ``""``."""
    if isinstance(values, tf.RaggedTensor):
        values = values.to_sparse()
    dense = tf.sparse.to_dense(values, default_value="")
    dense = tf.pad(dense, [[0, 0], [0, tf.maximum(0, width - tf.shape(dense)[1])]], constant_values="")
    return dense[:, :width]


def _single(values) -> tf.Tensor:
    if isinstance(values, tf.SparseTensor):
        values = tf.sparse.to_dense(values)
    return tf.reshape(values, [-1])


def _ragged(values) -> tf.RaggedTensor:
    return values if isinstance(values, tf.RaggedTensor) else tf.RaggedTensor.from_sparse(values)


def _feature(values, width):
    if width is None:
        return _single(values)
    return _ragged(values) if width == RAGGED else _dense_list(values, width)


def to_features(batch: Dict[str, tf.Tensor], widths: Dict[str, Width]) -> Dict[str, tf.Tensor]:
    """A parsed batch as the model's raw inputs: each of ``widths``' features (``None``: one value per example,
    ``[batch]``; an int: a padded list, ``[batch, width]``; ``RAGGED``: a list of any length, ragged)."""
    missing = sorted(set(widths) - set(batch))
    if missing:
        raise KeyError(f"the split examples lack features {missing} (they hold {sorted(batch)})")
    return {name: _feature(batch[name], width) for name, width in widths.items()}


def examples_dataset(files: Sequence[str], widths: Dict[str, Width], batch_size: int, *,
                     shuffle: bool = False, seed: int = 0, shuffle_buffer: int = 100_000,
                     num_epochs: Optional[int] = 1, drop_remainder: bool = False,
                     dataset_factory: Optional[DatasetFactory] = None, schema=None) -> tf.data.Dataset:
    """Batches of ``widths``' features from split-example ``files`` through TFXIO: TFX's ``dataset_factory``
    when given (a Trainer's ``fn_args.data_accessor.tf_dataset_factory``), else ``tfx_bsl``'s
    ``TFExampleRecord``. With ``shuffle``, the files are listed in a seeded order, read interleaved, and records
    drawn from a ``shuffle_buffer``-record buffer (reshuffled each epoch). ``num_epochs=None`` repeats.
    ``schema``: the files' TFMD schema (default :func:`split_schema` without side features)."""
    from tfx_bsl.public import tfxio
    require_positive_int("batch_size", batch_size)
    require_positive_int("shuffle_buffer", shuffle_buffer)
    options = tfxio.TensorFlowDatasetOptions(batch_size=batch_size, drop_final_batch=drop_remainder,
                                             num_epochs=num_epochs, shuffle=shuffle, shuffle_seed=seed,
                                             shuffle_buffer_size=shuffle_buffer, sloppy_ordering=False)
    files = [str(f) for f in files]
    schema = split_schema() if schema is None else schema
    if dataset_factory is not None:
        dataset = dataset_factory(files, options, schema)
    else:
        dataset = tfxio.TFExampleRecord(files, schema=schema,
                                        telemetry_descriptors=["tfrec_recall"]).TensorFlowDataset(options)
    return dataset.map(lambda batch: to_features(batch, widths), num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True).prefetch(tf.data.AUTOTUNE)


def write_split_examples(split, output_dir: str, *, num_shards: int = 1, side_features: bool = True) -> str:
    """Writes an in-memory :class:`~tfrec_recall.data.split.Split` as the pipeline's split examples
    (``<output_dir>/Split-{train,eval,test}/part-SSSSS.tfrecord.gz``), rows in the split's order: a small
    dataset's way onto the streaming path, and the tests' way to compare the two. With ``side_features`` and
    side tables in ``split.data``, the examples are joined as the Beam join writes them (every example with its
    user's and item's columns, the ``corpus`` split, ``side_features.json``). Refuses an existing
    ``output_dir``; written whole under a temporary name, then moved into place."""
    from tfrec_recall._atomic import atomic_directory
    from tfrec_recall.data.side_tables import SIDE_FEATURES_FILE, write_side_features_file
    require_positive_int("num_shards", num_shards)
    if storage.exists(output_dir):
        raise FileExistsError(f"{output_dir} exists; refusing to overwrite split examples")
    side = SideFeatures.of_data(split.data) if side_features else SideFeatures()
    with atomic_directory(output_dir, last=(SIDE_FEATURES_FILE,)) as tmp:
        for name, frame in ((TRAIN, split.train), (EVAL, split.valid), (TEST, split.test)):
            _write_records(_record_batches(split, name, frame, side), split_schema(side),
                           storage.join(tmp, f"Split-{name}"), len(frame), num_shards)
        if side:
            corpus = split.data.items
            _write_records(_corpus_batches(split.data, corpus, side), corpus_schema(side),
                           storage.join(tmp, f"Split-{CORPUS}"), len(corpus), num_shards)
            write_side_features_file(tmp, side)
    return output_dir


def _side_columns(table, ids, columns) -> Dict[str, tuple]:
    """The side ``columns`` of ``ids`` (looked up in ``table``; missing filled) as Arrow (values, type) lists."""
    import pyarrow as pa
    from tfrec_recall.data.side_tables import table_rows
    if not columns:
        return {}
    rows = dict(table_rows(table.reindex(pd.Index(sorted(set(ids)), name=table.index.name)), columns))
    out = {}
    for position, (name, kind) in enumerate(columns):
        values = [rows[i][position] for i in ids]
        if kind == "numeric":
            out[name] = ([[v] for v in values], pa.float32())
        elif kind == "categorical":
            out[name] = ([[v] for v in values], pa.binary())
        else:
            out[name] = ([list(v) for v in values], pa.binary())
    return out


def _arrow(columns: Dict[str, tuple]):
    import pyarrow as pa
    return pa.RecordBatch.from_arrays([pa.array(values, pa.list_(kind)) for values, kind in columns.values()],
                                      list(columns))


def _record_batches(split, name: str, frame, side: SideFeatures, chunk: int = 50_000):
    """Rows of a split frame as Arrow record batches of the split examples' features (one list per value)."""
    import pyarrow as pa
    for start in range(0, len(frame), chunk):
        rows = frame.iloc[start:start + chunk]
        users, items = rows[USER_ID].astype(str).tolist(), rows[ITEM_ID].astype(str).tolist()
        weights = rows[WEIGHT].tolist() if WEIGHT in rows.columns else [1.0] * len(rows)
        columns = {USER_ID: ([[u] for u in users], pa.binary()), ITEM_ID: ([[i] for i in items], pa.binary()),
                   TIMESTAMP: ([[int(t)] for t in rows[TIMESTAMP]], pa.int64()),
                   WEIGHT: ([[float(w)] for w in weights], pa.float32()), POSITION: ([[0]] * len(rows), pa.int64()),
                   HISTORY: ([list(h) for h in rows[HISTORY]], pa.binary())}
        if name != TRAIN:
            columns[EXCLUDE] = ([list(split.train_items.get(u, [])) for u in users], pa.binary())
        columns.update(_side_columns(split.data.user_features, users, side.user))
        columns.update(_side_columns(split.data.item_features, items, side.item))
        yield _arrow(columns)


def _corpus_batches(data, items, side: SideFeatures, chunk: int = 50_000):
    import pyarrow as pa
    for start in range(0, len(items), chunk):
        ids = [str(i) for i in items[start:start + chunk]]
        yield _arrow({ITEM_ID: ([[i] for i in ids], pa.binary()), **_side_columns(data.item_features, ids, side.item)})


def _write_records(batches, schema, directory: str, rows: int, num_shards: int) -> None:
    """Record batches as ``num_shards`` gzipped TFRecord files of tf.Examples (encoded by tfx_bsl's
    ``RecordBatchToExamplesEncoder`` with ``schema``), about ``rows / num_shards`` examples per file in order."""
    from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder
    encoder = RecordBatchToExamplesEncoder(schema)
    storage.makedirs(directory)
    per_shard = max(1, -(-rows // num_shards))
    writers = [tf.io.TFRecordWriter(storage.join(directory, f"part-{shard:05d}.tfrecord.gz"), options="GZIP")
               for shard in range(num_shards)]
    try:
        written = 0
        for batch in batches:
            for record in encoder.encode(batch):
                writers[min(written // per_shard, num_shards - 1)].write(record)
                written += 1
    finally:
        for writer in writers:
            writer.close()


__all__ = ["StreamingSplit", "split_schema", "corpus_schema", "write_vocabularies", "examples_dataset",
           "to_features", "write_split_examples"]
