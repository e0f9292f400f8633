"""Trainer pieces shared by train_net.py, tools and tests."""

from .checkpoint import (
    AtomicCheckpointer,
    CheckpointArchitectureError,
    make_atomic,
    project_checkpointer,
)
from .run_guard import (
    OutputDirBusyError,
    ResumeConfigError,
    check_resume_config,
    lock_output_dir,
)
from .trainer import Trainer, build_evaluator, write_results
from .vocabulary import drop_checkpoint_vocabulary, evaluation_vocabulary

__all__ = [
    "AtomicCheckpointer",
    "CheckpointArchitectureError",
    "make_atomic",
    "OutputDirBusyError",
    "ResumeConfigError",
    "check_resume_config",
    "lock_output_dir",
    "project_checkpointer",
    "Trainer",
    "build_evaluator",
    "drop_checkpoint_vocabulary",
    "evaluation_vocabulary",
    "write_results",
]
