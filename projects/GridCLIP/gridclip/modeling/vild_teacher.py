"""ViLD-image teacher data: the offline cache of proposal boxes + CLIP crop embeddings.

ViLD's image distillation needs one CLIP forward per proposal crop, which is why ViLD computes
the teacher embeddings offline. ``tools/cache_vild_teacher.py`` writes them here; training with
``MODEL.VILD.TEACHER "cache"`` reads them through :class:`ViLDDatasetMapper`.

Cache layout (one directory, ``MODEL.VILD.TEACHER_CACHE``)::

    meta.json                     # settings the cache was built with (CLIP, crops, proposals)
    000000/<image_id>.pt          # one entry per image, in folders of 1000 ids
    000001/<image_id>.pt
    ...

An entry is a ``torch.save``-d dict with ``image_id``, ``file_name``, ``height``, ``width`` (the
original image size), ``boxes`` (R, 4) float32 XYXY in **original image pixels**, ordered by
priority (the first N are the ones distilled), and ``embeddings`` (R, D) float16, L2-normalised.
Each entry is written to a temporary file and ``os.replace``-d into place, so an interrupted run
never leaves a half-written entry; entries are validated on load.

The mapper applies the training augmentation (resize, flip) to the cached boxes, so they line up
with the augmented image; the crop embeddings are those of the un-augmented crops (CLIP is nearly
flip-invariant; ViLD does the same).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.structures import Boxes, Instances

from ..data.mapper import CheckedDatasetMapper
from ..engine.checkpoint import atomic_open

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT_VERSION",
    "TeacherCacheError",
    "TeacherCache",
    "ViLDDatasetMapper",
    "cache_entry_path",
    "read_cache_entry",
    "write_cache_entry",
    "read_cache_meta",
    "write_cache_meta",
    "sliding_window_proposals",
]

CACHE_FORMAT_VERSION = 1
META_FILE = "meta.json"
TOOL = "tools/cache_vild_teacher.py"
_ENTRY_KEYS = ("version", "image_id", "file_name", "height", "width", "boxes", "embeddings")


class TeacherCacheError(RuntimeError):
    """A missing, corrupt or incompatible ViLD teacher cache (entry)."""


# ----------------------------------------------------------------------------------- entries
def cache_entry_path(cache_dir: str, image_id) -> str:
    """Path of the entry of ``image_id`` (int-like ids go to folders of 1000)."""
    key = str(image_id)
    if key.isdigit():
        folder = f"{int(key) // 1000:06d}"
    else:  # non-numeric ids: a safe file name in one folder
        key = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        folder = "other"
    return os.path.join(cache_dir, folder, key + ".pt")


def write_cache_entry(path: str, entry: Dict) -> None:
    """Validate and write one entry atomically (temporary file + ``os.replace``)."""
    entry = dict(entry, version=CACHE_FORMAT_VERSION)
    entry["boxes"] = torch.as_tensor(entry["boxes"]).detach().float().cpu().contiguous()
    entry["embeddings"] = torch.as_tensor(entry["embeddings"]).detach().half().cpu().contiguous()
    _validate_entry(entry, path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_open(path, "wb") as f:
        torch.save(entry, f)


def read_cache_entry(
    path: str,
    *,
    embed_dim: Optional[int] = None,
    image_id=None,
    image_size: Optional[Sequence[int]] = None,
) -> Dict:
    """Load and validate one entry; raise :class:`TeacherCacheError` naming the file if it is
    missing, unreadable or inconsistent (wrong image, size, embedding dimension, shapes)."""
    if not os.path.isfile(path):
        raise TeacherCacheError(
            f"ViLD teacher cache: no entry {path!r}"
            + (f" for image_id {image_id!r}" if image_id is not None else "")
            + f". Build the cache for this dataset with {TOOL}."
        )
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / not a torch file / not a dict of tensors
        raise TeacherCacheError(
            f"ViLD teacher cache: cannot read {path!r} ({type(e).__name__}: {e}). Delete it and "
            f"rerun {TOOL} (it recomputes invalid entries)."
        ) from e
    _validate_entry(entry, path)
    problems = []
    if embed_dim is not None and entry["embeddings"].shape[1] != embed_dim:
        problems.append(
            f"embedding dimension {entry['embeddings'].shape[1]} != MODEL.CLIP.EMBED_DIM "
            f"{embed_dim} (built with another CLIP?)"
        )
    if image_id is not None and str(entry["image_id"]) != str(image_id):
        problems.append(f"holds image_id {entry['image_id']!r}, expected {image_id!r}")
    if image_size is not None and (entry["height"], entry["width"]) != tuple(image_size):
        problems.append(
            f"built for an image of {entry['height']}x{entry['width']}, the dataset says "
            f"{image_size[0]}x{image_size[1]}"
        )
    if problems:
        raise TeacherCacheError(
            f"ViLD teacher cache entry {path!r}: "
            + "; ".join(problems)
            + f". Rebuild the cache with {TOOL} (--overwrite)."
        )
    return entry


def _validate_entry(entry, path: str) -> None:
    def fail(why):
        raise TeacherCacheError(
            f"ViLD teacher cache entry {path!r} is invalid: {why}. Delete it and rerun {TOOL}."
        )

    if not isinstance(entry, dict):
        fail(f"expected a dict, got {type(entry).__name__}")
    missing = [k for k in _ENTRY_KEYS if k not in entry]
    if missing:
        fail(f"missing keys {missing}")
    if entry["version"] != CACHE_FORMAT_VERSION:
        fail(f"format version {entry['version']}, this code reads {CACHE_FORMAT_VERSION}")
    boxes, emb = entry["boxes"], entry["embeddings"]
    if not (isinstance(boxes, torch.Tensor) and boxes.ndim == 2 and boxes.shape[1] == 4):
        fail(f"'boxes' must be an (R, 4) tensor, got {getattr(boxes, 'shape', type(boxes))}")
    if not (isinstance(emb, torch.Tensor) and emb.ndim == 2 and emb.shape[0] == boxes.shape[0]):
        fail(
            f"'embeddings' must be an (R, D) tensor with R = {boxes.shape[0]}, got "
            f"{getattr(emb, 'shape', type(emb))}"
        )
    if not (torch.isfinite(boxes).all() and torch.isfinite(emb.float()).all()):
        fail("non-finite values")
    if int(entry["height"]) <= 0 or int(entry["width"]) <= 0:
        fail(f"bad image size {entry['height']}x{entry['width']}")


# -------------------------------------------------------------------------------------- meta
def write_cache_meta(cache_dir: str, meta: Dict) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    with atomic_open(os.path.join(cache_dir, META_FILE), "w") as f:
        json.dump(dict(meta, format_version=CACHE_FORMAT_VERSION), f, indent=2, sort_keys=True)


def read_cache_meta(cache_dir: str) -> Dict:
    path = os.path.join(cache_dir, META_FILE)
    if not os.path.isfile(path):
        raise TeacherCacheError(
            f"ViLD teacher cache {cache_dir!r} has no {META_FILE} (MODEL.VILD.TEACHER_CACHE). "
            f"Build it with {TOOL}."
        )
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TeacherCacheError(f"ViLD teacher cache: cannot read {path!r}: {e}") from e
    if meta.get("format_version") != CACHE_FORMAT_VERSION:
        raise TeacherCacheError(
            f"{path}: cache format version {meta.get('format_version')!r}, this code reads "
            f"{CACHE_FORMAT_VERSION}. Rebuild it with {TOOL} --overwrite."
        )
    return meta


class TeacherCache:
    """Read access to a ViLD teacher cache directory (checked against the model's settings)."""

    def __init__(self, cache_dir: str, *, embed_dim: Optional[int] = None, crop_scales=None):
        if not cache_dir:
            raise TeacherCacheError(
                "MODEL.VILD.TEACHER is 'cache' but MODEL.VILD.TEACHER_CACHE is empty: set it to "
                f"a directory built by {TOOL}."
            )
        self.cache_dir = os.path.expanduser(cache_dir)
        self.meta = read_cache_meta(self.cache_dir)
        if embed_dim is not None and self.meta.get("embed_dim") not in (None, embed_dim):
            raise TeacherCacheError(
                f"ViLD teacher cache {self.cache_dir!r} holds {self.meta['embed_dim']}-d "
                f"embeddings but MODEL.CLIP.EMBED_DIM is {embed_dim}."
            )
        if crop_scales is not None and self.meta.get("crop_scales") is not None:
            if [float(s) for s in crop_scales] != [float(s) for s in self.meta["crop_scales"]]:
                logger.warning(
                    f"ViLD teacher cache {self.cache_dir!r} was built with crop scales "
                    f"{self.meta['crop_scales']}, MODEL.VILD.CROP_SCALES is {list(crop_scales)}: "
                    "using the cache as built."
                )
        self.embed_dim = embed_dim

    def get(self, image_id, image_size: Optional[Sequence[int]] = None) -> Dict:
        """The validated entry of ``image_id`` (``image_size`` = original (H, W) to check)."""
        return read_cache_entry(
            cache_entry_path(self.cache_dir, image_id),
            embed_dim=self.embed_dim,
            image_id=image_id,
            image_size=image_size,
        )


# ------------------------------------------------------------------------------------ mapper
class ViLDDatasetMapper(CheckedDatasetMapper):
    """The project's ``DatasetMapper`` that, for ``MODEL.VILD.TEACHER "cache"`` in training,
    also attaches the cached distillation proposals of each image as
    ``dataset_dict["distill_proposals"]``: an ``Instances`` with ``proposal_boxes`` (the cached
    boxes under the same resize/flip as the image, clipped) and ``teacher_embeddings`` (R, D).
    Otherwise it behaves exactly like ``CheckedDatasetMapper`` (so it can serve any model).
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        teacher_cache: Optional[TeacherCache] = None,
        num_distill_proposals: int = 300,
        **kwargs,
    ):
        super().__init__(is_train, **kwargs)
        self.teacher_cache = teacher_cache
        self.num_distill_proposals = int(num_distill_proposals)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        vild = cfg.MODEL.VILD
        if is_train and vild.TEACHER == "cache" and vild.IMAGE_DISTILL_WEIGHT > 0:
            ret["teacher_cache"] = TeacherCache(
                vild.TEACHER_CACHE,
                embed_dim=cfg.MODEL.CLIP.EMBED_DIM,
                crop_scales=vild.CROP_SCALES,
            )
        ret["num_distill_proposals"] = vild.NUM_DISTILL_PROPOSALS
        return ret

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        # Called in training with the transforms applied to the image: the right hook for boxes.
        super()._transform_annotations(dataset_dict, transforms, image_shape)
        if self.teacher_cache is not None:
            dataset_dict["distill_proposals"] = self._cached_proposals(
                dataset_dict, transforms, image_shape
            )

    def _cached_proposals(self, dataset_dict, transforms, image_shape) -> Instances:
        size = None
        if "height" in dataset_dict and "width" in dataset_dict:
            size = (dataset_dict["height"], dataset_dict["width"])
        entry = self.teacher_cache.get(dataset_dict["image_id"], size)
        boxes = entry["boxes"][: self.num_distill_proposals].numpy()
        embeddings = entry["embeddings"][: self.num_distill_proposals].float()
        boxes = Boxes(torch.as_tensor(transforms.apply_box(boxes), dtype=torch.float32))
        boxes.clip(image_shape)
        keep = boxes.nonempty(threshold=1.0)  # crops of < 1 px are meaningless
        proposals = Instances(image_shape)
        proposals.proposal_boxes = boxes[keep]
        proposals.teacher_embeddings = embeddings[keep]
        return proposals


# --------------------------------------------------------------------- proposals without RPN
def sliding_window_proposals(
    height: int,
    width: int,
    num_proposals: int = 300,
    *,
    sizes: Sequence[float] = (0.1, 0.2, 0.3, 0.45, 0.65, 0.9),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    overlap: float = 0.5,
    seed: int = 0,
) -> torch.Tensor:
    """A deterministic class-agnostic proposal set: multi-scale sliding windows.

    Windows of side ``size * min(height, width)`` (area-preserving ``aspect_ratios`` = h / w),
    sliding with ``overlap`` between neighbours, evenly placed so the last one touches the
    border. When there are more than ``num_proposals``, a fixed-seed permutation picks a subset
    that covers all sizes and positions (so the first N of the returned order is also a uniform
    subset, as the cache stores boxes in priority order).

    Returns:
        (R, 4) float32 XYXY boxes in pixels, R <= num_proposals.
    """
    assert height > 0 and width > 0, f"bad image size {height}x{width}"
    assert 0.0 <= overlap < 1.0, f"overlap must be in [0, 1), got {overlap}"
    windows = []
    for size in sizes:
        side = size * min(height, width)
        for ratio in aspect_ratios:
            w = min(width, side / math.sqrt(ratio))
            h = min(height, side * math.sqrt(ratio))
            xs = _positions(width, w, overlap)
            ys = _positions(height, h, overlap)
            x0, y0 = np.meshgrid(xs, ys, indexing="xy")
            x0, y0 = x0.ravel(), y0.ravel()
            windows.append(np.stack([x0, y0, x0 + w, y0 + h], axis=1))
    boxes = np.unique(np.round(np.concatenate(windows), 2), axis=0)
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(boxes), generator=generator)
    return boxes[order[:num_proposals]]


def _positions(extent: float, window: float, overlap: float) -> np.ndarray:
    stride = max(window * (1.0 - overlap), 1.0)
    count = int(math.ceil(max(extent - window, 0.0) / stride)) + 1
    return np.linspace(0.0, max(extent - window, 0.0), count)
