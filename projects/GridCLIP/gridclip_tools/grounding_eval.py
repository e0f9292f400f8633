"""Phrase recovery of a trained detector prompted with each image's own caption.

    python tools/grounding_eval.py --weights output/demo/gridclip/model_final.pth \\
        --dataset gridclip_world_val --output output/grounding/gridclip.json

For every image of ``--dataset`` (default the config's ``DATASETS.TEST[0]``):

1. its caption: the dataset dict's ``caption`` when it has one, else one built from its
   annotations by :func:`gridclip.modeling.prompts.template_caption` (``"a red star, two blue
   rings and a yellow heart"``);
2. the predictor detects the caption's phrases (``predictor(image, prompt=caption)``, the
   caption rule of :mod:`gridclip.modeling.prompts`);
3. each annotated object is matched to the phrase whose name is its class name (case and
   ``_``/space ignored; an object whose class the caption does not name is counted as
   ``unnamed`` and left out of the rate);
4. **recovered**: for a phrase naming *n* objects, its *n* best-scoring detections (the phrase's
   best detection per object) are matched greedily, best score first, to the phrase's boxes at
   IoU >= ``--iou`` (0.5); an object is recovered when one of them matches it.

Reported: the recovery rate over all named objects, per class frequency (``f``/``c``/``r`` =
novel) when the dataset has them, why the others were missed (``outranked``: a detection of
the object's phrase overlaps it but is not among the phrase's *n* best; ``wrong_phrase``: only
other phrases' detections overlap it; ``no_box``: no detection overlaps it), and the phrase
recall@1 (the phrase's top detection overlaps one of its boxes),
on stdout and in ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, pairwise_iou
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

import gridclip  # noqa: F401  (registers models and datasets)
from gridclip.engine.predictor import OpenVocabularyPredictor
from gridclip.modeling.prompts import ParsedPrompt, parse_prompt, template_caption
from gridclip.utils.io import atomic_write
from gridclip_tools.args import add_config_overrides, add_evaluated_model
from gridclip_tools.demo import evaluation_setup, read_image_bgr

logger = logging.getLogger("gridclip.grounding_eval")

__all__ = ["image_caption", "match_phrases", "main"]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_evaluated_model(p)
    p.add_argument("--iou", type=float, default=0.5, help="IoU for a recovered object")
    p.add_argument("--output", help="JSON report (per-image records included)")
    add_config_overrides(p)
    return p


def image_caption(dataset_dict: Dict, class_names: Sequence[str]) -> str:
    """The dict's ``caption`` if it has a non-empty one, else :func:`template_caption` of its
    annotations' class names (in annotation order)."""
    caption = dataset_dict.get("caption")
    if isinstance(caption, str) and caption.strip():
        return caption
    names = [class_names[a["category_id"]] for a in dataset_dict.get("annotations", [])]
    if not names:
        raise ValueError(
            f"{dataset_dict.get('file_name')!r} has no caption and no annotations to build one"
        )
    return template_caption(names)


def _xyxy(annotation: Dict) -> List[float]:
    return BoxMode.convert(list(annotation["bbox"]), annotation["bbox_mode"], BoxMode.XYXY_ABS)


def match_phrases(
    parsed: ParsedPrompt,
    instances,
    annotations: Sequence[Dict],
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
) -> Dict:
    """Which annotated objects the prompt's phrases recover in one image (rule in the module doc).

    Args:
        parsed: the prompt the detections were predicted with (class k = its phrase class k).
        instances: the predictor's ``Instances`` (``pred_boxes``, ``scores``, ``pred_classes``).
        annotations: the image's Detectron2 annotations (``bbox``, ``bbox_mode``, ``category_id``).
        class_names: the dataset's names, indexed by ``category_id``.

    Returns:
        ``{"objects": [{"category_id", "phrase" (None: unnamed), "recovered", "miss"}, ...],
        "phrases": [{"phrase", "span", "objects", "top1_hit"}, ...]}``.
    """
    instances = instances.to("cpu")
    pred_boxes = instances.pred_boxes.tensor
    scores = instances.scores
    pred_classes = instances.pred_classes
    objects = []
    by_class: Dict[int, List[int]] = {}
    for i, a in enumerate(annotations):
        k = parsed.class_of(class_names[a["category_id"]])
        objects.append(
            {"category_id": int(a["category_id"]), "phrase": None, "recovered": False, "miss": None}
        )
        if k is not None:
            objects[-1]["phrase"] = parsed.class_labels[k]
            by_class.setdefault(k, []).append(i)
    phrases = []
    for k, members in by_class.items():
        gt = Boxes(torch.tensor([_xyxy(annotations[i]) for i in members], dtype=torch.float32))
        mine = torch.nonzero(pred_classes == k).flatten()
        mine = mine[torch.argsort(scores[mine], descending=True)][: len(members)]
        top1_hit = False
        if len(mine):
            iou = pairwise_iou(Boxes(pred_boxes[mine]), gt)  # (n_det, n_gt)
            top1_hit = bool(iou[0].max() >= iou_threshold)
            taken = torch.zeros(len(members), dtype=torch.bool)
            for row in iou:  # best score first
                row = row.clone()
                row[taken] = -1.0
                j = int(row.argmax())
                if row[j] >= iou_threshold:
                    taken[j] = True
                    objects[members[j]]["recovered"] = True
        for i in members:
            if not objects[i]["recovered"]:
                objects[i]["miss"] = _miss_reason(
                    annotations[i], k, pred_boxes, pred_classes, iou_threshold
                )
        phrase = parsed.class_phrases[k][0]
        phrases.append(
            {
                "phrase": phrase.text,
                "span": list(phrase.span),
                "objects": len(members),
                "top1_hit": top1_hit,
            }
        )
    return {"objects": objects, "phrases": phrases}


#: Why a named object was not recovered (:func:`match_phrases`, checked in this order).
MISS_REASONS = ("outranked", "wrong_phrase", "no_box")


def _miss_reason(annotation: Dict, k: int, pred_boxes, pred_classes, iou_threshold: float) -> str:
    """``outranked``: a detection of the object's phrase overlaps it (IoU >= threshold) but is
    not among the phrase's n best; ``wrong_phrase``: only detections of other phrases overlap
    it; ``no_box``: no detection at all overlaps it."""
    if not len(pred_boxes):
        return "no_box"
    iou = pairwise_iou(
        Boxes(pred_boxes), Boxes(torch.tensor([_xyxy(annotation)], dtype=torch.float32))
    )[:, 0]
    hit = iou >= iou_threshold
    if bool((hit & (pred_classes == k)).any()):
        return "outranked"
    return "wrong_phrase" if bool(hit.any()) else "no_box"


def _rate(hits: int, total: int) -> Optional[float]:
    return round(hits / total, 4) if total else None


def main(argv=None) -> Dict:
    parser = get_parser()
    args = parser.parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger(name="gridclip")
    setup_logger()
    cfg, dataset = evaluation_setup(parser, args)
    metadata = MetadataCatalog.get(dataset)
    class_names = list(metadata.thing_classes)
    frequencies = getattr(metadata, "class_frequencies", None)
    dicts = DatasetCatalog.get(dataset)
    if args.num_images:
        dicts = dicts[: args.num_images]
    dicts = [d for d in dicts if d.get("annotations")]
    if not dicts:
        parser.error(f"--dataset {dataset!r} has no annotated image")

    predictor = OpenVocabularyPredictor(cfg)
    records = []
    start = time.perf_counter()
    logging.getLogger("gridclip").setLevel(logging.WARNING)  # one vocabulary line per image
    for d in tqdm(dicts, desc="grounding", unit="img"):
        caption = image_caption(d, class_names)
        parsed = parse_prompt(caption, "caption")
        image = read_image_bgr(d["file_name"])
        outputs = predictor(image, prompt=caption)
        assert predictor.prompt is not None and predictor.prompt.prompt == caption
        match = match_phrases(parsed, outputs["instances"], d["annotations"], class_names, args.iou)
        records.append({"file_name": d["file_name"], "caption": caption, **match})
    elapsed = time.perf_counter() - start
    logging.getLogger("gridclip").setLevel(logging.INFO)

    objects = [o for r in records for o in r["objects"]]
    named = [o for o in objects if o["phrase"] is not None]
    phrases = [p for r in records for p in r["phrases"]]
    result = {
        "config_file": args.config_file,
        "weights": cfg.MODEL.WEIGHTS,
        "dataset": dataset,
        "images": len(records),
        "iou": args.iou,
        "captions": "dataset" if any(d.get("caption") for d in dicts) else "template",
        "objects": len(objects),
        "unnamed_objects": len(objects) - len(named),
        "recovered": sum(o["recovered"] for o in named),
        "recovery_rate": _rate(sum(o["recovered"] for o in named), len(named)),
        "misses": {r: sum(o["miss"] == r for o in named) for r in MISS_REASONS},
        "phrase_recall_at_1": _rate(sum(p["top1_hit"] for p in phrases), len(phrases)),
        "seconds": round(elapsed, 1),
    }
    if frequencies is not None:
        result["recovery_rate_by_frequency"] = {
            f: _rate(
                sum(o["recovered"] for o in named if frequencies[o["category_id"]] == f),
                sum(1 for o in named if frequencies[o["category_id"]] == f),
            )
            for f in ("f", "c", "r")
        }
    line = (
        f"grounding on {dataset} ({len(records)} images, {result['captions']} captions): "
        f"{result['recovered']}/{len(named)} objects recovered at IoU>={args.iou} = "
        f"{100 * (result['recovery_rate'] or 0):.1f}%"
    )
    if frequencies is not None:
        by = result["recovery_rate_by_frequency"]
        line += (
            " (" + ", ".join(f"{f} {100 * v:.1f}%" for f, v in by.items() if v is not None) + ")"
        )
    line += f"; phrase recall@1 {100 * (result['phrase_recall_at_1'] or 0):.1f}%"
    line += "; misses: " + ", ".join(f"{r} {n}" for r, n in result["misses"].items())
    print(line)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with atomic_write(args.output, "w") as f:
            json.dump(dict(result, records=records), f, indent=2)
        logger.info(f"Wrote {args.output}")
    sys.stdout.flush()
    return result


if __name__ == "__main__":  # pragma: no cover
    main()
