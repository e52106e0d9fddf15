"""Top-k indexes: exact search against NumPy, recall of the approximate ones, exclusions, the registry of index
names (and the command lines offering it), Keras config / serialization round trips, SavedModel round trips,
building once, argument validation and the index format version."""
import argparse
import inspect
import json

import numpy as np
import pytest
import tensorflow as tf

from tfrec_recall.retrievers import (INDEX_FORMAT_VERSION, IVF, BruteForce, ScaNN, ScaNNConfig, TopKIndex,
                                check_saved_format_version, index_class, index_names, register_index)
from tfrec_recall.retrievers import base


def clustered_candidates(n=3000, d=16, clusters=30, seed=0):
    """``n`` L2-normalised vectors around ``clusters`` centres, with ids ``c0``, ``c1``, ..."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d))
    x = centers[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return np.array([f"c{i}" for i in range(n)]), x


def _recall(exact_ids, got_ids):
    return np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(exact_ids, got_ids)])


# One small index of every registered type, with non-default arguments (so the config round trip shows them).
FACTORIES = {
    "brute_force": lambda: BruteForce(max_k=12, storage_dtype="float16", name="bf"),
    "ivf": lambda: IVF(max_k=12, num_lists=8, num_probes=3, kmeans_iterations=5, kmeans_sample_size=150,
                       capacity_factor=1.25, seed=7, progress=False),
    "scann": lambda: ScaNN(ScaNNConfig().tree(num_leaves=8, num_leaves_to_search=4, training_iterations=6)
                           .score_ah(2, anisotropic_quantization_threshold=0.1).reorder(30), max_k=12),
}


# ScaNN's tree training (random initialisation) differs from build to build, so two ScaNN builds agree exactly
# only when the search is exact in effect: every leaf searched and 100 of 200 candidates re-scored exactly.
REBUILD_FACTORIES = {**FACTORIES, "scann": lambda: ScaNN(
    ScaNNConfig().tree(num_leaves=8, num_leaves_to_search=8, training_iterations=6).reorder(100), max_k=12)}


@pytest.fixture(scope="module")
def small_corpus():
    ids, x = clustered_candidates(n=200, d=8, clusters=10, seed=1)
    return ids, x, x[:6] + 0.05


def _answers(index, queries, k=10):
    scores, ids = index(tf.constant(queries), k=k)
    return scores.numpy(), ids.numpy()


# -- search results --------------------------------------------------------------------------------------------
def test_indexes_against_exact_search_and_exclusions():
    ids, x = clustered_candidates()
    queries = x[:40] + 0.05
    exact = np.argsort(-(queries @ x.T), axis=1)[:, :10]
    exact_ids = ids[exact]
    bf = BruteForce(max_k=20).index(ids, x)
    scores, got = bf(queries, k=10)
    np.testing.assert_array_equal(got.numpy().astype(str), exact_ids)
    np.testing.assert_allclose(scores.numpy(), np.take_along_axis(queries @ x.T, exact, 1), rtol=1e-5)
    for index, floor in ((BruteForce(max_k=20, storage_dtype="float16"), 0.95),
                         (BruteForce(max_k=20, storage_dtype="bfloat16"), 0.85),
                         (IVF(max_k=20, num_lists=32, num_probes=8), 0.95),
                         (ScaNN(ScaNNConfig().tree(num_leaves=50, num_leaves_to_search=20), max_k=20), 0.9)):
        _, got = index.index(ids, x)(queries, k=10)
        assert _recall(exact_ids, got.numpy().astype(str)) >= floor, type(index).__name__
    # Exclusions: the best item of each query is excluded; every other result stays, in order.
    exclude = tf.constant(np.stack([exact_ids[:, 0], np.full(40, "")], axis=1))
    _, got = bf(queries, k=9, exclude=exclude)
    np.testing.assert_array_equal(got.numpy().astype(str), exact_ids[:, 1:10])
    # k larger than the corpus: the tail is padded.
    small = BruteForce(max_k=5).index(ids[:3], x[:3])
    scores, got = small(queries[:2], k=5)
    assert got.numpy()[0, 3:].tolist() == [b"", b""] and np.isneginf(scores.numpy()[0, 3:]).all()


@pytest.mark.parametrize("k", [1, 7, 25])
def test_brute_force_equals_numpy_exact_top_k_with_ties(k):
    rng = np.random.default_rng(5)
    base_x = rng.normal(size=(120, 6)).astype(np.float32)
    x = np.concatenate([base_x, base_x[:30]])  # 30 exact duplicates: tied scores
    ids = np.array([f"i{i}" for i in range(len(x))])
    queries = rng.normal(size=(9, 6)).astype(np.float32)
    scores, got = _answers(BruteForce(max_k=25).index(ids, x), queries, k=k)
    exact = queries @ x.T
    reference = -np.sort(-exact, axis=1)[:, :k]
    np.testing.assert_allclose(scores, reference, rtol=1e-5, atol=1e-5)
    rows = {name: row for row, name in enumerate(ids)}
    for q in range(len(queries)):
        got_rows = np.array([rows[i.decode()] for i in got[q]])
        assert len(set(got_rows)) == k  # no candidate twice
        np.testing.assert_allclose(exact[q, got_rows], scores[q], rtol=1e-5, atol=1e-5)
        for j, score in enumerate(reference[q]):  # where the score is distinct, the id is the reference's
            tied = np.flatnonzero(np.abs(exact[q] - score) <= 1e-5)
            if len(tied) == 1:
                assert got_rows[j] == tied[0], (q, j)


# -- the registry -----------------------------------------------------------------------------------------------
def _index_choices(parser: argparse.ArgumentParser) -> list:
    return [list(action.choices) for action in parser._actions if action.dest == "index"]


def test_registry_lists_the_indexes_and_the_command_lines_offer_exactly_them():
    assert index_names() == ("brute_force", "ivf", "scann") == tuple(sorted(FACTORIES))
    assert [index_class(name) for name in index_names()] == [BruteForce, IVF, ScaNN]
    with pytest.raises(ValueError, match=r"index must be one of \['brute_force', 'ivf', 'scann'\], got 'hnsw'"):
        index_class("hnsw")
    from tfrec_recall import cli
    export = [a for a in cli._parser()._actions if a.dest == "command"][0].choices["export"]
    # plus Deep Retrieval's index, which a run trained with deep_retrieval: true carries (not built from embeddings)
    from tfrec_recall.export.run_index import DEEP_RETRIEVAL
    assert _index_choices(export) == [list(index_names()) + [DEEP_RETRIEVAL]]
    assert export.parse_args(["--model-dir", "m", "--export-dir-base", "e", "--index", "ivf"]).index == "ivf"
    from pipelines import cli as pipeline_cli
    root = argparse.ArgumentParser()
    pipeline_cli.register(root.add_subparsers(dest="command"))
    pipeline = [a for a in root._actions if a.dest == "command"][0].choices["pipeline"]
    for name, sub in [a for a in pipeline._actions if isinstance(a.choices, dict)][0].choices.items():
        assert _index_choices(sub) == [list(index_names()) + [DEEP_RETRIEVAL]], name
    from pipelines import pipeline as pipeline_module
    assert not hasattr(pipeline_module, "INDEXES")  # create_pipeline checks against the registry


def test_registering_a_name_twice_raises_and_changes_nothing():
    class Other(BruteForce):
        pass

    with pytest.raises(ValueError, match=r"index name 'ivf' is already registered \(by IVF\)"):
        register_index("ivf")(Other)
    with pytest.raises(ValueError, match=r"index name must be a non-empty string, got ''"):
        register_index("")
    assert index_names() == ("brute_force", "ivf", "scann") and index_class("ivf") is IVF


def test_top_k_index_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        TopKIndex()

    class NoSearch(TopKIndex):
        def _build_index(self, embeddings):
            pass

    with pytest.raises(TypeError, match="_search"):
        NoSearch()


# -- configs, serialization, saving -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_config_round_trip_gives_an_unbuilt_index_with_the_same_results(name, small_corpus):
    ids, x, queries = small_corpus
    index = REBUILD_FACTORIES[name]()
    config = index.get_config()
    arguments = [p for p in inspect.signature(type(index).__init__).parameters if p not in ("self", "kwargs")]
    assert set(arguments) <= set(config) and config["format_version"] == INDEX_FORMAT_VERSION
    json.dumps(config)  # plain JSON values only
    clone = type(index).from_config(config)
    assert type(clone) is type(index) and clone.get_config() == config and clone.ids is None
    expected_scores, expected_ids = _answers(index.index(ids, x), queries)
    scores, got = _answers(clone.index(ids, x), queries)
    np.testing.assert_array_equal(got, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)
    assert index.get_config() == config  # building does not change the config


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_keras_serialization_round_trip(name):
    index = FACTORIES[name]()
    cls = type(index)
    assert tf.keras.utils.get_registered_name(cls) == f"tfrec_recall>{cls.__name__}"
    serialized = tf.keras.utils.serialize_keras_object(index)
    assert serialized["registered_name"] == f"tfrec_recall>{cls.__name__}"
    restored = tf.keras.utils.deserialize_keras_object(json.loads(json.dumps(serialized)))
    assert type(restored) is cls and restored.get_config() == index.get_config() and restored.ids is None


def _save(index, path, dim):
    module = tf.Module()
    module.index = index
    module.search = tf.function(lambda q: index(q, k=10), input_signature=[tf.TensorSpec([None, dim], tf.float32)])
    options = tf.saved_model.SaveOptions(namespace_whitelist=["Scann"] if isinstance(index, ScaNN) else None)
    tf.saved_model.save(module, str(path), options=options)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_saved_and_reloaded_index_answers_the_same(name, small_corpus, tmp_path):
    ids, x, queries = small_corpus
    index = FACTORIES[name]().index(ids, x)
    expected_scores, expected_ids = _answers(index, queries)
    _save(index, tmp_path / "saved", x.shape[1])
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    check_saved_format_version(loaded.index)
    assert int(loaded.index.index_format_version.numpy()) == INDEX_FORMAT_VERSION
    scores, got = loaded.search(tf.constant(queries))
    np.testing.assert_array_equal(got.numpy(), expected_ids)
    np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=1e-6)


def test_format_version_mismatch_is_refused(small_corpus, tmp_path, monkeypatch):
    ids, x, _ = small_corpus
    config = BruteForce(max_k=5).get_config()
    with pytest.raises(ValueError, match=rf"the BruteForce config has index format version 2, but this tfrec_recall "
                                         rf"reads index format version {INDEX_FORMAT_VERSION}"):
        BruteForce.from_config({**config, "format_version": 2})
    serialized = tf.keras.utils.serialize_keras_object(IVF(num_lists=4, num_probes=2))
    serialized["config"]["format_version"] = 0
    with pytest.raises(ValueError, match=rf"IVF config has index format version 0, .* version {INDEX_FORMAT_VERSION}"):
        tf.keras.utils.deserialize_keras_object(serialized)
    with pytest.raises(ValueError, match=r"config has index format version None"):
        BruteForce.from_config({k: v for k, v in config.items() if k != "format_version"})
    # A SavedModel written by (simulated) format version 2 does not load as this version's index.
    monkeypatch.setattr(base, "INDEX_FORMAT_VERSION", 2)
    _save(BruteForce(max_k=10).index(ids, x), tmp_path / "v2", x.shape[1])
    monkeypatch.undo()
    loaded = tf.saved_model.load(str(tmp_path / "v2"))
    with pytest.raises(ValueError, match=rf"the saved index has index format version 2, but this tfrec_recall reads "
                                         rf"index format version {INDEX_FORMAT_VERSION}"):
        check_saved_format_version(loaded.index)
    with pytest.raises(ValueError, match=rf"records no index format version, .* version {INDEX_FORMAT_VERSION}"):
        check_saved_format_version(tf.Module())


# -- building once, validation -------------------------------------------------------------------------------
def test_an_index_is_built_once(small_corpus):
    ids, x, queries = small_corpus
    index = BruteForce(max_k=5, name="once").index(ids, x)
    with pytest.raises(ValueError, match=r"BruteForce 'once' is already built over 200 candidates; an index is "
                                         r"built once"):
        index.index(ids[:10], x[:10])
    assert index.num_candidates == 200 and _answers(index, queries, k=5)[1].shape == (6, 5)
    failed = IVF(num_lists=64, num_probes=4)
    with pytest.raises(ValueError, match=r"num_lists \(64\) must be <= the number of candidates \(50\)"):
        failed.index(ids[:50], x[:50])
    assert failed.ids is None and failed.num_candidates == 0  # a failed build leaves the index unbuilt
    with pytest.raises(ValueError, match=r"call index\(ids, embeddings\) before querying"):
        failed(queries)


def test_index_validation_errors():
    ids, x = clustered_candidates(n=50)
    with pytest.raises(ValueError, match=r"k must be <= max_k \(10\), got 20"):
        BruteForce(max_k=10).index(ids, x)(x[:1], k=20)
    with pytest.raises(ValueError, match=r"call index\(ids, embeddings\) before querying"):
        BruteForce()(x[:1])
    with pytest.raises(ValueError, match=r"storage_dtype must be one of .* got 'int8'"):
        BruteForce(storage_dtype="int8")
    with pytest.raises(ValueError, match=r"ids must be 1-D with one id per embedding row \(50\)"):
        BruteForce().index(ids[:10], x)
    bad = x.copy()
    bad[7, 0] = np.nan
    with pytest.raises(ValueError, match=r"embeddings row 7 \(id 'c7'\) is not finite"):
        BruteForce().index(ids, bad)
    with pytest.raises(ValueError, match=r"num_probes must be <= num_lists \(4\), got 8"):
        IVF(num_lists=4, num_probes=8)
    with pytest.raises(ValueError, match=r"num_lists \(64\) must be <= the number of candidates \(50\)"):
        IVF(num_lists=64, num_probes=4).index(ids, x)
    with pytest.raises(ValueError, match=r"ScaNNConfig.num_leaves_to_search must be <= num_leaves \(10\), got 20"):
        ScaNNConfig().tree(num_leaves=10, num_leaves_to_search=20)
    with pytest.raises(ValueError, match=r"ScaNNConfig.dimensions_per_block must be a positive integer, got 0"):
        ScaNNConfig().score_ah(0)
    with pytest.raises(ValueError, match=r"ScaNNConfig.num_leaves \(1000\) must be <= the number of candidates"):
        ScaNN().index(ids, x)


@pytest.mark.parametrize("make, message", [
    (lambda: BruteForce(max_k=0), r"max_k must be a positive integer, got 0"),
    (lambda: BruteForce(max_k=2.5), r"max_k must be a positive integer, got 2.5"),
    (lambda: BruteForce(max_k=True), r"max_k must be a positive integer, got True"),
    (lambda: BruteForce(storage_dtype=None), r"storage_dtype must be one of .*, got None"),
    (lambda: BruteForce(storage_dtype=["float32"]), r"storage_dtype must be one of .*, got \['float32'\]"),
    (lambda: IVF(max_k=-1), r"max_k must be a positive integer, got -1"),
    (lambda: IVF(num_lists=0), r"num_lists must be a positive integer, got 0"),
    (lambda: IVF(num_probes=-3), r"num_probes must be a positive integer, got -3"),
    (lambda: IVF(kmeans_iterations=0), r"kmeans_iterations must be a positive integer, got 0"),
    (lambda: IVF(kmeans_sample_size="many"), r"kmeans_sample_size must be a positive integer, got 'many'"),
    (lambda: IVF(capacity_factor=0.5), r"capacity_factor must be a finite number >= 1, got 0.5"),
    (lambda: IVF(capacity_factor=float("nan")), r"capacity_factor must be a finite number >= 1, got nan"),
    (lambda: IVF(capacity_factor=float("inf")), r"capacity_factor must be a finite number >= 1, got inf"),
    (lambda: IVF(capacity_factor="2"), r"capacity_factor must be a finite number >= 1, got '2'"),
    (lambda: IVF(seed=-1), r"seed must be an integer >= 0, got -1"),
    (lambda: IVF(seed=1.5), r"seed must be an integer >= 0, got 1.5"),
    (lambda: IVF(progress="yes"), r"progress must be a bool, got 'yes'"),
    (lambda: ScaNN(config={"num_leaves": 4}), r"config must be a ScaNNConfig, got \{'num_leaves': 4\} \(dict\)"),
    (lambda: ScaNN(max_k=0), r"max_k must be a positive integer, got 0"),
    (lambda: ScaNNConfig(num_leaves=0), r"ScaNNConfig.num_leaves must be a positive integer, got 0"),
    (lambda: ScaNNConfig(anisotropic_quantization_threshold="0.2"),
     r"ScaNNConfig.anisotropic_quantization_threshold must be in \[0, 1\), got '0.2'"),
    (lambda: ScaNNConfig().reorder(0), r"ScaNNConfig.num_reordering_candidates must be a positive integer, got 0"),
])
def test_bad_constructor_arguments_raise_naming_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# -- variable-width exclusions (the export's serve_with_exclusions signature) ---------------------------------
def _numpy_top_k_excluding(queries, ids, x, exclude, k):
    """Exact top-k ids per query over the candidates not in that query's exclusion row."""
    scores = queries @ x.T
    out = []
    for q, row in enumerate(exclude):
        s = np.where(np.isin(ids, [i for i in row if i]), -np.inf, scores[q])
        order = np.argsort(-s, kind="stable")[:k]
        out.append([ids[i] if np.isfinite(s[i]) else "" for i in order])
    return np.array(out)


def _wide_exclusions(queries, ids, x, widths, seed=0):
    """Per query: its best ``width`` candidates (so they would fill the top k), an unknown id and padding."""
    rng = np.random.default_rng(seed)
    best = ids[np.argsort(-(queries @ x.T), axis=1)]
    rows = [list(best[q, :w]) + ["not-a-candidate"] for q, w in enumerate(widths)]
    for row in rows:
        rng.shuffle(row)
    width = max(len(r) for r in rows) + 3
    return np.array([r + [""] * (width - len(r)) for r in rows], dtype=object)


@pytest.mark.parametrize("kind", ["brute_force", "ivf_exhaustive", "scann"])
def test_variable_width_exclusions_longer_than_k_never_crowd_the_top_k(small_corpus, kind):
    ids, x, _ = small_corpus
    queries = x[:5] + 0.05
    index = {"brute_force": lambda: BruteForce(max_k=10),
             "ivf_exhaustive": lambda: IVF(max_k=10, num_lists=8, num_probes=8, kmeans_iterations=3),
             "scann": lambda: ScaNN(ScaNNConfig().tree(num_leaves=8, num_leaves_to_search=8).reorder(200),
                                    max_k=10)}[kind]().index(ids, x)
    assert index.search_depths(10) == (10, 20, 40, 80, 160, 200)
    search = tf.function(lambda q, e: index(q, k=10, exclude=e),
                         input_signature=[tf.TensorSpec([None, 8], tf.float32), tf.TensorSpec([None, None], tf.string)])
    # Widths 0 .. 195 (> k): every branch from depth k up to the whole corpus; the last row leaves 5 items.
    for widths in ([0, 3, 15, 35, 70], [150, 195, 12, 0, 60]):
        exclude = _wide_exclusions(queries, ids, x, widths)
        scores, got = search(tf.constant(queries), tf.constant(exclude))
        got = got.numpy().astype(str)
        for q, row in enumerate(exclude):
            assert not set(got[q]) & (set(row) - {""}), (kind, widths[q])
        expected = _numpy_top_k_excluding(queries, ids, x, exclude, 10)
        if kind == "scann":  # approximate scoring: the excluded never return and k valid ids remain
            assert all((got[q] != "").sum() == min(10, 200 - widths[q]) for q in range(5)), got
        else:
            np.testing.assert_array_equal(got, expected)
            assert np.isneginf(scores.numpy()[expected == ""]).all()


def test_bad_exclusions_name_the_argument(small_corpus):
    ids, x, queries = small_corpus
    index = BruteForce(max_k=5).index(ids, x)
    with pytest.raises(ValueError, match=r"exclude must hold string ids, got dtype float64"):
        index(queries, k=5, exclude=np.ones((6, 2)))
    with pytest.raises(ValueError, match=r"exclude must be a string tensor of item ids, got dtype int32"):
        index(queries, k=5, exclude=tf.ones((6, 2), tf.int32))
    with pytest.raises(ValueError, match=r"exclude must be \[batch, num_excluded\] \(rank 2\), got shape \(6,\)"):
        index(queries, k=5, exclude=tf.constant(["c1"] * 6))
    with pytest.raises(ValueError, match=r"exclude has 2 rows but there are 6 queries"):
        index(queries, k=5, exclude=[["c1"], ["c2"]])


def test_every_retriever_implements_the_retriever_interface():
    """Evaluation and recommend accept any Retriever: the indexes and the multi-query retriever are ones, and
    report whether they are built and how many candidates they search."""
    from tfrec_recall.retrievers import MultiQueryRetriever, Retriever
    ids, embeddings = clustered_candidates(200, 8, seed=3)
    for index in (BruteForce(max_k=5), IVF(max_k=5, num_lists=4, num_probes=4, target_recall=None)):
        multi = MultiQueryRetriever(index)
        assert isinstance(index, Retriever) and isinstance(multi, Retriever)
        assert not index.is_built and not multi.is_built
        index.index(ids, embeddings)
        assert index.is_built and multi.is_built and index.corpus_size == multi.corpus_size == 200
    with pytest.raises(TypeError, match="abstract"):
        Retriever()
