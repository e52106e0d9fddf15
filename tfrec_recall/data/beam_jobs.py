"""Beam data jobs over the protocol split's training examples: vocabularies, frequency tables, item embeddings.

Each job is a ``beam.PTransform`` plus a driver ``run_...`` that builds the pipeline and runs it on a runner of
:mod:`tfrec_recall.beam_runners` (a runner name or ``PipelineOptions``). Every file is read and written through
Beam IO or ``tf.io.gfile``, so inputs and outputs may be ``gs://`` URIs.

* :class:`Vocabularies` / :func:`run_vocabularies`: training examples (TFRecord files of ``tf.train.Example``,
  gzipped like the pipeline's ``data_tfrecord-*.gz`` or not: Beam's AUTO compression picks by file suffix)
  -> one vocabulary file per id feature (``<feature>.vocab``, default ``user_id`` and ``item_id``), one token
  per line, in the order of :func:`tfrec_recall.features.specs.vocabulary_of` over the same values (sorted,
  distinct, ``""`` left out) as ``specs_from_split`` builds them from the training rows, so
  ``tf.keras.layers.StringLookup(vocabulary=path)`` equals the in-memory lookup.
* :class:`Frequencies` / :func:`run_frequencies`: the same examples -> ``<feature>.counts.tsv``, one
  ``token<TAB>count`` line per token (the number of training examples holding it), in vocabulary order, so
  line i of the counts file is line i of the vocabulary file. :class:`TokenTables` / :func:`run_token_tables`
  write both from one read of the examples.
* :class:`EmbedVocabulary` / :func:`run_vocabulary_embeddings`: a vocabulary file and a SavedModel whose
  signature maps a batch of ids (``[None]`` string) to embeddings (``[None, d]`` float32) -> TFRecord shards
  ``embeddings-SSSSS-of-NNNNN.tfrecord`` of ``tf.train.Example`` (``id``, ``index``: the vocabulary line,
  ``embedding``; serialized deterministically); :func:`read_embeddings` returns (ids, ``[n, d]`` array) in
  vocabulary order. Batches are fixed: batch b holds vocabulary lines ``[b * batch_size, (b + 1) * batch_size)``
  and goes to shard ``b % num_shards``, so every runner feeds the model the same batches and writes the same
  bytes.

Output files are written whole under a temporary name and renamed, so a retried bundle rewrites them and a reader
never sees half a file; a driver refuses an output directory that already holds its outputs.

The DaskRunner of apache-beam 2.74 (measured here with ``dask.distributed`` 2026.8.0) translates only Create, ParDo,
GroupByKey and Flatten (composites expand into them), with these gaps; the jobs above avoid each, and write the
same bytes on all three runners (tests/test_beam_jobs.py):

* ``beam.io.Read`` (so ``ReadFromTFRecord``, ``ReadFromText``) becomes a no-op with no input: the jobs read with
  ``Create(files) | ReadAllFromTFRecord``, which is ParDos.
* Outputs a DoFn emits in ``finish_bundle`` are dropped: ``beam.BatchElements`` lost 488 of 1000 elements (it
  emits each bundle's last batch there), which is why the embedding job batches by vocabulary line instead.
  ``WriteToText`` wrote an empty file with its default sharding (its writer emits from ``finish_bundle``) and
  failed with ``num_shards=2`` (``BeamIOError: src and dst files do not exist``): the jobs write their files in
  a ParDo.
* A multi-output ParDo (``with_outputs``) hands every output, main and tagged, to every consumer.
* Only the last transform's result is computed: a sink on another branch never runs. Each job ends in one
  transform that depends on all its outputs.
* ``Reshuffle`` is an identity: work spreads over Dask workers only by the partitions of a ``Create``
  (``--dask_npartitions``, ``num_workers`` of :func:`tfrec_recall.beam_runners.pipeline_options`). The embedding
  job reads its vocabulary in one task, so on Dask it runs in one task; the example jobs spread by input file.

The side-feature jobs (:mod:`tfrec_recall.data.side_jobs`: the join of the split examples with the user and item
tables, the tables' training statistics) and the Deep Retrieval M-step job
(:func:`tfrec_recall.training.path_assignment_beam.beam_m_step`) have the same
shape for the same reasons (one output, one sink written by a ParDo at the end); the M-step gives the in-process
M-step's paths on all three runners, the side-feature jobs the DirectRunner's output on Dask
(tests/test_beam_jobs.py).
"""
from __future__ import annotations

import uuid
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.options.pipeline_options import PipelineOptions

from tfrec_recall._validation import require_positive_int
from tfrec_recall.beam_runners import as_options, run_pipeline
from tfrec_recall.data.schema import ITEM_ID, USER_ID

ID_FEATURES = (USER_ID, ITEM_ID)
VOCABULARY_SUFFIX = ".vocab"
COUNTS_SUFFIX = ".counts.tsv"
EMBEDDINGS = "embeddings"
Runner = Union[str, PipelineOptions]


# -- files ------------------------------------------------------------------------------------------------------
def _require_text(name: str, value) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _join(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


def vocabulary_path(output_dir: str, feature: str) -> str:
    """The vocabulary file of ``feature`` that :func:`run_vocabularies` writes under ``output_dir``."""
    return _join(_require_text("output_dir", output_dir), _require_text("feature", feature) + VOCABULARY_SUFFIX)


def counts_path(output_dir: str, feature: str) -> str:
    """The frequency table of ``feature`` that :func:`run_frequencies` writes under ``output_dir``."""
    return _join(_require_text("output_dir", output_dir), _require_text("feature", feature) + COUNTS_SUFFIX)


def input_files(input_pattern: str) -> List[str]:
    """The files matching ``input_pattern`` (a ``tf.io.gfile`` glob), sorted; ``FileNotFoundError`` when none."""
    files = sorted(tf.io.gfile.glob(_require_text("input_pattern", input_pattern)))
    if not files:
        raise FileNotFoundError(f"input_pattern {input_pattern!r} matches no file")
    return files


def _refuse_existing(paths: Iterable[str]) -> None:
    existing = [p for p in paths if tf.io.gfile.exists(p)]
    if existing:
        raise FileExistsError(f"refusing to overwrite {existing}; write to an empty output_dir")


def _write_atomically(path: str, write) -> str:
    """Calls ``write(tmp)`` for a temporary path beside ``path``, then renames it to ``path`` (replacing it:
    a retried bundle writes the same content). The temporary is removed when ``write`` fails."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        write(tmp)
        tf.io.gfile.rename(tmp, path, overwrite=True)
    finally:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)
    return path


def _write_text(path: str, text: str) -> str:
    def write(tmp: str) -> None:
        with tf.io.gfile.GFile(tmp, "w") as f:
            f.write(text)
    return _write_atomically(path, write)


def _lines(path: str) -> List[str]:
    """The lines of a file written by these jobs (``\\n``-terminated, as ``StringLookup`` reads them)."""
    with tf.io.gfile.GFile(_require_text("path", path)) as f:
        text = f.read()
    lines = text.split("\n")
    if lines[-1] != "":
        raise ValueError(f"{path}: the last line is not terminated by a newline; not a file these jobs write")
    return lines[:-1]


def read_vocabulary(path: str) -> Tuple[str, ...]:
    """The tokens of a vocabulary file, in file order."""
    return tuple(_lines(path))


def read_counts(path: str) -> Dict[str, int]:
    """A frequency table as {token: count}, in file (vocabulary) order."""
    out: Dict[str, int] = {}
    for number, line in enumerate(_lines(path), start=1):
        token, tab, count = line.rpartition("\t")
        if not tab or not count.isdigit():
            raise ValueError(f"{path}, line {number}: expected 'token<TAB>count', got {line!r}")
        out[token] = int(count)
    return out


# -- examples -> (feature, token) -------------------------------------------------------------------------------
def _token(example, name: str) -> str:
    feature = example.features.feature.get(name)
    kind = feature.WhichOneof("kind") if feature is not None else None
    if kind not in ("bytes_list", "int64_list") or len(getattr(feature, kind).value) != 1:
        raise ValueError(f"feature {name!r} must hold one bytes or int64 value in every example, got "
                         f"{kind and list(getattr(feature, kind).value)!r} ({kind or 'absent'})")
    value = getattr(feature, kind).value[0]
    token = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    if "\n" in token or "\r" in token:
        raise ValueError(f"feature {name!r} holds {token!r}: a token must not contain a line break")
    return token


def example_tokens(record: bytes, features: Sequence[str]) -> List[Tuple[str, str]]:
    """(feature, token) for each of ``features`` of a serialized ``tf.train.Example``; empty tokens are left
    out, as :func:`~tfrec_recall.features.specs.vocabulary_of` leaves them out."""
    example = tf.train.Example.FromString(record)
    return [(name, token) for name in features for token in (_token(example, name),) if token]


def _check_features(features: Sequence[str]) -> Tuple[str, ...]:
    if isinstance(features, str) or not features or not all(isinstance(f, str) and f for f in features) \
            or len(set(features)) != len(features):
        raise ValueError(f"features must be a non-empty sequence of distinct feature names, got {features!r}")
    return tuple(features)


class ReadExamples(beam.PTransform):
    """PBegin -> the serialized records of ``files`` (TFRecord; gzipped or not, by suffix)."""

    def __init__(self, files: Sequence[str]):
        super().__init__()
        if isinstance(files, str) or not files or not all(isinstance(f, str) and f for f in files):
            raise ValueError(f"files must be a non-empty sequence of paths, got {files!r}")
        self.files = list(files)

    def expand(self, pbegin):
        return (pbegin | "Files" >> beam.Create(self.files)
                | "Read" >> beam.io.ReadAllFromTFRecord(compression_type=CompressionTypes.AUTO))


class _TokenCounts(beam.PTransform):
    """Serialized examples -> (feature, [(token, count), ...]), one element per feature."""

    def __init__(self, features: Sequence[str]):
        super().__init__()
        self.features = _check_features(features)

    def expand(self, records):
        return (records | "Tokens" >> beam.FlatMap(example_tokens, self.features)
                | "Count" >> beam.combiners.Count.PerElement()
                | "ByFeature" >> beam.MapTuple(lambda key, n: (key[0], (key[1], n)))
                | "Group" >> beam.GroupByKey())


def _vocabulary_text(counts: Sequence[Tuple[str, int]]) -> str:
    return "".join(token + "\n" for token, _ in counts)


def _counts_text(counts: Sequence[Tuple[str, int]]) -> str:
    return "".join(f"{token}\t{n}\n" for token, n in counts)


VOCABULARY, COUNTS = "vocabulary", "counts"
_TABLES = {VOCABULARY: (vocabulary_path, _vocabulary_text), COUNTS: (counts_path, _counts_text)}
TABLES = tuple(_TABLES)


def _check_tables(tables: Sequence[str]) -> Tuple[str, ...]:
    if isinstance(tables, str) or not tables or not set(tables) <= set(_TABLES) or len(set(tables)) != len(tables):
        raise ValueError(f"tables must be a non-empty sequence of distinct names from {list(TABLES)}, got {tables!r}")
    return tuple(tables)


def _write_tables(group: Tuple[str, Iterable[Tuple[str, int]]], output_dir: str, tables: Sequence[str]) -> List[str]:
    feature, counts = group
    counts = sorted(counts)  # by token: the order of vocabulary_of
    return [_write_text(_TABLES[t][0](output_dir, feature), _TABLES[t][1](counts)) for t in tables]


class TokenTables(beam.PTransform):
    """Serialized training examples -> the paths of the ``tables`` (``"vocabulary"``: ``<feature>.vocab``,
    ``"counts"``: ``<feature>.counts.tsv``) of each of ``features``, written under ``output_dir`` from one pass."""

    def __init__(self, output_dir: str, features: Sequence[str] = ID_FEATURES, tables: Sequence[str] = TABLES):
        super().__init__()
        self.output_dir, self.features = _require_text("output_dir", output_dir), _check_features(features)
        self.tables = _check_tables(tables)

    def expand(self, records):
        return (records | "TokenCounts" >> _TokenCounts(self.features)
                | "Write" >> beam.FlatMap(_write_tables, self.output_dir, self.tables))


class Vocabularies(TokenTables):
    """Serialized training examples -> the paths of the vocabulary files written under ``output_dir``."""

    def __init__(self, output_dir: str, features: Sequence[str] = ID_FEATURES):
        super().__init__(output_dir, features, (VOCABULARY,))


class Frequencies(TokenTables):
    """Serialized training examples -> the paths of the frequency tables written under ``output_dir``."""

    def __init__(self, output_dir: str, features: Sequence[str] = ID_FEATURES):
        super().__init__(output_dir, features, (COUNTS,))


def run_token_tables(input_pattern: str, output_dir: str, runner: Runner = "direct", *,
                     features: Sequence[str] = ID_FEATURES,
                     tables: Sequence[str] = TABLES) -> Dict[str, Dict[str, str]]:
    """Writes the ``tables`` of each of ``features`` over the examples matching ``input_pattern`` under
    ``output_dir`` in one pipeline (one read of the examples); returns {table: {feature: path}}. ``ValueError``
    after the run when no example holds a non-empty value of a feature."""
    features, tables = _check_features(features), _check_tables(tables)
    paths = {t: {name: _TABLES[t][0](output_dir, name) for name in features} for t in tables}
    files = input_files(input_pattern)
    _refuse_existing(p for by_feature in paths.values() for p in by_feature.values())
    tf.io.gfile.makedirs(output_dir)
    pipeline = beam.Pipeline(options=as_options(runner))
    _ = pipeline | "Examples" >> ReadExamples(files) | "TokenTables" >> TokenTables(output_dir, features, tables)
    run_pipeline(pipeline)
    missing = sorted({name for by_feature in paths.values() for name, p in by_feature.items()
                      if not tf.io.gfile.exists(p)})
    if missing:
        raise ValueError(f"no example matching {input_pattern!r} holds a non-empty value of features {missing}")
    return paths


def run_vocabularies(input_pattern: str, output_dir: str, runner: Runner = "direct", *,
                     features: Sequence[str] = ID_FEATURES) -> Dict[str, str]:
    """Writes the vocabulary of each of ``features`` over the examples matching ``input_pattern`` to
    ``<output_dir>/<feature>.vocab`` (see the module docstring); returns {feature: path}."""
    return run_token_tables(input_pattern, output_dir, runner, features=features, tables=(VOCABULARY,))[VOCABULARY]


def run_frequencies(input_pattern: str, output_dir: str, runner: Runner = "direct", *,
                    features: Sequence[str] = ID_FEATURES) -> Dict[str, str]:
    """Writes the ``token<TAB>count`` table of each of ``features`` over the examples matching
    ``input_pattern`` to ``<output_dir>/<feature>.counts.tsv``; returns {feature: path}."""
    return run_token_tables(input_pattern, output_dir, runner, features=features, tables=(COUNTS,))[COUNTS]


# -- batch embedding --------------------------------------------------------------------------------------------
def vocabulary_batches(path: str, batch_size: int) -> Iterable[Tuple[int, List[str]]]:
    """(b, tokens of lines [b * batch_size, (b + 1) * batch_size)) of a vocabulary file."""
    tokens = _lines(path)
    if "" in tokens:
        raise ValueError(f"{path}, line {tokens.index('') + 1}: empty token")
    for b, start in enumerate(range(0, len(tokens), batch_size)):
        yield b, tokens[start:start + batch_size]


def id_signature(model_dir: str, signature: str, input_name: str, output_name: Optional[str]):
    """(the signature function, its output name): ``signature`` of the SavedModel in ``model_dir`` must take
    ``input_name`` (a ``[None]`` string tensor) and, with ``output_name=None``, have exactly one output."""
    loaded = tf.saved_model.load(_require_text("model_dir", model_dir))
    if signature not in loaded.signatures:
        raise ValueError(f"signature {signature!r} is not in {model_dir} (it has {sorted(loaded.signatures)})")
    function = loaded.signatures[signature]
    inputs = function.structured_input_signature[1]
    spec = inputs.get(input_name)
    if spec is None or spec.dtype != tf.string or spec.shape.rank != 1:
        raise ValueError(f"input_name {input_name!r} must be a [None] string input of signature {signature!r}, "
                         f"whose inputs are {inputs}")
    outputs = sorted(function.structured_outputs)
    if output_name is None and len(outputs) != 1:
        raise ValueError(f"signature {signature!r} has outputs {outputs}: pass output_name")
    if output_name is not None and output_name not in outputs:
        raise ValueError(f"output_name {output_name!r} is not an output of signature {signature!r} ({outputs})")
    return function, output_name or outputs[0]


class _EmbedBatch(beam.DoFn):
    """(b, tokens) -> (shard, (b, tokens, [len(tokens), d] float32 embeddings))."""

    def __init__(self, model_dir: str, signature: str, input_name: str, output_name: str, num_shards: int):
        super().__init__()
        self.model_dir, self.signature, self.input_name = model_dir, signature, input_name
        self.output_name, self.num_shards = output_name, num_shards
        self._function = None

    def setup(self):
        self._function, _ = id_signature(self.model_dir, self.signature, self.input_name, self.output_name)

    def process(self, batch: Tuple[int, List[str]]):
        b, tokens = batch
        vectors = self._function(**{self.input_name: tf.constant(tokens, tf.string)})[self.output_name].numpy()
        if vectors.dtype != np.float32 or vectors.ndim != 2 or len(vectors) != len(tokens):
            raise ValueError(f"signature {self.signature!r} output {self.output_name!r} must be [{len(tokens)}, d] "
                             f"float32 for {len(tokens)} ids, got {vectors.shape} {vectors.dtype}")
        yield b % self.num_shards, (b, tokens, vectors)


def shard_path(output_dir: str, shard: int, num_shards: int) -> str:
    """The path of embedding shard ``shard`` of ``num_shards``."""
    return _join(output_dir, f"{EMBEDDINGS}-{shard:05d}-of-{num_shards:05d}.tfrecord")


def _embedding_example(token: str, index: int, vector: np.ndarray) -> bytes:
    feature = {"id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[token.encode("utf-8")])),
               "index": tf.train.Feature(int64_list=tf.train.Int64List(value=[index])),
               "embedding": tf.train.Feature(float_list=tf.train.FloatList(value=vector.tolist()))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def _write_shard(group, output_dir: str, num_shards: int, batch_size: int) -> str:
    shard, batches = group
    batches = sorted((b for b in batches if b is not None), key=lambda batch: batch[0])

    def write(tmp: str) -> None:
        with tf.io.TFRecordWriter(tmp) as writer:
            for b, tokens, vectors in batches:
                for offset, (token, vector) in enumerate(zip(tokens, vectors)):
                    writer.write(_embedding_example(token, b * batch_size + offset, vector))
    return _write_atomically(shard_path(output_dir, shard, num_shards), write)


class EmbedVocabulary(beam.PTransform):
    """PBegin -> the paths of the embedding shards of the ids in ``vocabulary_path`` (see the module docstring):
    fixed batches of ``batch_size`` lines through ``signature`` of the SavedModel in ``model_dir``, batch b in
    shard ``b % num_shards``; every shard is written, empty or not."""

    def __init__(self, vocabulary_path: str, model_dir: str, output_dir: str, *, batch_size: int = 1024,
                 num_shards: int = 4, signature: str = "serving_default", input_name: str = ITEM_ID,
                 output_name: str = "embedding"):
        super().__init__()
        self.vocabulary_path = _require_text("vocabulary_path", vocabulary_path)
        self.model_dir, self.output_dir = _require_text("model_dir", model_dir), _require_text("output_dir", output_dir)
        self.batch_size = require_positive_int("batch_size", batch_size)
        self.num_shards = require_positive_int("num_shards", num_shards)
        self.names = tuple(_require_text(n, v) for n, v in (("signature", signature), ("input_name", input_name),
                                                              ("output_name", output_name)))

    def expand(self, pbegin):
        embedded = (pbegin | "Vocabulary" >> beam.Create([self.vocabulary_path])
                    | "Batches" >> beam.FlatMap(vocabulary_batches, self.batch_size)
                    | "Spread" >> beam.Reshuffle()
                    | "Embed" >> beam.ParDo(_EmbedBatch(self.model_dir, *self.names, self.num_shards)))
        every_shard = pbegin | "Shards" >> beam.Create([(s, None) for s in range(self.num_shards)])
        return ((embedded, every_shard) | "WithEveryShard" >> beam.Flatten() | "ByShard" >> beam.GroupByKey()
                | "Write" >> beam.Map(_write_shard, self.output_dir, self.num_shards, self.batch_size))


def run_vocabulary_embeddings(vocabulary_path: str, model_dir: str, output_dir: str, runner: Runner = "direct", *,
                              batch_size: int = 1024, num_shards: int = 4, signature: str = "serving_default",
                              input_name: str = ITEM_ID, output_name: Optional[str] = None) -> List[str]:
    """Embeds every id of ``vocabulary_path`` with ``signature`` of the SavedModel in ``model_dir`` (input
    ``input_name``: ``[None]`` strings; output ``output_name``, or its only output: ``[None, d]`` float32) and
    writes the shards under ``output_dir``; returns their paths. Read them with :func:`read_embeddings`."""
    _, output_name = id_signature(model_dir, _require_text("signature", signature),
                                  _require_text("input_name", input_name), output_name)
    if not tf.io.gfile.exists(_require_text("vocabulary_path", vocabulary_path)):
        raise FileNotFoundError(f"vocabulary_path {vocabulary_path!r} does not exist")
    job = EmbedVocabulary(vocabulary_path, model_dir, output_dir, batch_size=batch_size, num_shards=num_shards,
                          signature=signature, input_name=input_name, output_name=output_name)
    tf.io.gfile.makedirs(output_dir)
    _refuse_existing(tf.io.gfile.glob(_join(output_dir, f"{EMBEDDINGS}-*")))
    pipeline = beam.Pipeline(options=as_options(runner))
    _ = pipeline | "EmbedVocabulary" >> job
    run_pipeline(pipeline)
    return [shard_path(output_dir, s, num_shards) for s in range(num_shards)]


def _shard_files(output_dir: str) -> List[str]:
    files = sorted(tf.io.gfile.glob(_join(_require_text("output_dir", output_dir), f"{EMBEDDINGS}-*-of-*.tfrecord")))
    if not files:
        raise FileNotFoundError(f"no embedding shards ({EMBEDDINGS}-*-of-*.tfrecord) under {output_dir!r}")
    num_shards = int(files[0].rsplit("-of-", 1)[1].split(".")[0])
    expected = [shard_path(output_dir, s, num_shards) for s in range(num_shards)]
    if files != expected:
        raise ValueError(f"{output_dir!r} must hold shards {expected}, found {files}")
    return files


def read_embeddings(output_dir: str) -> Tuple[np.ndarray, np.ndarray]:
    """(ids, embeddings): the ids (``[n]`` str) and ``[n, d]`` float32 embeddings written by
    :func:`run_vocabulary_embeddings` under ``output_dir``, in vocabulary order. ``ValueError`` when a shard is
    missing, the indices are not 0..n-1 exactly once or the widths differ."""
    spec = {"id": tf.io.FixedLenFeature([], tf.string), "index": tf.io.FixedLenFeature([], tf.int64),
            "embedding": tf.io.RaggedFeature(tf.float32)}
    ids, indices, lengths, values = [], [], [], []
    for batch in tf.data.TFRecordDataset(_shard_files(output_dir)).batch(65536).map(
            lambda x: tf.io.parse_example(x, spec)):
        ids.extend(v.decode("utf-8") for v in batch["id"].numpy())
        indices.append(batch["index"].numpy())
        lengths.append(batch["embedding"].row_lengths().numpy())
        values.append(batch["embedding"].flat_values.numpy())
    if not ids:
        return np.zeros(0, dtype=object), np.zeros((0, 0), np.float32)
    index, widths = np.concatenate(indices), np.unique(np.concatenate(lengths))
    if not np.array_equal(np.sort(index), np.arange(len(index))):
        raise ValueError(f"the embedding indices under {output_dir!r} are not 0..{len(index) - 1} exactly once")
    if len(widths) != 1:
        raise ValueError(f"the embeddings under {output_dir!r} have different widths {widths.tolist()}")
    order = np.argsort(index)
    vectors = np.concatenate(values).astype(np.float32).reshape(len(index), int(widths[0]))
    return np.asarray(ids, dtype=object)[order], vectors[order]


__all__ = ["ID_FEATURES", "TABLES", "ReadExamples", "TokenTables", "Vocabularies", "Frequencies", "EmbedVocabulary",
           "run_token_tables", "run_vocabularies", "run_frequencies", "run_vocabulary_embeddings", "read_vocabulary",
           "read_counts", "read_embeddings", "vocabulary_path", "counts_path", "shard_path", "input_files",
           "example_tokens", "vocabulary_batches", "id_signature"]
