"""Training of the small CLIP (``tools/train_small_clip.py``): the losses, the loop, the report.

The loss is CLIP's symmetric InfoNCE with multiple positives (two captions naming the same set of
classes are both right for each other's images) plus the image-to-text cross-entropy against one
prompt of every class (the "vocabulary loss"), so each step contrasts every view with all 48
names. The scene pool (:mod:`gridclip_tools.small_clip_data`) is a ring buffer refreshed during
training (2,500 scenes held, ~8,500 seen); convolutions run channels-last under bf16 autocast.
The result is written in the shipped format by :mod:`gridclip.clip.small_clip`.

    python tools/train_small_clip.py                      # the shipped recipe
    python tools/train_small_clip.py --steps 200 --output /tmp/clip.pt   # a quick try

Writes (atomically) the fp16 OpenAI-format state dict (``--output``, default
``projects/GridCLIP/gridclip/assets/world_clip.pt``), ``<output stem>.json`` with the recipe,
times and zero-shot accuracy per class, and a Markdown report (``--report-md``).
Deterministic for a seed on a given machine and thread count.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from typing import Dict, Optional, Sequence

import clip
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gridclip.clip.small_clip import (
    SMALL_CLIP_ARCH,
    SMALL_CLIP_WEIGHTS,
    build_small_clip,
    fp16_state_dict,
    save_state_dict_atomic,
)
from gridclip.data.world import world_categories
from gridclip.utils.io import atomic_write
from gridclip_tools.args import non_negative_int, positive_float, positive_int

from . import REPO_ROOT
from .small_clip_data import ScenePool, caption_for
from .small_clip_eval import evaluate_small_clip, zero_shot_accuracy

logger = logging.getLogger(__name__)

__all__ = [
    "multi_positive_clip_loss",
    "vocabulary_loss",
    "train_small_clip",
    "markdown_report",
    "parse_args",
    "main",
]


def multi_positive_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    keys: Sequence[frozenset],
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE where pairs with equal keys are all positives.

    Args:
        image_features, text_features: (B, D) unnormalised embeddings.
        logit_scale: log of the temperature's inverse (CLIP's parameter), a scalar.
        keys: B hashable labels (the named class sets).
    """
    assert image_features.shape == text_features.shape, (
        f"image/text feature shapes differ: {tuple(image_features.shape)} vs "
        f"{tuple(text_features.shape)}"
    )
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale.exp().clamp(max=100) * img @ txt.t()
    ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    label = torch.tensor([ids[k] for k in keys])
    positives = (label[:, None] == label[None, :]).float()
    targets = positives / positives.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def vocabulary_loss(
    image_features: torch.Tensor,
    class_text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    keys: Sequence[frozenset],
) -> torch.Tensor:
    """Cross-entropy of each view against all class prompts; targets uniform over the classes
    its caption names.

    Args:
        image_features: (B, D); class_text_features: (C, D), row c-1 = class c.
        keys: B sets of 1-based class ids.
    """
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(class_text_features.float(), dim=-1)
    logits = logit_scale.exp().clamp(max=100) * img @ txt.t()
    targets = torch.zeros_like(logits)
    for i, k in enumerate(keys):
        targets[i, [c - 1 for c in k]] = 1.0 / len(k)
    return F.cross_entropy(logits, targets)


# ------------------------------------------------------------------------------------ training
def train_small_clip(
    output: str,
    *,
    steps: int = 3000,
    batch_size: int = 128,
    seed: int = 0,
    pool_scenes: int = 2500,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: int = 100,
    crop_fraction: float = 0.7,
    vocabulary_loss_weight: float = 1.0,
    refresh_every: int = 10,
    refresh_count: int = 20,
    bf16: bool = True,
    eval_per_class: int = 50,
    eval_every: int = 0,
    progress: bool = True,
    arch_overrides: Optional[Dict] = None,
) -> Dict:
    """Train the small CLIP on the world, save it (fp16, atomic) and return its report.

    Loss: :func:`multi_positive_clip_loss` over the batch's captions, plus (weighted by
    ``vocabulary_loss_weight``) the same image-to-text cross-entropy against one prompt per
    class of the whole vocabulary (random template each step), so every step contrasts each
    view with all 48 class names, not only with the classes that happen to be in the batch.

    The report has the architecture, the recipe, the training time, the file size, the
    zero-shot accuracy (per class, novel mean) of the *saved* fp16 weights and the scene
    retrieval mAP. Deterministic for a seed on a given machine and thread count.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    t0 = time.perf_counter()
    pool = ScenePool(pool_scenes, seed=seed, progress=progress)
    render_s = time.perf_counter() - t0
    logger.info(f"Rendered {pool_scenes} scenes ({len(pool.obj_scene)} objects) in {render_s:.0f}s")

    model = build_small_clip(**(arch_overrides or {}))
    model.train()
    model.visual.to(memory_format=torch.channels_last)  # ~30% faster convolutions on CPU
    names = pool.names
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.ndim >= 2 and "embedding" not in name
        (decay if is_matrix else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    iterator = range(steps)
    bar = None
    if progress:
        iterator = bar = tqdm(iterator, desc="training small CLIP", unit="step")
    losses, curve = [], []
    t1 = time.perf_counter()
    for step in iterator:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        if refresh_every and step and step % refresh_every == 0:
            pool.refresh(refresh_count)
        images, captions, keys = pool.sample_batch(rng, batch_size, crop_fraction)
        vocabulary = [caption_for([c], rng, names) for c in range(1, len(names) + 1)]
        tokens = clip.tokenize(captions + vocabulary, context_length=model.context_length)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            image_features = model.encode_image(
                images.contiguous(memory_format=torch.channels_last)
            )
            text_features = model.encode_text(tokens)
        loss = multi_positive_clip_loss(
            image_features, text_features[:batch_size], model.logit_scale, keys
        )
        if vocabulary_loss_weight > 0:
            loss = loss + vocabulary_loss_weight * vocabulary_loss(
                image_features, text_features[batch_size:], model.logit_scale, keys
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        if bar is not None and step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            quick = zero_shot_accuracy(model, 10, seed=seed + 999)  # its own renders and rng
            model.train()
            curve.append(
                {
                    "step": step + 1,
                    "loss": float(np.mean(losses[-50:])),
                    **{k: quick[k] for k in ("overall", "novel_mean")},
                    "min": quick["min_class"],
                }
            )
            logger.info(f"step {step + 1}: {curve[-1]}")
    train_s = time.perf_counter() - t1

    save_state_dict_atomic(fp16_state_dict(model), output)
    evaluation = evaluate_small_clip(output, eval_per_class)
    arch = {k: (list(v) if isinstance(v, tuple) else v) for k, v in SMALL_CLIP_ARCH.items()}
    arch["transformer_heads"] = arch["transformer_width"] // 64
    return {
        "weights": os.path.basename(output),
        "file_bytes": os.path.getsize(output),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "architecture": arch,
        "recipe": {
            "steps": steps,
            "batch_size": batch_size,
            "seed": seed,
            "pool_scenes": pool_scenes,
            "pool_objects": int(len(pool.obj_scene)),
            "lr": lr,
            "weight_decay": weight_decay,
            "warmup": warmup,
            "crop_fraction": crop_fraction,
            "vocabulary_loss_weight": vocabulary_loss_weight,
            "refresh": f"{refresh_count} new scenes every {refresh_every} steps",
            "scenes_seen": int(pool.num_rendered),
            "bf16_autocast": bf16,
            "torch_threads": torch.get_num_threads(),
        },
        "time_s": {"render": round(render_s, 1), "train": round(train_s, 1)},
        "final_loss": float(np.mean(losses[-50:])),
        "curve": curve,
        "final_logit_scale": float(model.logit_scale.exp()),
        **evaluation,
    }


# ---------------------------------------------------------------------------------- command line
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
    p.add_argument("--steps", type=positive_int, default=3000)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pool-scenes", type=positive_int, default=2500, help="pre-rendered 256 px scenes"
    )
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--crop-fraction", type=float, default=0.7, help="object crops vs scene views")
    p.add_argument(
        "--no-bf16",
        action="store_true",
        help="train in float32 (bf16 autocast: " "~1.4x faster on CPUs with AVX512-BF16)",
    )
    p.add_argument(
        "--eval-every", type=non_negative_int, default=500, help="quick zero-shot check (0: off)"
    )
    p.add_argument("--vocabulary-loss-weight", type=float, default=1.0)
    p.add_argument("--vision-layers", type=int, nargs=4, default=None, help="override the arch")
    p.add_argument(
        "--eval-per-class", type=positive_int, default=50, help="held-out renders per class"
    )
    p.add_argument(
        "--threads",
        type=positive_int,
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
    with atomic_write(json_path, "w") as f:
        json.dump(report, f, indent=2)
    if args.report_md:
        with atomic_write(args.report_md, "w") as f:
            f.write(markdown_report(report))
    zs = report["zero_shot"]
    print(
        f"wrote {args.output} ({report['file_bytes'] / 1e6:.1f} MB) and {json_path}: zero-shot "
        f"{100 * zs['overall']:.1f}% overall, novel {100 * zs['novel_mean']:.1f}%, worst "
        f"{zs['min_class']['name']} {100 * zs['min_class']['accuracy']:.1f}%, scene mAP "
        f"{100 * report['scene_retrieval']['map_named']:.1f}%; "
        f"train {report['time_s']['train']:.0f} s"
    )
    return 0
