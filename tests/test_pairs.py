"""Image-text pairs: captions JSON, phrases and spans, the world's pair split, caption
pseudo-boxes and training on boxes + pairs (issue 17 items 1-2)."""

import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage

import gridclip  # noqa: F401  (registers datasets)
from gridclip.clip import loading as clip_loading
from gridclip.config import get_gridclip_cfg
from gridclip.data import world as world_module
from gridclip.data.captions import (
    attach_pseudo_boxes,
    compose_caption,
    load_coco_captions_json,
    pair_phrase_keys,
    phrase_key,
    register_coco_captions,
    split_caption_phrases,
)
from gridclip.data.mapper import PairsDatasetMapper
from gridclip.data.phrases import phrase_count
from gridclip.data.world import generate_world, generate_world_pairs, register_world
from gridclip.engine import Trainer
from gridclip.engine.pairs import JointLoader
from gridclip.modeling.box_refinement import BoxRefiner
from gridclip.modeling.pairs_alignment import (
    PairsAlignment,
    caption_pseudo_boxes,
    pseudo_box_targets,
)
from gridclip.modeling.prompts import parse_prompt
from gridclip_tools import pseudo_label_pairs
from gridclip_tools.pseudo_box_quality import misnamed_as, score_pseudo_boxes

TINY = dict(preset="ci", num_train=4, num_val=2, image_size=96)


@pytest.fixture(scope="module")
def pairs_world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pairs_world") / "w")
    generate_world(root, seed=5, **TINY)
    manifest = generate_world_pairs(root, num_pairs=6)
    register_world(root, prefix="test_pairs_world")
    return root, manifest


# ------------------------------------------------------------------------------ phrases, captions
def test_phrase_key_drops_counts_and_plurals():
    assert phrase_key("two blue rings") == "blue ring"
    assert phrase_key("Three green crosses.") == "green cross"
    assert phrase_key("an orange heart") == "orange heart"
    assert phrase_key("  a   red   star ") == "red star"
    assert phrase_key("glass") == "glass"  # -ss is not a plural


def test_split_caption_phrases_spans():
    caption = "a photo of a red star beside two blue rings on a striped background."
    phrases = split_caption_phrases(caption)
    assert [p["text"] for p in phrases] == ["red star", "blue rings", "striped background"]
    for p in phrases:
        assert caption[p["span"][0] : p["span"][1]] == p["text"]


@pytest.mark.parametrize(
    "caption",
    [
        "a photo of a red star beside two blue rings on a striped background.",
        "a picture showing three green crosses, an orange heart and a white square in the scene.",
        "an image with a yellow triangle next to 2 purple circles.",
        "Crème brûlée is on the table; a bow (weapon) and some berries",
    ],
)
def test_one_phrase_rule_for_pairs_and_prompts(caption):
    """Pairs (split_caption_phrases, phrase_key) and grounding prompts (parse_prompt) read a
    caption the same way: same phrases, same spans, same embedded names."""
    pairs = split_caption_phrases(caption)
    prompt = parse_prompt(caption, "caption").phrases
    assert [(p["text"], tuple(p["span"])) for p in pairs] == [(p.text, p.span) for p in prompt]
    assert [phrase_key(p["text"]) for p in pairs] == [p.name.lower() for p in prompt]
    assert not any(p.name.split()[-1] in ("photo", "picture", "image", "scene") for p in prompt)


def test_phrase_key_keeps_inner_words_and_brackets():
    assert phrase_key("a cup of coffee") == "cup of coffee"  # no splitting inside a given phrase
    assert phrase_key("a bow (weapon)") == "bow (weapon)"
    assert phrase_key("(two red stars)") == "red star"
    assert phrase_key("the 3 ") == ""


def test_compose_caption_spans_counts_and_drops():
    rng = np.random.default_rng(0)
    groups = [("red star", 1, 7), ("blue ring", 2, 3), ("white cross", 3, 9)]
    dropped = 0
    for _ in range(50):
        caption, phrases = compose_caption(groups, rng)
        assert phrases and caption.endswith(".")
        for p in phrases:
            assert caption[p["span"][0] : p["span"][1]] == p["text"]
        texts = {p["category_id"]: p["text"] for p in phrases}
        assert texts.get(3, "two blue rings") == "two blue rings"
        assert texts.get(9, "three white crosses") == "three white crosses"
        assert texts.get(7, "a red star") == "a red star"
        dropped += len(phrases) < 3
    assert 0 < dropped < 50  # captions are sometimes incomplete, usually not


def _write(tmp_path, payload):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(payload))
    return str(path)


def test_coco_captions_json_loads_with_given_and_parsed_phrases(tmp_path):
    caption = "two blue rings and a red star."
    path = _write(
        tmp_path,
        {
            "images": [{"id": 1, "file_name": "a.jpg", "height": 8, "width": 9},
                       {"id": 2, "file_name": "b.jpg"}, {"id": 3, "file_name": "c.jpg"}],
            "annotations": [
                {"id": 1, "image_id": 1, "caption": caption,
                 "phrases": [{"text": "a red star", "category_id": 4},
                             {"text": "two blue rings", "span": [0, 14]}]},
                {"id": 2, "image_id": 2, "caption": "a green cross on a white square"},
            ],
        },
    )  # fmt: skip
    dicts = load_coco_captions_json(path, "/imgs")
    assert [d["image_id"] for d in dicts] == [1, 2]  # image 3 has no caption
    a, b = dicts
    assert a["file_name"] == "/imgs/a.jpg" and (a["height"], a["width"]) == (8, 9)
    assert a["caption"] == caption and a["captions"] == [caption]
    assert a["phrases"][0] == {"text": "a red star", "span": [19, 29], "category_id": 4,
                               "caption_index": 0, "key": "red star"}  # fmt: skip
    assert a["phrases"][1]["key"] == "blue ring"
    assert [p["text"] for p in b["phrases"]] == ["green cross", "white square"]
    assert pair_phrase_keys(dicts) == ["blue ring", "green cross", "red star", "white square"]
    name = register_coco_captions("test_pairs_user", path, "/imgs")
    assert register_coco_captions("test_pairs_user", path, "/imgs") == name  # idempotent
    assert DatasetCatalog.get(name)[0]["caption"] == caption


IMAGE = [{"id": 1, "file_name": "a"}]


@pytest.mark.parametrize(
    "payload, match",
    [
        ({"images": []}, "annotations"),
        ({"images": [{"id": 1}], "annotations": []}, r"images\[0\]"),
        ({"images": IMAGE, "annotations": [{"image_id": 2, "caption": "x"}]}, "unknown image_id 2"),
        ({"images": IMAGE, "annotations": [{"image_id": 1, "caption": ""}]}, "non-empty 'caption'"),
        ({"images": IMAGE, "annotations": [{"id": 5, "image_id": 1, "caption": "a red star",
                                            "phrases": [{"text": "a ring"}]}]},
         "annotation 5.*'a ring' does not occur"),
        ({"images": IMAGE, "annotations": [{"image_id": 1, "caption": "a red star",
                                            "phrases": [{"text": "a red", "span": [1, 6]}]}]},
         r"span \[1, 6\] does not hold"),
    ],
)  # fmt: skip
def test_bad_captions_json_names_file_and_value(tmp_path, payload, match):
    path = _write(tmp_path, payload)
    with pytest.raises(ValueError, match=match) as info:
        load_coco_captions_json(path, "")
    assert "captions.json" in str(info.value)


# ---------------------------------------------------------------------------------- world pairs
def test_world_pairs_dataset_dicts_carry_caption_phrases_spans(pairs_world):
    root, manifest = pairs_world
    assert manifest["summary"]["images"] == 6
    dicts = DatasetCatalog.get("test_pairs_world_pairs")
    assert 1 <= len(dicts) <= 6
    for d in dicts:
        assert os.path.isfile(d["file_name"]) and "annotations" not in d
        assert d["phrases"]
        for p in d["phrases"]:
            assert d["caption"][p["span"][0] : p["span"][1]] == p["text"]
            assert 1 <= p["category_id"] <= 48
            assert p["key"] == phrase_key(p["text"])
    # the same world and count: cached (nothing rewritten)
    stamp = os.path.getmtime(os.path.join(root, "pairs", "captions.json"))
    assert generate_world_pairs(root, num_pairs=6) == manifest
    assert os.path.getmtime(os.path.join(root, "pairs", "captions.json")) == stamp


def test_pairs_of_another_world_are_refused_then_regenerated(tmp_path):
    root = str(tmp_path / "w")
    generate_world(root, seed=1, **TINY)
    generate_world_pairs(root, num_pairs=2)
    first = open(os.path.join(root, "pairs", "captions.json")).read()
    # a world with other parameters in place of the first (as if made by hand): never mixed
    manifest_path = os.path.join(root, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["params"]["seed"] = 2
    json.dump(manifest, open(manifest_path, "w"))
    register_world(root, prefix="test_pairs_stale")
    with pytest.raises(ValueError, match="another world"):
        DatasetCatalog.get("test_pairs_stale_pairs")
    generate_world_pairs(root, num_pairs=2)  # regenerated for the world now there
    assert open(os.path.join(root, "pairs", "captions.json")).read() != first
    assert DatasetCatalog.get("test_pairs_stale_pairs")
    with pytest.raises(FileNotFoundError, match="make_world"):
        register_world(str(tmp_path / "absent"), prefix="test_pairs_absent")
        DatasetCatalog.get("test_pairs_absent_pairs")


# ------------------------------------------------------------------------- the pairs' module
def test_pairs_alignment_module_builds_batch_phrases():
    module = PairsAlignment(
        phrase_keys=["blue ring", "red star", "white cross"],
        phrase_embeddings=torch.eye(3, 4),
        embed_dim=4,
        weight=0.5,
    )
    star, ring = {"key": "red star", "text": "a red star"}, {"key": "blue ring", "text": "ring"}
    batch = [{"phrases": [star, ring]}, {"phrases": [star]}]
    rows, named, counts = module.batch_phrases(batch)
    assert named.tolist() == [[True, True], [False, True]]  # columns: blue ring, red star
    assert rows.tolist() == [0, 1]
    torch.testing.assert_close(module.phrase_embeddings[rows], torch.eye(3, 4)[:2])
    assert counts.tolist() == [[1, 1], [0, 1]]
    with pytest.raises(KeyError, match="green heart"):
        module.batch_phrases([{"phrases": [{"key": "green heart", "text": "green heart"}]}])
    # counts per (image, column): "two" names 2, no count for a plural without a number
    two, plural = {"key": "red star", "text": "two red stars"}, {
        "key": "blue ring",
        "text": "rings",
    }
    batch = [{"phrases": [two, plural]}, {"phrases": [{"key": "red star", "text": "a red star"}]}]
    assert module.batch_phrases(batch)[2].tolist() == [[-1, 2], [0, 1]]
    common = dict(phrase_keys=["a"], phrase_embeddings=torch.eye(1, 4), embed_dim=4, weight=1.0)
    with pytest.raises(ValueError, match="PAIRS_PSEUDO_MIN_SCORE = 1.5"):
        PairsAlignment(**common, pseudo_min_score=1.5)


def test_joint_loader_adds_pairs_to_box_batches():
    boxes = iter([[f"b{i}a", f"b{i}b"] for i in range(100)])
    pairs = iter([[f"p{i}"] for i in range(100)])
    it = iter(JointLoader(boxes, pairs, 2))
    assert [next(it) for _ in range(4)] == [
        ["b0a", "b0b", "p0"],
        ["b1a", "b1b"],
        ["b2a", "b2b", "p1"],
        ["b3a", "b3b"],
    ]
    every = iter(JointLoader(iter([["b"]] * 3), iter([["p"]] * 3), 1))
    assert [next(every) for _ in range(3)] == [["b", "p"]] * 3  # every box batch gets pairs
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="PAIRS_PERIOD"):
            JointLoader([], [], bad)


def test_joint_loader_starts_pairs_at_the_storage_iteration():
    boxes = iter([[f"b{i}"] for i in range(100)])
    pairs = iter([[f"p{i}"] for i in range(100)])
    it = iter(JointLoader(boxes, pairs, 1, start=2))
    got = []
    with EventStorage(1) as storage:  # a resumed run: its iteration counter, not the loader's
        for _ in range(3):
            got.append(next(it))
            storage.iter += 1
    assert got == [["b0"], ["b1", "p0"], ["b2", "p1"]]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="PAIRS_START_ITER"):
            JointLoader([], [], 1, start=bad)


# ------------------------------------------------------------------------- caption pseudo-boxes
@pytest.mark.parametrize(
    "text, count",
    [("a red star", 1), ("an orange ring", 1), ("two blue rings", 2), ("Ten people", 10),
     ("3 cups", 3), ("red star", 1), ("glass", 1), ("blue rings", None), ("some rings", None),
     ("many rings", None), ("", None)],
)  # fmt: skip
def test_phrase_count(text, count):
    assert phrase_count(text) == count


def test_caption_pseudo_boxes_hand_built():
    # 5 anchors, 2 phrases; anchors 0 and 1 overlap (IoU 0.81), anchor 3 is elsewhere
    boxes = torch.tensor(
        [[0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60], [20, 20, 30, 30], [70, 70, 80, 80]],
        dtype=torch.float32,
    )
    logits = torch.tensor(
        [[3.0, -5.0], [2.5, -5.0], [-5.0, 0.0], [1.0, -5.0], [-5.0, -3.0]]
    )  # phrase 0: anchors 0 > 1 > 3; phrase 1: anchor 2 (p 0.5) > 4 (p 0.05)
    b, c, s = caption_pseudo_boxes(logits, boxes, [2, 1], min_score=0.2)
    # phrase 0 counts two objects: anchor 0, then anchor 3 (anchor 1 is suppressed by NMS)
    torch.testing.assert_close(b, boxes[[0, 3, 2]])
    assert c.tolist() == [0, 0, 1]
    torch.testing.assert_close(s, logits[[0, 3, 2], [0, 0, 1]].sigmoid())
    # the threshold drops boxes below it; counts cap the number taken
    b, c, _ = caption_pseudo_boxes(logits, boxes, [1, 1], min_score=0.6)
    assert c.tolist() == [0] and torch.equal(b, boxes[[0]])

    # a rescoring ranks each phrase's candidates again: anchor 3 before anchor 0 for phrase 0
    def prefer_anchor_3(b, c, p):
        return p + 10.0 * (b == boxes[3]).all(dim=1)

    b, c, s = caption_pseudo_boxes(logits, boxes, [1, 1], min_score=0.2, rescore=prefer_anchor_3)
    torch.testing.assert_close(b, boxes[[3, 2]])
    torch.testing.assert_close(s, logits[[3, 2], [0, 1]].sigmoid())  # detection probabilities
    b, c, _ = caption_pseudo_boxes(logits[:, :0], boxes, [], min_score=0.0)
    assert b.shape == (0, 4) and c.numel() == 0


def test_pseudo_box_quality_scoring_matches_each_box_once():
    gt = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    gt_classes = torch.tensor([1, 2])
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 11], [20, 20, 30, 30], [40, 40, 50, 50]])
    classes = torch.tensor([1, 1, 1, 2])
    # the second box of class 1 finds its object taken; the third overlaps only class 2's box;
    # the fourth overlaps nothing
    assert score_pseudo_boxes(boxes.float(), classes, gt, gt_classes, 0.5) == [
        True, False, False, False
    ]  # fmt: skip
    assert score_pseudo_boxes(boxes[:0].float(), classes[:0], gt, gt_classes, 0.5) == []
    assert score_pseudo_boxes(boxes.float(), classes, gt[:0], gt_classes[:0], 0.5) == [False] * 4
    # wrong boxes on an object of another class are "misnamed" as that class; a wrong box on
    # an object of its own class (taken) or on nothing is not
    correct = score_pseudo_boxes(boxes.float(), classes, gt, gt_classes, 0.5)
    assert misnamed_as(boxes.float(), classes, gt, gt_classes, correct, 0.5) == [
        None, None, 2, None
    ]  # fmt: skip
    assert misnamed_as(boxes.float(), classes, gt[:0], gt_classes[:0], correct, 0.5) == [None] * 4


def test_pseudo_box_targets_hand_built():
    # 1 image, 4 anchors, 3 phrases: phrase 0 named (1 object, found at anchor 0), phrase 1
    # named twice but one found (anchor 1), phrase 2 not named (another image's phrase)
    labels = torch.tensor([[0, 1, 3, -1]])  # anchor 2 background, anchor 3 ignored
    named = torch.tensor([[True, True, False]])
    counts = torch.tensor([[1, 2, 0]])
    found = torch.tensor([[1, 1, 0]])
    targets, targeted = pseudo_box_targets(labels, named, counts, found)
    assert targets[0].tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0]]
    assert targeted[0].tolist() == [
        [True, True, True],  # matched: every phrase has a target
        [True, True, True],
        [True, False, False],  # background: only the complete named phrase is negative
        [False, False, False],  # ignored anchor
    ]
    # a phrase named without a count ("blue rings") never gets negatives
    _, targeted = pseudo_box_targets(labels, named, torch.tensor([[-1, 2, 0]]), found)
    assert targeted[0, 2].tolist() == [False, False, False]


# ------------------------------------------------------------------------------------- training
class _RecordLosses(HookBase):
    def __init__(self):
        self.keys = []

    def after_step(self):
        latest = self.trainer.storage.latest()
        keys = [k for k, (_, it) in latest.items() if it == self.trainer.iter]
        self.keys.append(sorted(k for k in keys if "loss" in k and k != "total_loss"))


def _tiny_pairs_opts(tmp_path):
    weights = clip_loading.EMBEDDED_CLIP_PATH
    embed_dim = clip_loading.load_clip_state_dict(weights)["text_projection"].shape[1]
    # fmt: off
    return [
        "DATASETS.TRAIN", "('test_pairs_world_train',)",
        "DATASETS.PAIRS_TRAIN", "('test_pairs_world_pairs',)",
        "DATASETS.TEST", "()",
        "MODEL.DEVICE", "cpu",
        "MODEL.CLIP.WEIGHTS", weights,
        "MODEL.CLIP.EMBED_DIM", str(embed_dim),
        "MODEL.CLIP.TEXT_CACHE_DIR", str(tmp_path / "text_cache"),
        "MODEL.CLIP.PROMPTS", "single",
        "MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT", "0.0",
        "MODEL.GRIDCLIP.PAIRS_PERIOD", "2",
        "MODEL.GRIDCLIP.PAIRS_IMS_PER_BATCH", "3",
        "MODEL.GRIDCLIP.PAIRS_MIN_SIZE_TRAIN", "64",
        "MODEL.GRIDCLIP.PAIRS_START_ITER", "0",
        "MODEL.GRIDCLIP.PAIRS_PSEUDO_MIN_SCORE", "0.0",
        "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.RETINANET.NUM_CONVS", "1",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", "2",
        "SOLVER.WARMUP_ITERS", "1",
        "INPUT.MIN_SIZE_TRAIN", "(96,)",
        "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "128",
        "DATALOADER.NUM_WORKERS", "0",
        "TEST.EVAL_PERIOD", "0",
    ]
    # fmt: on


def _record_refine_steps(monkeypatch):
    """The ``steps`` of every :meth:`BoxRefiner.refine` call from now on."""
    steps, refine = [], BoxRefiner.refine

    def recording(self, features, boxes, steps_=1):
        steps.append(steps_)
        return refine(self, features, boxes, steps_)

    monkeypatch.setattr(BoxRefiner, "refine", recording)
    return steps


def test_two_iterations_on_boxes_and_pairs(pairs_world, tmp_path, monkeypatch):
    opts = _tiny_pairs_opts(tmp_path) + ["OUTPUT_DIR", str(tmp_path / "run")]
    cfg = get_gridclip_cfg("embedded/GridCLIP_world_pairs.yaml", opts)
    trainer = Trainer(cfg)
    model = trainer.model
    assert model.pairs_alignment is not None
    # pair images are batched at the lower resolution
    pair_batch = next(iter(trainer.data_loader.pairs))
    assert trainer.data_loader.period == 2
    assert len(pair_batch) == 3 and all(min(x["image"].shape[1:]) == 64 for x in pair_batch)
    assert all("phrases" in x and "instances" not in x for x in pair_batch)
    before = model.head.grid_embed.weight.detach().clone()
    record = _RecordLosses()
    trainer.register_hooks([record])
    refine_steps = _record_refine_steps(monkeypatch)
    trainer.train()
    # training's own pseudo-box search refines once, whatever TEST_BOX_REFINE_STEPS says
    assert model.test_box_refine_steps == 2 and refine_steps == [1]
    # pairs on top of the box batches: both losses at step 0, box losses alone at step 1
    box_losses = ["loss_box_refine", "loss_box_reg", "loss_cls"]  # the world config refines
    assert record.keys[0] == box_losses + ["loss_pairs"]
    assert record.keys[1] == box_losses
    assert not torch.equal(before, model.head.grid_embed.weight.detach())
    # a mixed batch = a box pass on its box inputs + a pair pass on its pair inputs
    box_batch = next(iter(trainer.data_loader.boxes))
    model.train()
    normalizer = model.loss_normalizer  # RetinaNet's running normaliser: same start for both
    with torch.no_grad(), EventStorage(0):
        mixed = model(list(box_batch) + list(pair_batch))
        model.loss_normalizer = normalizer
        alone = {**model(list(box_batch)), **model(list(pair_batch))}
    assert sorted(mixed) == sorted(alone) and "loss_pairs" in mixed
    assert torch.isfinite(mixed["loss_pairs"]) and mixed["loss_pairs"] > 0
    for k in alone:
        torch.testing.assert_close(mixed[k], alone[k])
    # the phrase embeddings are not saved in checkpoints
    assert not any("phrase_embeddings" in k for k in model.state_dict())


def test_pairs_folder_follows_the_umask_and_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    root = str(tmp_path / "w")
    old = os.umask(0o022)
    try:
        generate_world(root, seed=3, **TINY)
        generate_world_pairs(root, num_pairs=2)
    finally:
        os.umask(old)
    assert os.stat(os.path.join(root, "pairs")).st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    before = sorted(os.listdir(root))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(world_module, "compose_caption", broken)
    with pytest.raises(OSError, match="disk full"):
        generate_world_pairs(root, num_pairs=3)  # other parameters: rebuilt, and it fails
    assert sorted(os.listdir(root)) == before  # no temporary folder left, old pairs kept
    assert os.path.exists(os.path.join(root, "pairs", "captions.json"))


# ------------------------------------------------------------- teacher pseudo-boxes (round two)
def _pair_dicts():
    return [
        {
            "file_name": "a.png",
            "image_id": 7,
            "phrases": [
                {"text": "a red star", "key": "red star"},
                {"text": "two blue rings", "key": "blue ring"},
            ],
        },
        {
            "file_name": "b.png",
            "image_id": 8,
            "phrases": [{"text": "a red star", "key": "red star"}],
        },
    ]


def _labels(tmp_path, annotations, images=(7, 8)):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"images": [{"id": i} for i in images], "annotations": annotations}))
    return str(path)


def test_attach_pseudo_boxes_indexes_phrases_and_keeps_unboxed_images(tmp_path):
    path = _labels(
        tmp_path,
        [
            {"image_id": 7, "bbox": [1, 2, 3, 4], "phrase": "blue ring", "score": 0.5},
            {"image_id": 7, "bbox": [5, 5, 2, 2], "phrase": "red star"},
        ],
    )
    given = _pair_dicts()
    dicts = attach_pseudo_boxes(given, path)
    assert [a["category_id"] for a in dicts[0]["annotations"]] == [1, 0]
    assert dicts[0]["annotations"][0]["bbox"] == [1.0, 2.0, 3.0, 4.0]
    assert dicts[0]["annotations"][0]["bbox_mode"] == BoxMode.XYWH_ABS
    assert dicts[1]["annotations"] == []  # labelled, nothing found
    assert "annotations" not in given[0]  # the given dicts are not changed


@pytest.mark.parametrize(
    "annotations, images, match",
    [
        ([], (7,), "b.png.*not labelled"),
        ([{"image_id": 9, "bbox": [0, 0, 1, 1], "phrase": "red star"}], (7, 8), "image_id 9"),
        ([{"image_id": 8, "bbox": [0, 0, 1, 1], "phrase": "blue ring"}], (7, 8), "blue ring"),
        ([{"image_id": 7, "bbox": [0, 0, 0, 1], "phrase": "red star"}], (7, 8), "positive"),
        ([{"image_id": 7, "bbox": [0, 0, 1], "phrase": "red star"}], (7, 8), r"\[x, y, w, h\]"),
        ([{"image_id": 7, "bbox": [0, 0, 1, 1]}], (7, 8), "'phrase'"),
    ],
)
def test_bad_pseudo_box_file_names_the_file_and_value(tmp_path, annotations, images, match):
    path = _labels(tmp_path, annotations, images)
    with pytest.raises(ValueError, match=match) as info:
        attach_pseudo_boxes(_pair_dicts(), path)
    assert "labels.json" in str(info.value)
    with pytest.raises(FileNotFoundError, match="pseudo_label_pairs"):
        attach_pseudo_boxes(_pair_dicts(), str(tmp_path / "missing.json"))


def test_pairs_mapper_flips_pseudo_boxes_with_the_image(pairs_world, tmp_path):
    cfg = get_gridclip_cfg(
        "embedded/GridCLIP_world_pairs.yaml",
        [
            "INPUT.MIN_SIZE_TRAIN",
            "(96,)",
            "INPUT.MAX_SIZE_TRAIN",
            "96",
            "INPUT.RANDOM_FLIP",
            "none",
        ],
    )
    d = DatasetCatalog.get("test_pairs_world_pairs")[0]
    path = _labels(
        tmp_path,
        [{"image_id": d["image_id"], "bbox": [10, 20, 30, 40], "phrase": d["phrases"][-1]["key"]}],
        images=[d["image_id"]],
    )
    (labelled,) = attach_pseudo_boxes([d], path)
    out = PairsDatasetMapper(cfg, True)(labelled)
    assert "instances" not in out and "phrases" in out  # still a pair input
    boxes = out["pseudo_boxes"]
    torch.testing.assert_close(boxes.gt_boxes.tensor, torch.tensor([[10.0, 20.0, 40.0, 60.0]]))
    assert boxes.gt_classes.tolist() == [len(d["phrases"]) - 1]
    cfg.defrost()
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    mapper = PairsDatasetMapper(cfg, True)
    widths = {float(mapper(labelled)["pseudo_boxes"].gt_boxes.tensor[0, 0]) for _ in range(30)}
    assert widths == {10.0, 96.0 - 40.0}  # flipped with the image, or not


def test_second_round_labels_pairs_and_trains_on_the_teacher_boxes(
    pairs_world, tmp_path, monkeypatch
):
    opts = _tiny_pairs_opts(tmp_path)
    cfg = get_gridclip_cfg(
        "embedded/GridCLIP_world_pairs.yaml", opts + ["OUTPUT_DIR", str(tmp_path / "t")]
    )
    teacher = Trainer(cfg)
    weights = str(tmp_path / "teacher.pth")
    torch.save({"model": teacher.model.state_dict()}, weights)
    labels = str(tmp_path / "labels" / "round2.json")
    refine_steps = _record_refine_steps(monkeypatch)
    result = pseudo_label_pairs.main(["--weights", weights, "--output", labels] + opts)
    # a teacher's search refines once, as training's, whatever TEST_BOX_REFINE_STEPS says
    assert cfg.MODEL.GRIDCLIP.TEST_BOX_REFINE_STEPS == 2
    assert refine_steps and set(refine_steps) == {1}
    dicts = {d["image_id"]: d for d in DatasetCatalog.get("test_pairs_world_pairs")}
    assert sorted(im["id"] for im in result["images"]) == sorted(dicts)
    assert result["annotations"], "floor 0: every named phrase gets its boxes"
    per_phrase = {}
    for a in result["annotations"]:
        d = dicts[a["image_id"]]
        assert a["phrase"] in {p["key"] for p in d["phrases"]}
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= d["width"] + 0.01 and y + h <= d["height"] + 0.01  # image pixels
        per_phrase[(a["image_id"], a["phrase"])] = (
            per_phrase.get((a["image_id"], a["phrase"]), 0) + 1
        )
    for (image_id, key), n in per_phrase.items():
        wanted = [
            phrase_count(p["text"]) or 1 for p in dicts[image_id]["phrases"] if p["key"] == key
        ]
        assert n <= max(wanted)  # no more boxes than the caption counts
    assert json.load(open(labels))["annotations"] == result["annotations"]

    # the student trains on them: no search of its own
    student_opts = opts + ["MODEL.GRIDCLIP.PAIRS_PSEUDO_BOXES", labels, "SOLVER.MAX_ITER", "1"]
    student = Trainer(
        get_gridclip_cfg(
            "embedded/GridCLIP_world_pairs.yaml", student_opts + ["OUTPUT_DIR", str(tmp_path / "s")]
        )
    )
    pair_batch = next(iter(student.data_loader.pairs))
    assert all("pseudo_boxes" in x and "instances" not in x for x in pair_batch)

    def no_search(*args, **kwargs):
        raise AssertionError("the student searched its own pseudo-boxes")

    monkeypatch.setattr(student.model, "find_pseudo_boxes", no_search)
    record = _RecordLosses()
    student.register_hooks([record])
    student.train()
    assert "loss_pairs" in record.keys[0]
    found, columns = student.model.given_pseudo_boxes(pair_batch)
    keys = student.model.pairs_alignment.batch_keys(pair_batch)
    for x, b, c in zip(pair_batch, found, columns):
        assert len(b) == len(x["pseudo_boxes"])
        assert [keys[j] for j in c.tolist()] == [
            x["phrases"][int(k)]["key"] for k in x["pseudo_boxes"].gt_classes
        ]
    with pytest.raises(ValueError, match="mixes images with and without"):
        student.model.given_pseudo_boxes([pair_batch[0], {"phrases": pair_batch[0]["phrases"]}])
