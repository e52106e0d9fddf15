"""Exports written by earlier versions: they still load and serve, and what cannot be read is refused with a
message naming the index format version.

``fixtures/export_index_v0/1`` was written by tfrec_recall at commit 6c36be5, before indexes recorded a format
version: an MLPTower over a 5-item history (embedding_dim 4, no hidden layers) and a brute-force index over 40
candidates ``i0..i39`` whose embeddings are ``np.random.default_rng(0).normal(size=(40, 4))`` (float32), k=5.
"""
import json
from pathlib import Path

import numpy as np
import pytest

import tfrec_recall  # noqa: F401  (selects tf-keras before TensorFlow)
import tensorflow as tf

from tfrec_recall.retrievers import INDEX_FORMAT_VERSION, BruteForce, check_saved_format_version

V0 = Path(__file__).parent / "fixtures" / "export_index_v0"
CANDIDATES = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
IDS = np.array([f"i{j}" for j in range(40)])


def _histories():
    return tf.constant([["i1", "i2", "", "", ""], ["i39", "", "", "", ""], ["", "", "", "", ""]])


def test_v0_export_still_serves_the_brute_force_top_k():
    manifest = json.loads((V0 / "1" / "assets" / "manifest.json").read_text())
    assert "format_version" not in manifest["index"]  # really written before format versions
    loaded = tf.saved_model.load(str(V0 / "1"))
    history = _histories()
    out = loaded.signatures["serving_default"](history=history)
    query = loaded.signatures["query_embedding"](history=history)["query_embedding"].numpy()
    scores = query @ CANDIDATES.T  # NumPy reference: exact scores, history items excluded, best first
    for row, seen in enumerate([{1, 2}, {39}, set()]):
        s = scores[row].copy()
        s[list(seen)] = -np.inf
        expected = IDS[np.argsort(-s, kind="stable")[:5]]
        assert [x.decode() for x in out["item_ids"].numpy()[row]] == expected.tolist()
        np.testing.assert_allclose(out["scores"].numpy()[row], np.sort(s)[::-1][:5], rtol=1e-5)


def test_v0_export_loads_in_the_local_server():
    from tfrec_recall.serving.server import ModelRepository
    repository = ModelRepository("old", V0, poll_seconds=3600)
    assert repository.loaded_versions() == [1]


def test_rebuilding_a_v0_index_from_its_saved_state_is_refused_with_the_version():
    loaded = tf.saved_model.load(str(V0 / "1"))
    with pytest.raises(ValueError, match=f"records no index format version.*reads index format version "
                                         f"{INDEX_FORMAT_VERSION}"):
        check_saved_format_version(loaded.retrieval_index)


def test_a_config_of_another_format_version_is_refused_naming_both():
    config = BruteForce(max_k=5).get_config()
    config["format_version"] = INDEX_FORMAT_VERSION + 1
    with pytest.raises(ValueError, match=f"format version {INDEX_FORMAT_VERSION + 1}.*reads index format version "
                                         f"{INDEX_FORMAT_VERSION}"):
        BruteForce.from_config(config)
