"""Timing helpers shared by the embedded demo runner and the benchmark harness.

Timing follows Detectron2's practice: warm-up iterations first, inputs read and cached before
the clock starts, medians over many iterations, batch 1, pre- and post-processing included
(``DefaultPredictor``-style resize and the model's own normalisation and box decoding).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
from detectron2.data import detection_utils as utils

logger = logging.getLogger(__name__)

__all__ = ["time_inference", "time_interleaved", "train_seconds_per_iter", "load_images"]


def load_images(paths: Sequence[str], image_format: str = "BGR") -> List[np.ndarray]:
    """Read images once (HWC uint8 in ``image_format``) so reading is not timed."""
    return [utils.read_image(p, format=image_format) for p in paths]


def time_inference(
    predict: Callable[[np.ndarray], dict],
    images: Sequence[np.ndarray],
    *,
    warmup: int = 2,
    repeats: int = 1,
) -> Dict[str, float]:
    """Median and mean seconds per image of ``predict`` (e.g. a Detectron2 ``DefaultPredictor``:
    BGR image in, resize + normalisation + model + postprocessing) over ``images``, batch 1.
    ``times_s`` lists every timed call.
    """
    if not images:
        raise ValueError("time_inference needs at least one image")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for i in range(warmup):
        predict(images[i % len(images)])
    times = []
    for _ in range(repeats):
        for img in images:
            start = time.perf_counter()
            predict(img)
            sync()
            times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "num_images": len(times),
        "times_s": times,
    }


def time_interleaved(
    jobs: Dict[str, Callable[[], object]],
    *,
    warmup: int = 1,
    repeats: int = 3,
    on_done: Callable[[str, int, float], None] = None,
) -> Dict[str, Dict[str, float]]:
    """Time several zero-argument jobs round-robin: every job's warm-up first, then ``repeats``
    rounds that run each job once.

    On a shared machine the load changes over minutes; interleaving exposes every job to the
    same load, so their ratios stay meaningful where back-to-back blocks would not.

    Besides wall-clock times, the process CPU time of each run is recorded (``cpu_*``): with
    one torch thread on a CPU it equals the wall time on an idle machine and, unlike it, does
    not count the time the process waited for a core that other processes held.

    Returns:
        per job name: ``median_s``, ``mean_s``, ``num_runs``, ``times_s``, ``cpu_median_s``,
        ``cpu_times_s``.
    """
    if not jobs:
        raise ValueError("time_interleaved needs at least one job")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        for job in jobs.values():
            job()
    times: Dict[str, List[float]] = {name: [] for name in jobs}
    cpu_times: Dict[str, List[float]] = {name: [] for name in jobs}
    for round_index in range(repeats):
        for name, job in jobs.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            job()
            sync()
            elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            cpu_times[name].append(time.process_time() - cpu_start)
            if on_done is not None:
                on_done(name, round_index, elapsed)
    return {
        name: {
            "median_s": statistics.median(t),
            "mean_s": statistics.fmean(t),
            "num_runs": len(t),
            "times_s": t,
            "cpu_median_s": statistics.median(cpu_times[name]),
            "cpu_times_s": cpu_times[name],
        }
        for name, t in times.items()
    }


def train_seconds_per_iter(output_dir: str, skip_first: int = 1) -> float:
    """Median training seconds/iteration from Detectron2's ``metrics.json`` in ``output_dir``.

    Detectron2 logs ``time`` (median over its window) every logging period; the first record
    includes warm-up and is skipped when there are others.
    """
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no training metrics at {path!r}: was the model trained there?")
    times = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a killed run
            if "time" in record and "iteration" in record:
                times.append(float(record["time"]))
    if not times:
        raise ValueError(f"{path}: no 'time' records")
    if len(times) > skip_first:
        times = times[skip_first:]
    return statistics.median(times)
