"""Image-level alignment: pull GridCLIP's pooled grid embeddings towards CLIP's image embedding.

The frozen CLIP image encoder (the *teacher*) embeds each training image, and optionally its
g x g tiles (``MODEL.GRIDCLIP.IMAGE_ALIGN_GRIDS``, e.g. ``[1, 2]``: the whole image and its four
quarters). The detector's grid embeddings of every FPN level are L2-normalised and average-pooled
over the same regions (per level, then averaged over levels) and aligned with the teacher's. This
carries CLIP's knowledge of objects that have no boxes (novel categories are in the pixels of
training images as "background") into the grid embeddings.

The teacher costs one CLIP forward (of ``sum(g*g)`` crops) per image, or nothing when its
embeddings are read from a cache built once by ``tools/cache_teacher_embeddings.py``
(``MODEL.GRIDCLIP.TEACHER_CACHE``). The online teacher sees the augmented training image, as the
student does. The cache holds embeddings of the un-augmented image: resizing does not matter
(the teacher resizes anyway) and CLIP is nearly flip-invariant, but a horizontal flip swaps the
left and right tiles; since the mapper does not tell whether an image was flipped, tiles (g > 1)
from the cache are compared both as stored and mirrored, and the closer match counts. Random
crops would invalidate cached tiles: use the online teacher with crop augmentation.

The teacher is deliberately *not* a registered submodule of the detector: it is held by a
:class:`~gridclip.modeling.teacher_holder.TeacherHolder` (not saved in checkpoints, not seen by
the optimizer or DDP, moved to the input device lazily, built only when training needs it).

Pooling: a view's grid embeddings (all FPN levels, normalised) are averaged into one student
embedding per level, then over levels. Other poolings were measured worse on the embedded world
and removed (docs/RESULTS.md: matched-level pooling, a soft maximum over each view's locations,
dense MaskCLIP-style alignment of every location).

Loss (``MODEL.GRIDCLIP.IMAGE_ALIGN_LOSS``), on L2-normalised student ``s`` / teacher ``t``:

- ``l1``: ``sum_d |s_d - t_d|``, i.e. the mean absolute difference x D, ViLD's scale for its
  image distillation (mean over images and tiles, then over grids);
- ``cosine``: ``1 - cos(s, t)``.

Both are multiplied by ``MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT``. The ``l1`` loss of unrelated unit
vectors is about ``sqrt(4 D / pi)`` (36 for D = 1024): weigh it accordingly.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import DatasetCatalog
from torch import nn

from ..clip import build_clip_teacher_from_cfg
from ..clip.teacher_cache import (
    TeacherEmbeddingCache,
    gridclip_teacher_provenance,
    teacher_cache_key,
)
from .teacher_holder import TeacherHolder

logger = logging.getLogger(__name__)

__all__ = [
    "ImageAlignment",
    "TeacherEmbeddingCache",
    "build_image_alignment",
    "teacher_cache_key",
    "pool_grid_embeddings",
    "raw_rgb_image",
]

ALIGN_LOSSES = ("l1", "cosine")


def raw_rgb_image(image: torch.Tensor, input_format: str) -> torch.Tensor:
    """A Detectron2 input image (3, H, W), 0-255 in ``INPUT.FORMAT``, as float RGB 0-255."""
    assert (
        image.dim() == 3 and image.shape[0] == 3
    ), f"expected a (3, H, W) image, got {image.shape}"
    if input_format == "BGR":
        image = image.flip(0)
    else:
        assert (
            input_format == "RGB"
        ), f"image alignment needs INPUT.FORMAT RGB or BGR, not {input_format}"
    return image.float()


def valid_embeddings(
    x: torch.Tensor, i: int, stride: int, h: int, w: int, embed_dim: int
) -> torch.Tensor:
    """Image ``i``'s L2-normalised embeddings of one level over its valid (unpadded) region:
    (G, D, h_l, w_l) float32, G = 1 per location or A per anchor."""
    _, e, hi, wi = x.shape
    assert e % embed_dim == 0, f"embedding channels {e} not a multiple of D={embed_dim}"
    valid_h = max(1, min(hi, math.ceil(h / stride)))
    valid_w = max(1, min(wi, math.ceil(w / stride)))
    emb = x[i, :, :valid_h, :valid_w].reshape(e // embed_dim, embed_dim, valid_h, valid_w)
    return F.normalize(emb.float(), dim=1)


def pool_grid_embeddings(
    grid_embeddings: Sequence[torch.Tensor],
    strides: Sequence[int],
    image_sizes: Sequence[Tuple[int, int]],
    grids: Sequence[int],
    embed_dim: int,
) -> List[torch.Tensor]:
    """Student views: grid embeddings pooled over the whole image and its g x g tiles.

    Args:
        grid_embeddings: per level (N, E, Hi, Wi), E = D (one embedding per location) or A*D
            (one per anchor; the anchors' normalised embeddings are averaged).
        strides: per level, the stride of its feature map in input pixels.
        image_sizes: per image (h, w) before padding; only the valid region is pooled.
        grids: tile counts per side.
        embed_dim: D.
    Returns:
        list over grids of (N, g*g, D) L2-normalised embeddings, tiles in row-major order.
    """
    assert len(grid_embeddings) == len(strides), "one stride per level"
    pooled = [[] for _ in grids]  # [grid][image] -> (g*g, D)
    for i, (h, w) in enumerate(image_sizes):
        per_grid = [0.0 for _ in grids]
        for x, stride in zip(grid_embeddings, strides):
            emb = valid_embeddings(x, i, stride, h, w, embed_dim).mean(dim=0)  # (D, h_l, w_l)
            for j, g in enumerate(grids):
                tiles = F.adaptive_avg_pool2d(emb, (g, g))  # (D, g, g)
                per_grid[j] = per_grid[j] + tiles.flatten(1).t()
        for j in range(len(grids)):
            pooled[j].append(F.normalize(per_grid[j], dim=-1))
    return [torch.stack(p) for p in pooled]


def mirror_tiles(tiles: torch.Tensor, g: int) -> torch.Tensor:
    """(..., g*g, D) row-major tiles -> the tiles of the horizontally flipped image."""
    shape = tiles.shape
    tiles = tiles.reshape(*shape[:-2], g, g, shape[-1]).flip(-2)
    return tiles.reshape(shape)


class ImageAlignment(nn.Module):
    """Image-level alignment loss between pooled grid embeddings and CLIP image embeddings.

    Has no parameters and no state_dict entries: the teacher (in a :class:`TeacherHolder`) and
    the cache are plain attributes.
    """

    @configurable
    def __init__(
        self,
        *,
        embed_dim: int,
        weight: float = 1.0,
        loss_type: str = "l1",
        grids: Sequence[int] = (1,),
        teacher: Optional[nn.Module] = None,
        teacher_factory: Optional[Callable[[], nn.Module]] = None,
        teacher_cache: Optional[TeacherEmbeddingCache] = None,
        input_format: str = "RGB",
    ):
        """
        Args:
            embed_dim: D, CLIP's joint-space dimension.
            weight: loss weight (> 0).
            loss_type: ``"l1"`` (sum over D of |s - t|, ViLD's scale) or ``"cosine"`` (1 - cos).
            grids: tile counts per side; 1 = the whole image.
            teacher: a ``gridclip.clip.CLIPImageTeacher`` (``embed_tiles``) ...
            teacher_factory: ... or a function building one on first use (so that evaluation,
                which never needs it, never loads it).
            teacher_cache: a :class:`TeacherEmbeddingCache`; used instead of the teacher.
            input_format: ``INPUT.FORMAT`` of the raw input images (RGB or BGR).
        """
        super().__init__()
        assert weight > 0, f"MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT must be > 0 here, got {weight}"
        if loss_type not in ALIGN_LOSSES:
            raise ValueError(
                f"MODEL.GRIDCLIP.IMAGE_ALIGN_LOSS={loss_type!r}; choose one of {ALIGN_LOSSES}"
            )
        grids = [int(g) for g in grids]
        if not grids or any(g < 1 for g in grids) or len(set(grids)) != len(grids):
            raise ValueError(
                f"MODEL.GRIDCLIP.IMAGE_ALIGN_GRIDS={grids}: expected distinct positive ints"
            )
        if input_format not in ("RGB", "BGR"):
            raise ValueError(
                f"image alignment feeds raw images to CLIP and needs INPUT.FORMAT RGB or BGR, "
                f"got {input_format!r}"
            )
        if teacher_cache is None and teacher is None and teacher_factory is None:
            raise ValueError("image alignment needs a teacher, a teacher factory or a cache")
        if teacher_cache is not None:
            missing = [g for g in grids if g not in teacher_cache.grids]
            assert not missing, f"teacher cache lacks grids {missing}"
            assert (
                teacher_cache.embed_dim == embed_dim
            ), f"teacher cache dim {teacher_cache.embed_dim} != model dim {embed_dim}"
        self.embed_dim = int(embed_dim)
        self.weight = float(weight)
        self.loss_type = loss_type
        self.grids = grids
        self.input_format = input_format
        # A plain object, not a submodule: never in the state_dict, never given to the
        # optimizer, never wrapped by DDP.
        self.teacher_holder = TeacherHolder(
            teacher, teacher_factory, name="CLIP image teacher of image-level alignment"
        )
        self.teacher_cache = teacher_cache

    @classmethod
    def from_config(cls, cfg):
        g = cfg.MODEL.GRIDCLIP
        ret = {
            "embed_dim": cfg.MODEL.CLIP.EMBED_DIM,
            "weight": g.IMAGE_ALIGN_WEIGHT,
            "loss_type": g.IMAGE_ALIGN_LOSS,
            "grids": list(g.IMAGE_ALIGN_GRIDS),
            "input_format": cfg.INPUT.FORMAT,
        }
        if g.TEACHER_CACHE:
            # the cache must come from the model's CLIP, teacher input size and training data
            train = [n for n in cfg.DATASETS.TRAIN if n in DatasetCatalog.list()]
            unregistered = [n for n in cfg.DATASETS.TRAIN if n not in train]
            if unregistered:  # e.g. a model fed by hand (benchmark): no images to compare
                logger.warning(
                    f"DATASETS.TRAIN {unregistered} are not registered datasets: the teacher cache "
                    f"{g.TEACHER_CACHE} is checked for its CLIP and settings, not for their images"
                )
            expected = gridclip_teacher_provenance(cfg, train)
            cache = TeacherEmbeddingCache.load(
                g.TEACHER_CACHE,
                embed_dim=cfg.MODEL.CLIP.EMBED_DIM,
                grids=g.IMAGE_ALIGN_GRIDS,
                expected_provenance=expected,
            )
            ret["teacher_cache"] = cache
            logger.info(
                f"Image alignment reads {len(cache)} cached teacher embeddings from "
                f"{g.TEACHER_CACHE} (CLIP {cache.provenance.get('clip')}, teacher input "
                f"{cache.provenance.get('teacher_input_size')}, grids {cache.grids}, dataset "
                f"{cache.provenance.get('dataset')})"
            )
        else:
            ret["teacher_factory"] = functools.partial(build_clip_teacher_from_cfg, cfg.clone())
        return ret

    @property
    def teacher(self) -> Optional[nn.Module]:
        """The CLIP teacher (built on first access when given a factory); None with a cache."""
        if self.teacher_cache is not None and not self.teacher_holder.available:
            return None
        return self.teacher_holder.get()

    def extra_repr(self) -> str:
        source = f"cache={self.teacher_cache.path}" if self.teacher_cache else "teacher=online"
        return f"loss={self.loss_type}, weight={self.weight}, grids={self.grids}, {source}"

    @torch.no_grad()
    def teacher_embeddings(self, batched_inputs: List[Dict], device) -> List[torch.Tensor]:
        """Teacher views of each input: list over grids of (N, g*g, D) normalised, on ``device``."""
        if self.teacher_cache is not None:
            per_image = [
                self.teacher_cache.get(teacher_cache_key(x), self.grids) for x in batched_inputs
            ]
        else:
            teacher = self.teacher_holder.on(device)
            per_image = []
            for x in batched_inputs:
                image = raw_rgb_image(x["image"].to(device), self.input_format)
                views = teacher.embed_tiles(image[None], grids=self.grids)
                per_image.append([v[0] for v in views])
        return [
            torch.stack([views[j] for views in per_image]).to(device=device, dtype=torch.float32)
            for j in range(len(self.grids))
        ]

    def alignment_loss(
        self, student: List[torch.Tensor], teacher: List[torch.Tensor], mirror_ambiguous: bool
    ) -> torch.Tensor:
        """Loss between lists over grids of (N, g*g, D) normalised embeddings (unweighted).

        With ``mirror_ambiguous`` (cached teacher + possibly flipped inputs) tiles are compared
        both as they are and mirrored left-right, and the closer of the two counts per image.
        """
        losses = []
        for g, s, t in zip(self.grids, student, teacher):
            per_tile = self._per_tile_loss(s, t)  # (N, g*g)
            per_image = per_tile.mean(dim=1)
            if mirror_ambiguous and g > 1:
                mirrored = self._per_tile_loss(s, mirror_tiles(t, g)).mean(dim=1)
                per_image = torch.minimum(per_image, mirrored)
            losses.append(per_image.mean())
        return torch.stack(losses).mean()

    def _per_tile_loss(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.loss_type == "l1":
            return (s - t).abs().sum(dim=-1)
        return 1.0 - (s * t).sum(dim=-1)

    def forward(
        self,
        grid_embeddings: Sequence[torch.Tensor],
        strides: Sequence[int],
        image_sizes: Sequence[Tuple[int, int]],
        batched_inputs: List[Dict],
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            grid_embeddings: per level (N, E, Hi, Wi) head embeddings (E = D or A*D).
            strides: per level stride; image_sizes: per image (h, w) before padding.
            batched_inputs: the detector's inputs (``image``: (3, H, W) 0-255 in INPUT.FORMAT;
                ``image_id`` / ``file_name`` for the cache).
        Returns:
            {"loss_image_align": scalar}.
        """
        assert len(batched_inputs) == grid_embeddings[0].shape[0], "one input per image"
        device = grid_embeddings[0].device
        with torch.autocast(device_type=device.type, enabled=False):
            teacher = self.teacher_embeddings(batched_inputs, device)
            student = pool_grid_embeddings(
                grid_embeddings, strides, image_sizes, self.grids, self.embed_dim
            )
            loss = self.alignment_loss(student, teacher, self.teacher_cache is not None)
        return {"loss_image_align": loss * self.weight}


def build_image_alignment(cfg) -> Optional[ImageAlignment]:
    """The image-alignment module of ``cfg``, or None when IMAGE_ALIGN_WEIGHT is 0 (no teacher)."""
    weight = cfg.MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT
    if weight < 0:
        raise ValueError(f"MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT must be >= 0, got {weight}")
    if weight == 0:
        return None
    return ImageAlignment(cfg)
