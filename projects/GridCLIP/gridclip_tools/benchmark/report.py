"""Headline ratios of a benchmark run and its report: results.json, results.md (tables) and
benchmark.png (scaling plots).

The project's targets for these ratios are recorded in ``docs/BENCHMARKS.md`` (section
*Targets*), not here: the report gives the measured ratios, the docs say what they are held to.
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Dict, List, Optional

from .specs import INFERENCE_MODELS, image_size_for_short_side

__all__ = [
    "jsonable",
    "PAIRED_RATIOS",
    "compute_paired_ratios",
    "compute_ratios",
    "markdown_report",
    "write_plot",
    "write_report",
]


def jsonable(x):
    """``x`` with tuples as lists and anything not JSON-native as its ``str``."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
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


def _batch_ms(records, model, batch_size, field="median_ms"):
    """ms per image of ``model`` at ``batch_size`` in the throughput suite."""
    per_image = "ms_per_image" if field == "median_ms" else "cpu_ms_per_image"
    for r in records:
        if r["suite"] == "batch" and r["model"] == model and r.get("batch_size") == batch_size:
            return r.get(per_image)
    return None


def _ratio(a, b):
    return a / b if (a is not None and b is not None and b > 0) else None


#: The main suite's speed ratios also reported paired (:func:`compute_paired_ratios`):
#: name -> (numerator model, denominator model).
PAIRED_RATIOS = {
    "inference_speedup_gridclip_vs_vild": ("vild", "gridclip"),
    "inference_gridclip_over_retinanet_80": ("gridclip", "retinanet_80"),
    "inference_speedup_gridclip_head256x4_vs_vild": ("vild", "gridclip_head256x4"),
    "inference_speedup_gridclip_vs_vild_fpn128": ("vild_fpn128", "gridclip"),
    "inference_speedup_gridclip_head128x2_objtop1000_vs_vild": (
        "vild",
        "gridclip_head128x2_objtop1000",
    ),
}


def compute_paired_ratios(results: Dict) -> Dict[str, Optional[float]]:
    """:data:`PAIRED_RATIOS` as the median over rounds of each round's ratio of CPU times.

    The main suite runs its models round-robin (one run of each per round), so the two runs
    of a round see the same state of a shared machine. On a noisy one (the same inference's
    CPU time varied 2x between rounds on the 2-core machine of docs/BENCHMARKS.md's seventh
    pass) the ratio of each round is steadier than the ratio of two medians taken over
    different rounds. None where a model was not run.
    """
    main = {r["model"]: r.get("cpu_times_ms") for r in results["inference"] if r["suite"] == "main"}
    paired: Dict[str, Optional[float]] = {}
    for name, (top, bottom) in PAIRED_RATIOS.items():
        a, b = main.get(top), main.get(bottom)
        rounds = [x / y for x, y in zip(a or (), b or ()) if y > 0]
        paired[name] = float(statistics.median(rounds)) if rounds else None
    return paired


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
        # against ViLD with GridCLIP's 128-channel FPN (a fairness check, not a config)
        "inference_speedup_gridclip_vs_vild_fpn128": _ratio(t["vild_fpn128"], t["gridclip"]),
        # RetinaNet's head (256 x 4), the configs' until issue 13's eighth pass
        "inference_speedup_gridclip_head256x4_vs_vild": _ratio(t["vild"], t["gridclip_head256x4"]),
        f"inference_speedup_gridclip_vs_retinanet_{k}": _ratio(t["retinanet"], t["gridclip"]),
        "inference_gridclip_1x1_over_retinanet_80": _ratio(t["gridclip_1x1"], t["retinanet_80"]),
        "inference_gridclip_1x1_over_gridclip": _ratio(t["gridclip_1x1"], t["gridclip"]),
        "inference_speedup_gridclip_1x1_vs_vild": _ratio(t["vild"], t["gridclip_1x1"]),
        "inference_gridclip_top1000_over_gridclip": _ratio(t["gridclip_top1000"], t["gridclip"]),
        "inference_speedup_gridclip_top1000_vs_vild": _ratio(t["vild"], t["gridclip_top1000"]),
        "inference_gridclip_bf16_over_gridclip": _ratio(t["gridclip_bf16"], t["gridclip"]),
        "inference_speedup_gridclip_all_locations_vs_vild": _ratio(
            t["vild"], t["gridclip_all_locations"]
        ),
        **{  # the head's share: against the same model with the configs' head, every location
            f"inference_{m}_over_gridclip_all_locations": _ratio(t[m], t["gridclip_all_locations"])
            for m in ("gridclip_head256x2", "gridclip_head128x4", "gridclip_head128x2")
        },
        "inference_speedup_gridclip_head128x2_vs_vild": _ratio(t["vild"], t["gridclip_head128x2"]),
        "inference_speedup_gridclip_head128x2_top1000_vs_vild": _ratio(
            t["vild"], t["gridclip_head128x2_top1000"]
        ),
        # the same gates ranked by the detached objectness ranker (accuracy-preserving)
        "inference_speedup_gridclip_objtop1000_vs_vild": _ratio(
            t["vild"], t["gridclip_objtop1000"]
        ),
        "inference_speedup_gridclip_head128x2_objtop1000_vs_vild": _ratio(
            t["vild"], t["gridclip_head128x2_objtop1000"]
        ),
        # a reference row (its own input, 1024x1024), never the same-trunk comparison
        "inference_speedup_gridclip_vs_vild_published": _ratio(t["vild_published"], t["gridclip"]),
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
    for m in s.get("batch_models", ()):
        batch = sorted(set(s.get("batch_sizes", ())))
        if len(batch) > 1:
            per = {b: _batch_ms(inf, m, b, field) for b in batch}
            ratios[f"throughput_{m}_batch{batch[-1]}_over_batch{batch[0]}"] = _ratio(
                per[batch[0]], per[batch[-1]]
            )
    if {"gridclip", "vild"} <= set(s.get("batch_models", ())) and s.get("batch_sizes"):
        b = max(s["batch_sizes"])
        ratios[f"throughput_gridclip_over_vild_batch{b}"] = _ratio(
            _batch_ms(inf, "vild", b, field), _batch_ms(inf, "gridclip", b, field)
        )
    vocab = sorted(set(s["vocab_sizes"]))
    if len(vocab) > 1:
        lo = vocab[0]
        for m in s["vocab_models"]:
            for hi in vocab[1:]:  # from the smallest to every larger vocabulary
                ratios[f"vocab_growth_{m}_{lo}_to_{hi}"] = _ratio(
                    _point(inf, m, hi, size, "vocab", field),
                    _point(inf, m, lo, size, "vocab", field),
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
    exported = {r["runtime"]: r.get(field) for r in inf if r["suite"] == "export"}
    for fmt in s.get("export_formats") or ():
        ratios[f"inference_gridclip_{fmt}_over_eager"] = _ratio(
            exported.get(fmt), exported.get("eager")
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
        }
    )
    return ratios


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
        "one torch thread, what the run costs regardless of other processes' load). Speed-ups "
        "> 1 favour GridCLIP; the project's targets for these ratios are in docs/BENCHMARKS.md.",
        "",
        "| ratio | wall | CPU |",
        "|---|---|---|",
    ]
    ratios_cpu = results.get("ratios_cpu") or {}
    for k, v in results["ratios"].items():
        lines.append(f"| `{k}` | {_fmt(v, 2)} | {_fmt(ratios_cpu.get(k), 2)} |")
    paired = {k: v for k, v in (results.get("ratios_paired_cpu") or {}).items() if v is not None}
    if paired:
        lines += [
            "",
            "Paired (CPU): the median over rounds of each round's ratio (the models of a round "
            "run back to back, so they share the machine's state):",
            "",
            "| ratio | paired CPU |",
            "|---|---|",
        ]
        lines += [f"| `{k}` | {_fmt(v, 2)} |" for k, v in paired.items()]

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
    batch = [r for r in results["inference"] if r["suite"] == "batch"]
    if batch:
        lines += [
            "",
            "## Throughput (one forward of N copies of the main image)",
            "",
            "| model | batch | images/s (wall) | images/s (CPU) | CPU ms/img | peak mem MiB |",
            "|---|---|---|---|---|---|",
        ]
        for r in batch:
            lines.append(
                f"| {r['label']} | {r['batch_size']} | {_fmt(r.get('images_per_s'), 3)} | "
                f"{_fmt(r.get('cpu_images_per_s'), 3)} | {_fmt(r.get('cpu_ms_per_image'))} | "
                f"{_fmt(r.get('peak_memory_mib'), 0)} |"
            )
    lines += _export_table(results)
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


def _export_table(results) -> List[str]:
    """The export suite: eager vs exported GridCLIP, with each export's cost and fidelity."""
    rows = [r for r in results["inference"] if r["suite"] == "export"]
    if not rows:
        return []
    eager = next((r.get("median_ms") for r in rows if r["runtime"] == "eager"), None)
    lines = [
        "",
        "## Export (the configs' GridCLIP: tools/export.py's graph vs eager, interleaved)",
        "",
        "| runtime | ms/img (median) | CPU ms/img | vs eager (wall) | peak mem MiB | export s "
        "| file MiB | detections | vs eager: unmatched, max box / score diff (matched) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['runtime']} | {r['skipped']} | | | | | | | |")
            continue
        diff = r.get("vs_eager")
        fidelity = (
            f"{diff['unmatched']}, {diff['max_box_diff']:.2g} px / {diff['max_score_diff']:.2g}"
            f" (count diff {diff['count_diff']})"
            if diff
            else "–"
        )
        lines.append(
            f"| {r['runtime']} | {_fmt(r['median_ms'])} | {_fmt(r.get('cpu_median_ms'))} | "
            f"{_fmt(_ratio(r['median_ms'], eager), 2)} | {_fmt(r.get('peak_memory_mib'), 0)} | "
            f"{_fmt(r.get('export_s'))} | {_fmt(r.get('file_mib'))} | "
            f"{_fmt(r.get('num_detections'))} | {fidelity} |"
        )
    return lines


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
        json.dump(jsonable(results), f, indent=2)
    with open(paths["markdown"], "w") as f:
        f.write(markdown_report(results))
    write_plot(results, paths["plot"])
    return paths
