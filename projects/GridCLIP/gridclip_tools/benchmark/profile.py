"""torch.profiler runs of one inference or one training iteration, the model's parts labelled
(``record_function``) and, for inference, timed."""

from __future__ import annotations

import contextlib
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from .measure import Predictor, sync_device
from .training import TrainingJob

__all__ = [
    "INFERENCE_PROFILE_LABELS",
    "TRAIN_PROFILE_LABELS",
    "profile_inference",
    "profile_training",
]


_ACTIVE_LABELS: set = set()


@contextlib.contextmanager
def _recorded_method(obj, name: str, label: str, times: Optional[Dict] = None):
    """Run every call of ``obj.<name>`` inside ``torch.profiler.record_function(label)`` and,
    with ``times``, add its wall and process CPU milliseconds to ``times[label]``; restores what
    was there (an instance attribute such as a :func:`_timed_method` wrapper, or the class's
    method). A missing ``obj`` or method is skipped."""
    if obj is None or not hasattr(obj, name):
        yield
        return
    had_instance_attr = name in vars(obj)
    original = getattr(obj, name)
    device = next((p.device for p in getattr(obj, "parameters", lambda: [])()), None)

    def wrapper(*args, **kwargs):
        if label in _ACTIVE_LABELS:  # called inside a part of the same label: counted there
            return original(*args, **kwargs)
        _ACTIVE_LABELS.add(label)
        try:
            return timed(*args, **kwargs)
        finally:
            _ACTIVE_LABELS.discard(label)

    def timed(*args, **kwargs):
        if device is not None:
            sync_device(device)
        wall, cpu = time.perf_counter(), time.process_time()
        with record_function(label):
            out = original(*args, **kwargs)
        if device is not None:
            sync_device(device)
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
    # GridCLIP's inference with the 1x1 embedding conv: the towers only, the grid embeddings
    # of the scored locations are made in decoding (gridclip/modeling/embedding_rows.py)
    ("head", "forward_towers", "## dense head (towers + output convs)"),
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
        if sort_key != "self_cpu_time_total":
            # On a GPU a small model is often bound by the host (launches, syncs): its CPU side.
            f.write("\n# The same ops by self CPU time (host side: launches, syncs, Python)\n")
            f.write(averages.table(sort_by="self_cpu_time_total", row_limit=top))
    rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    top_ops = [
        [e.key, e.self_cpu_time_total / 1000.0, e.cpu_time_total / 1000.0, e.count] for e in rows
    ]
    return top_ops, parts


# Methods labelled in training profiles: (attribute path from the model, label).
TRAIN_PROFILE_LABELS = (
    ("", "losses", "## losses (focal loss + box loss)"),
    ("image_alignment", "teacher_embeddings", "## GridCLIP image teacher (CLIP)"),
    ("", "distillation_proposals", "## ViLD crop teacher (CLIP on proposals)"),
)


def profile_training(job: TrainingJob, path: str, top: int = 30) -> List:
    """One profiled training iteration of ``job`` (torch.profiler, CPU and CUDA when present),
    the losses and teachers labelled (``TRAIN_PROFILE_LABELS``); writes the op table sorted by
    total time to ``path``; returns the top ops by self time as [name, self ms, total ms,
    calls]."""
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    parts: Dict[str, Dict] = {}
    with contextlib.ExitStack() as stack:
        for owner, name, label in TRAIN_PROFILE_LABELS:
            stack.enter_context(_recorded_method(_attribute(job.model, owner), name, label, parts))
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
            "backward ops run in the autograd engine, outside them). Labelled parts (wall / "
            "process CPU ms, profiler overhead included):\n"
        )
        for label, t in parts.items():
            f.write(f"#   {label}: {t['wall_ms']:,.0f} / {t['cpu_ms']:,.0f} ms\n")
        f.write(averages.table(sort_by=sort_key, row_limit=top))
        if sort_key != "self_cpu_time_total":
            # On a GPU a small model is often bound by the host (launches, syncs): its CPU side.
            f.write("\n# The same ops by self CPU time (host side: launches, syncs, Python)\n")
            f.write(averages.table(sort_by="self_cpu_time_total", row_limit=top))
    rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [
        [e.key, e.self_cpu_time_total / 1000.0, e.cpu_time_total / 1000.0, e.count] for e in rows
    ]
