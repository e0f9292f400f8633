"""A second self-training round on image-text pairs: a trained detector labels the pair images.

    python tools/pseudo_label_pairs.py --weights output/pairs/gridclip_pairs/model_final.pth \\
        --output output/pseudo_labels/pairs_s1.json
    python projects/GridCLIP/train_net.py --config-file embedded/GridCLIP_world_pairs.yaml \\
        MODEL.GRIDCLIP.PAIRS_PSEUDO_BOXES output/pseudo_labels/pairs_s1.json \\
        MODEL.GRIDCLIP.PAIRS_START_ITER 0

Training on pairs (``MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT > 0``) finds each caption phrase's
pseudo-boxes with the model being trained, which is weak early on. A detector already trained
on boxes + pairs finds better ones (README: novel-class recall 68% -> 77%); this command runs its
search (:meth:`GridCLIP.find_pseudo_boxes`, the training code: the caption's counts, the
``PAIRS_PSEUDO_MIN_SCORE`` floor or ``--min-score``, the frozen CLIP's ranking at
``PAIRS_PSEUDO_CLIP_WEIGHT``, the one-step box refiner) once over every image of the config's
``DATASETS.PAIRS_TRAIN`` (or ``--dataset``) at the test resolution, and writes the boxes in
image pixels with their phrase keys (format: :mod:`gridclip.data.captions`). A new detector
trained with ``MODEL.GRIDCLIP.PAIRS_PSEUDO_BOXES`` set to the file learns from these boxes from
its first pair batch instead of searching its own.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

import gridclip  # noqa: F401  (registers models and datasets)
from gridclip.utils.io import atomic_write
from gridclip_tools.args import add_config_overrides, add_evaluated_model
from gridclip_tools.demo import evaluated_model_setup, read_image_bgr
from gridclip_tools.pseudo_box_quality import find_image_pseudo_boxes

__all__ = ["label_pair_images", "main"]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_evaluated_model(p)
    p.set_defaults(config_file="embedded/GridCLIP_world_pairs.yaml")
    p.add_argument("--min-score", type=float, help="score floor (default: the config's)")
    p.add_argument("--output", required=True, help="pseudo-box JSON to write")
    add_config_overrides(p)
    return p


@torch.no_grad()
def label_pair_images(model, cfg, dicts: List[Dict], min_score: float) -> List[Dict]:
    """The pseudo-box annotations (module doc) of pair dataset dicts."""
    alignment = model.pairs_alignment
    annotations = []
    for d in tqdm(dicts, desc="pseudo-labelling pairs", unit="img"):
        keys = alignment.batch_keys([d])
        rows, _, counts = alignment.batch_phrases([d])  # the caption's counts, as in training
        image = read_image_bgr(d["file_name"])
        boxes, columns, transform = find_image_pseudo_boxes(
            model,
            image,
            cfg,
            alignment.phrase_embeddings,
            rows,
            counts[0],
            min_score,
        )
        if len(boxes):  # to image pixels, inside the image (the refiner may step out)
            boxes = Boxes(torch.as_tensor(transform.inverse().apply_box(boxes.numpy())))
            boxes.clip(image.shape[:2])
            boxes = boxes.tensor
        for box, column in zip(boxes, columns.tolist()):
            xywh = [
                round(v, 2)
                for v in BoxMode.convert(box.tolist(), BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
            ]
            if xywh[2] <= 0 or xywh[3] <= 0:
                continue  # a box clipped to nothing at the image border
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": d["image_id"],
                    "bbox": xywh,
                    "phrase": keys[column],
                }
            )
    return annotations


def main(argv=None) -> Dict:
    parser = get_parser()
    args = parser.parse_args(argv)
    setup_logger(name="gridclip")
    setup_logger()
    cfg = evaluated_model_setup(parser, args)
    try:
        names = [args.dataset] if args.dataset else list(cfg.DATASETS.PAIRS_TRAIN)
        if not names:
            raise ValueError("no --dataset and the config has no DATASETS.PAIRS_TRAIN")
        unknown = [n for n in names if n not in DatasetCatalog.list()]
        if unknown:
            raise ValueError(f"pair dataset(s) {unknown} are not registered")
        if cfg.MODEL.META_ARCHITECTURE != "GridCLIP" or cfg.MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT <= 0:
            raise ValueError(
                f"{args.config_file}: pseudo-labelling needs GridCLIP with "
                "MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT > 0 (the phrase embeddings of its pairs)"
            )
    except ValueError as e:
        parser.error(str(e))
    min_score = (
        cfg.MODEL.GRIDCLIP.PAIRS_PSEUDO_MIN_SCORE if args.min_score is None else args.min_score
    )
    dicts = [d for n in names for d in DatasetCatalog.get(n) if d.get("phrases")]
    if args.num_images:
        dicts = dicts[: args.num_images]
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    start = time.perf_counter()
    annotations = label_pair_images(model, cfg, dicts, min_score)
    result = {
        "info": {
            "description": "caption pseudo-boxes of a trained detector "
            "(tools/pseudo_label_pairs.py)",
            "config_file": args.config_file,
            "weights": cfg.MODEL.WEIGHTS,
            "datasets": names,
            "min_score": min_score,
            "clip_ranking_weight": model.pseudo_box_ranking_weight,
            "clip_crop_scales": list(model.pairs_pseudo_clip_crop_scales),
            "test_size": [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST],
            "box_refine": bool(cfg.MODEL.GRIDCLIP.BOX_REFINE),
            "seconds": round(time.perf_counter() - start, 1),
        },
        "images": [{"id": d["image_id"], "file_name": d["file_name"]} for d in dicts],
        "annotations": annotations,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with atomic_write(args.output, "w") as f:
        json.dump(result, f)
    print(
        f"{len(annotations)} pseudo-boxes on {len(dicts)} pair images "
        f"({len(annotations) / max(len(dicts), 1):.2f} per image) -> {args.output}"
    )
    return result
