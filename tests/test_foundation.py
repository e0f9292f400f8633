"""Install, import, config and registration: the foundation every other test stands on."""

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

import gridclip
from gridclip.config import get_gridclip_cfg, resolve_config_path
from gridclip.data import novel_class_mask, register_lvis_format_dataset
from gridclip.evaluation import patch_lvis_for_numpy2


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
    mask = novel_class_mask(meta)
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
    novel = novel_class_mask(MetadataCatalog.get("tiny_all"))
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
