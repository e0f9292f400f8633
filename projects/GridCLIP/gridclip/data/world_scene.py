"""The embedded world's vocabulary and its one renderer (see :mod:`gridclip.data.world`).

- **Vocabulary**: 48 compositional categories ``<colour>_<shape>`` with LVIS frequencies, fixed
  (independent of any world's seed) so that datasets' metadata is known before any file exists;
  a *split seed* redraws which of them are novel (same names and ids).
- **Renderer**: :func:`render_scene` draws one scene (textured background, clutter strokes,
  distractor blobs, class objects with rotation, aspect jitter and occlusion) and returns tight
  boxes around the visible pixels. The detection images and the small CLIP's training images
  (``gridclip_tools.small_clip_data``) both come from it, so the CLIP teacher sees what the
  detector sees.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "SHAPES",
    "SHAPE_DEFINITIONS",
    "SceneObject",
    "Scene",
    "world_categories",
    "class_names",
    "render_scene",
]

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
_REFERENCE_SIZE = 256  # object sizes are given for 256 px images and scale with image_size
_MIN_VISIBLE_FRACTION = 0.4  # objects more than 60% occluded are not annotated
_MIN_BOX_SIDE = 4.0  # px at the reference size; smaller visible boxes are not annotated


# ----------------------------------------------------------------------------------- vocabulary
@functools.lru_cache(maxsize=None)
def _categories_cached(split_seed: int = 0) -> Tuple[Tuple[str, str, str], ...]:
    """(name, frequency, "colour|shape") per class, sorted by name.

    The 48 classes are always the same (drawn once from ``_VOCABULARY_SEED``; the shipped small
    CLIP knows them all). ``split_seed`` 0 is the fixed default split; another value redraws
    which classes are frequent / common / rare (novel) among them, again so that every colour
    and shape of a novel class occurs in some base class.
    """
    rng = np.random.default_rng(_VOCABULARY_SEED)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    freqs = ["r"] * _NUM_RARE + ["f"] * _NUM_FREQUENT + ["c"] * _NUM_COMMON
    chosen = None
    for _ in range(100):
        order = rng.permutation(len(pairs))
        candidate = [pairs[i] for i in order[:_NUM_CLASSES]]
        if _novel_attributes_seen(candidate):
            chosen = candidate
            break
    if chosen is None:
        raise RuntimeError(
            "could not draw a vocabulary whose novel attributes all occur in base ones"
        )
    if split_seed:
        split_rng = np.random.default_rng([_VOCABULARY_SEED, int(split_seed)])
        for _ in range(1000):
            candidate = [chosen[i] for i in split_rng.permutation(len(chosen))]
            if _novel_attributes_seen(candidate):
                chosen = candidate
                break
        else:
            raise RuntimeError(f"split seed {split_seed}: no valid novel/base split in 1000 draws")
    table = sorted((f"{c}_{s}", c, s, f) for (c, s), f in zip(chosen, freqs))
    return tuple((name, f, f"{c}|{s}") for name, c, s, f in table)


def _novel_attributes_seen(ordered_pairs) -> bool:
    """True when every colour and shape of the first ``_NUM_RARE`` (novel) pairs occurs in the
    remaining (base) ones."""
    base = ordered_pairs[_NUM_RARE:]
    base_colours, base_shapes = {c for c, _ in base}, {s for _, s in base}
    return all(c in base_colours and s in base_shapes for c, s in ordered_pairs[:_NUM_RARE])


def world_categories(split_seed: int = 0) -> List[Dict]:
    """The world's 48 categories as LVIS-style dicts (without image/instance counts).

    Sorted by name (as LVIS is), ids contiguous from 1. Each has ``id``, ``name``
    (``"red_star"``), ``synonyms``, ``def``, ``frequency`` (``f``/``c``/``r``), ``colour`` and
    ``shape``. ``split_seed`` redraws the frequencies (which classes are novel); names and ids
    never change.
    """
    if int(split_seed) < 0:
        raise ValueError(f"split_seed must be >= 0, got {split_seed}")
    categories = []
    for i, (name, frequency, attrs) in enumerate(_categories_cached(int(split_seed))):
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
