"""The Beam data jobs (tfrec_recall.data.beam_jobs) and the runner options (tfrec_recall.beam_runners).

Each job is checked on the in-memory DirectRunner against a reference computed here without Beam
(collections.Counter, ``vocabulary_of``, NumPy), then run on the multi-process DirectRunner and on the DaskRunner
(against a ``dask.distributed.LocalCluster`` of 2 worker processes started by this module), which must write the
same bytes. The side-feature join and statistics jobs (``tfrec_recall.data.side_jobs``) are compared between the
DirectRunner and the DaskRunner. The Deep Retrieval M-step job (``beam_m_step``) is compared with the in-process M-step on all three
runners (its single-output, single-sink shape is what the DaskRunner of apache-beam 2.74 needs; see the
beam_jobs docstring).
"""
import collections
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions

from tfrec_recall import training
from tfrec_recall.beam_runners import DASK_RUNNER, RUNNERS, pipeline_options, run_pipeline
from tfrec_recall.config import RunConfig
from tfrec_recall.data import beam_jobs, leave_last_out, make_multi_interest
from tfrec_recall.data.protocol import TRAIN, assign_user, to_example
from tfrec_recall.features.specs import vocabulary_of
from tfrec_recall.layers.structure import PathStructure
from tfrec_recall.tasks.path_likelihood import PathStructureLoss
from tfrec_recall.training.deep_retrieval import MStep, install_paths, path_scores, structure_loss_of
from tfrec_recall.training.path_assignment_beam import beam_m_step, read_path_scores

FEATURES = ("user_id", "item_id")
DIM, BATCH, SHARDS = 3, 7, 5


# -- data and references ----------------------------------------------------------------------------------------
def _train_records(seed: int = 0):
    """The protocol split's training records of 30 seeded users over 22 items (two with non-ASCII ids)."""
    rng = np.random.default_rng(seed)
    items = [f"i{n}" for n in range(20)] + ["é1", "ü2"]
    records = []
    for u in range(30):
        events = [{"user_id": f"u{u}", "item_id": items[rng.integers(len(items))], "timestamp": int(t)}
                  for t in rng.permutation(int(rng.integers(1, 8)))]
        records += [record for split, record in assign_user(events, history_length=5) if split == TRAIN]
    return records


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """(input pattern, training records): a gzipped shard and an uncompressed one, as the pipeline names them."""
    records, directory = _train_records(), tmp_path_factory.mktemp("examples")
    halves = {"data_tfrecord-00000-of-00002.gz": (records[::2], "GZIP"),
              "data_tfrecord-00001-of-00002": (records[1::2], None)}
    for name, (part, compression) in halves.items():
        with tf.io.TFRecordWriter(str(directory / name), options=compression) as writer:
            for record in part:
                writer.write(to_example(record).SerializeToString())
    return str(directory / "data_tfrecord-*"), records


class _Embedder(tf.Module):
    """item_id -> 2 * table[StringLookup(vocabulary file)(item_id)]: a row per vocabulary id, row 0 for OOV."""

    def __init__(self, vocabulary_file: str, seed: int = 1):
        super().__init__()
        self.lookup = tf.keras.layers.StringLookup(vocabulary=vocabulary_file)
        rows = np.random.default_rng(seed).normal(size=(self.lookup.vocabulary_size(), DIM)).astype(np.float32)
        self.table = tf.Variable(rows)
        self.embed = tf.function(self._embed, input_signature=[tf.TensorSpec([None], tf.string, name="item_id")])

    def _embed(self, item_id):
        return {"embedding": tf.gather(self.table, self.lookup(item_id)) * 2.0}


@pytest.fixture(scope="module")
def embedder(examples, tmp_path_factory):
    """(SavedModel dir, expected [n, d] embeddings of the item vocabulary): exported from a vocabulary written
    here from ``vocabulary_of``, not by the job."""
    _, records = examples
    directory = tmp_path_factory.mktemp("embedder")
    vocabulary = vocabulary_of(r["item_id"] for r in records)
    (directory / "items.txt").write_text("".join(f"{token}\n" for token in vocabulary), encoding="utf-8")
    module = _Embedder(str(directory / "items.txt"))
    tf.saved_model.save(module, str(directory / "model"), signatures={"embed": module.embed})
    return str(directory / "model"), 2.0 * module.table.numpy()[1:]


def _read_files(paths) -> dict:
    return {os.path.basename(p): tf.io.gfile.GFile(p, "rb").read() for p in paths}


def _run_tables(pattern: str, out: str, runner) -> dict:
    """{table: {feature: path}} written by the vocabulary + frequency job on ``runner``."""
    return beam_jobs.run_token_tables(pattern, out, runner)


def _run_embeddings(vocabulary: str, model_dir: str, out: str, runner) -> list:
    """The shard paths written by the embedding job on ``runner``."""
    return beam_jobs.run_vocabulary_embeddings(vocabulary, model_dir, out, runner, batch_size=BATCH,
                                               num_shards=SHARDS, signature="embed")


@pytest.fixture(scope="module")
def direct_run(examples, embedder, tmp_path_factory):
    """The outputs of the jobs on the in-memory DirectRunner: tables, the embeddings' directory, every file."""
    out = str(tmp_path_factory.mktemp("direct"))
    tables = _run_tables(examples[0], out + "/tables", "direct")
    shards = _run_embeddings(tables["vocabulary"]["item_id"], embedder[0], out + "/embeddings", "direct")
    return {"tables": tables, "embeddings": out + "/embeddings", "table_files": _read_files(
        p for by_feature in tables.values() for p in by_feature.values()), "shard_files": _read_files(shards)}


# -- runner options ---------------------------------------------------------------------------------------------
def test_runner_options_are_built_for_each_name_and_bad_values_are_named():
    assert RUNNERS == ("direct", "multi_process", "dask")
    multi = pipeline_options("multi_process").get_all_options()
    assert (multi["runner"], multi["direct_running_mode"], multi["direct_num_workers"]) == \
        ("DirectRunner", "multi_processing", 2)
    from apache_beam.runners.dask.dask_runner import DaskOptions
    dask = pipeline_options("dask", dask_address="tcp://127.0.0.1:1", num_workers=3)
    assert dask.get_all_options()["runner"] == DASK_RUNNER
    assert (dask.view_as(DaskOptions).address, dask.view_as(DaskOptions).npartitions) == ("tcp://127.0.0.1:1", 3)
    assert pipeline_options("direct", flags=["--temp_location=/tmp/x"]).get_all_options()["temp_location"] == "/tmp/x"
    with pytest.raises(ValueError, match=r"runner must be one of \['direct', 'multi_process', 'dask'\], got 'spark'"):
        pipeline_options("spark")
    with pytest.raises(ValueError, match=r"runner 'dask' needs dask_address.*got None"):
        pipeline_options("dask")
    with pytest.raises(ValueError, match=r"num_workers applies to .* got num_workers=2 with runner 'direct'"):
        pipeline_options("direct", num_workers=2)
    with pytest.raises(ValueError, match=r"dask_address applies to runner 'dask' only, got dask_address='tcp://h:1'"):
        pipeline_options("multi_process", dask_address="tcp://h:1")
    with pytest.raises(ValueError, match="num_workers must be a positive integer, got 0"):
        pipeline_options("multi_process", num_workers=0)
    with pytest.raises(ValueError, match=r"flags must be a sequence of '--name=value' strings, got 'x'"):
        pipeline_options("direct", flags="x")
    with pytest.raises(ValueError, match="pipeline must be an apache_beam.Pipeline, got 3"):
        run_pipeline(3)


# -- the jobs on the in-memory DirectRunner, against references computed without Beam ----------------------------
def test_tables_and_embeddings_match_references_computed_without_beam(examples, embedder, direct_run):
    _, records = examples
    tables = direct_run["tables"]
    for feature in FEATURES:
        values = [r[feature] for r in records]
        counts = collections.Counter(values)
        assert beam_jobs.read_vocabulary(tables["vocabulary"][feature]) == vocabulary_of(values)
        assert vocabulary_of(values) == tuple(sorted(counts))
        assert beam_jobs.read_counts(tables["counts"][feature]) == dict(sorted(counts.items()))
    items = list(vocabulary_of(r["item_id"] for r in records))
    assert list(beam_jobs.read_counts(tables["counts"]["item_id"])) == items  # line i of both files: one token
    ids, vectors = beam_jobs.read_embeddings(direct_run["embeddings"])  # the vocabulary job's order
    assert ids.tolist() == list(vocabulary_of(r["item_id"] for r in records))
    assert vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, embedder[1])
    assert len(ids) % BATCH != 0 and len(ids) // BATCH + 1 < SHARDS  # a short last batch and an empty shard


def test_string_lookup_over_the_vocabulary_file_equals_the_in_memory_one(examples, direct_run):
    _, records = examples
    path = direct_run["tables"]["vocabulary"]["item_id"]
    from_file = tf.keras.layers.StringLookup(vocabulary=path)
    in_memory = tf.keras.layers.StringLookup(vocabulary=list(vocabulary_of(r["item_id"] for r in records)))
    assert from_file.get_vocabulary() == in_memory.get_vocabulary()
    probe = tf.constant(["é1", "i3", "ü2", "nope", "i19"])
    np.testing.assert_array_equal(from_file(probe).numpy(), in_memory(probe).numpy())
    assert from_file(probe).numpy()[3] == 0  # out of vocabulary


def test_drivers_refuse_bad_arguments_naming_them(examples, embedder, direct_run, tmp_path):
    pattern, _ = examples
    with pytest.raises(FileNotFoundError, match=r"input_pattern '.*nothing-\*' matches no file"):
        beam_jobs.run_vocabularies(str(tmp_path / "nothing-*"), str(tmp_path / "out"))
    with pytest.raises(FileExistsError, match="refusing to overwrite .*item_id.vocab"):
        beam_jobs.run_vocabularies(pattern, os.path.dirname(direct_run["tables"]["vocabulary"]["item_id"]))
    with pytest.raises(ValueError, match=r"features must be a non-empty sequence of distinct .*got \('a', 'a'\)"):
        beam_jobs.run_frequencies(pattern, str(tmp_path / "out"), features=("a", "a"))
    with pytest.raises(ValueError, match=r"tables must be .*\['vocabulary', 'counts'\], got \('vocab',\)"):
        beam_jobs.run_token_tables(pattern, str(tmp_path / "out"), tables=("vocab",))
    with pytest.raises(ValueError, match=r"runner must be one of \['direct', 'multi_process', 'dask'\]"):
        beam_jobs.run_vocabularies(pattern, str(tmp_path / "out"), runner=None)
    vocabulary, model_dir = direct_run["tables"]["vocabulary"]["item_id"], embedder[0]
    with pytest.raises(ValueError, match=r"signature 'serving_default' is not in .*\['embed'\]"):
        beam_jobs.run_vocabulary_embeddings(vocabulary, model_dir, str(tmp_path / "e"))
    with pytest.raises(ValueError, match=r"input_name 'ids' must be a \[None\] string input"):
        beam_jobs.run_vocabulary_embeddings(vocabulary, model_dir, str(tmp_path / "e"), signature="embed",
                                            input_name="ids")
    with pytest.raises(ValueError, match="output_name 'vec' is not an output of signature 'embed'"):
        beam_jobs.run_vocabulary_embeddings(vocabulary, model_dir, str(tmp_path / "e"), signature="embed",
                                            output_name="vec")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        beam_jobs.run_vocabulary_embeddings(vocabulary, model_dir, str(tmp_path / "e"), signature="embed",
                                            batch_size=0)
    with pytest.raises(FileNotFoundError, match="vocabulary_path .*missing.vocab' does not exist"):
        beam_jobs.run_vocabulary_embeddings(str(tmp_path / "missing.vocab"), model_dir, str(tmp_path / "e"),
                                            signature="embed")


def test_a_malformed_example_fails_the_job_naming_the_feature(tmp_path):
    example = tf.train.Example()
    example.features.feature["user_id"].bytes_list.value.extend([b"u1", b"u2"])
    example.features.feature["item_id"].bytes_list.value.append(b"i1")
    with tf.io.TFRecordWriter(str(tmp_path / "bad.tfrecord")) as writer:
        writer.write(example.SerializeToString())
    with pytest.raises(Exception, match=r"feature 'user_id' must hold one bytes or int64 value .*\[b'u1', b'u2'\]"):
        beam_jobs.run_vocabularies(str(tmp_path / "bad.tfrecord"), str(tmp_path / "out"))
    assert not tf.io.gfile.exists(beam_jobs.vocabulary_path(str(tmp_path / "out"), "user_id"))


def test_read_embeddings_refuses_an_incomplete_output(direct_run, tmp_path):
    copy = str(tmp_path / "embeddings")
    shutil.copytree(direct_run["embeddings"], copy)
    os.remove(beam_jobs.shard_path(copy, 1, SHARDS))
    with pytest.raises(ValueError, match=r"must hold shards .*embeddings-00001-of-00005.tfrecord"):
        beam_jobs.read_embeddings(copy)
    with pytest.raises(FileNotFoundError, match="no embedding shards"):
        beam_jobs.read_embeddings(str(tmp_path))


# -- the same files on the multi-process DirectRunner and on Dask -----------------------------------------------
@pytest.fixture(scope="module")
def dask_client():
    """A client of a LocalCluster of 2 single-threaded worker processes; closed before the cluster."""
    from dask.distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _options(runner: str, request) -> PipelineOptions:
    if runner == "dask":
        address = request.getfixturevalue("dask_client").scheduler.address
        return pipeline_options("dask", dask_address=address, num_workers=2)
    return pipeline_options(runner)


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["multi_process", "dask"])
def test_the_vocabulary_and_frequency_job_writes_the_same_files_on(runner, examples, direct_run, request, tmp_path):
    tables = _run_tables(examples[0], str(tmp_path), _options(runner, request))
    files = _read_files(p for by_feature in tables.values() for p in by_feature.values())
    assert files == direct_run["table_files"] and len(files) == 4


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["multi_process", "dask"])
def test_the_embedding_job_writes_the_same_files_on(runner, embedder, direct_run, request, tmp_path):
    vocabulary = direct_run["tables"]["vocabulary"]["item_id"]
    files = _read_files(_run_embeddings(vocabulary, embedder[0], str(tmp_path), _options(runner, request)))
    assert files == direct_run["shard_files"] and len(files) == SHARDS
    np.testing.assert_array_equal(beam_jobs.read_embeddings(str(tmp_path))[1], embedder[1])


# -- the Deep Retrieval M-step job ------------------------------------------------------------------------------
STEP = MStep(beam_width=3, batch_size=240, alpha=1e-3)  # 2 batches of the 480 training interactions


@pytest.fixture(scope="module")
def dr_model():
    """(model, training arrays, in-process PathScores, in-process paths) of an untrained tiny Deep Retrieval
    model (the M-step is deterministic given the weights); the model's paths are restored after each use."""
    data, _ = make_multi_interest(num_users=60, num_items=30, num_clusters=3, min_interests=1, max_interests=1,
                                  seed=0)
    split = leave_last_out(data)
    config = RunConfig(use_history=True, use_user_id=False, query_tower="mlp", history_length=5, embedding_dim=4,
                       output_dim=4, seed=0)
    training.set_seed(0)
    model = training.build_model(config, split)
    structure = PathStructure(num_layers=2, num_codes=3, code_dim=2, hidden_units=(4,))
    model.add_auxiliary_loss(PathStructureLoss(structure, np.asarray(split.data.items).astype(str), num_paths=1,
                                               name="path_structure"))
    arrays = training.training_arrays(model, split)
    loss = structure_loss_of(model)
    before = loss.path_codes()
    scores = path_scores(model, arrays, STEP)
    assignment, _ = install_paths(model, scores, STEP)  # = m_step(model, arrays, STEP), scoring once
    loss.assign(before)
    return model, arrays, scores, assignment.paths


def _assert_beam_m_step_equals_in_process(dr_model, work_dir, options):
    model, arrays, scores, paths = dr_model
    loss = structure_loss_of(model)
    before = loss.path_codes()
    try:
        assignment, _ = beam_m_step(model, arrays, work_dir, STEP, options=options)
    finally:
        installed = loss.path_codes()
        loss.assign(before)
    remote = read_path_scores(os.path.join(work_dir, "path_scores", "part"), len(scores.counts), STEP.max_candidates)
    np.testing.assert_array_equal(remote.counts, scores.counts)
    np.testing.assert_array_equal(remote.codes, scores.codes)
    np.testing.assert_allclose(remote.scores, scores.scores, rtol=1e-6)
    np.testing.assert_array_equal(assignment.paths, paths)
    np.testing.assert_array_equal(installed, paths)
    assert not np.array_equal(before, paths)  # the M-step changed the random initial paths


@pytest.mark.parametrize("runner", ["direct", pytest.param("multi_process", marks=pytest.mark.slow),
                                    pytest.param("dask", marks=pytest.mark.slow)])
def test_the_m_step_job_equals_the_in_process_one_on(runner, dr_model, request, tmp_path):
    options = _options(runner, request)
    _assert_beam_m_step_equals_in_process(dr_model, str(tmp_path), options)


# -- the side-feature jobs --------------------------------------------------------------------------------------
def _side_outputs(directory: str) -> dict:
    """{split: sorted records} of joined examples, and the statistics job's vocabularies (bytes) and numbers."""
    import json
    out = {}
    for split in ("train", "eval", "test", "corpus"):
        files = sorted(tf.io.gfile.glob(f"{directory}/joined/Split-{split}/*"))
        out[split] = sorted(r.numpy() for r in tf.data.TFRecordDataset(files, "GZIP"))
    statistics = f"{directory}/statistics"
    out["vocabularies"] = _read_files(tf.io.gfile.glob(f"{statistics}/*.vocab"))
    with tf.io.gfile.GFile(f"{statistics}/statistics.json") as f:
        out["statistics"] = json.load(f)
    return out


def _run_side_jobs(inputs, directory: str, runner) -> dict:
    from tfrec_recall.data.side_jobs import run_join_side_features, run_side_statistics
    plain, side, tables = inputs
    joined = run_join_side_features(plain, f"{directory}/joined", side, user_files=[tables["user"]],
                                    item_files=[tables["item"]], runner=runner, num_shards=2)
    run_side_statistics(f"{joined}/Split-train/*", f"{directory}/statistics", side, runner)
    return _side_outputs(directory)


@pytest.fixture(scope="module")
def side_inputs(tmp_path_factory):
    """(split examples without side columns, the side features, the table files) of a small synthetic dataset."""
    from tfrec_recall.data import make_synthetic
    from tfrec_recall.data.side_tables import SideFeatures, write_feature_table
    from tfrec_recall.data.streaming import write_split_examples
    data = make_synthetic(num_users=60, num_items=40, num_categories=4, mean_interactions=6, seed=1)
    root, side = tmp_path_factory.mktemp("side"), SideFeatures.of_data(data)
    plain = write_split_examples(leave_last_out(data, 5), str(root / "plain"), side_features=False)
    tables = {entity: write_feature_table(table, entity, getattr(side, entity), str(root / f"{entity}.gz"))
              for entity, table in (("user", data.user_features), ("item", data.item_features))}
    return plain, side, tables


@pytest.mark.slow
def test_the_side_feature_jobs_write_the_same_examples_and_statistics_on_dask(side_inputs, request, tmp_path):
    """The join and the statistics job on the DaskRunner: the same joined examples in every split, the same
    vocabulary files, the same counts and the same moments up to the order of summation, as on the DirectRunner.
    (Not repeated on the multi-process DirectRunner, the runner the other jobs above are also checked on: its
    worker start-up costs about 30 s a pipeline here, and Dask already runs these jobs pickled in other processes.)"""
    direct = _run_side_jobs(side_inputs, str(tmp_path / "direct"), "direct")
    dask = _run_side_jobs(side_inputs, str(tmp_path / "dask"), _options("dask", request))
    for key in ("train", "eval", "test", "corpus", "vocabularies"):
        assert dask[key] == direct[key] and len(direct[key]) > 0, key
    for name, stats in direct["statistics"]["columns"].items():
        got = dict(dask["statistics"]["columns"][name])
        assert got.pop("kind") == stats["kind"], name
        assert got == pytest.approx({k: v for k, v in stats.items() if k != "kind"}, rel=1e-12), name
