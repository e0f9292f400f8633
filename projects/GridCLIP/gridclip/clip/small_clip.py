"""The project's small CLIP: OpenAI's ``clip.model.CLIP`` with tiny widths, trained on the world.

Real CLIP weights cannot be downloaded everywhere, so the embedded default ships its own CLIP,
trained contrastively on image-caption pairs drawn by the world's renderer
(:func:`gridclip.data.world.render_scene`), covering *all* classes, novel ones included (as real
CLIP has seen LVIS's rare classes). Two kinds of views, matching the two teachers:

- **object crops**: boxes around single objects enlarged 1x-1.8x with jitter (what ViLD's
  region teacher sees), captioned with the object's class ("a photo of a red star."), plus any
  other object that is big and mostly inside the crop;
- **scene views**: whole images, 2x2 tiles and random windows (what GridCLIP's image-level
  teacher sees), captioned with the objects that are recognisable at the CLIP's input size
  ("a photo of a red star, a blue ring and a green cross.").

Crops are cut with ``roi_align`` (adaptive sampling, aligned), as the teachers in
``gridclip.clip.teacher`` cut them. The loss is CLIP's symmetric InfoNCE with multiple positives
(two captions naming the same set of classes are both right for each other's images) plus the
image-to-text cross-entropy against one prompt of every class (the "vocabulary loss"), so each
step contrasts every view with all 48 names. The scene pool is a ring buffer refreshed during
training (2,500 scenes held, ~8,500 seen); convolutions run channels-last under bf16 autocast.

The architecture is ModifiedResNet (layers (1, 1, 1, 1), width 16, res5 = 512 channels, attention
pool) + a 3-layer, 64-wide text transformer, 256-d joint space, 64 px input, context length 32.
It is stored in OpenAI's state-dict format (fp16) and loads with ``clip.model.build_model``.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from gridclip.data.world import class_names, render_scene, world_categories

from .dense import CLIP_PIXEL_MEAN_255, CLIP_PIXEL_STD_255

logger = logging.getLogger(__name__)

__all__ = [
    "SMALL_CLIP_ARCH",
    "SMALL_CLIP_WEIGHTS",
    "ZERO_SHOT_PROMPT",
    "build_small_clip",
    "load_small_clip",
    "fp16_state_dict",
    "save_state_dict_atomic",
    "caption_for",
    "ScenePool",
    "multi_positive_clip_loss",
    "vocabulary_loss",
    "encode_class_prompts",
    "render_object_crops",
    "zero_shot_accuracy",
    "scene_retrieval_map",
    "evaluate_small_clip",
    "train_small_clip",
]

#: Arguments of ``clip.model.CLIP`` (what ``build_model`` infers back from the state dict).
SMALL_CLIP_ARCH = dict(
    embed_dim=256,
    image_resolution=64,
    vision_layers=(1, 1, 1, 1),
    vision_width=16,  # res5 has 16 * 32 = 512 channels; attention pool with 8 heads of 64
    vision_patch_size=None,
    context_length=32,  # scene captions name up to 4 objects
    vocab_size=49408,  # OpenAI's BPE tokenizer
    transformer_width=64,  # build_model infers heads = width // 64
    transformer_heads=1,
    transformer_layers=3,
)
#: Where the trained weights ship (``MODEL.CLIP.NAME embedded``).
SMALL_CLIP_WEIGHTS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "world_clip.pt"
)
#: CLIP's image normalisation on the 0-255 scale.
ZERO_SHOT_PROMPT = "a photo of a {}."

_SINGLE_TEMPLATES = [
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a cropped photo of the {}.",
    "a blurry photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a low resolution photo of a {}.",
    "a good photo of the {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "a {} in the scene.",
    "an image containing a {}.",
    "a picture of a {}.",
    "a rendering of a {}.",
    "a drawing of a {}.",
    "itap of a {}.",
    "this is a {}.",
    "a {}.",
    "{}",
]
_SCENE_TEMPLATES = [
    "a photo of {}.",
    "a picture of {}.",
    "an image containing {}.",
    "a scene with {}.",
    "there are {} in the scene.",
    "a rendering of {}.",
    "{}.",
]
_MAX_NAMED = 4  # objects named in one caption
_MIN_NAMED_SIDE = 7.0  # px at the CLIP input: smaller objects go unnamed
_MIN_INSIDE = 0.6  # fraction of an object's visible box that must lie in the view


# ------------------------------------------------------------------------------------- models
def build_small_clip(**overrides):
    """A randomly initialised small CLIP (float32); ``overrides`` change :data:`SMALL_CLIP_ARCH`."""
    from clip.model import CLIP

    arch = {**SMALL_CLIP_ARCH, **overrides}
    assert arch["transformer_width"] % 64 == 0, (
        f"transformer_width must be a multiple of 64 (build_model infers heads = width // 64), "
        f"got {arch['transformer_width']}"
    )
    arch["transformer_heads"] = arch["transformer_width"] // 64
    return CLIP(**arch)


def fp16_state_dict(model) -> Dict[str, torch.Tensor]:
    """OpenAI-format state dict with every floating tensor in fp16 (the shipped format)."""
    return {
        k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu().contiguous().clone()
        for k, v in model.state_dict().items()
    }


def save_state_dict_atomic(state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """``torch.save`` to a temporary file next to ``path``, then ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        torch.save(state_dict, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the weights are for everyone
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_small_clip(path: Optional[str] = None):
    """Load a small-CLIP state dict with ``clip.model.build_model``; float32, eval mode."""
    from clip.model import build_model

    path = path or SMALL_CLIP_WEIGHTS
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"small CLIP weights not found: {path!r}. Train them with "
            "`python tools/train_small_clip.py --output <path>`."
        )
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return build_model(state_dict).float().eval()


# ------------------------------------------------------------------------------------ captions
def _with_article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def caption_for(
    category_ids: Sequence[int], rng: np.random.Generator, names: Optional[List[str]] = None
) -> str:
    """A caption naming classes (1-based ids, most prominent first) with a random template."""
    names = names or class_names()
    assert len(category_ids) >= 1, "a caption needs at least one class"
    if len(category_ids) == 1:
        template = _SINGLE_TEMPLATES[int(rng.integers(len(_SINGLE_TEMPLATES)))]
        return template.format(names[category_ids[0] - 1])
    items = [_with_article(names[c - 1]) for c in category_ids]
    listed = ", ".join(items[:-1]) + " and " + items[-1]
    return _SCENE_TEMPLATES[int(rng.integers(len(_SCENE_TEMPLATES)))].format(listed)


# ---------------------------------------------------------------------------------------- data
class ScenePool:
    """Pre-rendered world scenes and their objects, from which training views are cut.

    A ring buffer: :meth:`refresh` replaces the oldest scenes with new ones (scene *i* of the
    stream is drawn from ``(seed, 7, i)``), so a long run sees many more scenes than it holds.

    Attributes:
        images: (K, S, S, 3) uint8 array.
        obj_scene, obj_category: (M,) int64 arrays (category 1-based).
        obj_box: (M, 4) float32 XYXY visible boxes; obj_ok: (M,) bool annotated objects.
    """

    def __init__(
        self,
        num_scenes: int,
        *,
        seed: int = 0,
        image_size: int = 256,
        resolution: int = 64,
        progress: bool = False,
        require_all_classes: bool = True,
    ):
        self.resolution = resolution
        self.image_size = image_size
        self.seed = seed
        self.names = class_names()
        self.num_classes = len(self.names)
        self.images = np.empty((num_scenes, image_size, image_size, 3), np.uint8)
        self._objects: List[list] = [[] for _ in range(num_scenes)]
        self.num_rendered = 0
        iterator = range(num_scenes)
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, desc="rendering CLIP scenes", unit="img")
        for _ in iterator:
            self._render_next()
        self._index()
        missing = [self.names[c] for c, idx in enumerate(self.per_class) if len(idx) == 0]
        assert not (
            missing and require_all_classes
        ), f"scene pool too small: no instance of {missing}; raise num_scenes"

    def _render_next(self) -> None:
        slot = self.num_rendered % len(self.images)
        rng = np.random.default_rng([self.seed, 7, self.num_rendered])
        scene = render_scene(rng, self.image_size, num_objects=(1, 8))  # all classes uniform
        self.images[slot] = scene.image
        self._objects[slot] = [(o.category_id, o.box, o.annotated) for o in scene.objects]
        self.num_rendered += 1

    def refresh(self, count: int) -> None:
        """Replace the ``count`` oldest scenes with newly drawn ones."""
        for _ in range(count):
            self._render_next()
        self._index()

    def _index(self) -> None:
        scene_ids = [i for i, objs in enumerate(self._objects) for _ in objs]
        flat = [o for objs in self._objects for o in objs]
        self.obj_scene = np.asarray(scene_ids, np.int64)
        self.obj_category = np.asarray([o[0] for o in flat], np.int64)
        self.obj_box = np.asarray([o[1] for o in flat], np.float32).reshape(-1, 4)
        self.obj_ok = np.asarray([o[2] for o in flat], bool)
        self.per_class = [
            np.nonzero(self.obj_ok & (self.obj_category == c))[0]
            for c in range(1, self.num_classes + 1)
        ]
        self._available = [c for c, idx in enumerate(self.per_class) if len(idx)]
        self._order = np.arange(len(flat))  # objects are stored scene by scene
        self._scene_start = np.searchsorted(self.obj_scene, np.arange(len(self.images) + 1))

    def _objects_of(self, scene: int) -> np.ndarray:
        return self._order[self._scene_start[scene] : self._scene_start[scene + 1]]

    def named_classes(self, scene: int, window: np.ndarray, first: Optional[int] = None) -> List:
        """Classes to name for a view (XYXY window) of a scene, most prominent first."""
        idx = self._objects_of(scene)
        idx = idx[self.obj_ok[idx]]
        b = self.obj_box[idx]
        inter = np.clip(
            np.minimum(b[:, 2:], window[2:]) - np.maximum(b[:, :2], window[:2]), 0, None
        )
        inside = inter.prod(1) / np.maximum((b[:, 2:] - b[:, :2]).prod(1), 1e-6)
        side = inter.max(1) * self.resolution / max(window[2] - window[0], window[3] - window[1])
        keep = (inside >= _MIN_INSIDE) & (side >= _MIN_NAMED_SIDE)
        order = np.argsort(-(inter.prod(1) * keep), kind="stable")
        named = [] if first is None else [int(self.obj_category[first])]
        for j in order:
            c = int(self.obj_category[idx[j]])
            if keep[j] and c not in named:
                named.append(c)
        return named[:_MAX_NAMED]

    def sample_batch(
        self, rng: np.random.Generator, batch_size: int, crop_fraction: float = 0.6
    ) -> Tuple[torch.Tensor, List[str], List[frozenset]]:
        """Views + captions.

        Returns:
            images: (B, 3, R, R) CLIP-normalised float32; captions: B strings; keys: B frozensets
            of the named classes (equal keys = positives for each other).
        """
        s = float(self.image_size)
        rois, captions, keys = [], [], []
        while len(rois) < batch_size:
            if rng.random() < crop_fraction:  # an object crop: classes drawn uniformly
                c = self._available[int(rng.integers(len(self._available)))]
                obj = int(self.per_class[c][rng.integers(len(self.per_class[c]))])
                scene = int(self.obj_scene[obj])
                x0, y0, x1, y1 = self.obj_box[obj]
                w, h = x1 - x0, y1 - y0
                if rng.random() < 0.8:  # mostly square crops; some keep the box's aspect
                    w = h = max(w, h)
                enlarge = rng.uniform(1.0, 1.8)
                cx = (x0 + x1) / 2 + rng.uniform(-0.15, 0.15) * w
                cy = (y0 + y1) / 2 + rng.uniform(-0.15, 0.15) * h
                half = np.array([w, h]) * enlarge / 2
                window = np.array([cx - half[0], cy - half[1], cx + half[0], cy + half[1]])
                window = np.clip(window, 0, s)
                named = self.named_classes(scene, window, first=obj)
            else:  # a scene view: whole image, a 2x2 tile, or a random window
                scene = int(rng.integers(len(self.images)))
                u = rng.random()
                if u < 0.4:
                    window = np.array([0, 0, s, s])
                elif u < 0.7:
                    tx, ty = rng.integers(2, size=2) * s / 2
                    window = np.array([tx, ty, tx + s / 2, ty + s / 2])
                else:
                    side = rng.uniform(0.35, 0.9) * s
                    tx, ty = rng.uniform(0, s - side, 2)
                    window = np.array([tx, ty, tx + side, ty + side])
                named = self.named_classes(scene, window)
                if not named:
                    continue
                if len(named) > 1 and rng.random() < 0.5:
                    named = [named[i] for i in rng.permutation(len(named))]
            rois.append([scene, *window.tolist()])
            captions.append(caption_for(named, rng, self.names))
            keys.append(frozenset(named))
        sampling_ratio = -1 if rng.random() < 0.8 else 2
        views = _normalize(self._cut(rois, sampling_ratio))
        flip = torch.from_numpy(rng.random(batch_size) < 0.5)
        views = torch.where(flip[:, None, None, None], views.flip(-1), views)
        return views, captions, keys

    def _cut(self, rois: List, sampling_ratio: int) -> torch.Tensor:
        """roi_align of each (scene, x0, y0, x1, y1) window, on a float copy of only the pixels
        it covers; 0-255 float (B, 3, R, R)."""
        size = self.images.shape[1]
        out = []
        for scene, x0, y0, x1, y1 in rois:
            xi0, yi0 = max(int(math.floor(x0)) - 1, 0), max(int(math.floor(y0)) - 1, 0)
            xi1, yi1 = min(int(math.ceil(x1)) + 1, size), min(int(math.ceil(y1)) + 1, size)
            patch = self.images[int(scene), yi0:yi1, xi0:xi1].astype(np.float32)  # numpy: fast
            patch = torch.from_numpy(patch).permute(2, 0, 1)[None]
            box = torch.tensor([[0.0, x0 - xi0, y0 - yi0, x1 - xi0, y1 - yi0]])
            out.append(
                roi_align(patch, box, (self.resolution,) * 2, 1.0, sampling_ratio, aligned=True)
            )
        return torch.cat(out)


def _normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_PIXEL_MEAN_255, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_PIXEL_STD_255, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


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


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def encode_class_prompts(model, names: Sequence[str], template: str = ZERO_SHOT_PROMPT):
    """(C, D) L2-normalised text embeddings of ``template.format(name)``."""
    import clip

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
    return _normalize(torch.cat(crops)), torch.tensor(labels), torch.tensor(sizes)


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
    from gridclip.clip.dense import attnpool_pooled, modified_resnet_features

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
        views = _normalize(pool._cut([[i, 0, 0, s, s] for i in range(num_scenes)], -1))
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


# ------------------------------------------------------------------------------------- training
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

    import clip

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
        from tqdm import tqdm

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
