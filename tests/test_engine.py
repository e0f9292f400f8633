"""Atomic checkpoint writes and the trainer's evaluator dispatch."""

import json
import os

import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import LVISEvaluator

from gridclip.config import get_gridclip_cfg
from gridclip.data import register_lvis_format_dataset
from gridclip.engine import (
    AtomicCheckpointer,
    Trainer,
    build_evaluator,
    write_results,
)
from gridclip.utils.io import atomic_write


def test_atomic_open_publishes_only_on_clean_close(tmp_path):
    target = tmp_path / "f.bin"
    with atomic_write(str(target), "wb") as f:
        f.write(b"abc")
        assert not target.exists()  # not visible while writing
    assert target.read_bytes() == b"abc"


def test_atomic_open_leaves_old_file_and_no_temp_on_error(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(str(target), "wb") as f:
            f.write(b"half-written")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_open_rejects_read_modes(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        atomic_write(str(tmp_path / "x"), "r")


def test_checkpointer_writes_atomically_and_resumes(tmp_path):
    model = torch.nn.Linear(3, 2)
    ckpt = AtomicCheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_0000009", iteration=9)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".tmp")) == []
    other = torch.nn.Linear(3, 2)
    extra = AtomicCheckpointer(other, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 9
    assert torch.equal(other.weight, model.weight)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    model = torch.nn.Linear(3, 2)
    AtomicCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    path = tmp_path / "model_final.pth"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated by a crash
    with pytest.raises(RuntimeError, match="model_final.pth.*corrupt"):
        AtomicCheckpointer(model, save_dir=str(tmp_path)).resume_or_load("", resume=True)


def test_evaluator_dispatch_on_evaluator_type(tiny_lvis_json, tmp_path):
    json_file, image_root = tiny_lvis_json
    register_lvis_format_dataset("tiny_eval_dispatch", json_file, image_root)
    cfg = get_gridclip_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    assert isinstance(build_evaluator(cfg, "tiny_eval_dispatch"), LVISEvaluator)
    MetadataCatalog.get("no_type_ds").set(thing_classes=["a"])
    with pytest.raises(NotImplementedError, match="no_type_ds"):
        build_evaluator(cfg, "no_type_ds")


def test_write_results(tmp_path):
    cfg = get_gridclip_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    path = write_results(cfg, {"bbox": {"AP": 12.5, "APr": 3.0}})
    assert json.loads(open(path).read())["results"]["bbox"]["APr"] == 3.0


def test_default_device_follows_machine():
    cfg = get_gridclip_cfg()
    assert cfg.MODEL.DEVICE == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("batch", [0, -4])
def test_a_batch_size_that_is_not_positive_is_named(batch):
    cfg = get_gridclip_cfg("embedded/GridCLIP_world.yaml", ["SOLVER.IMS_PER_BATCH", batch])
    with pytest.raises(ValueError, match=rf"SOLVER.IMS_PER_BATCH = {batch} .*whole number >= 1"):
        Trainer.build_train_loader(cfg)
