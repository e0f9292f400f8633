"""The embedded world (generator, LVIS format, registration) and the shipped small CLIP."""

import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

import gridclip  # noqa: F401  (registers datasets)
from gridclip.clip.small_clip import SMALL_CLIP_ARCH, SMALL_CLIP_WEIGHTS, load_small_clip
from gridclip.data import world
from gridclip.data.world import (
    generate_world,
    register_world,
    render_scene,
    world_categories,
    world_params,
)
from gridclip_tools import make_world, small_clip_training
from gridclip_tools.small_clip_data import ScenePool, caption_for
from gridclip_tools.small_clip_eval import zero_shot_accuracy
from gridclip_tools.small_clip_training import multi_positive_clip_loss

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(preset="ci", num_train=12, num_val=4, image_size=96)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("worlds") / "tiny")
    manifest = generate_world(root, seed=3, **TINY)
    return root, manifest


def _load(root, split):
    with open(os.path.join(root, "annotations", f"{split}.json")) as f:
        return json.load(f)


def test_vocabulary_is_compositional_with_novel_attributes_in_base():
    cats = world_categories()
    assert [c["id"] for c in cats] == list(range(1, 49))
    freqs = [c["frequency"] for c in cats]
    assert (freqs.count("f"), freqs.count("c"), freqs.count("r")) == (20, 18, 10)
    base = [c for c in cats if c["frequency"] != "r"]
    for c in cats:
        assert c["name"] == f"{c['colour']}_{c['shape']}"
        if c["frequency"] == "r":
            assert any(b["colour"] == c["colour"] for b in base), c["name"]
            assert any(b["shape"] == c["shape"] for b in base), c["name"]
    assert len({c["name"] for c in cats}) == 48


def test_render_scene_boxes_are_tight_and_inside():
    rng = np.random.default_rng(0)
    scene = render_scene(rng, 128, category_ids=[5, 9], num_distractors=(0, 0))
    assert scene.image.shape == (128, 128, 3) and scene.image.dtype == np.uint8
    assert [o.category_id for o in scene.objects] == [5, 9]
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
        assert 0 < o.visible_area <= o.full_area
        # tight: the visible area fills a sizeable part of its box (a loose box would not)
        assert o.visible_area >= 0.25 * (x1 - x0) * (y1 - y0)


def test_same_seed_same_bytes_other_seed_differs(tiny_world, tmp_path):
    root, _ = tiny_world
    again = str(tmp_path / "again")
    generate_world(again, seed=3, **TINY)
    for rel in ("annotations/train.json", "annotations/val.json", "train/000000000001.jpg"):
        with open(os.path.join(root, rel), "rb") as a, open(os.path.join(again, rel), "rb") as b:
            assert a.read() == b.read(), rel
    other = str(tmp_path / "other")
    generate_world(other, seed=4, **TINY)
    with open(os.path.join(root, "train/000000000001.jpg"), "rb") as a:
        with open(os.path.join(other, "train/000000000001.jpg"), "rb") as b:
            assert a.read() != b.read()


def test_lvis_format_is_valid(tiny_world):
    from lvis import LVIS

    root, manifest = tiny_world
    for split, count in (("train", 12), ("val", 4)):
        path = os.path.join(root, "annotations", f"{split}.json")
        api = LVIS(path)
        assert len(api.get_img_ids()) == count
        assert len(api.get_cat_ids()) == 48
        data = _load(root, split)
        images = {im["id"]: im for im in data["images"]}
        for im in data["images"]:
            assert im["coco_url"] == f"{split}/{im['file_name']}"
            assert os.path.isfile(os.path.join(root, split, im["file_name"]))
            positives = {a["category_id"] for a in data["annotations"] if a["image_id"] == im["id"]}
            assert not positives & set(im["neg_category_ids"])
            assert set(im["not_exhaustive_category_ids"]) <= positives
            assert len(im["neg_category_ids"]) >= 48 - 8  # at most 8 objects drawn
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            im = images[a["image_id"]]
            assert w > 0 and h > 0 and a["area"] > 0
            assert x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
            assert len(a["segmentation"][0]) >= 6
    assert manifest["summary"]["train"]["images"] == 12
    counts = {c["name"]: c["instance_count"] for c in _load(root, "train")["categories"]}
    assert sum(counts.values()) == manifest["summary"]["train"]["instances"]


def test_novel_objects_in_train_removed_by_base_only_registration(tiny_world):
    root, _ = tiny_world
    names = register_world(root, prefix="test_world_tiny")
    assert names == [
        "test_world_tiny_train",
        "test_world_tiny_train_full",
        "test_world_tiny_val",
        "test_world_tiny_pairs",
    ]
    assert register_world(root, prefix="test_world_tiny") == names  # idempotent
    meta = MetadataCatalog.get("test_world_tiny_train")
    novel = {i for i, f in enumerate(meta.class_frequencies) if f == "r"}
    assert len(novel) == 10 and meta.evaluator_type == "lvis"
    full = DatasetCatalog.get("test_world_tiny_train_full")
    base = DatasetCatalog.get("test_world_tiny_train")
    n_novel_full = sum(a["category_id"] in novel for d in full for a in d["annotations"])
    n_novel_base = sum(a["category_id"] in novel for d in base for a in d["annotations"])
    assert n_novel_full > 0, "novel objects must be drawn (and annotated) in train images"
    assert n_novel_base == 0
    n_full = sum(len(d["annotations"]) for d in full)
    assert sum(len(d["annotations"]) for d in base) == n_full - n_novel_full
    assert all(os.path.isfile(d["file_name"]) for d in base)


def test_cache_hit_does_not_rewrite_and_new_params_regenerate(tmp_path):
    root = str(tmp_path / "w")
    params = dict(preset="ci", num_train=2, num_val=1, image_size=64)
    generate_world(root, **params)
    manifest = os.path.join(root, "manifest.json")
    image = os.path.join(root, "train", "000000000001.jpg")
    stamps = (os.stat(manifest).st_mtime_ns, os.stat(image).st_mtime_ns)
    generate_world(root, **params)
    assert (os.stat(manifest).st_mtime_ns, os.stat(image).st_mtime_ns) == stamps
    out = generate_world(root, **{**params, "num_train": 3})
    assert out["summary"]["train"]["images"] == 3
    assert len(os.listdir(os.path.join(root, "train"))) == 3
    assert sorted(os.listdir(tmp_path)) == ["w"]  # no temporary or old folders left


def test_generation_is_atomic_when_rendering_fails(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = world.render_scene

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("renderer exploded")
        return real(*args, **kwargs)

    monkeypatch.setattr(world, "render_scene", flaky)
    root = tmp_path / "w"
    with pytest.raises(RuntimeError, match="renderer exploded"):
        generate_world(str(root), preset="ci", num_train=4, num_val=2, image_size=64)
    assert calls["n"] == 3
    assert os.listdir(tmp_path) == []  # neither the root nor a temporary folder


def test_refuses_to_replace_a_folder_that_is_not_a_world(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a generated world"):
        generate_world(str(tmp_path / "mine"), preset="ci", num_train=1, num_val=1)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep"


def test_bad_parameters_are_clear_errors():
    with pytest.raises(KeyError, match="unknown world preset 'huge'"):
        world_params("huge")
    with pytest.raises(ValueError, match="num_objects"):
        world_params(num_objects=(5, 2))


def test_missing_world_says_how_to_make_it(tmp_path):
    names = register_world(str(tmp_path / "absent"), prefix="test_world_absent")
    meta = MetadataCatalog.get(names[2])
    assert len(meta.thing_classes) == 48 and meta.thing_classes[0] == "black_cross"
    with pytest.raises(FileNotFoundError, match=r"tools/make_world.py.*make demo"):
        DatasetCatalog.get(names[0])
    # default worlds are registered at import
    assert "gridclip_world_train" in DatasetCatalog.list()
    assert "gridclip_world_ci_val" in DatasetCatalog.list()


def test_make_world_tool_prints_summary(tmp_path, capsys):
    root = str(tmp_path / "w")
    assert (
        make_world.main(["--root", root, "--preset", "ci", "--num-train", "3", "--num-val", "2"])
        == 0
    )
    out = capsys.readouterr().out
    assert "train: 3 images" in out and "val  : 2 images" in out
    assert os.path.isfile(os.path.join(root, "annotations", "val.json"))


# --------------------------------------------------------------------------------- small CLIP
def test_multi_positive_clip_loss_golden():
    eye = torch.eye(2)
    scale = torch.tensor(0.0)  # logit scale 1: logits = identity
    distinct = multi_positive_clip_loss(eye, eye, scale, [frozenset({1}), frozenset({2})])
    assert distinct.item() == pytest.approx(np.log(1 + np.exp(-1)), abs=1e-5)
    same = multi_positive_clip_loss(eye, eye, scale, [frozenset({1}), frozenset({1})])
    assert same.item() == pytest.approx(np.log(1 + np.e) - 0.5, abs=1e-5)


def test_captions_fit_the_context_length():
    import clip

    longest = sorted(range(1, 49), key=lambda c: -len(world_categories()[c - 1]["name"]))[:4]
    rng = np.random.default_rng(0)
    captions = [caption_for(longest, rng) for _ in range(50)]
    captions += [caption_for([longest[0]], rng) for _ in range(50)]
    clip.tokenize(captions, context_length=SMALL_CLIP_ARCH["context_length"])  # raises if long


def test_shipped_small_clip_loads_is_small_and_zero_shot_works():
    from clip.model import ModifiedResNet, build_model

    assert os.path.isfile(SMALL_CLIP_WEIGHTS), "run tools/train_small_clip.py"
    assert os.path.getsize(SMALL_CLIP_WEIGHTS) < 10 * 1024 * 1024
    state_dict = torch.load(SMALL_CLIP_WEIGHTS, map_location="cpu", weights_only=True)
    model = build_model(state_dict).float().eval()
    assert isinstance(model.visual, ModifiedResNet)
    assert model.visual.attnpool.k_proj.in_features == 512  # res5 channels
    torch.manual_seed(0)
    result = zero_shot_accuracy(model, num_per_class=5, seed=777)  # fresh renders
    assert result["overall"] >= 0.9, result["per_class"]
    assert result["novel_mean"] >= 0.85, result["per_class"]


def test_scene_pool_views_captions_and_refresh():
    pool = ScenePool(6, seed=1, image_size=96, require_all_classes=False)
    rng = np.random.default_rng(0)
    views, captions, keys = pool.sample_batch(rng, 12, crop_fraction=0.5)
    assert views.shape == (12, 3, 64, 64) and torch.isfinite(views).all()
    names = pool.names
    for caption, key in zip(captions, keys):
        assert 1 <= len(key) <= 4
        for c in key:  # every named class is in the caption
            assert names[c - 1] in caption, (caption, key)
    before = pool.images.copy()
    pool.refresh(2)
    assert pool.num_rendered == 8
    assert not np.array_equal(pool.images[:2], before[:2])
    assert np.array_equal(pool.images[2:], before[2:])
    assert pool.obj_scene.max() < 6 and len(pool.obj_scene) == len(pool.obj_box)
    for c, idx in enumerate(pool.per_class):
        assert (pool.obj_category[idx] == c + 1).all() and pool.obj_ok[idx].all()


def test_small_clip_training_command_writes_the_shipped_format(tmp_path):
    """``tools/train_small_clip.py``'s code, a few steps: the fp16 weights load back with
    ``build_model``, and the JSON and Markdown reports are written (atomically, whole)."""
    weights, report_md = tmp_path / "clip.pt", tmp_path / "clip.md"
    threads = torch.get_num_threads()
    try:
        args = ["--output", str(weights), "--report-md", str(report_md), "--steps", "2"]
        args += ["--batch-size", "8", "--pool-scenes", "150", "--eval-every", "0"]
        assert small_clip_training.main(args + ["--eval-per-class", "1", "--no-bf16"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert sorted(os.listdir(tmp_path)) == ["clip.json", "clip.md", "clip.pt"]  # no temp files
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(weights).st_mode & 0o777 == 0o666 & ~umask
    state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state_dict.values() if v.is_floating_point())
    model = load_small_clip(str(weights))
    assert model.visual.attnpool.k_proj.in_features == 512 and model.context_length == 32
    with open(tmp_path / "clip.json") as f:
        report = json.load(f)
    assert report["recipe"]["steps"] == 2 and np.isfinite(report["final_loss"])
    assert report["zero_shot"]["num_per_class"] == 1
    assert len(report["zero_shot"]["per_class"]) == 48
    assert 0.0 <= report["scene_retrieval"]["map_named"] <= 1.0
    assert "## Zero-shot accuracy" in report_md.read_text()
