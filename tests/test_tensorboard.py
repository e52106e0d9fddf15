"""TensorBoard logs of training (training/tensorboard.py): scalars, the projector checkpoint, config and
metadata (one row per item, with a header), moved into the run directory by save_run."""
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfrec_recall.training.tensorboard import item_titles, write_projector


def test_projector_files_and_metadata_with_titles(tmp_path):
    log_dir = str(tmp_path / "logs")
    write_projector(log_dir, ["i1", "i2", "i3"], np.eye(3), ["Toy Story (1995)", "A\tB", "C"])
    names = set(tf.io.gfile.listdir(log_dir))
    assert {"metadata.tsv", "projector_config.pbtxt", "checkpoint"} <= names
    lines = (tmp_path / "logs" / "metadata.tsv").read_text().splitlines()
    assert lines == ["item_id\ttitle", "i1\tToy Story (1995)", "i2\tA B", "i3\tC"]  # a tab in a title is a space
    config = (tmp_path / "logs" / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "item_embedding/.ATTRIBUTES/VARIABLE_VALUE"' in config and "metadata.tsv" in config
    restored = tf.train.load_variable(tf.train.latest_checkpoint(log_dir), "item_embedding/.ATTRIBUTES/VARIABLE_VALUE")
    np.testing.assert_array_equal(restored, np.eye(3))
    with pytest.raises(ValueError, match=r"embeddings must be \[len\(ids\), dim\]"):
        write_projector(log_dir, ["i1"], np.eye(3))


def test_titles_fall_back_to_ids(small_data):
    ids = list(small_data.items[:3])
    assert item_titles(small_data, ids) == ids  # the synthetic items have no titles
    titles = pd.Series(["Alpha", ""], index=pd.Index(["a", "b"], name="item_id"))
    data = type(small_data)(small_data.interactions, item_titles=titles)
    assert item_titles(data, ["a", "b", "zz"]) == ["Alpha", "b", "zz"]  # empty or unknown: the id


def test_training_writes_scalars_and_projector_into_the_run(tmp_path, small_split):
    from tfrec_recall import training
    from tfrec_recall.config import load_config
    config = load_config("youtube_dnn", overrides={"epochs": 1, "embedding_dim": 8, "output_dim": 8,
                                                   "hidden_units": [8], "batch_size": 512})
    log_dir = str(tmp_path / "tb")
    with pytest.raises(ValueError, match=r"log_dir must be None or a non-empty path, got ''"):
        training.train(config, small_split, log_dir="")
    result = training.train(config, small_split, evaluate_every=1, verbose=0, log_dir=log_dir)
    assert tf.io.gfile.glob(f"{log_dir}/train/events.out.tfevents.*")
    assert tf.io.gfile.glob(f"{log_dir}/validation/events.out.tfevents.*")  # val_ metrics
    rows = (tmp_path / "tb" / "metadata.tsv").read_text().splitlines()
    assert rows[0] == "item_id\ttitle" and len(rows) == 1 + len(small_split.data.items)
    out = Path(training.save_run(result, small_split, tmp_path / "run", config, {"name": "synthetic"},
                                 log_dir=log_dir))
    assert (out / "logs" / "projector_config.pbtxt").is_file() and not (tmp_path / "tb").exists()
