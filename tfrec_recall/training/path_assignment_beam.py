"""Deep Retrieval's M-step as an Apache Beam pipeline, for corpora too large for one process's scoring pass.

The heavy part of the M-step, one user-encoder pass and one beam search per training interaction and the sum
of p(c | x_i) per (item, path), runs as a Beam job: :class:`ScorePaths` maps batches of interactions through a
SavedModel *path scorer* (:func:`export_path_scorer`: the query tower, the structure model and the item lookup)
with the same :func:`~tfrec_recall.training.path_assignment.interaction_scores` as the in-process M-step, and
sums by key (``CombinePerKey``), so any Beam runner (DirectRunner, its multi-process mode, Dataflow, Dask)
can spread it over workers. The summed scores are written as text shards by item ("item<TAB>code<TAB>score";
code -1 holds the item's interaction count N_v) under ``work_dir``, by a ParDo at the pipeline's end: the
DaskRunner of apache-beam 2.74 computes only the branch that ends the pipeline and hands every output of a
multi-output ParDo to every consumer, so the job has one output and one sink (tests/test_beam_jobs.py runs it on
the DirectRunner, its multi-process mode and Dask). :func:`read_path_scores` reads them back (through
``tf.io.gfile``, so ``gs://`` works) into the in-process :class:`~tfrec_recall.training.path_assignment.PathScores`,
and the coordinate descent runs in one process (it is sequential over items; its input is the compact
per-item candidate lists). ``beam_m_step`` does all of it and installs the paths, as ``m_step`` does.
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping, Optional

import apache_beam as beam
import numpy as np
import tensorflow as tf

from tfrec_recall.beam_runners import run_pipeline
from tfrec_recall.layers.structure import check_beam_width, place_values
from tfrec_recall.tasks.path_likelihood import PathStructureLoss
from tfrec_recall.training.deep_retrieval import MStep, install_paths, structure_loss_of
from tfrec_recall.training.path_assignment import ScoreAccumulator, interaction_scores



class _PathScorer(tf.Module):
    """(item rows, path codes [n, B], log p [n, B]) of a batch of raw interactions."""

    def __init__(self, model, loss: PathStructureLoss, beam_width: int):
        super().__init__()
        self.query_tower, self.loss, self.beam_width = model.query_tower, loss, beam_width
        s = loss.structure
        self.place_values = tf.constant(place_values(s.num_codes, s.num_layers))
        specs = {spec.name: spec.tensor_spec() for spec in model.query_tower.input_specs}
        specs[loss.item_feature] = tf.TensorSpec([None], tf.string, name=loss.item_feature)
        self.score = tf.function(self._score, input_signature=[specs])

    def _score(self, features):
        paths, log_probs = self.loss.structure.beam_search(self.query_tower(features, training=False),
                                                           self.beam_width)
        codes = tf.reduce_sum(tf.cast(paths, tf.int64) * self.place_values, axis=-1)
        return {"rows": self.loss.item_rows(features[self.loss.item_feature]), "codes": codes,
                "log_probs": log_probs}


def export_path_scorer(model, directory: str, beam_width: int) -> str:
    """Saves the model's path scorer (query tower + structure + item lookup, beam width ``beam_width``) as a
    SavedModel in ``directory`` (any ``tf.io.gfile`` path) and returns the directory."""
    loss = structure_loss_of(model)
    width = check_beam_width(beam_width, loss.structure.num_codes, loss.structure.num_layers)
    module = _PathScorer(model, loss, width)
    tf.saved_model.save(module, directory, signatures={"score": module.score})
    return directory


COUNT_CODE = -1  # the key (item, COUNT_CODE) sums the item's interactions N_v; (item, code >= 0) sums s[v, c]


class _ScoreBatch(beam.DoFn):
    """A batch of interactions (a dict of arrays) -> ((item, code), p) for each beam path, and
    ((item, COUNT_CODE), 1) per interaction. One output: the DaskRunner of apache-beam 2.74 hands every output
    of a multi-output ParDo to every consumer."""

    def __init__(self, scorer_dir: str):
        super().__init__()
        self.scorer_dir = scorer_dir
        self._score = None

    def setup(self):
        self._score = tf.saved_model.load(self.scorer_dir).signatures["score"]

    def process(self, batch: Mapping[str, np.ndarray]) -> Iterable:
        out = {k: v.numpy() for k, v in self._score(**{k: tf.constant(v) for k, v in batch.items()}).items()}
        known = out["rows"] >= 0
        items, codes, probs = interaction_scores(out["rows"][known], out["codes"][known], out["log_probs"][known])
        for item, code, p in zip(items.tolist(), codes.tolist(), probs.tolist()):
            yield (item, code), p
        for item in out["rows"][known].tolist():
            yield (item, COUNT_CODE), 1.0


class ScorePaths(beam.PTransform):
    """Batches of raw interactions (dicts of arrays with the query features and the item id) -> one PCollection
    of ((item, code), s[v, c]) summed over the interactions, plus ((item, COUNT_CODE), N_v)."""

    def __init__(self, scorer_dir: str):
        super().__init__()
        self.scorer_dir = scorer_dir

    def expand(self, batches):
        return (batches | "Score" >> beam.ParDo(_ScoreBatch(self.scorer_dir))
                | "Sum" >> beam.CombinePerKey(sum))


class _WriteShard(beam.DoFn):
    """(shard, [((item, code), value), ...]) -> the text file ``<prefix>-SSSSS.tsv`` ("item<TAB>code<TAB>value"
    lines), written to a temporary name and renamed, through tf.io.gfile."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def process(self, element) -> Iterable[str]:
        shard, rows = element
        path = f"{self.prefix}-{shard:05d}.tsv"
        tf.io.gfile.makedirs(os.path.dirname(path))
        with tf.io.gfile.GFile(path + ".tmp", "w") as f:
            f.write("".join(f"{item}\t{code}\t{value!r}\n" for (item, code), value in sorted(rows)))
        tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
        yield path


def write_path_scores(scores: beam.PCollection, prefix: str, num_shards: int = 4) -> beam.PCollection:
    """Writes :class:`ScorePaths`'s output as ``num_shards`` text shards ``<prefix>-SSSSS.tsv`` (by item), in the
    pipeline's last transform (a runner may compute only the branch that ends the pipeline)."""
    return (scores | "ShardByItem" >> beam.Map(lambda kv: (kv[0][0] % num_shards, kv))
            | "GroupShards" >> beam.GroupByKey() | "WriteShards" >> beam.ParDo(_WriteShard(prefix)))


def _lines(pattern: str) -> Iterable[str]:
    for path in sorted(tf.io.gfile.glob(pattern)):
        with tf.io.gfile.GFile(path) as f:
            yield from (line for line in f.read().splitlines() if line)


def read_path_scores(prefix: str, num_items: int, max_candidates: int):
    """The :class:`PathScores` written by :func:`write_path_scores` under ``prefix``."""
    accumulator = ScoreAccumulator(num_items)
    rows = [line.split("\t") for line in _lines(f"{prefix}-*.tsv")]
    if not rows:
        raise FileNotFoundError(f"no path scores under {prefix}-*.tsv: the scoring job wrote nothing")
    paths = [r for r in rows if int(r[1]) != COUNT_CODE]
    if paths:
        accumulator.add_sums([int(r[0]) for r in paths], [int(r[1]) for r in paths], [float(r[2]) for r in paths])
    for item, _, n in (r for r in rows if int(r[1]) == COUNT_CODE):
        accumulator.counts[int(item)] += int(float(n))
    return accumulator.result(max_candidates)


def _batches(arrays: Mapping[str, np.ndarray], batch_size: int):
    n = len(next(iter(arrays.values())))
    return [{k: np.asarray(v[i:i + batch_size]) for k, v in arrays.items()} for i in range(0, n, batch_size)]


def beam_m_step(model, arrays: Mapping[str, np.ndarray], work_dir: str, step: MStep = MStep(),
                item_vectors: Optional[np.ndarray] = None,
                options: Optional[beam.options.pipeline_options.PipelineOptions] = None) -> tuple:
    """The M-step with its scoring run by Beam (``options``: the runner and its flags; DirectRunner by default):
    exports the path scorer to ``work_dir``, scores ``arrays`` (the training interactions) in batches of
    ``step.batch_size``, then assigns and installs the paths. Returns (Assignment, donor) as ``m_step``."""
    loss = structure_loss_of(model)
    scorer = export_path_scorer(model, os.path.join(work_dir, "path_scorer"), step.beam_width)
    prefix = os.path.join(work_dir, "path_scores", "part")
    pipeline = beam.Pipeline(options=options)
    scores = (pipeline | "Interactions" >> beam.Create(_batches(arrays, step.batch_size))
              | "ScorePaths" >> ScorePaths(scorer))
    write_path_scores(scores, prefix)
    run_pipeline(pipeline)
    return install_paths(model, read_path_scores(prefix, len(loss.items), step.max_candidates), step,
                         item_vectors)


__all__ = ["ScorePaths", "export_path_scorer", "write_path_scores", "read_path_scores", "beam_m_step"]
