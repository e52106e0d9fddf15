"""The Beam jobs of side-feature tables (the format: :mod:`tfrec_recall.data.side_tables`): the join of the split
examples with the user and item tables, and the tables' training statistics.

The jobs use only what the DaskRunner of apache-beam 2.74 translates (see :mod:`tfrec_recall.data.beam_jobs`):
reads by ``ReadAllFromTFRecord``, no multi-output ParDo, files written in ParDos on the one branch that ends the
pipeline (the statistics job writes the vocabularies in a step upstream of its last one).
"""
from __future__ import annotations

import json
import math
import zlib
from typing import Dict, Sequence, Tuple

import apache_beam as beam
import tensorflow as tf

from tfrec_recall import storage
from tfrec_recall._validation import require_positive_int
from tfrec_recall.data.protocol import SPLITS, split_files
from tfrec_recall.data.schema import DataError
from tfrec_recall.data.side_tables import (CORPUS, ENTITIES, SIDE_FEATURES_FILE, STATISTICS_FILE, Columns,
                                           SideFeatures, column_value, corpus_example, key_of, missing_value,
                                           parse_table_row, with_features, write_side_features_file)


# -- the join ---------------------------------------------------------------------------------------------------
def _attach(group, entity: str, columns: Columns, with_corpus: bool):
    """One key's CoGroupByKey result -> its examples with the entity's columns set, and (items) its corpus
    example. A key with two table rows is refused, naming it."""
    key, grouped = group
    rows = list(grouped["rows"])
    if len(rows) > 1:
        raise DataError(f"{len(rows)} rows of the {entity} table have id {key!r}; one is allowed",
                        field=ENTITIES[entity])
    values = rows[0] if rows else tuple(missing_value(kind) for _, kind in columns)
    if with_corpus:
        yield CORPUS, corpus_example(key, values, columns)
    for split, record in grouped["examples"]:
        yield split, with_features(record, values, columns)


def _keyed(tagged: Tuple[str, bytes], key: str):
    return key_of(tf.train.Example.FromString(tagged[1]), key), tagged


class _JoinEntity(beam.PTransform):
    """(split, serialized example) -> the same with ``entity``'s columns joined from ``table`` (table
    examples); for items, plus a (``corpus``, example) per key of either side."""

    def __init__(self, entity: str, columns: Columns, table):
        super().__init__()
        self.entity, self.columns, self.table = entity, columns, table

    def expand(self, tagged):
        entity, columns = self.entity, self.columns
        rows = self.table | "ParseRows" >> beam.Map(parse_table_row, entity, columns)
        keyed = tagged | "Key" >> beam.Map(_keyed, ENTITIES[entity])
        return ({"rows": rows, "examples": keyed} | "CoGroup" >> beam.CoGroupByKey()
                | "Attach" >> beam.FlatMap(_attach, entity, columns, entity == "item"))


class JoinSideFeatures(beam.PTransform):
    """``{"train", "eval", "test"}`` PCollections of serialized split examples, and ``"user"`` / ``"item"`` ones of
    table examples (each needed when ``side`` declares its columns) -> (split, serialized joined example), the
    ``corpus`` split included (module docstring). Without item columns the corpus is the items of the splits."""

    def __init__(self, side: SideFeatures):
        super().__init__()
        if not isinstance(side, SideFeatures) or not side:
            raise ValueError(f"side must be a SideFeatures declaring at least one column, got {side!r}")
        self.side = side

    def expand(self, inputs):
        missing = [name for name in SPLITS if name not in inputs]
        missing += [entity for entity in ENTITIES if getattr(self.side, entity) and entity not in inputs]
        if missing:
            raise ValueError(f"JoinSideFeatures needs the inputs {missing}")
        tagged = [inputs[name] | f"Tag[{name}]" >> beam.Map(lambda record, n=name: (n, record)) for name in SPLITS]
        examples = tagged | "Splits" >> beam.Flatten()
        items = inputs.get("item") or (examples.pipeline | "NoItemTable" >> beam.Create([]))
        joined = examples | "JoinItems" >> _JoinEntity("item", self.side.item, items)
        if not self.side.user:
            return joined
        corpus = joined | "Corpus" >> beam.Filter(lambda pair: pair[0] == CORPUS)
        rest = joined | "NotCorpus" >> beam.Filter(lambda pair: pair[0] != CORPUS)
        users = rest | "JoinUsers" >> _JoinEntity("user", self.side.user, inputs["user"])
        return (corpus, users) | "All" >> beam.Flatten()


def split_file(output_dir: str, split: str, shard: int, num_shards: int) -> str:
    return storage.join(output_dir, f"Split-{split}", f"part-{shard:05d}-of-{num_shards:05d}.tfrecord.gz")


def _write_split_shard(group, output_dir: str, num_shards: int) -> str:
    from tfrec_recall.data.beam_jobs import _write_atomically
    (split, shard), records = group
    records = sorted(r for r in records if r is not None)  # the same bytes whatever order the runner gave

    def write(tmp: str) -> None:
        with tf.io.TFRecordWriter(tmp, options="GZIP") as writer:
            for record in records:
                writer.write(record)
    tf.io.gfile.makedirs(storage.join(output_dir, f"Split-{split}"))
    return _write_atomically(split_file(output_dir, split, shard, num_shards), write)


class WriteSplits(beam.PTransform):
    """(split, serialized example) -> the paths of ``<output_dir>/Split-<split>/part-SSSSS-of-NNNNN.tfrecord.gz``,
    an example in shard ``crc32(example) % num_shards``, sorted within it, written by a ParDo. Shard 0 of every
    one of ``splits`` is written even when empty (as ProtocolSplit writes an empty split); other shards no
    example falls in are not."""

    def __init__(self, output_dir: str, num_shards: int = 4, splits: Sequence[str] = (*SPLITS, CORPUS)):
        super().__init__()
        self.output_dir, self.num_shards = output_dir, require_positive_int("num_shards", num_shards)
        self.splits = tuple(splits)

    def expand(self, pairs):
        n = self.num_shards
        keyed = pairs | "ByShard" >> beam.Map(lambda pair: ((pair[0], zlib.crc32(pair[1]) % n), pair[1]))
        empty = pairs.pipeline | "EveryShardZero" >> beam.Create([((split, 0), None) for split in self.splits])
        return ((keyed, empty) | "WithEmpty" >> beam.Flatten() | "Group" >> beam.GroupByKey()
                | "Write" >> beam.Map(_write_split_shard, self.output_dir, n))


def add_join(pipeline, examples_uri: str, output_dir: str, side: SideFeatures, *, user_files: Sequence[str] = (),
             item_files: Sequence[str] = (), num_shards: int = 4):
    """Adds the join of the split examples under ``examples_uri`` (``Split-{train,eval,test}/*``) with the tables
    in ``user_files`` / ``item_files`` to ``pipeline``, writing the joined splits under ``output_dir``."""
    from tfrec_recall.data.beam_jobs import ReadExamples
    inputs = {name: pipeline | f"Read[{name}]" >> ReadExamples(split_files(examples_uri, name)) for name in SPLITS}
    for entity, files in (("user", user_files), ("item", item_files)):
        if getattr(side, entity):
            if not files:
                raise ValueError(f"side declares {entity} columns {[c for c, _ in getattr(side, entity)]}: "
                                 f"{entity}_files must name the {entity} table's files")
            inputs[entity] = pipeline | f"Read[{entity}]" >> ReadExamples(list(files))
    return inputs | "JoinSideFeatures" >> JoinSideFeatures(side) | "WriteSplits" >> WriteSplits(output_dir, num_shards)


def run_join_side_features(examples_uri: str, output_dir: str, side: SideFeatures, *,
                           user_files: Sequence[str] = (), item_files: Sequence[str] = (), runner="direct",
                           num_shards: int = 4) -> str:
    """Runs :func:`add_join` on ``runner`` (a :mod:`tfrec_recall.beam_runners` name or ``PipelineOptions``) into
    ``output_dir``, written whole in a temporary directory then moved into place (refuses an existing one);
    ``side_features.json`` last. Returns ``output_dir``."""
    from tfrec_recall._atomic import atomic_directory
    from tfrec_recall.beam_runners import as_options, run_pipeline
    if storage.exists(output_dir):
        raise FileExistsError(f"{output_dir} exists; refusing to overwrite joined examples")
    with atomic_directory(output_dir, last=(SIDE_FEATURES_FILE,)) as tmp:
        pipeline = beam.Pipeline(options=as_options(runner))
        add_join(pipeline, examples_uri, tmp, side, user_files=user_files, item_files=item_files,
                 num_shards=num_shards)
        run_pipeline(pipeline)
        write_side_features_file(tmp, side)
    return output_dir


# -- statistics -------------------------------------------------------------------------------------------------
class _AnyValue(beam.CombineFn):
    """One of the values of a key (every example of an entity carries the same side values)."""

    def create_accumulator(self):
        return None

    def add_input(self, accumulator, value):
        return value if accumulator is None else accumulator

    def merge_accumulators(self, accumulators):
        return next((a for a in accumulators if a is not None), None)

    def extract_output(self, accumulator):
        return accumulator


class _Moments(beam.CombineFn):
    """Finite floats -> (count, mean, sum of squared deviations), merged by Chan et al.'s pairwise update."""

    def create_accumulator(self):
        return 0, 0.0, 0.0

    def add_input(self, accumulator, value):
        return self.merge_accumulators([accumulator, (1, float(value), 0.0)])

    def merge_accumulators(self, accumulators):
        n, mean, m2 = 0, 0.0, 0.0
        for n_b, mean_b, m2_b in accumulators:
            if n_b:
                total = n + n_b
                delta = mean_b - mean
                mean, m2, n = mean + delta * n_b / total, m2 + m2_b + delta * delta * n * n_b / total, total
        return n, mean, m2

    def extract_output(self, accumulator):
        return accumulator


def _entity_values(record: bytes, side: SideFeatures):
    example = tf.train.Example.FromString(record)
    for entity, key in ENTITIES.items():
        columns = getattr(side, entity)
        if columns:
            yield (entity, key_of(example, key)), tuple(column_value(example, n, k) for n, k in columns)


def _parts(entity_values, side: SideFeatures):
    """An entity's values -> (column, ("token", t)) / (column, ("length", n)) / (column, ("number", x))."""
    (entity, _), values = entity_values
    for (name, kind), value in zip(getattr(side, entity), values):
        if kind == "numeric":
            if math.isfinite(value):
                yield name, ("number", value)
        elif kind == "categorical":
            if value:
                yield name, ("token", value)
        else:
            yield name, ("length", len(value))
            for token in value:
                if token:
                    yield name, ("token", token)


def _summarise(group, output_dir: str):
    """(column, its distinct tokens, longest list and moments) -> (column, statistics); writes the vocabulary."""
    from tfrec_recall.data.beam_jobs import _write_text, vocabulary_path
    name, parts = group[0], list(group[1])
    tokens = sorted(v for tag, v in parts if tag == "token")
    out: Dict[str, object] = {}
    for tag, value in parts:
        if tag == "length":
            out["max_length"] = value
        elif tag == "moments":
            n, mean, m2 = value
            out.update(count=n, mean=mean, variance=m2 / n if n else 0.0)
    if tokens:
        out["vocabulary_size"] = len(tokens)
        _write_text(vocabulary_path(output_dir, name), "".join(t + "\n" for t in tokens))
    return name, out


def _write_statistics(group, output_dir: str, side: SideFeatures) -> str:
    from tfrec_recall.data.beam_jobs import _write_text
    by_column = dict(group[1])
    columns = {name: {"kind": kind, **by_column.get(name, {})} for name, kind in side.kinds.items()}
    text = json.dumps({"side_features": json.loads(side.to_json()), "columns": columns}, indent=2, sort_keys=True)
    return _write_text(storage.join(output_dir, STATISTICS_FILE), text)


class SideStatistics(beam.PTransform):
    """Serialized joined training examples -> the path of ``statistics.json`` under ``output_dir``, written with
    the vocabulary files (module docstring)."""

    def __init__(self, output_dir: str, side: SideFeatures):
        super().__init__()
        self.output_dir, self.side = output_dir, side

    def expand(self, records):
        # every column reaches the writer, even one with no value in any training entity
        seen = records.pipeline | "EveryColumn" >> beam.Create([(name, ("seen", 1)) for name in self.side.kinds])
        parts = (records | "EntityValues" >> beam.FlatMap(_entity_values, self.side)
                 | "OnePerEntity" >> beam.CombinePerKey(_AnyValue())
                 | "Parts" >> beam.FlatMap(_parts, self.side))
        tokens = (parts | "Tokens" >> beam.Filter(lambda p: p[1][0] == "token")
                  | "TokenKeys" >> beam.Map(lambda p: (p, None)) | "Distinct" >> beam.GroupByKey()
                  | "Token" >> beam.Map(lambda kv: kv[0]))
        lengths = (parts | "Lengths" >> beam.Filter(lambda p: p[1][0] == "length")
                   | "Length" >> beam.Map(lambda p: (p[0], p[1][1])) | "Longest" >> beam.CombinePerKey(max)
                   | "TagLength" >> beam.Map(lambda kv: (kv[0], ("length", kv[1]))))
        moments = (parts | "Numbers" >> beam.Filter(lambda p: p[1][0] == "number")
                   | "Number" >> beam.Map(lambda p: (p[0], p[1][1])) | "Moments" >> beam.CombinePerKey(_Moments())
                   | "TagMoments" >> beam.Map(lambda kv: (kv[0], ("moments", kv[1]))))
        return ((seen, tokens, lengths, moments) | "Together" >> beam.Flatten() | "ByColumn" >> beam.GroupByKey()
                | "Summarise" >> beam.Map(_summarise, self.output_dir)
                | "One" >> beam.Map(lambda pair: (None, pair)) | "All" >> beam.GroupByKey()
                | "Write" >> beam.Map(_write_statistics, self.output_dir, self.side))


def run_side_statistics(train_pattern: str, output_dir: str, side: SideFeatures, runner="direct") -> str:
    """Runs :class:`SideStatistics` over the joined training examples matching ``train_pattern``; returns the
    path of ``statistics.json``. Refuses an ``output_dir`` that holds one."""
    from tfrec_recall.beam_runners import as_options, run_pipeline
    from tfrec_recall.data.beam_jobs import ReadExamples, _refuse_existing, input_files
    path = storage.join(output_dir, STATISTICS_FILE)
    files = input_files(train_pattern)
    _refuse_existing([path])
    storage.makedirs(output_dir)
    pipeline = beam.Pipeline(options=as_options(runner))
    _ = pipeline | "Examples" >> ReadExamples(files) | "SideStatistics" >> SideStatistics(output_dir, side)
    run_pipeline(pipeline)
    if not storage.exists(path):
        raise RuntimeError(f"the side statistics job over {train_pattern!r} finished without writing {path}")
    return path
