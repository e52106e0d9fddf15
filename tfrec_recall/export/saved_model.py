"""Export retrieval models for TF Serving: the query tower plus a top-k index in one SavedModel.

``export_retrieval_model`` writes ``export_dir_base/<version>/`` (TF Serving's versioned layout; versions are
increasing integers) with three signatures:

* ``serving_default``: raw query features as named tensors -> ``item_ids`` ``[batch, k]`` string and
  ``scores`` ``[batch, k]`` float32, best first. Items in the query's history feature are excluded when
  ``exclude_history`` is on (the default when the tower has a history feature);
* ``serve_examples``: ``examples``, a ``[batch]`` string tensor of serialized ``tf.Example`` -> the same;
  features missing from an example take ``""`` (OOV / padding) or NaN (the training mean);
* ``query_embedding``: raw features -> ``query_embedding`` ``[batch, dim]`` float32.

Inputs: an ``IdFeature`` is ``[batch]`` string, a multi-valued or sequence feature ``[batch, max_len]`` string
padded with ``""``, a ``NumericFeature`` ``[batch]`` float32. ``assets/manifest.json`` records the model and
index types and parameters, candidate count, dimension, k, versions, creation time and a SHA-256 of the
candidate table. The version is written to a temporary directory and renamed, so a failure leaves nothing.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

import tfrec_recall
from tfrec_recall._atomic import atomic_directory
from tfrec_recall.features.specs import HISTORY, SequenceFeature
from tfrec_recall.retrievers import IVF, BruteForce, ScaNN, TopKIndex, index_class, index_names
from tfrec_recall._validation import require_positive_int

OUTPUT_IDS = "item_ids"
OUTPUT_SCORES = "scores"
OUTPUT_EMBEDDING = "query_embedding"
EXAMPLES_INPUT = "examples"
MANIFEST = "manifest.json"


def input_signature(tower) -> Dict[str, tf.TensorSpec]:
    return {spec.name: spec.tensor_spec() for spec in tower.encoder.specs}


def example_parse_spec(tower) -> Dict[str, tf.io.FixedLenFeature]:
    return {spec.name: spec.parse_spec() for spec in tower.encoder.specs}


class RetrievalModule(tf.Module):
    """The exported object: query tower + index, with the serving functions."""

    def __init__(self, query_tower, index: TopKIndex, k: int, exclude_history: bool):
        super().__init__()
        self.query_tower = query_tower
        self.retrieval_index = index
        self.k = k
        self.history_feature = None
        if exclude_history:
            sequences = [s.name for s in query_tower.encoder.specs if isinstance(s, SequenceFeature)]
            self.history_feature = HISTORY if HISTORY in sequences else (sequences[0] if sequences else None)
        self._parse_spec = example_parse_spec(query_tower)
        signature = input_signature(query_tower)
        self.serve = tf.function(self._serve, input_signature=[signature])
        self.embed = tf.function(self._embed, input_signature=[signature])
        self.serve_examples = tf.function(
            self._serve_examples, input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])

    def _retrieve(self, features):
        query = self.query_tower(features, training=False)
        exclude = features[self.history_feature] if self.history_feature else None
        scores, ids = self.retrieval_index(query, k=self.k, exclude=exclude)
        return {OUTPUT_IDS: ids, OUTPUT_SCORES: scores}

    def _serve(self, features):
        return self._retrieve(features)

    def _embed(self, features):
        return {OUTPUT_EMBEDDING: self.query_tower(features, training=False)}

    def _serve_examples(self, examples):
        return self._retrieve(tf.io.parse_example(examples, self._parse_spec))


def candidate_checksum(ids: np.ndarray, embeddings: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update("\n".join(np.asarray(ids).astype(str)).encode("utf-8"))
    digest.update(np.ascontiguousarray(embeddings, dtype=np.float32).tobytes())
    return digest.hexdigest()


def _next_version(base: Path) -> int:
    """Sequential version naming shared with the Pusher (``tfrec_recall.serving.versions``)."""
    from tfrec_recall.serving.versions import next_version
    return next_version(tf.io.gfile.listdir(str(base))) if tf.io.gfile.isdir(str(base)) else 1


def make_index(kind: str, k: int, num_candidates: int, *, storage_dtype: str = "float32",
               ivf_lists: Optional[int] = None, ivf_probes: Optional[int] = None,
               scann_leaves: Optional[int] = None, scann_leaves_to_search: Optional[int] = None) -> TopKIndex:
    """An unbuilt index of ``kind`` (a registered name: ``tfrec_recall.retrievers.index_names()``) for
    ``num_candidates`` candidates, with the defaults measured in benchmarks/serving.py where a size is not
    given."""
    import math
    from tfrec_recall.retrievers import ScaNNConfig
    cls = index_class(kind)
    require_positive_int("k", k)
    if cls is BruteForce:
        return BruteForce(max_k=k, storage_dtype=storage_dtype)
    if cls is IVF:
        # 2 sqrt(n) lists, 1 % of them probed (at least 12).
        lists = ivf_lists or max(1, min(num_candidates, int(round(2 * math.sqrt(num_candidates)))))
        probes = ivf_probes or max(12, lists // 100)
        return IVF(max_k=k, num_lists=lists, num_probes=min(probes, lists))
    if cls is ScaNN:
        leaves = scann_leaves or max(1, min(num_candidates, int(round(math.sqrt(num_candidates)))))
        to_search = scann_leaves_to_search or max(1, leaves // 10)
        return ScaNN(ScaNNConfig().tree(num_leaves=leaves, num_leaves_to_search=min(to_search, leaves)), max_k=k)
    return cls(max_k=k)  # any other registered index: its own defaults


def export_retrieval_model(model, candidates: Tuple[Sequence[str], np.ndarray], *,
                           index: Union[str, TopKIndex] = "brute_force", export_dir_base, k: int = 100,
                           version: Optional[int] = None, exclude_history: bool = True) -> Path:
    """Exports ``model`` (a ``TwoTower`` or a query tower) with an index over ``candidates`` = (ids,
    embeddings). An index instance that was not built yet is built over the candidates. Returns the version
    directory."""
    query_tower = getattr(model, "query_tower", model)
    if not hasattr(query_tower, "encoder"):
        raise TypeError(f"model must be a TwoTower or a tfrec_recall tower, got {type(model).__name__}")
    require_positive_int("k", k)
    ids, embeddings = np.asarray(candidates[0]).astype(str), np.asarray(candidates[1], dtype=np.float32)
    if not isinstance(index, TopKIndex):
        if index not in index_names():
            raise ValueError(f"index must be a TopKIndex or one of {list(index_names())}, got {index!r}")
        index = make_index(index, k, len(ids))
    if k > index.max_k:
        raise ValueError(f"k ({k}) must be <= the index's max_k ({index.max_k})")
    if index.ids is None:
        index.index(ids, embeddings)
    elif index.num_candidates != len(ids):
        raise ValueError(f"the index holds {index.num_candidates} candidates but {len(ids)} were given")
    base = Path(export_dir_base)
    base.mkdir(parents=True, exist_ok=True)
    version = _next_version(base) if version is None else version
    require_positive_int("version", version)
    final = base / str(version)
    if final.exists():
        raise FileExistsError(f"{final} exists; versions are never overwritten")
    module = RetrievalModule(query_tower, index, k, exclude_history)
    with atomic_directory(final, base / f".tmp-{version}-{os.getpid()}") as tmp:
        options = tf.saved_model.SaveOptions(namespace_whitelist=["Scann"] if isinstance(index, ScaNN) else None)
        tf.saved_model.save(module, str(tmp), signatures={"serving_default": module.serve,
                                                          "serve_examples": module.serve_examples,
                                                          "query_embedding": module.embed}, options=options)
        manifest = {
            "model_type": type(model).__name__,
            "query_tower": type(query_tower).__name__,
            "index": index.parameters(),
            "k": k,
            "candidate_count": int(len(ids)),
            "embedding_dimension": int(embeddings.shape[1]),
            "candidate_checksum_sha256": candidate_checksum(ids, embeddings),
            "exclude_history_feature": module.history_feature,
            "inputs": {name: {"dtype": s.dtype.name, "shape": s.shape.as_list()}
                       for name, s in input_signature(query_tower).items()},
            "outputs": {OUTPUT_IDS: "[batch, k] string", OUTPUT_SCORES: "[batch, k] float32",
                        OUTPUT_EMBEDDING: "[batch, dim] float32 (signature query_embedding)"},
            "requires_custom_ops": ["Scann"] if isinstance(index, ScaNN) else [],
            "versions": {"tfrec_recall": tfrec_recall.__version__, "tensorflow": tf.__version__,
                         "python": sys.version.split()[0]},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / "assets").mkdir(exist_ok=True)
        (tmp / "assets" / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return final


def export_candidates(ids: Sequence[str], embeddings: np.ndarray, out_dir) -> Path:
    """Candidate ids and embeddings for external ANN systems: ``ids.npy`` (unicode array), ``embeddings.npy``
    (float32 [n, d]) and ``candidates.tfrecord`` (tf.Example with ``id`` bytes and ``embedding`` floats).
    Written to a temporary directory and renamed."""
    ids = np.asarray(ids).astype(str)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or len(ids) != len(embeddings):
        raise ValueError(f"need one id per embedding row, got {len(ids)} ids and embeddings {embeddings.shape}")
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite")
    with atomic_directory(out) as tmp:
        np.save(tmp / "ids.npy", ids)
        np.save(tmp / "embeddings.npy", embeddings)
        with tf.io.TFRecordWriter(str(tmp / "candidates.tfrecord")) as writer:
            for item, vector in zip(ids, embeddings):
                writer.write(tf.train.Example(features=tf.train.Features(feature={
                    "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[item.encode("utf-8")])),
                    "embedding": tf.train.Feature(float_list=tf.train.FloatList(value=vector.tolist())),
                })).SerializeToString())
    return out


def saved_model_ops(export_dir) -> set:
    """Names of all ops in a SavedModel's graphs (including its function library)."""
    from tensorflow.core.protobuf import saved_model_pb2
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((Path(export_dir) / "saved_model.pb").read_bytes())
    ops = set()
    for meta in proto.meta_graphs:
        ops.update(node.op for node in meta.graph_def.node)
        for function in meta.graph_def.library.function:
            ops.update(node.op for node in function.node_def)
    return ops
