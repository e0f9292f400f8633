"""Seeds x variants x splits on the embedded world: the study command (``tools/study.py``).

A claim about a variant is a claim over seeds and over novel/base splits, never one run. This
trains every (split, variant, seed) with ``train_net.py`` (the same runner as ``make demo``:
reused when done with the same config, resumed when killed), then writes to ``--output-dir``:

- ``study.json``: every run (AP, APr, APc, APf, ...) and the aggregates;
- ``study.md``: mean +- std per variant and split, the paired differences to ``--reference``
  (same seed, same split: mean +- std, and in how many pairs the variant is ahead), and the
  per-run table;
- ``study.png``: APr and AP of every run, per variant and split.

Examples::

    # does image-level alignment help novel classes? 3 seeds, 2 splits, the demo's schedule
    python tools/study.py --variants gridclip gridclip_no_ila --seeds 1 2 3 --splits 0 1

    # the same at 3x the iterations, plus a variant given by its overrides
    python tools/study.py --variants gridclip gridclip_no_ila --iters 900 \\
        --variant "ila2=MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT 2.0" --output-dir output/study900

Split 0 is the world of ``make demo``; splits 1 and 2 redraw which classes are novel
(``tools/make_world.py --split-seed k``; generated here when missing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from typing import Dict, List, Sequence

from detectron2.data import MetadataCatalog

from gridclip.config import get_gridclip_cfg
from gridclip.data.world import (
    REGISTERED_SPLIT_SEEDS,
    default_world_root,
    generate_world,
    generate_world_pairs,
    world_categories,
    world_prefix,
)
from gridclip.utils.io import atomic_write

from .args import DEFAULT_CONFIG
from .embedded_demo import MODELS, DemoModel, dataset_opts, schedule_opts, train_all

METRICS = ("AP", "APr", "APc", "APf", "AP50", "APs", "APm", "APl")


def fill_run_fields(value: str, seed: int, split: int) -> str:
    """An override value with ``{seed}`` and ``{split}`` replaced by the run's (e.g. a file made
    per seed: ``MODEL.GRIDCLIP.PAIRS_PSEUDO_BOXES output/labels/s{seed}.json``)."""
    return value.replace("{seed}", str(seed)).replace("{split}", str(split))


def parse_variant(text: str) -> tuple:
    """``NAME=KEY VALUE ...`` or ``NAME@CONFIG=KEY VALUE ...`` (overrides of the world config)."""
    name, sep, overrides = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(
            f"--variant {text!r}: expected NAME=KEY VALUE ... (e.g. "
            "'ila2=MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT 2.0')"
        )
    name, _, config = name.strip().partition("@")
    opts = shlex.split(overrides)
    if len(opts) % 2:
        raise argparse.ArgumentTypeError(
            f"--variant {text!r}: overrides must be KEY VALUE pairs, got {len(opts)} items"
        )
    if not name.replace("_", "").replace("-", "").isalnum():
        raise argparse.ArgumentTypeError(f"--variant name {name!r} must be a plain folder name")
    return name, DemoModel(name, config or DEFAULT_CONFIG, tuple(opts))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--variants",
        nargs="*",
        default=["gridclip", "gridclip_no_ila"],
        help=f"rows of the demo's table: {', '.join(MODELS)}",
    )
    p.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        default=[],
        metavar="NAME[@CONFIG]=OVERRIDES",
        help="a further variant: overrides of embedded/GridCLIP_world.yaml (or of CONFIG); "
        "{seed} and {split} in a value become the run's",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument(
        "--preset", default="demo", choices=["demo", "ci"], help="world (ci: the tiny test one)"
    )
    p.add_argument(
        "--splits",
        nargs="+",
        type=int,
        default=[0],
        help=f"novel/base splits of the world: 0 (the demo's) or {list(REGISTERED_SPLIT_SEEDS)}",
    )
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help="training iterations (learning-rate steps at 73%% and 90%%, as the configs' 300); "
        "default: the configs' schedule",
    )
    p.add_argument("--reference", default=None, help="variant the others are compared with")
    p.add_argument("--output-dir", default="output/study")
    p.add_argument("--jobs", type=int, default=None, help="trainings at a time (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training")
    p.add_argument("--force", action="store_true", help="retrain runs that are done")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run")
    args = p.parse_args(argv)
    if args.iters is not None and args.iters < 10:
        p.error(f"--iters must be at least 10, got {args.iters}")
    if args.jobs is not None and args.jobs < 1:
        p.error(f"--jobs must be positive, got {args.jobs}")
    if args.threads < 1:
        p.error(f"--threads must be positive, got {args.threads}")
    allowed = {0, *REGISTERED_SPLIT_SEEDS} if args.preset == "demo" else {0}
    bad = [k for k in args.splits if k not in allowed]
    if bad:
        p.error(f"--splits {bad}: train_net.py registers splits {sorted(allowed)} only")
    return args


def plan_runs(
    variants: Dict[str, DemoModel], seeds, splits, iters, extra_opts, output_dir, preset="demo"
):
    """One ``(run, meta)`` per (split, variant, seed): ``run`` in the tuple format of
    ``train_all``, ``meta`` = {variant, split, seed}."""
    runs = []
    for split in splits:
        prefix = world_prefix(preset, split)
        for name, model in variants.items():
            for seed in seeds:
                own = [fill_run_fields(o, seed, split) for o in model.opts]
                opts = dataset_opts(prefix, model) + own + ["SEED", str(seed)]
                opts += schedule_opts(iters) + list(extra_opts)
                out_dir = os.path.join(output_dir, f"split{split}", name, f"s{seed}")
                label = f"{name} split {split} seed {seed}"
                max_iter = get_gridclip_cfg(model.config, opts).SOLVER.MAX_ITER
                run = (name, label, model.config, opts, out_dir, max_iter)
                runs.append((run, {"variant": name, "split": split, "seed": seed}))
    return runs


def generate_run_pairs(runs) -> List[str]:
    """Generate (or reuse: cached) the embedded world's image-text pairs that a planned run
    trains on (``PAIRS_LOSS_WEIGHT`` > 0 and a world pairs set in ``DATASETS.PAIRS_TRAIN``), so
    that a pairs variant runs on a fresh machine; returns the world roots whose pairs it made."""
    roots = set()
    for (_, _, config, opts, _, _), _ in runs:
        cfg = get_gridclip_cfg(config, opts)
        if cfg.MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT > 0:
            for name in cfg.DATASETS.PAIRS_TRAIN:
                root = MetadataCatalog.get(name).get("world_root", None)
                if root:
                    roots.add(root)
    for root in sorted(roots):
        print(f"==> image-text pairs of the world at {root}", flush=True)
        generate_world_pairs(root, progress=True)
    return sorted(roots)


def _mean_std(values: Sequence[float]) -> Dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def aggregate(records: List[Dict], reference: str | None) -> Dict:
    """Mean +- std (sample std) per (variant, split) and metric; paired differences (same split
    and seed) of every variant to ``reference``: mean +- std and how many pairs are ahead."""
    groups: Dict[tuple, List[Dict]] = {}
    for r in records:
        groups.setdefault((r["variant"], r["split"]), []).append(r)
    summary = []
    for (variant, split), rs in groups.items():
        entry = {"variant": variant, "split": split}
        for m in METRICS:
            values = [r["bbox"][m] for r in rs if m in r["bbox"]]
            if values:
                entry[m] = _mean_std(values)
        summary.append(entry)
    paired = []
    if reference is not None:
        ref = {(r["split"], r["seed"]): r["bbox"] for r in records if r["variant"] == reference}
        for (variant, split), rs in groups.items():
            if variant == reference:
                continue
            pairs = [(r["bbox"], ref[(split, r["seed"])]) for r in rs if (split, r["seed"]) in ref]
            if not pairs:
                continue
            entry = {"variant": variant, "reference": reference, "split": split}
            for m in ("AP", "APr", "APc", "APf"):
                diffs = [a[m] - b[m] for a, b in pairs]
                entry[m] = {**_mean_std(diffs), "ahead": sum(d > 0 for d in diffs)}
            paired.append(entry)
    return {"summary": summary, "paired": paired}


def _fmt(stat) -> str:
    return "–" if stat is None else f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def write_report(records, agg, args_line, output_dir) -> str:
    lines = [
        "# Study on the embedded world",
        "",
        f"`{args_line}`",
        "",
        "Mean ± sample std over seeds (n runs):",
        "",
        "| variant | split | n | AP | APr | APc | APf |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in agg["summary"]:
        n = e["AP"]["n"] if "AP" in e else 0
        cells = " | ".join(_fmt(e.get(m)) for m in ("AP", "APr", "APc", "APf"))
        lines.append(f"| {e['variant']} | {e['split']} | {n} | {cells} |")
    if agg["paired"]:
        lines += [
            "",
            "Paired differences to the reference (same split and seed): mean ± std, and in how "
            "many pairs the variant is ahead:",
            "",
            "| variant - reference | split | ΔAP | ΔAPr | ΔAPc | ΔAPf |",
            "|---|---|---|---|---|---|",
        ]
        for e in agg["paired"]:
            cells = " | ".join(
                f"{e[m]['mean']:+.1f} ± {e[m]['std']:.1f} ({e[m]['ahead']}/{e[m]['n']} ahead)"
                for m in ("AP", "APr", "APc", "APf")
            )
            lines.append(f"| {e['variant']} - {e['reference']} | {e['split']} | {cells} |")
    lines += [
        "",
        "Every run (AP / APr / APc / APf):",
        "",
        "| variant | split | seed | AP | APr | APc | APf | folder |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        b = r["bbox"]
        lines.append(
            f"| {r['variant']} | {r['split']} | {r['seed']} | {b['AP']:.1f} | {b['APr']:.1f} "
            f"| {b['APc']:.1f} | {b['APf']:.1f} | `{r['out_dir']}` |"
        )
    md = "\n".join(lines) + "\n"
    with atomic_write(os.path.join(output_dir, "study.md"), "w") as f:
        f.write(md)
    return md


def plot(records, output_dir) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["variant"], r["split"]) for r in records}, key=lambda k: (k[1], k[0]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(keys) + 2.0), sharey=True)
    for ax, metric in zip(axes, ("APr", "AP")):
        for y, key in enumerate(keys):
            values = [r["bbox"][metric] for r in records if (r["variant"], r["split"]) == key]
            ax.scatter(values, [y] * len(values), color=f"C{key[1] % 10}", s=40, alpha=0.8)
            ax.plot([sum(values) / len(values)] * 2, [y - 0.3, y + 0.3], color="k")
        ax.set_xlabel(f"{metric} (dots: seeds; bar: mean)")
        ax.grid(alpha=0.3)
    axes[0].set_yticks(range(len(keys)))
    axes[0].set_yticklabels([f"{v} (split {s})" for v, s in keys])
    fig.suptitle("Embedded world: every run of the study")
    fig.tight_layout()
    path = os.path.join(output_dir, "study.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> Dict:
    args = parse_args(argv)
    start = time.perf_counter()
    variants: Dict[str, DemoModel] = {}
    for name in args.variants:
        if name not in MODELS:
            raise SystemExit(f"unknown variant {name!r}; choose from {list(MODELS)} or --variant")
        variants[name] = MODELS[name]
    for name, model in args.variant:
        if name in variants:
            raise SystemExit(f"variant {name!r} is given twice")
        variants[name] = model
    if not variants:
        raise SystemExit("no variants to run (--variants and --variant are empty)")
    reference = args.reference or next(iter(variants))
    if reference not in variants:
        raise SystemExit(f"--reference {reference!r} is not one of the variants {list(variants)}")

    for split in args.splits:
        novel = [c["name"] for c in world_categories(split) if c["frequency"] == "r"]
        print(f"==> world split {split}: novel classes {', '.join(novel)}", flush=True)
        root = default_world_root(args.preset, split)
        generate_world(root, preset=args.preset, split_seed=split, progress=True)

    os.makedirs(args.output_dir, exist_ok=True)
    runs = plan_runs(
        variants, args.seeds, args.splits, args.iters, args.opts, args.output_dir, args.preset
    )
    generate_run_pairs(runs)
    jobs = args.jobs or min(2, len(runs))
    print(f"==> {len(runs)} runs, {jobs} at a time, {args.threads} thread(s) each", flush=True)
    train_all([run for run, _ in runs], args.force, jobs, args.threads, stage="train + evaluate")

    records = []
    for (name, label, config, opts, out_dir, max_iter), meta in runs:
        results = json.load(open(os.path.join(out_dir, "results.json")))
        records.append(
            {
                **meta,
                "max_iter": max_iter,
                "config": config,
                "opts": opts,
                "out_dir": out_dir,
                "bbox": results["results"]["bbox"],
                "train_wall_s": results.get("train_wall_s"),
            }
        )
    agg = aggregate(records, reference)
    args_line = "python tools/study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = write_report(records, agg, args_line, args.output_dir)
    out = {"command": args_line, "runs": records, **agg, "wall_s": time.perf_counter() - start}
    with atomic_write(os.path.join(args.output_dir, "study.json"), "w") as f:
        json.dump(out, f, indent=2)
    plot(records, args.output_dir)
    print("\n" + md)
    print(f"Wrote {args.output_dir}/study.json, study.md, study.png")
    return out
