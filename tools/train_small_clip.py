#!/usr/bin/env python
"""Train the embedded default's small CLIP on the generated world and write its report.

    python tools/train_small_clip.py                      # the shipped recipe
    python tools/train_small_clip.py --steps 200 --output /tmp/clip.pt   # a quick try

Writes (atomically) the fp16 OpenAI-format state dict (``--output``, default
``projects/GridCLIP/gridclip/assets/world_clip.pt``), ``<output stem>.json`` with the recipe,
times and zero-shot accuracy per class, and a Markdown report (``--report-md``).
Deterministic for a seed on a given machine and thread count.
"""

import argparse
import json
import logging
import os
import sys

import torch

from gridclip.clip.small_clip import SMALL_CLIP_WEIGHTS, evaluate_small_clip, train_small_clip
from gridclip.data.world import world_categories

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", default=SMALL_CLIP_WEIGHTS, help="state-dict file to write")
    p.add_argument(
        "--report-md",
        default=os.path.join(REPO_ROOT, "docs", "small_clip.md"),
        help="Markdown report to write ('' to skip)",
    )
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="re-evaluate --output and rewrite its reports (keeps the recipe/times)",
    )
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool-scenes", type=int, default=2500, help="pre-rendered 256 px scenes")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--crop-fraction", type=float, default=0.7, help="object crops vs scene views")
    p.add_argument(
        "--no-bf16",
        action="store_true",
        help="train in float32 (bf16 autocast: " "~1.4x faster on CPUs with AVX512-BF16)",
    )
    p.add_argument("--eval-every", type=int, default=500, help="quick zero-shot check (0: off)")
    p.add_argument("--vocabulary-loss-weight", type=float, default=1.0)
    p.add_argument("--vision-layers", type=int, nargs=4, default=None, help="override the arch")
    p.add_argument("--eval-per-class", type=int, default=50, help="held-out renders per class")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is fastest on a shared 2-core machine: 2 threads "
        "there made a step ~10x slower)",
    )
    return p.parse_args(argv)


def markdown_report(report: dict) -> str:
    zs, rec, arch = report["zero_shot"], report["recipe"], report["architecture"]
    freq = {c["name"].replace("_", " "): c["frequency"] for c in world_categories()}
    lines = [
        "# The embedded small CLIP",
        "",
        "Written by `tools/train_small_clip.py` (do not edit by hand). OpenAI's "
        "`clip.model.CLIP` with a ModifiedResNet vision tower, trained contrastively on "
        "image-caption pairs rendered by the world's renderer (object crops and whole-scene "
        "views, all 48 classes including the 10 novel ones).",
        "",
        f"- Weights: `projects/GridCLIP/gridclip/assets/{report['weights']}` "
        f"({report['file_bytes'] / 1e6:.1f} MB, fp16, {report['num_parameters'] / 1e6:.2f} M "
        "parameters; load with `clip.model.build_model(torch.load(path))`)",
        f"- Architecture: embed_dim {arch['embed_dim']}, image_resolution "
        f"{arch['image_resolution']}, vision_layers {tuple(arch['vision_layers'])}, vision_width "
        f"{arch['vision_width']} (res5 = {arch['vision_width'] * 32} channels), context_length "
        f"{arch['context_length']}, transformer width {arch['transformer_width']} x "
        f"{arch['transformer_layers']} layers",
        f"- Recipe: {rec['steps']} steps of batch {rec['batch_size']}, AdamW lr {rec['lr']}, "
        f"seed {rec['seed']}, {rec['pool_scenes']} pre-rendered scenes ({rec['pool_objects']} "
        f"objects), {rec['torch_threads']} torch thread(s)",
        f"- Time: rendering {report['time_s']['render']:.0f} s, training "
        f"{report['time_s']['train']:.0f} s, evaluation {report['eval_s']:.0f} s; "
        f"final loss {report['final_loss']:.3f}, logit scale {report['final_logit_scale']:.1f}",
        "",
        "## Zero-shot accuracy",
        "",
        f"Held-out single-object renders ({zs['num_per_class']} per class, objects 12-110 px "
        f"in 256 px scenes, cropped 1.25x), prompt `{zs['prompt']}`, 48-way.",
        "",
        f"- Overall: **{100 * zs['overall']:.1f}%**; novel (r) mean {100 * zs['novel_mean']:.1f}%, "
        f"base (f+c) mean {100 * zs['base_mean']:.1f}%; worst class {zs['min_class']['name']} "
        f"{100 * zs['min_class']['accuracy']:.1f}%",
        "- Scene retrieval (whole 256 px scenes, classes ranked by the cosine of the image "
        "embedding to each prompt; mean over scenes of the AP): "
        + "; ".join(
            f"at {k[3:]} px mAP {100 * v['map_named']:.1f}% over the objects big enough to "
            f"recognise at 64 px (>= 28 px), {100 * v['map_all']:.1f}% over all annotated objects"
            for k, v in report["scene_retrieval"].items()
            if k.startswith("at_")
        ),
        "- By object size (longer side of the visible box in the 256 px scene): "
        + ", ".join(
            f"{k}: {100 * v['accuracy']:.1f}% ({v['count']})"
            for k, v in zs.get("by_object_size", {}).items()
        ),
        "",
        "| class | frequency | accuracy |",
        "|---|---|---|",
    ]
    for name, acc in sorted(zs["per_class"].items()):
        lines.append(f"| {name} | {freq[name]} | {100 * acc:.0f}% |")
    if report.get("curve"):
        lines += ["", "## Training curve (quick checks, 10 renders per class)", ""]
        lines += ["| step | loss | zero-shot | novel mean | worst class |", "|---|---|---|---|---|"]
        for c in report["curve"]:
            lines.append(
                f"| {c['step']} | {c['loss']:.3f} | {100 * c['overall']:.1f}% | "
                f"{100 * c['novel_mean']:.1f}% | "
                f"{c['min']['name']} {100 * c['min']['accuracy']:.0f}% |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    torch.set_num_threads(args.threads)
    json_path = os.path.splitext(args.output)[0] + ".json"
    if args.eval_only:
        with open(json_path) as f:
            report = json.load(f)
        report.update(evaluate_small_clip(args.output, args.eval_per_class))
    else:
        report = train_small_clip(
            args.output,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            pool_scenes=args.pool_scenes,
            lr=args.lr,
            crop_fraction=args.crop_fraction,
            bf16=not args.no_bf16,
            eval_every=args.eval_every,
            vocabulary_loss_weight=args.vocabulary_loss_weight,
            arch_overrides=(
                {"vision_layers": tuple(args.vision_layers)} if args.vision_layers else None
            ),
            eval_per_class=args.eval_per_class,
            progress=True,
        )
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, json_path)
    if args.report_md:
        tmp = args.report_md + ".tmp"
        with open(tmp, "w") as f:
            f.write(markdown_report(report))
        os.replace(tmp, args.report_md)
    zs = report["zero_shot"]
    print(
        f"wrote {args.output} ({report['file_bytes'] / 1e6:.1f} MB) and {json_path}: zero-shot "
        f"{100 * zs['overall']:.1f}% overall, novel {100 * zs['novel_mean']:.1f}%, worst "
        f"{zs['min_class']['name']} {100 * zs['min_class']['accuracy']:.1f}%, scene mAP "
        f"{100 * report['scene_retrieval']['map_named']:.1f}%; "
        f"train {report['time_s']['train']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
