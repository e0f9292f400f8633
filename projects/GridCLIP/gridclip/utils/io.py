"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator

__all__ = ["atomic_write"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file in ``path``'s folder for writing; on a clean exit flush, fsync and
    ``os.replace`` it onto ``path``. The final file's mode follows the umask (0666 & ~umask), as
    ``open`` would give it, not mkstemp's 0600. On an exception the temporary file is removed
    and ``path`` is left untouched.
    """
    if not any(m in mode for m in "wx") or "+" in mode or "a" in mode:
        raise ValueError(f"atomic_write writes a whole new file, got mode {mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode.replace("x", "w")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
