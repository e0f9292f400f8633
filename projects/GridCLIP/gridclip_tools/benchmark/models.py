"""The config and the model of a benchmarked spec, built through the project's own code."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from detectron2.modeling import build_model

from gridclip.clip import load_clip_from_cfg
from gridclip.clip.teacher_cache import gridclip_teacher_provenance
from gridclip.config import get_gridclip_cfg

from .assets import BenchmarkAssets
from .specs import BenchmarkSettings, ModelSpec

__all__ = ["build_cfg", "build_benchmark_model"]


def build_cfg(
    spec: ModelSpec,
    num_classes: int,
    assets: BenchmarkAssets,
    settings: BenchmarkSettings,
    *,
    train_image: Optional[Tuple[int, int, str]] = None,
):
    """The project config of ``spec`` with ``num_classes`` classes and the benchmark's assets.

    GridCLIP and RetinaNet use ``GridCLIP_R50.yaml`` (RetinaNet: ``META_ARCHITECTURE
    RetinaNet``, i.e. plain Detectron2 RetinaNet on the same CLIP RN50 + FPN backbone, anchors
    and test settings); ViLD uses ``ViLD_R50.yaml`` (the same CLIP RN50 trunk, FPN P2-P6).
    ``train_image`` = (height, width, key) of the training image, for the teacher caches.
    """
    arch = settings.clip_architecture
    k = spec.fixed_classes or num_classes
    opts: List = [
        "MODEL.CLIP.WEIGHTS", assets.clip_weights,
        "MODEL.CLIP.NAME", arch.name,
        "MODEL.CLIP.EMBED_DIM", arch.embed_dim,
        "MODEL.CLIP.TEACHER_INPUT_SIZE", arch.image_resolution,
        "MODEL.CLIP_RESNET.INIT_FROM_CLIP", True,
        "TEST.DETECTIONS_PER_IMAGE", settings.detections,
        "DATASETS.TEST", (),
    ]  # fmt: skip
    config_file = "GridCLIP_R50.yaml"
    if spec.family == "retinanet":
        opts += ["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.RETINANET.NUM_CLASSES", k]
        opts += ["DATASETS.TRAIN", ()]
    else:
        opts += ["MODEL.CLIP.TEXT_EMBEDDINGS", assets.text_embeddings(k)]
        opts += ["DATASETS.TRAIN", (assets.dataset(k),)]
    if spec.family == "gridclip":
        opts += ["MODEL.RETINANET.NUM_CLASSES", k]
        opts += ["MODEL.GRIDCLIP.TEACHER_CACHE", ""]
    elif spec.family == "vild":
        config_file = "ViLD_R50.yaml"
        opts += ["MODEL.ROI_HEADS.NUM_CLASSES", k, "MODEL.VILD.ENSEMBLE", spec.ensemble]
        opts += ["MODEL.VILD.TEACHER", "online", "MODEL.VILD.TEACHER_CACHE", ""]
    opts += list(spec.opts) + list(settings.opts)
    if settings.device:
        opts += ["MODEL.DEVICE", settings.device]
    cfg = get_gridclip_cfg(config_file, opts)
    if spec.teacher == "cache" and train_image is not None:
        h, w, key = train_image
        cfg.defrost()
        if spec.family == "gridclip":
            grids = list(cfg.MODEL.GRIDCLIP.IMAGE_ALIGN_GRIDS)
            provenance = gridclip_teacher_provenance(cfg)
            cfg.MODEL.GRIDCLIP.TEACHER_CACHE = assets.gridclip_teacher_cache(grids, key, provenance)
        elif spec.family == "vild":
            cfg.MODEL.VILD.TEACHER = "cache"
            cfg.MODEL.VILD.TEACHER_CACHE = assets.vild_teacher_cache(
                int(key), h, w, cfg.MODEL.VILD.NUM_DISTILL_PROPOSALS, cfg.MODEL.VILD.CROP_SCALES
            )
    cfg.freeze()
    return cfg


def build_benchmark_model(cfg, seed: int = 0) -> torch.nn.Module:
    """``build_model(cfg)`` with a fixed seed: the same config gives the same weights, whichever
    models were built before in the process."""
    # The CLIP file is loaded once per process (memoised) and loading builds a randomly
    # initialised CLIP first, which draws from the global RNG: load it before seeding, or the
    # first model built in a process gets other weights than the next ones.
    load_clip_from_cfg(cfg, copy_model=False)
    torch.manual_seed(seed)
    return build_model(cfg)
