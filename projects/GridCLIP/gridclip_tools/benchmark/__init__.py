"""Benchmarks: GridCLIP vs the ViLD baseline vs plain RetinaNet, side by side in one run.

What is measured (``tools/benchmark.py`` is the command line; ``docs/BENCHMARKS.md`` the record):

- **inference** ms/img at batch 1, ``DefaultPredictor``-style (BGR image in, resize, model
  normalisation, forward, box decoding, NMS, ``detector_postprocess``), warm-up first, median of
  N runs (:func:`gridclip_tools.measure.time_interleaved`);
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

Modules, by concern: ``specs`` (the models and their variants, the run settings), ``assets``
(random CLIP weights, text embeddings, teacher caches), ``models`` (configs and seeded models),
``measure`` (predictor, timed jobs, memory, FLOPs), ``profile`` (torch.profiler runs),
``training`` (timed training iterations), ``suites`` (the suites and the whole run), ``report``
(ratios, Markdown, plot) and ``cli`` (``tools/benchmark.py``).
"""

from .assets import BenchmarkAssets, lvis_like_frequencies, random_text_embeddings
from .measure import PeakMemory, Predictor
from .models import build_benchmark_model, build_cfg
from .report import compute_ratios, markdown_report, write_report
from .specs import (
    INFERENCE_MODELS,
    RN50_ARCHITECTURE,
    TINY_ARCHITECTURE,
    TRAIN_MODELS,
    BenchmarkSettings,
    CLIPArchitecture,
    ModelSpec,
    image_size_for_short_side,
    quick_settings,
)
from .suites import run_benchmark

__all__ = [
    "CLIPArchitecture",
    "RN50_ARCHITECTURE",
    "TINY_ARCHITECTURE",
    "ModelSpec",
    "INFERENCE_MODELS",
    "TRAIN_MODELS",
    "BenchmarkSettings",
    "quick_settings",
    "image_size_for_short_side",
    "BenchmarkAssets",
    "lvis_like_frequencies",
    "random_text_embeddings",
    "build_cfg",
    "build_benchmark_model",
    "PeakMemory",
    "Predictor",
    "run_benchmark",
    "compute_ratios",
    "markdown_report",
    "write_report",
]
