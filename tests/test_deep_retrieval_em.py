"""Deep Retrieval trained by EM (tfrec_recall.training.deep_retrieval) and its E-step loss with the item-to-path
table (tfrec_recall.tasks.path_likelihood.PathStructureLoss); the adjusted Rand index used to judge it.

Gao et al. 2020, "Learning a Retrievable Structure for Large-Scale Recommendations": the E-step loss is
-log sum_j p(pi_j(y) | x) (sec. 3.2, the structure objective), the M-step the penalised coordinate descent
(sec. 3.3), and on data with known item clusters items of one cluster should share paths; the path-size
penalty flattens the path-size distribution (the paper's path-size table).
"""
from pathlib import Path
import numpy as np
import pytest
import tensorflow as tf

from tfrec_recall import training
from tfrec_recall.config import RunConfig
from tfrec_recall.data import leave_last_out, make_multi_interest
from tfrec_recall.evaluation import adjusted_rand_index, evaluate
from tfrec_recall.evaluation.evaluate import corpus_arrays, embed
from tfrec_recall.layers.structure import PathStructure
from tfrec_recall.retrievers.deep_retrieval import items_scored
from tfrec_recall.tasks.path_likelihood import PathStructureLoss
from tfrec_recall.training.deep_retrieval import (MStep, deep_retrieval_index, fit_em, m_step, path_scores, path_sizes,
                                                  structure_loss_of)
from tfrec_recall.training.path_assignment_beam import (ScorePaths, beam_m_step, export_path_scorer, read_path_scores,
                                                        write_path_scores)


# -- the adjusted Rand index ------------------------------------------------------------------------------------
def test_adjusted_rand_index_golden_value():
    """Hubert & Arabie 1985, eq. 5, by hand for a = [0,0,0,1,1,1], b = [0,0,1,1,2,2]: contingency rows
    (2,1,0), (0,1,2): sum C(n_ij,2) = 1 + 1 = 2; rows C(3,2) * 2 = 6; columns 3 * C(2,2) = 3; C(6,2) = 15;
    E = 6 * 3 / 15 = 1.2; max = (6 + 3) / 2 = 4.5; ARI = (2 - 1.2) / (4.5 - 1.2) = 0.8 / 3.3."""
    assert adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(0.8 / 3.3)
    assert adjusted_rand_index(["x", "x", "y", "y"], [5, 5, 7, 7]) == 1.0  # renamed labels, same partition


def test_adjusted_rand_index_of_independent_labelings_is_near_zero():
    rng = np.random.default_rng(0)
    assert abs(adjusted_rand_index(rng.integers(0, 8, 4000), rng.integers(0, 8, 4000))) < 0.01


def test_adjusted_rand_index_refuses_bad_input():
    with pytest.raises(ValueError, match="one length"):
        adjusted_rand_index([0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="at least 2 items"):
        adjusted_rand_index([0], [0])


# -- PathStructureLoss ------------------------------------------------------------------------------------------
def _loss(**kwargs):
    structure = PathStructure(num_layers=2, num_codes=3, code_dim=2, hidden_units=(4,))
    return PathStructureLoss(structure, ["a", "b", "c"], **{"num_paths": 2, "name": "path_structure", **kwargs})


def test_random_initial_paths_are_distinct_per_item_and_seeded():
    codes = _loss(seed=3).path_codes()
    assert codes.shape == (3, 2) and (codes >= 0).all() and (codes < 9).all()
    assert all(len(set(row)) == 2 for row in codes.tolist())
    np.testing.assert_array_equal(codes, _loss(seed=3).path_codes())


def test_loss_is_the_structure_objective_over_known_items():
    """-mean over rows whose item has a path of log sum_j p(pi_j(y) | x) (sec. 3.2), computed from the structure's
    log p of each path; the unknown id "zzz" and item "c" (assigned no path) do not count."""
    loss = _loss()
    loss.assign(np.array([[0, 4], [8, -1], [-1, -1]]))
    x = tf.constant(np.random.default_rng(1).normal(size=(4, 5)), tf.float32)
    value = loss({"item_id": tf.constant(["a", "b", "zzz", "c"])}, x, None).numpy()
    everything = np.array([[c // 3, c % 3] for c in range(9)])
    log_p = loss.structure(x, np.broadcast_to(everything, (4, 9, 2))).numpy()  # [4, 9]: every path
    expected = -np.mean([np.log(np.exp(log_p[0, 0]) + np.exp(log_p[0, 4])), log_p[1, 8]])
    assert value == pytest.approx(expected, rel=1e-5)
    assert loss({"item_id": tf.constant(["zzz"])}, x[:1], None).numpy() == 0.0  # no known row: no loss


def test_assign_round_trips_and_refuses_bad_codes():
    loss = _loss()
    codes = np.array([[1, 2], [3, -1], [-1, -1]])
    loss.assign(codes)
    np.testing.assert_array_equal(loss.path_codes(), codes)
    with pytest.raises(ValueError, match=r"must be in \[0, K\^D = 9\)"):
        loss.assign(np.array([[9, 0], [0, 1], [1, 2]]))
    with pytest.raises(ValueError, match=r"shape \[3 items, J=2\]"):
        loss.assign(np.zeros((3, 3), int))


def test_configuration_errors_name_the_values():
    structure = PathStructure(num_layers=2, num_codes=2)
    with pytest.raises(ValueError, match=r"num_paths J \(5\) must be <= K\^D = 2\^2 = 4"):
        PathStructureLoss(structure, ["a"], num_paths=5)
    with pytest.raises(ValueError, match="must not repeat"):
        PathStructureLoss(structure, ["a", "a"])
    with pytest.raises(ValueError, match="non-empty list of item ids"):
        PathStructureLoss(structure, [])


def test_config_round_trip_and_weights_keep_the_paths(tmp_path):
    loss = _loss(seed=5)
    loss.assign(np.array([[1, 2], [3, -1], [7, 0]]))
    assert tf.keras.utils.get_registered_name(PathStructureLoss) == "tfrec_recall>PathStructureLoss"
    clone = tf.keras.layers.deserialize(tf.keras.layers.serialize(loss))
    assert isinstance(clone, PathStructureLoss) and clone.get_config() == loss.get_config()
    clone.item_paths.assign(loss.item_paths)
    clone.path_mask.assign(loss.path_mask)
    np.testing.assert_array_equal(clone.path_codes(), loss.path_codes())
    checkpoint = tf.train.Checkpoint(loss=loss)
    saved = checkpoint.save(str(tmp_path / "ckpt"))
    fresh = _loss(seed=5)
    tf.train.Checkpoint(loss=fresh).restore(saved).assert_existing_objects_matched()
    np.testing.assert_array_equal(fresh.path_codes(), loss.path_codes())


# -- EM on data with known clusters -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clustered():
    """400 users, each drawing its history from one of 8 clusters of 25 items (200 items)."""
    data, truth = make_multi_interest(num_users=400, num_items=200, num_clusters=8, min_interests=1,
                                      max_interests=1, seed=0)
    return leave_last_out(data), truth


def _train_em(split, alpha):
    config = RunConfig(use_history=True, use_user_id=False, query_tower="mlp", history_length=20, embedding_dim=8,
                       output_dim=8, epochs=1, batch_size=64, learning_rate=0.01, temperature=0.1, patience=0,
                       seed=0)
    training.set_seed(0)
    model = training.build_model(config, split)
    items = np.asarray(split.data.items).astype(str)
    model.add_auxiliary_loss(PathStructureLoss(PathStructure(num_layers=2, num_codes=4, code_dim=4,
                                                             hidden_units=(16,)), items, num_paths=1,
                                               name="path_structure"))
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01))
    vectors = lambda: embed(model.candidate_tower, corpus_arrays(split, model.candidate_tower.input_specs))  # noqa
    rounds = fit_em(model, training.training_arrays(model, split), rounds=4, epochs_per_round=2, batch_size=64,
                    step=MStep(beam_width=4, alpha=alpha), item_vectors=vectors)
    return model, rounds, vectors()


@pytest.fixture(scope="module")
def trained(clustered):
    split, _ = clustered
    return {alpha: _train_em(split, alpha) for alpha in (0.0, 1e-3)}


@pytest.mark.slow
def test_items_of_one_cluster_share_a_path(clustered, trained):
    """K^D = 16 paths for 8 clusters of 25 items. Measured (seed 0): ARI 1.0 with alpha = 1e-3 (8 paths used,
    25 items each) and 0.76 with alpha = 0 (6 paths: some clusters merged). Random paths give ARI ~0 (the initial
    assignment's ARI, checked here)."""
    split, truth = clustered
    model, _, _ = trained[1e-3]
    loss = structure_loss_of(model)
    labels = [truth.item_cluster[i] for i in loss.items]
    initial = PathStructureLoss(loss.structure, loss.items, num_paths=1).path_codes()[:, 0]
    assert abs(adjusted_rand_index(labels, initial)) < 0.05
    assert adjusted_rand_index(labels, loss.path_codes()[:, 0]) > 0.9


@pytest.mark.slow
def test_the_penalty_flattens_the_path_sizes(trained):
    """alpha = 0 lets clusters pile onto one path (measured max 50 items); alpha = 1e-3 (penalty increment
    alpha * ((n + 1)^4 - n^4) / 4, about 15 at n = 25) keeps every path near a cluster's 25 items."""
    flat = path_sizes(structure_loss_of(trained[0.0][0]).path_codes())
    penalised = path_sizes(structure_loss_of(trained[1e-3][0]).path_codes())
    assert flat.max() > penalised.max()
    assert penalised.max() <= 30 and len(penalised) >= 8


@pytest.mark.slow
def test_rounds_are_logged_and_the_structure_loss_falls(trained):
    _, rounds, _ = trained[1e-3]
    assert [r.round for r in rounds] == [1, 2, 3, 4]
    assert rounds[-1].structure_loss < rounds[0].structure_loss / 2  # measured 2.57 -> 0.16
    assert all(np.isfinite(r.bound).all() and r.items_without_paths == 0 for r in rounds)
    assert all(b >= a - 1e-6 for r in rounds for a, b in zip(r.bound, r.bound[1:]))  # each M-step's sweeps


@pytest.mark.slow
def test_beam_search_retrieval_matches_brute_force_with_fewer_items_scored(clustered, trained):
    """With beam width 1 (one of 16 paths) the reranker scores one cluster's ~25 of 200 items and the hit rate
    matches brute force over all 200 (measured HR@10 0.9975 both; chance 10 / 200 = 0.05)."""
    split, _ = clustered
    model, _, vectors = trained[1e-3]
    items = np.asarray(split.data.items).astype(str)
    exact = evaluate(model, split, "test", ks=(10,))["HR@10"]
    index = deep_retrieval_index(model, items, vectors, beam_width=1, max_k=20)
    approx = evaluate(model, split, "test", ks=(10,), retriever=index)["HR@10"]
    assert exact > 0.5 and approx >= exact - 0.02, (exact, approx)
    queries = model(training.feature_arrays(split.test.head(50), split.data, model.query_tower.input_specs))
    assert items_scored(index, queries).mean() <= len(items) / 4
    assert index.parameters()["unreachable_items"] == 0
    scores, ids = model.recommend(training.feature_arrays(split.test.head(3), split.data,
                                                          model.query_tower.input_specs), k=5)
    assert ids.shape == (3, 5) and np.isfinite(scores.numpy()).all()


@pytest.mark.slow
def test_beam_pipeline_m_step_equals_the_in_process_one(clustered, trained, tmp_path):
    """The M-step's scoring run as a Beam pipeline (DirectRunner) gives the in-process scores and the same
    assignment: the same functions, map then sum by key."""
    split, _ = clustered
    model, _, vectors = trained[0.0]
    arrays = training.training_arrays(model, split)
    step = MStep(beam_width=3, alpha=1e-3, batch_size=500)
    local = path_scores(model, arrays, step)
    remote = read_path_scores(_run_beam_scoring(model, arrays, step, str(tmp_path)), len(local.counts),
                              step.max_candidates)
    np.testing.assert_array_equal(remote.counts, local.counts)
    np.testing.assert_array_equal(remote.offsets, local.offsets)
    np.testing.assert_array_equal(remote.codes, local.codes)
    np.testing.assert_allclose(remote.scores, local.scores, rtol=1e-6)
    loss = structure_loss_of(model)
    before = loss.path_codes()
    in_process, _ = m_step(model, arrays, step, vectors)
    loss.assign(before)
    with_beam, _ = beam_m_step(model, arrays, str(tmp_path / "m_step"), step, vectors)
    np.testing.assert_array_equal(with_beam.paths, in_process.paths)
    np.testing.assert_array_equal(loss.path_codes(), in_process.paths)
    loss.assign(before)


def _run_beam_scoring(model, arrays, step, work_dir):
    import apache_beam as beam
    scorer = export_path_scorer(model, work_dir + "/scorer", step.beam_width)
    prefix = work_dir + "/scores/part"
    batches = [{k: v[i:i + step.batch_size] for k, v in arrays.items()}
               for i in range(0, len(arrays["item_id"]), step.batch_size)]
    with beam.Pipeline() as pipeline:
        write_path_scores(pipeline | beam.Create(batches) | ScorePaths(scorer), prefix)
    return prefix


# -- configuration ----------------------------------------------------------------------------------------------
def test_configuration_errors_fail_at_config_time_naming_the_values(small_split):
    from tfrec_recall.config import ConfigError, RunConfig
    with pytest.raises(ConfigError, match=r"'dr_beam_width'.*K\^D = dr_codes\^dr_layers = 2\^2 = 4.*got 5"):
        RunConfig(deep_retrieval=True, dr_codes=2, dr_layers=2, dr_beam_width=5, dr_mstep_beam_width=2)
    with pytest.raises(ConfigError, match=r"'dr_paths'.*dr_beam_width \(3\), got 4"):
        RunConfig(deep_retrieval=True, dr_paths=4, dr_beam_width=3)
    with pytest.raises(ConfigError, match=r"'deep_retrieval'.*query tower mind"):
        RunConfig(deep_retrieval=True, use_history=True, query_tower="mind")
    with pytest.raises(ConfigError, match="'dr_codes'.*must be >= 2"):
        RunConfig(dr_codes=1)
    items = len(small_split.data.items)
    config = RunConfig(deep_retrieval=True, dr_codes=2, dr_layers=2, dr_paths=3, dr_beam_width=4,
                       dr_mstep_beam_width=4, dr_max_items_per_path=10)
    with pytest.raises(ConfigError, match=rf"K\^D = 2\^2 = 4 paths cannot spread {items} items x 3 paths"):
        training.build_model(config, small_split)


@pytest.fixture(scope="module")
def dr_run(small_split):
    """A Deep Retrieval config trained by ``train`` for 2 epochs on the small split (an M-step after each)."""
    from tfrec_recall.config import load_config
    config = load_config("youtube_dnn", overrides={"epochs": 2, "embedding_dim": 8, "output_dim": 8,
                                                   "batch_size": 256, "patience": 0, "deep_retrieval": True,
                                                   "dr_codes": 4, "dr_layers": 2, "dr_beam_width": 4,
                                                   "dr_mstep_beam_width": 4, "dr_paths": 2})
    return config, training.train(config, small_split, evaluate_every=1, verbose=0)


def test_train_runs_em_and_serves_by_beam_search(small_split, dr_run):
    """``train`` with ``deep_retrieval: true``: an M-step after each epoch (logged), evaluation and ``recommend``
    through the beam-search index."""
    from tfrec_recall.retrievers.deep_retrieval import DeepRetrievalIndex
    _, result = dr_run
    assert len(result.history["path_bound"]) == 2 and result.history["unreachable_items"] == [0.0, 0.0]
    assert np.isfinite(result.history["path_structure"]).all()
    assert isinstance(result.model.retriever, DeepRetrievalIndex)
    assert 0 < result.metrics["HR@100"] <= 1 and "HR@50" in result.valid_metrics
    features = training.feature_arrays(small_split.test.head(4), small_split.data, result.model.query_tower.input_specs)
    _, ids = result.model.recommend(features, k=5)
    assert ids.shape == (4, 5)


def test_export_local_server_and_grpc_client_answer_as_the_model(small_split, dr_run, tmp_path):
    """The SavedModel runs the beam search, the inverted index and the reranker in its graph: it answers as
    ``recommend`` (the history excluded), and so do the local server and the gRPC client."""
    import json
    from tests.test_serving import serving_exports
    from tfrec_recall.export import export_retrieval_model
    from tfrec_recall.serving.client import GrpcClient
    _, result = dr_run
    model, k = result.model, 10
    table = training.corpus_arrays(small_split, model.candidate_tower.input_specs)
    path = export_retrieval_model(model, table, index=model.retriever, export_dir_base=tmp_path / "dr", k=k)
    manifest = json.loads((Path(path) / "assets" / "manifest.json").read_text())
    assert manifest["index"]["type"] == "DeepRetrievalIndex" and manifest["index"]["unreachable_items"] == 0
    assert (manifest["index"]["num_codes"], manifest["index"]["num_layers"], manifest["index"]["beam_width"]) == (4, 2, 4)
    features = training.feature_arrays(small_split.test.head(6), small_split.data, model.query_tower.serving_specs)
    served = tf.saved_model.load(str(path)).signatures["serving_default"](
        **{name: tf.constant(v) for name, v in features.items()})
    exclude = [[i for i in row if i] for row in features["history"]]
    scores, ids = model.recommend(features, k=k, exclude=exclude)
    np.testing.assert_array_equal(served["item_ids"].numpy(), ids.numpy())
    np.testing.assert_allclose(served["scores"].numpy(), scores.numpy(), rtol=1e-5)
    with serving_exports(tmp_path, ["dr"]) as port, GrpcClient(f"127.0.0.1:{port}", "dr") as client:
        out = client.predict(features)
    np.testing.assert_array_equal(out["item_ids"], ids.numpy())


def test_cli_trains_exports_and_refuses_bad_index_flags(tmp_path, monkeypatch, capsys):
    """`tfrec-recall train --set deep_retrieval=true` saves the structure and the paths with the run; `export`
    then serves by beam search by default and answers as the in-memory index; `--index deep_retrieval` on a
    two-tower run and `--beam-width` beyond K^D or with another index are refused naming the values."""
    from tests.test_cli import _small_synthetic
    from tfrec_recall import cli
    monkeypatch.setattr("tfrec_recall.data.registry.make_synthetic", _small_synthetic)
    out = tmp_path / "run"
    common = ["--model", "youtube_dnn", "--quiet", "--history-length", "10", "--epochs", "1",
              "--set", "embedding_dim=8", "--set", "output_dim=8"]
    dr = ["--set", "deep_retrieval=true", "--set", "dr_codes=4", "--set", "dr_layers=2", "--set", "dr_beam_width=4",
          "--set", "dr_mstep_beam_width=4", "--set", "dr_paths=2"]
    assert cli.main(["train", "--out", str(out), *common, *dr]) == 0
    run = training.load_run(out)
    assert run.structure is not None and run.candidate_paths.shape == (len(run.candidate_ids), 2, 2)
    assert cli.main(["export", "--model-dir", str(out), "--k", "5", "--export-dir-base", str(tmp_path / "e")]) == 0
    printed = capsys.readouterr().out
    assert "exported deep_retrieval index (DeepRetrievalIndex)" in printed
    assert "exported model answers like the in-memory model: True" in printed
    assert cli.main(["export", "--model-dir", str(out), "--k", "5", "--beam-width", "17",
                     "--export-dir-base", str(tmp_path / "e")]) == 2
    assert "--beam-width 17: beam_width (17) must be <= K^D = 4^2 = 16" in capsys.readouterr().err
    assert cli.main(["export", "--model-dir", str(out), "--k", "5", "--index", "brute_force", "--beam-width", "2",
                     "--export-dir-base", str(tmp_path / "e")]) == 2
    assert "--beam-width applies to --index deep_retrieval, got --index brute_force" in capsys.readouterr().err
    plain = tmp_path / "plain"
    assert cli.main(["train", "--out", str(plain), *common]) == 0
    assert cli.main(["export", "--model-dir", str(plain), "--k", "5", "--index", "deep_retrieval",
                     "--export-dir-base", str(tmp_path / "p")]) == 2
    assert "--index deep_retrieval needs a run trained with deep_retrieval: true" in capsys.readouterr().err


def test_pipeline_evaluator_and_exporter_use_the_runs_beam_search(small_split, dr_run, tmp_path):
    """The pipeline's steps on a saved Deep Retrieval run: the evaluator measures its beam search (the metrics
    ``train`` reported), the exporter serves it (``index="deep_retrieval"``, as ``create_pipeline`` picks for
    such a model), and both refuse the beam search for a run without a path structure."""
    import json
    from pipelines.pipeline import _export_index
    from tfrec_recall.config import load_config
    from tfrec_recall.evaluation.blessing import evaluate_model
    from tfrec_recall.export.pipeline_export import export_for_serving
    config, result = dr_run
    run_dir = training.save_run(result, small_split, tmp_path / "run", config, {"source": "test"})
    metrics = evaluate_model(str(run_dir), small_split, ("valid", "test"), config.ks)
    assert metrics["test"] == pytest.approx(result.metrics, rel=1e-6)
    assert metrics["valid"] == pytest.approx(result.valid_metrics, rel=1e-6)
    assert _export_index(None, config) == "deep_retrieval"
    out = export_for_serving(str(run_dir), str(tmp_path / "export"), index="deep_retrieval", k=10)
    manifest = json.loads((Path(out) / "assets" / "manifest.json").read_text())
    assert manifest["index"]["type"] == "DeepRetrievalIndex" and manifest["index"]["beam_width"] == 4
    features = training.feature_arrays(small_split.test.head(5), small_split.data,
                                       result.model.query_tower.serving_specs)
    served = tf.saved_model.load(out).signatures["serving_default"](
        **{name: tf.constant(v) for name, v in features.items()})
    _, ids = result.model.recommend(features, k=10, exclude=[[i for i in row if i] for row in features["history"]])
    np.testing.assert_array_equal(served["item_ids"].numpy(), ids.numpy())
    plain = load_config("youtube_dnn")
    assert _export_index(None, plain) == "brute_force"
    with pytest.raises(ValueError, match="index needs a model trained with deep_retrieval: true .*'deep_retrieval'"):
        _export_index("deep_retrieval", plain)
    import dataclasses
    from tfrec_recall.export.run_index import deep_retrieval_run_index
    run = dataclasses.replace(training.load_run(str(run_dir)), structure=None)
    with pytest.raises(ValueError, match="index 'deep_retrieval' needs a run trained with deep_retrieval: true"):
        deep_retrieval_run_index(run, 10)
