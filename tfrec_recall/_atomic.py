"""Atomic directory writes: build everything in a temporary sibling, move it into place at the end; an
exclusive lock for writers sharing a directory; removal of the temporaries a killed writer left behind.

Paths may be URIs (``gs://``, ``ram://``): everything goes through :mod:`tfrec_recall.storage`. On a local disk
the final move is an atomic rename; on an object store it is a copy (``saved_model.pb`` last) and there is no
lock (object stores have none; a second writer of the same version fails on the non-empty target)."""
from __future__ import annotations

import contextlib
import logging
import os
import re

from tfrec_recall import storage

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_directory(final, tmp=None, last=("saved_model.pb",)):
    """Yields a fresh temporary directory (a path string); when the block succeeds it becomes ``final`` (by
    rename; on an object store by a copy that writes the ``last`` files at the end, so a reader that waits for
    them never sees a partial directory), when it fails it is removed: ``final`` is either complete or absent."""
    final = storage.path_str(final).rstrip("/")
    tmp = storage.path_str(tmp) if tmp is not None else storage.join(
        storage.parent(final), f".{storage.name(final)}.tmp-{os.getpid()}")
    storage.rmtree(tmp)
    storage.makedirs(tmp)
    done = False
    try:
        yield tmp
        storage.move_directory(tmp, final, last)
        done = True
    finally:
        if not done:
            _remove_quietly(tmp)


def _remove_quietly(path) -> None:
    """Removes a temporary after a failure, without hiding that failure behind a cleanup error."""
    try:
        storage.rmtree(path)
    except (OSError, storage.op_error()) as error:
        logger.warning("could not remove the temporary %s: %s", path, error)


@contextlib.contextmanager
def atomic_new_file(final):
    """Yields a temporary path beside ``final``; when the block succeeds it is renamed to ``final``, when it
    fails it is removed. Refuses to replace an existing ``final``."""
    final = storage.path_str(final)
    if storage.exists(final):
        raise FileExistsError(f"{final} exists; refusing to overwrite it")
    storage.makedirs(storage.parent(final))
    tmp = storage.join(storage.parent(final), f".{storage.name(final)}.tmp-{os.getpid()}")
    try:
        yield tmp
        storage.gfile().rename(tmp, final, overwrite=False)
    finally:
        if storage.exists(tmp):
            storage.rmtree(tmp)


@contextlib.contextmanager
def exclusive_lock(directory, what: str):
    """Holds an exclusive ``flock`` on ``directory`` itself (no lock file is left behind; the lock is released
    when the process ends, even by SIGKILL); ``RuntimeError`` at once when another process holds it. ``what``
    names the writer in the message."""
    import fcntl
    if not storage.is_local(directory):
        yield
        return
    handle = os.open(storage.path_str(directory), os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another {what} is writing to {directory} right now; wait for it to finish, or "
                               "write elsewhere") from None
        yield
    finally:
        os.close(handle)


def _process_start(pid: int):
    """The start time (epoch seconds) of process ``pid``; None when it is not running; inf when unknown."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    try:
        ticks = int(storage.read_text(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in storage.read_text("/proc/stat").splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, storage.op_error(), ValueError, IndexError, StopIteration):
        return float("inf")  # alive, start unknown: treated as the owner


def remove_stale_temporaries(parent, pattern: str) -> list:
    """Removes the directories in ``parent`` whose name matches ``pattern`` (a regex with a group ``pid``) and
    that no running process can own: their process is gone, or started after the directory was last written
    (the pid was reused). Returns the removed paths."""
    removed = []
    for entry in storage.listdir(parent):
        match, path = re.fullmatch(pattern, entry), storage.join(parent, entry)
        if match is None or not storage.isdir(path):
            continue
        if not storage.is_local(path):  # a process id on another machine says nothing here
            logger.warning("%s looks like a temporary left by an interrupted run; remove it by hand", path)
            continue
        start = _process_start(int(match.group("pid")))
        if start is None or (start != float("inf") and start > storage.mtime(path) + 1.0):
            storage.rmtree(path)
            logger.info("removed %s, left by an interrupted run (process %s)", path, match.group("pid"))
            removed.append(path)
    return removed
