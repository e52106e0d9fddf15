"""Shared fixtures. Two logical CPU devices are configured before TensorFlow runs any op, so the
MirroredStrategy test can run in the same (single) pytest process as everything else."""
from pathlib import Path

import pytest

import tfrec_recall  # noqa: F401  (selects tf-keras before TensorFlow is imported)
import tensorflow as tf

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

ML100K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k"
REQUIRES_ML100K = pytest.mark.skipif(not (ML100K / "u.data").is_file(),
                                     reason=f"MovieLens 100K is absent (expected at {ML100K})")


def chance_hit_rate(split, k: int, which: str = "test") -> float:
    """HR@k of a random ranking (PROTOCOL.md): k / (#items - #excluded training items), averaged over the
    users of ``split.valid`` or ``split.test``."""
    rows = getattr(split, which).drop_duplicates("user_id")
    n_items = len(split.data.items)
    return float(sum(min(1.0, k / (n_items - len(split.train_items[u]))) for u in rows["user_id"]) / len(rows))


@pytest.fixture(scope="session")
def small_data():
    from tfrec_recall.data import make_synthetic
    return make_synthetic(num_users=300, num_items=200, num_categories=8, mean_interactions=15, seed=3)


@pytest.fixture(scope="session")
def small_split(small_data):
    from tfrec_recall.data import leave_last_out
    return leave_last_out(small_data, history_length=10)


@pytest.fixture(scope="session")
def mirrored_strategy():
    """One MirroredStrategy over the two logical CPUs for the whole session. Each new strategy restarts its
    collective instance keys while TensorFlow's process-wide collective executor remembers earlier instances,
    so a second strategy's all_gather can collide with the first's (seen here: "Collective instance 101
    expected ... data_type 1 but got ... data_type 9")."""
    devices = tf.config.list_logical_devices("CPU")
    assert len(devices) >= 2, "two logical CPU devices are configured above"
    return tf.distribute.MirroredStrategy([d.name for d in devices[:2]])


@pytest.fixture(scope="session")
def tiny_model(small_split):
    """A YouTubeDNN model trained for one epoch on the small split, with its corpus embeddings."""
    from tfrec_recall import training
    from tfrec_recall.config import load_config
    config = load_config("youtube_dnn", overrides={"epochs": 1, "embedding_dim": 16, "output_dim": 16,
                                                   "hidden_units": [16], "batch_size": 256})
    model = training.train(config, small_split, evaluate_every=0, verbose=0).model
    embeddings = training.embed(model.candidate_tower,
                                training.corpus_arrays(small_split, model.candidate_tower.encoder.specs))
    return model, small_split.data.items, embeddings
