"""Grounding prompts (issue 17 item 3): phrase splitting and spans
(``gridclip.modeling.prompts``), the predictor's prompt API, ``tools/demo.py --prompt`` and the
phrase-recovery command ``tools/grounding_eval.py``, on the CI demo's trained models."""

import json
import os
import subprocess
import sys

import pytest
import torch

from gridclip.modeling.prompts import (
    CAPTION_SEPARATORS,
    parse_prompt,
    pluralize,
    singularize,
    template_caption,
)
from gridclip_tools import pseudo_box_quality

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _triples(parsed):
    return [(p.text, p.span, p.name) for p in parsed.phrases]


def _spans_exact(parsed):
    for p in parsed.phrases:
        start, end = p.span
        assert parsed.prompt[start:end] == p.text, (p, parsed.prompt)


# ------------------------------------------------------------------------------ splitting
def test_glip_prompt_splits_on_periods_only():
    prompt = "red star. blue ring.  yellow heart."
    parsed = parse_prompt(prompt)
    assert parsed.kind == "phrases"
    assert _triples(parsed) == [
        ("red star", (0, 8), "red star"),
        ("blue ring", (10, 19), "blue ring"),
        ("yellow heart", (22, 34), "yellow heart"),
    ]
    assert parsed.class_names == ["red star", "blue ring", "yellow heart"]
    # commas, parentheses, unicode and underscores stay inside a GLIP phrase, as typed
    parsed = parse_prompt(" bow (weapon), red.crème brûlée.red_star ", "phrases")
    assert [p.text for p in parsed.phrases] == ["bow (weapon), red", "crème brûlée", "red_star"]
    assert parsed.class_names == ["bow (weapon), red", "crème brûlée", "red_star"]
    _spans_exact(parsed)
    # one segment with a final period is read as a caption by "auto", a phrase when asked
    assert parse_prompt("two blue rings.").kind == "caption"
    assert parse_prompt("two blue rings.").class_names == ["blue ring"]
    assert parse_prompt("two blue rings.", "phrases").class_names == ["two blue rings"]


def test_caption_rule():
    caption = "a red star beside two blue rings on a striped background"
    parsed = parse_prompt(caption)
    assert parsed.kind == "caption"
    assert _triples(parsed) == [
        ("red star", (2, 10), "red star"),
        ("blue rings", (22, 32), "blue ring"),  # embedded singular, spanned as written
        ("striped background", (38, 56), "striped background"),
    ]
    parsed = parse_prompt("A red star, two blue rings and a yellow heart")
    assert parsed.class_names == ["red star", "blue ring", "yellow heart"]
    assert [p.text for p in parsed.phrases] == ["red star", "blue rings", "yellow heart"]
    # multi-word separators, numerals as digits, copulas, several sentences, a semicolon
    caption = (
        "There are 3 white crosses next to the purple hearts; a red star is in front of "
        "a box. Two boxes!"
    )
    parsed = parse_prompt(caption, "caption")
    assert [p.text for p in parsed.phrases] == [
        "white crosses",
        "purple hearts",
        "red star",
        "box",
        "boxes",
    ]
    assert parsed.class_names == ["white cross", "purple heart", "red star", "box"]
    assert [[p.text for p in group] for group in parsed.class_phrases][-1] == ["box", "boxes"]
    assert parsed.class_labels == ["white crosses", "purple hearts", "red star", "box"]
    _spans_exact(parsed)
    assert {"next_to", "in_front_of", "and", "beside", "with"} <= CAPTION_SEPARATORS


def test_unicode_and_repeated_phrases_keep_exact_spans():
    caption = "Ein naïve Café-au-lait Becher und zwei 🌟 rote Sterne, und noch ein Becher"
    parsed = parse_prompt(caption)
    _spans_exact(parsed)
    texts = [p.text for p in parsed.phrases]
    assert "naïve Café-au-lait Becher" in " ".join(texts)
    # "a red star and another red star": one class, both spans
    parsed = parse_prompt("a red star and another Red Star")
    assert parsed.class_names == ["red star"]
    assert [p.span for p in parsed.class_phrases[0]] == [(2, 10), (23, 31)]
    assert parsed.class_of("red_star") == 0 and parsed.class_of("blue ring") is None


def test_empty_and_phraseless_prompts_are_clear_errors():
    for empty in ("", "   ", "\n"):
        with pytest.raises(ValueError, match="prompt is empty"):
            parse_prompt(empty)
    for nothing in (". . .", "a and the two", ",;"):
        with pytest.raises(ValueError, match="no phrase"):
            parse_prompt(nothing, "caption" if "." not in nothing else "auto")
    with pytest.raises(ValueError, match="kind"):
        parse_prompt("red star", "sentence")
    with pytest.raises(TypeError, match="str"):
        parse_prompt(["red star"])


def test_typed_names_path_is_unchanged(tmp_path):
    """Prompts are a new path: typed names still split on commas only, a list or a .txt file
    keeps names with commas, and unicode names pass through untouched."""
    from gridclip.modeling.vocabulary import parse_vocabulary

    assert parse_vocabulary("crème brûlée, naïve bird. red star")[0] == [
        "crème brûlée",
        "naïve bird. red star",
    ]
    assert parse_vocabulary(["bow (weapon), red", "Straße"])[0] == ["bow (weapon), red", "Straße"]
    txt = tmp_path / "names.txt"
    txt.write_text("bow (weapon), red\ncafé\n", encoding="utf-8")
    assert parse_vocabulary(str(txt))[0] == ["bow (weapon), red", "café"]


def test_singular_plural_and_template_caption():
    pairs = {
        "rings": "ring",
        "crosses": "cross",
        "boxes": "box",
        "berries": "berry",
        "watches": "watch",
        "triangles": "triangle",
        "people": "person",
        "Hearts": "Heart",
    }
    for plural, singular in pairs.items():
        assert singularize(plural) == singular, plural
    for word in ("glass", "bus", "star", "its", "3", "gas", "cactus", "axis", "Café"):
        assert singularize(word) == word, word
    for noun in ("red star", "red cross", "blue box", "berry", "white square", "yellow heart"):
        assert singularize(pluralize(noun).split()[-1]) == noun.split()[-1], noun

    names = ["red_star", "blue_ring", "orange_circle", "blue_ring", "white_cross"]
    names += ["white_cross"] * 12
    caption = template_caption(names)
    assert caption == "a red star, two blue rings, an orange circle and 13 white crosses"
    assert parse_prompt(caption).class_names == [
        "red star",
        "blue ring",
        "orange circle",
        "white cross",
    ]
    assert template_caption(["yellow_heart"]) == "a yellow heart"
    with pytest.raises(ValueError, match="no objects"):
        template_caption([])


def test_match_phrases_on_hand_built_detections():
    from detectron2.structures import Boxes, BoxMode, Instances

    from gridclip_tools.grounding_eval import image_caption, match_phrases

    names = ["red_star", "blue_ring", "yellow_heart"]
    annotations = [
        {"bbox": [0, 0, 10, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1},
        {"bbox": [50, 50, 10, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1},
        {"bbox": [20, 20, 40, 40], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},
        {"bbox": [70, 0, 10, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 2},
    ]
    caption = image_caption({"annotations": annotations}, names)
    assert caption == "two blue rings, a red star and a yellow heart"
    assert image_caption({"caption": "red star.", "annotations": annotations}, names) == (
        "red star."
    )
    parsed = parse_prompt(caption)
    assert parsed.class_names == ["blue ring", "red star", "yellow heart"]
    instances = Instances((100, 100))
    # blue ring (class 0): the best detection hits ring 2, the second hits nothing; a third
    # (hitting ring 1) is beyond the phrase's two objects. Red star (1): a hit. No heart.
    instances.pred_boxes = Boxes(
        torch.tensor(
            [
                [50.0, 50.0, 60.0, 60.0],
                [80.0, 80.0, 90.0, 90.0],
                [0.0, 0.0, 10.0, 10.0],
                [21.0, 21.0, 40.0, 40.0],
                [0.0, 0.0, 5.0, 5.0],
            ]
        )
    )
    instances.scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    instances.pred_classes = torch.tensor([0, 0, 0, 1, 0])
    match = match_phrases(parsed, instances, annotations, names, 0.5)
    assert [o["recovered"] for o in match["objects"]] == [False, True, True, False]
    # ring 1 is hit by the phrase's third detection (beyond its two objects); no detection
    # overlaps the heart
    assert [o["miss"] for o in match["objects"]] == ["outranked", None, None, "no_box"]
    assert [o["phrase"] for o in match["objects"]] == [
        "blue rings",
        "blue rings",
        "red star",
        "yellow heart",
    ]
    assert {p["phrase"]: p["top1_hit"] for p in match["phrases"]} == {
        "blue rings": True,
        "red star": True,
        "yellow heart": False,
    }
    # an object whose class the caption does not name is unnamed (left out of the rate)
    parsed = parse_prompt("a red star")
    match = match_phrases(parsed, instances, annotations, names, 0.5)
    assert [o["phrase"] for o in match["objects"]] == [None, None, "red star", None]
    # the heart detected under another phrase: a wrong phrase, not a missing box
    instances.pred_boxes.tensor[1] = torch.tensor([70.0, 0.0, 80.0, 10.0])
    match = match_phrases(parse_prompt(caption), instances, annotations, names, 0.5)
    assert match["objects"][3]["miss"] == "wrong_phrase"


# ------------------------------------------------------------------- predictor, demo, eval
def _run(ci_demo, name="gridclip"):
    run = next(m for m in ci_demo["models"] if m["name"] == name)
    weights = os.path.join(ci_demo["output_dir"], name, "model_final.pth")
    return run["config"], weights, list(run["opts"])


@pytest.fixture(scope="module")
def predictor_and_image(ci_demo):
    from detectron2.data import DatasetCatalog
    from detectron2.data import detection_utils as utils

    from gridclip.engine.predictor import OpenVocabularyPredictor

    torch.set_num_threads(1)
    config, weights, opts = _run(ci_demo)
    predictor = OpenVocabularyPredictor.from_config_file(config, weights, opts)
    d = DatasetCatalog.get(predictor.cfg.DATASETS.TEST[0])[0]
    return predictor, utils.read_image(d["file_name"], format="BGR")


def test_predictor_prompt_api(predictor_and_image):
    import numpy as np

    predictor, image = predictor_and_image
    caption = "a yellow star beside two blue rings and a white square"
    outputs = predictor(image, prompt=caption)
    assert predictor.prompt is not None and predictor.prompt.prompt == caption
    assert predictor.class_names == ["yellow star", "blue ring", "white square"]
    assert list(predictor.metadata.thing_classes) == ["yellow star", "blue rings", "white square"]
    assert predictor.model.num_classes == 3
    detections = predictor.detections_to_json(outputs)
    assert len(detections) > 0
    for d in detections:
        start, end = d["span"]
        assert caption[start:end] == d["phrase"]
        assert d["phrase"] in ("yellow star", "blue rings", "white square")
        assert d["spans"][0] == d["span"]
    json.dumps(detections)
    # a batch with a prompt; the prompt stays for later calls
    batch = predictor([image, image], prompt=caption)
    assert len(batch) == 2 and predictor.prompt.prompt == caption
    top = min(10, len(outputs["instances"]))  # one forward of two images: the same, to rounding
    assert torch.allclose(
        batch[0]["instances"].scores[:top], outputs["instances"].scores[:top], atol=1e-4
    )
    third = detections[min(2, len(detections) - 1)]["score"]
    drawing = predictor.visualize(image, outputs, threshold=third)
    assert drawing.dtype == np.uint8 and drawing.ndim == 3
    # a GLIP-style prompt, then a plain vocabulary ends prompt mode
    parsed = predictor.set_prompt("red star. blue ring.")
    assert parsed.kind == "phrases" and predictor.class_names == ["red star", "blue ring"]
    assert "phrases prompt, 2 phrases" in predictor.description
    predictor.set_vocabulary("world_novel")
    assert predictor.prompt is None
    assert all("phrase" not in d for d in predictor.detections_to_json(predictor(image)))
    with pytest.raises(ValueError, match="prompt is empty"):
        predictor(image, prompt="  ")
    with pytest.raises(ValueError, match="not the vocabulary"):
        from gridclip.engine.predictor import detections_to_json

        detections_to_json(outputs, ["a", "b", "c"], prompt=parse_prompt(caption))


def test_vild_prompt_keeps_base_classes_by_name(ci_demo, predictor_and_image):
    """ViLD weighs its ensemble by base/novel: a phrase is base when its embedded name is a
    class boxed in training, whatever its spelling ("blue_ring", "blue rings")."""
    from gridclip.engine.predictor import OpenVocabularyPredictor

    _, image = predictor_and_image
    config, weights, opts = _run(ci_demo, "vild")
    predictor = OpenVocabularyPredictor.from_config_file(config, weights, opts)
    predictor(image, prompt="two blue rings beside a white star and a Purple_Heart")
    assert predictor.class_names == ["blue ring", "white star", "Purple_Heart"]
    mask = predictor.model.roi_heads.box_predictor.novel_class_mask.tolist()
    # blue_ring is a frequent class, white_star a rare (novel) one, purple_heart not in the world
    assert mask == [False, True, True]
    assert all("phrase" in d for d in predictor.detections_to_json(predictor(image)))


def test_gridclip_prompt_weighs_novel_phrases_as_novel(ci_demo, predictor_and_image):
    """GridCLIP's CLIP score ensemble weighs base and novel classes differently: in prompt
    mode a phrase is base when its embedded name is a class boxed in training, so a novel
    phrase gets the novel weight as it would in the world's evaluation."""
    from gridclip.data.world import world_categories

    predictor, image = predictor_and_image
    predictor(image, prompt="two blue rings beside a white star and a Purple_Heart")
    assert predictor.class_names == ["blue ring", "white star", "Purple_Heart"]
    # blue_ring is a frequent class, white_star a rare (novel) one, purple_heart not in the world
    assert predictor.model.trained_class_mask.tolist() == [True, False, False]
    predictor.set_vocabulary("world")  # back to the world's classes: boxed = not rare
    trained = [c["frequency"] != "r" for c in world_categories()]
    assert predictor.model.trained_class_mask.tolist() == trained


def test_demo_tool_prompt_writes_phrases_and_spans(ci_demo, predictor_and_image, tmp_path):
    from detectron2.data import DatasetCatalog

    config, weights, opts = _run(ci_demo)
    predictor, _ = predictor_and_image
    image = DatasetCatalog.get(predictor.cfg.DATASETS.TEST[0])[0]["file_name"]
    out = tmp_path / "out"
    prompt = "a red star, two blue rings and a yellow heart"
    cmd = [sys.executable, os.path.join(ROOT, "tools/demo.py"), "--config-file", config]
    cmd += ["--input", image, "--output", str(out), "--prompt", prompt]
    cmd += ["--confidence-threshold", "0.0", "--weights", weights] + opts
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env=SUBPROCESS_ENV, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "detections.json").read_text())
    assert result["prompt"]["text"] == prompt and result["prompt"]["kind"] == "caption"
    assert [p["phrase"] for p in result["prompt"]["phrases"]] == [
        "red star",
        "blue rings",
        "yellow heart",
    ]
    assert result["vocabulary"]["class_names"] == ["red star", "blue ring", "yellow heart"]
    detections = result["images"][0]["detections"]
    assert detections
    for d in detections:
        assert prompt[d["span"][0] : d["span"][1]] == d["phrase"]
    assert (out / result["images"][0]["visualization"]).stat().st_size > 0


def test_demo_tool_prompt_errors(ci_demo, tmp_path, capsys):
    from gridclip_tools import demo

    config, weights, opts = _run(ci_demo)
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    base = ["--config-file", config, "--weights", weights, "--input", str(image)]
    for args, needle in [
        (["--prompt", "  "], "prompt is empty"),
        (["--caption", "the two"], "no phrase"),
        (["--prompt", "red star", "--custom-vocabulary", "a,b"], "not allowed with"),
    ]:
        with pytest.raises(SystemExit) as e:
            demo.main(base + args)
        assert e.value.code == 2
        assert needle in capsys.readouterr().err, args


def test_grounding_eval_command(ci_demo, tmp_path):
    from gridclip_tools import grounding_eval

    config, weights, opts = _run(ci_demo)
    report = tmp_path / "grounding.json"
    result = grounding_eval.main(
        ["--config-file", config, "--weights", weights, "--num-images", "3"]
        + ["--output", str(report)]
        + opts
    )
    assert result["images"] == 3 and result["captions"] == "template"
    assert result["objects"] > 0 and result["unnamed_objects"] == 0
    assert 0.0 <= result["recovery_rate"] <= 1.0
    assert result["recovered"] == round(result["recovery_rate"] * result["objects"])
    assert sum(result["misses"].values()) == result["objects"] - result["recovered"]
    saved = json.loads(report.read_text())
    assert saved["recovered"] == result["recovered"] and len(saved["records"]) == 3
    for record in saved["records"]:
        assert parse_prompt(record["caption"]).class_names  # a parsable caption per image


def test_pseudo_box_quality_command(ci_demo, tmp_path):
    config, weights, opts = _run(ci_demo)
    report = tmp_path / "pseudo.json"
    args = ["--config-file", config, "--weights", weights, "--num-images", "3"]
    result = pseudo_box_quality.main(args + ["--output", str(report), "--min-score", "0"] + opts)
    assert result["images"] == 3 and result["min_score"] == 0.0
    groups = result["by_frequency"]
    assert groups and sum(g["objects"] for g in groups.values()) > 0
    for g in groups.values():
        # no floor: one pseudo-box per annotated object (a perfect caption's counts)
        assert g["pseudo_boxes"] == g["objects"] and 0 <= g["correct"] <= g["pseudo_boxes"]
    assert json.loads(report.read_text())["by_frequency"] == groups
    # per class: the same totals, misnamed boxes among the wrong ones, confusions between classes
    by_class = result["by_class"]
    for key in ("pseudo_boxes", "correct", "objects"):
        assert sum(c[key] for c in by_class.values()) == sum(g[key] for g in groups.values())
    for c in by_class.values():
        assert 0 <= c["misnamed"] <= c["pseudo_boxes"] - c["correct"]
    assert sum(c["misnamed"] for c in by_class.values()) == sum(
        x["pseudo_boxes"] for x in result["confusions"]
    )
    assert all(x["named"] != x["actual"] for x in result["confusions"])
    # a floor above every score leaves nothing
    high = pseudo_box_quality.main(args + ["--min-score", "0.999999"] + opts)
    assert all(g["pseudo_boxes"] == 0 for g in high["by_frequency"].values())
