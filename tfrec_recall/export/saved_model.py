"""Export retrieval models for TF Serving: the query tower plus a top-k index in one SavedModel.

``export_retrieval_model`` writes ``export_dir_base/<version>/`` (TF Serving's versioned layout; versions are
increasing integers) with four signatures:

* ``serving_default``: raw query features as named tensors -> ``item_ids`` ``[batch, k]`` string and
  ``scores`` ``[batch, k]`` float32, best first. Items in the query's history feature are excluded when
  ``exclude_history`` is on (the default when the tower has a history feature);
* ``serve_with_exclusions``: the same inputs plus ``exclude_item_ids``, ``[batch, None]`` string padded with
  ``""`` -> the same outputs, with the listed ids excluded too (e.g. the user's full history, as the offline
  evaluation excludes it; any number of ids per row; ids that are not candidates are ignored). TF Serving
  signatures have no optional inputs, hence a second signature; both call the same index;
* ``serve_examples``: ``examples``, a ``[batch]`` string tensor of serialized ``tf.Example`` -> the same;
  features missing from an example take ``""`` (OOV / padding) or NaN (the training mean);
* ``query_embedding``: raw features -> ``query_embedding`` ``[batch, dim]`` float32.

A multi-interest query tower (MIND, ComiRec: K vectors per user) keeps the same signatures, inputs and top-k
outputs: each of the user's valid interests searches the index and the results are merged
(:class:`~tfrec_recall.retrievers.MultiQueryRetriever`); ``query_embedding`` then returns ``[batch, K, dim]``
and ``interest_mask`` ``[batch, K]`` bool, and the manifest records ``num_interests`` and the ``merge``.

Inputs: an ``IdFeature`` is ``[batch]`` string, a multi-valued or sequence feature ``[batch, max_len]`` string
padded with ``""``, a ``NumericFeature`` ``[batch]`` float32. ``assets/manifest.json`` records the model and
index types and parameters, candidate count, dimension, k, the signatures with their inputs and outputs,
versions, creation time, a SHA-256 of the
candidate table and ``index_recall``: the index's recall@k against exact search as measured when it was built
(``k``, ``target_recall``, ``measured_recall``, the tuned ``setting``; ``null`` when not measured), see
:meth:`tfrec_recall.retrievers.TopKIndex.recall_report`. The version is written to a temporary directory and renamed, so a failure leaves nothing.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import math
import os
import sys
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

import tfrec_recall
from tfrec_recall import storage
from tfrec_recall._atomic import atomic_directory, exclusive_lock, remove_stale_temporaries
from tfrec_recall.features.specs import HISTORY, SequenceFeature
from tfrec_recall.retrievers import IVF, BruteForce, ScaNN, TopKIndex, index_class, index_names
from tfrec_recall.retrievers.multi_query import MultiQueryRetriever
from tfrec_recall.retrievers.tuning import DEFAULT_TARGET_RECALL
from tfrec_recall._validation import require_int, require_positive_int

OUTPUT_IDS = "item_ids"
OUTPUT_SCORES = "scores"
OUTPUT_EMBEDDING = "query_embedding"
OUTPUT_INTEREST_MASK = "interest_mask"
EXAMPLES_INPUT = "examples"
EXCLUDE_INPUT = "exclude_item_ids"
SIGNATURE_DEFAULT = "serving_default"
SIGNATURE_EXCLUSIONS = "serve_with_exclusions"
SIGNATURE_EXAMPLES = "serve_examples"
SIGNATURE_EMBEDDING = "query_embedding"
MANIFEST = "manifest.json"

logger = logging.getLogger(__name__)

# make_index gives exact search (BruteForce) for an approximate index (ivf, scann) asked for with default sizes
# over fewer candidates than this. Measured in benchmarks/ann_recall.py (results/ann_recall.md, "Fallback
# threshold"): the smallest corpus size at which both approximate indexes, tuned to recall 0.95 at k=100, answered
# a single query at least twice as fast (p50) as BruteForce in the same process (a run under lighter load; the
# committed run's latencies are noisy, see the .md).
EXACT_SEARCH_BELOW = 100_000


def input_signature(tower) -> Dict[str, tf.TensorSpec]:
    """The serving inputs: every raw input of the tower but those the model fills in (the example age)."""
    return {spec.name: spec.tensor_spec() for spec in tower.serving_specs}


def example_parse_spec(tower) -> Dict[str, tf.io.FixedLenFeature]:
    return {spec.name: spec.parse_spec() for spec in tower.input_specs}


class RetrievalModule(tf.Module):
    """The exported object: query tower + index, with the serving functions."""

    def __init__(self, query_tower, index: TopKIndex, k: int, exclude_history: bool,
                 merge: Optional[MultiQueryRetriever] = None):
        super().__init__()
        self.query_tower = query_tower
        self.retrieval_index = index
        self.multi_interest = bool(getattr(query_tower, "multi_interest", False))
        if self.multi_interest and merge is None:
            merge = MultiQueryRetriever(index)
        if merge is not None and (not self.multi_interest or merge.index is not index):
            raise ValueError("merge (a MultiQueryRetriever over the exported index) applies to a multi-interest "
                             f"query tower only, got {type(query_tower).__name__}")
        self.merge = merge
        self.k = k
        self.history_feature = None
        if exclude_history:
            sequences = [s.name for s in query_tower.input_specs if isinstance(s, SequenceFeature)]
            self.history_feature = HISTORY if HISTORY in sequences else (sequences[0] if sequences else None)
        self._parse_spec = example_parse_spec(query_tower)
        signature = input_signature(query_tower)
        if EXCLUDE_INPUT in signature:
            raise ValueError(f"the query tower has a feature named {EXCLUDE_INPUT!r}, the name of the "
                             f"{SIGNATURE_EXCLUSIONS} signature's exclusion input: rename the feature")
        with_exclusions = {**signature, EXCLUDE_INPUT: tf.TensorSpec([None, None], tf.string, name=EXCLUDE_INPUT)}
        self.serve = tf.function(self._serve, input_signature=[signature])
        self.serve_with_exclusions = tf.function(self._serve_with_exclusions, input_signature=[with_exclusions])
        self.embed = tf.function(self._embed, input_signature=[signature])
        self.serve_examples = tf.function(
            self._serve_examples, input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])

    def _retrieve(self, features, exclude_item_ids=None):
        """Top k for the query features; excluded: the history feature (if on) and ``exclude_item_ids``."""
        query = self.query_tower(features, training=False)
        exclude = features[self.history_feature] if self.history_feature else None
        if exclude_item_ids is not None:
            check = tf.debugging.assert_equal(tf.shape(exclude_item_ids)[0], tf.shape(query)[0],
                                              message=f"{EXCLUDE_INPUT} must have one row per query")
            with tf.control_dependencies([check]):
                exclude_item_ids = tf.identity(exclude_item_ids)
            exclude = exclude_item_ids if exclude is None else tf.concat([exclude, exclude_item_ids], axis=1)
        if self.merge is not None:  # K interests: each searched, then merged
            scores, ids = self.merge(query, k=self.k, exclude=exclude,
                                     query_mask=self.query_tower.interest_mask(features))
        else:
            scores, ids = self.retrieval_index(query, k=self.k, exclude=exclude)
        return {OUTPUT_IDS: ids, OUTPUT_SCORES: scores}

    def _serve(self, features):
        return self._retrieve(features)

    def _serve_with_exclusions(self, inputs):
        features = {name: value for name, value in inputs.items() if name != EXCLUDE_INPUT}
        return self._retrieve(features, inputs[EXCLUDE_INPUT])

    def _embed(self, features):
        out = {OUTPUT_EMBEDDING: self.query_tower(features, training=False)}
        if self.multi_interest:
            out[OUTPUT_INTEREST_MASK] = self.query_tower.interest_mask(features)
        return out

    def _serve_examples(self, examples):
        return self._retrieve(tf.io.parse_example(examples, self._parse_spec))


def candidate_checksum(ids: np.ndarray, embeddings: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update("\n".join(np.asarray(ids).astype(str)).encode("utf-8"))
    digest.update(np.ascontiguousarray(embeddings, dtype=np.float32).tobytes())
    return digest.hexdigest()


def _next_version(base: str) -> int:
    """Sequential version naming shared with the Pusher (``tfrec_recall.serving.versions``)."""
    from tfrec_recall.serving.versions import next_version
    return next_version(storage.listdir(base))


def make_index(kind: str, k: int, num_candidates: int, *, storage_dtype: str = "float32",
               ivf_lists: Optional[int] = None, ivf_probes: Optional[int] = None,
               scann_leaves: Optional[int] = None, scann_leaves_to_search: Optional[int] = None,
               target_recall: Optional[float] = DEFAULT_TARGET_RECALL,
               exact_search_below: int = EXACT_SEARCH_BELOW) -> TopKIndex:
    """An unbuilt index of ``kind`` (a registered name: ``tfrec_recall.retrievers.index_names()``) for
    ``num_candidates`` candidates, sized to the corpus where a size is not given.

    ``ivf`` or ``scann`` without any explicit size over fewer than ``exact_search_below`` candidates gives exact
    search (``BruteForce``, logged as a warning): there it is about as fast and loses no recall. Otherwise IVF
    gets 2 sqrt(n) lists and ScaNN sqrt(n) leaves; the probes / leaves searched given (or the defaults, 1 % of
    the lists, 10 % of the leaves) are where recall tuning to ``target_recall`` at k starts (``None``: no
    tuning, the given values are kept)."""
    cls = index_class(kind)
    require_positive_int("k", k)
    require_positive_int("num_candidates", num_candidates)
    require_int("exact_search_below", exact_search_below, minimum=0)
    if cls is BruteForce:
        return BruteForce(max_k=k, storage_dtype=storage_dtype)
    sizes = (ivf_lists, ivf_probes) if cls is IVF else (scann_leaves, scann_leaves_to_search)
    if cls in (IVF, ScaNN) and num_candidates < exact_search_below and all(v is None for v in sizes):
        logger.warning("make_index: %s over %d candidates (< exact_search_below=%d) falls back to exact search "
                       "(brute_force): as fast there, and recall 1", kind, num_candidates, exact_search_below)
        return BruteForce(max_k=k, storage_dtype=storage_dtype)
    if cls is IVF:
        return _corpus_sized_ivf(k, num_candidates, ivf_lists, ivf_probes, target_recall)
    if cls is ScaNN:
        return _corpus_sized_scann(k, num_candidates, scann_leaves, scann_leaves_to_search, target_recall)
    return cls(max_k=k)  # any other registered index: its own defaults


def _corpus_sized_ivf(k: int, n: int, lists: Optional[int], probes: Optional[int],
                      target_recall: Optional[float]) -> IVF:
    """2 sqrt(n) lists, 1 % of them probed (at least 12) before tuning."""
    lists = lists or max(1, min(n, int(round(2 * math.sqrt(n)))))
    probes = probes or max(12, lists // 100)
    return IVF(max_k=k, num_lists=lists, num_probes=min(probes, lists), target_recall=target_recall)


def _corpus_sized_scann(k: int, n: int, leaves: Optional[int], to_search: Optional[int],
                        target_recall: Optional[float]) -> ScaNN:
    """sqrt(n) leaves, 10 % of them searched, 100 (at least k) candidates re-scored exactly before tuning."""
    from tfrec_recall.retrievers import ScaNNConfig
    leaves = leaves or max(1, min(n, int(round(math.sqrt(n)))))
    to_search = to_search or max(1, leaves // 10)
    config = ScaNNConfig().tree(num_leaves=leaves, num_leaves_to_search=min(to_search, leaves)).reorder(max(100, k))
    return ScaNN(config, max_k=k, target_recall=target_recall)


def _candidates(model, candidates) -> Tuple[np.ndarray, np.ndarray]:
    """(ids, embeddings) from an (ids, embeddings) pair, or from an item table (a mapping of item feature
    arrays with ``item_id``) embedded by the model's candidate tower."""
    if isinstance(candidates, Mapping):
        if not hasattr(model, "candidate_tower"):
            raise TypeError("candidates as an item table needs a model with a candidate tower (e.g. a TwoTower), "
                            f"got {type(model).__name__}; pass (ids, embeddings) instead")
        from tfrec_recall.evaluation.evaluate import candidate_embeddings
        return candidate_embeddings(model.candidate_tower, candidates)
    if not (isinstance(candidates, (tuple, list)) and len(candidates) == 2):
        raise TypeError("candidates must be an (ids, embeddings) pair or an item table (a dict of item feature "
                        f"arrays with 'item_id'), got {type(candidates).__name__}")
    return np.asarray(candidates[0]).astype(str), np.asarray(candidates[1], dtype=np.float32)


def export_retrieval_model(model, candidates: Union[Tuple[Sequence[str], np.ndarray], Mapping[str, np.ndarray]], *,
                           index: Union[str, TopKIndex] = "brute_force", export_dir_base, k: int = 100,
                           version: Optional[int] = None, exclude_history: bool = True,
                           per_query_k: Optional[int] = None, diversity: float = 0.0,
                           item_categories: Optional[Mapping[str, str]] = None) -> str:
    """Exports ``model`` (a ``TwoTower`` or a query tower) with an index over ``candidates``: (ids,
    embeddings), or an item table (item feature arrays with ``item_id``, embedded by the model's candidate
    tower; the training data is not needed). An index instance that was not built yet is built over the
    candidates. Returns the version directory.

    A multi-interest query tower (K vectors per user) is served by a
    :class:`~tfrec_recall.retrievers.MultiQueryRetriever` over the index: each valid interest retrieves
    ``per_query_k`` items (None: the index's ``max_k``), merged by best score, or with ``diversity`` > 0 by
    ComiRec's greedy aggregation over ``item_categories`` (item id -> category); the manifest records K and the
    merge."""
    query_tower = getattr(model, "query_tower", model)
    if not hasattr(query_tower, "encoder"):
        raise TypeError(f"model must be a TwoTower or a tfrec_recall tower, got {type(model).__name__}")
    require_positive_int("k", k)
    ids, embeddings = _candidates(model, candidates)
    if k > len(ids):
        raise ValueError(f"k ({k}) must be <= the number of candidates ({len(ids)}): the answers would end in "
                         "empty ids")
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
    base = storage.makedirs(export_dir_base)
    merge = _merge(query_tower, index, ids, per_query_k, diversity, item_categories)
    module = RetrievalModule(query_tower, index, k, exclude_history, merge)
    with exclusive_lock(base, "export"):  # one writer picks a version at a time
        remove_stale_temporaries(base, STALE_EXPORT)
        return _save(module, model, index, ids, embeddings, base, version)


STALE_EXPORT = r"\.tmp-\d+-(?P<pid>\d+)"  # the temporary directory of an export (version, process)


def _save(module, model, index, ids, embeddings, base: str, version: Optional[int]) -> str:
    """Writes the SavedModel and its manifest as version ``version`` (None: the next) of ``base``, atomically
    (on an object store ``saved_model.pb`` is written last, which TF Serving waits for)."""
    version = _next_version(base) if version is None else version
    require_positive_int("version", version)
    final = storage.join(base, str(version))
    if storage.exists(final):
        raise FileExistsError(f"{final} exists; versions are never overwritten")
    with atomic_directory(final, storage.join(base, f".tmp-{version}-{os.getpid()}")) as tmp:
        options = tf.saved_model.SaveOptions(namespace_whitelist=["Scann"] if isinstance(index, ScaNN) else None)
        tf.saved_model.save(module, tmp, signatures={SIGNATURE_DEFAULT: module.serve,
                                                     SIGNATURE_EXCLUSIONS: module.serve_with_exclusions,
                                                     SIGNATURE_EXAMPLES: module.serve_examples,
                                                     SIGNATURE_EMBEDDING: module.embed}, options=options)
        storage.makedirs(storage.join(tmp, "assets"))
        storage.write_json(storage.join(tmp, "assets", MANIFEST), _manifest(model, module, ids, embeddings))
    return final


def _merge(query_tower, index: TopKIndex, ids: np.ndarray, per_query_k: Optional[int], diversity: float,
           item_categories: Optional[Mapping[str, str]]) -> Optional[MultiQueryRetriever]:
    """The multi-query merge of a multi-interest tower (None for a single-vector one; its options refused)."""
    if not getattr(query_tower, "multi_interest", False):
        if per_query_k is not None or diversity or item_categories is not None:
            raise ValueError("per_query_k, diversity and item_categories apply to a multi-interest query tower "
                             f"only, got {type(query_tower).__name__}")
        return None
    merge = MultiQueryRetriever(index, per_query_k=per_query_k, diversity=diversity)
    if item_categories is not None:
        missing = [i for i in ids if i not in item_categories]
        if missing:
            raise ValueError(f"item_categories has no category for {len(missing)} candidates, e.g. {missing[0]!r}")
        merge.set_categories(ids, np.array([str(item_categories[i]) for i in ids]))
    elif diversity:
        raise ValueError(f"diversity={diversity} needs item_categories (item id -> category)")
    return merge


def signature_manifest(query_tower) -> Dict[str, dict]:
    """Each exported signature's inputs (name -> dtype and shape, None = any) and outputs."""
    features = {name: {"dtype": s.dtype.name, "shape": s.shape.as_list()}
                for name, s in input_signature(query_tower).items()}
    top_k = {OUTPUT_IDS: "[batch, k] string", OUTPUT_SCORES: "[batch, k] float32"}
    embedding = {OUTPUT_EMBEDDING: "[batch, dim] float32"}
    if getattr(query_tower, "multi_interest", False):
        embedding = {OUTPUT_EMBEDDING: f"[batch, {query_tower.num_interests}, dim] float32",
                     OUTPUT_INTEREST_MASK: f"[batch, {query_tower.num_interests}] bool"}
    return {
        SIGNATURE_DEFAULT: {"inputs": features, "outputs": top_k},
        SIGNATURE_EXCLUSIONS: {"inputs": {**features, EXCLUDE_INPUT: {"dtype": "string", "shape": [None, None]}},
                               "outputs": top_k},
        SIGNATURE_EXAMPLES: {"inputs": {EXAMPLES_INPUT: {"dtype": "string", "shape": [None]}}, "outputs": top_k},
        SIGNATURE_EMBEDDING: {"inputs": features, "outputs": embedding},
    }


def _manifest(model, module: RetrievalModule, ids: np.ndarray, embeddings: np.ndarray) -> dict:
    index, query_tower = module.retrieval_index, module.query_tower
    return {
        "model_type": type(model).__name__,
        "query_tower": type(query_tower).__name__,
        "index": index.parameters(),
        "index_recall": index.recall_report(),
        "k": module.k,
        "candidate_count": int(len(ids)),
        "embedding_dimension": int(embeddings.shape[1]),
        "candidate_checksum_sha256": candidate_checksum(ids, embeddings),
        "exclude_history_feature": module.history_feature,
        "num_interests": int(getattr(query_tower, "num_interests", 1)),
        "merge": None if module.merge is None else module.merge.parameters(),
        "exclusion_input": {"signature": SIGNATURE_EXCLUSIONS, "input": EXCLUDE_INPUT},
        "signatures": signature_manifest(query_tower),
        "inputs": {name: {"dtype": s.dtype.name, "shape": s.shape.as_list()}
                   for name, s in input_signature(query_tower).items()},
        "outputs": {OUTPUT_IDS: "[batch, k] string", OUTPUT_SCORES: "[batch, k] float32",
                    **{name: f"{shape} (signature query_embedding)"
                       for name, shape in signature_manifest(query_tower)[SIGNATURE_EMBEDDING]["outputs"].items()}},
        "requires_custom_ops": ["Scann"] if isinstance(index, ScaNN) else [],
        "versions": {"tfrec_recall": tfrec_recall.__version__, "tensorflow": tf.__version__,
                     "python": sys.version.split()[0]},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def export_candidates(ids: Sequence[str], embeddings: np.ndarray, out_dir) -> str:
    """Candidate ids and embeddings for external ANN systems: ``ids.npy`` (unicode array), ``embeddings.npy``
    (float32 [n, d]) and ``candidates.tfrecord`` (tf.Example with ``id`` bytes and ``embedding`` floats).
    Written to a temporary directory and renamed."""
    ids = np.asarray(ids).astype(str)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or len(ids) != len(embeddings):
        raise ValueError(f"need one id per embedding row, got {len(ids)} ids and embeddings {embeddings.shape}")
    out = storage.path_str(out_dir)
    if storage.exists(out):
        raise FileExistsError(f"{out} exists; refusing to overwrite")
    with atomic_directory(out) as tmp:
        for name, array in (("ids.npy", ids), ("embeddings.npy", embeddings)):
            with storage.gfile().GFile(storage.join(tmp, name), "wb") as f:
                np.save(f, array)
        with tf.io.TFRecordWriter(storage.join(tmp, "candidates.tfrecord")) as writer:
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
    proto.ParseFromString(storage.read_bytes(storage.join(export_dir, "saved_model.pb")))
    ops = set()
    for meta in proto.meta_graphs:
        ops.update(node.op for node in meta.graph_def.node)
        for function in meta.graph_def.library.function:
            ops.update(node.op for node in function.node_def)
    return ops
