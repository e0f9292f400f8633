"""Benchmark GridCLIP vs the ViLD baseline vs plain Detectron2 RetinaNet, side by side.

Inference ms/img (batch 1, pre/post-processing included), training s/iter with the CLIP
teacher's cost counted (online or cached), scaling with the vocabulary and the image size,
FLOPs, parameters and peak memory. Writes results.json, results.md and benchmark.png to
--output-dir. Runs on the GPU when there is one (the same command), else on the CPU.

No weights are needed: the detectors are the real architectures (CLIP RN50 trunk + FPN) with
random weights built in memory; see ``gridclip_tools/benchmark/``.

Examples::

    python tools/benchmark.py                       # LVIS settings, everything (CPU: ~15-25 min)
    python tools/benchmark.py --quick               # tiny models, seconds (CI)
    python tools/benchmark.py --models gridclip vild --no-train --vocab-sizes 1203 10000
    python tools/benchmark.py --profile gridclip retinanet_80 --no-train --vocab-sizes --sizes
    python tools/benchmark.py --no-inference --train-models gridclip_online vild_online \\
        --profile-train gridclip_online
    python tools/benchmark.py --models gridclip --no-train --vocab-sizes --sizes \\
        --batch-sizes --export-formats pt2 onnx        # exported vs eager GridCLIP
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Optional

import torch
from detectron2.utils.logger import setup_logger

from gridclip_tools.args import non_negative_int, positive_int

from .report import write_report
from .specs import INFERENCE_MODELS, TRAIN_MODELS, BenchmarkSettings, quick_settings
from .suites import run_benchmark

logger = logging.getLogger("gridclip.tools.benchmark")

__all__ = ["parse_args", "settings_from_args", "main"]


def _fmt_ratio(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output-dir", default="output/benchmark", help="where results go")
    p.add_argument(
        "--quick", action="store_true", help="tiny models and sizes (CI); not a measurement"
    )
    p.add_argument("--models", nargs="*", choices=list(INFERENCE_MODELS), help="inference models")
    p.add_argument(
        "--train-models", nargs="*", choices=list(TRAIN_MODELS), help="training variants"
    )
    p.add_argument("--no-train", action="store_true", help="skip the training measurements")
    p.add_argument("--no-inference", action="store_true", help="skip the inference measurements")
    p.add_argument(
        "--vocab-sizes", nargs="*", type=positive_int, help="vocabulary sweep (class counts)"
    )
    p.add_argument("--vocab-models", nargs="*", choices=list(INFERENCE_MODELS))
    p.add_argument(
        "--sizes", nargs="*", type=positive_int, help="resolution sweep (image short sides, px)"
    )
    p.add_argument("--resolution-models", nargs="*", choices=list(INFERENCE_MODELS))
    p.add_argument(
        "--num-classes", type=positive_int, help="main vocabulary size (default 1203, LVIS)"
    )
    p.add_argument(
        "--image-size", nargs=2, type=positive_int, metavar=("H", "W"), help="main test image"
    )
    p.add_argument(
        "--train-size", nargs=2, type=positive_int, metavar=("H", "W"), help="training image"
    )
    p.add_argument("--iters", type=positive_int, help="timed inference runs per point (median)")
    p.add_argument("--warmup", type=non_negative_int, help="warm-up inference runs per point")
    p.add_argument("--train-iters", type=positive_int, help="timed training iterations per variant")
    p.add_argument(
        "--batch-sizes",
        nargs="*",
        type=positive_int,
        help="throughput suite: batch sizes (empty: none)",
    )
    p.add_argument("--batch-models", nargs="*", choices=list(INFERENCE_MODELS))
    p.add_argument(
        "--batch-iters", type=positive_int, help="timed runs per batch size (throughput)"
    )
    p.add_argument(
        "--export-formats",
        nargs="*",
        choices=["pt2", "onnx"],
        help="export suite: the configs' GridCLIP exported (tools/export.py) in these formats and "
        "timed against eager inference (default: pt2 onnx; empty: none; CPU only)",
    )
    p.add_argument("--no-flops", action="store_true", help="skip the fvcore FLOP count")
    p.add_argument(
        "--profile",
        nargs="*",
        default=[],
        choices=list(INFERENCE_MODELS),
        help="profile one inference of these models (torch.profiler tables)",
    )
    p.add_argument(
        "--profile-train",
        nargs="*",
        default=[],
        choices=list(TRAIN_MODELS),
        help="profile one training iteration of these variants (after the timed ones)",
    )
    p.add_argument("--device", default="", help="cpu / cuda (default: cuda when available)")
    p.add_argument(
        "--threads",
        type=non_negative_int,
        default=0,
        help="torch CPU threads (default: torch's); 1 is steadier on a shared machine",
    )
    p.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="extra config options for every model, KEY VALUE pairs",
    )
    return p.parse_args(argv)


def settings_from_args(args):
    settings = quick_settings() if args.quick else BenchmarkSettings()
    overrides = {}
    for name, value in (
        ("models", args.models),
        ("train_models", args.train_models),
        ("vocab_sizes", args.vocab_sizes),
        ("vocab_models", args.vocab_models),
        ("image_sizes", args.sizes),
        ("resolution_models", args.resolution_models),
        ("num_classes", args.num_classes),
        ("image_size", tuple(args.image_size) if args.image_size else None),
        ("train_image_size", tuple(args.train_size) if args.train_size else None),
        ("iters", args.iters),
        ("warmup", args.warmup),
        ("train_iters", args.train_iters),
        ("batch_sizes", args.batch_sizes),
        ("batch_models", args.batch_models),
        ("batch_iters", args.batch_iters),
        ("export_formats", args.export_formats),
    ):
        if value is not None:
            overrides[name] = value
    if args.models is not None:
        # Sweeps only cover requested models unless given explicitly.
        for sweep in ("vocab_models", "resolution_models", "batch_models"):
            if getattr(args, sweep) is None:
                overrides[sweep] = [m for m in getattr(settings, sweep) if m in args.models]
    if args.no_flops:
        overrides["flops"] = False
    overrides["profile"] = list(args.profile)
    overrides["profile_train"] = list(args.profile_train)
    overrides["device"] = args.device
    opts = list(args.opts)
    if opts and opts[0] == "--":
        opts = opts[1:]
    if len(opts) % 2:
        raise SystemExit(f"config options must be KEY VALUE pairs, got {opts}")
    overrides["opts"] = list(settings.opts) + opts
    train_models = overrides.get("train_models", settings.train_models)
    not_trained = [k for k in args.profile_train if args.no_train or k not in train_models]
    if not_trained:
        raise SystemExit(
            f"--profile-train {' '.join(not_trained)}: not among the training variants run "
            f"({'--no-train' if args.no_train else ' '.join(train_models)})"
        )
    for name in ("iters", "train_iters", "batch_iters"):
        if name in overrides and overrides[name] < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if any(b < 1 for b in overrides.get("batch_sizes", ())):
        raise SystemExit(f"--batch-sizes must be >= 1, got {overrides['batch_sizes']}")
    return type(settings)(**{**settings.__dict__, **overrides})


def setup_logging() -> None:
    """Console logging of the project's loggers: ``gridclip``, ``detectron2`` and this tool's
    own modules (``gridclip_tools.benchmark.*``: the suites' progress, the assets)."""
    setup_logger(name="gridclip")
    setup_logger(name="detectron2", abbrev_name="d2")
    setup_logger(name="gridclip_tools")


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    settings = settings_from_args(args)
    command = "python tools/benchmark.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        results = run_benchmark(
            settings,
            args.output_dir,
            run_inference=not args.no_inference,
            run_training=not args.no_train,
            command=command.strip(),
        )
    finally:
        torch.set_num_threads(threads)  # main() may run inside another process (tests)
    paths = write_report(results, args.output_dir)
    ratios_cpu = results.get("ratios_cpu") or {}
    for key, value in results["ratios"].items():
        logger.info(f"{key}: wall {_fmt_ratio(value)}, CPU {_fmt_ratio(ratios_cpu.get(key))}")
    logger.info(f"Results: {', '.join(paths.values())}")
    return results
