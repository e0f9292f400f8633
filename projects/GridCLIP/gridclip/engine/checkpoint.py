"""Atomic checkpoints: a killed run never leaves a half-written ``.pth`` or ``last_checkpoint``.

fvcore's ``Checkpointer`` writes every file through ``self.path_manager.open(path, "wb"/"w")``.
Instead of re-implementing ``save``, :class:`AtomicCheckpointer` swaps in a path manager whose
write-mode ``open`` is :func:`gridclip.utils.io.atomic_write` (a temporary file in the same
folder, fsynced and ``os.replace``-d over the target on a clean close, deleted if the writer
raised; the file mode follows the umask). Reading is unchanged.

It also refuses to save non-finite weights (a diverged run must not overwrite good checkpoints with
NaN/inf ones), turns a corrupt file into an error that says what to do, and on resume deletes the
temporary files a killed writer left behind.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Any, List

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..utils.io import TEMP_SUFFIX, atomic_write
from .vocabulary import drop_checkpoint_vocabulary

logger = logging.getLogger(__name__)

__all__ = [
    "AtomicCheckpointer",
    "AtomicWritePathManager",
    "atomic_open",
    "atomic_write",
    "make_atomic",
    "non_finite_entries",
]

#: Deprecated alias of :func:`gridclip.utils.io.atomic_write` (kept for existing callers).
atomic_open = atomic_write


class AtomicWritePathManager:
    """Wraps an iopath ``PathManager``: local writes become atomic, everything else delegates."""

    def __init__(self, base):
        self._base = base

    def open(self, path: str, mode: str = "r", **kwargs):
        local = "://" not in path
        if local and any(m in mode for m in "wx") and "+" not in mode:
            return atomic_write(path, mode)  # fvcore always writes inside ``with``
        return self._base.open(path, mode, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


def non_finite_entries(state_dict) -> List[str]:
    """Names of the floating-point tensors of ``state_dict`` that hold a NaN or inf."""
    return [
        name
        for name, value in state_dict.items()
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()
    ]


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose checkpoint files and ``last_checkpoint`` are atomic, which
    never saves non-finite weights, and which reports a corrupt checkpoint clearly."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        make_atomic(self)

    def save(self, name: str, **kwargs: Any) -> None:
        """Like ``Checkpointer.save``; raises ``FloatingPointError`` (writing nothing, so
        ``last_checkpoint`` keeps naming the previous good file) if a weight is NaN or inf."""
        if self.save_dir and self.save_to_disk:
            bad = non_finite_entries(self.model.state_dict())
            if bad:
                raise FloatingPointError(
                    f"Refusing to save checkpoint {name!r} in {self.save_dir}: the model has "
                    f"non-finite (NaN/inf) values in {bad[:5]}"
                    + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
                    + ". Training diverged; the previous checkpoint is kept. Lower SOLVER.BASE_LR "
                    "or enable SOLVER.CLIP_GRADIENTS, then rerun with --resume."
                )
        super().save(name, **kwargs)

    def resume_or_load(self, path: str, *, resume: bool = True):
        if resume and self.save_dir and self.save_to_disk:
            self._remove_stale_temp_files()
        return super().resume_or_load(path, resume=resume)

    def _remove_stale_temp_files(self) -> None:
        """Delete ``.<file>.<random>.tmp`` files that a killed run left in ``save_dir``."""
        for tmp in glob.glob(os.path.join(glob.escape(self.save_dir), ".*" + TEMP_SUFFIX)):
            if not os.path.isfile(tmp):
                continue
            logger.warning(f"Removing {tmp}: a checkpoint write interrupted by a previous run")
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass

    def _load_model(self, checkpoint):
        # The model's vocabulary comes from its config; a checkpoint's of another vocabulary is
        # dropped whole (text embeddings + novel mask), with an info line, never half-loaded.
        if isinstance(checkpoint.get("model"), dict):
            drop_checkpoint_vocabulary(self.model, checkpoint["model"])
        return super()._load_model(checkpoint)

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
