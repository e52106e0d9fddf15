"""Remote storage: every file step of the library runs on TensorFlow's ``ram://`` file system, which pathlib,
glob and ``open`` cannot see, so a local-only call anywhere on these paths fails here (issue: "Scale past one
machine", item 5). Plus a source scan that keeps such calls out of the package."""
import ast
import os
import uuid

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfrec_recall import storage
from tfrec_recall._atomic import atomic_directory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def ram():
    """A fresh ram:// directory, removed afterwards (the ram file system lives as long as the process)."""
    root = f"ram://test-{uuid.uuid4().hex[:12]}"
    storage.makedirs(root)
    yield root
    storage.rmtree(root)


def _write_tree(root, files):
    for relative, text in files.items():
        storage.makedirs(storage.parent(storage.join(root, relative)))
        storage.write_text(storage.join(root, relative), text)


def test_path_helpers_keep_the_scheme():
    assert storage.join("gs://bucket/run", "a", "b.txt") == "gs://bucket/run/a/b.txt"
    assert storage.parent("gs://bucket/run/") == "gs://bucket" and storage.name("gs://bucket/run/") == "run"
    assert storage.is_local("/tmp/x") and storage.is_local("file:///tmp/x") and not storage.is_local("ram://x")
    assert storage.path_str("file:///tmp/x") == "/tmp/x"


def test_move_directory_on_ram_keeps_every_file_and_copies_last_files_at_the_end(ram, monkeypatch):
    """tf.io.gfile.rename of a ram:// directory drops its files; move_directory must not."""
    files = {"saved_model.pb": "pb", "variables/variables.index": "idx", "assets/manifest.json": "{}"}
    _write_tree(storage.join(ram, "tmp"), files)
    copied = []
    real_copy = storage.gfile().copy
    monkeypatch.setattr(tf.io.gfile, "copy", lambda a, b, overwrite=False: (copied.append(storage.name(b)),
                                                                            real_copy(a, b, overwrite)))
    storage.move_directory(storage.join(ram, "tmp"), storage.join(ram, "1"))
    assert storage.walk_files(storage.join(ram, "1")) == sorted(files)
    assert storage.read_text(storage.join(ram, "1", "variables", "variables.index")) == "idx"
    assert copied[-1] == "saved_model.pb" and len(copied) == 3
    assert not storage.exists(storage.join(ram, "tmp"))
    _write_tree(storage.join(ram, "again"), {"x": "1"})
    with pytest.raises(FileExistsError, match=r"/1 exists and is not empty"):
        storage.move_directory(storage.join(ram, "again"), storage.join(ram, "1"))


def test_atomic_directory_on_ram_is_complete_or_absent(ram):
    final = storage.join(ram, "out")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(final) as tmp:
            storage.write_text(storage.join(tmp, "half.txt"), "x")
            raise RuntimeError("boom")
    assert storage.listdir(ram) == []  # neither the target nor the temporary
    with atomic_directory(final) as tmp:
        storage.write_text(storage.join(tmp, "whole.txt"), "y")
    assert storage.listdir(ram) == ["out"] and storage.read_text(storage.join(final, "whole.txt")) == "y"


def test_open_read_gives_csv_pandas_and_numpy_what_they_expect(ram):
    path = storage.join(ram, "x.csv")
    storage.write_text(path, 'user_id,item_id\nu1,"a\nb"\nu2,c\n')
    with storage.open_read(path, "utf-8") as handle:
        assert handle.read().count("\n") == 4
    with storage.open_read(path) as handle:
        frame = pd.read_csv(handle, dtype=str)
    assert frame["item_id"].tolist() == ["a\nb", "c"]
    storage.save_npz(storage.join(ram, "a.npz"), x=np.arange(3))
    np.testing.assert_array_equal(storage.load_npz(storage.join(ram, "a.npz"))["x"], [0, 1, 2])
    with pytest.raises(FileNotFoundError, match=r"no file at ram://"):
        storage.open_read(storage.join(ram, "missing.csv"))
    assert storage.listdir(storage.join(ram, "missing")) == []


def test_read_csv_from_ram_equals_the_local_read(ram, tmp_path):
    from tfrec_recall.data.readers import read_csv
    text = "user,item,ts,rating\nu1,i1,1,5\nu1,i2,2,3\nu2,i1,3,4\n"
    (tmp_path / "x.csv").write_text(text)
    storage.write_text(storage.join(ram, "x.csv"), text)
    mapping = {"user_id": "user", "item_id": "item", "timestamp": "ts"}
    local, remote = (read_csv(p, column_map=mapping) for p in (tmp_path / "x.csv", storage.join(ram, "x.csv")))
    pd.testing.assert_frame_equal(local.interactions, remote.interactions)


def test_tfrecords_and_protocol_files_on_ram(ram, small_data):
    from tfrec_recall.data.protocol import write_interactions_csv
    from tfrec_recall.data.tfdata import read_tfrecords, write_tfrecords
    arrays = {"user_id": np.array(["u1", "u2", "u3"]), "x": np.arange(6, dtype=np.float32).reshape(3, 2)}
    write_tfrecords(arrays, storage.join(ram, "records"), num_shards=2)
    batch = next(iter(read_tfrecords(storage.join(ram, "records"), batch_size=8)))
    np.testing.assert_array_equal(batch["x"].numpy(), arrays["x"])
    csv = write_interactions_csv(small_data, storage.join(ram, "data", "interactions.csv"))
    with storage.open_read(csv) as handle:
        assert len(pd.read_csv(handle)) == len(small_data.interactions)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_interactions_csv(small_data, csv)


@pytest.mark.slow
def test_run_directory_export_and_server_on_ram(ram, small_split):
    """train -> save_run -> load_run -> export -> the local server, all on ram://; the ram:// export answers
    as the local run's towers do."""
    from tfrec_recall import training
    from tfrec_recall.config import load_config
    from tfrec_recall.evaluation.evaluate import corpus_arrays, embed
    from tfrec_recall.export import export_retrieval_model
    from tfrec_recall.serving.server import ModelRepository
    config = load_config("youtube_dnn", overrides={"epochs": 2, "embedding_dim": 8, "output_dim": 8,
                                                   "hidden_units": [8], "batch_size": 512})
    resume = storage.join(ram, ".run.resume")
    result = training.train(config, small_split, verbose=0, log_dir=storage.join(resume, "logs"), resume_dir=resume)
    assert training.latest_state(resume).endswith("epoch-0002")
    out = training.save_run(result, small_split, storage.join(ram, "run"), config, {"name": "synthetic"},
                            log_dir=storage.join(resume, "logs"))
    assert {"config.yaml", "candidates.npz", "query_tower", "logs", "training.png"} <= set(storage.listdir(out))
    run = training.load_run(out)
    corpus = corpus_arrays(small_split, result.model.candidate_tower.input_specs)
    expected = embed(result.model.candidate_tower, corpus)
    np.testing.assert_allclose(run.candidate_embeddings, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(embed(run.candidate_tower, corpus), expected, rtol=1e-5, atol=1e-6)
    version = export_retrieval_model(run.query_tower, (run.candidate_ids, run.candidate_embeddings),
                                     export_dir_base=storage.join(ram, "serving"), k=5)
    assert version == storage.join(ram, "serving", "1")
    repository = ModelRepository("m", storage.join(ram, "serving"), poll_seconds=60)
    request = storage.read_json(storage.join(out, training.REQUEST_FILE))
    answer = repository.current.signatures["serving_default"](
        **{k: tf.constant(v) for k, v in request.items()})
    assert answer["item_ids"].shape == (2, 5)


def _local_only_calls(path):
    """(line, what) of every pathlib / glob import and builtin open() call in a source file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [(node.lineno, n) for n in names if n in ("pathlib", "glob", "shutil")]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
            found.append((node.lineno, "open()"))
    return found


def test_no_local_only_file_calls_in_the_package():
    """Only tfrec_recall/storage.py may touch the local file system directly (its local fast paths)."""
    offenders = []
    for package in ("tfrec_recall", "pipelines"):
        for directory, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                path = os.path.join(directory, name)
                if name.endswith(".py") and os.path.relpath(path, ROOT) != os.path.join("tfrec_recall", "storage.py"):
                    offenders += [f"{os.path.relpath(path, ROOT)}:{line}: {what}"
                                  for line, what in _local_only_calls(path)]
    assert offenders == []
