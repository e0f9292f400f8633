"""Your data, your vocabulary, your protocol (issue 15).

- COCO/LVIS files named in the config (``DATASETS.FILES``) and datasets registered the plain
  Detectron2 way (``register_coco_instances`` / ``register_lvis_instances``);
- one ``train_net.py --eval-only`` run over test sets of different vocabularies, for GridCLIP
  and ViLD, each set evaluated with its own class names (COCO evaluator where there are no LVIS
  frequencies), a checkpoint of another vocabulary replaced knowingly;
- fixed AP beside the standard 300-per-image protocol;
- fine-tuning a trained checkpoint on a COCO-format set of one's own classes.
"""

import json
import os

import numpy as np
import pytest
import tiny_models
import torch
import train_net
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_lvis_instances
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from PIL import Image, ImageDraw

from gridclip.config import get_gridclip_cfg
from gridclip.data import dataset_metadata, parse_dataset_file_entry, register_dataset_file
from gridclip.engine import build_evaluator, drop_checkpoint_vocabulary, evaluation_vocabulary
from gridclip.evaluation import FixedAPLVISEvaluator, top_detections_per_class
from gridclip.modeling.vocabulary import vocabulary_from_cfg

D, K = 64, 5  # tiny CLIP dimension; classes of the checkpoint's (other) vocabulary
USER_CLASSES = {5: "aeroplane", 9: "bicycle", 12: "bird"}  # COCO ids need not be contiguous


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    """A COCO-format set of 3 drawn images (shapes on textured backgrounds), 3 VOC classes."""
    root = tmp_path_factory.mktemp("user_coco")
    (root / "images").mkdir()
    rng = np.random.RandomState(0)
    images, annotations = [], []
    for image_id in (1, 2, 3):
        pixels = (rng.rand(88, 104, 3) * 60 + 90).astype("uint8")
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for k, category_id in enumerate(sorted(USER_CLASSES)[:image_id]):
            x, y, w, h = 8 + 30 * k, 10 + 12 * k, 26, 30
            draw.ellipse([x, y, x + w, y + h], fill=tuple(int(v) for v in rng.randint(0, 255, 3)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        image.save(root / "images" / f"photo{image_id}.jpg")
        images.append(
            {"id": image_id, "file_name": f"photo{image_id}.jpg", "height": 88, "width": 104}
        )
    categories = [{"id": i, "name": n} for i, n in USER_CLASSES.items()]
    path = root / "instances.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return str(path), str(root / "images")


@pytest.fixture(scope="module")
def weights(assets, tmp_path_factory):
    """Checkpoints of tiny GridCLIP and ViLD models trained on another (K-class) vocabulary."""
    root = tmp_path_factory.mktemp("user_weights")
    paths = {}
    MetadataCatalog.get("checkpoint_vocabulary").set(
        thing_classes=["cat", "dog", "car", "tree", "cup"]
    )
    for arch in ("GridCLIP", "ViLD"):
        torch.manual_seed(0)
        cfg = get_gridclip_cfg(
            CONFIGS[arch],
            model_opts(arch, assets, K) + ["DATASETS.TEST", "('checkpoint_vocabulary',)"],
        )
        model = build_model(cfg)
        paths[arch] = str(root / f"{arch}.pth")
        torch.save({"model": model.state_dict()}, paths[arch])
    return paths


CONFIGS = {"GridCLIP": "Base-GridCLIP.yaml", "ViLD": "Base-ViLD.yaml"}


def model_opts(arch, assets, num_classes):
    """Tiny model overrides; class names embedded by the tiny CLIP's text tower."""
    opts = tiny_models.tiny_clip_opts(assets, D) + [
        "MODEL.CLIP.TEXT_EMBEDDINGS", "",
        "MODEL.FPN.OUT_CHANNELS", 32,
        "DATASETS.TRAIN", "()",
        "DATASETS.TEST", "()",
        "INPUT.MIN_SIZE_TEST", 96,
        "INPUT.MAX_SIZE_TEST", 128,
        "DATALOADER.NUM_WORKERS", 0,
    ]  # fmt: skip
    if arch == "GridCLIP":
        return opts + [
            "MODEL.CLIP_RESNET.FREEZE_AT", 1,
            "MODEL.RETINANET.NUM_CONVS", 1,
            "MODEL.RETINANET.NUM_CLASSES", num_classes,
            "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0,
            "MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT", 0.0,
            "MODEL.GRIDCLIP.DENSE_CLIP", False,
        ]  # fmt: skip
    return opts + [
        "MODEL.CLIP_RESNET.FREEZE_AT", 0,
        "MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128], [256]]",
        "MODEL.RPN.PRE_NMS_TOPK_TEST", 100,
        "MODEL.RPN.POST_NMS_TOPK_TEST", 50,
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 100,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", 50,
        "MODEL.ROI_HEADS.NUM_CLASSES", num_classes,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
        "MODEL.VILD.IMAGE_DISTILL_WEIGHT", 0.0,
    ]  # fmt: skip


def run_train_net(arch, opts, *flags):
    args = default_argument_parser().parse_args(
        ["--config-file", CONFIGS[arch], *flags] + [str(o) for o in opts]
    )
    return train_net.main(args)


# ----------------------------------------------------------------------------- registration
def test_dataset_file_entries_parse_and_fail_clearly(tmp_path):
    assert parse_dataset_file_entry("a=x/ann.json:x/img") == ("a", "x/ann.json", "x/img")
    assert parse_dataset_file_entry("a=x/ann.json") == ("a", "x/ann.json", "x")
    for bad in ("x/ann.json", "=x.json", "a="):
        with pytest.raises(ValueError, match="NAME=JSON_FILE"):
            parse_dataset_file_entry(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        register_dataset_file("files_missing", str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        register_dataset_file("files_broken", str(broken))


def test_datasets_files_registers_coco_and_lvis_formats(coco_set, tiny_lvis_json, tmp_path):
    coco_json, coco_images = coco_set
    lvis_json, lvis_root = tiny_lvis_json
    cfg = get_gridclip_cfg()
    cfg.DATASETS.FILES = (f"files_coco={coco_json}:{coco_images}", f"files_lvis={lvis_json}")
    cfg.DATASETS.TEST = ("files_coco", "files_lvis")
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.DATALOADER.NUM_WORKERS = 0
    train_net.Trainer.build_test_loader(cfg, "files_coco")  # registers DATASETS.FILES
    coco = MetadataCatalog.get("files_coco")
    assert coco.evaluator_type == "coco" and coco.thing_classes == list(USER_CLASSES.values())
    assert coco.thing_dataset_id_to_contiguous_id == {5: 0, 9: 1, 12: 2}
    assert MetadataCatalog.get("files_lvis").class_frequencies == ["f", "r"]
    dicts = DatasetCatalog.get("files_coco")  # Detectron2's loader agrees with the metadata
    assert sorted({a["category_id"] for d in dicts for a in d["annotations"]}) == [0, 1, 2]
    assert type(build_evaluator(cfg, "files_coco")).__name__ == "COCOEvaluator"
    assert type(build_evaluator(cfg, "files_lvis")).__name__ == "LVISEvaluator"
    cfg.TEST.FIXED_AP = True
    assert isinstance(build_evaluator(cfg, "files_lvis"), FixedAPLVISEvaluator)
    # the same name for another file is an error, the same file again a no-op
    register_dataset_file("files_coco", coco_json, coco_images)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset_file("files_coco", lvis_json)


def test_plain_detectron2_registrations_get_metadata_on_demand(coco_set, tiny_lvis_json, assets):
    coco_json, coco_images = coco_set
    register_coco_instances("plain_coco_set", {}, coco_json, coco_images)
    lvis_json, lvis_root = tiny_lvis_json
    register_lvis_instances("plain_lvis_set", {}, lvis_json, lvis_root + "/")
    assert "thing_classes" not in MetadataCatalog.get("plain_coco_set").as_dict()
    cfg = get_gridclip_cfg("Base-GridCLIP.yaml", model_opts("GridCLIP", assets, 3))
    cfg.DATASETS.TEST = ("plain_coco_set",)
    _, names = vocabulary_from_cfg(cfg)  # failed before: "GridCLIP needs a vocabulary"
    assert names == list(USER_CLASSES.values())
    assert len(DatasetCatalog.get("plain_coco_set")) == 3  # load_coco_json agrees on metadata
    lvis = dataset_metadata("plain_lvis_set")
    assert lvis.thing_classes == ["red_square", "blue_ring"] and lvis.evaluator_type == "lvis"
    assert len(DatasetCatalog.get("plain_lvis_set")) == 2  # Detectron2's loader would raise


# ----------------------------------------------------------- any model, any dataset's classes
@pytest.mark.parametrize("arch", ["GridCLIP", "ViLD"])
def test_eval_only_run_evaluates_each_dataset_with_its_own_classes(
    arch, assets, weights, coco_set, tiny_lvis_json, tmp_path
):
    coco_json, coco_images = coco_set
    name = f"voc_photos_{arch.lower()}"
    register_coco_instances(name, {}, coco_json, coco_images)  # the plain Detectron2 way
    lvis_json, _ = tiny_lvis_json
    out = tmp_path / "eval"
    opts = model_opts(arch, assets, len(USER_CLASSES)) + [
        "DATASETS.FILES", f"('shapes_{arch}={lvis_json}',)",
        "DATASETS.TEST", f"('{name}', 'shapes_{arch}')",
        "MODEL.WEIGHTS", weights[arch],
        "OUTPUT_DIR", str(out),
    ]  # fmt: skip
    results = run_train_net(arch, opts, "--eval-only")
    assert list(results) == [name, f"shapes_{arch}"]
    assert "AP50" in results[name]["bbox"] and "APr" not in results[name]["bbox"]  # COCO
    assert "APr" in results[f"shapes_{arch}"]["bbox"]  # LVIS, with its own 2 classes
    log = (out / "log.txt").read_text()
    assert f"other vocabulary ({K} classes)" in log  # the checkpoint's vocabulary, replaced
    assert f"Evaluating 'shapes_{arch}' with its own 2 class names" in log
    saved = json.loads((out / "eval_results.json").read_text())
    assert set(saved["results"]) == {name, f"shapes_{arch}"}


def test_evaluation_vocabulary_is_restored_and_checkpoint_vocabulary_dropped_whole(
    assets, tiny_lvis_json
):
    lvis_json, _ = tiny_lvis_json
    register_dataset_file("restore_shapes", lvis_json)
    MetadataCatalog.get("checkpoint_vocabulary").set(
        thing_classes=["cat", "dog", "car", "tree", "cup"]
    )
    cfg = get_gridclip_cfg("Base-ViLD.yaml", model_opts("ViLD", assets, K))
    cfg.DATASETS.TEST = ("checkpoint_vocabulary",)
    model = build_model(cfg)
    before = model.vocabulary_state()
    with evaluation_vocabulary(model, "restore_shapes"):
        assert model.num_classes == 2
        assert model.roi_heads.box_predictor.novel_class_mask.tolist() == [False, True]
    assert model.num_classes == K and model.class_names == before["class_names"]
    assert torch.allclose(model.text_embeddings, before["text_embeddings"], atol=1e-6)
    assert torch.equal(model.roi_heads.box_predictor.novel_class_mask, before["novel_class_mask"])
    state = model.state_dict()
    other = dict(state)
    other["roi_heads.box_predictor.text_classifier.text_embeddings"] = torch.randn(K, D)
    removed = drop_checkpoint_vocabulary(model, other)
    assert sorted(removed) == [
        "roi_heads.box_predictor.novel_class_mask",
        "roi_heads.box_predictor.text_classifier.text_embeddings",
    ]
    assert drop_checkpoint_vocabulary(model, dict(state)) == []  # same vocabulary: loaded


def test_evaluation_vocabulary_marks_base_and_novel_classes_for_the_ensembles(
    assets, tiny_lvis_json
):
    """GridCLIP's CLIP score ensemble (and ViLD's) weighs base and novel classes differently: on
    another dataset's vocabulary, base = the classes the model was trained on with boxes, by
    name (a COCO-format set), or the set's own non-rare classes (an LVIS-format set)."""
    MetadataCatalog.get("ensemble_vocabulary").set(thing_classes=["cat", "dog", "car", "tree"])
    cfg = get_gridclip_cfg("Base-GridCLIP.yaml", model_opts("GridCLIP", assets, 4))
    cfg.DATASETS.TEST = ("ensemble_vocabulary",)
    model = build_model(cfg)
    model._set_trained_class_mask(torch.tensor([True, True, False, True]))  # "car": novel
    MetadataCatalog.get("coco_like_transfer").set(
        thing_classes=["Car", "cat", "zebra", "tree"], evaluator_type="coco"
    )
    with evaluation_vocabulary(model, "coco_like_transfer"):
        assert model.trained_class_mask.tolist() == [False, True, False, True]
    assert model.trained_class_mask.tolist() == [True, True, False, True]  # restored
    lvis_json, _ = tiny_lvis_json
    register_dataset_file("ensemble_shapes", lvis_json)
    with evaluation_vocabulary(model, "ensemble_shapes"):  # its frequencies: 'r' is novel
        assert model.trained_class_mask.tolist() == [True, False]


# ------------------------------------------------------------------------------- fixed AP
def test_top_detections_per_class():
    dets = [{"category_id": c, "score": s} for c, s in [(1, 0.1), (1, 0.9), (2, 0.5), (1, 0.5)]]
    assert top_detections_per_class(dets, 2) == [dets[1], dets[2], dets[3]]
    with pytest.raises(ValueError):
        top_detections_per_class(dets, 0)


def _fake_outputs(image_id, h, w, boxes, classes, scores):
    inst = Instances((h, w))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.pred_classes = torch.tensor(classes, dtype=torch.long)
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    return [{"image_id": image_id}], [{"instances": inst}]


def test_fixed_ap_lifts_the_per_image_cap(tiny_lvis_json, tmp_path):
    """400 confident false positives in image 1 push its true boxes out of the standard 300
    per image; fixed AP keeps every detection (per-class cap) and finds them."""
    json_file, root = tiny_lvis_json
    register_dataset_file("fixed_ap_shapes", json_file)
    junk = [[60 + i % 20, 60 + i % 15, 70 + i % 20, 70 + i % 15] for i in range(400)]
    image1 = _fake_outputs(
        1, 80, 96,
        junk + [[10, 10, 40, 30], [50, 40, 70, 70]],
        [0] * 400 + [0, 1],
        [0.9] * 400 + [0.5, 0.5],
    )  # fmt: skip
    image2 = _fake_outputs(2, 80, 96, [[5, 5, 45, 45]], [0], [0.5])

    def evaluate(evaluator):
        evaluator.reset()
        for inputs, outputs in (image1, image2):
            evaluator.process(inputs, outputs)
        return evaluator.evaluate()["bbox"]

    cfg = get_gridclip_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    standard = evaluate(build_evaluator(cfg, "fixed_ap_shapes"))
    fixed = evaluate(FixedAPLVISEvaluator("fixed_ap_shapes", max_dets_per_class=10000))
    assert standard["APr"] == pytest.approx(0.0)
    assert fixed["APr"] == pytest.approx(100.0)
    capped = evaluate(FixedAPLVISEvaluator("fixed_ap_shapes", max_dets_per_class=100))
    assert capped["APf"] < fixed["APf"]  # the true red square of image 1 falls below the cap


# ------------------------------------------------------------------------------ fine-tuning
def test_fine_tune_a_trained_checkpoint_on_your_own_classes(assets, weights, coco_set, tmp_path):
    coco_json, coco_images = coco_set
    out = tmp_path / "finetune"
    entry = f"('my_photos={coco_json}:{coco_images}',)"
    opts = model_opts("GridCLIP", assets, len(USER_CLASSES)) + [
        "DATASETS.FILES", entry,
        "DATASETS.TRAIN", "('my_photos',)",
        "DATASETS.TEST", "('my_photos',)",
        "MODEL.WEIGHTS", weights["GridCLIP"],
        "MODEL.GRIDCLIP.IGNORE_NOVEL_IN_TRAINING", False,  # a COCO set has no novel classes
        "INPUT.MIN_SIZE_TRAIN", "(96,)",
        "INPUT.MAX_SIZE_TRAIN", 128,
        "SOLVER.IMS_PER_BATCH", 2,
        "SOLVER.BASE_LR", 0.001,
        "SOLVER.MAX_ITER", 3,
        "SOLVER.WARMUP_ITERS", 0,
        "SOLVER.STEPS", "()",
        "SOLVER.CHECKPOINT_PERIOD", 100,
        "TEST.EVAL_PERIOD", 0,
        "OUTPUT_DIR", str(out),
    ]  # fmt: skip
    run_train_net("GridCLIP", opts)
    final = out / "model_final.pth"
    assert final.is_file()
    state = torch.load(final, map_location="cpu", weights_only=False)["model"]
    assert state["head.classifier.text_embeddings"].shape == (len(USER_CLASSES), D)
    eval_opts = opts + ["MODEL.WEIGHTS", str(final), "OUTPUT_DIR", str(tmp_path / "eval")]
    results = run_train_net("GridCLIP", eval_opts, "--eval-only")
    assert 0.0 <= results["bbox"]["AP"] <= 100.0  # finite: the model detects after fine-tuning
    assert os.path.isfile(tmp_path / "eval" / "eval_results.json")


def test_transfer_set_is_a_coco_file_of_another_vocabulary(tmp_path):
    """tools/make_transfer_set.py: another render of the world (its own seed and size) with 20 of
    its classes spelt with spaces, in plain COCO format (no LVIS fields: the COCO evaluator on all
    classes); occluded objects are iscrowd regions; the novel list resolves; cached by its
    parameters; a folder that is not a transfer set is never replaced."""
    from gridclip.data.world_scene import world_categories
    from gridclip.evaluation.novel_split import resolve_novel_classes
    from gridclip_tools import transfer_set

    root = tmp_path / "transfer"
    paths = transfer_set.make_transfer_set(str(root), num_images=6, image_size=96)
    data = json.loads(open(paths["json_file"]).read())
    names = [c["name"] for c in data["categories"]]
    assert len(names) == 20 and [c["id"] for c in data["categories"]] == list(range(1, 21))
    assert all(" " in n and "_" not in n for n in names)
    world = {c["name"].replace("_", " "): c["frequency"] for c in world_categories()}
    assert sorted(n for n in names if world[n] == "r") == sorted(transfer_set.novel_classes())
    assert len(transfer_set.novel_classes()) == 10
    assert not any("frequency" in c for c in data["categories"])
    assert not any("neg_category_ids" in im for im in data["images"])
    assert {im["width"] for im in data["images"]} == {96} and len(data["images"]) == 6
    assert {a["iscrowd"] for a in data["annotations"]} <= {0, 1}
    assert {a["category_id"] for a in data["annotations"]} <= set(range(1, 21))

    name, json_file, image_root = parse_dataset_file_entry(
        paths["entry"].replace("gridclip_world_transfer=", f"transfer_{abs(hash(str(tmp_path)))}=")
    )
    assert register_dataset_file(name, json_file, image_root) == "coco"
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 6 and MetadataCatalog.get(name).thing_classes == names
    novel = resolve_novel_classes(transfer_set.novel_classes(), names, name)
    assert len(novel) == 10

    mtime = os.path.getmtime(paths["json_file"])
    assert transfer_set.make_transfer_set(str(root), num_images=6, image_size=96) == paths
    assert os.path.getmtime(paths["json_file"]) == mtime  # cached
    transfer_set.make_transfer_set(str(root), num_images=3, image_size=96)  # other params
    assert len(json.loads(open(paths["json_file"]).read())["images"]) == 3
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a transfer set"):
        transfer_set.make_transfer_set(str(other), num_images=2, image_size=96)
    assert (other / "keep.txt").exists()
