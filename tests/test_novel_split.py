"""Novel / base AP on COCO-format test sets (``TEST.NOVEL_CLASSES``; issue 15, item 2)."""

import json
import math

import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import Boxes, Instances

from gridclip.config import get_gridclip_cfg
from gridclip.engine import build_evaluator
from gridclip.evaluation import NovelBaseCOCOEvaluator, novel_base_ap, resolve_novel_classes

CLASSES = {3: "bicycle", 7: "bird", 9: "aeroplane"}
BOXES = {1: [(10, 10, 30, 20, 3), (50, 40, 20, 30, 7)], 2: [(5, 5, 40, 40, 9), (60, 10, 25, 25, 7)]}


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("novel_split")
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 80, "width": 96} for i in BOXES]
    annotations = [
        {"id": 10 * i + j, "image_id": i, "category_id": c, "bbox": [x, y, w, h],
         "area": w * h, "iscrowd": 0}
        for i, boxes in BOXES.items() for j, (x, y, w, h, c) in enumerate(boxes)
    ]  # fmt: skip
    categories = [{"id": i, "name": n} for i, n in CLASSES.items()]
    path = root / "instances.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    name = "novel_split_coco"
    if name not in MetadataCatalog.list():
        register_coco_instances(name, {}, str(path), str(root))
    return name, root


def test_novel_base_ap_means_ignore_nan():
    aps = {"bird": 10.0, "bicycle": 30.0, "aeroplane": float("nan"), "cat": 50.0}
    split = novel_base_ap(aps, ["bird", "aeroplane"])
    assert split["AP_novel"] == 10.0 and split["AP_base"] == 40.0
    assert math.isnan(novel_base_ap({"bird": float("nan")}, ["bird"])["AP_novel"])


def test_resolve_novel_classes_matches_loosely_and_refuses_unknown_names():
    names = ["bicycle", "traffic_light", "bird"]
    assert resolve_novel_classes(["Traffic light", "BIRD"], names, "d") == ["traffic_light", "bird"]
    with pytest.raises(ValueError, match=r"TEST.NOVEL_CLASSES \['zebra'\]: none is a class of"):
        resolve_novel_classes(["zebra"], names, "d")


def _predictions(evaluator, classes_to_find):
    """Exact boxes (score 0.9) for the objects of the classes in ``classes_to_find``."""
    thing_ids = sorted(CLASSES)
    evaluator.reset()
    for image_id, boxes in BOXES.items():
        found = [(x, y, x + w, y + h, thing_ids.index(c)) for x, y, w, h, c in boxes]
        found = [b for b in found if CLASSES[thing_ids[b[4]]] in classes_to_find]
        instances = Instances(
            (80, 96),
            pred_boxes=Boxes(torch.tensor([b[:4] for b in found], dtype=torch.float32).view(-1, 4)),
            scores=torch.full((len(found),), 0.9),
            pred_classes=torch.tensor([b[4] for b in found], dtype=torch.long),
        )
        evaluator.process([{"image_id": image_id}], [{"instances": instances}])
    return evaluator.evaluate()["bbox"]


def test_coco_evaluator_reports_novel_and_base_ap(coco_set, tmp_path):
    name, _ = coco_set
    cfg = get_gridclip_cfg("Base-GridCLIP.yaml", ["TEST.NOVEL_CLASSES", "('bird',)"])
    evaluator = build_evaluator(cfg, name, str(tmp_path))
    assert isinstance(evaluator, NovelBaseCOCOEvaluator)
    bbox = _predictions(evaluator, {"bicycle", "aeroplane"})  # every base object, no bird
    assert bbox["AP_novel"] == pytest.approx(0.0) and bbox["AP_base"] == pytest.approx(100.0)
    assert bbox["AP"] == pytest.approx(200.0 / 3, abs=0.01)
    # without the key: the plain COCO evaluator, no split
    plain = build_evaluator(get_gridclip_cfg("Base-GridCLIP.yaml"), name, str(tmp_path))
    assert not isinstance(plain, NovelBaseCOCOEvaluator)
    assert "AP_novel" not in _predictions(plain, {"bird"})
