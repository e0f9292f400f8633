"""The embedded world: a generated open-vocabulary detection dataset in LVIS format.

Real LVIS and real CLIP weights cannot be downloaded everywhere, so the project brings a small
world in which every claim can be measured end to end on a CPU:

- **Vocabulary**: 48 compositional categories ``<colour>_<shape>`` (8 colours x 7 shapes, 8 pairs
  left out), with LVIS frequencies: 20 ``f``, 18 ``c`` (base, boxed in training) and 10 ``r``
  (novel). Every colour and every shape of a novel class also occurs in some base class, so a
  novel class is a new *composition* of known attributes. The vocabulary is fixed (it does not
  depend on the world's seed), so the datasets' metadata is known before any file exists.
- **Images**: several objects per image on textured, noisy backgrounds with clutter strokes and
  non-class distractor blobs, a wide scale range, random rotation and mild aspect jitter, and
  occlusion by draw order. Boxes are tight around the *visible* pixels; objects more than 60%
  occluded (or tinier than 4 px) are not annotated, and their class is then neither a positive
  nor in the image's ``neg_category_ids`` (it is ``not_exhaustive`` when other instances of it
  are annotated), so the federated LVIS evaluation never punishes a correct detection of them.
- **Splits**: novel objects appear in training images and are annotated in the train JSON (an
  oracle can train on them); the open-vocabulary training split ``<prefix>_train`` removes them
  on load (``base_only=True``), as the LVIS OVD protocol does. ``f`` classes are drawn ~3x more
  often than ``c`` and ``r`` ones in training; validation draws all classes uniformly so each has
  enough instances for a stable AP.

:func:`render_scene` is the one renderer: the detection images and the small CLIP's training
images (``gridclip.clip.small_clip``) both come from it, so the CLIP teacher sees what the
detector sees. :func:`generate_world` writes a world (atomic, cached by its parameters);
:func:`register_world` registers it with Detectron2 (lazy: files may not exist yet).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog
from PIL import Image, ImageDraw

from .lvis_ovd import datasets_root, register_lvis_format_dataset

logger = logging.getLogger(__name__)

__all__ = [
    "COLOURS",
    "SHAPES",
    "PRESETS",
    "WORLD_FORMAT_VERSION",
    "SceneObject",
    "Scene",
    "world_categories",
    "class_names",
    "render_scene",
    "generate_world",
    "world_params",
    "register_world",
    "register_default_worlds",
    "default_world_root",
    "resolve_world_root",
]

#: Bump when the renderer or the JSON layout changes: cached worlds are then regenerated.
WORLD_FORMAT_VERSION = 1

#: Class colours (RGB). Backgrounds are kept desaturated so these stay recognisable.
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (40, 160, 60),
    "blue": (35, 75, 215),
    "purple": (135, 50, 180),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
#: Class shapes; the value says whether a rotation changes its look (its symmetry period, deg).
SHAPES: Dict[str, float] = {
    "circle": 0.0,
    "ring": 0.0,
    "square": 90.0,
    "triangle": 120.0,
    "star": 72.0,
    "cross": 90.0,
    "heart": 60.0,  # rotated within +-30 deg only: an upside-down heart reads as another shape
}
SHAPE_DEFINITIONS = {
    "circle": "a filled round disc",
    "ring": "a round band with a hole in its middle",
    "square": "a filled shape with four equal sides and four right angles",
    "triangle": "a filled shape with three sides",
    "star": "a filled five-pointed star",
    "cross": "a filled plus sign with four equal arms",
    "heart": "a filled heart shape",
}
#: Colours of the non-class distractor blobs (none is a class colour).
DISTRACTOR_COLOURS = [(128, 128, 128), (110, 75, 45), (95, 95, 100), (150, 120, 90)]

_VOCABULARY_SEED = 20230316  # fixed: the vocabulary never depends on a world's seed
_NUM_CLASSES, _NUM_FREQUENT, _NUM_COMMON, _NUM_RARE = 48, 20, 18, 10
#: Relative sampling weight of a class in training images, by frequency group.
TRAIN_FREQUENCY_WEIGHTS = {"f": 1.0, "c": 0.3, "r": 0.3}

#: Named parameter sets. ``demo``: the embedded default (three detectors train on it within
#: minutes on 2 CPU cores); ``ci``: a tiny world for tests.
PRESETS: Dict[str, Dict] = {
    "demo": dict(num_train=1000, num_val=300, image_size=256),
    "ci": dict(num_train=32, num_val=16, image_size=128),
}
_REFERENCE_SIZE = 256  # object sizes are given for 256 px images and scale with image_size
_MIN_VISIBLE_FRACTION = 0.4  # objects more than 60% occluded are not annotated
_MIN_BOX_SIDE = 4.0  # px at the reference size; smaller visible boxes are not annotated


# ----------------------------------------------------------------------------------- vocabulary
@functools.lru_cache(maxsize=1)
def _categories_cached() -> Tuple[Tuple[str, str, str], ...]:
    rng = np.random.default_rng(_VOCABULARY_SEED)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    for _ in range(100):
        order = rng.permutation(len(pairs))
        chosen = [pairs[i] for i in order[:_NUM_CLASSES]]
        freqs = ["r"] * _NUM_RARE + ["f"] * _NUM_FREQUENT + ["c"] * _NUM_COMMON
        base = chosen[_NUM_RARE:]
        base_colours, base_shapes = {c for c, _ in base}, {s for _, s in base}
        if all(c in base_colours and s in base_shapes for c, s in chosen[:_NUM_RARE]):
            table = sorted((f"{c}_{s}", c, s, f) for (c, s), f in zip(chosen, freqs))
            return tuple((name, f, f"{c}|{s}") for name, c, s, f in table)
    raise RuntimeError("could not draw a vocabulary whose novel attributes all occur in base ones")


def world_categories() -> List[Dict]:
    """The world's 48 categories as LVIS-style dicts (without image/instance counts).

    Sorted by name (as LVIS is), ids contiguous from 1. Each has ``id``, ``name``
    (``"red_star"``), ``synonyms``, ``def``, ``frequency`` (``f``/``c``/``r``), ``colour`` and
    ``shape``.
    """
    categories = []
    for i, (name, frequency, attrs) in enumerate(_categories_cached()):
        colour, shape = attrs.split("|")
        categories.append(
            {
                "id": i + 1,
                "name": name,
                "synonyms": [name, f"{shape}_{colour}"],
                "def": f"{SHAPE_DEFINITIONS[shape]}, coloured {colour}",
                "frequency": frequency,
                "colour": colour,
                "shape": shape,
            }
        )
    return categories


def class_names(with_spaces: bool = True) -> List[str]:
    """Class names in id order: ``"red star"`` (for prompts) or ``"red_star"`` (LVIS style)."""
    names = [c["name"] for c in world_categories()]
    return [n.replace("_", " ") for n in names] if with_spaces else names


# ------------------------------------------------------------------------------------- renderer
@dataclass
class SceneObject:
    """One class instance drawn in a scene. Coordinates in pixels, (x0, y0, x1, y1) boxes."""

    category_id: int  # 1-based, as in the JSON
    box: Tuple[float, float, float, float]  # tight box of the visible pixels
    visible_area: float  # visible pixels (alpha > 0.5)
    full_area: float  # pixels of the unoccluded object
    polygon: List[float]  # outline of the whole (amodal) object, [x1, y1, x2, y2, ...]
    annotated: bool  # False when too occluded or too small to annotate

    @property
    def visible_fraction(self) -> float:
        return self.visible_area / max(self.full_area, 1.0)


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    objects: List[SceneObject] = field(default_factory=list)


def _unit_polygons(shape: str) -> List[Tuple[np.ndarray, int]]:
    """Polygons of a shape in unit coordinates (fits the unit disc), with fill values 255/0."""
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    disc = np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "circle":
        return [(disc, 255)]
    if shape == "ring":
        return [(disc, 255), (0.55 * disc, 0)]
    if shape == "square":
        return [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.7, 255)]
    if shape == "triangle":
        a = np.deg2rad(np.array([-90, 30, 150]))
        return [(np.stack([np.cos(a), np.sin(a)], 1) * 1.05, 255)]
    if shape == "star":
        a = np.deg2rad(np.arange(10) * 36 - 90)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return [(np.stack([r * np.cos(a), r * np.sin(a)], 1), 255)]
    if shape == "cross":
        w = 0.32
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w)]
        pts += [(-1, w), (-1, -w), (-w, -w)]
        return [(np.array(pts, dtype=np.float64) * 0.95, 255)]
    if shape == "heart":
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y + 2.5], 1) / 16.5
        return [(pts, 255)]
    raise KeyError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")


_UNIT_POLYGONS = {s: _unit_polygons(s) for s in SHAPES}


def _blob_polygon(rng: np.random.Generator) -> np.ndarray:
    """An irregular non-class blob (a 'rock') in unit coordinates."""
    n = int(rng.integers(6, 11))
    a = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = rng.uniform(0.45, 1.0, n)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _raster(polys, transform, size_hw, offset, supersample=4) -> np.ndarray:
    """Anti-aliased alpha (float32 in [0, 1]) of polygons, on a patch at integer offset."""
    h, w = size_hw
    canvas = Image.new("L", (w * supersample, h * supersample), 0)
    draw = ImageDraw.Draw(canvas)
    for pts, value in polys:
        p = (transform(pts) - np.asarray(offset, dtype=np.float64)) * supersample
        draw.polygon([tuple(q) for q in p.tolist()], fill=value)
    return np.asarray(canvas.reduce(supersample), dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Desaturated low-frequency colour noise + optional faint stripes + pixel noise, float."""
    base = rng.uniform(85, 185)
    tint = rng.normal(0, 14, 3)
    img = np.empty((h, w, 3), np.float32)
    img[:] = base + tint
    for cells, amp in ((int(rng.integers(2, 6)), rng.uniform(10, 35)), (16, rng.uniform(3, 12))):
        low = rng.normal(0, 1, (cells, cells, 3))
        low[..., 1:] = low[..., :1] * 0.8 + low[..., 1:] * 0.2  # mostly brightness, little hue
        low8 = np.clip(128 + 40 * low, 0, 255).astype(np.uint8)
        up = np.asarray(Image.fromarray(low8).resize((w, h), Image.BICUBIC), np.float32)
        img += (up - 128) * (amp / 40)
    if rng.random() < 0.35:
        theta, period = rng.uniform(0, np.pi), rng.uniform(4, 24)
        yy, xx = np.mgrid[0:h, 0:w]
        stripes = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period)
        img += (rng.uniform(4, 14) * stripes)[..., None]
    img += rng.uniform(2, 8) * rng.standard_normal((h, w, 1), dtype=np.float32)
    return img


def _strokes(rng: np.random.Generator, img: np.ndarray, count: int, max_width: int) -> np.ndarray:
    """Clutter: random thin polylines in random colours (not classes: they have no area)."""
    if count <= 0:
        return img
    h, w = img.shape[:2]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(count):
        n = int(rng.integers(2, 6))
        start = rng.uniform(0, [w, h])
        steps = rng.normal(0, 0.15 * max(h, w), (n, 2))
        pts = np.concatenate([start[None], start + np.cumsum(steps, 0)])
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.line(
            [tuple(p) for p in pts.tolist()], fill=colour, width=int(rng.integers(1, max_width + 1))
        )
    return np.asarray(pil, np.float32)


def render_scene(
    rng: np.random.Generator,
    image_size: int = 256,
    *,
    category_ids: Optional[Sequence[int]] = None,
    class_weights: Optional[Sequence[float]] = None,
    num_objects: Tuple[int, int] = (3, 8),
    object_size: Tuple[float, float] = (12.0, 110.0),
    num_distractors: Tuple[int, int] = (0, 2),
    num_strokes: Tuple[int, int] = (2, 8),
) -> Scene:
    """Draw one scene of the world.

    Args:
        rng: the only source of randomness (same generator state -> same pixels).
        image_size: side of the square image in pixels.
        category_ids: 1-based classes to draw, in draw order; default: ``num_objects`` classes
            drawn with ``class_weights`` (uniform if None).
        object_size: (min, max) object diameter for a 256 px image (log-uniform); scaled by
            ``image_size / 256``.
        num_distractors, num_strokes: inclusive ranges of non-class blobs and clutter strokes.

    Returns:
        :class:`Scene` with the uint8 image and every drawn class object (annotated or not).
    """
    categories = world_categories()
    num_classes = len(categories)
    s = image_size
    scale = s / _REFERENCE_SIZE
    if category_ids is None:
        n = int(rng.integers(num_objects[0], num_objects[1] + 1))
        p = None
        if class_weights is not None:
            p = np.asarray(class_weights, np.float64)
            assert p.shape == (num_classes,), f"class_weights must have {num_classes} entries"
            p = p / p.sum()
        category_ids = (rng.choice(num_classes, size=n, p=p) + 1).tolist()
    for c in category_ids:
        assert 1 <= c <= num_classes, f"category id {c} outside 1..{num_classes}"

    img = _background(rng, s, s)
    img = _strokes(rng, img, int(rng.integers(num_strokes[0], num_strokes[1] + 1)), 3)

    # Draw order: class objects and distractor blobs interleaved at random.
    items = [("object", int(c)) for c in category_ids]
    items += [("blob", -1)] * int(rng.integers(num_distractors[0], num_distractors[1] + 1))
    items = [items[i] for i in rng.permutation(len(items))]
    owner = np.full((s, s), -1, np.int32)
    drawn = []  # (object index, category id, alpha patch, patch slice, polygon)
    lo, hi = np.log(object_size[0] * scale), np.log(object_size[1] * scale)
    for kind, cat in items:
        size = float(np.exp(rng.uniform(lo, hi)))
        aspect = float(np.exp(rng.uniform(-0.2, 0.2)))
        sx, sy = size / 2 * aspect**0.5, size / 2 / aspect**0.5
        if kind == "object":
            shape = categories[cat - 1]["shape"]
            period = SHAPES[shape]
            angle = 0.0
            if shape == "heart":
                angle = rng.uniform(-30, 30)
            elif period > 0:
                angle = rng.uniform(0, period)
            polys = _UNIT_POLYGONS[shape]
            colour = np.asarray(COLOURS[categories[cat - 1]["colour"]], np.float32)
            colour = colour + rng.normal(0, 9, 3) + rng.normal(0, 12)
        else:
            size *= 0.8
            angle = rng.uniform(0, 360)
            polys = [(_blob_polygon(rng), 255)]
            colour = np.asarray(DISTRACTOR_COLOURS[int(rng.integers(len(DISTRACTOR_COLOURS)))])
            colour = colour + rng.normal(0, 10, 3)
        radius = max(sx, sy) * 1.06 + 1
        cx, cy = rng.uniform(radius, s - radius, 2) if radius < s / 2 else (s / 2, s / 2)
        ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))

        def transform(pts, cx=cx, cy=cy, sx=sx, sy=sy, ca=ca, sa=sa):
            x, y = pts[:, 0] * sx, pts[:, 1] * sy
            return np.stack([x * ca - y * sa + cx, x * sa + y * ca + cy], 1)

        outline = transform(polys[0][0])
        x0, y0 = np.floor(outline.min(0)).astype(int)
        x1, y1 = np.ceil(outline.max(0)).astype(int) + 1
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, s), min(y1, s)
        if x1 <= x0 or y1 <= y0:
            continue
        alpha = _raster(polys, transform, (y1 - y0, x1 - x0), (x0, y0))
        # Object texture: shading gradient + noise around its colour.
        yy, xx = np.mgrid[0 : y1 - y0, 0 : x1 - x0].astype(np.float32)
        g = rng.normal(0, 1, 2) * rng.uniform(0, 30) / max(size, 1.0)
        shade = (xx - xx.mean()) * g[0] + (yy - yy.mean()) * g[1]
        noise = rng.standard_normal((*alpha.shape, 1), dtype=np.float32)
        texture = colour + shade[..., None] + rng.uniform(2, 8) * noise
        region = img[y0:y1, x0:x1]
        a = alpha[..., None]
        region *= 1 - a
        region += a * texture
        idx = len(drawn) if kind == "object" else -2
        owner[y0:y1, x0:x1][alpha > 0.5] = idx
        if kind == "object":
            poly = np.clip(outline, 0, s).round(2).reshape(-1).tolist()
            drawn.append((cat, alpha, (y0, y1, x0, x1), poly))

    img = _strokes(rng, img, int(rng.integers(0, 3)), 2)  # a few strokes over objects too
    img += rng.uniform(1, 4) * rng.standard_normal(img.shape, dtype=np.float32)
    image = np.clip(img + 0.5, 0, 255).astype(np.uint8)

    objects = []
    min_side = _MIN_BOX_SIDE * scale
    for i, (cat, alpha, (y0, y1, x0, x1), poly) in enumerate(drawn):
        mine = owner[y0:y1, x0:x1] == i
        full = float((alpha > 0.5).sum())
        visible = float(mine.sum())
        if visible == 0:
            box = (float(x0), float(y0), float(x0), float(y0))
        else:
            rows, cols = np.nonzero(mine.any(1))[0], np.nonzero(mine.any(0))[0]
            box = (x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1)
            box = tuple(float(v) for v in box)
        annotated = (
            visible >= _MIN_VISIBLE_FRACTION * full
            and min(box[2] - box[0], box[3] - box[1]) >= min_side
        )
        objects.append(SceneObject(cat, box, visible, full, poly, bool(annotated)))
    return Scene(image=image, objects=objects)


# ------------------------------------------------------------------------------- world on disk
def world_params(
    preset: str = "demo",
    *,
    seed: int = 0,
    num_train: Optional[int] = None,
    num_val: Optional[int] = None,
    image_size: Optional[int] = None,
    num_objects: Tuple[int, int] = (3, 8),
    object_size: Tuple[float, float] = (12.0, 110.0),
    image_format: str = "jpg",
) -> Dict:
    """The full parameter dict of a world (what the cache compares), from a preset + overrides."""
    if preset not in PRESETS:
        raise KeyError(f"unknown world preset {preset!r}; choose one of {sorted(PRESETS)}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    p = dict(PRESETS[preset])
    for key, value in (("num_train", num_train), ("num_val", num_val), ("image_size", image_size)):
        if value is not None:
            p[key] = int(value)
    if p["num_train"] < 1 or p["num_val"] < 1 or p["image_size"] < 32:
        raise ValueError(f"world needs >= 1 train and val image and image_size >= 32, got {p}")
    lo, hi = int(num_objects[0]), int(num_objects[1])
    if not 1 <= lo <= hi:
        raise ValueError(f"num_objects must be a range 1 <= min <= max, got {num_objects}")
    return {
        "format_version": WORLD_FORMAT_VERSION,
        "preset": preset,
        "seed": int(seed),
        **p,
        "num_objects": [lo, hi],
        "object_size": [float(object_size[0]), float(object_size[1])],
        "image_format": image_format,
        "train_frequency_weights": dict(TRAIN_FREQUENCY_WEIGHTS),
    }


def _split_json(split: str, params: Dict, progress: bool, out_dir: str) -> Tuple[Dict, List]:
    """Render one split to ``out_dir/<split>/`` and return its LVIS dict (no categories yet)."""
    categories = world_categories()
    num_classes = len(categories)
    if split == "train":
        weights = [params["train_frequency_weights"][c["frequency"]] for c in categories]
        count, split_code, id_base = params["num_train"], 0, 0
    else:
        weights = [1.0] * num_classes
        count, split_code, id_base = params["num_val"], 1, 1_000_000
    os.makedirs(os.path.join(out_dir, split))
    images, annotations = [], []
    iterator = range(count)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"world {split}", unit="img")
    for index in iterator:
        rng = np.random.default_rng([params["seed"], split_code, index])
        scene = render_scene(
            rng,
            params["image_size"],
            class_weights=weights,
            num_objects=tuple(params["num_objects"]),
            object_size=tuple(params["object_size"]),
        )
        image_id = id_base + index + 1
        file_name = f"{image_id:012d}.{params['image_format']}"
        path = os.path.join(out_dir, split, file_name)
        if params["image_format"] == "jpg":
            Image.fromarray(scene.image).save(path, quality=95)
        else:
            Image.fromarray(scene.image).save(path)
        present = {o.category_id for o in scene.objects}
        annotated = {o.category_id for o in scene.objects if o.annotated}
        skipped = {o.category_id for o in scene.objects if not o.annotated}
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "coco_url": f"{split}/{file_name}",
                "height": params["image_size"],
                "width": params["image_size"],
                # Every class not drawn at all is verified absent.
                "neg_category_ids": [c for c in range(1, num_classes + 1) if c not in present],
                # Classes with some instance too occluded to annotate next to annotated ones.
                "not_exhaustive_category_ids": sorted(annotated & skipped),
            }
        )
        for o in scene.objects:
            if not o.annotated:
                continue
            x0, y0, x1, y1 = o.box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": o.category_id,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": o.visible_area,
                    "segmentation": [o.polygon],
                }
            )
    return {"images": images, "annotations": annotations}, images


def _summary(train: Dict, val: Dict) -> Dict:
    freq = {c["id"]: c["frequency"] for c in world_categories()}
    out = {}
    for split, d in (("train", train), ("val", val)):
        per_group = {"f": 0, "c": 0, "r": 0}
        for a in d["annotations"]:
            per_group[freq[a["category_id"]]] += 1
        out[split] = {
            "images": len(d["images"]),
            "instances": len(d["annotations"]),
            "instances_per_frequency": per_group,
        }
    return out


def generate_world(
    root: str, *, preset: str = "demo", seed: int = 0, progress: bool = False, **overrides
) -> Dict:
    """Write a world to ``root`` and return its manifest (cached and atomic).

    Layout: ``root/{train,val}/<id>.jpg``, ``root/annotations/{train,val}.json`` (LVIS v1
    format), ``root/manifest.json`` (parameters + summary).

    - Cached: if ``root/manifest.json`` has the same parameters, nothing is written.
    - Atomic: the world is built in a temporary folder next to ``root`` and moved into place
      with ``os.replace``; an error leaves no partial ``root``. A previous world at ``root`` with
      other parameters is replaced; a ``root`` that is not a world (no manifest) is refused.

    Args:
        preset: ``"demo"`` (1000 train / 300 val images of 256 px) or ``"ci"`` (32 / 16 of 128).
        seed: every image is drawn from ``(seed, split, index)``: same seed, same bytes.
        overrides: ``num_train``, ``num_val``, ``image_size``, ``num_objects``, ``object_size``,
            ``image_format`` (see :func:`world_params`).
    """
    params = world_params(preset, seed=seed, **overrides)
    root = os.path.abspath(os.path.expanduser(root))
    manifest_path = os.path.join(root, "manifest.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("params") == params:
            logger.info(f"World at {root} is up to date (cached)")
            return manifest
        logger.info(f"World at {root} has other parameters; regenerating")
    elif os.path.exists(root) and os.listdir(root):
        raise FileExistsError(
            f"{root} exists and is not a generated world (no manifest.json); refusing to replace "
            "it. Remove it or pass another --root."
        )
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".tmp-", dir=parent)
    try:
        train, _ = _split_json("train", params, progress, tmp)
        val, _ = _split_json("val", params, progress, tmp)
        categories = _with_counts(world_categories(), train)
        info = {"description": "GridCLIP embedded world", "params": params}
        os.makedirs(os.path.join(tmp, "annotations"))
        for split, d in (("train", train), ("val", val)):
            d = {"info": info, "images": d["images"], "annotations": d["annotations"]}
            d["categories"] = categories
            with open(os.path.join(tmp, "annotations", f"{split}.json"), "w") as f:
                json.dump(d, f, separators=(",", ":"))
        manifest = {"params": params, "summary": _summary(train, val)}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
        _replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(f"World written to {root}: {manifest['summary']}")
    return manifest


def _with_counts(categories: List[Dict], train: Dict) -> List[Dict]:
    """LVIS category dicts with ``image_count``/``instance_count`` from the train split."""
    images = {c["id"]: set() for c in categories}
    instances = {c["id"]: 0 for c in categories}
    for a in train["annotations"]:
        images[a["category_id"]].add(a["image_id"])
        instances[a["category_id"]] += 1
    keys = ("id", "name", "synonyms", "def", "frequency")
    return [
        {
            **{k: c[k] for k in keys},
            "image_count": len(images[c["id"]]),
            "instance_count": instances[c["id"]],
        }
        for c in categories
    ]


def _replace_dir(src: str, dst: str) -> None:
    """Move ``src`` to ``dst``; an existing ``dst`` is swapped out first and then deleted."""
    if os.path.exists(dst):
        old = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".old-", dir=os.path.dirname(dst))
        os.replace(dst, os.path.join(old, "world"))
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


# --------------------------------------------------------------------------------- registration
def resolve_world_root(root: str) -> str:
    """``DATASETS.WORLD.ROOT`` semantics: absolute as is, else under ``$DETECTRON2_DATASETS``."""
    root = os.path.expanduser(root)
    return root if os.path.isabs(root) else os.path.join(datasets_root(), root)


def default_world_root(preset: str = "demo") -> str:
    """``$DETECTRON2_DATASETS/gridclip_world`` (demo) or ``.../gridclip_world_<preset>``."""
    if preset not in PRESETS:
        raise KeyError(f"unknown world preset {preset!r}; choose one of {sorted(PRESETS)}")
    name = "gridclip_world" if preset == "demo" else f"gridclip_world_{preset}"
    return os.path.join(datasets_root(), name)


def _load_world_split(loader, json_file: str, name: str):
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"The embedded world of dataset {name!r} is missing: {json_file!r} does not exist. "
            "Generate it with `python tools/make_world.py` (add `--preset ci` for the tiny test "
            "world, `--root` for another folder) or run `make demo`."
        )
    return loader()


def register_world(root: Optional[str] = None, prefix: str = "gridclip_world") -> List[str]:
    """Register a generated world's splits with Detectron2 (idempotent, lazy).

    - ``<prefix>_train``: train images, novel (``r``) annotations removed: the OVD split.
    - ``<prefix>_train_full``: train with every annotation (an oracle that sees novel boxes).
    - ``<prefix>_val``: validation, every class annotated.

    The files need not exist yet: class names and frequencies come from the fixed vocabulary,
    and loading a missing world raises ``FileNotFoundError`` telling how to generate it.

    Args:
        root: world folder (used as given; :func:`resolve_world_root` turns a config's
            ``DATASETS.WORLD.ROOT`` into one); default :func:`default_world_root`
            (``$DETECTRON2_DATASETS/gridclip_world``).

    Returns:
        The registered dataset names.
    """
    root = default_world_root() if root is None else os.path.expanduser(root)
    categories = world_categories()
    metadata = {
        "thing_classes": [c["name"] for c in categories],
        "class_frequencies": [c["frequency"] for c in categories],
        "world_root": root,
    }
    names = []
    for suffix, split, base_only in (
        ("train", "train", True),
        ("train_full", "train", False),
        ("val", "val", False),
    ):
        name = f"{prefix}_{suffix}"
        json_file = os.path.join(root, "annotations", f"{split}.json")
        already = name in DatasetCatalog.list()
        register_lvis_format_dataset(
            name, json_file, root, base_only=base_only, extra_metadata=metadata
        )
        if not already:
            loader = DatasetCatalog[name]
            DatasetCatalog.remove(name)
            DatasetCatalog.register(
                name, functools.partial(_load_world_split, loader, json_file, name)
            )
        names.append(name)
    return names


def register_default_worlds() -> None:
    """Register the demo world (``gridclip_world_*``) and the CI world (``gridclip_world_ci_*``)
    at their default roots under ``$DETECTRON2_DATASETS``. Called at import of ``gridclip.data``.
    """
    register_world(default_world_root("demo"), prefix="gridclip_world")
    register_world(default_world_root("ci"), prefix="gridclip_world_ci")
