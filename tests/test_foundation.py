"""Install, import, config and registration: the foundation every other test stands on."""

import os
import stat

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

import gridclip
from gridclip.config import get_gridclip_cfg, resolve_config_path
from gridclip.data import NoClassFrequenciesError, novel_class_mask, register_lvis_format_dataset
from gridclip.evaluation import patch_lvis_for_numpy2
from gridclip.utils import CacheError, CacheMismatchError, atomic_write, load_cache, save_cache
from gridclip.utils.cache import decode_strings, encode_strings, read_cache_header


def test_detectron2_and_clip_import():
    import clip.model  # noqa: F401
    import detectron2
    import lvis  # noqa: F401

    assert detectron2.__version__
    assert hasattr(clip.model, "CLIP")


def test_project_tools_not_shadowed():
    import importlib.util

    spec = importlib.util.find_spec("tools")
    assert spec is None or "site-packages" not in (spec.origin or ""), spec


def test_config_has_project_keys_and_is_idempotent():
    cfg = get_gridclip_cfg()
    assert cfg.MODEL.GRIDCLIP.LOGIT_SCALE > 0
    cfg.MODEL.GRIDCLIP.LOGIT_SCALE = 3.0
    gridclip.add_gridclip_config(cfg)  # second call keeps values
    assert cfg.MODEL.GRIDCLIP.LOGIT_SCALE == 3.0
    assert cfg.MODEL.VILD.TEMPERATURE == pytest.approx(0.01)


def test_unknown_config_key_is_a_clear_error():
    with pytest.raises(
        (KeyError, AssertionError), match="Non-existent key: MODEL.GRIDCLIP.NOT_A_KEY"
    ):
        get_gridclip_cfg(opts=["MODEL.GRIDCLIP.NOT_A_KEY", "1"])


def test_missing_config_file_names_it():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        resolve_config_path("nope.yaml")


def test_lvis_ovd_split_registered_with_frequencies():
    meta = MetadataCatalog.get("lvis_v1_train_ovd_base")
    assert len(meta.thing_classes) == 1203
    mask = novel_class_mask("lvis_v1_train_ovd_base", 1203)
    assert int(mask.sum()) == 337  # rare = novel
    assert meta.evaluator_type == "lvis"
    assert len(MetadataCatalog.get("lvis_v1_val").class_frequencies) == 1203


def test_missing_lvis_files_point_to_readme(tmp_path, monkeypatch):
    meta = MetadataCatalog.get("lvis_v1_train_ovd_base")
    if __import__("os").path.exists(meta.json_file):
        pytest.skip("LVIS is installed here")
    with pytest.raises(FileNotFoundError, match="datasets/README.md"):
        DatasetCatalog.get("lvis_v1_train_ovd_base")


def test_registration_is_idempotent(tiny_lvis_json):
    json_file, image_root = tiny_lvis_json
    register_lvis_format_dataset("tiny_reg_test", json_file, image_root)
    register_lvis_format_dataset("tiny_reg_test", json_file, image_root)  # no error
    with pytest.raises(ValueError, match="already registered"):
        register_lvis_format_dataset("tiny_reg_test", json_file + ".other", image_root)


def test_base_only_split_drops_novel_annotations(tiny_lvis_json):
    json_file, image_root = tiny_lvis_json
    register_lvis_format_dataset("tiny_base", json_file, image_root, base_only=True)
    register_lvis_format_dataset("tiny_all", json_file, image_root)
    base = DatasetCatalog.get("tiny_base")
    full = DatasetCatalog.get("tiny_all")
    novel = novel_class_mask("tiny_all")
    assert novel.tolist() == [False, True]
    assert sum(len(d["annotations"]) for d in full) == 3
    assert all(a["category_id"] == 0 for d in base for a in d["annotations"])
    assert len(base) == len(full)  # images stay: novel objects become unlabelled background


def test_non_contiguous_category_ids_rejected(tmp_path):
    import json

    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"categories": [{"id": 2, "name": "a", "frequency": "f"}]}))
    with pytest.raises(ValueError, match="contiguous"):
        register_lvis_format_dataset("bad_ids", str(p), str(tmp_path))


def test_lvis_eval_numpy2_shim_gives_perfect_ap(tiny_lvis_json):
    from lvis import LVIS, LVISEval, LVISResults

    assert patch_lvis_for_numpy2() or hasattr(np, "float")
    json_file, _ = tiny_lvis_json
    gt = LVIS(json_file)
    dets = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 0.9,
        }
        for a in gt.dataset["annotations"]
    ]
    ev = LVISEval(gt, LVISResults(gt, dets), "bbox")
    ev.run()
    assert ev.results["AP"] == pytest.approx(1.0)
    # and a wrong prediction scores lower: the evaluation can fail
    bad = [dict(d, bbox=[d["bbox"][0] + 30, d["bbox"][1] + 30, 5, 5]) for d in dets]
    ev = LVISEval(gt, LVISResults(gt, bad), "bbox")
    ev.run()
    assert ev.results["AP"] < 0.5


def test_collect_env_runs_in_the_venv():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "detectron2.utils.collect_env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "detectron2" in out.stdout


def test_novel_class_mask_names_missing_frequencies_and_count_mismatch():
    MetadataCatalog.get("no_frequencies_test").set(thing_classes=["a", "b"])
    with pytest.raises(NoClassFrequenciesError, match="'no_frequencies_test'.*MODEL.X.Y False"):
        novel_class_mask("no_frequencies_test", setting="MODEL.X.Y")
    with pytest.raises(ValueError, match="class_frequencies for 1203 classes, the model has 5"):
        novel_class_mask("lvis_v1_train_ovd_base", 5)


# ------------------------------------------------------------ layer 0: atomic writes, caches
def test_atomic_write_mode_follows_umask_and_error_leaves_target(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    old = os.umask(0o027)
    try:
        with atomic_write(str(target), "w") as f:
            f.write("one")
    finally:
        os.umask(old)
    assert target.read_text() == "one"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640  # 0666 & ~027, not mkstemp's 0600
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(str(target), "w") as f:
            f.write("two")
            raise RuntimeError("boom")
    assert target.read_text() == "one"
    assert os.listdir(target.parent) == ["out.txt"]  # the temporary file is gone
    with pytest.raises(ValueError, match="mode 'a'"):
        atomic_write(str(target), "a")


def test_cache_round_trip_records_kind_and_provenance(tmp_path):
    path = str(tmp_path / "c.safetensors")
    tensors = {"x": torch.randn(3, 4), "keys": encode_strings(["1", "b", "é"])}
    provenance = {"clip": "0123abcd", "grids": (1, 2), "dataset": "world"}
    save_cache(path, tensors, "test_kind", provenance)
    loaded, recorded = load_cache(path, "test_kind", {"grids": [1, 2], "clip": "0123abcd"})
    assert torch.equal(loaded["x"], tensors["x"])
    assert decode_strings(loaded["keys"]) == ["1", "b", "é"]
    assert recorded == {"clip": "0123abcd", "grids": [1, 2], "dataset": "world"}
    assert read_cache_header(path, "test_kind") == recorded
    save_cache(path, {}, "empty_kind", {})  # a header-only file (ViLD cache meta)
    assert load_cache(path, "empty_kind") == ({}, {})


def test_cache_refuses_other_kind_version_provenance_naming_both(tmp_path, monkeypatch):
    path = str(tmp_path / "c.safetensors")
    save_cache(path, {"x": torch.zeros(2)}, "text_embeddings", {"clip": "aaaa"})
    with pytest.raises(
        CacheMismatchError,
        match=r"c\.safetensors: kind is \"text_embeddings\" "
        r"in the file but \"gridclip_teacher\" is expected",
    ):
        load_cache(path, "gridclip_teacher")
    with pytest.raises(CacheMismatchError) as info:
        load_cache(path, "text_embeddings", {"clip": "bbbb"}, hint="Rebuild it with tools/x.py.")
    e = info.value
    assert (e.path, e.key, e.cached, e.expected) == (path, "provenance['clip']", "aaaa", "bbbb")
    assert '"aaaa" in the file but "bbbb" is expected' in str(e) and "tools/x.py" in str(e)
    with pytest.raises(CacheMismatchError, match=r"provenance\['dataset'\] is \(absent\)"):
        load_cache(path, "text_embeddings", {"dataset": "world"})
    import gridclip.utils.cache as cache_module

    monkeypatch.setattr(cache_module, "CACHE_FORMAT_VERSION", 2)
    with pytest.raises(CacheMismatchError, match='format_version is "1" in the file but "2"'):
        load_cache(path, "text_embeddings")


def test_cache_truncated_foreign_or_missing_file_is_named(tmp_path):
    path = tmp_path / "c.safetensors"
    save_cache(str(path), {"x": torch.randn(100)}, "k", {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(CacheError, match=r"c\.safetensors is truncated, corrupt"):
        load_cache(str(path), "k")
    torch.save({"x": torch.zeros(1)}, str(tmp_path / "old.pt"))  # a cache of the old format
    with pytest.raises(CacheError, match=r"old\.pt .*must be rebuilt"):
        load_cache(str(tmp_path / "old.pt"), "k")
    with pytest.raises(CacheError, match=r"none\.safetensors does not exist"):
        load_cache(str(tmp_path / "none.safetensors"), "k")
