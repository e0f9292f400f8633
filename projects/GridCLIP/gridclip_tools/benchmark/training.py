"""Timed training iterations: one image, forward + backward + SGD step, the teacher's cost
included (online or read from a cache) and recorded separately."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Dict, List

import torch
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage

from gridclip.clip.teacher_cache import TeacherCache

from .measure import PeakMemory, sync_device
from .specs import BenchmarkSettings, ModelSpec

__all__ = ["TrainingJob"]


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
        sync_device(device)
        start = time.perf_counter()
        out = original(*args, **kwargs)
        sync_device(device)
        bucket.append(time.perf_counter() - start)
        return out

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        delattr(obj, name)


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

    def __init__(self, spec: ModelSpec, cfg, model, settings: BenchmarkSettings):
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
        sync_device(self.device)
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
