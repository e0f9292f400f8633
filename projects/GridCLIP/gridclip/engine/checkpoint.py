"""Atomic checkpoints: a killed run never leaves a half-written ``.pth`` or ``last_checkpoint``.

fvcore's ``Checkpointer`` writes every file through ``self.path_manager.open(path, "wb"/"w")``.
Instead of re-implementing ``save``, :class:`AtomicCheckpointer` swaps in a path manager whose
write-mode ``open`` is :func:`gridclip.utils.io.atomic_write` (a temporary file in the same
folder, fsynced and ``os.replace``-d over the target on a clean close, deleted if the writer
raised; the file mode follows the umask). Reading is unchanged.

It also refuses to save non-finite weights (a diverged run must not overwrite good checkpoints with
NaN/inf ones), turns a corrupt file into an error that says what to do, and on resume deletes the
temporary files a killed writer left behind.

Loading weights of another architecture (a whole module of the model absent from the checkpoint,
or a whole module of the checkpoint absent from the model, e.g. ViLD's weights given to GridCLIP)
raises :class:`CheckpointArchitectureError` naming the modules, where fvcore only warns about
"parameters not found" and the model runs with random heads. Exceptions: the checkpoint of another
vocabulary (text-embedding buffers of another class count) loads, the model keeping its own
vocabulary, with a log line that says so; a training run's initial ``MODEL.WEIGHTS``
(``mismatch="warn"``, what :class:`~gridclip.engine.trainer.Trainer` sets; resuming is always
strict) may hold only some modules, e.g. a pre-trained backbone, with a warning naming the modules
that start from their initialisation.
"""

from __future__ import annotations

import glob
import logging
import os
from contextlib import contextmanager
from typing import Any, Dict, Iterable, List, Tuple

import detectron2.engine.defaults as d2_defaults
import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..utils.io import TEMP_SUFFIX, atomic_write
from .vocabulary import drop_checkpoint_vocabulary

logger = logging.getLogger(__name__)

__all__ = [
    "AtomicCheckpointer",
    "CheckpointArchitectureError",
    "architecture_mismatch",
    "project_checkpointer",
    "AtomicWritePathManager",
    "atomic_write",
    "make_atomic",
    "non_finite_entries",
]


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


class CheckpointArchitectureError(RuntimeError):
    """A checkpoint of another architecture than the model (whole modules missing/unexpected)."""


def _module_of(key: str, depth: int = 2) -> str:
    """The module a state-dict key belongs to, at most ``depth`` levels deep
    (``head.cls_subnet.0.weight`` -> ``head.cls_subnet``; ``pixel_mean`` -> ``""``)."""
    return ".".join(key.split(".")[:-1][:depth])


def _group(keys: Iterable[str]) -> Dict[str, List[str]]:
    groups: Dict[str, List[str]] = {}
    for key in keys:
        groups.setdefault(_module_of(key), []).append(key)
    return groups


def architecture_mismatch(
    model_keys: Iterable[str], missing: Iterable[str], unexpected: Iterable[str]
) -> Tuple[List[str], List[str]]:
    """(modules of the model none of whose weights the checkpoint has, modules of the checkpoint
    none of whose weights the model has), each sorted. Modules are key prefixes two levels deep
    (``head.cls_subnet``, ``roi_heads.box_predictor``); keys with a shape mismatch must not be
    in ``missing``."""
    missing, unexpected = set(missing), set(unexpected)
    whole_missing = [
        module
        for module, keys in _group(model_keys).items()
        if module and all(k in missing for k in keys)
    ]
    whole_unexpected = [module for module in _group(unexpected) if module]
    model_modules = set(_group(model_keys))
    whole_unexpected = [m for m in whole_unexpected if m not in model_modules]
    return sorted(whole_missing), sorted(whole_unexpected)


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose checkpoint files and ``last_checkpoint`` are atomic, which
    never saves non-finite weights, reports a corrupt checkpoint clearly, and refuses weights of
    another architecture.

    Args:
        mismatch: ``"error"`` (default: evaluation, the predictor, the demo) or ``"warn"`` (a
            training run's initial weights) for a checkpoint of another architecture; resuming a
            run's own checkpoint is always ``"error"``.
    """

    def __init__(self, *args, mismatch: str = "error", **kwargs):
        super().__init__(*args, **kwargs)
        make_atomic(self)
        assert mismatch in ("error", "warn"), f"mismatch must be 'error' or 'warn', not {mismatch}"
        self.mismatch = mismatch
        self._resuming = False
        self._loading = ""

    def load(self, path: str, *args, **kwargs):
        self._loading = path
        return super().load(path, *args, **kwargs)

    def _load_model(self, checkpoint: Any):
        # The model's vocabulary comes from its config; a checkpoint's of another vocabulary is
        # dropped whole (text embeddings + novel mask), with an info line, never half-loaded.
        dropped = set()
        if isinstance(checkpoint.get("model"), dict):
            dropped = set(drop_checkpoint_vocabulary(self.model, checkpoint["model"]))
        incompatible = super()._load_model(checkpoint)
        reshaped = {key for key, _, _ in incompatible.incorrect_shapes}
        missing = [k for k in incompatible.missing_keys if k not in reshaped and k not in dropped]
        model_keys = list(self.model.state_dict().keys())
        lacking, extra = architecture_mismatch(model_keys, missing, incompatible.unexpected_keys)
        if lacking or extra:
            message = (
                f"checkpoint {self._loading!r} is of another architecture than the model "
                f"({type(self.model).__name__}): "
                + "; ".join(
                    part
                    for part in (
                        (
                            f"the checkpoint has no weights for the model's {lacking}"
                            if lacking
                            else ""
                        ),
                        f"the model has no module {extra} of the checkpoint" if extra else "",
                    )
                    if part
                )
                + " (a checkpoint of another model or config?)"
            )
            if self._resuming or self.mismatch == "error":
                raise CheckpointArchitectureError(
                    message + ". Pass the checkpoint trained with this config (MODEL.WEIGHTS)."
                )
            logger.warning(message + ": those modules start from their initialisation.")
        return incompatible

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
        self._resuming = bool(resume and self.has_checkpoint())
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._resuming = False

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


@contextmanager
def project_checkpointer():
    """Make Detectron2's ``DefaultTrainer`` / ``DefaultPredictor`` (which build a
    ``DetectionCheckpointer`` inside their ``__init__``) build an :class:`AtomicCheckpointer`."""
    original = d2_defaults.DetectionCheckpointer
    d2_defaults.DetectionCheckpointer = AtomicCheckpointer
    try:
        yield
    finally:
        d2_defaults.DetectionCheckpointer = original
