"""TensorBoard logs of a training run: scalars (loss, validation metrics) through Keras' ``TensorBoard``
callback, and at the end of training the item embeddings for the embedding projector.

The projector files sit in the log directory itself: a checkpoint of one variable ``item_embedding``
([num_items, dim]), ``metadata.tsv`` (a header ``item_id<TAB>title``, then one row per item in the embedding's
row order; the title is the item table's ``title`` column when the data has one, else the id) and
``projector_config.pbtxt`` linking them. All files are written through ``tf.io.gfile``.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence

import numpy as np
import tensorflow as tf
from tensorboard.plugins import projector

from tfrec_recall.data.schema import InteractionData

EMBEDDING_NAME = "item_embedding"
METADATA_FILE = "metadata.tsv"
CHECKPOINT_PREFIX = "embedding.ckpt"


def require_log_dir(log_dir) -> Optional[str]:
    """``None`` or a non-empty path string; ``ValueError`` naming the value otherwise."""
    if log_dir is None:
        return None
    if not isinstance(log_dir, (str, os.PathLike)) or not str(log_dir):
        raise ValueError(f"log_dir must be None or a non-empty path, got {log_dir!r}")
    return str(log_dir)


def item_titles(data: InteractionData, ids: Sequence[str]) -> List[str]:
    """The title of every id (``data.item_titles``), or the id itself when there is none."""
    if data.item_titles is None:
        return [str(i) for i in ids]
    titles = data.item_titles.reindex(list(ids))
    return [str(t) if isinstance(t, str) and t else str(i) for i, t in zip(ids, titles)]


def _clean(text: str) -> str:
    return " ".join(str(text).replace("\t", " ").split())


def write_projector(log_dir: str, ids: Sequence[str], embeddings: np.ndarray,
                    titles: Optional[Sequence[str]] = None) -> None:
    """Writes the projector checkpoint, ``metadata.tsv`` and ``projector_config.pbtxt`` into ``log_dir``."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    ids = [str(i) for i in ids]
    titles = ids if titles is None else [str(t) for t in titles]
    if embeddings.ndim != 2 or embeddings.shape[0] != len(ids) or len(titles) != len(ids):
        raise ValueError(f"embeddings must be [len(ids), dim] with one title per id, got shape {embeddings.shape} "
                         f"for {len(ids)} ids and {len(titles)} titles")
    tf.io.gfile.makedirs(log_dir)
    rows = ["item_id\ttitle"] + [f"{_clean(i)}\t{_clean(t)}" for i, t in zip(ids, titles)]
    with tf.io.gfile.GFile(os.path.join(log_dir, METADATA_FILE), "w") as f:
        f.write("\n".join(rows) + "\n")
    variable = tf.Variable(embeddings, trainable=False, name=EMBEDDING_NAME)
    tf.train.Checkpoint(**{EMBEDDING_NAME: variable}).save(os.path.join(log_dir, CHECKPOINT_PREFIX))
    config = projector.ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = f"{EMBEDDING_NAME}/.ATTRIBUTES/VARIABLE_VALUE"
    embedding.metadata_path = METADATA_FILE
    projector.visualize_embeddings(log_dir, config)


class ItemEmbeddingProjector(tf.keras.callbacks.Callback):
    """At the end of training (after callbacks listed before it, e.g. EarlyStopping's restore of the best
    weights) writes ``embed_items()`` -> (ids, embeddings) for the projector, with ``titles`` as metadata."""

    def __init__(self, log_dir: str, embed_items: Callable[[], tuple], titles: Optional[Sequence[str]] = None):
        super().__init__()
        self.log_dir, self.embed_items, self.titles = require_log_dir(log_dir), embed_items, titles
        if self.log_dir is None:
            raise ValueError("log_dir must be a non-empty path, got None")

    def on_train_end(self, logs=None):
        ids, embeddings = self.embed_items()
        write_projector(self.log_dir, ids, embeddings, self.titles)


def tensorboard_callbacks(log_dir: str, embed_items: Callable[[], tuple],
                          titles: Optional[Sequence[str]] = None) -> list:
    """Keras' TensorBoard callback (epoch scalars, including ``val_`` metrics added by earlier callbacks) and
    the item-embedding projector; place them after the callbacks that add metrics or restore weights."""
    return [tf.keras.callbacks.TensorBoard(log_dir=log_dir, histogram_freq=0, write_graph=False,
                                           update_freq="epoch", profile_batch=0),
            ItemEmbeddingProjector(log_dir, embed_items, titles)]
