"""Benchmarks: GridCLIP vs the ViLD baseline vs plain RetinaNet, side by side in one run.

What is measured (``tools/benchmark.py`` is the command line; ``docs/BENCHMARKS.md`` the record):

- **inference** ms/img at batch 1, ``DefaultPredictor``-style (BGR image in, resize, model
  normalisation, forward, box decoding, NMS, ``detector_postprocess``), warm-up first, median of
  N runs (:func:`gridclip.engine.measure.time_inference`);
- **training** s/iter, 1 image per iteration, forward + backward + optimizer step, with the CLIP
  teacher's cost counted: online (GridCLIP: one CLIP forward of the image and its tiles; ViLD:
  one CLIP forward per proposal crop and scale) or read from a cache;
- **scaling** with the vocabulary size and the image size;
- **FLOPs** (fvcore via ``detectron2.utils.analysis.FlopCountAnalysis``; fvcore counts one
  fused multiply-add as one flop) and parameter counts; **peak memory**.

No weights files are needed: the configs' CLIP (``MODEL.CLIP.WEIGHTS``) is a randomly
initialised OpenAI-format CLIP of the real architecture (RN50: ModifiedResNet (3, 4, 6, 3),
width 64, 1024-d joint space; its text tower is shrunk to one narrow layer since only the
image tower is used), written once to a temporary file, so the detectors are built through the
same code as with real weights (CLIP-initialised trunk with FrozenBN, the CLIP teacher built
from the config). Text embeddings are random unit vectors, class names placeholders with LVIS's
frequency mix (f/c/r). Timings of a random model are the timings of the trained one, except
for data-dependent post-processing (how many candidates pass thresholds, NMS overlaps); all
models here use the same LVIS test settings (score threshold 1e-4, 300 detections).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import re
import resource
import shutil
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage, get_event_storage

from ..config import get_gridclip_cfg
from .measure import time_interleaved

logger = logging.getLogger(__name__)

__all__ = [
    "CLIPArchitecture",
    "RN50_ARCHITECTURE",
    "TINY_ARCHITECTURE",
    "ModelSpec",
    "INFERENCE_MODELS",
    "TRAIN_MODELS",
    "BenchmarkSettings",
    "quick_settings",
    "BenchmarkAssets",
    "PeakMemory",
    "Predictor",
    "run_benchmark",
    "compute_ratios",
    "evaluate_goals",
    "write_report",
]


# --------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class CLIPArchitecture:
    """A ModifiedResNet CLIP to build with random weights (OpenAI's ``clip.model.CLIP``)."""

    name: str
    vision_layers: Tuple[int, int, int, int]
    vision_width: int
    embed_dim: int
    image_resolution: int
    text_width: int = 64  # OpenAI's build_model infers heads = width // 64: at least 64
    text_layers: int = 1
    context_length: int = 77
    vocab_size: int = 49408


RN50_ARCHITECTURE = CLIPArchitecture("RN50", (3, 4, 6, 3), 64, 1024, 224)
TINY_ARCHITECTURE = CLIPArchitecture("tiny", (1, 1, 1, 1), 16, 64, 64, context_length=8)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One benchmarked detector.

    family: ``gridclip``, ``vild`` or ``retinanet``; per_anchor / ensemble: the variant;
    fixed_classes: a class count that does not follow the vocabulary (RetinaNet-80);
    teacher: for training, ``online``, ``cache`` or None (no teacher);
    opts: config options (KEY, VALUE, ...) of this variant, applied after the family's config.
    """

    key: str
    label: str
    family: str
    per_anchor: bool = False
    ensemble: bool = False
    fixed_classes: Optional[int] = None
    teacher: Optional[str] = None
    opts: Tuple = ()


INFERENCE_MODELS = {
    s.key: s
    for s in (
        ModelSpec("gridclip", "GridCLIP (per-location)", "gridclip"),
        ModelSpec("gridclip_anchor", "GridCLIP (per-anchor)", "gridclip", per_anchor=True),
        # MODEL.GRIDCLIP.EMBED_KERNEL_SIZE 1: the configs' since docs/BENCHMARKS.md's runs (then
        # a variant of their 3), so the same model as "gridclip" now; "gridclip_3x3" is the 3.
        ModelSpec(
            "gridclip_1x1",
            "GridCLIP (per-location, 1x1 embed conv)",
            "gridclip",
            opts=("MODEL.GRIDCLIP.EMBED_KERNEL_SIZE", 1),
        ),
        ModelSpec(
            "gridclip_3x3",
            "GridCLIP (per-location, 3x3 embed conv)",
            "gridclip",
            opts=("MODEL.GRIDCLIP.EMBED_KERNEL_SIZE", 3),
        ),
        # The configs' GridCLIP without its dense CLIP term (the attention-pool value path on
        # res5 added to the grid embeddings; Base-GridCLIP turns it on): what that term costs.
        ModelSpec(
            "gridclip_no_dense_clip",
            "GridCLIP (per-location, without the dense CLIP term)",
            "gridclip",
            opts=("MODEL.GRIDCLIP.DENSE_CLIP", False),
        ),
        ModelSpec("vild", "ViLD", "vild"),
        ModelSpec("vild_ensemble", "ViLD (ensemble)", "vild", ensemble=True),
        ModelSpec("retinanet_80", "RetinaNet (80 classes)", "retinanet", fixed_classes=80),
        ModelSpec("retinanet", "RetinaNet", "retinanet"),
    )
}

TRAIN_MODELS = {
    s.key: s
    for s in (
        ModelSpec("gridclip_online", "GridCLIP, teacher online", "gridclip", teacher="online"),
        # The same with the focal loss evaluated as Detectron2's RetinaNet.losses does (expanded
        # per-anchor logits): the cost before gridclip.modeling.focal_loss, same loss value.
        ModelSpec(
            "gridclip_online_d2loss",
            "GridCLIP, teacher online, Detectron2 focal loss",
            "gridclip",
            teacher="online",
            opts=("MODEL.GRIDCLIP.FOCAL_LOSS_IMPL", "detectron2"),
        ),
        ModelSpec("gridclip_cache", "GridCLIP, teacher cached", "gridclip", teacher="cache"),
        ModelSpec("vild_online", "ViLD, crop teacher online", "vild", teacher="online"),
        ModelSpec("vild_cache", "ViLD, crop teacher cached", "vild", teacher="cache"),
        ModelSpec("retinanet", "RetinaNet (no teacher)", "retinanet"),
    )
}

# Aspect ratio of the default synthetic image (800 x 1216, a typical COCO/LVIS landscape image).
ASPECT = 1216 / 800


@dataclasses.dataclass
class BenchmarkSettings:
    """Everything a run depends on (recorded in results.json)."""

    image_size: Tuple[int, int] = (800, 1216)  # (H, W) of the synthetic test image
    max_size: int = 1333  # ResizeShortestEdge max size at test time (LVIS: 800 / 1333)
    num_classes: int = 1203  # LVIS v1
    detections: int = 300  # TEST.DETECTIONS_PER_IMAGE (LVIS)
    warmup: int = 1
    iters: int = 3
    models: Sequence[str] = tuple(INFERENCE_MODELS)
    train_models: Sequence[str] = tuple(TRAIN_MODELS)
    train_image_size: Tuple[int, int] = (512, 768)  # reduced for CPU feasibility
    train_warmup: int = 1
    train_iters: int = 2
    train_num_gt: int = 8
    vocab_sizes: Sequence[int] = (1203, 4000, 10000)
    vocab_models: Sequence[str] = ("gridclip", "vild", "retinanet")
    image_sizes: Sequence[int] = (512, 800, 1333)  # short sides, same aspect as image_size
    resolution_models: Sequence[str] = ("gridclip", "vild", "retinanet_80")
    flops: bool = True
    profile: Sequence[str] = ()  # inference models to profile with torch.profiler
    profile_train: Sequence[str] = ()  # training variants to profile (one iteration each)
    clip_architecture: CLIPArchitecture = RN50_ARCHITECTURE
    opts: Sequence = ()  # extra config options (key, value, ...) for every model
    device: str = ""  # empty: the config's default (cuda when available)
    memory_fraction: float = 0.5  # skip a point whose estimated memory exceeds this share
    vild_warmup_proposals: int = 16  # distilled proposals in ViLD-online warm-up iterations
    quick: bool = False
    seed: int = 0


QUICK_OPTS = (
    # Tiny widths and counts so every code path runs in seconds (CI); not a measurement.
    "MODEL.CLIP.EMBED_DIM", 64,
    "MODEL.CLIP.TEACHER_INPUT_SIZE", 64,
    "MODEL.FPN.OUT_CHANNELS", 32,
    "MODEL.RETINANET.NUM_CONVS", 1,
    "MODEL.RETINANET.TOPK_CANDIDATES_TEST", 450,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 200,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", 50,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 200,
    "MODEL.RPN.POST_NMS_TOPK_TEST", 50,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
    "MODEL.VILD.NUM_DISTILL_PROPOSALS", 8,
)  # fmt: skip


def quick_settings(**overrides) -> BenchmarkSettings:
    """CI mode: a tiny CLIP trunk, 128 px, 20 classes, 2 iterations; exercises every path."""
    settings = BenchmarkSettings(
        image_size=(128, 195),
        num_classes=20,
        detections=50,
        warmup=1,
        iters=2,
        train_image_size=(128, 195),
        train_warmup=1,
        train_iters=2,
        train_num_gt=3,
        vocab_sizes=(20, 60),
        image_sizes=(96, 128),
        clip_architecture=TINY_ARCHITECTURE,
        opts=QUICK_OPTS,
        vild_warmup_proposals=4,
        quick=True,
    )
    return dataclasses.replace(settings, **overrides)


# ----------------------------------------------------------------------------------- assets
def lvis_like_frequencies(num_classes: int) -> List[str]:
    """LVIS v1's mix of frequent / common / rare (405 / 461 / 337 of 1,203), interleaved."""
    shares = (("f", 405 / 1203), ("c", 461 / 1203))
    out = []
    for i in range(num_classes):
        u = (i * 0.6180339887) % 1.0  # low-discrepancy: every prefix has about the LVIS mix
        out.append("f" if u < shares[0][1] else "c" if u < shares[0][1] + shares[1][1] else "r")
    return out


def random_text_embeddings(num_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(C, D) random unit vectors standing in for CLIP text embeddings."""
    g = torch.Generator().manual_seed(seed + num_classes)
    x = torch.randn(num_classes, dim, generator=g)
    return x / x.norm(dim=1, keepdim=True)


class BenchmarkAssets:
    """Files the configs point at, in a temporary folder removed by :meth:`close`.

    - ``clip_weights``: a random CLIP of ``architecture`` in OpenAI's state-dict format (fp16);
    - per class count C: ``text_embeddings(C)`` (.npy) and a registered metadata entry
      ``dataset(C)`` with ``thing_classes`` and LVIS-like ``class_frequencies``;
    - ``gridclip_teacher_cache(grids)``: a GridCLIP teacher cache holding the benchmark image;
    - ``vild_teacher_cache(...)``: a ViLD teacher cache directory holding the benchmark image.
    """

    def __init__(self, architecture: CLIPArchitecture, seed: int = 0, root: Optional[str] = None):
        self.architecture = architecture
        self.seed = seed
        self.root = tempfile.mkdtemp(prefix="gridclip-benchmark-", dir=root)
        self.clip_weights = self._write_clip_weights()

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _write_clip_weights(self) -> str:
        from clip.model import CLIP

        a = self.architecture
        torch.manual_seed(self.seed)
        model = CLIP(
            embed_dim=a.embed_dim,
            image_resolution=a.image_resolution,
            vision_layers=a.vision_layers,
            vision_width=a.vision_width,
            vision_patch_size=None,
            context_length=a.context_length,
            vocab_size=a.vocab_size,
            transformer_width=a.text_width,
            transformer_heads=max(1, a.text_width // 64),
            transformer_layers=a.text_layers,
        )
        path = os.path.join(self.root, f"random_clip_{a.name}.pt")
        torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
        logger.info(
            f"Random {a.name} CLIP written to {path} ({os.path.getsize(path) / 2**20:.0f} MB)"
        )
        return path

    def text_embeddings(self, num_classes: int) -> str:
        path = os.path.join(self.root, f"text_embeddings_{num_classes}.npy")
        if not os.path.isfile(path):
            emb = random_text_embeddings(num_classes, self.architecture.embed_dim, self.seed)
            np.save(path, emb.numpy())
        return path

    def dataset(self, num_classes: int) -> str:
        name = f"gridclip_benchmark_{self.architecture.name}_{num_classes}"
        metadata = MetadataCatalog.get(name)
        if not hasattr(metadata, "thing_classes"):
            metadata.set(
                thing_classes=[f"class_{i}" for i in range(num_classes)],
                class_frequencies=lvis_like_frequencies(num_classes),
            )
        return name

    def gridclip_teacher_cache(self, grids: Sequence[int], image_key: str) -> str:
        from ..clip.teacher_cache import TeacherEmbeddingCache

        path = os.path.join(
            self.root, "gridclip_teacher_cache_" + "_".join(map(str, grids)) + ".pt"
        )
        if not os.path.isfile(path):
            d = self.architecture.embed_dim
            cache = TeacherEmbeddingCache(d, grids, {"dataset": "benchmark (random)"})
            cache.add(image_key, [random_text_embeddings(g * g, d, self.seed + 7) for g in grids])
            cache.save(path)
        return path

    def vild_teacher_cache(
        self, image_id: int, height: int, width: int, num_proposals: int, crop_scales
    ) -> str:
        from ..clip.teacher_cache import (
            cache_entry_path,
            sliding_window_proposals,
            write_cache_entry,
            write_cache_meta,
        )

        path = os.path.join(self.root, f"vild_teacher_cache_{height}x{width}_{num_proposals}")
        if not os.path.isdir(path):
            d = self.architecture.embed_dim
            boxes = sliding_window_proposals(height, width, num_proposals)
            write_cache_meta(path, {"embed_dim": d, "crop_scales": list(crop_scales)})
            write_cache_entry(
                cache_entry_path(path, image_id),
                {
                    "image_id": image_id,
                    "file_name": "benchmark.png",
                    "height": height,
                    "width": width,
                    "boxes": boxes,
                    "embeddings": random_text_embeddings(len(boxes), d, self.seed + 11),
                },
            )
        return path


# ---------------------------------------------------------------------------------- configs
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
        opts += [
            "MODEL.RETINANET.NUM_CLASSES",
            k,
            "MODEL.GRIDCLIP.EMBED_PER_ANCHOR",
            spec.per_anchor,
        ]
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
            cfg.MODEL.GRIDCLIP.TEACHER_CACHE = assets.gridclip_teacher_cache(grids, key)
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
    from detectron2.modeling import build_model

    from ..clip import load_clip_from_cfg

    # The CLIP file is loaded once per process (memoised) and loading builds a randomly
    # initialised CLIP first, which draws from the global RNG: load it before seeding, or the
    # first model built in a process gets other weights than the next ones.
    load_clip_from_cfg(cfg, copy_model=False)
    torch.manual_seed(seed)
    return build_model(cfg)


# ---------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of a block, in MiB (``self.peak_mib``), above what was in use before it.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only) after ``reset_peak_memory_stats``.
    CPU: the process's peak resident set size. On Linux the high-water mark is reset before
    the block (``/proc/self/clear_refs`` ← 5) and ``VmHWM - VmRSS(before)`` is reported
    (includes allocator caching; memory the allocator kept from earlier blocks is reused and
    not counted again). Elsewhere ``ru_maxrss`` is a lifetime peak and only its growth shows.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak_mib: Optional[float] = None
        self.method = ""

    @staticmethod
    def _proc_status_kib(field: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated - allocated before"
            return self
        self._base = self._proc_status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "peak RSS (VmHWM reset via /proc/self/clear_refs) - RSS before"
        except OSError:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "growth of ru_maxrss (lifetime peak; lower bound)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._base
            self.peak_mib = peak / 2**20
        elif self.method.startswith("peak RSS"):
            self.peak_mib = max(0, (self._proc_status_kib("VmHWM") or 0) - self._base) / 1024
        else:
            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._base
            self.peak_mib = max(0, grown) / 1024
        return False


def available_memory_bytes(device: torch.device) -> Optional[int]:
    """Free memory on ``device`` now (CUDA: free device memory; CPU: MemAvailable)."""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def num_anchor_locations(height: int, width: int, strides=(8, 16, 32, 64, 128)) -> int:
    """Grid locations of RetinaNet's P3-P7 for an (H, W) input (padded to 32; P6/P7 by conv)."""
    h, w = math.ceil(height / 32) * 32, math.ceil(width / 32) * 32
    total = 0
    for s in strides:
        h_l, w_l = math.ceil(h / s), math.ceil(w / s)
        total += h_l * w_l
    return total


def estimated_inference_bytes(spec: ModelSpec, num_classes: int, height: int, width: int) -> int:
    """Rough peak of the class-score tensors of a dense head (what grows with the vocabulary),
    per (row, class) element of the R x K score matrix (R = anchors, or locations for the
    per-location GridCLIP):

    - RetinaNet (Detectron2): fp32 conv output + permuted copy (8 B), and its decoding, which
      thresholds first: a bool mask (1 B), the kept scores (4 B) and, since nearly every score
      passes LVIS's 1e-4 threshold, an int64 index per element (8 B): 21 B (measured: the
      4,000-class model at 800x1216 was OOM-killed at 22 GB RSS);
    - GridCLIP: the cosine logits, their scaled and biased copies (12 B); top-k works in place.
    """
    if spec.family == "vild":
        return 0
    k = spec.fixed_classes or num_classes
    per_location = spec.family == "gridclip" and not spec.per_anchor
    rows = num_anchor_locations(height, width) * (1 if per_location else 9)
    bytes_per_element = 21 if spec.family == "retinanet" else 12
    return int(bytes_per_element * rows * k)


# -------------------------------------------------------------------------------- predictor
class Predictor:
    """Detectron2 ``DefaultPredictor``'s work for an already built model: BGR uint8 (H, W, 3)
    image → resize (ResizeShortestEdge) → (3, H', W') tensor in ``input_format`` → model →
    instances in the input image's coordinates."""

    def __init__(self, model: torch.nn.Module, input_format: str, min_size: int, max_size: int):
        assert input_format in ("RGB", "BGR"), f"input format {input_format!r}"
        self.model = model
        self.input_format = input_format
        self.aug = T.ResizeShortestEdge([min_size, min_size], max_size)

    def __call__(self, image: np.ndarray) -> Dict:
        with torch.no_grad():
            if self.input_format == "RGB":
                image = image[:, :, ::-1]
            height, width = image.shape[:2]
            resized = self.aug.get_transform(image).apply_image(image)
            tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
            return self.model([{"image": tensor, "height": height, "width": width}])[0]


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A fixed random BGR uint8 image (H, W, 3)."""
    return np.random.RandomState(seed).randint(0, 256, size=(height, width, 3), dtype=np.uint8)


def image_size_for_short_side(short: int) -> Tuple[int, int]:
    return int(short), int(round(short * ASPECT))


# ------------------------------------------------------------------------------ measurements
def _sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class InferenceJob:
    """One timed point: ``predictor(image)``, keeping the last output and the peak memory.

    Calling it runs one inference (what :func:`~gridclip.engine.measure.time_interleaved`
    times); :meth:`record` turns the timing into a results record.
    """

    def __init__(self, predictor: "Predictor", image: np.ndarray, device: torch.device):
        self.predictor = predictor
        self.image = image
        self.device = torch.device(device)
        self.output: Optional[Dict] = None
        self.peak_mib = 0.0
        self.memory_method = ""

    def __call__(self) -> None:
        with PeakMemory(self.device) as memory:
            self.output = self.predictor(self.image)
        self.peak_mib = max(self.peak_mib, memory.peak_mib or 0.0)
        self.memory_method = memory.method

    def record(self, timing: Dict, warmup: int) -> Dict:
        return {
            "median_ms": 1000.0 * timing["median_s"],
            "cpu_median_ms": 1000.0 * timing["cpu_median_s"],
            "mean_ms": 1000.0 * timing["mean_s"],
            "times_ms": [1000.0 * t for t in timing["times_s"]],
            "cpu_times_ms": [1000.0 * t for t in timing["cpu_times_s"]],
            "iters": timing["num_runs"],
            "warmup": warmup,
            "num_detections": len(self.output["instances"]) if self.output else None,
            "peak_memory_mib": self.peak_mib,
            "memory_method": self.memory_method,
        }


def inference_job(model, cfg, image: np.ndarray, max_size: int) -> InferenceJob:
    """A job running ``model`` (eval mode) on ``image`` resized to its own short side."""
    h, w = image.shape[:2]
    model.eval()
    predictor = Predictor(model, cfg.INPUT.FORMAT, min(h, w), max_size)
    return InferenceJob(predictor, image, next(model.parameters()).device)


def measure_interleaved(jobs: Dict, settings: "BenchmarkSettings", progress: Callable) -> Dict:
    """Time ``jobs`` (name -> InferenceJob) round-robin; name -> record."""
    progress(
        f"  timing {list(jobs)} interleaved: {settings.warmup} warm-up + {settings.iters} rounds"
    )
    timings = time_interleaved(
        jobs,
        warmup=settings.warmup,
        repeats=settings.iters,
        on_done=lambda name, i, sec: progress(f"    round {i + 1}: {name} {1000 * sec:,.0f} ms"),
    )
    return {name: jobs[name].record(timings[name], settings.warmup) for name in jobs}


def count_parameters(model: torch.nn.Module) -> Dict[str, int]:
    params = list(model.parameters())
    return {
        "params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
    }


def _matmul_flop_jit(inputs, outputs) -> int:
    """fvcore handle for ``aten::matmul`` that also takes 1-D operands (matrix @ vector, as in
    ViLD's background logit): output elements x contracted length."""
    from fvcore.nn.jit_handles import get_shape

    a = get_shape(inputs[0])
    out = get_shape(outputs[0])
    return int(np.prod(out, dtype=np.int64)) * int(a[-1]) if a else 0


def measure_flops(model, cfg, image: np.ndarray) -> Dict:
    """fvcore flop count (1 multiply-add = 1 flop) of one inference, by top-level module."""
    from detectron2.utils.analysis import FlopCountAnalysis

    h, w = image.shape[:2]
    rgb = image[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else image
    tensor = torch.as_tensor(np.ascontiguousarray(rgb).astype("float32").transpose(2, 0, 1))
    inputs = [{"image": tensor.to(next(model.parameters()).device), "height": h, "width": w}]
    model.eval()
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(model, (inputs,))
            analysis.set_op_handle("aten::matmul", _matmul_flop_jit)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            total = analysis.total()
            by_module = analysis.by_module()
        # The analysis wraps the model (TracingAdapter): its children are "model.<name>".
        top = {}
        for name, _ in model.named_children():
            count = by_module.get("model." + name, by_module.get(name, 0))
            if count > 0:
                top[name] = count / 1e9
        return {"gflops": total / 1e9, "gflops_by_module": top}
    except Exception as e:  # tracing data-dependent code can fail; report it, keep going
        logger.warning(f"FLOP count failed: {type(e).__name__}: {e}")
        return {"gflops": None, "flops_error": f"{type(e).__name__}: {str(e)[:200]}"}


@contextlib.contextmanager
def _recorded_method(obj, name: str, label: str, times: Optional[Dict] = None):
    """Run every call of ``obj.<name>`` inside ``torch.profiler.record_function(label)`` and,
    with ``times``, add its wall and process CPU milliseconds to ``times[label]``; restores what
    was there (an instance attribute such as a :func:`_timed_method` wrapper, or the class's
    method). A missing ``obj`` or method is skipped."""
    from torch.profiler import record_function

    if obj is None or not hasattr(obj, name):
        yield
        return
    had_instance_attr = name in vars(obj)
    original = getattr(obj, name)
    device = next((p.device for p in getattr(obj, "parameters", lambda: [])()), None)

    def wrapper(*args, **kwargs):
        if device is not None:
            _sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        with record_function(label):
            out = original(*args, **kwargs)
        if device is not None:
            _sync(device)
        if times is not None:
            t = times.setdefault(label, {"wall_ms": 0.0, "cpu_ms": 0.0, "calls": 0})
            t["wall_ms"] += 1000.0 * (time.perf_counter() - wall)
            t["cpu_ms"] += 1000.0 * (time.process_time() - cpu)
            t["calls"] += 1
        return out

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        if had_instance_attr:
            setattr(obj, name, original)
        else:
            delattr(obj, name)


def _attribute(root, path: str):
    """``root.a.b`` for path ``"a.b"`` ("" is root itself); None where an attribute is missing."""
    obj = root
    for part in [p for p in path.split(".") if p]:
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


# Parts labelled (and timed) in inference profiles: (attribute path from the model, method,
# label). A model runs only some of them (GridCLIP/RetinaNet: trunk, backbone, head, decoding;
# ViLD: trunk, backbone, RPN, RoI heads).
INFERENCE_PROFILE_LABELS = (
    ("backbone.bottom_up", "forward", "## trunk (CLIP ModifiedResNet)"),
    ("backbone", "forward", "## backbone (trunk + FPN)"),
    ("head", "forward", "## dense head (towers + output convs)"),
    ("head", "forward_embeddings", "## dense head (towers + output convs)"),
    ("", "forward_inference", "## dense decoding (class scores, top-k, boxes, NMS)"),
    ("proposal_generator", "forward", "## RPN (head, proposals, NMS)"),
    ("roi_heads", "forward", "## RoI heads (RoIAlign, box head, text classifier, NMS)"),
)


def profile_inference(
    predictor: Predictor, image: np.ndarray, path: str, top: int = 25
) -> Tuple[List, Dict]:
    """One profiled inference (torch.profiler) after one unprofiled one, the model's parts
    labelled and timed (``INFERENCE_PROFILE_LABELS``); writes the labelled times and the op
    table to ``path``. Returns (the top ops by self time as [name, self ms, total ms, calls],
    {label: {"wall_ms", "cpu_ms", "calls"}})."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    predictor(image)
    parts: Dict[str, Dict] = {}
    with contextlib.ExitStack() as stack:
        for owner, name, label in INFERENCE_PROFILE_LABELS:
            stack.enter_context(
                _recorded_method(_attribute(predictor.model, owner), name, label, parts)
            )
        wall, cpu = time.perf_counter(), time.process_time()
        with profile(activities=activities) as prof:
            predictor(image)
        parts["## whole inference (predictor)"] = {
            "wall_ms": 1000.0 * (time.perf_counter() - wall),
            "cpu_ms": 1000.0 * (time.process_time() - cpu),
            "calls": 1,
        }
    averages = prof.key_averages()
    sort_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(
            f"# torch.profiler ({torch.get_num_threads()} thread(s)) of one inference of "
            f"{image.shape[0]}x{image.shape[1]} after one warm-up. Labelled parts (wall / process "
            "CPU ms, profiler overhead included):\n"
        )
        for label, t in parts.items():
            f.write(f"#   {label}: {t['wall_ms']:,.0f} / {t['cpu_ms']:,.0f} ms\n")
        f.write(averages.table(sort_by=sort_key, row_limit=top))
    rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    top_ops = [
        [e.key, e.self_cpu_time_total / 1000.0, e.cpu_time_total / 1000.0, e.count] for e in rows
    ]
    return top_ops, parts


def _training_inputs(height: int, width: int, base: torch.Tensor, num_gt: int, seed: int):
    """One training input dict: a random image (3, H, W) uint8 and ``num_gt`` boxes of base
    classes (``base``: (K,) bool)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
    xy = torch.rand(num_gt, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
    wh = (0.1 + 0.2 * torch.rand(num_gt, 2, generator=g)) * torch.tensor([width, height])
    boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([width - 1.0, height - 1.0]))], dim=1)
    base_ids = base.nonzero().flatten()
    classes = base_ids[torch.randint(0, len(base_ids), (num_gt,), generator=g)]
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(boxes)
    instances.gt_classes = classes
    return {
        "image": image,
        "height": height,
        "width": width,
        "image_id": 0,
        "file_name": "benchmark_0.png",
        "instances": instances,
    }


@contextlib.contextmanager
def _timed_method(obj, name: str, bucket: List[float], device):
    """Time every call of ``obj.<name>`` into ``bucket`` (an instance attribute, removed after)."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        out = original(*args, **kwargs)
        _sync(device)
        bucket.append(time.perf_counter() - start)
        return out

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        delattr(obj, name)


# Methods labelled in training profiles: (attribute path from the model, label).
TRAIN_PROFILE_LABELS = (
    ("", "losses", "## RetinaNet.losses (Detectron2 focal loss + box loss)"),
    ("", "grid_losses", "## GridCLIP.grid_losses (grid focal loss + box loss)"),
    ("image_alignment", "teacher_embeddings", "## GridCLIP image teacher (CLIP)"),
    ("", "distillation_proposals", "## ViLD crop teacher (CLIP on proposals)"),
)


def profile_training(job: "TrainingJob", path: str, top: int = 30) -> List:
    """One profiled training iteration of ``job`` (torch.profiler, CPU and CUDA when present),
    the losses and teachers labelled (``TRAIN_PROFILE_LABELS``); writes the op table sorted by
    total time to ``path``; returns the top ops by self time as [name, self ms, total ms,
    calls]."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with contextlib.ExitStack() as stack:
        for owner, name, label in TRAIN_PROFILE_LABELS:
            stack.enter_context(_recorded_method(_attribute(job.model, owner), name, label))
        with profile(activities=activities) as prof:
            job()
    averages = prof.key_averages()
    sort_key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    h, w = job.height, job.width
    m = job.cfg.MODEL
    k = m.ROI_HEADS.NUM_CLASSES if job.spec.family == "vild" else m.RETINANET.NUM_CLASSES
    with open(path, "w") as f:
        f.write(
            f"# torch.profiler ({job.device}, {torch.get_num_threads()} thread(s)) of one training "
            f"iteration of '{job.spec.key}' ({job.spec.label}) at {h}x{w}, {k} classes, after "
            "the timed iterations; '## ...' rows are the labelled methods (their forward: "
            "backward ops run in the autograd engine, outside them).\n"
        )
        f.write(averages.table(sort_by=sort_key, row_limit=top))
    rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [
        [e.key, e.self_cpu_time_total / 1000.0, e.cpu_time_total / 1000.0, e.count] for e in rows
    ]


def _vild_cached_proposals(cache, n: int, image_id: int, height: int, width: int) -> Instances:
    """What ``ViLDDatasetMapper`` attaches (no augmentation here): the cached top-``n`` boxes
    and their teacher embeddings, read from the cache directory (a ``TeacherCache``)."""
    entry = cache.get(image_id, (height, width))
    proposals = Instances((height, width))
    proposals.proposal_boxes = Boxes(entry["boxes"][:n].float())
    proposals.teacher_embeddings = entry["embeddings"][:n].float()
    return proposals


class TrainingJob:
    """One training variant: calling it runs one timed iteration (forward + backward + SGD
    step on one image, the teacher's cost included) and records the teacher's share.

    The optimizer is SGD with learning rate 0 (a step's arithmetic is done, the random model
    cannot diverge while it is timed). :meth:`warmup` runs an untimed iteration; for ViLD with
    the online teacher it distils only ``settings.vild_warmup_proposals`` crops (the timed
    iterations distil MODEL.VILD.NUM_DISTILL_PROPOSALS). Must run inside an ``EventStorage``.
    """

    def __init__(self, spec: ModelSpec, cfg, model, settings: "BenchmarkSettings"):
        self.spec, self.cfg, self.model, self.settings = spec, cfg, model, settings
        self.height, self.width = settings.train_image_size
        self.device = next(model.parameters()).device
        if spec.family == "retinanet":
            k = cfg.MODEL.RETINANET.NUM_CLASSES
            base = torch.ones(k, dtype=torch.bool)
        else:
            freqs = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).class_frequencies
            base = torch.tensor([f != "r" for f in freqs])
        self.inputs = _training_inputs(
            self.height, self.width, base, settings.train_num_gt, settings.seed
        )
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=1e-4)
        self.vild_cache = None
        if spec.family == "vild" and spec.teacher == "cache":
            from ..clip.teacher_cache import TeacherCache

            self.vild_cache = TeacherCache(
                cfg.MODEL.VILD.TEACHER_CACHE, embed_dim=cfg.MODEL.CLIP.EMBED_DIM
            )
        self.teacher_times: List[float] = []
        self.distilled: List[float] = []
        self.losses: Dict[str, float] = {}
        self.peak_mib = 0.0
        self.memory_method = ""
        self._timers = contextlib.ExitStack()
        if spec.family == "gridclip" and model.image_alignment is not None:
            self._timers.enter_context(
                _timed_method(
                    model.image_alignment, "teacher_embeddings", self.teacher_times, self.device
                )
            )
        elif spec.family == "vild" and model.distillation_enabled:
            self._timers.enter_context(
                _timed_method(model, "distillation_proposals", self.teacher_times, self.device)
            )

    def close(self) -> None:
        self._timers.close()

    def _step(self) -> Dict[str, float]:
        batch = self.inputs
        if self.vild_cache is not None:  # what ViLDDatasetMapper does per image, timed
            n = self.cfg.MODEL.VILD.NUM_DISTILL_PROPOSALS
            distill = _vild_cached_proposals(self.vild_cache, n, 0, self.height, self.width)
            batch = dict(batch, distill_proposals=distill)
        self.model.train()
        losses = self.model([batch])
        total = sum(losses.values())
        self.optimizer.zero_grad()
        total.backward()
        self.optimizer.step()
        _sync(self.device)
        latest = get_event_storage().latest()
        if "vild/num_distill_proposals" in latest:
            self.distilled.append(float(latest["vild/num_distill_proposals"][0]))
        return {k: float(v.detach()) for k, v in losses.items()}

    def warmup(self) -> None:
        full = getattr(self.model, "num_distill_proposals", None)
        if self.spec.family == "vild" and self.spec.teacher == "online":
            self.model.num_distill_proposals = min(full, self.settings.vild_warmup_proposals)
        try:
            self._step()
        finally:
            if full is not None:
                self.model.num_distill_proposals = full
        self.teacher_times.clear()
        self.distilled.clear()

    def __call__(self) -> None:
        with PeakMemory(self.device) as memory:
            self.losses = self._step()
        self.peak_mib = max(self.peak_mib, memory.peak_mib or 0.0)
        self.memory_method = memory.method

    def record(self, timing: Dict) -> Dict:
        cfg, spec = self.cfg, self.spec
        record = {
            "median_s": timing["median_s"],
            "cpu_median_s": timing["cpu_median_s"],
            "mean_s": timing["mean_s"],
            "times_s": timing["times_s"],
            "cpu_times_s": timing["cpu_times_s"],
            "iters": timing["num_runs"],
            "warmup": self.settings.train_warmup,
            "teacher_s": statistics.median(self.teacher_times) if self.teacher_times else 0.0,
            "teacher_calls_per_iter": len(self.teacher_times) / max(timing["num_runs"], 1),
            "losses": self.losses,
            "peak_memory_mib": self.peak_mib,
            "memory_method": self.memory_method,
        }
        if spec.family == "vild":
            distilled = statistics.median(self.distilled) if self.distilled else None
            record["distilled_proposals_per_image"] = distilled
            record["crop_scales"] = list(cfg.MODEL.VILD.CROP_SCALES)
            online = distilled is not None and spec.teacher == "online"
            record["teacher_crops_per_image"] = (
                distilled * len(cfg.MODEL.VILD.CROP_SCALES) if online else 0
            )
        if spec.family == "gridclip":
            views = sum(g * g for g in cfg.MODEL.GRIDCLIP.IMAGE_ALIGN_GRIDS)
            record["teacher_crops_per_image"] = views if spec.teacher == "online" else 0
        return record


# ------------------------------------------------------------------------------------ runner
def code_version() -> Dict:
    """The git commit of the project and its uncommitted files (a number depends on both)."""
    import subprocess

    # projects/GridCLIP/gridclip/engine/ -> the repository root
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))

    def git(*args) -> Optional[str]:
        try:
            out = subprocess.run(
                ["git", "-C", root, *args], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") or ""
    return {
        "commit": commit.strip() if commit else None,
        "uncommitted_files": [line[3:] for line in status.splitlines() if line.strip()],
    }


def machine_info(device: torch.device) -> Dict:
    import detectron2

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "detectron2": detectron2.__version__,
        "platform": platform.platform(),
        "device": str(device),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def _record(kind: str, spec: ModelSpec, num_classes: int, size: Tuple[int, int], **fields) -> Dict:
    return {
        "suite": kind,
        "model": spec.key,
        "label": spec.label,
        "num_classes": spec.fixed_classes or num_classes,
        "image_size": list(size),
        **fields,
    }


def _skip_reason(spec, k, size, settings, device) -> Optional[str]:
    need = estimated_inference_bytes(spec, k, *size)
    free = available_memory_bytes(device)
    if free is not None and need > settings.memory_fraction * free:
        return (
            f"skipped: class-score tensors need ~{need / 2**30:.1f} GiB, more than "
            f"{settings.memory_fraction:.0%} of the {free / 2**30:.1f} GiB available"
        )
    return None


def run_inference_suites(
    settings: BenchmarkSettings,
    assets: BenchmarkAssets,
    output_dir: str,
    progress: Callable,
    results: Optional[Dict] = None,
    checkpoint: Callable[[], None] = lambda: None,
) -> Tuple[List[Dict], List[Dict], Dict]:
    """Main inference suite (every model, interleaved), then per model its resolution sweep
    and its vocabulary sweep (each interleaved over its points); FLOPs and parameters.

    Records are appended to ``results["inference"]``, ``["costs"]``, ``["profiles"]`` when
    given, and ``checkpoint()`` is called after each step (partial results survive a crash).
    """
    results = results if results is not None else {"inference": [], "costs": [], "profiles": {}}
    records, costs, profiles = results["inference"], results["costs"], results["profiles"]
    main_size = tuple(settings.image_size)
    main_image = synthetic_image(*main_size, seed=settings.seed)
    main_k = settings.num_classes
    built, jobs = {}, {}
    for key in _ordered(settings.models, settings.vocab_models, settings.resolution_models):
        spec = INFERENCE_MODELS[key]
        progress(f"building {spec.label} ({spec.fixed_classes or main_k} classes)")
        cfg = build_cfg(spec, main_k, assets, settings)
        model = build_benchmark_model(cfg, settings.seed)
        reason = _skip_reason(spec, main_k, main_size, settings, model.device)
        if reason:
            records.append(_record("main", spec, main_k, main_size, skipped=reason))
            continue
        built[key] = (spec, cfg, model)
        jobs[key] = inference_job(model, cfg, main_image, settings.max_size)
    progress(f"inference at {main_size[0]}x{main_size[1]}, {main_k} classes")
    for key, rec in measure_interleaved(jobs, settings, progress).items():
        records.append(_record("main", built[key][0], main_k, main_size, **rec))
    del jobs
    checkpoint()

    for key in [k for k in built if k in settings.models]:
        spec, cfg, model = built[key]
        cost = {"model": key, "label": spec.label, "num_classes": spec.fixed_classes or main_k}
        cost.update(count_parameters(model))
        if settings.flops:
            progress(f"FLOPs {spec.label}")
            cost.update(measure_flops(model, cfg, main_image))
        costs.append(cost)
        checkpoint()
        if key in settings.profile:
            progress(f"profile {spec.label}")
            h, w = main_size
            predictor = Predictor(model, cfg.INPUT.FORMAT, min(h, w), settings.max_size)
            path = os.path.join(output_dir, f"profile_{key}.txt")
            top_ops, parts = profile_inference(predictor, main_image, path)
            profiles[key] = {"file": os.path.basename(path), "top_ops": top_ops, "parts": parts}

    for key in list(built):
        spec, cfg, model = built.pop(key)
        if key in settings.resolution_models and len(settings.image_sizes) > 1:
            records += _resolution_sweep(spec, cfg, model, settings, progress)
            checkpoint()
        if key in settings.vocab_models and spec.fixed_classes is None:
            if len(settings.vocab_sizes) > 1:
                records += _vocab_sweep(spec, cfg, model, assets, main_image, settings, progress)
                checkpoint()
        del model
    return records, costs, profiles


def _resolution_sweep(spec, cfg, model, settings, progress) -> List[Dict]:
    records, jobs = [], {}
    k = settings.num_classes
    for short in sorted(set(settings.image_sizes)):
        size = image_size_for_short_side(short)
        reason = _skip_reason(spec, k, size, settings, model.device)
        if reason:
            records.append(_record("resolution", spec, k, size, skipped=reason))
            continue
        # The max size is not binding: each image is measured at its own size.
        image = synthetic_image(*size, seed=settings.seed)
        jobs[size] = inference_job(model, cfg, image, max_size=max(size) + 1)
    if len(jobs) < 2:
        return records
    progress(f"resolution sweep of {spec.label}: {[f'{h}x{w}' for h, w in jobs]}")
    for size, rec in measure_interleaved(jobs, settings, progress).items():
        records.append(_record("resolution", spec, k, size, **rec))
    return records


def _vocab_sweep(spec, cfg, model, assets, image, settings, progress) -> List[Dict]:
    """GridCLIP / ViLD: copies of the model with each vocabulary (``set_vocabulary``, the
    user's path); RetinaNet: one model per class count (its classifier changes)."""
    records, jobs, models = [], {}, []
    size = tuple(image.shape[:2])
    for k in sorted(set(settings.vocab_sizes)):
        reason = _skip_reason(spec, k, size, settings, model.device)
        if reason:
            records.append(_record("vocab", spec, k, size, skipped=reason))
            continue
        if spec.family == "retinanet":
            cfg_k = build_cfg(spec, k, assets, settings)
            model_k = build_benchmark_model(cfg_k, settings.seed)
        else:
            cfg_k, model_k = cfg, copy.deepcopy(model)
            embed_dim = settings.clip_architecture.embed_dim
            model_k.set_vocabulary(random_text_embeddings(k, embed_dim, settings.seed))
        models.append(model_k)
        jobs[k] = inference_job(model_k, cfg_k, image, settings.max_size)
    if len(jobs) < 2:  # nothing to compare (the main point was measured already)
        return records
    progress(f"vocabulary sweep of {spec.label}: {list(jobs)} classes")
    for k, rec in measure_interleaved(jobs, settings, progress).items():
        records.append(_record("vocab", spec, k, size, **rec))
    return records


def _ordered(*groups: Sequence[str]) -> List[str]:
    seen = []
    for key in INFERENCE_MODELS:
        if any(key in g for g in groups) and key not in seen:
            seen.append(key)
    unknown = [k for g in groups for k in g if k not in INFERENCE_MODELS]
    if unknown:
        raise ValueError(
            f"unknown inference models {unknown}; choose from {list(INFERENCE_MODELS)}"
        )
    return seen


def run_training_suite(
    settings, assets, progress, output_dir: Optional[str] = None, profiles: Optional[Dict] = None
) -> List[Dict]:
    """Every training variant built at once, timed round-robin (one iteration each per
    round) so that all of them see the same machine load; then one profiled iteration of each
    variant in ``settings.profile_train`` (``profile_train_<key>.txt`` in ``output_dir``, top ops
    in ``profiles["train_<key>"]``)."""
    unknown = [k for k in settings.train_models if k not in TRAIN_MODELS]
    if unknown:
        raise ValueError(f"unknown training models {unknown}; choose from {list(TRAIN_MODELS)}")
    not_run = [k for k in settings.profile_train if k not in settings.train_models]
    if not_run:
        raise ValueError(
            f"training profile of {not_run}: not among the training variants run "
            f"{list(settings.train_models)}"
        )
    h, w = settings.train_image_size
    jobs: Dict[str, TrainingJob] = {}
    records = []
    with EventStorage(0) as storage:
        try:
            for key in settings.train_models:
                spec = TRAIN_MODELS[key]
                progress(f"building {spec.label} for training at {h}x{w}")
                cfg = build_cfg(
                    spec, settings.num_classes, assets, settings, train_image=(h, w, "0")
                )
                jobs[key] = TrainingJob(
                    spec, cfg, build_benchmark_model(cfg, settings.seed), settings
                )
            for i in range(settings.train_warmup):
                for key, job in jobs.items():
                    progress(f"  training warm-up {i + 1}: {key}")
                    storage.iter = i
                    job.warmup()

            def on_done(name, i, seconds):
                storage.iter += 1
                progress(f"    round {i + 1}: {name} {seconds:,.2f} s")

            progress(f"training {list(jobs)} interleaved: {settings.train_iters} rounds")
            timings = time_interleaved(
                jobs, warmup=0, repeats=settings.train_iters, on_done=on_done
            )
            for key, job in jobs.items():
                rec = job.record(timings[key])
                rec.update(count_parameters(job.model))
                records.append(_record("train", job.spec, settings.num_classes, (h, w), **rec))
            for key in settings.profile_train:
                if key not in jobs:
                    continue
                progress(f"profile training {key}")
                path = os.path.join(output_dir or ".", f"profile_train_{key}.txt")
                top = profile_training(jobs[key], path)
                if profiles is not None:
                    profiles["train_" + key] = {"file": os.path.basename(path), "top_ops": top}
        finally:
            for job in jobs.values():
                job.close()
    return records


def run_benchmark(
    settings: BenchmarkSettings,
    output_dir: str,
    *,
    run_inference: bool = True,
    run_training: bool = True,
    command: str = "",
) -> Dict:
    """Run everything ``settings`` asks for; returns the results dict (see ``write_report``)."""
    os.makedirs(output_dir, exist_ok=True)
    started = time.perf_counter()

    def progress(message: str) -> None:
        logger.info(f"[{time.perf_counter() - started:7.1f} s] {message}")

    assets = BenchmarkAssets(settings.clip_architecture, settings.seed)
    try:
        probe = build_cfg(INFERENCE_MODELS["gridclip"], settings.num_classes, assets, settings)
        device = torch.device(probe.MODEL.DEVICE)
        results = {
            "format": "gridclip-benchmark",
            "version": 1,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "machine": machine_info(device),
            "code": code_version(),
            "settings": _jsonable(dataclasses.asdict(settings)),
            "configs": {
                "gridclip": "GridCLIP_R50.yaml",
                "retinanet": "GridCLIP_R50.yaml with MODEL.META_ARCHITECTURE RetinaNet",
                "vild": "ViLD_R50.yaml",
            },
            "weights": (
                f"random: {settings.clip_architecture.name}-architecture CLIP state dict built in "
                "memory (no files); random unit text embeddings"
            ),
            "inference": [],
            "costs": [],
            "train": [],
            "profiles": {},
        }
        partial = os.path.join(output_dir, "results.partial.json")

        def checkpoint():
            with open(partial, "w") as f:
                json.dump(_jsonable(results), f, indent=2)

        if run_inference:
            run_inference_suites(settings, assets, output_dir, progress, results, checkpoint)
        if run_training and settings.train_models:
            results["train"] = run_training_suite(
                settings, assets, progress, output_dir, results["profiles"]
            )
            checkpoint()
    finally:
        assets.close()
    try:
        results["machine"]["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    results["wall_s"] = time.perf_counter() - started
    results["ratios"] = compute_ratios(results, "wall")
    results["ratios_cpu"] = compute_ratios(results, "cpu")
    results["goals"] = evaluate_goals(results)
    if os.path.exists(partial):
        os.remove(partial)
    return results


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


# ------------------------------------------------------------------------------------ ratios
def _lookup(records, suite, model, num_classes=None, size=None, field="median_ms"):
    for r in records:
        if r["suite"] != suite or r["model"] != model or field not in r:
            continue
        if num_classes is not None and r["num_classes"] != num_classes:
            continue
        if size is not None and list(r["image_size"]) != list(size):
            continue
        return r[field]
    return None


def _point(records, model, num_classes, size, suite="main", field="median_ms"):
    """ms/img of ``model`` at (num_classes, size): from ``suite`` if it measured that point
    (a sweep's points were timed together, so its ratios are the consistent ones), else from
    whichever suite did."""
    for name in (suite, "main", "vocab", "resolution"):
        value = _lookup(records, name, model, num_classes, size, field)
        if value is not None:
            return value
    return None


def _ratio(a, b):
    return a / b if (a is not None and b is not None and b > 0) else None


def compute_ratios(results: Dict, metric: str = "wall") -> Dict[str, Optional[float]]:
    """Headline ratios (all "how many times"): speed-ups > 1 favour GridCLIP.

    ``metric``: ``wall`` (medians of wall-clock times) or ``cpu`` (medians of process CPU
    times, robust to other processes' load when torch runs one thread).
    """
    assert metric in ("wall", "cpu"), f"metric must be wall or cpu, got {metric!r}"
    field = "median_ms" if metric == "wall" else "cpu_median_ms"
    train_field = "median_s" if metric == "wall" else "cpu_median_s"
    s = results["settings"]
    inf, train = results["inference"], results["train"]
    k, size = s["num_classes"], list(s["image_size"])
    t = {m: _lookup(inf, "main", m, field=field) for m in INFERENCE_MODELS}
    ratios = {
        "inference_speedup_gridclip_vs_vild": _ratio(t["vild"], t["gridclip"]),
        "inference_speedup_gridclip_vs_vild_ensemble": _ratio(t["vild_ensemble"], t["gridclip"]),
        "inference_gridclip_over_retinanet_80": _ratio(t["gridclip"], t["retinanet_80"]),
        f"inference_speedup_gridclip_vs_retinanet_{k}": _ratio(t["retinanet"], t["gridclip"]),
        "inference_per_anchor_over_per_location": _ratio(t["gridclip_anchor"], t["gridclip"]),
        "inference_gridclip_1x1_over_retinanet_80": _ratio(t["gridclip_1x1"], t["retinanet_80"]),
        "inference_gridclip_1x1_over_gridclip": _ratio(t["gridclip_1x1"], t["gridclip"]),
        "inference_speedup_gridclip_1x1_vs_vild": _ratio(t["vild"], t["gridclip_1x1"]),
        "inference_gridclip_no_dense_clip_over_retinanet_80": _ratio(
            t["gridclip_no_dense_clip"], t["retinanet_80"]
        ),
    }
    flops = {c["model"]: c.get("gflops") for c in results.get("costs", [])}
    if flops:
        ratios["gflops_vild_over_gridclip"] = _ratio(flops.get("vild"), flops.get("gridclip"))
        ratios["gflops_gridclip_over_retinanet_80"] = _ratio(
            flops.get("gridclip"), flops.get("retinanet_80")
        )
    vocab = sorted(set(s["vocab_sizes"]))
    if len(vocab) > 1:
        lo, hi = vocab[0], vocab[-1]
        for m in s["vocab_models"]:
            ratios[f"vocab_growth_{m}_{lo}_to_{hi}"] = _ratio(
                _point(inf, m, hi, size, "vocab", field), _point(inf, m, lo, size, "vocab", field)
            )
    sizes = sorted(set(s["image_sizes"]))
    if len(sizes) > 1:
        lo, hi = image_size_for_short_side(sizes[0]), image_size_for_short_side(sizes[-1])
        for m in s["resolution_models"]:
            mk = INFERENCE_MODELS[m].fixed_classes or k
            ratios[f"resolution_growth_{m}_{sizes[0]}_to_{sizes[-1]}"] = _ratio(
                _point(inf, m, mk, list(hi), "resolution", field),
                _point(inf, m, mk, list(lo), "resolution", field),
            )
    tr = {r["model"]: r.get(train_field) for r in train}
    ratios.update(
        {
            "train_speedup_gridclip_online_vs_vild_online": _ratio(
                tr.get("vild_online"), tr.get("gridclip_online")
            ),
            "train_speedup_gridclip_cache_vs_vild_cache": _ratio(
                tr.get("vild_cache"), tr.get("gridclip_cache")
            ),
            "train_speedup_gridclip_online_vs_vild_cache": _ratio(
                tr.get("vild_cache"), tr.get("gridclip_online")
            ),
            "train_gridclip_online_over_retinanet": _ratio(
                tr.get("gridclip_online"), tr.get("retinanet")
            ),
            # before/after gridclip.modeling.focal_loss, measured in the same rounds
            "train_speedup_gridclip_online_d2loss_vs_vild_online": _ratio(
                tr.get("vild_online"), tr.get("gridclip_online_d2loss")
            ),
            "train_gridclip_online_d2loss_over_gridclip_online": _ratio(
                tr.get("gridclip_online_d2loss"), tr.get("gridclip_online")
            ),
        }
    )
    return ratios


GOALS = (
    # (name, ratio key, comparison, target, source)
    ("GridCLIP inference >= 5x faster than ViLD", "inference_speedup_gridclip_vs_vild", ">=", 5.0),
    (
        "GridCLIP inference within 1.15x of RetinaNet-80",
        "inference_gridclip_over_retinanet_80",
        "<=",
        1.15,
    ),
    (
        "GridCLIP, 1x1 embed conv (EMBED_KERNEL_SIZE 1), within 1.15x of RetinaNet-80",
        "inference_gridclip_1x1_over_retinanet_80",
        "<=",
        1.15,
    ),
    (
        "(DESIGN aim) GridCLIP within 1.3x of RetinaNet-80",
        "inference_gridclip_over_retinanet_80",
        "<=",
        1.3,
    ),
    (
        "Training with teacher >= 10x cheaper than ViLD online",
        "train_speedup_gridclip_online_vs_vild_online",
        ">=",
        10.0,
    ),
    ("Near-flat vocabulary cost (GridCLIP growth <= 1.5x)", "vocab_growth_gridclip", "<=", 1.5),
)


def evaluate_goals(results: Dict) -> List[Dict]:
    """Each goal with its wall-clock (``measured``, ``met``) and CPU-time (``measured_cpu``,
    ``met_cpu``) ratio when ``results["ratios_cpu"]`` exists."""
    ratios = results["ratios"]
    ratios_cpu = results.get("ratios_cpu") or {}
    out = []
    for name, key, op, target in GOALS:
        if key == "vocab_growth_gridclip":  # vocab_growth_gridclip_<lo>_to_<hi>
            key = next(
                (k for k in ratios if re.fullmatch(r"vocab_growth_gridclip_\d+_to_\d+", k)), key
            )
        goal = {"goal": name, "ratio": key, "target": f"{op} {target}"}
        for suffix, source in (("", ratios), ("_cpu", ratios_cpu)):
            value = source.get(key)
            goal["measured" + suffix] = value
            goal["met" + suffix] = (
                None if value is None else (value >= target if op == ">=" else value <= target)
            )
        out.append(goal)
    return out


# ------------------------------------------------------------------------------------ report
def _fmt(x, digits=1):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _size(size) -> str:
    return f"{size[0]}x{size[1]}"


def markdown_report(results: Dict) -> str:
    s, m = results["settings"], results["machine"]
    lines = ["# GridCLIP benchmark", ""]
    lines += [
        f"- Machine: {m['cpu']}, {m['cpu_count']} cores ({m['torch_threads']} torch threads), "
        f"device {m['device']}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}; torch {m['torch']}, "
        f"detectron2 {m['detectron2']}, Python {m['python']}.",
        f"- Load average at start / end: {m.get('loadavg_start')} / {m.get('loadavg_end')}.",
        f"- Weights: {results['weights']}. Configs: "
        + "; ".join(f"{k}: {v}" for k, v in results["configs"].items())
        + ".",
        f"- Inference: batch 1, {_size(s['image_size'])} image, {s['num_classes']} classes, "
        f"{s['detections']} detections, score threshold of the configs, pre/post-processing "
        f"included; median of {s['iters']} after {s['warmup']} warm-up.",
        f"- Training: 1 image/iter at {_size(s['train_image_size'])} (reduced for CPU), forward + "
        f"backward + SGD step, teacher cost included; median of {s['train_iters']} after "
        f"{s['train_warmup']} warm-up.",
        f"- Command: `{results['command']}`" if results.get("command") else "",
        (
            f"- Code: commit {results['code'].get('commit')}; uncommitted changes in "
            f"{', '.join(results['code']['uncommitted_files']) or 'no tracked file'}."
            if results.get("code")
            else ""
        ),
        f"- Wall time: {results['wall_s'] / 60:.1f} min."
        + (" **Quick mode (tiny models): not a measurement.**" if s["quick"] else ""),
        "",
        "## Headline ratios",
        "",
        "Wall: ratios of median wall-clock times. CPU: ratios of median process CPU times (with "
        "one torch thread, what the run costs regardless of other processes' load).",
        "",
        "| goal | ratio | target | wall | met | CPU | met |",
        "|---|---|---|---|---|---|---|",
    ]

    def yes_no(met):
        return "–" if met is None else ("yes" if met else "**no**")

    for g in results["goals"]:
        lines.append(
            f"| {g['goal']} | `{g['ratio']}` | {g['target']} | {_fmt(g['measured'], 2)} | "
            f"{yes_no(g['met'])} | {_fmt(g.get('measured_cpu'), 2)} | {yes_no(g.get('met_cpu'))} |"
        )
    lines += ["", "| ratio | wall | CPU |", "|---|---|---|"]
    ratios_cpu = results.get("ratios_cpu") or {}
    for k, v in results["ratios"].items():
        lines.append(f"| `{k}` | {_fmt(v, 2)} | {_fmt(ratios_cpu.get(k), 2)} |")

    costs = {c["model"]: c for c in results["costs"]}
    lines += [
        "",
        "## Inference (main setting)",
        "",
        "| model | classes | image | ms/img (median) | CPU ms/img | peak mem MiB | GFLOPs "
        "| params (M) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["inference"]:
        if r["suite"] != "main":
            continue
        c = costs.get(r["model"], {})
        lines.append(
            f"| {r['label']} | {r['num_classes']} | {_size(r['image_size'])} | "
            f"{_fmt(r['median_ms']) if 'median_ms' in r else r.get('skipped')} | "
            f"{_fmt(r.get('cpu_median_ms'))} | "
            f"{_fmt(r.get('peak_memory_mib'), 0)} | {_fmt(c.get('gflops'))} | "
            f"{_fmt(c['params'] / 1e6, 1) if 'params' in c else '–'} |"
        )
    lines += _scaling_table(
        results, "vocab", "num_classes", "Vocabulary scaling (wall ms/img (CPU ms/img))"
    )
    lines += _scaling_table(
        results, "resolution", "image_size", "Resolution scaling (wall ms/img (CPU ms/img))"
    )
    if results["train"]:
        lines += [
            "",
            "## Training (s/iter, teacher included)",
            "",
            "| variant | s/iter (median) | CPU s/iter | of which teacher | teacher crops/img "
            "| peak mem MiB | trainable params (M) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results["train"]:
            lines.append(
                f"| {r['label']} | {_fmt(r['median_s'], 2)} | {_fmt(r.get('cpu_median_s'), 2)} | "
                f"{_fmt(r['teacher_s'], 2)} | "
                f"{_fmt(r.get('teacher_crops_per_image'))} | {_fmt(r.get('peak_memory_mib'), 0)} | "
                f"{_fmt(r['trainable_params'] / 1e6, 1)} |"
            )
    if results["costs"]:
        lines += ["", "## FLOPs by module (GFLOPs, fvcore: 1 multiply-add = 1 flop)", ""]
        for c in results["costs"]:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in c.get("gflops_by_module", {}).items())
            lines.append(
                f"- {c['label']} ({c['num_classes']} classes): {parts or c.get('flops_error', '–')}"
            )
    if results["profiles"]:
        lines += ["", "## Profiles (top ops by self CPU time, ms)", ""]
        for key, p in results["profiles"].items():
            ops = "; ".join(f"{name} {self_ms:.0f}" for name, self_ms, _, _ in p["top_ops"][:8])
            lines.append(f"- {key} ({p['file']}): {ops}")
            if p.get("parts"):
                parts = "; ".join(
                    f"{label.lstrip('# ')} {t['cpu_ms']:,.0f}" for label, t in p["parts"].items()
                )
                lines.append(f"  - parts, process CPU ms: {parts}")
    mem = next(
        (r.get("memory_method") for r in results["inference"] if r.get("memory_method")), None
    )
    if mem:
        lines += ["", f"Peak memory: {mem}."]
    return "\n".join(line for line in lines if line is not None) + "\n"


def _scaling_table(results, suite, axis, title) -> List[str]:
    s = results["settings"]
    inf = results["inference"]
    models = s["vocab_models"] if suite == "vocab" else s["resolution_models"]
    if suite == "vocab":
        points = sorted(set(s["vocab_sizes"]))
        size = list(s["image_size"])
        header = [f"{k:,} classes" for k in points]
    else:
        points = [list(image_size_for_short_side(x)) for x in sorted(set(s["image_sizes"]))]
        header = [_size(p) for p in points]
    if len(points) < 2:
        return []
    lines = [
        "",
        f"## {title}",
        "",
        "| model | " + " | ".join(header) + " | growth |",
        "|---" * (len(points) + 2) + "|",
    ]
    for mkey in models:
        spec = INFERENCE_MODELS[mkey]
        rows = {}
        for field in ("median_ms", "cpu_median_ms"):
            rows[field] = [
                (
                    _point(inf, mkey, p, size, suite, field)
                    if suite == "vocab"
                    else _point(inf, mkey, spec.fixed_classes or s["num_classes"], p, suite, field)
                )
                for p in points
            ]
        skipped = [r for r in inf if r["suite"] == suite and r["model"] == mkey and "skipped" in r]
        cells = [
            f"{_fmt(v)} ({_fmt(c)})" if v is not None else ("skipped" if skipped else "–")
            for v, c in zip(rows["median_ms"], rows["cpu_median_ms"])
        ]
        measured = [(v, c) for v, c in zip(rows["median_ms"], rows["cpu_median_ms"]) if v]
        growth = "–"
        if len(measured) > 1:
            growth = (
                f"{_fmt(_ratio(measured[-1][0], measured[0][0]), 2)}x "
                f"({_fmt(_ratio(measured[-1][1], measured[0][1]), 2)}x)"
            )
        lines.append(f"| {spec.label} | " + " | ".join(cells) + f" | {growth} |")
    notes = {r["skipped"] for r in inf if r["suite"] == suite and "skipped" in r}
    lines += [f"\n{n}" for n in sorted(notes)]
    return lines


def write_plot(results: Dict, path: str) -> Optional[str]:
    """ms/img vs vocabulary size and vs image size, one line per model (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, inf = results["settings"], results["inference"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    size = list(s["image_size"])
    for mkey in s["vocab_models"]:
        for field, style in (("median_ms", "-"), ("cpu_median_ms", "--")):
            xs, ys = [], []
            for k in sorted(set(s["vocab_sizes"])):
                v = _point(inf, mkey, k, size, "vocab", field)
                if v is not None:
                    xs.append(k)
                    ys.append(v)
            if xs:
                label = INFERENCE_MODELS[mkey].label + (" (CPU time)" if style == "--" else "")
                color = None if style == "-" else axes[0].lines[-1].get_color()
                axes[0].plot(xs, ys, style, marker="o", label=label, color=color)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("vocabulary size (classes)")
    axes[0].set_ylabel("ms / image (median; dashed: CPU time)")
    axes[0].set_title(f"Inference vs vocabulary ({_size(size)})")
    for mkey in s["resolution_models"]:
        spec = INFERENCE_MODELS[mkey]
        for field, style in (("median_ms", "-"), ("cpu_median_ms", "--")):
            xs, ys = [], []
            for short in sorted(set(s["image_sizes"])):
                size_s = list(image_size_for_short_side(short))
                k = spec.fixed_classes or s["num_classes"]
                v = _point(inf, mkey, k, size_s, "resolution", field)
                if v is not None:
                    xs.append(short)
                    ys.append(v)
            if xs:
                label = spec.label + (" (CPU time)" if style == "--" else "")
                color = None if style == "-" else axes[1].lines[-1].get_color()
                axes[1].plot(xs, ys, style, marker="o", label=label, color=color)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("image short side (px), aspect 1.52")
    axes[1].set_ylabel("ms / image (median; dashed: CPU time)")
    axes[1].set_title(f"Inference vs resolution ({s['num_classes']} classes)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{results['machine']['cpu']} ({results['machine']['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: Dict, output_dir: str) -> Dict[str, str]:
    """results.json, results.md and benchmark.png in ``output_dir``; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "json": os.path.join(output_dir, "results.json"),
        "markdown": os.path.join(output_dir, "results.md"),
        "plot": os.path.join(output_dir, "benchmark.png"),
    }
    with open(paths["json"], "w") as f:
        json.dump(_jsonable(results), f, indent=2)
    with open(paths["markdown"], "w") as f:
        f.write(markdown_report(results))
    write_plot(results, paths["plot"])
    return paths
