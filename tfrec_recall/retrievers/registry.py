"""The one registry of top-k index types: public name (``"brute_force"``, ``"ivf"``, ``"scann"``) -> class.

It is filled only by the index class definitions, through the :func:`register_index` decorator; everything that
offers a choice of index by name (``make_index``, the export and pipeline command lines, ``create_pipeline``)
reads :func:`index_names` or :func:`index_class`. This module imports no TensorFlow itself, but
:func:`index_names` and :func:`index_class` import :mod:`tfrec_recall.retrievers` (and so TensorFlow) so that every
built-in index class has registered.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple, TypeVar

T = TypeVar("T", bound=type)

_INDEX_TYPES: Dict[str, type] = {}  # written only by register_index


def register_index(name: str) -> Callable[[T], T]:
    """Class decorator: registers an index class under the public ``name`` (used by ``--index`` options).

    Raises ``ValueError`` when ``name`` is not a non-empty string or is already registered."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"index name must be a non-empty string, got {name!r}")

    def decorate(cls: T) -> T:
        if name in _INDEX_TYPES:
            raise ValueError(f"index name {name!r} is already registered (by {_INDEX_TYPES[name].__qualname__}); "
                             f"cannot register {cls.__qualname__} under it")
        _INDEX_TYPES[name] = cls
        return cls

    return decorate


def _load_builtin_indexes() -> None:
    """Imports the index package, whose modules register the built-in index classes."""
    import tfrec_recall.retrievers  # noqa: F401


def index_names() -> Tuple[str, ...]:
    """The registered index names, sorted."""
    _load_builtin_indexes()
    return tuple(sorted(_INDEX_TYPES))


def index_class(name: str) -> type:
    """The index class registered under ``name``; ``ValueError`` naming the choices otherwise."""
    _load_builtin_indexes()
    if name not in _INDEX_TYPES:
        raise ValueError(f"index must be one of {list(index_names())}, got {name!r}")
    return _INDEX_TYPES[name]

