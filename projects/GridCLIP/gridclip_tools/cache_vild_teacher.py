"""Precompute ViLD's teacher: proposal boxes + CLIP crop embeddings for every image of a dataset.

Training with ``MODEL.VILD.TEACHER cache MODEL.VILD.TEACHER_CACHE <dir>`` then reads these
instead of running CLIP on every proposal crop each iteration (ViLD's own offline scheme).

Proposals per image (up to ``--num-proposals``, default MODEL.VILD.NUM_DISTILL_PROPOSALS):

- ``--weights CKPT``: the top proposals of that checkpoint's RPN (built from ``--config-file``),
  at the test resolution (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST), mapped back to the original
  image. ViLD uses the proposals of a trained detector in the same way.
- otherwise: a deterministic class-agnostic set of multi-scale sliding windows (6 sizes from 10%
  to 90% of the shorter side, aspect ratios 1:2, 1:1, 2:1, 50% overlap, a fixed-seed subset),
  which needs no trained detector (``gridclip.clip.teacher_cache.sliding_window_proposals``).

Each box is embedded by the frozen CLIP of MODEL.CLIP (crops at MODEL.VILD.CROP_SCALES around
the box, at MODEL.CLIP.TEACHER_INPUT_SIZE, embeddings summed and L2-normalised), from the
original image. Boxes are stored in original image pixels; training applies the same resize and
flip as to the image.

Resumable and safe to interrupt: one file per image, written to a temporary file and renamed;
images whose entry exists and validates are skipped, invalid entries are recomputed. A second
run over a finished cache does no work. ``meta.safetensors`` records the settings; resuming with
other settings is refused (use another ``--output`` or ``--overwrite``).

Examples::

    # LVIS OVD base training set, sliding-window proposals, OpenAI RN50 CLIP
    python tools/cache_vild_teacher.py --config-file ViLD_R50.yaml \\
        --output datasets/vild_teacher/lvis_rn50 MODEL.CLIP.WEIGHTS ~/.cache/clip/RN50.pt

    # proposals of a trained ViLD/Faster R-CNN checkpoint's RPN
    python tools/cache_vild_teacher.py --config-file ViLD_R50.yaml \\
        --weights output/model_final.pth --output datasets/vild_teacher/lvis_rn50_rpn
"""

import argparse
import logging
import os
import time

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

import gridclip  # noqa: F401  (registers datasets and models)
from gridclip import get_gridclip_cfg
from gridclip.clip import build_clip_teacher_from_cfg, clip_model_key, resolve_clip_weights
from gridclip.clip.teacher_cache import (
    META_FILE,
    TeacherCacheError,
    cache_entry_path,
    read_cache_entry,
    read_cache_meta,
    sliding_window_proposals,
    write_cache_entry,
    write_cache_meta,
)
from gridclip.data.images import read_image_rgb
from gridclip_tools.args import non_negative_int

logger = logging.getLogger("gridclip.tools.cache_vild_teacher")

# Settings that make two caches incompatible (a resumed run must match them).
_META_KEYS = ("clip_model", "embed_dim", "crop_scales", "teacher_input_size", "proposals")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", default="", help="project config (path or name under configs/)")
    p.add_argument("--dataset", default="", help="registered dataset; default DATASETS.TRAIN[0]")
    p.add_argument("--output", default="", help="cache directory; default MODEL.VILD.TEACHER_CACHE")
    p.add_argument("--weights", default="", help="checkpoint whose RPN proposes the boxes")
    p.add_argument(
        "--num-proposals",
        type=non_negative_int,
        default=0,
        help="boxes per image; default MODEL.VILD.NUM_DISTILL_PROPOSALS",
    )
    p.add_argument("--overwrite", action="store_true", help="recompute every image")
    p.add_argument(
        "--limit", type=non_negative_int, default=0, help="only the first N images (0 = all)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ..."
    )
    return p.parse_args(argv)


class RPNProposer:
    """Top-N proposals of a checkpoint's RPN, in original image coordinates."""

    def __init__(self, cfg, weights: str, num_proposals: int):
        self.model = build_model(cfg)
        DetectionCheckpointer(self.model).load(weights)
        self.model.eval()
        if getattr(self.model, "proposal_generator", None) is None:
            raise SystemExit(f"--weights {weights}: the model of this config has no RPN")
        self.resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT
        self.num_proposals = num_proposals

    @torch.no_grad()
    def __call__(self, image_rgb):
        height, width = image_rgb.shape[:2]
        resized = self.resize.get_transform(image_rgb).apply_image(image_rgb)
        if self.input_format == "BGR":
            resized = resized[:, :, ::-1]
        tensor = torch.as_tensor(resized.transpose(2, 0, 1).copy()).float()
        model = self.model
        images = model.preprocess_image([{"image": tensor}])
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        boxes = proposals[0].proposal_boxes.tensor[: self.num_proposals].cpu()
        scale = torch.tensor(
            [width / resized.shape[1], height / resized.shape[0]] * 2, dtype=boxes.dtype
        )
        boxes = boxes * scale
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        return boxes


def check_meta(output: str, meta: dict, overwrite: bool) -> None:
    """Refuse to resume a cache built with other settings."""
    if overwrite or not os.path.isfile(os.path.join(output, META_FILE)):
        return
    try:
        old = read_cache_meta(output)
    except TeacherCacheError as e:
        raise SystemExit(f"{e} Use --overwrite to rebuild it.")
    diff = {k: (old.get(k), meta[k]) for k in _META_KEYS if old.get(k) != meta[k]}
    if diff:
        details = "; ".join(f"{k}: cache {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise SystemExit(
            f"{output} was built with other settings ({details}). Use another --output, or "
            "--overwrite to rebuild it."
        )


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="gridclip")
    setup_logger(name=logger.name)
    cfg = get_gridclip_cfg(args.config_file or None, args.opts)
    output = os.path.expanduser(args.output or cfg.MODEL.VILD.TEACHER_CACHE)
    if not output:
        raise SystemExit("give --output (or set MODEL.VILD.TEACHER_CACHE)")
    dataset = args.dataset or (cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else "")
    if not dataset:
        raise SystemExit("give --dataset (or set DATASETS.TRAIN)")
    num_proposals = args.num_proposals or cfg.MODEL.VILD.NUM_DISTILL_PROPOSALS
    crop_scales = [float(s) for s in cfg.MODEL.VILD.CROP_SCALES]
    device = torch.device(cfg.MODEL.DEVICE)

    weights_path = resolve_clip_weights(
        cfg.MODEL.CLIP.WEIGHTS, cfg.MODEL.CLIP.NAME, cfg.MODEL.CLIP.CACHE_DIR
    )
    proposals_desc = f"rpn:{os.path.abspath(args.weights)}" if args.weights else "sliding_windows"
    meta = {
        "clip_model": clip_model_key(weights_path),
        "embed_dim": int(cfg.MODEL.CLIP.EMBED_DIM),
        "crop_scales": crop_scales,
        "teacher_input_size": int(cfg.MODEL.CLIP.TEACHER_INPUT_SIZE),
        "proposals": proposals_desc,
        "num_proposals": int(num_proposals),
    }
    check_meta(output, meta, args.overwrite)
    datasets = []
    if os.path.isfile(os.path.join(output, META_FILE)) and not args.overwrite:
        datasets = read_cache_meta(output).get("datasets", [])
    write_cache_meta(output, dict(meta, datasets=sorted(set(datasets) | {dataset})))

    dicts = DatasetCatalog.get(dataset)
    if args.limit > 0:
        dicts = dicts[: args.limit]
    teacher = None  # built on the first image that needs work: a finished cache loads no CLIP
    proposer = None
    counts = {"total": len(dicts), "computed": 0, "skipped": 0, "recomputed": 0}
    start = time.perf_counter()
    for d in tqdm(dicts, desc=f"ViLD teacher {dataset}", disable=args.no_progress):
        path = cache_entry_path(output, d["image_id"])
        recompute = False
        if os.path.exists(path) and not args.overwrite:
            try:
                read_cache_entry(
                    path,
                    embed_dim=meta["embed_dim"],
                    image_id=d["image_id"],
                    image_size=(d["height"], d["width"]) if "height" in d else None,
                )
                counts["skipped"] += 1
                continue
            except TeacherCacheError as e:
                logger.warning(f"recomputing an invalid entry: {e}")
                recompute = True
        if teacher is None:
            teacher = build_clip_teacher_from_cfg(cfg).to(device)
            if args.weights:
                proposer = RPNProposer(cfg, args.weights, num_proposals)
        image = read_image_rgb(d["file_name"])  # the project's image rule
        height, width = image.shape[:2]
        if proposer is not None:
            boxes = proposer(image)
        else:
            boxes = sliding_window_proposals(height, width, num_proposals)
        image_tensor = torch.as_tensor(image.transpose(2, 0, 1).copy()).float()
        embeddings = teacher.embed_boxes(image_tensor, boxes, scales=crop_scales)
        write_cache_entry(
            path,
            {
                "image_id": d["image_id"],
                "file_name": d["file_name"],
                "height": height,
                "width": width,
                "boxes": boxes,
                "embeddings": embeddings,
            },
        )
        counts["recomputed" if recompute else "computed"] += 1
    elapsed = time.perf_counter() - start
    work = counts["computed"] + counts["recomputed"]
    logger.info(
        f"ViLD teacher cache {output}: {counts['total']} images, {counts['computed']} computed, "
        f"{counts['recomputed']} recomputed (invalid), {counts['skipped']} already done; "
        f"{elapsed:.1f} s" + (f" ({elapsed / work:.3f} s/image)" if work else "")
    )
    return counts
