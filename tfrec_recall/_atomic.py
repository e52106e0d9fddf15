"""Atomic directory writes: build everything in a temporary sibling, rename it into place at the end."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


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
