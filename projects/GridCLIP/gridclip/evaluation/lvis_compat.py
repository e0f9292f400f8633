"""The one place where ``lvis`` 0.5.3 is made to work with numpy 2.

``lvis.eval.LVISEval.accumulate`` calls ``np.float``, an alias numpy removed in 1.24. Rather
than monkey-patch numpy for everyone, the ``np`` name inside ``lvis.eval`` alone is pointed at a
thin proxy of numpy that also answers ``float``. Idempotent; a no-op with an old numpy or a fixed
``lvis``.
"""

from __future__ import annotations

import types

import numpy as np

__all__ = ["patch_lvis_for_numpy2"]


class _NumpyWithRemovedAliases(types.ModuleType):
    """Delegates every attribute to numpy, plus the aliases numpy 2 removed."""

    float = float
    int = int
    bool = bool

    def __init__(self):
        super().__init__("numpy")

    def __getattr__(self, name):
        return getattr(np, name)


def patch_lvis_for_numpy2() -> bool:
    """Make ``lvis.eval`` numpy-2 safe. Returns True if a patch was applied (or already was)."""
    try:
        import lvis.eval as lvis_eval
    except ImportError:
        return False
    if hasattr(np, "float"):  # old numpy: nothing to do
        return False
    if not isinstance(lvis_eval.np, _NumpyWithRemovedAliases):
        lvis_eval.np = _NumpyWithRemovedAliases()
    return True
