"""The LVIS v1 path, checked on a miniature LVIS v1 (issue 15, item 6).

The miniature has LVIS v1's real layout and format: ``lvis/lvis_v1_{train,val}.json`` with the
real 1,203 categories (Detectron2's ``lvis_v1_categories``: names, synonyms, frequencies),
images referenced only by ``coco_url`` (no ``file_name``, as in LVIS v1) under
``coco/{train,val}2017``, ``neg_category_ids`` / ``not_exhaustive_category_ids`` per image.
The images are the two real photos that matplotlib (a dependency of the project) ships in its
sample data, ``grace_hopper.jpg`` and ``Minduka_Present_Blue_Pack.png``, and flips / crops of
them (no other photos are available offline); boxes are placed by hand, roughly. One training
image holds only a rare (novel) object.

The slow test runs the README's LVIS commands with ``DETECTRON2_DATASETS`` pointing at the
miniature and a random CLIP of RN50's architecture (the benchmark's: the real vision tower,
a shrunk text tower, fp16, OpenAI's format) at a small input size: the text dump, both teacher
caches, a few training iterations of GridCLIP and ViLD reading those caches (the registered
``lvis_v1_train_ovd_base`` split), and ``compare_eval.py`` evaluating both on ``lvis_v1_val``
with the ``lvis`` API. The fast tests check the loader on the same files.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES
from PIL import Image

from gridclip.data import register_lvis_format_dataset
from gridclip_tools.benchmark import RN50_ARCHITECTURE, BenchmarkAssets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = os.path.join(REPO, "projects", "GridCLIP")
CATEGORY = {c["name"]: c for c in LVIS_CATEGORIES}
NOVEL_ONLY_IMAGE = 4  # train image whose only object is rare


def _photos():
    """The real photos shipped in matplotlib's sample data (RGB), or generated stand-ins."""
    import matplotlib

    folder = os.path.join(matplotlib.get_data_path(), "sample_data")
    photos = {}
    for name, size in (("grace_hopper.jpg", (512, 600)), ("Minduka_Present_Blue_Pack.png", None)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            photos[name] = Image.open(path).convert("RGB")
        else:  # a generated image of the same size
            w, h = size or (128, 128)
            noise = np.random.RandomState(len(photos)).randint(0, 256, (h, w, 3), dtype=np.uint8)
            photos[name] = Image.fromarray(noise)
    return photos["grace_hopper.jpg"], photos["Minduka_Present_Blue_Pack.png"].resize((256, 256))


def _images():
    """(split, id, PIL image, [(category name, [x, y, w, h]), ...]) of the miniature."""
    hopper, present = _photos()
    flip = Image.Transpose.FLIP_LEFT_RIGHT
    crop = hopper.crop((96, 240, 416, 560))  # 320 x 320: tie and jacket front
    return [
        ("train", 1, hopper, [("person", [40, 30, 440, 570]), ("necktie", [220, 380, 70, 150])]),
        ("train", 2, hopper.transpose(flip), [("person", [32, 30, 440, 570])]),
        ("train", 3, present, [("gift_wrap", [30, 20, 200, 220]), ("box", [30, 20, 200, 220])]),
        ("train", NOVEL_ONLY_IMAGE, crop, [("broach", [120, 120, 60, 60])]),  # rare only
        ("val", 5, crop.transpose(flip), [("necktie", [100, 140, 80, 170])]),
        ("val", 6, present.transpose(flip), [("gift_wrap", [26, 20, 200, 220])]),
        ("val", 7, hopper, [("person", [40, 30, 440, 570]), ("jacket", [60, 300, 400, 300])]),
    ]


def make_lvis_miniature(root: str) -> str:
    """Write the miniature under ``root`` (a ``$DETECTRON2_DATASETS``); returns ``root``."""
    splits = {"train": {"images": [], "annotations": []}, "val": {"images": [], "annotations": []}}
    counts = {}
    for split, image_id, image, objects in _images():
        folder = os.path.join(root, "coco", f"{split}2017")
        os.makedirs(folder, exist_ok=True)
        file_name = f"{image_id:012d}.jpg"
        image.save(os.path.join(folder, file_name), quality=92)
        present = {CATEGORY[n]["id"] for n, _ in objects}
        # LVIS v1 image records: no file_name; coco_url names the COCO 2017 folder and file
        splits[split]["images"].append(
            {
                "id": image_id,
                "coco_url": f"http://images.cocodataset.org/{split}2017/{file_name}",
                "height": image.height,
                "width": image.width,
                "license": 1,
                "flickr_url": "",
                "date_captured": "2013-11-14 17:02:52",
                "neg_category_ids": [c for c in (1, 2, 3) if c not in present],
                "not_exhaustive_category_ids": [],
            }
        )
        for name, (x, y, w, h) in objects:
            category_id = CATEGORY[name]["id"]
            splits[split]["annotations"].append(
                {
                    "id": len(splits["train"]["annotations"])
                    + len(splits["val"]["annotations"])
                    + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                }
            )
            if split == "train":
                counts.setdefault(category_id, set()).add(image_id)
    for split, data in splits.items():
        categories = []
        for c in sorted(LVIS_CATEGORIES, key=lambda c: c["id"]):
            c = dict(c)
            c["image_count"] = len(counts.get(c["id"], ()))
            c["instance_count"] = c["image_count"]
            categories.append(c)
        data.update(
            info={"description": "LVIS v1 miniature (tests/test_lvis_miniature.py)"},
            licenses=[{"id": 1, "name": "see matplotlib's sample_data README", "url": ""}],
            categories=categories,
        )
        os.makedirs(os.path.join(root, "lvis"), exist_ok=True)
        with open(os.path.join(root, "lvis", f"lvis_v1_{split}.json"), "w") as f:
            json.dump(data, f)
    return root


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    return make_lvis_miniature(str(tmp_path_factory.mktemp("lvis_miniature")))


# ------------------------------------------------------------------------------ fast tests
def test_miniature_is_lvis_v1(miniature):
    with open(os.path.join(miniature, "lvis", "lvis_v1_val.json")) as f:
        data = json.load(f)
    assert len(data["categories"]) == 1203
    assert {f: sum(c["frequency"] == f for c in data["categories"]) for f in "fcr"} == {
        "f": 405,
        "c": 461,
        "r": 337,
    }
    assert all("file_name" not in image and "coco_url" in image for image in data["images"])


def test_loader_finds_images_by_coco_url(miniature):
    name = "lvis_miniature_train_fast"
    register_lvis_format_dataset(
        name,
        os.path.join(miniature, "lvis", "lvis_v1_train.json"),
        os.path.join(miniature, "coco"),
        base_only=True,
    )
    dicts = DatasetCatalog.get(name)
    assert [os.path.relpath(d["file_name"], miniature) for d in dicts][0] == os.path.join(
        "coco", "train2017", "000000000001.jpg"
    )
    assert all(os.path.isfile(d["file_name"]) for d in dicts)
    assert len(MetadataCatalog.get(name).thing_classes) == 1203
    # the OVD split keeps the image whose only object is novel, without annotations ...
    novel_only = [d for d in dicts if d["image_id"] == NOVEL_ONLY_IMAGE]
    assert len(novel_only) == 1 and novel_only[0]["annotations"] == []
    # ... and Detectron2's DATALOADER.FILTER_EMPTY_ANNOTATIONS (default True) drops it from
    # training; False keeps it (image-level alignment uses it)
    ids = {d["image_id"] for d in get_detection_dataset_dicts([name], filter_empty=True)}
    assert NOVEL_ONLY_IMAGE not in ids and len(ids) == 3
    ids = {d["image_id"] for d in get_detection_dataset_dicts([name], filter_empty=False)}
    assert NOVEL_ONLY_IMAGE in ids and len(ids) == 4


def test_loader_error_names_coco_url_not_file_name(miniature, tmp_path):
    with open(os.path.join(miniature, "lvis", "lvis_v1_val.json")) as f:
        data = json.load(f)
    for image in data["images"]:
        image["file_name"] = os.path.basename(image.pop("coco_url"))  # a COCO-style record
    path = tmp_path / "no_coco_url.json"
    path.write_text(json.dumps(data))
    name = "lvis_miniature_no_coco_url"
    register_lvis_format_dataset(name, str(path), os.path.join(miniature, "coco"))
    with pytest.raises(ValueError) as error:
        DatasetCatalog.get(name)
    message = str(error.value)
    assert str(path) in message and "'coco_url'" in message
    assert "needs no file_name" in message


# ------------------------------------------------------------------------- the whole path
def _run(args, env, cwd, timeout=1800):
    result = subprocess.run(
        [sys.executable] + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{' '.join(args[:2])} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
        f"{result.stderr[-6000:]}"
    )
    return result


@pytest.mark.slow
def test_lvis_v1_path_end_to_end(miniature, tmp_path):
    """README "Real CLIP weights and LVIS" on the miniature: dump, caches, train, compare."""
    assets = BenchmarkAssets(RN50_ARCHITECTURE, root=str(tmp_path))
    out = tmp_path / "out"
    env = dict(
        os.environ,
        DETECTRON2_DATASETS=miniature,
        PYTHONPATH=os.pathsep.join([PROJECT, os.path.join(REPO, "tests")]),
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    common = [
        "MODEL.DEVICE", "cpu",
        "MODEL.CLIP.WEIGHTS", assets.clip_weights,
        "MODEL.CLIP.PROMPTS", "single",
        "MODEL.CLIP.TEXT_CACHE_DIR", str(tmp_path / "text_cache"),
        "INPUT.MIN_SIZE_TRAIN", "(128,)",
        "INPUT.MAX_SIZE_TRAIN", 192,
        "INPUT.MIN_SIZE_TEST", 128,
        "INPUT.MAX_SIZE_TEST", 192,
        "DATALOADER.NUM_WORKERS", 0,
        "SOLVER.IMS_PER_BATCH", 2,
        "SOLVER.MAX_ITER", 3,
        "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", 1,
        "SOLVER.BASE_LR", 0.001,
        "SOLVER.CHECKPOINT_PERIOD", 1000,
        "MODEL.VILD.NUM_DISTILL_PROPOSALS", 8,
    ]  # fmt: skip
    common = [str(v) for v in common]
    text = str(tmp_path / "lvis_v1_text.npy")
    _run(
        ["tools/dump_text_embeddings.py", "--config-file", "GridCLIP_R50.yaml", "--dataset",
         "lvis_v1_val", "--output", text, "--no-progress"] + common,
        env, REPO,
    )  # fmt: skip
    embeddings = np.load(text)
    assert embeddings.shape == (1203, 1024) and np.isfinite(embeddings).all()
    common += ["MODEL.CLIP.TEXT_EMBEDDINGS", text]

    gridclip_cache = str(tmp_path / "gridclip_teacher.pt")
    _run(
        ["tools/cache_teacher_embeddings.py", "--config-file", "GridCLIP_R50.yaml", "--output",
         gridclip_cache, "--no-progress"] + common,
        env, REPO,
    )  # fmt: skip
    vild_cache = str(tmp_path / "vild_teacher")
    _run(
        ["tools/cache_vild_teacher.py", "--config-file", "ViLD_R50.yaml", "--output", vild_cache,
         "--no-progress"] + common,
        env, REPO,
    )  # fmt: skip

    runs = {
        "GridCLIP": ("GridCLIP_R50.yaml", ["MODEL.GRIDCLIP.TEACHER_CACHE", gridclip_cache]),
        "ViLD": (
            "ViLD_R50.yaml",
            ["MODEL.VILD.TEACHER", "cache", "MODEL.VILD.TEACHER_CACHE", vild_cache,
             "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64"],
        ),
    }  # fmt: skip
    for name, (config, opts) in runs.items():
        _run(
            ["projects/GridCLIP/train_net.py", "--config-file", config, "OUTPUT_DIR",
             str(out / name), "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False"] + common + opts,
            env, REPO,
        )  # fmt: skip
        assert os.path.isfile(out / name / "model_final.pth")

    compare = out / "compare"
    _run(
        ["tools/compare_eval.py", "--run", "GridCLIP", "GridCLIP_R50.yaml",
         str(out / "GridCLIP" / "model_final.pth"), "--run", "ViLD", "ViLD_R50.yaml",
         str(out / "ViLD" / "model_final.pth"), "--dataset", "lvis_v1_val", "--output-dir",
         str(compare)] + common,
        env, REPO,
    )  # fmt: skip
    table = json.loads((compare / "comparison.json").read_text())
    text_table = (compare / "comparison.md").read_text()
    assert "GridCLIP" in text_table and "ViLD" in text_table and "APr" in text_table, table
