"""Version naming for a TF Serving model base path, in one place.

A model's versions are the directories ``BASE/<version>/`` with an integer name (ASCII digits, at most
int64 as in TF Serving; a larger one is no version). Versions are **sequential
integers**: a new version is the largest existing integer version + 1, the first one is 1. This is what
``export_retrieval_model`` writes, what the TFX Pusher (pipelines/pusher.py) writes, and what
serving/models.config's ``specific`` versions and ``version_labels`` refer to (``stable`` = 1, ``canary`` = 2
after the first two pushes). No TensorFlow import: the Pusher uses it on any filesystem TFX's ``fileio``
lists (whose directory names may end in ``/``).
"""
from __future__ import annotations

from typing import Iterable, List


MAX_VERSION = 2 ** 63 - 1  # TF Serving's versions are int64


def version_of(name: str):
    """The integer version a directory name stands for, or None when it is not a version directory: ASCII
    digits only, at most ``MAX_VERSION`` (see ``is_out_of_range``)."""
    name = name.rstrip("/")
    if not (name.isascii() and name.isdigit()) or is_out_of_range(name):
        return None
    return int(name)


def is_out_of_range(name: str) -> bool:
    """True for a name of ASCII digits too large for an int64 version (skipped; servers warn about it)."""
    name = name.rstrip("/")
    return name.isascii() and name.isdigit() and int(name) > MAX_VERSION


def versions_in(names: Iterable[str]) -> List[int]:
    """The integer versions among directory names, ascending."""
    return sorted(v for v in map(version_of, names) if v is not None)


def next_version(names: Iterable[str]) -> int:
    """The version a new push gets: the largest integer version among ``names`` + 1, or 1 when there is none.
    Any integer-named directory counts (even an incomplete one), so a version number is never reused."""
    return max(versions_in(names), default=0) + 1
