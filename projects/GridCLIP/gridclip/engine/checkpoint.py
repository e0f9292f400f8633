"""Atomic checkpoints: a killed run never leaves a half-written ``.pth`` or ``last_checkpoint``.

fvcore's ``Checkpointer`` writes every file through ``self.path_manager.open(path, "wb"/"w")``.
Instead of re-implementing ``save``, :class:`AtomicCheckpointer` swaps in a path manager whose
write-mode ``open`` goes to a temporary file in the same folder, fsyncs it and ``os.replace``-s it
over the target on a clean close (and deletes it if the writer raised). Reading is unchanged.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from detectron2.checkpoint import DetectionCheckpointer

logger = logging.getLogger(__name__)

__all__ = ["AtomicCheckpointer", "atomic_open", "AtomicWritePathManager"]


class _AtomicFile:
    """A file object that becomes visible at ``path`` only when closed without error."""

    def __init__(self, path: str, mode: str):
        directory = os.path.dirname(os.path.abspath(path)) or "."
        os.makedirs(directory, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(
            prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory
        )
        self._file = os.fdopen(fd, mode)
        self._path = path
        self._done = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self._path)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._file.close()
        try:
            os.remove(self._tmp)
        except FileNotFoundError:
            pass


def atomic_open(path: str, mode: str = "wb") -> _AtomicFile:
    """Open ``path`` for writing such that it appears atomically on close (temp + rename)."""
    if not any(m in mode for m in "wx") or "+" in mode:
        raise ValueError(f"atomic_open is for writing a new file, got mode {mode!r}")
    return _AtomicFile(path, mode.replace("x", "w"))


class AtomicWritePathManager:
    """Wraps an iopath ``PathManager``: local writes become atomic, everything else delegates."""

    def __init__(self, base):
        self._base = base

    def open(self, path: str, mode: str = "r", **kwargs):
        local = "://" not in path
        if local and any(m in mode for m in "wx") and "+" not in mode:
            return atomic_open(path, mode)
        return self._base.open(path, mode, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose checkpoint files and ``last_checkpoint`` are atomic."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        make_atomic(self)

    def _load_file(self, filename: str):
        try:
            return super()._load_file(filename)
        except (EOFError, RuntimeError, OSError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise RuntimeError(
                f"Checkpoint {filename!r} is unreadable or corrupt ({type(e).__name__}: {e}). "
                "Delete it (and fix 'last_checkpoint' in its folder) or pass another MODEL.WEIGHTS."
            ) from e


def make_atomic(checkpointer) -> None:
    """Make an existing fvcore/Detectron2 checkpointer write atomically (idempotent)."""
    if not isinstance(checkpointer.path_manager, AtomicWritePathManager):
        checkpointer.path_manager = AtomicWritePathManager(checkpointer.path_manager)
