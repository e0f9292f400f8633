"""The one atomic file writer of the project, and its folder counterpart.

A reader never sees a half-written file: :func:`atomic_write` writes to a temporary file in the
target's folder, flushes and fsyncs it, and ``os.replace``-s it over the target only when the
``with`` block ends without an exception (otherwise the temporary file is deleted and the target
is left as it was). The published file gets the mode an ordinary ``open`` would give it
(``0o666 & ~umask``), not ``mkstemp``'s private 0600, so colleagues sharing a results folder can
read checkpoints and caches.

Hand-written because no library in the environment fits: ``atomicwrites`` is unmaintained and
does not apply the umask; this is ~60 lines. :func:`built_in_place_of` does the same for a
whole folder (a generated dataset): built beside its target, swapped in only when complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import IO, Iterator, Optional

__all__ = ["atomic_write", "built_in_place_of", "TEMP_SUFFIX", "current_umask"]

#: Suffix of the temporary files (``.<name>.<random>.tmp``); a killed writer may leave one.
TEMP_SUFFIX = ".tmp"


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic set-and-restore
    os.umask(mask)
    return mask


class atomic_write:  # noqa: N801  (used like a function: ``with atomic_write(path) as f``)
    """Context manager writing ``path`` atomically.

    Args:
        path: the file to create or replace; its folder is created if missing.
        mode: ``"wb"`` (default) or ``"w"`` (text, UTF-8); ``"x"`` is accepted as ``"w"``.

    Example::

        with atomic_write("out/results.json", "w") as f:
            json.dump(results, f)

    Raises:
        ValueError: for a reading or appending mode (at construction, before anything is
            created).
    """

    def __init__(self, path, mode: str = "wb"):
        if not any(m in mode for m in "wx") or any(m in mode for m in "ra+"):
            raise ValueError(f"atomic_write writes a whole new file; got mode {mode!r}")
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self.mode = mode.replace("x", "w")
        self._tmp: Optional[str] = None
        self._file: Optional[IO] = None

    def __enter__(self) -> IO:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(
            prefix="." + os.path.basename(self.path) + ".", suffix=TEMP_SUFFIX, dir=directory
        )
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
            kwargs = {} if "b" in self.mode else {"encoding": "utf-8"}
            self._file = os.fdopen(fd, self.mode, **kwargs)
        except BaseException:
            os.close(fd)
            os.remove(self._tmp)
            raise
        return self._file

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self._file is not None and self._tmp is not None, "atomic_write was not entered"
        try:
            if exc_type is None:
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
                self._tmp = None
        finally:
            if self._tmp is not None and os.path.exists(self._tmp):
                os.remove(self._tmp)
        return False


@contextlib.contextmanager
def built_in_place_of(dst: str) -> Iterator[str]:
    """A fresh folder beside ``dst`` (mode from the umask) to build into; on success it replaces
    ``dst`` (an existing ``dst`` is swapped out first, then deleted), on any error it is removed
    and ``dst`` is left as it was: a killed or failed generation never leaves a partial folder."""
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would become the folder's mode
    try:
        yield tmp
        if os.path.exists(dst):
            old = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".old-", dir=parent)
            os.replace(dst, os.path.join(old, "previous"))
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
