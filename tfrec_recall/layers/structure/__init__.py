"""Learned retrieval structures: Deep Retrieval's path model (``PathStructure``)."""
from tfrec_recall.layers.structure.path_model import PathStructure, check_beam_width

__all__ = ["PathStructure", "check_beam_width"]
