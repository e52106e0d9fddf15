"""The two-tower options of issue 11 end to end: each one switched on from a RunConfig (and from the CLI's
--set), trained, exported with its index, and answered by the local gRPC server as the in-memory model answers;
bad configurations fail at config time naming the key."""
import concurrent.futures
import contextlib
import threading

import numpy as np
import pytest
import tensorflow as tf

from tfrec_recall import cli
from tfrec_recall.config import ConfigError, load_config
from tfrec_recall.export import export_retrieval_model
from tfrec_recall.retrievers import BruteForce
from tfrec_recall.serving.client import GrpcClient
from tests.test_serving import serving_exports

TINY = {"epochs": 1, "embedding_dim": 16, "output_dim": 16, "hidden_units": [16], "batch_size": 256}
OPTIONS = {
    "dat": {"dat": True},
    "category_alignment": {"dat": True, "category_alignment_weight": 100.0, "category_feature": "category"},
    "contrastive": {"contrastive_weight": 0.3, "contrastive_batch_size": 64},
    "example_age": {"example_age": True},
    "parallel": {"query_tower": "parallel", "candidate_tower": "parallel",
                 "parallel_branches": ["cross", "fm", "cin"], "parallel_combine": "senet"},
    "distillation": {"distillation_weight": 1.0, "teacher_epochs": 1, "distillation_candidates": 32},
}
K = 10


@pytest.mark.parametrize("overrides, message", [
    ({"dat_query_weight": -1.0}, r"config key 'dat_query_weight': must be >= 0, got -1.0"),
    ({"contrastive_weight": -0.5}, r"config key 'contrastive_weight': must be >= 0, got -0.5"),
    ({"distillation_weight": -2}, r"config key 'distillation_weight': must be >= 0, got -2.0"),
    ({"category_alignment_weight": 1.0}, r"config key 'category_feature': category_alignment_weight > 0 needs an "
                                         r"item feature"),
    ({"contrastive_weight": 0.1, "use_side_features": False}, r"config key 'contrastive_weight': the contrastive "
                                                              r"loss masks item features.*use_side_features"),
    ({"parallel_branches": ["cross", "mlp"]}, r"config key 'parallel_branches': must be distinct names from "
                                              r"\['cross', 'fm', 'cin'\], got \['cross', 'mlp'\]"),
    ({"parallel_combine": "sum"}, r"config key 'parallel_combine': must be one of \['concat', 'senet'\]"),
    ({"distillation_temperature": 0}, r"config key 'distillation_temperature': must be > 0, got 0.0"),
])
def test_bad_option_values_fail_at_config_time_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("youtube_dnn", overrides=overrides)


def test_options_naming_missing_features_fail_when_the_model_is_built(small_split):
    from tfrec_recall.training import build_model
    with pytest.raises(ConfigError, match=r"config key 'category_feature': must be a categorical item feature of "
                                          r"'synthetic' \(\['category', 'tags'\]\), got 'genre'"):
        build_model(load_config("youtube_dnn", overrides={**TINY, "category_alignment_weight": 1.0,
                                                          "category_feature": "genre"}), small_split)
    with pytest.raises(ConfigError, match=r"config key 'dat_query_feature': must be one of \['user_id', 'segment', "
                                          r"'region'\] \(the query side's ids\), got 'age'"):
        build_model(load_config("youtube_dnn", overrides={**TINY, "dat": True, "dat_query_feature": "age"}),
                    small_split)


def briefly_trained(config, split, steps: int = 3, eagerly: bool = True):
    """``config``'s model as ``training.train`` builds it (seeded, compiled), fitted on ``steps`` shuffled training
    batches and with the split's corpus indexed (so that ``recommend`` answers), without the final validation
    and test evaluation. For export and serving plumbing, which no training result is asked of: ``eagerly``
    runs the train step without tracing it, which for these small models costs far more than the steps
    (each option's traced training is its own tests' business: test_dat, test_contrastive, ...)."""
    from tfrec_recall import training
    from tfrec_recall.models.base import index_split_corpus
    training.set_seed(config.seed)
    model = training.build_model(config, split)
    model.compile(optimizer=training.make_optimizer(config), run_eagerly=eagerly)
    arrays = training.training_arrays(model, split)
    model.fit(training.make_dataset(arrays, config.batch_size, shuffle=True, seed=config.seed).take(steps),
              epochs=1, verbose=0)
    model.run_eagerly = False  # as train leaves it for whatever runs the model next
    index_split_corpus(model, split)
    return model


@contextlib.contextmanager
def background_server(root, names):
    """``serving_exports(root, names)`` entered in a background thread: yields a future of its port at once, so
    the tests before the server's run while the serve process imports TensorFlow and loads every export (tens
    of seconds); the process is stopped on exit."""
    port, stop, failures = concurrent.futures.Future(), threading.Event(), []

    def serve():
        try:
            with serving_exports(root, names) as bound:
                port.set_result(bound)
                stop.wait()
        except Exception as error:  # before the port: handed to the test that asks for it; after: raised on exit
            if port.done():
                failures.append(error)
            else:
                port.set_exception(error)

    thread = threading.Thread(target=serve, name="serving_exports", daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive(), "the serve process did not stop within 60 s"
    if failures:
        raise failures[0]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, small_split):
    """Each option briefly trained (``briefly_trained``) on the small split and exported (brute force, k = 10)
    under its name; then one `tfrec-recall serve` process answering every option's export under the option's
    name, started in the background (``server``)."""
    from tfrec_recall import training
    root = tmp_path_factory.mktemp("options")
    out = {}
    for name, overrides in OPTIONS.items():
        config = load_config("youtube_dnn", overrides={**TINY, **overrides})
        model = briefly_trained(config, small_split)
        features = training.feature_arrays(small_split.test.head(12), small_split.data, model.query_tower.input_specs)
        table = training.corpus_arrays(small_split, model.candidate_tower.input_specs)
        export_retrieval_model(model, table, index=BruteForce(max_k=K), export_dir_base=root / name, k=K)
        out[name] = {"model": model, "features": features, "losses": [x.name for x in model.auxiliary_losses]}
    with background_server(root, list(out)) as port:
        yield root, out, port


@pytest.fixture(scope="module")
def exported(exports):
    root, out, _ = exports
    return root, out


def export_loader(root):
    """``load(name)``: tf.saved_model.load of ``root/<name>/1``, each export loaded once (a load costs seconds;
    the tests only call its signatures)."""
    cache = {}

    def load(name):
        if name not in cache:
            cache[name] = tf.saved_model.load(str(root / name / "1"))
        return cache[name]
    return load


@pytest.fixture(scope="module")
def loaded(exported):
    """``loaded(name)``: the option's export, loaded once for the module (``export_loader``)."""
    return export_loader(exported[0])


def test_each_option_is_switched_on_and_its_export_answers_as_the_model(exported, loaded):
    _, models = exported
    assert models["dat"]["losses"] == ["mimic_query", "mimic_candidate"]
    assert models["category_alignment"]["losses"] == ["mimic_query", "mimic_candidate", "category_alignment"]
    assert models["contrastive"]["losses"] == ["contrastive"] and models["distillation"]["losses"] == ["distillation"]
    assert type(models["parallel"]["model"].query_tower).__name__ == "ParallelTower"
    for name, entry in models.items():
        signature = loaded(name).signatures["serving_default"]
        inputs = {k: tf.constant(v) for k, v in entry["features"].items() if k in signature.structured_input_signature[1]}
        if name == "example_age":  # filled in at serving time: not a serving input
            assert "example_age" in entry["features"] and "example_age" not in inputs
        served = signature(**inputs)
        _, ids = entry["model"].recommend(entry["features"], k=K,
                                          exclude=[[i for i in row if i] for row in entry["features"]["history"]])
        np.testing.assert_array_equal(served["item_ids"].numpy(), ids.numpy(), err_msg=name)


def test_serve_examples_and_evaluate_on_arrays_ask_as_the_server_does(exported, loaded, small_split):
    """tf.Examples without the example age answer as serving_default (age 0), and ``evaluate`` on arrays that
    carry training ages and DAT's ids scores as served (the ages are ignored)."""
    from tfrec_recall import evaluate, training
    _, models = exported
    entry = models["example_age"]
    export = loaded("example_age")
    inputs = {k: v for k, v in entry["features"].items() if k != "example_age"}

    def example(row):
        feature = {k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(x).encode() for x in np.ravel(v[row])]))
                   if v.dtype == object else tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(v[row])))
                   for k, v in inputs.items()}
        return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()

    examples = tf.constant([example(r) for r in range(len(inputs["history"]))])
    by_examples = export.signatures["serve_examples"](examples=examples)["item_ids"].numpy()
    by_tensors = export.signatures["serving_default"](**{k: tf.constant(v) for k, v in inputs.items()})
    np.testing.assert_array_equal(by_examples, by_tensors["item_ids"].numpy())
    for name in ("example_age", "dat"):
        model = models[name]["model"]
        rows = small_split.test.head(40)
        arrays = training.feature_arrays(rows, small_split.data, model.query_tower.input_specs, training=True)
        arrays["item_id"] = rows["item_id"].to_numpy(dtype=object)
        table = training.corpus_arrays(small_split, model.candidate_tower.input_specs)
        as_served = evaluate(model, {k: v for k, v in arrays.items() if k != "example_age"}, candidates=table)
        assert evaluate(model, arrays, candidates=table) == as_served, name


def test_cli_switches_options_on_with_set(tmp_path, monkeypatch, capsys):
    from tests.test_cli import _small_synthetic
    monkeypatch.setattr("tfrec_recall.data.registry.make_synthetic", _small_synthetic)
    out = tmp_path / "run"
    args = ["train", "--model", "youtube_dnn", "--out", str(out), "--quiet", "--history-length", "10",
            "--epochs", "1", "--set", "embedding_dim=16", "--set", "output_dim=16", "--set", "dat=true",
            "--set", "example_age=true", "--set", "category_alignment_weight=10", "--set", "category_feature=category",
            "--set", "candidate_tower=parallel", "--set", "parallel_branches=[cross, fm]"]
    assert cli.main(args) == 0
    saved = (out / "config.yaml").read_text()
    for line in ("dat: true", "example_age: true", "category_alignment_weight: 10.0", "- fm"):
        assert line in saved
    assert cli.main(["export", "--model-dir", str(out), "--k", "5", "--export-dir-base", str(tmp_path / "e")]) == 0
    assert "exported model answers like the in-memory model: True" in capsys.readouterr().out
    assert cli.main(["train", "--out", str(tmp_path / "x"), "--set", "dat_candidate_weight=-1"]) == 2
    assert "config key 'dat_candidate_weight': must be >= 0, got -1.0" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(tmp_path / "x"), "--set", "dat"]) == 2
    assert "--set must be KEY=VALUE, got 'dat'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def server(exports):
    """The port of the `tfrec-recall serve` process answering every option's export under the option's name."""
    return exports[2].result(timeout=300)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_the_local_server_and_grpc_client_answer_the_option(exported, loaded, server, name):
    _, models = exported
    entry = models[name]
    signature = loaded(name).signatures["serving_default"]
    wanted = signature.structured_input_signature[1]
    features = {k: v for k, v in entry["features"].items() if k in wanted}
    expected = signature(**{k: tf.constant(v) for k, v in features.items()})
    with GrpcClient(f"127.0.0.1:{server}", name) as client:
        out = client.predict(features)
    np.testing.assert_array_equal(out["item_ids"], expected["item_ids"].numpy())
    np.testing.assert_allclose(out["scores"], expected["scores"].numpy(), rtol=1e-5, atol=1e-6)
