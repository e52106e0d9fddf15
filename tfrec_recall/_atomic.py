"""Atomic directory writes: build everything in a temporary sibling, rename it into place at the end; an
exclusive lock for writers sharing a directory; removal of the temporaries a killed writer left behind."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_directory(final, tmp=None):
    """Yields a fresh temporary directory; when the block succeeds it becomes ``final`` (by rename), when it
    fails it is removed, so ``final`` is either complete or absent."""
    final = Path(final)
    tmp = Path(tmp) if tmp is not None else final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    done = False
    try:
        yield tmp
        os.replace(tmp, final)
        done = True
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_new_file(final):
    """Yields a temporary path beside ``final``; when the block succeeds it is renamed to ``final``, when it
    fails it is removed. Refuses to replace an existing ``final``."""
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{final} exists; refusing to overwrite it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def exclusive_lock(directory, what: str):
    """Holds an exclusive ``flock`` on ``directory`` itself (no lock file is left behind; the lock is released
    when the process ends, even by SIGKILL); ``RuntimeError`` at once when another process holds it. ``what``
    names the writer in the message."""
    import fcntl
    handle = os.open(str(directory), os.O_RDONLY)
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
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return float("inf")  # alive, start unknown: treated as the owner


def remove_stale_temporaries(parent, pattern: str) -> list:
    """Removes the directories in ``parent`` whose name matches ``pattern`` (a regex with a group ``pid``) and
    that no running process can own: their process is gone, or started after the directory was last written
    (the pid was reused). Returns the removed paths."""
    parent, removed = Path(parent), []
    if not parent.is_dir():
        return removed
    for path in parent.iterdir():
        match = re.fullmatch(pattern, path.name)
        if match is None or not path.is_dir():
            continue
        start = _process_start(int(match.group("pid")))
        if start is None or (start != float("inf") and start > path.stat().st_mtime + 1.0):
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s, left by an interrupted run (process %s)", path, match.group("pid"))
            removed.append(path)
    return removed
