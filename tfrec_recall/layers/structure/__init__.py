"""Learned retrieval structures: Deep Retrieval's path model (``PathStructure``) and path codes."""
from tfrec_recall.layers.structure.path_model import (PathStructure, check_beam_width, code_paths, path_codes,
                                                      place_values)

__all__ = ["PathStructure", "check_beam_width", "path_codes", "code_paths", "place_values"]
