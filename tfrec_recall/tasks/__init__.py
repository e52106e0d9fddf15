"""Tasks: losses as Keras layers (TFRS style); a model computes embeddings and hands them to its task."""
from tfrec_recall.tasks.retrieval import RetrievalTask

__all__ = ["RetrievalTask"]
