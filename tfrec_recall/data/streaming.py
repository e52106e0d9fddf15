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
* ``corpus/item_id.vocab``: every item of the three splits, the candidates that evaluation ranks (as
  ``split.data.items`` in memory: an item seen only in validation or test is ranked with the unknown-id vector).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from tfrec_recall import storage
from tfrec_recall._validation import require_positive_int
from tfrec_recall.data.protocol import EVAL, EXCLUDE, HISTORY, POSITION, SPLITS, TEST, TRAIN, split_files
from tfrec_recall.data.schema import ITEM_ID, TIMESTAMP, USER_ID, WEIGHT

TRAIN_VOCABULARIES = "train"
CORPUS_VOCABULARY = "corpus"
SINGLE = {USER_ID: "bytes", ITEM_ID: "bytes", TIMESTAMP: "int", WEIGHT: "float", POSITION: "int"}
LISTS = (HISTORY, EXCLUDE)
RAGGED = "ragged"  # a width: the list as it is, of any length
Width = Union[None, int, str]
DatasetFactory = Callable[..., tf.data.Dataset]  # a TFX DataAccessor's tf_dataset_factory(files, options, schema)


def split_schema():
    """The TFMD schema of split examples: single-valued ids, time, weight and position (dense ``[batch, 1]``) and
    the variable-length ``history`` / ``exclude`` (sparse; ``exclude`` only in eval and test examples)."""
    from tensorflow_metadata.proto.v0 import schema_pb2
    kinds = {"bytes": schema_pb2.BYTES, "int": schema_pb2.INT, "float": schema_pb2.FLOAT}
    schema = schema_pb2.Schema()
    for name, kind in SINGLE.items():
        feature = schema.feature.add(name=name, type=kinds[kind])
        feature.presence.min_fraction = 1.0  # every example holds it: dense
        feature.shape.dim.add(size=1)
    for name in LISTS:
        schema.feature.add(name=name, type=schema_pb2.BYTES)
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

    def __post_init__(self):
        for name in ("train_files", "valid_files", "test_files"):
            object.__setattr__(self, name, _files(name, getattr(self, name)))
        require_positive_int("history_length", self.history_length)
        needed = [self.vocabulary_file(USER_ID), self.vocabulary_file(ITEM_ID), self.counts_file(ITEM_ID),
                  self.corpus_file()]
        missing = _first_missing(needed)
        if missing is not None:
            raise FileNotFoundError(f"vocabulary_dir {self.vocabulary_dir!r} lacks {missing}: write it with "
                                    "tfrec_recall.data.streaming.write_vocabularies")

    @classmethod
    def from_examples(cls, examples_uri: str, vocabulary_dir: str, history_length: int) -> "StreamingSplit":
        """The split of a TFX ``Examples`` artifact (``<uri>/Split-{train,eval,test}/*``)."""
        files = {name: split_files(examples_uri, name) for name in SPLITS}
        return cls(files[TRAIN], files[EVAL], files[TEST], vocabulary_dir, history_length)

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
        return (f"streaming split: {len(self.train_files)} train / {len(self.valid_files)} valid / "
                f"{len(self.test_files)} test files, history length {self.history_length}")


def write_vocabularies(examples_uri: str, output_dir: str, runner="direct") -> str:
    """Runs the Beam jobs that a :class:`StreamingSplit` reads over the split examples under ``examples_uri``
    (``Split-<name>/*`` files): vocabularies and item counts of the training split, and the corpus vocabulary
    of all three. ``runner``: a :mod:`tfrec_recall.beam_runners` name or ``PipelineOptions``. Returns
    ``output_dir``."""
    from tfrec_recall.data.beam_jobs import run_token_tables, run_vocabularies
    root = storage.path_str(examples_uri).rstrip("/")
    run_token_tables(f"{root}/Split-{TRAIN}/*", storage.join(output_dir, TRAIN_VOCABULARIES), runner)
    run_vocabularies(f"{root}/Split-*/*", storage.join(output_dir, CORPUS_VOCABULARY), runner,
                     features=(ITEM_ID,))
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
                     dataset_factory: Optional[DatasetFactory] = None) -> tf.data.Dataset:
    """Batches of ``widths``' features from split-example ``files`` through TFXIO: TFX's ``dataset_factory``
    when given (a Trainer's ``fn_args.data_accessor.tf_dataset_factory``), else ``tfx_bsl``'s
    ``TFExampleRecord``. With ``shuffle``, the files are listed in a seeded order, read interleaved, and records
    drawn from a ``shuffle_buffer``-record buffer (reshuffled each epoch). ``num_epochs=None`` repeats."""
    from tfx_bsl.public import tfxio
    require_positive_int("batch_size", batch_size)
    require_positive_int("shuffle_buffer", shuffle_buffer)
    options = tfxio.TensorFlowDatasetOptions(batch_size=batch_size, drop_final_batch=drop_remainder,
                                             num_epochs=num_epochs, shuffle=shuffle, shuffle_seed=seed,
                                             shuffle_buffer_size=shuffle_buffer, sloppy_ordering=False)
    files = [str(f) for f in files]
    if dataset_factory is not None:
        dataset = dataset_factory(files, options, split_schema())
    else:
        dataset = tfxio.TFExampleRecord(files, schema=split_schema(),
                                        telemetry_descriptors=["tfrec_recall"]).TensorFlowDataset(options)
    return dataset.map(lambda batch: to_features(batch, widths), num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True).prefetch(tf.data.AUTOTUNE)


def write_split_examples(split, output_dir: str, *, num_shards: int = 1) -> str:
    """Writes an in-memory :class:`~tfrec_recall.data.split.Split` as the pipeline's split examples
    (``<output_dir>/Split-{train,eval,test}/part-SSSSS.tfrecord.gz``), rows in the split's order: a small
    dataset's way onto the streaming path, and the tests' way to compare the two. Refuses an existing
    ``output_dir``; written whole under a temporary name, then moved into place."""
    from tfrec_recall._atomic import atomic_directory
    require_positive_int("num_shards", num_shards)
    if storage.exists(output_dir):
        raise FileExistsError(f"{output_dir} exists; refusing to overwrite split examples")
    with atomic_directory(output_dir) as tmp:
        for name, frame in ((TRAIN, split.train), (EVAL, split.valid), (TEST, split.test)):
            _write_frame(split, name, frame, storage.join(tmp, f"Split-{name}"), num_shards)
    return output_dir


def _record_batch(split, name: str, frame):
    """Rows of a split frame as an Arrow record batch of the split examples' features (one list per value)."""
    import pyarrow as pa
    users, items = frame[USER_ID].astype(str).tolist(), frame[ITEM_ID].astype(str).tolist()
    weights = frame[WEIGHT].tolist() if WEIGHT in frame.columns else [1.0] * len(frame)
    columns = {USER_ID: ([[u] for u in users], pa.binary()), ITEM_ID: ([[i] for i in items], pa.binary()),
               TIMESTAMP: ([[int(t)] for t in frame[TIMESTAMP]], pa.int64()),
               WEIGHT: ([[float(w)] for w in weights], pa.float32()), POSITION: ([[0]] * len(frame), pa.int64()),
               HISTORY: ([list(h) for h in frame[HISTORY]], pa.binary())}
    if name != TRAIN:
        columns[EXCLUDE] = ([list(split.train_items.get(u, [])) for u in users], pa.binary())
    return pa.RecordBatch.from_arrays([pa.array(values, pa.list_(kind)) for values, kind in columns.values()],
                                      list(columns))


def _write_frame(split, name: str, frame, directory: str, num_shards: int, chunk: int = 50_000) -> None:
    """One split's rows as ``num_shards`` gzipped TFRecord files of tf.Examples (encoded by tfx_bsl's
    ``RecordBatchToExamplesEncoder`` with :func:`split_schema`, ``chunk`` rows at a time)."""
    from tfx_bsl.coders.example_coder import RecordBatchToExamplesEncoder
    encoder = RecordBatchToExamplesEncoder(split_schema())
    storage.makedirs(directory)
    bounds = np.linspace(0, len(frame), num_shards + 1).astype(int)
    for shard in range(num_shards):
        path = storage.join(directory, f"part-{shard:05d}.tfrecord.gz")
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for start in range(bounds[shard], bounds[shard + 1], chunk):
                rows = frame.iloc[start:min(start + chunk, bounds[shard + 1])]
                for record in encoder.encode(_record_batch(split, name, rows)):
                    writer.write(record)


__all__ = ["StreamingSplit", "split_schema", "write_vocabularies", "examples_dataset", "to_features",
           "write_split_examples"]
