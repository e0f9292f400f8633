"""Training data of the small CLIP: world scenes, views cut from them, and their captions.

Two kinds of views, matching the two teachers:

- **object crops**: boxes around single objects enlarged 1x-1.8x with jitter (what ViLD's
  region teacher sees), captioned with the object's class ("a photo of a red star."), plus any
  other object that is big and mostly inside the crop;
- **scene views**: whole images, 2x2 tiles and random windows (what GridCLIP's image-level
  teacher sees), captioned with the objects that are recognisable at the CLIP's input size
  ("a photo of a red star, a blue ring and a green cross.").

Scenes are drawn by the world's renderer (:func:`gridclip.data.world.render_scene`), covering
*all* classes, novel ones included (as real CLIP has seen LVIS's rare classes). Crops are cut
with ``roi_align`` (adaptive sampling, aligned), as the teachers in ``gridclip.clip.teacher``
cut them.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchvision.ops import roi_align

from gridclip.clip.dense import CLIP_PIXEL_MEAN_255, CLIP_PIXEL_STD_255
from gridclip.data.world import class_names, render_scene

__all__ = ["caption_for", "ScenePool", "normalize_clip_images"]

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
        views = normalize_clip_images(self._cut(rois, sampling_ratio))
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


def normalize_clip_images(images: torch.Tensor) -> torch.Tensor:
    """0-255 RGB (B, 3, R, R) -> CLIP's normalised input."""
    mean = torch.tensor(CLIP_PIXEL_MEAN_255, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_PIXEL_STD_255, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std
