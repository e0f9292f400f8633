"""Trainer pieces shared by train_net.py, tools and tests."""

from .checkpoint import AtomicCheckpointer, atomic_open, make_atomic
from .trainer import Trainer, build_evaluator, write_results
from .vocabulary import drop_checkpoint_vocabulary, evaluation_vocabulary

__all__ = [
    "AtomicCheckpointer",
    "atomic_open",
    "make_atomic",
    "Trainer",
    "build_evaluator",
    "drop_checkpoint_vocabulary",
    "evaluation_vocabulary",
    "write_results",
]
