"""The benchmark's suites and the whole run: main inference comparison, resolution and
vocabulary sweeps, FLOPs and parameters, training variants, profiles; results as a dict."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import detectron2
import torch
from detectron2.utils.events import EventStorage

from .. import export as exporting  # tools/export.py's code: what users export is timed
from ..measure import time_interleaved
from .assets import BenchmarkAssets, random_text_embeddings, synthetic_image
from .measure import (
    InferenceJob,
    Predictor,
    available_memory_bytes,
    count_parameters,
    estimated_inference_bytes,
    inference_job,
    measure_flops,
    measure_interleaved,
)
from .models import build_benchmark_model, build_cfg
from .profile import profile_inference, profile_training
from .report import compute_paired_ratios, compute_ratios, jsonable
from .specs import (
    INFERENCE_MODELS,
    TRAIN_MODELS,
    BenchmarkSettings,
    ModelSpec,
    image_size_for_short_side,
)
from .training import TrainingJob

logger = logging.getLogger(__name__)

__all__ = [
    "code_version",
    "machine_info",
    "run_inference_suites",
    "run_training_suite",
    "run_benchmark",
]


def code_version() -> Dict:
    """The git commit of the project and its uncommitted files (a number depends on both)."""
    # projects/GridCLIP/gridclip_tools/benchmark/ -> the repository root
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
    groups = (settings.models, settings.vocab_models, settings.resolution_models)
    for key in _ordered(*groups, settings.batch_models):
        spec = INFERENCE_MODELS[key]
        progress(f"building {spec.label} ({spec.fixed_classes or main_k} classes)")
        cfg = build_cfg(spec, main_k, assets, settings)
        model = build_benchmark_model(cfg, settings.seed)
        size, image = main_size, main_image
        if spec.image_size is not None:  # a reference setting with its own input
            size = _own_size(spec, settings)
            image = synthetic_image(*size, seed=settings.seed)
        reason = _skip_reason(spec, main_k, size, settings, model.device)
        if reason:
            records.append(_record("main", spec, main_k, size, skipped=reason))
            continue
        built[key] = (spec, cfg, model)
        jobs[key] = inference_job(model, cfg, image, settings.max_size)
    progress(f"inference at {main_size[0]}x{main_size[1]}, {main_k} classes")
    for key, rec in measure_interleaved(jobs, settings, progress).items():
        size = _own_size(built[key][0], settings) if built[key][0].image_size else main_size
        records.append(_record("main", built[key][0], main_k, size, **rec))
    del jobs
    checkpoint()
    records += _batch_suite(built, main_image, settings, progress)
    checkpoint()
    records += _export_suite(built, main_image, settings, progress)
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


def _own_size(spec: ModelSpec, settings: BenchmarkSettings) -> Tuple[int, int]:
    """A spec's own test image size; quick mode (CI) shrinks it to the run's short side."""
    if settings.quick:
        short = min(settings.image_size)
        h, w = spec.image_size
        return short, int(round(short * w / h))
    return tuple(spec.image_size)


def _batch_suite(built: Dict, image, settings, progress) -> List[Dict]:
    """Throughput: each of ``settings.batch_models`` at each of ``settings.batch_sizes``
    (``image`` repeated, one forward per batch), all interleaved. The models were warmed up by
    the main suite; ``settings.batch_iters`` timed rounds."""
    keys = [k for k in settings.batch_models if k in built]
    sizes = sorted(set(settings.batch_sizes))
    if not keys or not sizes:
        return []
    if sizes[0] < 1:
        raise ValueError(f"batch sizes must be >= 1, got {sizes}")
    jobs = {}
    for key in keys:
        _, cfg, model = built[key]
        for b in sizes:
            jobs[(key, b)] = inference_job(model, cfg, image, settings.max_size, batch_size=b)
    progress(f"throughput of {keys} at batch sizes {sizes}")
    timings = time_interleaved(
        jobs,
        warmup=0,
        repeats=settings.batch_iters,
        on_done=lambda name, i, sec: progress(f"    round {i + 1}: {name} {1000 * sec:,.0f} ms"),
    )
    size = tuple(image.shape[:2])
    return [
        _record("batch", built[key][0], settings.num_classes, size, **jobs[(key, b)].record(t, 0))
        for (key, b), t in timings.items()
    ]


def _export_suite(built: Dict, image, settings, progress) -> List[Dict]:
    """The configs' GridCLIP exported with ``tools/export.py``'s code (``torch.export`` and
    ONNX in ``onnxruntime``; the benchmark's vocabulary baked in, the canvas = the main image's
    padded size), timed against the same model run eagerly, interleaved, preprocessing to
    detections. Each record also has the export's duration, the file size and the largest
    difference of its detections from the eager ones on the main image. CPU only (the exported
    graph is run on the CPU here, onnxruntime with its CPU provider and torch's thread count)."""
    if "gridclip" not in built or not settings.export_formats:
        return []
    spec, cfg, model = built["gridclip"]
    k, size = settings.num_classes, tuple(image.shape[:2])
    device = next(model.parameters()).device
    unknown = [f for f in settings.export_formats if f not in exporting.FORMATS]
    if unknown:
        raise ValueError(f"unknown export formats {unknown}; choose from {exporting.FORMATS}")
    if device.type != "cpu":
        reason = f"skipped: the export suite runs on the CPU (models on {device})"
        return [_record("export", spec, k, size, runtime="eager", skipped=reason)]
    records, runners, export_info = [], {}, {}
    min_size = min(size)
    resize = exporting.resize_transform(min_size, settings.max_size).get_transform(image)
    div = max(1, int(model.backbone.size_divisibility))
    canvas = [exporting.round_up(v, div) for v in (resize.new_h, resize.new_w)]
    export_settings = {"canvas_hw": canvas, "min_size_test": min_size}
    export_settings["max_size_test"] = settings.max_size
    wrapper = exporting.ExportableGridCLIP(model, canvas)
    missing = exporting.missing_onnx_extras()
    with tempfile.TemporaryDirectory(prefix="gridclip-benchmark-export-") as tmp:
        for fmt in settings.export_formats:
            if fmt == "onnx" and missing:
                reason = (
                    f"skipped: ONNX needs {', '.join(missing)} (optional: tools/setup_env.sh "
                    "--export)"
                )
                records.append(_record("export", spec, k, size, runtime=fmt, skipped=reason))
                continue
            progress(f"export {spec.label} to {fmt} (canvas {canvas[0]}x{canvas[1]})")
            path = os.path.join(tmp, f"gridclip.{fmt}")
            start = time.perf_counter()
            if fmt == "pt2":
                exporting.export_pt2(wrapper, export_settings, path)
                module = exporting.load_pt2(path)
                runners[fmt] = functools.partial(
                    exporting.run_pt2, module, settings=export_settings
                )
            else:
                exporting.export_onnx(wrapper, export_settings, path)
                session = exporting.onnx_session(path, threads=torch.get_num_threads())
                runners[fmt] = functools.partial(
                    exporting.run_onnx, session, settings=export_settings
                )
            export_info[fmt] = {
                "export_s": time.perf_counter() - start,
                "file_mib": os.path.getsize(path) / 2**20,
            }
        if not runners:
            return records
        jobs = {"eager": inference_job(model, cfg, image, settings.max_size)}
        for fmt, run in runners.items():
            jobs[fmt] = InferenceJob(run, image, device)
        progress(f"exported vs eager {spec.label}: {list(jobs)}")
        timed = measure_interleaved(jobs, settings, progress)
    eager = timed.pop("eager")
    reference = exporting.detection_arrays(jobs["eager"].output["instances"])
    records.append(_record("export", spec, k, size, runtime="eager", **eager))
    for fmt, rec in timed.items():
        diff = exporting.compare_detections(reference, jobs[fmt].output)
        fields = {**rec, **export_info[fmt], "vs_eager": diff, "canvas_hw": canvas}
        records.append(_record("export", spec, k, size, runtime=fmt, **fields))
    return records


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
            "settings": jsonable(dataclasses.asdict(settings)),
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
                json.dump(jsonable(results), f, indent=2)

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
    results["ratios_paired_cpu"] = compute_paired_ratios(results)
    if os.path.exists(partial):
        os.remove(partial)
    return results
