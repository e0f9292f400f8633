"""Project configuration: one entry point, ``get_gridclip_cfg``.

Every script (``train_net.py``, tools, demo, notebook, tests) builds its config through
:func:`get_gridclip_cfg` so no one ever meets "Non-existent config key" because a script forgot
to add the project's keys. It also fixes the one device rule (see :func:`get_gridclip_cfg`).
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = [
    "add_gridclip_config",
    "get_gridclip_cfg",
    "resolve_device",
    "AUTO_DEVICE",
    "PROJECT_ROOT",
    "CONFIGS_DIR",
]

#: ``projects/GridCLIP`` (holds ``configs/`` and ``train_net.py``).
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS_DIR = os.path.join(PROJECT_ROOT, "configs")
#: ``MODEL.DEVICE`` value that :func:`get_gridclip_cfg` resolves to this machine's device.
AUTO_DEVICE = "auto"


def add_gridclip_config(cfg: CN) -> CN:
    """Add the keys of GridCLIP, the ViLD baseline and the CLIP layer to a Detectron2 config.

    Idempotent: calling it on a config that already has the keys leaves their values alone.
    """
    if hasattr(cfg.MODEL, "GRIDCLIP"):
        return cfg
    _C = cfg

    # ---------------------------------------------------------------- CLIP (shared by both models)
    _C.MODEL.CLIP = CN()
    # Architecture name (``RN50``, ``ViT-B/32``, or ``embedded`` for the project's small CLIP).
    _C.MODEL.CLIP.NAME = "RN50"
    # Weights: an OpenAI ``.pt`` (TorchScript) file, a plain state-dict file, or empty to look up
    # NAME in CACHE_DIR (``RN50.pt`` ...). ``embedded`` resolves to the shipped small CLIP.
    _C.MODEL.CLIP.WEIGHTS = ""
    # Where OpenAI's code caches downloaded weights; searched when WEIGHTS is empty.
    _C.MODEL.CLIP.CACHE_DIR = "~/.cache/clip"
    # Dimension of CLIP's joint image-text space (RN50: 1024, ViT-B/32: 512). Checked on load.
    _C.MODEL.CLIP.EMBED_DIM = 1024
    # Fixed (C, D) class text embeddings (``.npy``/``.pt``). Empty: compute them from CLIP's text
    # encoder for the dataset's class names, with PROMPTS, and cache them in TEXT_CACHE_DIR.
    _C.MODEL.CLIP.TEXT_EMBEDDINGS = ""
    # Prompt-template set for text embeddings: ``vild`` (ViLD's ensemble), ``single`` ("a photo
    # of a {}."), or a path to a text file with one template per line containing ``{}``.
    _C.MODEL.CLIP.PROMPTS = "vild"
    # Directory of cached text embeddings, keyed by model + vocabulary + prompts.
    _C.MODEL.CLIP.TEXT_CACHE_DIR = "~/.cache/gridclip/text_embeddings"
    # Input side length for the CLIP image teacher (224 for RN50; the tiny CLIP uses 64).
    _C.MODEL.CLIP.TEACHER_INPUT_SIZE = 224

    # ------------------------------------------------------- CLIP ModifiedResNet as a backbone
    _C.MODEL.CLIP_RESNET = CN()
    # Output features of the CLIP trunk: res2..res5 (strides 4..32).
    _C.MODEL.CLIP_RESNET.OUT_FEATURES = ["res3", "res4", "res5"]
    # Freeze the stem and the first N stages (0 = train all; 1 = stem; 2 = stem+res2; ...).
    _C.MODEL.CLIP_RESNET.FREEZE_AT = 2
    # Initialise the trunk from MODEL.CLIP weights (the paper's choice). False = random init.
    _C.MODEL.CLIP_RESNET.INIT_FROM_CLIP = True

    # ----------------------------------------------------------------------------- GridCLIP
    _C.MODEL.GRIDCLIP = CN()
    # The head predicts one embedding per location, shared by its A anchors. Add a learned
    # class-agnostic logit offset per anchor (A channels on the box tower), so those A anchors
    # get different scores.
    _C.MODEL.GRIDCLIP.ANCHOR_OFFSET = True
    # Logits = LOGIT_SCALE * cos(grid embedding, text embedding) + prior bias.
    _C.MODEL.GRIDCLIP.LOGIT_SCALE = 20.0
    # Learn the logit scale (clamped to [1, 100]) instead of keeping it fixed.
    _C.MODEL.GRIDCLIP.LEARN_LOGIT_SCALE = False
    # Kernel size of the conv that outputs the grid embeddings: 3 (RetinaNet's classifier conv)
    # or 1 (cheaper: the towers' 3x3 convs already give context; at 800x1216 with D=1024 the
    # 3x3 conv is ~48 GFLOPs, the 1x1 ~5). Padding is kernel // 2. 1 measured as accurate or
    # better on the embedded world (docs/RESULTS.md).
    _C.MODEL.GRIDCLIP.EMBED_KERNEL_SIZE = 1
    # Add CLIP's own dense embeddings to the grid embeddings: the attention pool's value path
    # (frozen, from MODEL.CLIP) applied to the trunk's res5 at every cell, resampled to every
    # FPN level and L2-normalised, times a learned scale starting at DENSE_CLIP_WEIGHT. The grid
    # embeddings then start zero-shot aligned with the text embeddings of every class, novel
    # ones included (measured: docs/RESULTS.md). Needs MODEL.BACKBONE.NAME
    # build_clip_resnet_fpn_backbone with 'res5' in MODEL.CLIP_RESNET.OUT_FEATURES; set it False
    # for other backbones.
    _C.MODEL.GRIDCLIP.DENSE_CLIP = True
    _C.MODEL.GRIDCLIP.DENSE_CLIP_WEIGHT = 1.0
    # Inference: score (text product) at most this many locations per FPN level and image,
    # those of highest objectness (max of the location's anchor offsets, trained by the focal
    # loss; the OBJECTNESS_RANKER's logit when that is on); 0 = every location. Locations
    # that cannot reach SCORE_THRESH_TEST are skipped whatever this is (exact). Exact when K
    # covers every location that can reach the detections; the vocabulary then costs
    # K x classes per level (docs/BENCHMARKS.md).
    _C.MODEL.GRIDCLIP.TEST_TOPK_LOCATIONS = 0
    # A ranking-only objectness output (one logit per location, 3x3 conv on the box tower's
    # features *detached*), trained by its own focal loss (``loss_objectness_ranker``, target
    # "a positive anchor of a trained class at this location"); when on it, not the anchor
    # offsets, ranks the locations for TEST_TOPK_LOCATIONS. Detached and built from a forked
    # random state: the detector trains exactly as without it (issue 13, docs/BENCHMARKS.md).
    _C.MODEL.GRIDCLIP.OBJECTNESS_RANKER = False
    # Train the objectness ranker alone on a trained detector (MODEL.WEIGHTS; needs
    # OBJECTNESS_RANKER): every other weight frozen, only ``loss_objectness_ranker`` computed
    # (no image-alignment teacher, no backward through the detector). The detector is the
    # checkpoint's, as joint training would leave it (the ranker is detached).
    _C.MODEL.GRIDCLIP.TRAIN_OBJECTNESS_RANKER_ONLY = False
    # Inference: dtype of the text product, "float32", "bfloat16" (CPUs with AVX512-BF16, GPUs)
    # or "float16" (GPUs); cosines within 4 units of its roundoff of fp32's (tests). Training
    # always computes it in float32.
    _C.MODEL.GRIDCLIP.TEXT_PRODUCT_DTYPE = "float32"
    # Inference: score-level ensemble with the frozen CLIP (as F-VLM): each final detection's
    # score becomes p_det^(1 - w) * p_clip^w, p_clip = softmax over the vocabulary of CLIP's
    # logit scale x cos(CLIP embedding of the box's crops, text embedding) at its class; w is
    # the first weight for classes trained by the focal loss (base), the second for the others
    # (novel). One teacher forward per detection and crop scale (cheap with the embedded small
    # CLIP; with RN50 at 224 px, 300 detections x 2 crops per image is costly).
    _C.MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE = False
    _C.MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE_WEIGHTS = [0.35, 0.65]
    _C.MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE_CROP_SCALES = [1.0, 1.5]
    # Detections whose box overlaps a higher-scored detection's by IoU > this share its CLIP
    # crops (one object under several class names); 1 = every detection cropped on its own.
    # The world configs set 0.95 (measured lossless there: docs/RESULTS.md, "Crop sharing").
    _C.MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE_SHARE_IOU = 1.0
    # Inference: box voting (gridclip/modeling/box_voting.py): each box NMS keeps becomes the
    # score-weighted mean of the same-class candidates (before NMS) that overlap it by at least
    # this IoU; scores and classes unchanged. 0 = off.
    _C.MODEL.GRIDCLIP.TEST_BOX_VOTING_IOU = 0.0
    # Class-agnostic refinement of the final boxes (gridclip/modeling/box_refinement.py): each
    # box NMS (and box voting) keeps is regressed again from its ROIAligned FPN features by a
    # two-layer MLP, trained on the dense head's own boxes at positive anchors
    # (``loss_box_refine``, L1 on Fast R-CNN deltas, weight BOX_REFINE_LOSS_WEIGHT).
    _C.MODEL.GRIDCLIP.BOX_REFINE = False
    _C.MODEL.GRIDCLIP.BOX_REFINE_LOSS_WEIGHT = 1.0
    # Inference: how many times the refiner regresses each kept box, its output fed back in (the
    # iterative box regression of Cascade R-CNN's test, with one shared stage). The caption
    # pseudo-box search (training's and tools/pseudo_label_pairs.py's) refines once. 1 = once.
    _C.MODEL.GRIDCLIP.TEST_BOX_REFINE_STEPS = 1
    # Train the classification loss only on classes annotated in training (LVIS OVD: f + c).
    # Novel (frequency 'r') classes still get scored at test time.
    _C.MODEL.GRIDCLIP.IGNORE_NOVEL_IN_TRAINING = True
    # Image-level alignment (distillation from the frozen CLIP image encoder). 0 disables it.
    _C.MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT = 1.0
    # ``l1`` (ViLD's choice, on L2-normalised embeddings) or ``cosine`` (1 - cos).
    _C.MODEL.GRIDCLIP.IMAGE_ALIGN_LOSS = "l1"
    # Teacher views: 1 = whole image; 2 = also its 2x2 tiles; ... each view is one CLIP forward.
    # Each view is compared with the mean of the normalised grid embeddings under it (per level,
    # then over levels): gridclip/modeling/image_alignment.py.
    _C.MODEL.GRIDCLIP.IMAGE_ALIGN_GRIDS = [1]
    # Optional per-image teacher-embedding cache built by tools/cache_teacher_embeddings.py.
    _C.MODEL.GRIDCLIP.TEACHER_CACHE = ""
    # Image-text pairs (captions, no boxes; gridclip/modeling/pairs_alignment.py): weight of the
    # caption pseudo-box loss on DATASETS.PAIRS_TRAIN batches. 0 = off (no pair batches).
    _C.MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT = 0.0
    # Every PAIRS_PERIOD-th iteration (1: every one) adds a batch of pairs to its box batch (both
    # losses, one step: pairs on top of the box iterations, same schedule; engine/pairs.py).
    _C.MODEL.GRIDCLIP.PAIRS_PERIOD = 1
    # No pair batch before this training iteration (e.g. until the detector's own boxes are
    # good enough to be pseudo-boxes); 0 = from the first.
    _C.MODEL.GRIDCLIP.PAIRS_START_ITER = 0
    # Images per pair batch (all GPUs together); 0 = SOLVER.IMS_PER_BATCH.
    _C.MODEL.GRIDCLIP.PAIRS_IMS_PER_BATCH = 0
    # Shorter side of pair images in training (DetCLIPv2 trains pairs at a lower resolution);
    # 0 = INPUT.MIN_SIZE_TRAIN. The longer side is capped by INPUT.MAX_SIZE_TRAIN.
    _C.MODEL.GRIDCLIP.PAIRS_MIN_SIZE_TRAIN = 0
    # The pairs' loss is the detector's focal loss on caption pseudo-boxes (each phrase's own
    # best boxes, as many as the caption counts: gridclip/modeling/pairs_alignment.py); a
    # pseudo-box is taken only when its detection probability is at least this.
    _C.MODEL.GRIDCLIP.PAIRS_PSEUDO_MIN_SCORE = 0.2
    # The frozen CLIP ranks each phrase's pseudo-box candidates with the score ensemble's rule,
    # p_det^(1 - w) p_clip^w, at this w (0: no CLIP ranking). A training setting of its own, not
    # TEST_CLIP_ENSEMBLE_WEIGHTS (until 2026-12-01 the search used their novel weight, 0.65 in
    # every measured pairs run).
    _C.MODEL.GRIDCLIP.PAIRS_PSEUDO_CLIP_WEIGHT = 0.65
    # ... and CLIP sees each candidate through crops at these scales around its box (embeddings
    # summed). Its own training key for the same reason (until 2026-12-01 the search cropped at
    # TEST_CLIP_ENSEMBLE_CROP_SCALES, whose default this is).
    _C.MODEL.GRIDCLIP.PAIRS_PSEUDO_CLIP_CROP_SCALES = [1.0, 1.5]
    # A second self-training round: a JSON of pseudo-boxes a trained detector found on the pair
    # images (tools/pseudo_label_pairs.py); the pairs' loss trains on them instead of the model's
    # own search. "" = the model's own search in every pair batch.
    _C.MODEL.GRIDCLIP.PAIRS_PSEUDO_BOXES = ""
    # Image-text pair datasets (COCO-captions-style, gridclip.data.captions), e.g.
    # ("gridclip_world_pairs",); used when MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT > 0.
    _C.DATASETS.PAIRS_TRAIN = ()

    # --------------------------------------------------------------------- ViLD-like baseline
    _C.MODEL.VILD = CN()
    # Region logits = cos(region embedding, text embedding) / TEMPERATURE (ViLD: 0.01).
    _C.MODEL.VILD.TEMPERATURE = 0.01
    # ViLD-image: L1 distillation of region embeddings to CLIP crop embeddings. 0 disables it.
    _C.MODEL.VILD.IMAGE_DISTILL_WEIGHT = 0.5
    # Crop scales around each proposal fed to the teacher (ViLD: 1x and 1.5x, embeddings summed).
    _C.MODEL.VILD.CROP_SCALES = [1.0, 1.5]
    # Proposals per image distilled (ViLD: up to 300 precomputed proposals).
    _C.MODEL.VILD.NUM_DISTILL_PROPOSALS = 300
    # ``online``: run CLIP on the crops during training; ``cache``: read TEACHER_CACHE.
    _C.MODEL.VILD.TEACHER = "online"
    # Offline cache of proposal boxes + teacher embeddings (tools/cache_vild_teacher.py).
    _C.MODEL.VILD.TEACHER_CACHE = ""
    # Ensemble ViLD-text and ViLD-image scores at inference (geometric mean).
    _C.MODEL.VILD.ENSEMBLE = False
    # Weight of the image score in the ensemble for base and for novel classes (ViLD: 1/3, 2/3;
    # written as Base-ViLD.yaml writes them).
    _C.MODEL.VILD.ENSEMBLE_IMAGE_WEIGHT_BASE = 0.3333333333
    _C.MODEL.VILD.ENSEMBLE_IMAGE_WEIGHT_NOVEL = 0.6666666667
    # Mask novel (frequency 'r') classes out of the training softmax (ViLD's protocol).
    _C.MODEL.VILD.IGNORE_NOVEL_IN_TRAINING = True
    # Inference: the final detections rescored with the frozen CLIP exactly as GridCLIP's
    # MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE does (F-VLM's p_det^(1 - w) p_clip^w; w per base/novel
    # class; crops at MODEL.VILD.CROP_SCALES), so that both detectors can be compared with the
    # same rescoring (gridclip/modeling/clip_rescoring.py). Not ViLD's own ENSEMBLE above.
    _C.MODEL.VILD.TEST_CLIP_ENSEMBLE = False
    _C.MODEL.VILD.TEST_CLIP_ENSEMBLE_WEIGHTS = [0.35, 0.65]
    _C.MODEL.VILD.TEST_CLIP_ENSEMBLE_SHARE_IOU = 1.0  # as MODEL.GRIDCLIP's
    # Inference: box voting after NMS, as MODEL.GRIDCLIP.TEST_BOX_VOTING_IOU (0 = off).
    _C.MODEL.VILD.TEST_BOX_VOTING_IOU = 0.0

    # ----------------------------------------------------------- datasets named by their files
    # COCO- or LVIS-format datasets registered from the config, no Python needed: entries
    # "NAME=JSON_FILE" or "NAME=JSON_FILE:IMAGE_ROOT" (default root: the JSON's folder); NAME is
    # then usable in DATASETS.TRAIN/TEST. LVIS format (every category has a frequency) gets the
    # LVIS evaluator and known novel classes; COCO format the COCO evaluator, all classes.
    _C.DATASETS.FILES = ()

    # ---------------------------------------------------------------------- evaluation protocol
    # Fixed AP (Dave et al. 2021, arXiv 2102.01066) on LVIS-format test sets: the top
    # FIXED_AP_DETECTIONS_PER_CLASS detections per class over the whole dataset, no per-image
    # cap (lvis API max_dets=-1). Raise TEST.DETECTIONS_PER_IMAGE (e.g. 1000) so inference keeps
    # enough detections per class. False: the standard 300-per-image protocol.
    _C.TEST.FIXED_AP = False
    _C.TEST.FIXED_AP_DETECTIONS_PER_CLASS = 10000
    # COCO-format test sets (no LVIS frequencies): names of the classes that are novel for the
    # model (not boxed in its training). Their mean per-class AP is reported as AP_novel, the
    # other classes' as AP_base, beside COCO's metrics. Empty: no split. LVIS-format sets tell
    # novel classes by frequency (APr) and ignore this.
    _C.TEST.NOVEL_CLASSES = ()

    return cfg


def get_gridclip_cfg(
    config_file: Optional[str] = None, opts: Optional[Iterable[str]] = None, freeze: bool = False
) -> CN:
    """Return a Detectron2 config with the project's keys, optionally merged from a file/opts.

    ``config_file`` may be a path or a name relative to ``projects/GridCLIP/configs``
    (e.g. ``"GridCLIP_R50.yaml"`` or ``"embedded/GridCLIP_world.yaml"``).

    Device rule: ``MODEL.DEVICE`` means what the config (file, then opts) says; ``"cpu"``,
    ``"cuda"``, ``"cuda:1"`` are used as they are, on every machine. The project's default (no
    config or opt sets it) is ``"auto"``, which this function resolves once, after merging, to
    ``"cuda"`` if CUDA is available and ``"cpu"`` otherwise (Detectron2's own default is
    ``"cuda"``, which fails on CPU-only machines, where the embedded default must run). The
    returned config therefore always names a concrete device, and ``cfg.dump()`` (saved with a
    run's outputs) records the device the run used.
    """
    cfg = get_cfg()
    add_gridclip_config(cfg)
    cfg.MODEL.DEVICE = AUTO_DEVICE
    if config_file:
        cfg.merge_from_file(resolve_config_path(config_file))
    if opts:
        cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = resolve_device(cfg.MODEL.DEVICE)
    if freeze:
        cfg.freeze()
    return cfg


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` if CUDA is available, else ``"cpu"``; any other value as is."""
    if device != AUTO_DEVICE:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_config_path(config_file: str) -> str:
    """Resolve a config path given directly or relative to the project's ``configs/`` folder."""
    if os.path.isfile(config_file):
        return config_file
    candidate = os.path.join(CONFIGS_DIR, config_file)
    if os.path.isfile(candidate):
        return candidate
    raise FileNotFoundError(
        f"Config file {config_file!r} not found (also looked in {CONFIGS_DIR}). "
        f"Available: {sorted(_list_configs())}"
    )


def _list_configs():
    for dirpath, _, files in os.walk(CONFIGS_DIR):
        for f in files:
            if f.endswith(".yaml"):
                yield os.path.relpath(os.path.join(dirpath, f), CONFIGS_DIR)
