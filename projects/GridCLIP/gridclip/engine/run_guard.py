"""One training run per ``OUTPUT_DIR``, and ``--resume`` only with a config its checkpoint fits.

:class:`OutputDirLock` holds a `filelock <https://py-filelock.readthedocs.io>`_ lock on
``OUTPUT_DIR/.run.lock`` for as long as a run lives. The operating system drops the lock when
the process ends, however it ends (``kill -9`` included), so a lock file left by a dead run is
recognised as free and taken over, with a log line naming the run that left it. Who holds the
lock (pid, host, start time) is written next to it, in ``.run.lock.json``, so that a second
run fails at once with a message naming the first. (On network file systems whose locks are
not shared between machines, two machines can still both take it.)

:func:`check_resume_config` compares the ``config.yaml`` a run saved with the config of its
``--resume`` before anything is written: a change of a model-architecture key (``MODEL.*``, except
paths, device, losses' weights and test-time settings) would make the checkpoint unloadable (or
crash later in the optimizer) and is refused, naming each key with both values.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any, Dict, List, Optional, Tuple

import yaml
from filelock import FileLock, Timeout

from ..utils.io import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "LOCK_FILE",
    "LOCK_INFO_FILE",
    "OutputDirBusyError",
    "OutputDirLock",
    "ResumeConfigError",
    "architecture_changes",
    "check_resume_config",
    "flatten_config",
    "lock_output_dir",
]

LOCK_FILE = ".run.lock"
LOCK_INFO_FILE = ".run.lock.json"


class OutputDirBusyError(RuntimeError):
    """Another live run holds the lock on the output folder."""


_HELD: Dict[str, "OutputDirLock"] = {}  # this process's locks, by folder (flock is per file
# description: a second FileLock of the same file in one process would block on the first)


def lock_output_dir(output_dir: str) -> "OutputDirLock":
    """Acquire (or return, when this process already holds it) the lock of ``output_dir``.

    Raises:
        OutputDirBusyError: another live process holds it; the message names it.
    """
    key = os.path.abspath(os.path.expanduser(output_dir))
    lock = _HELD.get(key)
    if lock is None or not lock.held:
        lock = _HELD[key] = OutputDirLock(key)
    return lock.acquire()


class OutputDirLock:
    """Exclusive lock of a run on its output folder (see the module docstring).

    Use as a context manager or with :meth:`acquire` / :meth:`release`; acquiring never waits.
    """

    def __init__(self, output_dir: str):
        self.output_dir = os.path.abspath(os.path.expanduser(output_dir))
        self.path = os.path.join(self.output_dir, LOCK_FILE)
        self.info_path = os.path.join(self.output_dir, LOCK_INFO_FILE)
        self._lock = FileLock(self.path, timeout=0)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def holder(self) -> Optional[Dict]:
        """What the last run to take the lock wrote about itself (None when unknown)."""
        try:
            with open(self.info_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def acquire(self) -> "OutputDirLock":
        if self.held:
            return self
        os.makedirs(self.output_dir, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            info = self.holder() or {}
            raise OutputDirBusyError(
                f"OUTPUT_DIR {self.output_dir} is in use by another run (pid "
                f"{info.get('pid', '?')} on {info.get('host', '?')}, started "
                f"{info.get('started', '?')}): two runs in one folder would interleave their "
                "logs, metrics and checkpoints. Wait for it to end, stop it, or choose another "
                "OUTPUT_DIR."
            ) from None
        previous = self.holder()
        if previous and previous.get("pid") != os.getpid():
            logger.info(
                f"{self.output_dir}: taking over the lock of an ended run (pid "
                f"{previous.get('pid')} on {previous.get('host')}, started "
                f"{previous.get('started')})"
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        with atomic_write(self.info_path, "w") as f:
            json.dump(info, f)
        return self

    def release(self) -> None:
        if self.held:
            self._lock.release(force=True)

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class ResumeConfigError(ValueError):
    """``--resume`` with a config whose model the saved checkpoint does not fit."""


#: Parts of a ``MODEL.*`` key's last name that mark it as no architecture setting.
_NOT_ARCHITECTURE = (
    "WEIGHT",  # MODEL.WEIGHTS, MODEL.CLIP.WEIGHTS (paths), loss weights
    "DEVICE",
    "CACHE",
    "TEST",
    "THRESH",
    "NMS",
    "TOPK",
    "LOSS",
    "SCORE",
    "PIXEL",
    "ALPHA",
    "GAMMA",
    "BETA",
    "PROMPTS",
    "TEXT_EMBEDDINGS",
)


def flatten_config(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """A config (a CfgNode or the dict of its YAML) as ``{"MODEL.FPN.OUT_CHANNELS": 256, ...}``."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten_config(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def architecture_changes(saved_yaml: str, cfg) -> List[Tuple[str, Any, Any]]:
    """(key, saved value, new value) of the ``MODEL.*`` architecture keys that differ."""
    saved = flatten_config(yaml.safe_load(saved_yaml) or {})
    new = flatten_config(yaml.safe_load(cfg.dump()))
    changes = []
    for key in sorted(set(saved) | set(new)):
        if not key.startswith("MODEL."):
            continue
        last = key.rsplit(".", 1)[-1]
        if any(token in last for token in _NOT_ARCHITECTURE):
            continue
        if saved.get(key, "(absent)") != new.get(key, "(absent)"):
            changes.append((key, saved.get(key, "(absent)"), new.get(key, "(absent)")))
    return changes


def check_resume_config(cfg, output_dir: Optional[str] = None) -> None:
    """Refuse ``--resume`` into ``output_dir`` (default ``cfg.OUTPUT_DIR``) when its saved
    ``config.yaml`` differs from ``cfg`` in a model-architecture key; call it before anything
    writes into the folder (``default_setup`` overwrites ``config.yaml``)."""
    output_dir = output_dir or cfg.OUTPUT_DIR
    path = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = f.read()
    try:
        changes = architecture_changes(saved, cfg)
    except yaml.YAMLError as e:
        raise ResumeConfigError(f"--resume: cannot read the run's saved config {path}: {e}")
    if changes:
        listed = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, a, b in changes)
        raise ResumeConfigError(
            f"--resume into {output_dir}: the model of this config differs from the run's "
            f"({path}): {listed}. Its checkpoint does not fit this model: resume with the run's "
            "config, or start a new run in another OUTPUT_DIR (MODEL.WEIGHTS can point at the "
            "checkpoint to fine-tune from). Nothing was written."
        )
