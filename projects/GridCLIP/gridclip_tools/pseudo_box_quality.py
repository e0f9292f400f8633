"""How good are caption pseudo-boxes? Measured on annotated images, whose boxes are known.

    python tools/pseudo_box_quality.py --weights output/demo/gridclip/model_final.pth \\
        --dataset gridclip_world_val --output output/pseudo_boxes/demo.json

Training on image-text pairs (``MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT > 0``) gives each phrase of a
caption the detector's own best boxes for it (:meth:`GridCLIP.find_pseudo_boxes`, the
training code itself). Pair images have no boxes to check them against; this command plays the
same game on a box-annotated dataset: each image's "caption" names every annotated class with its
count (a perfect caption), the pseudo-boxes are found exactly as in training (the config's
``PAIRS_PSEUDO_MIN_SCORE``, the frozen CLIP's ranking at ``PAIRS_PSEUDO_CLIP_WEIGHT``, the box
refiner once when the model has one; ``--min-score`` overrides the floor) with the model's class
names as the vocabulary, and each pseudo-box is **correct** when it overlaps an annotated box of
its class at IoU >= ``--iou`` (0.5), each box matched once, best score first.

Reported per class frequency (base ``f``/``c``, novel ``r``): precision (correct / pseudo-boxes)
and recall (correct / annotated objects), on stdout and in ``--output`` (JSON). The JSON also has
them per class (``by_class``), with the wrong pseudo-boxes that sit on an object of *another*
class (``misnamed``: IoU >= ``--iou`` with it) and which classes were taken for which
(``confusions``, most frequent first); ``--per-class`` prints those too.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from typing import Dict, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode, pairwise_iou
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

import gridclip  # noqa: F401  (registers models and datasets)
from gridclip.utils.io import atomic_write
from gridclip_tools.args import add_config_overrides, add_evaluated_model
from gridclip_tools.demo import evaluation_setup, read_image_bgr

__all__ = [
    "find_image_pseudo_boxes",
    "image_pseudo_boxes",
    "misnamed_as",
    "score_pseudo_boxes",
    "main",
]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_evaluated_model(p)
    p.add_argument("--min-score", type=float, help="score floor (default: the config's)")
    p.add_argument("--iou", type=float, default=0.5, help="IoU for a correct pseudo-box")
    p.add_argument("--output", help="JSON report")
    p.add_argument(
        "--per-class",
        action="store_true",
        help="also print precision, recall and misnamed pseudo-boxes per class, and the confusions",
    )
    add_config_overrides(p)
    return p


@torch.no_grad()
def find_image_pseudo_boxes(model, image_bgr, cfg, vocabulary, rows, counts, min_score: float):
    """Caption pseudo-boxes of one image, found as in training (:meth:`GridCLIP.find_pseudo_boxes`)
    at the test resolution.

    Args:
        vocabulary: (V, D) text embeddings (the CLIP ranking's softmax runs over them);
            rows: (P,) the rows of the caption's P phrases; counts: (P,) their object counts.
    Returns:
        ``(boxes (K, 4) in the model's input coordinates, columns (K,) in 0..P-1, transform)``,
        ``transform`` mapping the image to the model's input.
    """
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    transform = resize.get_transform(image_bgr)
    image = transform.apply_image(image_bgr)
    if cfg.INPUT.FORMAT == "RGB":
        image = image[:, :, ::-1]
    tensor = torch.as_tensor(image.astype("float32").transpose(2, 0, 1).copy())
    rows = torch.as_tensor(rows, dtype=torch.long)
    images = model.preprocess_image([{"image": tensor}])
    backbone_features = model.backbone(images.tensor)
    features = [backbone_features[f] for f in model.head_in_features]
    grid_embeddings, box_deltas, anchor_offsets = model.predict(
        features, backbone_features.get("res5")
    )[:3]
    logits = model.head.anchor_logits(
        grid_embeddings, anchor_offsets, text_embeddings=vocabulary[rows.to(vocabulary.device)]
    )
    found, columns = model.find_pseudo_boxes(
        images,
        features,
        box_deltas,
        logits,
        torch.ones(1, len(rows), dtype=torch.bool, device=model.device),
        torch.as_tensor(counts, dtype=torch.long, device=model.device).reshape(1, -1),
        [tensor],
        vocabulary,
        rows,
        min_score,
    )
    return found[0].cpu(), columns[0].cpu(), transform


def image_pseudo_boxes(model, image_bgr, annotations: List[Dict], cfg, min_score: float):
    """One image's pseudo-boxes for a caption naming its annotated classes with their counts.

    Returns:
        ``(boxes (K, 4), classes (K,), gt_boxes (G, 4), gt_classes (G,))`` in the model's
        input coordinates.
    """
    gt_classes = torch.tensor([a["category_id"] for a in annotations], dtype=torch.long)
    count = Counter(gt_classes.tolist())
    classes = torch.tensor(sorted(count), dtype=torch.long)
    boxes, columns, transform = find_image_pseudo_boxes(
        model,
        image_bgr,
        cfg,
        model.text_embeddings,
        classes,
        [count[c] for c in classes.tolist()],
        min_score,
    )
    gt = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations]
    gt_boxes = torch.as_tensor(transform.apply_box(gt), dtype=torch.float32).reshape(-1, 4)
    return boxes, classes[columns], gt_boxes, gt_classes


def score_pseudo_boxes(boxes, classes, gt_boxes, gt_classes, iou: float) -> List[bool]:
    """Per pseudo-box (in the given order, best first), whether it matches a not yet matched
    annotated box of its class at IoU >= ``iou``."""
    taken = torch.zeros(len(gt_boxes), dtype=torch.bool)
    correct = []
    overlaps = pairwise_iou(Boxes(boxes), Boxes(gt_boxes)) if len(gt_boxes) else None
    for k in range(len(boxes)):
        ok = False
        if overlaps is not None:
            candidates = (gt_classes == classes[k]) & ~taken & (overlaps[k] >= iou)
            if candidates.any():
                best = torch.where(candidates, overlaps[k], -1.0).argmax()
                taken[best], ok = True, True
        correct.append(ok)
    return correct


def misnamed_as(boxes, classes, gt_boxes, gt_classes, correct, iou: float) -> List[Optional[int]]:
    """Per pseudo-box, the class of the annotated object of *another* class it sits on (the one
    it overlaps most at IoU >= ``iou``) when it is not correct; None when it is correct or sits on
    no such object."""
    if not len(gt_boxes):
        return [None] * len(boxes)
    overlaps = pairwise_iou(Boxes(boxes), Boxes(gt_boxes))
    out: List[Optional[int]] = []
    for k in range(len(boxes)):
        other = (gt_classes != classes[k]) & (overlaps[k] >= iou)
        if correct[k] or not other.any():
            out.append(None)
        else:
            out.append(int(gt_classes[torch.where(other, overlaps[k], -1.0).argmax()]))
    return out


def _rates(counts: Dict[str, int]) -> Dict:
    """``counts`` (pseudo_boxes, correct, objects, ...) with precision and recall added."""
    n, ok, objects = counts["pseudo_boxes"], counts["correct"], counts["objects"]
    return {
        **counts,
        "precision": ok / n if n else None,
        "recall": ok / objects if objects else None,
    }


def _group(category: int, frequencies) -> str:
    return frequencies[category] if frequencies is not None else "all"


def main(argv=None) -> Dict:
    parser = get_parser()
    args = parser.parse_args(argv)
    setup_logger(name="gridclip")
    setup_logger()
    cfg, dataset = evaluation_setup(parser, args)
    if cfg.MODEL.META_ARCHITECTURE != "GridCLIP":
        parser.error(f"caption pseudo-boxes are GridCLIP's, not {cfg.MODEL.META_ARCHITECTURE}'s")
    min_score = args.min_score
    if min_score is None:
        min_score = cfg.MODEL.GRIDCLIP.PAIRS_PSEUDO_MIN_SCORE
    frequencies = getattr(MetadataCatalog.get(dataset), "class_frequencies", None)
    dicts = [d for d in DatasetCatalog.get(dataset) if d.get("annotations")]
    if args.num_images:
        dicts = dicts[: args.num_images]
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    # per class: pseudo-boxes, correct ones, misnamed ones, annotated objects
    count = {key: Counter() for key in ("pseudo_boxes", "correct", "misnamed", "objects")}
    confusions = Counter()
    for d in tqdm(dicts, desc="pseudo-boxes", unit="img"):
        boxes, classes, gt_boxes, gt_classes = image_pseudo_boxes(
            model, read_image_bgr(d["file_name"]), d["annotations"], cfg, min_score
        )
        correct = score_pseudo_boxes(boxes, classes, gt_boxes, gt_classes, args.iou)
        wrong_object = misnamed_as(boxes, classes, gt_boxes, gt_classes, correct, args.iou)
        for c, ok, actual in zip(classes.tolist(), correct, wrong_object):
            count["pseudo_boxes"][c] += 1
            count["correct"][c] += ok
            if actual is not None:
                count["misnamed"][c] += 1
                confusions[(c, actual)] += 1
        count["objects"].update(gt_classes.tolist())
    names = list(getattr(MetadataCatalog.get(dataset), "thing_classes", []))

    def name(c: int) -> str:
        return names[c] if c < len(names) else str(c)

    seen = sorted(set(count["objects"]) | set(count["pseudo_boxes"]))
    by_class = {
        name(c): {
            "frequency": _group(c, frequencies),
            **_rates({k: n[c] for k, n in count.items()}),
        }
        for c in seen
    }
    by_frequency = {}
    for g in sorted({_group(c, frequencies) for c in count["objects"]}):
        members = [c for c in seen if _group(c, frequencies) == g]
        totals = {k: sum(count[k][c] for c in members) for k in count if k != "misnamed"}
        by_frequency[g] = _rates(totals)
    result = {
        "config_file": args.config_file,
        "weights": cfg.MODEL.WEIGHTS,
        "dataset": dataset,
        "images": len(dicts),
        "min_score": min_score,
        "iou": args.iou,
        "clip_ranking_weight": model.pseudo_box_ranking_weight,
        "clip_crop_scales": list(model.pairs_pseudo_clip_crop_scales),
        "test_size": [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST],
        "box_refine": bool(cfg.MODEL.GRIDCLIP.BOX_REFINE),
        "by_frequency": by_frequency,
        "by_class": by_class,
        "confusions": [
            {"named": name(named), "actual": name(actual), "pseudo_boxes": count}
            for (named, actual), count in confusions.most_common()
        ],
    }
    for g, r in by_frequency.items():
        print(
            f"{g}: {r['pseudo_boxes']} pseudo-boxes for {r['objects']} objects, precision "
            f"{100 * (r['precision'] or 0):.1f}%, recall {100 * (r['recall'] or 0):.1f}% "
            f"(IoU >= {args.iou}, score >= {min_score})"
        )
    if args.per_class:
        for cname, r in by_class.items():
            print(
                f"  {cname} ({r['frequency']}): {r['pseudo_boxes']} pseudo-boxes for "
                f"{r['objects']} objects, precision {100 * (r['precision'] or 0):.1f}%, recall "
                f"{100 * (r['recall'] or 0):.1f}%, {r['misnamed']} on an object of another class"
            )
        for c in result["confusions"][:10]:
            print(f"  named {c['named']} on a {c['actual']}: {c['pseudo_boxes']} pseudo-boxes")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with atomic_write(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result
