"""Evaluations of the small CLIP: zero-shot classification of held-out renders and multi-label
scene retrieval, on exactly what ships (the fp16 file loaded with ``build_model``)."""

from __future__ import annotations

import os
import time
from typing import Dict, Sequence, Tuple

import clip
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from gridclip.clip.dense import attnpool_pooled, modified_resnet_features
from gridclip.clip.small_clip import load_small_clip
from gridclip.data.world import class_names, render_scene, world_categories

from .small_clip_data import ScenePool, normalize_clip_images

__all__ = [
    "ZERO_SHOT_PROMPT",
    "encode_class_prompts",
    "render_object_crops",
    "zero_shot_accuracy",
    "scene_retrieval_map",
    "evaluate_small_clip",
]

#: The prompt of the zero-shot evaluation.
ZERO_SHOT_PROMPT = "a photo of a {}."


@torch.no_grad()
def encode_class_prompts(model, names: Sequence[str], template: str = ZERO_SHOT_PROMPT):
    """(C, D) L2-normalised text embeddings of ``template.format(name)``."""
    tokens = clip.tokenize([template.format(n) for n in names], context_length=model.context_length)
    return F.normalize(model.encode_text(tokens).float(), dim=-1)


def render_object_crops(
    num_per_class: int, *, seed: int = 12345, resolution: int = 64, image_size: int = 256
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Held-out single-object renders: one object per scene (with clutter and distractor blobs),
    cropped 1.25x around its visible box, square. Objects less than 60% visible are redrawn.

    Returns:
        images (N, 3, R, R) CLIP-normalised float32, labels (N,) 0-based class indices,
        sizes (N,) longer side of each object's visible box in pixels of the 256 px scene.
    """
    num_classes = len(world_categories())
    crops, labels, sizes = [], [], []
    for c in range(1, num_classes + 1):
        for k in range(num_per_class):
            for attempt in range(20):
                rng = np.random.default_rng([seed, c, k, attempt])
                scene = render_scene(rng, image_size, category_ids=[c])
                o = scene.objects[0] if scene.objects else None
                if o is not None and o.visible_fraction >= 0.6:
                    break
            x0, y0, x1, y1 = o.box
            side = max(x1 - x0, y1 - y0)
            half = side * 1.25 / 2
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            image = torch.from_numpy(scene.image.astype(np.float32)).permute(2, 0, 1)[None]
            roi = torch.tensor([[0.0, cx - half, cy - half, cx + half, cy + half]])
            crops.append(roi_align(image, roi, (resolution,) * 2, 1.0, -1, aligned=True))
            labels.append(c - 1)
            sizes.append(side)
    return normalize_clip_images(torch.cat(crops)), torch.tensor(labels), torch.tensor(sizes)


@torch.no_grad()
def _encode_images(model, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    out = [model.encode_image(images[i : i + chunk]).float() for i in range(0, len(images), chunk)]
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def zero_shot_accuracy(model, num_per_class: int = 50, *, seed: int = 12345) -> Dict:
    """Zero-shot classification of held-out single-object renders with ``"a photo of a {}."``.

    Returns:
        ``{"overall", "novel_mean", "base_mean", "min_class", "by_object_size",
        "per_class": {name: acc}}``.
    """
    model.eval()
    categories = world_categories()
    names = class_names()
    resolution = model.visual.input_resolution
    crops, labels, sizes = render_object_crops(num_per_class, seed=seed, resolution=resolution)
    text = encode_class_prompts(model, names)
    pred = (_encode_images(model, crops) @ text.t()).argmax(1)
    correct = (pred == labels).float()
    per_class = {names[c]: float(correct[labels == c].mean()) for c in range(len(names))}
    novel = [per_class[names[i]] for i, c in enumerate(categories) if c["frequency"] == "r"]
    base = [per_class[names[i]] for i, c in enumerate(categories) if c["frequency"] != "r"]
    worst = min(per_class, key=per_class.get)
    by_size = {}
    for lo, hi in ((0, 20), (20, 40), (40, 80), (80, 1000)):
        sel = (sizes >= lo) & (sizes < hi)
        if sel.any():
            key = f"{lo}-{hi} px" if hi < 1000 else f">= {lo} px"
            by_size[key] = {"accuracy": float(correct[sel].mean()), "count": int(sel.sum())}
    return {
        "prompt": ZERO_SHOT_PROMPT,
        "num_per_class": num_per_class,
        "overall": float(correct.mean()),
        "novel_mean": float(np.mean(novel)),
        "base_mean": float(np.mean(base)),
        "min_class": {"name": worst, "accuracy": per_class[worst]},
        "by_object_size": by_size,
        "per_class": per_class,
    }


@torch.no_grad()
def scene_retrieval_map(
    model, num_scenes: int = 200, *, seed: int = 54321, input_sizes: Sequence[int] = (64, 128)
) -> Dict:
    """Multi-label retrieval on whole 256 px scenes: mean over images of the AP of ranking the
    classes by cos(image, prompt). Positives: every annotated class (``all``), or only the
    classes recognisable at 64 px (``named``, as the training captions name them).

    Each scene is shown at every size in ``input_sizes``; sizes other than the CLIP's own go
    through ``gridclip.clip.dense`` (attention-pool positional embedding interpolated), as a
    teacher with ``MODEL.CLIP.TEACHER_INPUT_SIZE`` other than 64 does.

    Returns:
        ``{"map_all", "map_named"}`` at the native size, ``"at_<size>": {...}`` for each size.
    """
    model.eval()
    native = model.visual.input_resolution
    pool = ScenePool(num_scenes, seed=seed, resolution=native, require_all_classes=False)
    s = pool.image_size
    window = np.array([0, 0, s, s], np.float32)
    positives = {
        "named": [set(pool.named_classes(i, window)) for i in range(num_scenes)],
        "all": [
            {int(c) for c in pool.obj_category[idx[pool.obj_ok[idx]]]}
            for idx in (pool._objects_of(i) for i in range(num_scenes))
        ],
    }
    text = encode_class_prompts(model, pool.names)
    result = {"num_scenes": num_scenes}
    for size in input_sizes:
        pool.resolution = size
        views = normalize_clip_images(pool._cut([[i, 0, 0, s, s] for i in range(num_scenes)], -1))
        if size == native:
            image = _encode_images(model, views)
        else:
            res5 = modified_resnet_features(model.visual, views)["res5"]
            image = F.normalize(attnpool_pooled(model.visual.attnpool, res5).float(), dim=-1)
        scores = (image @ text.t()).numpy()
        result[f"at_{size}"] = {
            f"map_{kind}": float(
                np.mean(
                    [
                        _average_precision(scores[i], {c - 1 for c in pos})
                        for i, pos in enumerate(positives[kind])
                        if pos
                    ]
                )
            )
            for kind in ("all", "named")
        }
    pool.resolution = native
    result.update(result.get(f"at_{native}", {}))
    return result


def _average_precision(scores: np.ndarray, positives: set) -> float:
    order = np.argsort(-scores, kind="stable")
    hits = np.array([int(i) in positives for i in order], np.float64)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / max(hits.sum(), 1))


def evaluate_small_clip(path: str, eval_per_class: int = 50) -> Dict:
    """Zero-shot accuracy and scene retrieval of a saved small CLIP (exactly what ships: the
    fp16 file loaded with ``build_model``). Returns ``{"zero_shot", "scene_retrieval",
    "file_bytes", "eval_s"}``."""
    model = load_small_clip(path)
    start = time.perf_counter()
    zero_shot = zero_shot_accuracy(model, eval_per_class)
    retrieval = scene_retrieval_map(model)
    return {
        "file_bytes": os.path.getsize(path),
        "zero_shot": zero_shot,
        "scene_retrieval": retrieval,
        "eval_s": round(time.perf_counter() - start, 1),
    }
