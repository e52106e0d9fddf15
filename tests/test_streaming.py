"""Streaming input (issue 14, item 1): split examples read through TFXIO, vocabularies read by path.

The references are the in-memory path on the same data: the same model trained on the same rows in the same
order must give the same losses, and evaluation from the files must give the metrics of ``evaluate`` on the
in-memory split, to the last digit.
"""
import numpy as np
import pytest

import tfrec_recall  # noqa: F401
import tensorflow as tf

from tfrec_recall.config import ConfigError, load_config
from tfrec_recall.data.protocol import EVAL, EXCLUDE, TEST, TRAIN, assign_user
from tfrec_recall.data.streaming import (RAGGED, StreamingSplit, examples_dataset, split_schema, write_split_examples,
                                         write_vocabularies)
from tfrec_recall.evaluation.evaluate import evaluate
from tfrec_recall.features import FeatureEncoder, IdFeature, SequenceFeature
from tfrec_recall.features.specs import FeatureSpec
from tfrec_recall.training.streaming import (build_streaming_model, evaluate_streaming, require_streamable,
                                             train_streaming)

HISTORY_LENGTH = 10


@pytest.fixture(scope="module")
def stream(small_split, tmp_path_factory):
    """The small split written as split examples (2 shards per split) and its Beam-computed vocabularies."""
    root = tmp_path_factory.mktemp("stream")
    examples = write_split_examples(small_split, str(root / "examples"), num_shards=2)
    write_vocabularies(examples, str(root / "vocabularies"))
    return StreamingSplit.from_examples(examples, str(root / "vocabularies"), HISTORY_LENGTH)


def _config(**overrides):
    return load_config("youtube_dnn", overrides={"use_side_features": False, "history_length": HISTORY_LENGTH,
                                                 "epochs": 1, **overrides})


# -- vocabularies read by path ----------------------------------------------------------------------------------

def test_vocabulary_file_spec_validation_and_round_trip(tmp_path):
    path = tmp_path / "ids.vocab"
    path.write_text("a\nb\nc\n")
    spec = IdFeature("user_id", 4, vocabulary_file=str(path))
    assert spec.has_vocabulary and spec.vocabulary_tokens() == ("a", "b", "c")
    assert FeatureSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="exactly one of vocabulary, vocabulary_file or hash_buckets .*"
                                         "vocabulary_file='.*ids.vocab'"):
        IdFeature("user_id", 4, vocabulary=("a",), vocabulary_file=str(path))
    with pytest.raises(ValueError, match="user_id.vocabulary_file must be a non-empty path, got ''"):
        IdFeature("user_id", 4, vocabulary_file="")


def test_encoder_with_a_vocabulary_file_equals_the_in_memory_vocabulary(tmp_path):
    path = tmp_path / "items.vocab"
    path.write_text("i1\ni2\ni3\n")
    inputs = {"item_id": tf.constant(["i2", "zz", "i3"]), "history": tf.constant([["i1", "", ""]] * 3)}
    outputs = []
    for kwargs in ({"vocabulary": ("i1", "i2", "i3")}, {"vocabulary_file": str(path)}):
        tf.keras.utils.set_random_seed(0)
        encoder = FeatureEncoder([IdFeature("item_id", 4, **kwargs),
                                  SequenceFeature("history", 4, max_len=3, **kwargs)])
        outputs.append([o.numpy() for o in encoder(inputs)])
    for a, b in zip(*outputs):
        np.testing.assert_array_equal(a, b)


def test_saved_tower_keeps_its_vocabulary_files_as_assets(stream, tmp_path):
    """A tower saved as a SavedModel answers from its own copies of the vocabulary files: after the files the
    specs name are gone, the reloaded tower gives the same vectors."""
    import shutil
    vocabularies = shutil.copytree(stream.vocabulary_dir, tmp_path / "vocabularies")
    moved = StreamingSplit(stream.train_files, stream.valid_files, stream.test_files, str(vocabularies),
                           HISTORY_LENGTH)
    tower = build_streaming_model(_config(use_user_id=True), moved).query_tower
    request = {"user_id": tf.constant(["1", "nobody"]), "history": tf.constant([["5"] + [""] * 9] * 2)}
    expected = tower(request).numpy()
    tower.save(str(tmp_path / "tower"), save_format="tf", include_optimizer=False)
    assert sorted(tf.io.gfile.listdir(str(tmp_path / "tower" / "assets"))) == ["item_id.vocab", "user_id.vocab"]
    shutil.rmtree(vocabularies)
    loaded = tf.keras.models.load_model(str(tmp_path / "tower"))
    np.testing.assert_allclose(loaded(request).numpy(), expected, rtol=1e-6)


# -- the split examples and the dataset -------------------------------------------------------------------------

def test_assign_user_eval_and_test_records_carry_the_training_items():
    events = [{"user_id": "u", "item_id": i, "timestamp": t} for t, i in enumerate("abcde")]
    out = dict((split, r) for split, r in assign_user(events, history_length=2) if split != TRAIN)
    # train a, b, c; eval d; test e: both exclude all three training items (history keeps only 2)
    assert out[EVAL][EXCLUDE] == ["a", "b", "c"] and out[TEST][EXCLUDE] == ["a", "b", "c"]
    assert out[EVAL]["history"] == ["c", "b"]
    assert all(EXCLUDE not in r for split, r in assign_user(events) if split == TRAIN)


def test_examples_dataset_pads_lists_and_uses_a_given_tfx_factory(stream, small_split):
    from tfx_bsl.public import tfxio
    calls = []

    def factory(files, options, schema):  # what a TFX Trainer's DataAccessor hands run_fn
        calls.append((tuple(files), options.batch_size, schema))
        return tfxio.TFExampleRecord(files, schema=schema).TensorFlowDataset(options)

    widths = {"user_id": None, "history": HISTORY_LENGTH, EXCLUDE: RAGGED}
    batch = next(iter(examples_dataset(stream.valid_files, widths, 7, dataset_factory=factory)))
    assert calls == [(stream.valid_files, 7, split_schema())]
    assert batch["user_id"].shape == (7,) and batch["history"].shape == (7, HISTORY_LENGTH)
    first = small_split.valid.iloc[0]
    assert batch["user_id"][0].numpy().decode() == first["user_id"]
    history = [v.decode() for v in batch["history"][0].numpy()]
    assert history == list(first["history"]) + [""] * (HISTORY_LENGTH - len(first["history"]))
    assert [v.decode() for v in batch[EXCLUDE][0].numpy()] == small_split.train_items[first["user_id"]]


def test_split_files_are_refused_when_missing_or_already_written(stream, small_split, tmp_path):
    with pytest.raises(FileExistsError, match="refusing to overwrite split examples"):
        write_split_examples(small_split, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="valid_files: .*nowhere.gz does not exist"):
        StreamingSplit(stream.train_files, (str(tmp_path / "nowhere.gz"),), stream.test_files,
                       stream.vocabulary_dir, HISTORY_LENGTH)
    with pytest.raises(FileNotFoundError, match="vocabulary_dir .* lacks .*user_id.vocab: write it with"):
        StreamingSplit(stream.train_files, stream.valid_files, stream.test_files, str(tmp_path), HISTORY_LENGTH)


# -- training and evaluation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, message", [
    ("example_age", True, "config key 'example_age': streaming input supports only False"),
    ("deep_retrieval", True, "config key 'deep_retrieval': streaming input supports only False"),
    ("query_tower", "sdm", "config key 'query_tower': 'sdm' reads inputs beyond ids and history"),
])
def test_configurations_that_need_tables_in_memory_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=message):
        require_streamable(_config(**{key: value}))


def _loss_per_batch(model, dataset):
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01))
    return model.fit(dataset, epochs=1, verbose=0, callbacks=[_BatchLosses()]).model._batch_losses


class _BatchLosses(tf.keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.model._batch_losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.model._batch_losses.append(float(logs["loss"]))


def test_streamed_training_equals_in_memory_training_on_the_same_rows(stream, small_split):
    """The same model (same seed, same vocabularies: from files vs. in memory) fitted on the same rows in the
    same order, streamed from the files vs. gathered from arrays: the same loss after every batch."""
    from tfrec_recall.data.tfdata import make_dataset
    from tfrec_recall.training.build import build_model, set_seed, training_arrays
    config = _config(negatives="mixed", num_negatives=16)
    set_seed(0)
    in_memory = build_model(config, small_split)
    arrays = training_arrays(in_memory, small_split)
    expected = _loss_per_batch(in_memory, make_dataset(arrays, 64))
    set_seed(0)
    streamed = build_streaming_model(config, stream)
    widths = {s.name: s.width for s in streamed.training_feature_specs()}
    got = _loss_per_batch(streamed, examples_dataset(stream.train_files, widths, 64))
    assert len(got) == int(np.ceil(len(small_split.train) / 64)) and len(got) > 5
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_streamed_evaluation_equals_in_memory_evaluation(stream, small_split):
    model = build_streaming_model(_config(), stream)
    for which in ("valid", "test"):
        assert evaluate_streaming(model, stream, which) == evaluate(model, small_split, which)
    subset = evaluate_streaming(model, stream, "valid", max_users=50)
    assert subset["users"] == 50


def test_streamed_evaluation_in_chunks_of_users_equals_one_pass(stream, small_split):
    """Users read and ranked 64 at a time (300 test users: 5 chunks, the last of 44) give the numbers of one
    pass, coverage included (the union of the chunks' lists, not a mean); ``max_users`` cuts inside a chunk."""
    model = build_streaming_model(_config(), stream)
    whole = evaluate_streaming(model, stream, "test")
    chunked = evaluate_streaming(model, stream, "test", users_per_chunk=64)
    assert chunked == pytest.approx(whole, rel=1e-12) and chunked["users"] == len(small_split.test) == 300
    assert 0 < chunked["Coverage@10"] < 1
    assert evaluate_streaming(model, stream, "test", users_per_chunk=64, max_users=100)["users"] == 100
    with pytest.raises(ValueError, match="users_per_chunk must be a positive integer, got 0"):
        evaluate_streaming(model, stream, "test", users_per_chunk=0)


def test_train_streaming_learns_and_recommends(stream, small_split):
    from tests.conftest import chance_hit_rate
    result = train_streaming(_config(epochs=4, patience=2), stream, verbose=0)
    chance = chance_hit_rate(small_split, 50, "valid")  # about 0.3: 50 of ~170 unexcluded items
    assert result.valid_metrics["HR@50"] > chance + 0.15, (result.valid_metrics, chance)
    assert len(result.history["val_HR@50"]) == len(result.history["loss"]) >= 1
    assert result.metrics["users"] == len(small_split.test)
    user = small_split.test.iloc[0]
    request = {"user_id": np.array([user["user_id"]]),
               "history": np.array([list(user["history"]) + [""] * (HISTORY_LENGTH - len(user["history"]))])}
    scores, ids = result.model.recommend(request, k=5)
    assert ids.shape == (1, 5) and bool(tf.reduce_all(scores[:, :-1] >= scores[:, 1:]))


def test_pipeline_split_examples_stream(small_data, small_split, tmp_path):
    """The Beam protocol transform's output (the pipeline's ProtocolSplit) is a streaming split: evaluation
    from it equals evaluation on the in-memory leave-last-out split."""
    import apache_beam as beam
    from pipelines.transforms import LeaveLastOut
    from tfrec_recall.data.protocol import write_interactions_tfrecord  # with row numbers: ties as in memory
    raw = write_interactions_tfrecord(small_data, str(tmp_path / "raw.gz"))
    with beam.Pipeline() as pipeline:
        splits = pipeline | beam.io.ReadFromTFRecord(raw) | LeaveLastOut(history_length=HISTORY_LENGTH)
        for name, records in splits.items():
            _ = records | f"Write{name}" >> beam.io.WriteToTFRecord(str(tmp_path / "ex" / f"Split-{name}" / "part"),
                                                                  file_name_suffix=".gz")
    write_vocabularies(str(tmp_path / "ex"), str(tmp_path / "vocab"))
    stream = StreamingSplit.from_examples(str(tmp_path / "ex"), str(tmp_path / "vocab"), HISTORY_LENGTH)
    model = build_streaming_model(_config(), stream)
    # the same users in another order: equal up to the order of summation
    assert evaluate_streaming(model, stream, "test") == pytest.approx(evaluate(model, small_split, "test"), rel=1e-12)


def test_trainer_run_fn_streams_through_the_data_accessor(stream, small_split, tmp_path, monkeypatch):
    """The TFX Trainer's run_fn on the split examples: vocabularies by the Beam jobs into model_run_dir, the
    training batches from the DataAccessor's factory, and a run directory that load_run reads."""
    import types
    from tfx_bsl.public import tfxio
    from tfrec_recall.training.run_dir import load_run
    from tfrec_recall.training.tfx_trainer import examples_uri, run_fn
    calls = []

    def factory(files, options, schema):
        calls.append(list(files))
        return tfxio.TFExampleRecord(files, schema=schema).TensorFlowDataset(options)

    fn_args = types.SimpleNamespace(
        custom_config={"preset": "youtube_dnn_mixed_dat", "config": {**SMALL_TRAINER, "history_length": 10}},
        train_files=list(stream.train_files), train_steps=None, model_run_dir=str(tmp_path / "model_run"),
        serving_model_dir=str(tmp_path / "serving_model"),
        data_accessor=types.SimpleNamespace(tf_dataset_factory=factory))
    run_fn(fn_args)
    assert calls == [list(stream.train_files)]
    vocabulary = tmp_path / "model_run" / "vocabularies" / "train" / "item_id.vocab"
    assert vocabulary.read_text().split() == sorted(small_split.train["item_id"].unique())
    run = load_run(str(tmp_path / "serving_model"))
    assert sorted(run.candidate_ids) == sorted(small_split.data.items)
    # the examples are joined with the side tables (write_split_examples' default), so the preset's side features
    # train too: their vocabularies come from the Beam statistics job
    assert run.config.dat and run.config.use_side_features
    assert [s.name for s in run.candidate_tower.input_specs] == ["item_id", "category", "tags", "price"]
    assert (tmp_path / "model_run" / "vocabularies" / "side" / "category.vocab").exists()
    _check_examples_evaluator(str(tmp_path / "serving_model"), examples_uri(stream.train_files), small_split,
                              monkeypatch)


def _check_examples_evaluator(model_dir, examples, small_split, monkeypatch):
    """The pipeline evaluator's metrics of a streamed run, read chunk by chunk from the examples, equal those on
    the examples read into memory (the path of runs that do not stream), and so does the most-popular ranker; a
    baseline run saved with another corpus is re-embedded over the model's (its side columns from the corpus
    split) and, being the same towers, scores the same."""
    import shutil
    from tfrec_recall.evaluation.baselines import training_counts
    from tfrec_recall.evaluation.blessing import ExamplesEvaluator
    from tfrec_recall.training.run_dir import load_run
    streamed = ExamplesEvaluator(examples, model_dir)
    assert streamed.streams(model_dir)
    got = {"metrics": streamed.metrics(model_dir), "popularity": streamed.popularity()}
    baseline = shutil.copytree(model_dir, model_dir + "-older")
    saved = dict(np.load(f"{baseline}/candidates.npz"))
    keep = slice(0, len(saved["ids"]) // 2)  # trained when half of today's items existed
    np.savez(f"{baseline}/candidates.npz", ids=saved["ids"][keep], embeddings=saved["embeddings"][keep])
    for name, values in streamed.metrics(str(baseline)).items():
        assert values == pytest.approx(got["metrics"][name], rel=1e-6), name
    monkeypatch.setattr(ExamplesEvaluator, "streams", lambda self, run: False)
    in_memory = ExamplesEvaluator(examples, model_dir)
    for key, value in (("metrics", in_memory.metrics(model_dir)), ("popularity", in_memory.popularity())):
        for name in ("eval", "test"):
            assert got[key][name] == pytest.approx(value[name], rel=1e-9), (key, name)
    assert got["metrics"]["eval"]["users"] == len(small_split.valid) and got["metrics"]["eval"]["HR@50"] > 0
    run = load_run(model_dir)  # the counts saved with the run: each candidate's training interactions
    expected = dict(zip(small_split.data.items, training_counts(small_split)))
    assert run.candidate_counts.tolist() == [expected[i] for i in run.candidate_ids]


SMALL_TRAINER = {"epochs": 1, "embedding_dim": 16, "output_dim": 16, "hidden_units": [32], "batch_size": 64,
                 "num_negatives": 64}


def test_train_dispatches_a_streaming_split(stream, tmp_path):
    from tfrec_recall.training import train
    with pytest.raises(ValueError, match="resume_dir works by epochs; it cannot be combined with max_steps"):
        train(_config(), stream, resume_dir=str(tmp_path), max_steps=3)
    result = train(_config(), stream, evaluate_every=0, verbose=0, max_steps=3)
    assert len(result.history["loss"]) == 1 and result.metrics["users"] == len(stream_users(stream))


def test_streamed_training_resumes_from_its_state_and_writes_tensorboard_logs(stream, tmp_path):
    """A streamed run stopped after epoch 1 (its state written, as a killed run leaves it) resumes at epoch 2:
    the first epoch's loss is kept, not retrained; other settings are refused by name; TensorBoard scalars and
    the corpus projector are written."""
    from tfrec_recall.training import train
    resume_dir, logs = str(tmp_path / "state"), tmp_path / "logs"
    first = train(_config(epochs=1), stream, verbose=0, evaluate_every=0, resume_dir=resume_dir)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["epoch-0001"]
    resumed = train(_config(epochs=2), stream, verbose=0, evaluate_every=0, resume_dir=resume_dir,
                    log_dir=str(logs))
    assert len(resumed.history["loss"]) == 2 and resumed.history["loss"][0] == first.history["loss"][0]
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["epoch-0002"]
    assert list(logs.glob("train/events.out.tfevents.*")) and (logs / "projector_config.pbtxt").exists()
    with pytest.raises(ConfigError, match="differs in: learning_rate"):
        train(_config(epochs=3, learning_rate=0.5), stream, verbose=0, evaluate_every=0, resume_dir=resume_dir)


def stream_users(stream):
    import tensorflow as tf
    spec = {"user_id": tf.io.FixedLenFeature([], tf.string)}
    return {x["user_id"].numpy() for x in tf.data.TFRecordDataset(list(stream.test_files), "GZIP")
            .map(lambda r: tf.io.parse_single_example(r, spec))}


def test_most_popular_ranker_streamed_equals_in_memory(stream, small_split, tmp_path):
    """``most_popular_examples`` over the example files (tied counts by expected rank through an exact search of
    the counts) gives ``most_popular_metrics``' numbers on the in-memory split; bad counts are refused; for a run
    saved without counts the evaluator counts the train split's items."""
    from tfrec_recall.evaluation.baselines import most_popular_metrics, training_counts
    from tfrec_recall.evaluation.streamed import most_popular_examples
    ids, counts = small_split.data.items, training_counts(small_split)
    assert len(set(counts.tolist())) < len(counts)  # ties exist: the expected rank matters
    for which in ("valid", "test"):
        got = most_popular_examples(ids, counts, stream.files(which), stream.schema(), users_per_chunk=64)
        assert got == pytest.approx(most_popular_metrics(small_split, which), rel=1e-9), which
    with pytest.raises(ValueError, match=r"counts must have one value per id: shapes \(2,\) and \(3,\)"):
        most_popular_examples(ids[:3], counts[:2], stream.files("test"), stream.schema())
    with pytest.raises(ValueError, match=r"counts must be finite and non-negative .*got -1.0 for id '.*' \(1 such\)"):
        most_popular_examples(ids[:2], np.array([1.0, -1.0]), stream.files("test"), stream.schema())
    few = most_popular_examples(ids[:5], counts[:5], stream.files("test"), stream.schema(), ks=(2, 10))
    assert few["users"] == len(small_split.test)  # a corpus smaller than max(ks) is ranked whole
    import os
    import yaml
    from tfrec_recall.evaluation.blessing import ExamplesEvaluator
    run = tmp_path / "run"  # saved before the counts were kept: the evaluator counts the train split's items
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"config": _config().to_dict(), "dataset": {}}))
    np.savez(run / "candidates.npz", ids=ids.astype(str), embeddings=np.zeros((len(ids), 2)))
    examples = os.path.dirname(os.path.dirname(stream.train_files[0]))
    counted = ExamplesEvaluator(examples, str(run)).popularity()
    assert counted["test"] == pytest.approx(most_popular_metrics(small_split, "test"), rel=1e-9)
