"""A frozen teacher kept outside a detector's module tree, built on first use.

GridCLIP's image-level alignment and ViLD's image distillation both learn from a frozen CLIP
image encoder. Registered as a submodule, that teacher would be saved in every checkpoint, seen
by the optimizer and DDP, and built even for evaluation, which never uses it. So the detector
holds it through a :class:`TeacherHolder`, a plain object (not an ``nn.Module``): the teacher is
not in ``state_dict``, not moved by the detector's ``.to()``, and is moved to the device of the
inputs when it is used (:meth:`TeacherHolder.on`).
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["TeacherHolder"]


class TeacherHolder:
    """Holds a frozen teacher module, or a zero-argument builder that makes it on first use.

    ``holder.get()`` returns the teacher (building it if needed), ``holder.on(device)`` the same
    moved to ``device``; ``holder.set(teacher)`` replaces it. Every teacher it holds is frozen
    (``requires_grad`` off, eval mode).
    """

    def __init__(
        self,
        teacher: Optional[nn.Module] = None,
        builder: Optional[Callable[[], nn.Module]] = None,
        name: str = "CLIP teacher",
        missing_hint: str = "",
    ):
        """
        Args:
            teacher: the teacher, or None to build it with ``builder`` when first needed.
            builder: zero-argument callable returning the teacher.
            name: what the teacher is for (log and error messages).
            missing_hint: appended to the error raised when there is neither teacher nor builder.
        """
        self.builder = builder
        self.name = name
        self.missing_hint = missing_hint
        self._teacher: Optional[nn.Module] = None
        self.set(teacher)

    @property
    def is_built(self) -> bool:
        """Whether the teacher exists (given, or built by an earlier :meth:`get`)."""
        return self._teacher is not None

    @property
    def available(self) -> bool:
        """Whether :meth:`get` can return a teacher (it exists or can be built)."""
        return self._teacher is not None or self.builder is not None

    def set(self, teacher: Optional[nn.Module]) -> None:
        """Hold ``teacher`` (frozen here), or nothing (None: the builder is used again)."""
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher.eval()
        self._teacher = teacher

    def get(self) -> nn.Module:
        """The teacher, built with the builder on first call."""
        if self._teacher is None:
            if self.builder is None:
                raise RuntimeError(f"no {self.name} and no way to build one{self.missing_hint}")
            self.set(self.builder())
            logger.info(f"Built the frozen {self.name} ({type(self._teacher).__name__})")
        return self._teacher

    def on(self, device) -> nn.Module:
        """The teacher on ``device``: moved there on first use on that device (the detector's
        ``.to()`` does not see it)."""
        teacher = self.get()
        first = next(itertools.chain(teacher.parameters(), teacher.buffers()), None)
        if first is not None and first.device != torch.device(device):
            teacher.to(device)
        return teacher

    def __repr__(self) -> str:
        state = type(self._teacher).__name__ if self._teacher is not None else "not built"
        return f"TeacherHolder({self.name}: {state})"
