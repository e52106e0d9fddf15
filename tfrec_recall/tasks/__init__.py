"""Tasks: losses as Keras layers (TFRS style); a model computes embeddings and hands them to its task.
The main retrieval loss is :class:`RetrievalTask`; extra training losses derive from :class:`AuxiliaryLoss`; :class:`PathLikelihoodTask` is Deep Retrieval's structure
objective."""
from tfrec_recall.tasks.auxiliary import AlignmentLoss, AuxiliaryLoss
from tfrec_recall.tasks.path_likelihood import PathLikelihoodTask
from tfrec_recall.tasks.retrieval import RetrievalTask

__all__ = ["RetrievalTask", "AuxiliaryLoss", "AlignmentLoss", "PathLikelihoodTask"]
