"""File operations for local paths and URIs alike (``gs://``, ``s3://``, ``hdfs://``, TensorFlow's ``ram://``).

Every file the package reads or writes goes through these functions, which use ``tf.io.gfile``; a pathlib or
glob call would see ``gs://bucket/run`` as a relative local path and write nothing where the user asked (the
tests run the run directory, the exporter and the resume state on ``ram://`` to catch that).

Paths are strings; ``join`` / ``parent`` / ``name`` are string operations that keep a URI's scheme.

Directory renames: on a local disk ``os.replace`` makes a finished directory appear at once. Object stores
have no directory rename (``tf.io.gfile.rename`` of a directory on ``ram://`` silently drops its files, on
``gs://`` it copies object by object), so there :func:`move_directory` copies the tree, the files named in
``last`` at the very end (a SavedModel's ``saved_model.pb``, which TF Serving waits for), then removes the source.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
from typing import Any, Iterable, List, Optional, Sequence


def gfile():
    """``tf.io.gfile``, imported on first use (the CLI checks local paths before it pays for TensorFlow)."""
    import tensorflow as tf
    return tf.io.gfile


def op_error() -> type:
    """The base class of what ``tf.io.gfile`` raises besides OSError (NotFoundError, PermissionDeniedError...)."""
    import tensorflow as tf
    return tf.errors.OpError


def path_str(path) -> str:
    """``path`` (str or os.PathLike) as a string; a ``file://`` URI as its local path."""
    text = os.fspath(path)
    return text[len("file://"):] if text.startswith("file://") else text


def is_local(path) -> bool:
    """True for a path on the local file system (no ``scheme://``)."""
    return "://" not in path_str(path)


def join(base, *parts: str) -> str:
    base = path_str(base)
    return os.path.join(base, *parts) if is_local(base) else posixpath.join(base, *parts)


def parent(path) -> str:
    text = path_str(path).rstrip("/")
    return os.path.dirname(os.path.abspath(text)) if is_local(text) else posixpath.dirname(text)


def name(path) -> str:
    return posixpath.basename(path_str(path).rstrip("/"))


def exists(path) -> bool:
    path = path_str(path)
    return os.path.exists(path) if is_local(path) else gfile().exists(path)


def isdir(path) -> bool:
    path = path_str(path)
    return os.path.isdir(path) if is_local(path) else gfile().isdir(path)


def isfile(path) -> bool:
    return exists(path) and not isdir(path)


def listdir(path) -> List[str]:
    """Names in directory ``path`` (without the trailing '/' some file systems add); [] when it is absent."""
    if not isdir(path):
        return []
    path = path_str(path)
    return sorted(os.listdir(path) if is_local(path) else (n.rstrip("/") for n in gfile().listdir(path)))


def is_empty_dir(path) -> bool:
    return isdir(path) and not listdir(path)


def makedirs(path) -> str:
    gfile().makedirs(path_str(path))
    return path_str(path)


def rmtree(path) -> None:
    """Removes ``path`` (a directory tree or a file) when it exists."""
    path = path_str(path)
    if is_local(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
    elif isdir(path):
        gfile().rmtree(path)
    elif exists(path):
        gfile().remove(path)


class _GFileReader(io.RawIOBase):
    """A ``tf.io.gfile.GFile`` opened for reading, as the raw stream ``io`` / csv / pandas / pyarrow expect."""

    def __init__(self, path: str):
        super().__init__()
        self._file = gfile().GFile(path, "rb")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._file.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            offset, whence = self._file.size() + offset, io.SEEK_SET
        self._file.seek(offset, whence)
        return self._file.tell()

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


def open_read(path, encoding: Optional[str] = None):
    """``path`` opened for reading: binary (a buffered reader) or, given ``encoding``, text with newlines
    untranslated (``newline=""``, as the csv module wants)."""
    path = path_str(path)
    if not exists(path) or isdir(path):
        raise FileNotFoundError(f"no file at {path}")
    raw = open(path, "rb") if is_local(path) else io.BufferedReader(_GFileReader(path))
    return raw if encoding is None else io.TextIOWrapper(raw, encoding=encoding, newline="")


def read_bytes(path) -> bytes:
    """The file's bytes (local files read directly: /proc files report size 0 to tf.io.gfile)."""
    path = path_str(path)
    with (open(path, "rb") if is_local(path) else gfile().GFile(path, "rb")) as f:
        return f.read()


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path, data: bytes) -> None:
    with gfile().GFile(path_str(path), "wb") as f:
        f.write(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_json(path) -> Any:
    return json.loads(read_text(path))


def write_json(path, value, indent: int = 2) -> None:
    write_text(path, json.dumps(value, indent=indent))


def save_npz(path, **arrays) -> None:
    """``np.savez`` to any path (built in memory: zip writing needs a seekable file)."""
    import numpy as np
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def load_npz(path):
    """The arrays of an ``.npz`` file at any path (no pickles)."""
    import numpy as np
    return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)


def save_figure(figure, path, **kwargs) -> None:
    """Saves a matplotlib figure as PNG to any path."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **kwargs)
    write_bytes(path, buffer.getvalue())


def walk_files(root) -> List[str]:
    """Every file under ``root``, as paths relative to it (sorted, '/'-separated)."""
    root = path_str(root).rstrip("/")
    out = []
    for directory, _, files in gfile().walk(root):
        relative = path_str(directory)[len(root):].strip("/")
        out += [posixpath.join(relative, f.rstrip("/")) if relative else f.rstrip("/") for f in files]
    return sorted(out)


def copy_tree(src, dst, last: Sequence[str] = ()) -> None:
    """Copies the files under ``src`` to ``dst`` (created), the relative paths in ``last`` after all others."""
    files = walk_files(src)
    ordered = [f for f in files if f not in last] + [f for f in files if f in last]
    makedirs(dst)
    for relative in ordered:
        target = join(dst, *relative.split("/"))
        makedirs(parent(target))
        gfile().copy(join(src, *relative.split("/")), target, overwrite=True)


def move_directory(src, dst, last: Sequence[str] = ("saved_model.pb",)) -> None:
    """Moves directory ``src`` to ``dst``, which must be absent or an empty directory. Atomic on a local disk
    (``os.replace``); elsewhere a copy (``last`` files at the end) and a removal of ``src``."""
    src, dst = path_str(src), path_str(dst)
    if exists(dst) and not is_empty_dir(dst):
        raise FileExistsError(f"{dst} exists and is not empty; not replacing it")
    if is_local(src) and is_local(dst):
        os.replace(src, dst)
        return
    rmtree(dst)
    copy_tree(src, dst, last)
    rmtree(src)


def files_matching(directory, prefix: str = "", suffix: str = "") -> List[str]:
    """Paths of the files in ``directory`` whose names start with ``prefix`` and end with ``suffix``."""
    return [join(directory, n) for n in listdir(directory)
            if n.startswith(prefix) and n.endswith(suffix) and not isdir(join(directory, n))]


def mtime(path) -> float:
    """Last modification time, epoch seconds (``tf.io.gfile.stat`` gives no directory times on a local disk)."""
    path = path_str(path)
    return os.stat(path).st_mtime if is_local(path) else gfile().stat(path).mtime_nsec / 1e9


def first_missing(directory, names: Iterable[str]):
    """The first of ``names`` absent from ``directory``, or None."""
    return next((n for n in names if not exists(join(directory, n))), None)
