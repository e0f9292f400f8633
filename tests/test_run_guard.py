"""One run per OUTPUT_DIR, and --resume only with a config its checkpoint fits (issue 14)."""

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from gridclip import get_gridclip_cfg
from gridclip.engine import (
    OutputDirBusyError,
    ResumeConfigError,
    check_resume_config,
    lock_output_dir,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO_ROOT, "projects", "GridCLIP", "train_net.py")
CONFIG = "embedded/GridCLIP_world.yaml"


def python(code, *args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


HOLD = (
    "import sys, time; from gridclip.engine.run_guard import lock_output_dir; "
    "lock_output_dir(sys.argv[1]); print('locked', flush=True); time.sleep(60)"
)


def test_second_lock_fails_naming_the_first_and_a_dead_runs_lock_is_free(tmp_path, caplog):
    out = str(tmp_path / "run")
    holder = python(HOLD, out)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirBusyError, match=rf"in use by another run \(pid {holder.pid} "):
            lock_output_dir(out)
    finally:
        holder.send_signal(signal.SIGKILL)  # a dead run never releases: the OS drops its lock
        holder.wait()
    with caplog.at_level(logging.INFO, logger="gridclip.engine.run_guard"):
        lock = lock_output_dir(out)
    assert lock.held and f"ended run (pid {holder.pid}" in caplog.text
    assert lock_output_dir(out) is lock  # the same process may ask again
    lock.release()
    assert not lock.held


def test_train_net_into_a_busy_output_dir_fails_fast_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    lock = lock_output_dir(str(out))
    try:
        start = time.time()
        proc = subprocess.run(
            [sys.executable, TRAIN_NET, "--config-file", CONFIG, "OUTPUT_DIR", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        lock.release()
    assert proc.returncode != 0
    assert "OutputDirBusyError" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
    assert not (out / "config.yaml").exists() and not (out / "log.txt").exists()
    assert time.time() - start < 120


def test_resume_with_another_model_is_refused_before_writing(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    saved = get_gridclip_cfg(CONFIG, ["OUTPUT_DIR", str(out)])
    (out / "config.yaml").write_text(saved.dump())
    # training or path settings may change
    same = ["OUTPUT_DIR", str(out), "SOLVER.BASE_LR", 0.5, "MODEL.WEIGHTS", "/x.pth"]
    check_resume_config(get_gridclip_cfg(CONFIG, same))
    other = get_gridclip_cfg(CONFIG, ["OUTPUT_DIR", str(out), "MODEL.RETINANET.NUM_CONVS", 7])
    with pytest.raises(ResumeConfigError, match=r"MODEL.RETINANET.NUM_CONVS: \d+ in the run, 7"):
        check_resume_config(other)
    before = (out / "config.yaml").read_text()
    args = ["--config-file", CONFIG, "--resume", "OUTPUT_DIR", str(out)]
    proc = subprocess.run(
        [sys.executable, TRAIN_NET] + args + ["MODEL.RETINANET.NUM_CONVS", "7"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "ResumeConfigError" in proc.stderr
    assert (out / "config.yaml").read_text() == before and not (out / "log.txt").exists()
