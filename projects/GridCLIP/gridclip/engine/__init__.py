"""Trainer pieces shared by train_net.py, tools and tests."""

from .checkpoint import AtomicCheckpointer, atomic_open, make_atomic
from .trainer import Trainer, build_evaluator, write_results

__all__ = [
    "AtomicCheckpointer",
    "atomic_open",
    "make_atomic",
    "Trainer",
    "build_evaluator",
    "write_results",
]
