"""Measuring one benchmark point: the predictor, the timed inference job, peak memory, FLOPs and
parameter counts."""

from __future__ import annotations

import logging
import math
import resource
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.utils.analysis import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape

from ..measure import time_interleaved
from .specs import BenchmarkSettings, ModelSpec

logger = logging.getLogger(__name__)

__all__ = [
    "PeakMemory",
    "available_memory_bytes",
    "num_anchor_locations",
    "estimated_inference_bytes",
    "Predictor",
    "sync_device",
    "InferenceJob",
    "inference_job",
    "measure_interleaved",
    "count_parameters",
    "measure_flops",
]


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
    rows = num_anchor_locations(height, width) * (1 if spec.family == "gridclip" else 9)
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
        return self.predict([image])[0]

    def predict(self, images: List[np.ndarray]) -> List[Dict]:
        """Several images in one forward (one batch; the model pads them to one size)."""
        inputs = []
        for image in images:
            if self.input_format == "RGB":
                image = image[:, :, ::-1]
            height, width = image.shape[:2]
            resized = self.aug.get_transform(image).apply_image(image)
            tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
            inputs.append({"image": tensor, "height": height, "width": width})
        with torch.no_grad():
            return self.model(inputs)


def sync_device(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class InferenceJob:
    """One timed point: ``predictor(image)``, keeping the last output and the peak memory.

    Calling it runs one inference (what :func:`~gridclip_tools.measure.time_interleaved`
    times); :meth:`record` turns the timing into a results record.
    """

    def __init__(
        self, predictor: "Predictor", image: np.ndarray, device: torch.device, batch_size: int = 1
    ):
        self.predictor = predictor
        self.image = image
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.output: Optional[Dict] = None
        self.peak_mib = 0.0
        self.memory_method = ""

    def __call__(self) -> None:
        with PeakMemory(self.device) as memory:
            if self.batch_size == 1:
                self.output = self.predictor(self.image)
            else:
                self.output = self.predictor.predict([self.image] * self.batch_size)[0]
        self.peak_mib = max(self.peak_mib, memory.peak_mib or 0.0)
        self.memory_method = memory.method

    def record(self, timing: Dict, warmup: int) -> Dict:
        b = self.batch_size  # times are per forward (batch); per image below
        batch = {
            "batch_size": b,
            "ms_per_image": 1000.0 * timing["median_s"] / b,
            "cpu_ms_per_image": 1000.0 * timing["cpu_median_s"] / b,
            "images_per_s": b / timing["median_s"] if timing["median_s"] > 0 else None,
            "cpu_images_per_s": (
                b / timing["cpu_median_s"] if timing["cpu_median_s"] > 0 else None
            ),
        }
        return {
            "median_ms": 1000.0 * timing["median_s"],
            "cpu_median_ms": 1000.0 * timing["cpu_median_s"],
            "mean_ms": 1000.0 * timing["mean_s"],
            "times_ms": [1000.0 * t for t in timing["times_s"]],
            "cpu_times_ms": [1000.0 * t for t in timing["cpu_times_s"]],
            "iters": timing["num_runs"],
            "warmup": warmup,
            "num_detections": _num_detections(self.output),
            "peak_memory_mib": self.peak_mib,
            "memory_method": self.memory_method,
            **batch,
        }


def _num_detections(output) -> Optional[int]:
    """Detections in a predictor's output: Detectron2's ``{"instances": ...}`` or an exported
    model's arrays (``{"scores": ...}``)."""
    if not output:
        return None
    return len(output["instances"]) if "instances" in output else len(output["scores"])


def inference_job(
    model, cfg, image: np.ndarray, max_size: int, batch_size: int = 1
) -> InferenceJob:
    """A job running ``model`` (eval mode) on ``image`` resized to its own short side
    (``batch_size`` copies of it in one forward when > 1)."""
    h, w = image.shape[:2]
    model.eval()
    predictor = Predictor(model, cfg.INPUT.FORMAT, min(h, w), max_size)
    return InferenceJob(predictor, image, next(model.parameters()).device, batch_size)


def measure_interleaved(jobs: Dict, settings: BenchmarkSettings, progress: Callable) -> Dict:
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
    a = get_shape(inputs[0])
    out = get_shape(outputs[0])
    return int(np.prod(out, dtype=np.int64)) * int(a[-1]) if a else 0


def measure_flops(model, cfg, image: np.ndarray) -> Dict:
    """fvcore flop count (1 multiply-add = 1 flop) of one inference, by top-level module."""
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
