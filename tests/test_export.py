"""The TF Serving export: same results after reload, stock ops only for brute force and IVF, ScaNN reloaded in
a fresh process that imports scann, atomic versions, manifest, candidate export. (The indexes themselves are
tested in tests/test_index.py.)"""
from pathlib import Path
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tfrec_recall.export import (candidate_checksum, export_candidates, export_retrieval_model, saved_model_ops)
from tfrec_recall.retrievers import INDEX_FORMAT_VERSION, IVF, BruteForce, ScaNN, ScaNNConfig, check_saved_format_version
from tests.test_index import clustered_candidates


@pytest.fixture(scope="module")
def exported_model(tiny_model, small_split):
    from tfrec_recall.features import feature_arrays
    model, items, embeddings = tiny_model
    features = feature_arrays(small_split.test.head(12), small_split.data, model.query_tower.encoder.specs)
    return model, items, embeddings, features


def _expected(model, index, features, k):
    tensors = {name: tf.constant(v) for name, v in features.items()}
    scores, ids = index(model.query_tower(tensors), k=k, exclude=tensors["history"])
    return scores.numpy(), ids.numpy()


@pytest.mark.parametrize("kind", ["brute_force", "ivf"])
def test_stock_op_exports_reload_with_same_results(tmp_path, exported_model, kind):
    model, items, embeddings, features = exported_model
    index = BruteForce(max_k=20) if kind == "brute_force" else IVF(max_k=20, num_lists=16, num_probes=16)
    path = export_retrieval_model(model, (items, embeddings), index=index, export_dir_base=tmp_path / "m", k=20)
    assert path == str(tmp_path / "m" / "1")
    expected_scores, expected_ids = _expected(model, index, features, 20)
    loaded = tf.saved_model.load(str(path))
    assert set(loaded.signatures) == {"serving_default", "serve_with_exclusions", "serve_examples",
                                      "query_embedding"}
    tensors = {name: tf.constant(v) for name, v in features.items()}
    out = loaded.signatures["serving_default"](**tensors)
    assert set(out) == {"item_ids", "scores"} and out["item_ids"].dtype == tf.string
    np.testing.assert_array_equal(out["item_ids"].numpy(), expected_ids)
    np.testing.assert_allclose(out["scores"].numpy(), expected_scores, rtol=1e-5)
    history = features["history"].astype(str)
    for row in range(len(history)):  # the user's history items are never returned
        assert not set(out["item_ids"].numpy()[row].astype(str)) & (set(history[row]) - {""})
    examples = [_example(features, row) for row in range(len(history))]
    via_examples = loaded.signatures["serve_examples"](examples=tf.constant(examples))
    np.testing.assert_array_equal(via_examples["item_ids"].numpy(), expected_ids)
    embedding = loaded.signatures["query_embedding"](**tensors)["query_embedding"].numpy()
    np.testing.assert_allclose(embedding, model.query_tower(tensors).numpy(), rtol=1e-5, atol=1e-6)
    # Only TensorFlow's own registered ops, none of ScaNN's.
    from tensorflow.python.framework import op_def_registry
    ops = saved_model_ops(path)
    assert not any(op.startswith("Scann") for op in ops)
    assert all(op_def_registry.get(op) is not None for op in ops), sorted(o for o in ops if not op_def_registry.get(o))
    manifest = json.loads((Path(path) / "assets" / "manifest.json").read_text())
    assert manifest["index"]["type"] == ("BruteForce" if kind == "brute_force" else "IVF")
    assert manifest["index"]["format_version"] == INDEX_FORMAT_VERSION
    check_saved_format_version(loaded.retrieval_index)
    assert manifest["candidate_count"] == len(items) and manifest["embedding_dimension"] == 16
    assert manifest["candidate_checksum_sha256"] == candidate_checksum(items, embeddings)
    assert manifest["versions"]["tensorflow"] == tf.__version__ and manifest["requires_custom_ops"] == []
    assert set(manifest["signatures"]) == set(loaded.signatures)
    assert manifest["signatures"]["serve_with_exclusions"]["inputs"]["exclude_item_ids"] == {
        "dtype": "string", "shape": [None, None]}
    assert manifest["exclusion_input"] == {"signature": "serve_with_exclusions", "input": "exclude_item_ids"}
    # The next export is version 2; an existing version is never overwritten.
    assert export_retrieval_model(model, (items, embeddings), export_dir_base=tmp_path / "m", k=5).endswith("/2")
    with pytest.raises(FileExistsError, match="versions are never overwritten"):
        export_retrieval_model(model, (items, embeddings), export_dir_base=tmp_path / "m", k=5, version=1)


def _example(features, row):
    feature = {}
    for name, values in features.items():
        value = np.reshape(values[row], [-1])
        if value.dtype.kind == "f":
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=value.tolist()))
        else:
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(v).encode() for v in value]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _numpy_served(model, items, embeddings, features, exclude, k):
    """NumPy brute force: the best k candidates outside each query's history and exclusion row."""
    queries = model.query_tower({n: tf.constant(v) for n, v in features.items()}).numpy()
    scores = queries @ embeddings.T
    ids, top = [], []
    for q in range(len(queries)):
        gone = (set(features["history"][q].astype(str)) | set(exclude[q])) - {""}
        s = np.where(np.isin(items.astype(str), list(gone)), -np.inf, scores[q])
        order = np.argsort(-s, kind="stable")[:k]
        ids.append([str(items[i]) if np.isfinite(s[i]) else "" for i in order])
        top.append(s[order])
    return np.array(ids), np.array(top)


@pytest.fixture(scope="module")
def exclusion_export(tmp_path_factory, exported_model):
    model, items, embeddings, features = exported_model
    path = export_retrieval_model(model, (items, embeddings), index=BruteForce(max_k=10),
                                  export_dir_base=tmp_path_factory.mktemp("exclusions"), k=10)
    return path, tf.saved_model.load(str(path))


def test_serve_with_exclusions_excludes_every_listed_id(exclusion_export, exported_model):
    model, items, embeddings, features = exported_model
    _, loaded = exclusion_export
    tensors = {name: tf.constant(v) for name, v in features.items()}
    queries = model.query_tower(tensors).numpy()
    best = items.astype(str)[np.argsort(-(queries @ embeddings.T), axis=1)]
    width = features["history"].shape[1]  # 10, like k: the lists below are longer than both
    sizes = [0, 5, 25, 60, 190] + [12] * (len(queries) - 5)
    exclude = [list(best[q, :n]) + ["not-an-item"] for q, n in enumerate(sizes)]
    padded = np.array([row + [""] * (max(map(len, exclude)) - len(row)) for row in exclude], dtype=object)
    assert padded.shape[1] > max(width, 10)
    out = loaded.signatures["serve_with_exclusions"](**tensors, exclude_item_ids=tf.constant(padded))
    got = out["item_ids"].numpy().astype(str)
    for q, row in enumerate(exclude):
        assert not set(got[q]) & (set(row) | set(features["history"][q].astype(str))) - {""}, q
    expected_ids, expected_scores = _numpy_served(model, items, embeddings, features, exclude, 10)
    np.testing.assert_array_equal(got, expected_ids)
    finite = np.isfinite(expected_scores)
    np.testing.assert_allclose(out["scores"].numpy()[finite], expected_scores[finite], rtol=1e-5, atol=1e-6)
    # No exclusions (width 0) gives what the old signature gives; the old signature is unchanged.
    none = loaded.signatures["serve_with_exclusions"](**tensors, exclude_item_ids=tf.zeros([len(queries), 0],
                                                                                           tf.string))
    old = loaded.signatures["serving_default"](**tensors)
    np.testing.assert_array_equal(none["item_ids"].numpy(), old["item_ids"].numpy())
    expected_old, _ = _numpy_served(model, items, embeddings, features, [[]] * len(queries), 10)
    np.testing.assert_array_equal(old["item_ids"].numpy().astype(str), expected_old)


def test_serve_with_exclusions_refuses_bad_exclusions(exclusion_export, exported_model):
    """TensorFlow's signature wrapper refuses a wrong dtype or rank by input position (the server names the
    input: tests/test_serving.py); a batch mismatch is caught in the graph with a message."""
    features = exported_model[3]
    _, loaded = exclusion_export
    signature = loaded.signatures["serve_with_exclusions"]
    tensors = {name: tf.constant(v) for name, v in features.items()}
    n = len(features["history"])
    for bad in (tf.ones([n, 3], tf.float32), tf.constant(["a"] * n)):  # wrong dtype, wrong rank
        with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
            signature(**tensors, exclude_item_ids=bad)
    with pytest.raises(tf.errors.InvalidArgumentError, match="exclude_item_ids must have one row per query"):
        signature(**tensors, exclude_item_ids=tf.constant([["a"]] * (n + 1)))


def test_scann_export_reloads_in_a_fresh_process(tmp_path, exported_model):
    model, items, embeddings, features = exported_model
    index = ScaNN(ScaNNConfig().tree(num_leaves=10, num_leaves_to_search=10).reorder(50), max_k=10)
    path = export_retrieval_model(model, (items, embeddings), index=index, export_dir_base=tmp_path / "s", k=10)
    assert any(op.startswith("Scann") for op in saved_model_ops(path))
    assert json.loads((Path(path) / "assets" / "manifest.json").read_text())["requires_custom_ops"] == ["Scann"]
    _, expected_ids = _expected(model, index, features, 10)
    np.savez(tmp_path / "features.npz", **{k: np.asarray(v).astype(str) if v.dtype == object else v
                                           for k, v in features.items()})
    script = textwrap.dedent(f"""
        import os
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        import numpy as np
        import scann  # registers the ScaNN ops before loading
        import tensorflow as tf
        data = np.load({str(tmp_path / 'features.npz')!r})
        loaded = tf.saved_model.load({str(path)!r})
        out = loaded.signatures["serving_default"](**{{k: tf.constant(data[k]) for k in data.files}})
        np.save({str(tmp_path / 'ids.npy')!r}, out["item_ids"].numpy().astype(str))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "ids.npy"), expected_ids.astype(str))


def test_failed_export_leaves_nothing(tmp_path, exported_model, monkeypatch):
    model, items, embeddings, _ = exported_model

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        export_retrieval_model(model, (items, embeddings), export_dir_base=tmp_path / "m", k=5)
    assert list((tmp_path / "m").iterdir()) == []


def test_export_validation(tmp_path, exported_model):
    model, items, embeddings, _ = exported_model
    with pytest.raises(ValueError, match=r"index must be a TopKIndex or one of .* got 'hnsw'"):
        export_retrieval_model(model, (items, embeddings), index="hnsw", export_dir_base=tmp_path, k=5)
    with pytest.raises(ValueError, match=r"k \(50\) must be <= the index's max_k \(10\)"):
        export_retrieval_model(model, (items, embeddings), index=BruteForce(max_k=10), export_dir_base=tmp_path,
                               k=50)
    n = len(items)
    with pytest.raises(ValueError, match=rf"k \({n + 1}\) must be <= the number of candidates \({n}\)"):
        export_retrieval_model(model, (items, embeddings), export_dir_base=tmp_path, k=n + 1)


def test_concurrent_exports_to_one_base_are_refused_and_leftovers_removed(tmp_path, exported_model):
    """A second export to a base another export is writing to fails at once with a clear error (an exclusive
    lock on the base); the temporary directory a killed export left is removed by the next export."""
    from tfrec_recall._atomic import exclusive_lock
    model, items, embeddings, _ = exported_model
    base = tmp_path / "m"
    base.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (base / f".tmp-1-{dead.pid}").mkdir()  # what a SIGKILLed export leaves
    with exclusive_lock(base, "export"):
        with pytest.raises(RuntimeError, match=r"another export is writing to .*m right now"):
            export_retrieval_model(model, (items, embeddings), export_dir_base=base, k=5)
    assert export_retrieval_model(model, (items, embeddings), export_dir_base=base, k=5) == str(base / "1")
    assert sorted(p.name for p in base.iterdir()) == ["1"]


def test_candidate_export_round_trip(tmp_path):
    ids, x = clustered_candidates(n=20, d=4)
    out = export_candidates(ids, x, tmp_path / "cands")
    np.testing.assert_array_equal(np.load(Path(out) / "ids.npy"), ids)
    np.testing.assert_array_equal(np.load(Path(out) / "embeddings.npy"), x)
    parsed = [tf.io.parse_single_example(r, {"id": tf.io.FixedLenFeature([], tf.string),
                                             "embedding": tf.io.FixedLenFeature([4], tf.float32)})
              for r in tf.data.TFRecordDataset(str(Path(out) / "candidates.tfrecord"))]
    assert [p["id"].numpy().decode() for p in parsed] == ids.tolist()
    np.testing.assert_allclose(np.stack([p["embedding"].numpy() for p in parsed]), x)
    with pytest.raises(FileExistsError):
        export_candidates(ids, x, out)


def test_export_from_the_model_and_an_item_table(tmp_path, exported_model, small_split):
    """Exporting needs the trained model and an item table only: the candidate tower embeds the table, and the
    export serves the same top-k as one given the corpus embeddings."""
    from tfrec_recall.evaluation import corpus_arrays
    model, items, embeddings, features = exported_model
    table = corpus_arrays(small_split, model.candidate_tower.encoder.specs)  # item feature arrays with item_id
    from_table = export_retrieval_model(model, table, index=BruteForce(max_k=10), export_dir_base=tmp_path / "t", k=10)
    from_pairs = export_retrieval_model(model, (items, embeddings), index=BruteForce(max_k=10),
                                        export_dir_base=tmp_path / "p", k=10)
    request = {name: tf.constant(v) for name, v in features.items()}
    a = tf.saved_model.load(str(from_table)).signatures["serving_default"](**request)
    b = tf.saved_model.load(str(from_pairs)).signatures["serving_default"](**request)
    np.testing.assert_array_equal(a["item_ids"].numpy(), b["item_ids"].numpy())
    np.testing.assert_allclose(a["scores"].numpy(), b["scores"].numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="needs a model with a candidate tower"):
        export_retrieval_model(model.query_tower, table, export_dir_base=tmp_path / "q")
    with pytest.raises(TypeError, match=r"candidates must be an \(ids, embeddings\) pair or an item table"):
        export_retrieval_model(model, items, export_dir_base=tmp_path / "x")
