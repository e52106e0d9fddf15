"""The TF Serving export: same results after reload, stock ops only for brute force and IVF, ScaNN reloaded in
a fresh process that imports scann, atomic versions, manifest, candidate export. (The indexes themselves are
tested in tests/test_index.py.)"""
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
    assert path == tmp_path / "m" / "1"
    expected_scores, expected_ids = _expected(model, index, features, 20)
    loaded = tf.saved_model.load(str(path))
    assert set(loaded.signatures) == {"serving_default", "serve_examples", "query_embedding"}
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
    manifest = json.loads((path / "assets" / "manifest.json").read_text())
    assert manifest["index"]["type"] == ("BruteForce" if kind == "brute_force" else "IVF")
    assert manifest["index"]["format_version"] == INDEX_FORMAT_VERSION
    check_saved_format_version(loaded.retrieval_index)
    assert manifest["candidate_count"] == len(items) and manifest["embedding_dimension"] == 16
    assert manifest["candidate_checksum_sha256"] == candidate_checksum(items, embeddings)
    assert manifest["versions"]["tensorflow"] == tf.__version__ and manifest["requires_custom_ops"] == []
    # The next export is version 2; an existing version is never overwritten.
    assert export_retrieval_model(model, (items, embeddings), export_dir_base=tmp_path / "m", k=5).name == "2"
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


def test_scann_export_reloads_in_a_fresh_process(tmp_path, exported_model):
    model, items, embeddings, features = exported_model
    index = ScaNN(ScaNNConfig().tree(num_leaves=10, num_leaves_to_search=10).reorder(50), max_k=10)
    path = export_retrieval_model(model, (items, embeddings), index=index, export_dir_base=tmp_path / "s", k=10)
    assert any(op.startswith("Scann") for op in saved_model_ops(path))
    assert json.loads((path / "assets" / "manifest.json").read_text())["requires_custom_ops"] == ["Scann"]
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


def test_candidate_export_round_trip(tmp_path):
    ids, x = clustered_candidates(n=20, d=4)
    out = export_candidates(ids, x, tmp_path / "cands")
    np.testing.assert_array_equal(np.load(out / "ids.npy"), ids)
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), x)
    parsed = [tf.io.parse_single_example(r, {"id": tf.io.FixedLenFeature([], tf.string),
                                             "embedding": tf.io.FixedLenFeature([4], tf.float32)})
              for r in tf.data.TFRecordDataset(str(out / "candidates.tfrecord"))]
    assert [p["id"].numpy().decode() for p in parsed] == ids.tolist()
    np.testing.assert_allclose(np.stack([p["embedding"].numpy() for p in parsed]), x)
    with pytest.raises(FileExistsError):
        export_candidates(ids, x, out)
