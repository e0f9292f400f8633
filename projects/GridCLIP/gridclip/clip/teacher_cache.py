"""The teacher caches: CLIP image embeddings computed once by a tool, read by training.

Both are in the project's one cache format (:mod:`gridclip.utils.cache`: safetensors + a header
with ``format_version``, ``kind`` and ``provenance``); files written before that format
(``torch.save`` / ``meta.json``) are refused with a message to rebuild them with the tool.

**GridCLIP** (:class:`TeacherEmbeddingCache`, kind ``gridclip_teacher``, one file, written by
``tools/cache_teacher_embeddings.py``, read with ``MODEL.GRIDCLIP.TEACHER_CACHE``): per image
(key: :func:`teacher_cache_key`) the CLIP embeddings of the whole image and its g x g tiles.
Tensors: ``embeddings`` (num_images, sum(g*g), D) float16, L2-normalised, the views of each grid
in order, tiles row-major; ``image_keys``: the image keys (:func:`~gridclip.utils.cache.
encode_strings`). Provenance: ``embed_dim``, ``grids`` and what the tool records (CLIP weights'
content key ``clip``, ``teacher_input_size``, ``dataset``; see
:func:`gridclip_teacher_provenance`).

**ViLD** (:class:`TeacherCache`, a directory written by ``tools/cache_vild_teacher.py``, read
with ``MODEL.VILD.TEACHER_CACHE``)::

    meta.safetensors              # kind vild_teacher: no tensors; provenance = the settings
                                  # (clip, embed_dim, crop_scales, teacher_input_size, proposals,
                                  # num_proposals, datasets)
    000000/<image_id>.safetensors # kind vild_teacher_entry, one per image, folders of 1000 ids
    ...

An entry holds ``boxes`` (R, 4) float32 XYXY in **original image pixels**, ordered by priority
(the first N are the ones distilled), and ``embeddings`` (R, D) float16, L2-normalised; its
provenance names the image (``image_id``, ``file_name``, ``height``, ``width``). Each file is
written atomically, so an interrupted run never leaves a half-written entry; entries are
validated on load.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..utils.cache import (
    CacheError,
    CacheMismatchError,
    decode_strings,
    encode_strings,
    load_cache,
    read_cache_header,
    save_cache,
)
from ..utils.fingerprint import dataset_fingerprint
from .loading import clip_model_key, resolve_clip_weights

logger = logging.getLogger(__name__)

__all__ = [
    "GRIDCLIP_TEACHER_KIND",
    "VILD_TEACHER_KIND",
    "VILD_TEACHER_ENTRY_KIND",
    "META_FILE",
    "TeacherEmbeddingCache",
    "gridclip_teacher_provenance",
    "teacher_cache_key",
    "TeacherCacheError",
    "TeacherCache",
    "cache_entry_path",
    "read_cache_entry",
    "write_cache_entry",
    "read_cache_meta",
    "write_cache_meta",
    "sliding_window_proposals",
]

GRIDCLIP_TEACHER_KIND = "gridclip_teacher"
VILD_TEACHER_KIND = "vild_teacher"
VILD_TEACHER_ENTRY_KIND = "vild_teacher_entry"
GRIDCLIP_TOOL = "tools/cache_teacher_embeddings.py"
VILD_TOOL = "tools/cache_vild_teacher.py"


# ------------------------------------------------------------------------- GridCLIP teacher
def teacher_cache_key(dataset_dict: Dict) -> str:
    """Key of an image in a teacher cache: its ``image_id``, else its file's base name."""
    if dataset_dict.get("image_id") is not None:
        return str(dataset_dict["image_id"])
    if dataset_dict.get("file_name"):
        return os.path.basename(dataset_dict["file_name"])
    raise KeyError(
        "an input has neither 'image_id' nor 'file_name'; the teacher cache cannot look it up "
        "(set MODEL.GRIDCLIP.TEACHER_CACHE '' to run the CLIP teacher online)"
    )


def gridclip_teacher_provenance(cfg, dataset: Union[str, Sequence[str]] = "") -> Dict[str, object]:
    """The provenance a GridCLIP teacher cache records for ``cfg`` and that training checks:
    the content key of ``MODEL.CLIP``'s weights (``clip``), ``MODEL.CLIP.TEACHER_INPUT_SIZE``
    and, when ``dataset`` (one registered name or several) is given, its name(s) (``dataset``,
    for messages) and content key (``dataset_fingerprint``,
    :func:`gridclip.utils.fingerprint.dataset_fingerprint`). (``embed_dim`` and ``grids`` are
    recorded by the cache itself.)"""
    c = cfg.MODEL.CLIP
    provenance = {
        "clip": clip_model_key(resolve_clip_weights(c.WEIGHTS, c.NAME, c.CACHE_DIR)),
        "teacher_input_size": int(c.TEACHER_INPUT_SIZE),
    }
    names = [dataset] if isinstance(dataset, str) else list(dataset)
    names = [str(n) for n in names if n]
    if names:
        provenance["dataset"] = names[0] if len(names) == 1 else names
        provenance["dataset_fingerprint"] = dataset_fingerprint(names)
    return provenance


class TeacherEmbeddingCache:
    """Per-image CLIP teacher embeddings (whole image and tiles), stored in one cache file.

    Args:
        embed_dim: D.
        grids: tiles per side of each view set, e.g. ``[1, 2]``.
        provenance: what the embeddings were computed from (see
            :func:`gridclip_teacher_provenance`); ``embed_dim`` and ``grids`` are added.
    """

    def __init__(self, embed_dim: int, grids: Sequence[int], provenance: Optional[Dict] = None):
        self.embed_dim = int(embed_dim)
        self.grids = [int(g) for g in grids]
        assert self.grids and all(g >= 1 for g in self.grids), f"bad grids {grids}"
        self.provenance = dict(provenance or {}, embed_dim=self.embed_dim, grids=self.grids)
        self.path: Optional[str] = None
        self._index: Dict[str, int] = {}
        self._rows: List[torch.Tensor] = []  # each (V, D) float16
        self._stacked: Optional[torch.Tensor] = None
        self._offsets = {}
        start = 0
        for g in self.grids:
            self._offsets[g] = (start, start + g * g)
            start += g * g
        self.num_views = start

    @property
    def meta(self) -> Dict:
        """The provenance dict (``dataset``, ``clip``, ...), under its former name."""
        return self.provenance

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return str(key) in self._index

    def keys(self) -> List[str]:
        return list(self._index)

    def add(self, key: str, tiles: Sequence[torch.Tensor]) -> None:
        """Store the views of one image: ``tiles[j]`` is (g_j * g_j, D) for ``self.grids[j]``."""
        assert len(tiles) == len(self.grids), f"expected views for grids {self.grids}"
        for t, g in zip(tiles, self.grids):
            assert tuple(t.shape) == (
                g * g,
                self.embed_dim,
            ), f"views of grid {g} must be ({g * g}, {self.embed_dim}), got {tuple(t.shape)}"
        row = F.normalize(torch.cat([t.detach().float().cpu() for t in tiles]), dim=-1).half()
        key = str(key)
        if key in self._index:
            self._materialize()[self._index[key]] = row
            return
        self._index[key] = len(self._index)
        self._rows.append(row)

    def _materialize(self) -> torch.Tensor:
        if self._rows:
            parts = [self._stacked] if self._stacked is not None else []
            self._stacked = torch.cat(parts + [torch.stack(self._rows)])
            self._rows = []
        if self._stacked is None:
            self._stacked = torch.zeros((0, self.num_views, self.embed_dim), dtype=torch.float16)
        return self._stacked

    def get(self, key: str, grids: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
        """Views of image ``key`` for ``grids`` (default: all stored): list of (g*g, D) float32."""
        key = str(key)
        if key not in self._index:
            raise KeyError(
                f"image {key!r} is not in the teacher cache {self.path or '(in memory)'} "
                f"({len(self)} images, dataset {self.provenance.get('dataset', '?')!r}). Rebuild "
                f"it for the training dataset with {GRIDCLIP_TOOL} (it resumes), or set "
                "MODEL.GRIDCLIP.TEACHER_CACHE '' to run the teacher online."
            )
        row = self._materialize()[self._index[key]].float()
        out = []
        for g in grids if grids is not None else self.grids:
            if g not in self._offsets:
                raise KeyError(
                    f"teacher cache {self.path or '(in memory)'} holds grids {self.grids}, not {g} "
                    "(MODEL.GRIDCLIP.IMAGE_ALIGN_GRIDS); rebuild it with --grids"
                )
            a, b = self._offsets[g]
            out.append(row[a:b])
        return out

    def save(self, path: str) -> str:
        """Write the cache atomically (:func:`gridclip.utils.cache.save_cache`)."""
        tensors = {"embeddings": self._materialize(), "image_keys": encode_strings(self.keys())}
        self.path = save_cache(path, tensors, GRIDCLIP_TEACHER_KIND, self.provenance)
        return self.path

    @classmethod
    def load(
        cls,
        path: str,
        embed_dim: Optional[int] = None,
        grids: Optional[Iterable[int]] = None,
        expected_provenance: Optional[Dict] = None,
    ) -> "TeacherEmbeddingCache":
        """Read and validate a cache file.

        Args:
            embed_dim: expected D (MODEL.CLIP.EMBED_DIM); a mismatch is an error.
            grids: grids the caller needs (MODEL.GRIDCLIP.IMAGE_ALIGN_GRIDS); each must be stored.
            expected_provenance: entries the file's provenance must hold (e.g.
                :func:`gridclip_teacher_provenance` of the model's config); a difference raises
                :class:`~gridclip.utils.cache.CacheMismatchError` naming both values. Its
                ``dataset`` (a name) is not compared: ``dataset_fingerprint`` is, and a mismatch
                names both datasets.
        """
        full = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(full):
            raise FileNotFoundError(
                f"teacher cache {full} (MODEL.GRIDCLIP.TEACHER_CACHE) does not exist; build it "
                f"with {GRIDCLIP_TOOL}, or set the key to '' for an online teacher"
            )
        hint = f"Rebuild it with {GRIDCLIP_TOOL} --overwrite."
        # a dataset is compared by content (its fingerprint); its name only goes into messages
        compared = {k: v for k, v in (expected_provenance or {}).items() if k != "dataset"}
        if expected_provenance and "dataset_fingerprint" in expected_provenance:
            try:
                recorded = read_cache_header(full, GRIDCLIP_TEACHER_KIND).get("dataset", "?")
            except CacheError:
                recorded = "?"
            hint = (
                f"The cache was built on dataset {json.dumps(recorded)}; the model trains on "
                f"{json.dumps(expected_provenance.get('dataset', '?'))}. " + hint
            )
        try:
            tensors, provenance = load_cache(full, GRIDCLIP_TEACHER_KIND, compared, hint)
        except CacheError as e:
            if isinstance(e, CacheMismatchError) and e.key.startswith("provenance"):
                raise
            raise ValueError(
                f"{full} is not a GridCLIP teacher cache in the current format ({e})"
            ) from e
        emb = tensors.get("embeddings")
        keys = decode_strings(tensors["image_keys"]) if "image_keys" in tensors else None
        cache = cls(provenance.get("embed_dim", -1), provenance.get("grids", [1]), provenance)
        cache.path = full
        expected = (len(keys or []), cache.num_views, cache.embed_dim)
        if keys is None or emb is None or tuple(emb.shape) != expected:
            raise ValueError(
                f"teacher cache {full}: embeddings of shape "
                f"{tuple(getattr(emb, 'shape', ()))} do not match {expected} "
                "(images, views, dim); the file is corrupt, rebuild it"
            )
        if embed_dim is not None and cache.embed_dim != int(embed_dim):
            raise ValueError(
                f"teacher cache {full} holds {cache.embed_dim}-d embeddings but the model's CLIP "
                f"space is {embed_dim}-d (MODEL.CLIP.EMBED_DIM); it was built with another CLIP: "
                f"rebuild it with {GRIDCLIP_TOOL}"
            )
        missing = [g for g in (grids or []) if int(g) not in cache.grids]
        if missing:
            raise ValueError(
                f"teacher cache {full} holds grids {cache.grids} but "
                f"MODEL.GRIDCLIP.IMAGE_ALIGN_GRIDS needs {sorted(set(int(g) for g in grids))}; "
                "rebuild it with --grids"
            )
        cache._index = {k: i for i, k in enumerate(keys)}
        cache._stacked = emb.half()
        return cache


# ----------------------------------------------------------------------------- ViLD teacher
META_FILE = "meta.safetensors"
_LEGACY_META_FILE = "meta.json"


class TeacherCacheError(RuntimeError):
    """A missing, corrupt or incompatible ViLD teacher cache (entry)."""


def cache_entry_path(cache_dir: str, image_id) -> str:
    """Path of the entry of ``image_id`` (int-like ids go to folders of 1000)."""
    key = str(image_id)
    if key.isdigit():
        folder = f"{int(key) // 1000:06d}"
    else:  # non-numeric ids: a safe file name in one folder
        key = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        folder = "other"
    return os.path.join(cache_dir, folder, key + ".safetensors")


def write_cache_entry(path: str, entry: Dict) -> None:
    """Validate and write one entry atomically. ``entry``: ``image_id``, ``file_name``,
    ``height``, ``width`` (the original image), ``boxes`` (R, 4), ``embeddings`` (R, D)."""
    boxes = torch.as_tensor(entry["boxes"]).detach().float().cpu().contiguous()
    embeddings = torch.as_tensor(entry["embeddings"]).detach().half().cpu().contiguous()
    image = {
        "image_id": entry["image_id"],
        "file_name": str(entry["file_name"]),
        "height": int(entry["height"]),
        "width": int(entry["width"]),
    }
    _validate_entry(dict(image, boxes=boxes, embeddings=embeddings), path)
    save_cache(path, {"boxes": boxes, "embeddings": embeddings}, VILD_TEACHER_ENTRY_KIND, image)


def read_cache_entry(
    path: str,
    *,
    embed_dim: Optional[int] = None,
    image_id=None,
    image_size: Optional[Sequence[int]] = None,
) -> Dict:
    """Load and validate one entry (a dict as given to :func:`write_cache_entry`); raise
    :class:`TeacherCacheError` naming the file if it is missing, unreadable or inconsistent
    (wrong image, size, embedding dimension, shapes)."""
    if not os.path.isfile(path):
        raise TeacherCacheError(
            f"ViLD teacher cache: no entry {path!r}"
            + (f" for image_id {image_id!r}" if image_id is not None else "")
            + f". Build the cache for this dataset with {VILD_TOOL}."
        )
    try:
        tensors, image = load_cache(path, VILD_TEACHER_ENTRY_KIND)
    except CacheError as e:  # truncated / not a cache file / another kind or version
        raise TeacherCacheError(
            f"ViLD teacher cache: cannot read {path!r} ({e}). Delete it and rerun {VILD_TOOL} "
            f"(it recomputes invalid entries)."
        ) from e
    entry = dict(image, **tensors)
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
            + f". Rebuild the cache with {VILD_TOOL} (--overwrite)."
        )
    return entry


def _validate_entry(entry: Dict, path: str) -> None:
    def fail(why):
        raise TeacherCacheError(
            f"ViLD teacher cache entry {path!r} is invalid: {why}. Delete it and rerun "
            f"{VILD_TOOL}."
        )

    missing = [
        k
        for k in ("image_id", "file_name", "height", "width", "boxes", "embeddings")
        if k not in entry
    ]
    if missing:
        fail(f"missing {missing}")
    boxes, emb = entry["boxes"], entry["embeddings"]
    if not (boxes.ndim == 2 and boxes.shape[1] == 4):
        fail(f"'boxes' must be an (R, 4) tensor, got {tuple(boxes.shape)}")
    if not (emb.ndim == 2 and emb.shape[0] == boxes.shape[0]):
        fail(
            f"'embeddings' must be an (R, D) tensor with R = {boxes.shape[0]}, got "
            f"{tuple(emb.shape)}"
        )
    if not (torch.isfinite(boxes).all() and torch.isfinite(emb.float()).all()):
        fail("non-finite values")
    if int(entry["height"]) <= 0 or int(entry["width"]) <= 0:
        fail(f"bad image size {entry['height']}x{entry['width']}")


def write_cache_meta(cache_dir: str, meta: Dict) -> None:
    """Write the cache's settings (its provenance) as ``meta.safetensors``."""
    save_cache(os.path.join(cache_dir, META_FILE), {}, VILD_TEACHER_KIND, meta)


def read_cache_meta(cache_dir: str, expected: Optional[Dict] = None) -> Dict:
    """The settings a ViLD teacher cache was built with (checked against ``expected``)."""
    path = os.path.join(cache_dir, META_FILE)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(cache_dir, _LEGACY_META_FILE)):
            raise TeacherCacheError(
                f"ViLD teacher cache {cache_dir!r} is in the format written before the project's "
                f"cache format ({_LEGACY_META_FILE}, torch entries), which is no longer read. "
                f"Rebuild it with {VILD_TOOL} --overwrite."
            )
        raise TeacherCacheError(
            f"ViLD teacher cache {cache_dir!r} has no {META_FILE} (MODEL.VILD.TEACHER_CACHE). "
            f"Build it with {VILD_TOOL}."
        )
    try:
        _, meta = load_cache(path, VILD_TEACHER_KIND, expected, f"Rebuild it with {VILD_TOOL}.")
    except CacheError as e:
        raise TeacherCacheError(f"ViLD teacher cache: {e}") from e
    return meta


class TeacherCache:
    """Read access to a ViLD teacher cache directory, checked against the model's settings.

    Args:
        cache_dir: the directory (``MODEL.VILD.TEACHER_CACHE``).
        embed_dim: ``MODEL.CLIP.EMBED_DIM``; another recorded dimension is an error.
        crop_scales, teacher_input_size, clip_model: ``MODEL.VILD.CROP_SCALES``,
            ``MODEL.CLIP.TEACHER_INPUT_SIZE`` and the content key of the model's CLIP weights
            (:func:`~gridclip.clip.loading.clip_model_key`); each given one must equal what the
            cache recorded, else :class:`TeacherCacheError` names the file and both values.
        num_distill_proposals: ``MODEL.VILD.NUM_DISTILL_PROPOSALS``; a warning says so when the
            cache holds fewer proposals per image.
    """

    def __init__(
        self,
        cache_dir: str,
        *,
        embed_dim: Optional[int] = None,
        crop_scales: Optional[Sequence[float]] = None,
        teacher_input_size: Optional[int] = None,
        clip_model: Optional[str] = None,
        num_distill_proposals: Optional[int] = None,
    ):
        if not cache_dir:
            raise TeacherCacheError(
                "MODEL.VILD.TEACHER is 'cache' but MODEL.VILD.TEACHER_CACHE is empty: set it to "
                f"a directory built by {VILD_TOOL}."
            )
        self.cache_dir = os.path.expanduser(cache_dir)
        expected: Dict[str, object] = {}
        if clip_model is not None:
            expected["clip_model"] = str(clip_model)
        if crop_scales is not None:
            expected["crop_scales"] = [float(s) for s in crop_scales]
        if teacher_input_size is not None:
            expected["teacher_input_size"] = int(teacher_input_size)
        self.meta = read_cache_meta(self.cache_dir, expected)
        if embed_dim is not None and self.meta.get("embed_dim") not in (None, embed_dim):
            raise TeacherCacheError(
                f"ViLD teacher cache {self.cache_dir!r} holds {self.meta['embed_dim']}-d "
                f"embeddings but MODEL.CLIP.EMBED_DIM is {embed_dim}."
            )
        self.embed_dim = embed_dim
        stored = self.meta.get("num_proposals")
        logger.info(
            f"ViLD teacher cache {self.cache_dir}: CLIP {self.meta.get('clip_model')}, "
            f"{self.meta.get('embed_dim')}-d, crop scales {self.meta.get('crop_scales')}, "
            f"teacher input {self.meta.get('teacher_input_size')}, proposals "
            f"{self.meta.get('proposals')} (up to {stored} per image), datasets "
            f"{self.meta.get('datasets')}"
        )
        if num_distill_proposals is not None and stored is not None:
            if int(stored) < int(num_distill_proposals):
                logger.warning(
                    f"ViLD teacher cache {self.cache_dir!r} holds at most {stored} proposals per "
                    f"image but MODEL.VILD.NUM_DISTILL_PROPOSALS is {num_distill_proposals}: "
                    f"distilling {stored}. Rebuild it with {VILD_TOOL} --num-proposals "
                    f"{num_distill_proposals} --overwrite to distill more."
                )

    def get(self, image_id, image_size: Optional[Sequence[int]] = None) -> Dict:
        """The validated entry of ``image_id`` (``image_size`` = original (H, W) to check)."""
        return read_cache_entry(
            cache_entry_path(self.cache_dir, image_id),
            embed_dim=self.embed_dim,
            image_id=image_id,
            image_size=image_size,
        )


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
