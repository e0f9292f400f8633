"""The embedded default, end to end: `make demo`.

1. Generates the offline open-vocabulary world (LVIS format; cached).
2. Trains GridCLIP, two ablations (without image-level alignment; without any CLIP image
   knowledge), the oracle (novel classes boxed) and the ViLD baseline with the project's own
   ``train_net.py`` and configs (``projects/GridCLIP/configs/embedded/``), evaluating each on
   val with ``LVISEval``.
3. Times inference (batch 1, pre/post-processing included) on the same machine.
4. Writes to ``--output-dir`` (default ``output/demo``):
   ``summary.json`` (machine-readable), ``comparison.md`` (the table), ``comparison.png``
   (accuracy vs speed), ``predictions/*.png`` (Detectron2 ``Visualizer``), and per-model
   training folders (checkpoints, ``metrics.json``, TensorBoard events, logs).

Trained models are reused when their folder holds ``results.json`` from the same config and
iterations (``--force`` retrains), and evaluated again on their final weights when only
evaluation settings changed (:func:`_launch`). ``--preset ci`` runs the same pipeline on a
tiny world with few iterations (what the test suite runs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import Visualizer

import gridclip  # noqa: F401  (registers models and datasets)
from gridclip.config import PROJECT_ROOT, get_gridclip_cfg
from gridclip.data import datasets_root
from gridclip.data.world import generate_world, register_world
from gridclip.engine.run_guard import flatten_config
from gridclip.utils.io import atomic_write
from gridclip_tools.args import non_negative_int, positive_int

from .cache_vild_teacher import main as build_vild_cache
from .measure import load_images, time_inference, train_seconds_per_iter

logger = logging.getLogger("gridclip.demo")

TRAIN_NET = os.path.join(PROJECT_ROOT, "train_net.py")


@dataclass(frozen=True)
class DemoModel:
    """One row of the demo's table: a config under configs/, overrides, and the world's training
    split it trains on (``train``: novel boxes removed, the OVD protocol; ``train_full``: the
    oracle that sees them)."""

    label: str
    config: str
    opts: Tuple[str, ...] = ()
    train_split: str = "train"


#: name -> row. The rows measure what each part of GridCLIP brings to novel classes: the oracle
#: (novel classes boxed) is the ceiling, the CLIP-free row (no dense CLIP term, no image-level
#: alignment: only CLIP's text embeddings and backbone init) the floor.
MODELS: Dict[str, DemoModel] = {
    "gridclip": DemoModel("GridCLIP", "embedded/GridCLIP_world.yaml"),
    "gridclip_no_ila": DemoModel(
        "GridCLIP w/o image-level alignment",
        "embedded/GridCLIP_world.yaml",
        ("MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT", "0.0"),
    ),
    "gridclip_clip_free": DemoModel(
        "GridCLIP w/o CLIP image knowledge (no dense CLIP term, no alignment)",
        "embedded/GridCLIP_world.yaml",
        ("MODEL.GRIDCLIP.DENSE_CLIP", "False", "MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT", "0.0"),
    ),
    "gridclip_oracle": DemoModel(
        "GridCLIP oracle (novel classes boxed in training)",
        "embedded/GridCLIP_world.yaml",
        ("MODEL.GRIDCLIP.IGNORE_NOVEL_IN_TRAINING", "False"),
        train_split="train_full",
    ),
    "vild": DemoModel("ViLD (text + image distillation)", "embedded/ViLD_world.yaml"),
}


def schedule_opts(iters: int | None) -> List[str]:
    """Overrides that stretch the configs' 300-iteration schedule to ``iters`` (learning-rate
    steps at 73% and 90%, as 220 and 270 of 300; a checkpoint every third)."""
    if iters is None:
        return []
    steps = (int(round(iters * 220 / 300)), int(round(iters * 270 / 300)))
    return [
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.STEPS",
        f"({steps[0]}, {steps[1]})",
        "SOLVER.CHECKPOINT_PERIOD",
        str(max(1, iters // 3)),
    ]


def dataset_opts(prefix: str, model: DemoModel) -> List[str]:
    """``DATASETS.TRAIN`` / ``DATASETS.TEST`` overrides of one row on the world ``prefix``."""
    train, val = f"{prefix}_{model.train_split}", f"{prefix}_val"
    return ["DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{val}',)"]


#: preset -> world generation kwargs, dataset prefix, overrides for every model, training
#: iterations of every row (None: the configs' 300) and ViLD's teacher (``online``: CLIP on the
#: RPN's proposal crops every iteration; ``cache``: crops of sliding windows embedded once per
#: training image by ``cache_vild_teacher.py`` before training, its time counted in the demo's)
PRESETS = {
    "demo": {
        "world": {"preset": "demo"},
        "prefix": "gridclip_world",
        "opts": [],
        "iters": None,
        "vild_teacher": "online",
    },
    "ci": {
        "world": {"preset": "ci"},
        "prefix": "gridclip_world_ci",
        "iters": None,
        "vild_teacher": "online",
        "opts": [
            "SOLVER.MAX_ITER",
            "20",
            "SOLVER.WARMUP_ITERS",
            "5",
            "SOLVER.CHECKPOINT_PERIOD",
            "10",
            "SOLVER.IMS_PER_BATCH",
            "4",
            "INPUT.MIN_SIZE_TRAIN",
            "(128,)",
            "INPUT.MIN_SIZE_TEST",
            "128",
            "DATALOADER.NUM_WORKERS",
            "0",
        ],
    },
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output-dir", default="output/demo")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS)
    )
    p.add_argument(
        "--timing-images", type=positive_int, default=20, help="val images timed per model"
    )
    p.add_argument(
        "--num-vis", type=non_negative_int, default=4, help="val images visualised per model"
    )
    p.add_argument("--force", action="store_true", help="retrain even if results exist")
    p.add_argument(
        "--iters",
        type=positive_int,
        default=None,
        help="training iterations of every row, learning-rate steps at 73%% and 90%% "
        "(default: the preset's)",
    )
    p.add_argument(
        "--vild-teacher",
        choices=["online", "cache"],
        default=None,
        help="ViLD's CLIP teacher: online proposal crops, or a cache of sliding-window crops "
        "built once before training, under <output-dir>/vild_teacher (default: the preset's)",
    )
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=None,
        help="models trained at the same time (default: 2 on 2+ cores, else 1); each training "
        "process gets cores // jobs threads (or --threads)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch/OpenMP threads per process (default: all cores for timing, cores // jobs "
        "for training). On a CPU shared with other jobs, 1 avoids oversubscription, which can "
        "slow training several-fold.",
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every model")
    return p.parse_args(argv)


def _stage(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


#: Subfolder of a run where a re-evaluation (:func:`_launch`) writes its outputs.
EVALUATION_DIR = "evaluation"
#: A finished run's evaluation settings, defaults included (:func:`_evaluation_settings`).
EVALUATION_SETTINGS = "evaluation_settings.json"
#: The training settings a run's checkpoints were trained with, defaults included
#: (:func:`_training_settings`), written when its training starts.
TRAINING_SETTINGS = "training_settings.json"

_ABSENT = object()


def _settings(config: str, opts) -> Dict[str, Any]:
    """The resolved config's settings that differ from the project's defaults, flattened
    (``"MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT": 1.0``), the output folder left out."""
    defaults = {k: _canonical(v) for k, v in flatten_config(get_gridclip_cfg()).items()}
    return {
        k: v
        for k, v in flatten_config(get_gridclip_cfg(config, list(opts))).items()
        if k != "OUTPUT_DIR" and defaults.get(k, _ABSENT) != _canonical(v)
    }


def _canonical(value):
    """Lists and tuples alike, at every depth: a config written to YAML (a run's config.yaml)
    reads nested tuples back as lists, which are the same setting."""
    if isinstance(value, (list, tuple)):
        return tuple(_canonical(v) for v in value)
    return value


def is_evaluation_setting(key: str) -> bool:
    """Settings that only change inference or evaluation, never the trained weights: the
    ``TEST`` section, ``DATASETS.TEST`` and every key named ``*_TEST`` or ``TEST_*`` (score
    thresholds, NMS, test sizes, the CLIP score ensemble, the location gate)."""
    leaf = key.rsplit(".", 1)[-1]
    return (
        key.startswith("TEST.")
        or key == "DATASETS.TEST"
        or leaf.endswith("_TEST")
        or leaf.startswith("TEST_")
    )


def _hash(settings: Dict[str, Any]) -> str:
    text = "\n".join(f"{k}={v!r}" for k, v in sorted(settings.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _run_keys(config: str, opts) -> Tuple[str, str]:
    """(run key, training key) of a config and overrides: hashes of its settings that differ
    from the defaults (its ``_BASE_`` chain and the overrides included, the output folder
    excluded), all of them / those that change the trained weights. A model is reused when its
    run key matches, and re-evaluated (``--eval-only`` on its final weights) when only its
    training key does. Default-valued settings are left out, so a key the project adds or
    removes with its default does not make finished runs look like another config."""
    settings = _settings(config, opts)
    training = {k: v for k, v in settings.items() if not is_evaluation_setting(k)}
    return _hash(settings), _hash(training)


def _all_settings(config: str, opts, evaluation: bool) -> Dict[str, Any]:
    """Every evaluation setting (:func:`is_evaluation_setting`) of the resolved config, or every
    other one (the output folder left out), default values included."""
    return {
        k: _canonical(v)
        for k, v in flatten_config(get_gridclip_cfg(config, list(opts))).items()
        if is_evaluation_setting(k) == evaluation and k != "OUTPUT_DIR"
    }


def _evaluation_settings(config: str, opts) -> Dict[str, Any]:
    """Every evaluation setting of the resolved config, default values included: what a
    finished run records, so that a default changed in ``gridclip/config.py`` (which the run
    keys cannot see) is noticed (:func:`_changed_settings`)."""
    return _all_settings(config, opts, evaluation=True)


def _training_settings(config: str, opts) -> Dict[str, Any]:
    """Every training setting of the resolved config, default values included: recorded when a
    run starts, so that a run trained under another *training* default is retrained, not reused
    or resumed (:func:`_changed_settings`)."""
    return _all_settings(config, opts, evaluation=False)


def _changed_settings(out_dir: str, filename: str, settings: Dict[str, Any]) -> List[str]:
    """``key: recorded -> today`` for each setting the run in ``out_dir`` recorded in
    ``filename`` with another value than today's (empty: the same). A setting it did not record
    (one the project added since, at a default that keeps the old behaviour) and a run recorded
    before the file existed count as the same."""
    path = os.path.join(out_dir, filename)
    recorded = json.load(open(path)) if os.path.isfile(path) else {}
    return [
        f"{k}: {recorded[k]!r} -> {v!r}"
        for k, v in sorted(settings.items())
        if k in recorded and _canonical(recorded[k]) != v
    ]


def _run_key(config: str, opts) -> str:
    """The run key of :func:`_run_keys`."""
    return _run_keys(config, opts)[0]


def _legacy_run_key(config: str, opts) -> str:
    """The run key of runs recorded before :func:`_run_keys` (a hash of the whole config
    dump): such a run is reused when the config still dumps the same."""
    cfg = get_gridclip_cfg(config, list(opts))
    cfg.defrost()
    cfg.OUTPUT_DIR = ""
    return hashlib.sha256(cfg.dump().encode()).hexdigest()[:16]


def _read(path: str):
    return open(path).read().strip() if os.path.isfile(path) else None


def _recorded_train_key(out_dir: str) -> Optional[str]:
    """The training key of the run in ``out_dir``: its ``train_key.txt``, else (a run recorded
    before training keys) that of the ``config.yaml`` train_net.py wrote there; None when
    neither can be read (e.g. the dump names a setting the project has since removed)."""
    recorded = _read(os.path.join(out_dir, "train_key.txt"))
    dumped = os.path.join(out_dir, "config.yaml")
    if recorded is not None or not os.path.isfile(dumped):
        return recorded
    try:
        return _run_keys(dumped, [])[1]
    except (KeyError, ValueError, AssertionError) as e:
        logger.info("%s: its training settings cannot be read back (%s)", dumped, e)
        return None


def _write_settings(out_dir: str, filename: str, settings: Dict[str, Any]) -> None:
    with atomic_write(os.path.join(out_dir, filename), "w") as f:
        json.dump(settings, f, indent=1, sort_keys=True)


def _adopt_training_settings(out_dir: str, settings: Dict[str, Any]) -> None:
    """A run recorded before ``TRAINING_SETTINGS`` existed and accepted as today's training
    (same training key) records today's training settings, so that a later default change is
    noticed."""
    if not os.path.isfile(os.path.join(out_dir, TRAINING_SETTINGS)):
        _write_settings(out_dir, TRAINING_SETTINGS, settings)


def _record_keys(out_dir: str, key: str, train_key: str, eval_settings: Dict[str, Any]) -> None:
    """Write a finished run's run key and training key (:func:`_run_keys`) and its evaluation
    settings (:func:`_evaluation_settings`) into its folder."""
    for filename, value in (("run_key.txt", key), ("train_key.txt", train_key)):
        with atomic_write(os.path.join(out_dir, filename), "w") as f:
            f.write(value)
    _write_settings(out_dir, EVALUATION_SETTINGS, eval_settings)


def _launch(name, config, opts, out_dir, force, threads=None, log_file=None):
    """Start train_net.py for one model: a Popen, or None when its results are up to date.

    A finished run whose training settings match but whose evaluation settings differ is
    evaluated again on its final weights instead of retrained."""
    results_path = os.path.join(out_dir, "results.json")
    key, train_key = _run_keys(config, opts)
    eval_settings = _evaluation_settings(config, opts)
    train_settings = _training_settings(config, opts)
    # Trained under another training default (the keys hash non-default settings only): its
    # checkpoints are another model, neither reused, re-evaluated nor resumed.
    retrain = _changed_settings(out_dir, TRAINING_SETTINGS, train_settings)
    if retrain:
        print(f"    {out_dir} was trained with other defaults: " + "; ".join(retrain), flush=True)
    finished = not force and not retrain and os.path.isfile(results_path)
    recorded = _read(os.path.join(out_dir, "run_key.txt"))
    legacy = recorded is not None and recorded != key and recorded == _legacy_run_key(config, opts)
    evaluated = not _changed_settings(out_dir, EVALUATION_SETTINGS, eval_settings)
    if finished and (recorded == key or legacy) and evaluated:
        if legacy:  # recorded by an earlier version: record today's keys
            _record_keys(out_dir, key, train_key, eval_settings)
        print(f"    reusing {results_path} (same config; --force retrains)", flush=True)
        _adopt_training_settings(out_dir, train_settings)
        return None
    final = os.path.join(out_dir, "model_final.pth")
    eval_only = finished and os.path.isfile(final) and _recorded_train_key(out_dir) == train_key
    if eval_only:
        _adopt_training_settings(out_dir, train_settings)
    started_path = os.path.join(out_dir, "run_key_started.txt")
    started = _read(started_path)
    if (
        not eval_only
        and os.path.isdir(out_dir)
        and os.listdir(out_dir)
        and (started != key or retrain)
    ):
        # Checkpoints of another config (or of unknown origin): `--resume` would load them into
        # a different model. Keep them aside instead of resuming or deleting.
        previous = out_dir.rstrip("/") + ".previous"
        if os.path.isdir(previous):
            shutil.rmtree(previous)
        os.replace(out_dir, previous)
        print(f"    {out_dir} held a run of another config: moved to {previous}", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    cmd = [sys.executable, TRAIN_NET, "--config-file", config]
    if eval_only:
        print(f"    {out_dir}: same training, other evaluation settings: evaluating", flush=True)
        evaluation = os.path.join(out_dir, EVALUATION_DIR)  # the training's config.yaml stays
        cmd += ["--eval-only", "OUTPUT_DIR", evaluation] + list(opts) + ["MODEL.WEIGHTS", final]
    else:
        with atomic_write(started_path, "w") as f:
            f.write(key)  # a killed run of this same config resumes from its last checkpoint
        _write_settings(out_dir, TRAINING_SETTINGS, train_settings)
        cmd += ["--resume", "OUTPUT_DIR", out_dir] + list(opts)
    print("    $ " + " ".join(cmd), flush=True)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out = open(log_file, "w") if log_file else None
    previous_results = json.load(open(results_path)) if eval_only else None
    proc = subprocess.Popen(cmd, cwd=os.getcwd(), env=env, stdout=out, stderr=out)
    proc.gridclip_run = (name, out_dir, (key, train_key, eval_settings), time.perf_counter(), out)
    proc.gridclip_trained = previous_results
    return proc


def _finish(proc) -> None:
    """Check a finished training (or re-evaluation) process; record its keys and wall time."""
    name, out_dir, (key, train_key, eval_settings), start, out = proc.gridclip_run
    if out is not None:
        out.close()
    trained = proc.gridclip_trained  # the earlier results of a re-evaluated run, else None
    results_path = os.path.join(out_dir, "results.json")
    if trained is None:
        what, written = "training", results_path
    else:
        what, written = "evaluating", os.path.join(out_dir, EVALUATION_DIR, "eval_results.json")
    if proc.returncode != 0:
        raise RuntimeError(
            f"{what} {name} failed (exit {proc.returncode}); see "
            f"{os.path.dirname(written)}/log.txt" + (f" and {out.name}" if out is not None else "")
        )
    if not os.path.isfile(written):
        raise RuntimeError(f"{what} {name} wrote no {written}")
    results = json.load(open(written))
    if trained is None:
        results["train_wall_s"] = time.perf_counter() - start
    else:  # the new evaluation, the training's own record (wall time, iterations) kept
        results = {
            **trained,
            "results": results["results"],
            "datasets_test": results["datasets_test"],
            "evaluated_again_s": time.perf_counter() - start,
        }
    with atomic_write(results_path, "w") as f:
        json.dump(results, f, indent=2)
    _record_keys(out_dir, key, train_key, eval_settings)


def _progress(out_dir: str, max_iter: int) -> str:
    """``iteration/max_iter`` from a training folder's metrics.json (Detectron2's JSONWriter)."""
    path = os.path.join(out_dir, "metrics.json")
    it = 0
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    it = max(it, int(json.loads(line).get("iteration", -1)) + 1)
                except (ValueError, AttributeError):
                    continue
    if os.path.isfile(os.path.join(out_dir, "model_final.pth")):
        return "evaluating"
    return f"{it}/{max_iter}"


def train_all(runs, force, jobs, threads, poll_s=15.0, stage="2/4 train + evaluate") -> None:
    """Train + evaluate every model with train_net.py in subprocesses, ``jobs`` at a time.

    ``runs``: list of (name, label, config, opts, out_dir, max_iter). One job streams its log to
    the terminal; several write ``<out_dir>/train_stdout.log`` and a progress line is printed.
    """
    # The longest trainings first (ViLD: proposal-crop distillation), so that the others fill
    # the remaining slots instead of leaving one job running alone at the end.
    pending = sorted(runs, key=lambda r: "vild" not in r[0].lower())
    running = []
    while pending or running:
        while pending and len(running) < jobs:
            name, label, config, opts, out_dir, max_iter = pending.pop(0)
            _stage(f"{stage} {label}")
            log = os.path.join(out_dir, "train_stdout.log") if jobs > 1 else None
            proc = _launch(name, config, opts, out_dir, force, threads, log)
            if proc is not None:
                if log:
                    print(f"    log: {log}", flush=True)
                running.append((proc, name, out_dir, max_iter))
        if not running:
            continue
        if jobs == 1:
            proc = running.pop()[0]
            proc.wait()
            _finish(proc)
            continue
        time.sleep(poll_s)
        still = []
        for entry in running:
            proc = entry[0]
            if proc.poll() is None:
                still.append(entry)
            else:
                _finish(proc)
                print(f"    {entry[1]}: done", flush=True)
        running = still
        if running:
            status = ", ".join(f"{n} {_progress(d, m)}" for _, n, d, m in running)
            print(f"    [{time.strftime('%H:%M:%S')}] training: {status}", flush=True)


def plan_rows(names, preset, iters=None, vild_opts=(), extra_opts=(), output_dir="output/demo"):
    """The demo's runs, in ``train_all``'s format (name, label, config, opts, out_dir, max_iter):
    each row's world splits, the preset's overrides, the row's own, the schedule of ``iters``
    iterations, ``vild_opts`` (ViLD's row only: its teacher) and ``extra_opts`` (last: the
    command line wins)."""
    runs = []
    for name in names:
        model = MODELS[name]
        opts = dataset_opts(preset["prefix"], model) + list(preset["opts"]) + list(model.opts)
        opts += schedule_opts(iters) + (list(vild_opts) if name == "vild" else [])
        opts += list(extra_opts)
        out_dir = os.path.join(output_dir, name)
        max_iter = get_gridclip_cfg(model.config, opts).SOLVER.MAX_ITER
        runs.append((name, model.label, model.config, opts, out_dir, max_iter))
    return runs


def build_predictor(config, opts, out_dir):
    """Detectron2's DefaultPredictor on the trained weights (BGR in; resize, model, postprocess)."""
    weights = os.path.join(out_dir, "model_final.pth")
    cfg = get_gridclip_cfg(config, list(opts) + ["OUTPUT_DIR", out_dir, "MODEL.WEIGHTS", weights])
    return cfg, DefaultPredictor(cfg)


def visualise(predictor, dataset_dicts, metadata, out_prefix, threshold=0.3):
    """Draw predictions with Detectron2's Visualizer; returns the PNG paths."""
    paths = []
    for d in dataset_dicts:
        bgr = utils.read_image(d["file_name"], format="BGR")
        inst = predictor(bgr)["instances"].to("cpu")
        inst = inst[inst.scores >= threshold]
        vis = Visualizer(bgr[:, :, ::-1], metadata=metadata, scale=2.0)
        path = f"{out_prefix}_{os.path.splitext(os.path.basename(d['file_name']))[0]}.png"
        vis.draw_instance_predictions(inst).save(path)
        paths.append(path)
    return paths


def write_outputs(summary, output_dir):
    rows = summary["models"]
    header = (
        "| model | AP | APr (novel) | APc | APf | train s/iter | inference ms/img "
        "| teacher CLIP forwards / train image |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        m = r["bbox"]
        lines.append(
            f"| {r['label']} | {m['AP']:.1f} | {m['APr']:.1f} | {m['APc']:.1f} | {m['APf']:.1f} "
            f"| {r['train_s_per_iter']:.2f} | {r['inference_ms_per_img']:.0f} "
            f"| {r['teacher_forwards_per_image']} |"
        )
    table = header + "\n".join(lines) + "\n"
    notes = "".join(f"- {line}\n" for line in headline_comparisons(rows))
    md = (
        f"# Embedded default: GridCLIP vs ViLD\n\n{table}\n{notes}\n"
        f"Machine: {summary['machine']}. Preset `{summary['preset']}`. "
        f"Produced by `{summary['command']}` in {summary['wall_s'] / 60:.1f} min.\n"
    )
    with atomic_write(os.path.join(output_dir, "comparison.md"), "w") as f:
        f.write(md)
    with atomic_write(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\n" + table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, r in enumerate(rows):
        x, color = r["inference_ms_per_img"], f"C{i}"
        ap, apr = r["bbox"]["AP"], r["bbox"]["APr"]
        ax.plot([x, x], [apr, ap], color=color, alpha=0.4, linewidth=2)
        ax.scatter([x], [ap], marker="o", s=90, color=color, label=f"{r['label']}: AP")
        ax.scatter([x], [apr], marker="^", s=90, color=color, label=f"{r['label']}: APr (novel)")
    device = "GPU" if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    ax.set_xlabel(f"inference ms / image (batch 1, {device})")
    ax.set_ylabel("LVIS AP on the world's val split")
    ax.set_title("Embedded default: accuracy vs speed (up and left is better)")
    ax.margins(x=0.15, y=0.15)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "comparison.png"), dpi=120)
    plt.close(fig)


def headline_comparisons(rows) -> List[str]:
    """The comparisons the table is for, as sentences (those whose rows were run)."""
    ap = {r["name"]: r["bbox"] for r in rows}
    out = []
    if "gridclip" in ap and "gridclip_oracle" in ap and ap["gridclip_oracle"]["APr"] > 0:
        ratio = ap["gridclip"]["APr"] / ap["gridclip_oracle"]["APr"]
        out.append(
            f"GridCLIP's novel-class AP is {ratio:.2f} x the oracle's "
            f"({ap['gridclip']['APr']:.1f} vs {ap['gridclip_oracle']['APr']:.1f})."
        )
    if "gridclip" in ap and "vild" in ap:
        g, v = ap["gridclip"], ap["vild"]
        out.append(
            f"GridCLIP vs ViLD: AP {g['AP'] - v['AP']:+.1f}, APr {g['APr'] - v['APr']:+.1f}."
        )
    if "gridclip_clip_free" in ap and "gridclip_oracle" in ap:
        floor, ceiling = ap["gridclip_clip_free"]["APr"], ap["gridclip_oracle"]["APr"]
        for name in ("gridclip_no_ila", "gridclip"):
            if name in ap and ceiling > floor:
                closed = (ap[name]["APr"] - floor) / (ceiling - floor)
                out.append(
                    f"{name}: closes {100 * closed:.0f}% of the novel-class gap between the "
                    f"CLIP-free row ({floor:.1f}) and the oracle ({ceiling:.1f})."
                )
    return out


def teacher_forwards(cfg) -> str:
    if cfg.MODEL.META_ARCHITECTURE == "GridCLIP":
        if cfg.MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT <= 0:
            return "0"
        n = sum(g * g for g in cfg.MODEL.GRIDCLIP.IMAGE_ALIGN_GRIDS)
        return f"{n} views of {cfg.MODEL.CLIP.TEACHER_INPUT_SIZE} px (cacheable)"
    if cfg.MODEL.VILD.IMAGE_DISTILL_WEIGHT <= 0:
        return "0"
    n = cfg.MODEL.VILD.NUM_DISTILL_PROPOSALS * len(cfg.MODEL.VILD.CROP_SCALES)
    return f"{n} crops ({cfg.MODEL.VILD.TEACHER})"


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    preset = PRESETS[args.preset]
    os.makedirs(args.output_dir, exist_ok=True)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))

    _stage(f"1/4 world ({args.preset}): generating or reusing")
    # The world lives where train_net.py's registration (at import) looks for it:
    # $DETECTRON2_DATASETS/<prefix> (set DETECTRON2_DATASETS to put it elsewhere).
    root = os.path.join(datasets_root(), preset["prefix"])
    generate_world(root, **preset["world"])
    register_world(root, prefix=preset["prefix"])
    val_ds = f"{preset['prefix']}_val"
    val_dicts = DatasetCatalog.get(val_ds)
    metadata = MetadataCatalog.get(val_ds)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {list(MODELS)}")

    iters = args.iters if args.iters is not None else preset["iters"]
    vild_teacher = args.vild_teacher or preset["vild_teacher"]
    vild_opts: List[str] = []
    cache_wall_s = None
    if vild_teacher == "cache" and "vild" in names:
        cache_dir = os.path.abspath(os.path.join(args.output_dir, "vild_teacher"))
        _stage(f"1b/4 ViLD teacher cache: {cache_dir} (reused when done)")
        t0 = time.perf_counter()
        build_vild_cache(
            [
                "--config-file",
                MODELS["vild"].config,
                "--dataset",
                f"{preset['prefix']}_{MODELS['vild'].train_split}",
                "--output",
                cache_dir,
            ]
            + list(args.opts)
        )
        cache_wall_s = time.perf_counter() - t0
        vild_opts = ["MODEL.VILD.TEACHER", "cache", "MODEL.VILD.TEACHER_CACHE", cache_dir]

    cores = max(1, os.cpu_count() or 1)
    jobs = max(1, min(args.jobs or (2 if cores >= 2 else 1), len(names)))
    train_threads = args.threads or max(1, cores // jobs)
    runs = plan_rows(names, preset, iters, vild_opts, args.opts, args.output_dir)
    print(f"    {len(runs)} models, {jobs} at a time, {train_threads} thread(s) each", flush=True)
    train_all(runs, args.force, jobs, train_threads)

    rows = []
    vis_dir = os.path.join(args.output_dir, "predictions")
    os.makedirs(vis_dir, exist_ok=True)
    for i, (name, label, config, opts, out_dir, _) in enumerate(runs, 1):
        results = json.load(open(os.path.join(out_dir, "results.json")))
        _stage(f"3/4 [{i}/{len(names)}] time inference and visualise {label}")
        cfg, predictor = build_predictor(config, opts, out_dir)
        images = load_images([d["file_name"] for d in val_dicts[: args.timing_images]], "BGR")
        timing = time_inference(predictor, images)
        vis = visualise(predictor, val_dicts[: args.num_vis], metadata, os.path.join(vis_dir, name))
        rows.append(
            {
                "name": name,
                "label": label,
                "config": config,
                "opts": opts,
                "bbox": results["results"]["bbox"],
                "train_s_per_iter": train_seconds_per_iter(out_dir),
                "train_wall_s": results.get("train_wall_s"),
                "max_iter": cfg.SOLVER.MAX_ITER,
                "inference_ms_per_img": 1000 * timing["median_s"],
                "teacher_forwards_per_image": teacher_forwards(cfg),
                "predictions": vis,
            }
        )

    _stage("4/4 writing the comparison")
    summary = {
        "preset": args.preset,
        "command": "python tools/run_embedded_demo.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'CPU only'}",
        "world_root": root,
        "models": rows,
        "wall_s": time.perf_counter() - start,
        "threads": args.threads or os.cpu_count(),
        "train_jobs": jobs,
        "train_threads": train_threads,
        "iters": iters,
        "vild_teacher": vild_teacher if "vild" in names else None,
        "vild_teacher_cache_wall_s": cache_wall_s,
        "headline": headline_comparisons(rows),
    }
    write_outputs(summary, args.output_dir)
    print(f"Wrote {args.output_dir}/summary.json, comparison.md, comparison.png, predictions/")
    return summary
