"""Layer-0 helpers shared by every other layer (no import of the rest of the package)."""

from .io import atomic_write

__all__ = ["atomic_write"]
