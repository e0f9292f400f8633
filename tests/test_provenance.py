"""Caches and checkpoints say what they were computed from and refuse to serve another model or
dataset; checkpoints of another architecture are refused (issue 14, item 1)."""

import json
import logging
import os
import shutil
import uuid

import pytest
import tiny_models
import torch
from detectron2.modeling import build_model

from gridclip import get_gridclip_cfg
from gridclip.clip import clip_model_key
from gridclip.clip.teacher_cache import (
    TeacherCache,
    TeacherCacheError,
    TeacherEmbeddingCache,
    gridclip_teacher_provenance,
    write_cache_meta,
)
from gridclip.data import ViLDDatasetMapper, register_lvis_format_dataset
from gridclip.engine import AtomicCheckpointer, CheckpointArchitectureError
from gridclip.engine.predictor import OpenVocabularyPredictor
from gridclip.modeling.image_alignment import ImageAlignment
from gridclip.utils import CacheMismatchError, dataset_fingerprint
from gridclip_tools import cache_teacher_embeddings

D = 64


def register(json_file, root):
    name = f"provenance_test_{uuid.uuid4().hex[:8]}"
    register_lvis_format_dataset(name, json_file, root)
    return name


def other_dataset(tiny_lvis_json, tmp_path):
    """A dataset with the same image ids as ``tiny_lvis_json`` but other images."""
    json_file, root = tiny_lvis_json
    data = json.loads(open(json_file).read())
    for image in data["images"]:
        image["height"], image["width"] = 81, 97
    path = tmp_path / "other.json"
    path.write_text(json.dumps(data))
    return str(path), root


def gridclip_cfg(assets, *opts):
    return get_gridclip_cfg(
        "Base-GridCLIP.yaml",
        tiny_models.tiny_clip_opts(assets, D)
        + ["MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT", 1.0, "MODEL.GRIDCLIP.IMAGE_ALIGN_GRIDS", "[1]"]
        + list(opts),
    )


def write_gridclip_cache(path, provenance):
    cache = TeacherEmbeddingCache(D, [1], provenance)
    cache.add("1", [torch.randn(1, D)])
    cache.add("2", [torch.randn(1, D)])
    return cache.save(str(path))


def test_dataset_fingerprint_is_content_not_name(tiny_lvis_json, tmp_path):
    json_file, root = tiny_lvis_json
    copy = tmp_path / "copy.json"
    shutil.copy(json_file, copy)
    same = [register(json_file, root), register(str(copy), root)]
    assert dataset_fingerprint(same[0]) == dataset_fingerprint(same[1])
    other = register(*other_dataset(tiny_lvis_json, tmp_path))
    assert dataset_fingerprint(same[0]) != dataset_fingerprint(other)
    assert dataset_fingerprint(same) != dataset_fingerprint(same[0])
    with pytest.raises(KeyError, match="not_registered_anywhere"):
        dataset_fingerprint("not_registered_anywhere")


def test_gridclip_teacher_cache_of_another_dataset_or_clip_is_refused(
    assets, tiny_lvis_json, tmp_path
):
    name = register(*tiny_lvis_json)
    other = register(*other_dataset(tiny_lvis_json, tmp_path))
    path = write_gridclip_cache(
        tmp_path / "teacher.safetensors", gridclip_teacher_provenance(gridclip_cfg(assets), name)
    )
    # the dataset it was built on, or the same content under another name: accepted
    cfg = gridclip_cfg(
        assets, "MODEL.GRIDCLIP.TEACHER_CACHE", path, "DATASETS.TRAIN", f"('{name}',)"
    )
    align = ImageAlignment(cfg)
    assert len(align.teacher_cache) == 2
    # same image ids, other images
    cfg = gridclip_cfg(
        assets, "MODEL.GRIDCLIP.TEACHER_CACHE", path, "DATASETS.TRAIN", f"('{other}',)"
    )
    names = rf"built on dataset \"{name}\"; the model trains on \"{other}\""
    with pytest.raises(CacheMismatchError, match=rf"dataset_fingerprint.*{names}"):
        ImageAlignment(cfg)
    # another CLIP (its weights' content key) or teacher input size
    for key, value in (("clip", "0123456789abcdef"), ("teacher_input_size", 224)):
        provenance = dict(gridclip_teacher_provenance(gridclip_cfg(assets), name), **{key: value})
        bad = write_gridclip_cache(tmp_path / f"{key}.safetensors", provenance)
        cfg = gridclip_cfg(
            assets, "MODEL.GRIDCLIP.TEACHER_CACHE", bad, "DATASETS.TRAIN", f"('{name}',)"
        )
        with pytest.raises(
            CacheMismatchError, match=rf"provenance\['{key}'\] is {value}|\"{value}\""
        ):
            ImageAlignment(cfg)


def test_teacher_cache_tool_resumes_by_content_and_refuses_another_dataset(
    assets, tiny_lvis_json, tmp_path
):
    name = register(*tiny_lvis_json)
    other = register(*other_dataset(tiny_lvis_json, tmp_path))
    out = str(tmp_path / "teacher.safetensors")
    moved = str(tmp_path / "moved_clip.pt")
    shutil.copy(assets["clip"], moved)

    def run(dataset, clip, *extra):
        opts = tiny_models.tiny_clip_opts(assets, D) + ["MODEL.CLIP.WEIGHTS", clip]
        args = ["--config-file", "Base-GridCLIP.yaml", "--dataset", dataset, "--output", out]
        opts = [str(o) for o in opts]
        cache_teacher_embeddings.main(args + ["--grids", "1", "--no-progress", *extra] + opts)

    run(name, assets["clip"], "--limit", "1")
    run(name, moved)  # the same CLIP bytes at another path: resumed
    cache = TeacherEmbeddingCache.load(out)
    assert len(cache) == 2 and cache.provenance["dataset_fingerprint"] == dataset_fingerprint(name)
    with pytest.raises(SystemExit, match="dataset_fingerprint.*--overwrite"):
        run(other, assets["clip"])
    run(other, assets["clip"], "--overwrite")
    assert TeacherEmbeddingCache.load(out).provenance["dataset"] == other


def vild_meta(**changes):
    meta = {
        "clip_model": "aaaa",
        "embed_dim": D,
        "crop_scales": [1.0, 1.5],
        "teacher_input_size": 64,
        "proposals": "sliding_windows",
        "num_proposals": 20,
        "datasets": ["a"],
    }
    return dict(meta, **changes)


def test_vild_teacher_cache_checks_clip_crops_and_input_size(tmp_path, caplog):
    out = str(tmp_path / "vild")
    write_cache_meta(out, vild_meta())
    settings = dict(clip_model="aaaa", crop_scales=(1.0, 1.5), teacher_input_size=64)
    with caplog.at_level(logging.INFO, logger="gridclip.clip.teacher_cache"):
        TeacherCache(out, embed_dim=D, num_distill_proposals=20, **settings)
    assert "CLIP aaaa" in caplog.text and "up to 20 per image" in caplog.text
    assert "NUM_DISTILL_PROPOSALS" not in caplog.text
    for key, value in (("clip_model", "bbbb"), ("crop_scales", [1.0]), ("teacher_input_size", 32)):
        with pytest.raises(TeacherCacheError, match=rf"{out}.*{key}.*in the file but"):
            TeacherCache(out, embed_dim=D, **dict(settings, **{key: value}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gridclip.clip.teacher_cache"):
        TeacherCache(out, embed_dim=D, num_distill_proposals=300, **settings)
    assert "at most 20 proposals" in caplog.text and "NUM_DISTILL_PROPOSALS is 300" in caplog.text


def test_vild_mapper_checks_the_cache_against_the_config(assets, tmp_path):
    out = str(tmp_path / "vild")
    cfg = get_gridclip_cfg(
        "Base-ViLD.yaml",
        tiny_models.tiny_clip_opts(assets, D)
        + ["MODEL.VILD.TEACHER", "cache", "MODEL.VILD.TEACHER_CACHE", out]
        + ["MODEL.VILD.CROP_SCALES", "[1.0, 1.5]", "MODEL.VILD.NUM_DISTILL_PROPOSALS", 20],
    )
    write_cache_meta(out, vild_meta(clip_model=clip_model_key(assets["clip"])))
    assert ViLDDatasetMapper(cfg, is_train=True).teacher_cache is not None
    write_cache_meta(out, vild_meta(clip_model="another_clip_key"))
    with pytest.raises(TeacherCacheError, match="clip_model.*another_clip_key"):
        ViLDDatasetMapper(cfg, is_train=True)
    assert os.path.isfile(os.path.join(out, "meta.safetensors"))


# ----------------------------------------------------------------- checkpoints (issue 14, 1)
class _Classifier(torch.nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.register_buffer("text_embeddings", torch.randn(num_classes, 4))


class _Dense(torch.nn.Module):  # GridCLIP-like: backbone + dense head
    def __init__(self, num_classes=3):
        super().__init__()
        self.backbone = torch.nn.Linear(4, 4)
        self.head = torch.nn.Module()
        self.head.cls_subnet = torch.nn.Linear(4, 4)
        self.head.text_classifier = _Classifier(num_classes)


class _TwoStage(torch.nn.Module):  # ViLD-like: backbone + ROI heads
    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Linear(4, 4)
        self.roi_heads = torch.nn.Module()
        self.roi_heads.box_head = torch.nn.Linear(4, 4)


def test_checkpoint_of_another_architecture_is_an_error(tmp_path, caplog):
    AtomicCheckpointer(_TwoStage(), save_dir=str(tmp_path)).save("two_stage")
    AtomicCheckpointer(_Dense(3), save_dir=str(tmp_path)).save("dense3")
    path = str(tmp_path / "two_stage.pth")
    with pytest.raises(CheckpointArchitectureError) as e:
        AtomicCheckpointer(_Dense()).load(path)
    assert "no weights for the model's ['head.cls_subnet', 'head.text_classifier']" in str(e.value)
    assert "no module ['roi_heads.box_head'] of the checkpoint" in str(e.value)
    assert path in str(e.value)
    # a training run's initial weights: a warning naming the modules
    with caplog.at_level(logging.WARNING, logger="gridclip.engine.checkpoint"):
        AtomicCheckpointer(_Dense(), mismatch="warn").load(path)
    assert "start from their initialisation" in caplog.text and "head.cls_subnet" in caplog.text
    # another vocabulary: loads, keeps the model's embeddings, says so
    caplog.clear()
    model = _Dense(5)
    before = model.head.text_classifier.text_embeddings.clone()
    with caplog.at_level(logging.INFO, logger="gridclip.engine.checkpoint"):
        AtomicCheckpointer(model).load(str(tmp_path / "dense3.pth"))
    assert "another vocabulary (3 classes): the model keeps its own (5 classes" in caplog.text
    assert torch.equal(model.head.text_classifier.text_embeddings, before)
    # resuming a run is strict even where initial weights may differ
    AtomicCheckpointer(_TwoStage(), save_dir=str(tmp_path / "run")).save("model_0000009")
    resumed = AtomicCheckpointer(_Dense(), save_dir=str(tmp_path / "run"), mismatch="warn")
    with pytest.raises(CheckpointArchitectureError):
        resumed.resume_or_load("", resume=True)


def test_predictor_refuses_a_checkpoint_of_another_architecture(assets, tmp_path):
    opts = tiny_models.tiny_clip_opts(assets, D) + [
        "MODEL.CLIP_RESNET.FREEZE_AT", 1, "MODEL.FPN.OUT_CHANNELS", 32,
        "MODEL.RETINANET.NUM_CONVS", 1, "MODEL.RETINANET.NUM_CLASSES", 5,
        "MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT", 0.0, "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
    ]  # fmt: skip
    cfg = get_gridclip_cfg("Base-GridCLIP.yaml", opts)
    model = build_model(cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(3, 3)
    torch.save({"model": state}, tmp_path / "other.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "other.pth")
    with pytest.raises(CheckpointArchitectureError, match=r"other\.pth.*'head\.cls_subnet'"):
        OpenVocabularyPredictor(cfg)
    torch.save({"model": model.state_dict()}, tmp_path / "same.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "same.pth")
    assert OpenVocabularyPredictor(cfg).model.num_classes == 5
