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

The teacher is deliberately *not* a registered submodule of the detector: it is not saved in
checkpoints, not seen by the optimizer or DDP, and is moved to the input device lazily.

Pooling (``MODEL.GRIDCLIP.IMAGE_ALIGN_POOL``): ``mean`` averages a view's grid embeddings into
one student embedding (per level, then over levels); ``matched`` averages them only on the level
whose anchors match the view's size (a 64 px tile is compared with the locations whose 64 px
anchors cover it), so each view is distilled into the locations that detect objects of its
size; ``max`` is a multiple-instance alignment: per view, a soft maximum (softmax
weights at ``IMAGE_ALIGN_TEMPERATURE``) over its locations (all levels; a location belongs to the
tile holding its centre) of cos(grid embedding, teacher), so the loss pulls the locations that
already resemble the view's content to CLIP's embedding of it and leaves background locations to
the detection loss. A view then holds a few objects, not a scene average: use small tiles (e.g.
grids ``[1, 2, 4]``). With ``max`` the loss is ``1 - soft max of the cosines`` (``cosine``) or
the L1 distance from the teacher of the soft-max-weighted mean of the normalised embeddings.
``dense`` pools nothing: the teacher embeds the whole image once, densely (the attention pool's
value path at every res5 cell, MaskCLIP-style, at ``IMAGE_ALIGN_DENSE_SCALE`` times the input
size), and every grid location of every level is aligned with the teacher's embedding sampled
(bilinearly) at its centre; the loss is averaged over locations per level, then over levels.
A ModifiedResNet teacher is needed, online (no cache); the grids are not used.

Loss (``MODEL.GRIDCLIP.IMAGE_ALIGN_LOSS``), on L2-normalised student ``s`` / teacher ``t``:

- ``l1``: ``sum_d |s_d - t_d|``, i.e. the mean absolute difference x D, ViLD's scale for its
  image distillation (mean over images and tiles, then over grids);
- ``cosine``: ``1 - cos(s, t)``.

Both are multiplied by ``MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT``. The ``l1`` loss of unrelated unit
vectors is about ``sqrt(4 D / pi)`` (36 for D = 1024): weigh it accordingly.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from ..clip import build_clip_teacher_from_cfg
from ..clip.teacher_cache import TeacherEmbeddingCache, teacher_cache_key

logger = logging.getLogger(__name__)

__all__ = [
    "ImageAlignment",
    "TeacherEmbeddingCache",
    "build_image_alignment",
    "teacher_cache_key",
    "pool_grid_embeddings",
    "attention_pool_grid_embeddings",
    "raw_rgb_image",
]

ALIGN_LOSSES = ("l1", "cosine")
ALIGN_POOLS = ("mean", "matched", "max", "dense")


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


def location_centres(hi: int, wi: int, stride: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Centres (y, x) in input pixels of an (hi, wi) level's locations, each (hi, wi): the
    anchor generator's convention (offset 0.5 of a stride)."""
    ys = (torch.arange(hi, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(wi, device=device, dtype=torch.float32) + 0.5) * stride
    return torch.meshgrid(ys, xs, indexing="ij")


def _level_locations(x: torch.Tensor, i: int, stride: int, h: int, w: int, embed_dim: int):
    """Image ``i``'s valid locations of one level: (L, D) normalised embeddings and (L,) centre
    coordinates y, x in input pixels (per-anchor embeddings: A rows per location)."""
    emb = valid_embeddings(x, i, stride, h, w, embed_dim)  # (G, D, h_l, w_l)
    group, _, valid_h, valid_w = emb.shape
    emb = emb.flatten(2).permute(0, 2, 1).reshape(-1, embed_dim)
    cy, cx = location_centres(valid_h, valid_w, stride, x.device)
    return emb, cy.reshape(-1).repeat(group), cx.reshape(-1).repeat(group)


def matched_levels(
    image_sizes: Sequence[Tuple[int, int]], grids: Sequence[int], anchor_sizes: Sequence[float]
) -> List[List[int]]:
    """Per image, per grid: the level whose anchor size is closest (log scale) to the tile's."""
    log_sizes = torch.tensor([math.log2(a) for a in anchor_sizes])
    out = []
    for h, w in image_sizes:
        tile = [math.log2(max(1.0, math.sqrt(h * w) / g)) for g in grids]
        out.append([int((log_sizes - t).abs().argmin()) for t in tile])
    return out


def pool_matched_grid_embeddings(
    grid_embeddings: Sequence[torch.Tensor],
    strides: Sequence[int],
    image_sizes: Sequence[Tuple[int, int]],
    grids: Sequence[int],
    embed_dim: int,
    anchor_sizes: Sequence[float],
) -> List[torch.Tensor]:
    """Like :func:`pool_grid_embeddings`, but each grid's tiles are pooled only on the level
    whose anchor size (``anchor_sizes[level]``) is closest to the tile size."""
    assert len(grid_embeddings) == len(strides) == len(anchor_sizes), "one entry per level"
    levels = matched_levels(image_sizes, grids, anchor_sizes)
    pooled = [[] for _ in grids]
    for i, (h, w) in enumerate(image_sizes):
        for j, g in enumerate(grids):
            x, stride = grid_embeddings[levels[i][j]], strides[levels[i][j]]
            emb = valid_embeddings(x, i, stride, h, w, embed_dim).mean(dim=0)
            tiles = F.adaptive_avg_pool2d(emb, (g, g)).flatten(1).t()
            pooled[j].append(F.normalize(tiles, dim=-1))
    return [torch.stack(p) for p in pooled]


def attention_pool_grid_embeddings(
    grid_embeddings: Sequence[torch.Tensor],
    strides: Sequence[int],
    image_sizes: Sequence[Tuple[int, int]],
    grids: Sequence[int],
    embed_dim: int,
    teacher: Sequence[torch.Tensor],
    temperature: float,
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Student views for multiple-instance alignment (``IMAGE_ALIGN_POOL: max``).

    Each view's locations (every level; a location belongs to the tile that holds its centre)
    are weighted by ``softmax(cos(grid embedding, teacher view) / temperature)``.

    Args:
        grid_embeddings, strides, image_sizes, grids, embed_dim: as :func:`pool_grid_embeddings`.
        teacher: list over grids of (N, g*g, D) normalised teacher embeddings.
        temperature: softmax temperature on cosines (small: close to a hard maximum).
    Returns:
        (similarities, pooled): lists over grids of (N, g*g) soft-max cosines and of (N, g*g, D)
        normalised weighted means of the locations' embeddings.
    """
    assert len(grid_embeddings) == len(strides), "one stride per level"
    assert temperature > 0, f"temperature must be > 0, got {temperature}"
    sims = [[] for _ in grids]
    pooled = [[] for _ in grids]
    for i, (h, w) in enumerate(image_sizes):
        parts = [
            _level_locations(x, i, s, h, w, embed_dim) for x, s in zip(grid_embeddings, strides)
        ]
        emb = torch.cat([p[0] for p in parts])  # (L, D)
        cy = torch.cat([p[1] for p in parts])
        cx = torch.cat([p[2] for p in parts])
        for j, g in enumerate(grids):
            row = (cy * g / h).long().clamp_(0, g - 1)
            col = (cx * g / w).long().clamp_(0, g - 1)
            tile = row * g + col  # (L,)
            views = teacher[j][i].to(emb.dtype)  # (g*g, D)
            cos = views @ emb.t()  # (g*g, L)
            inside = tile[None, :] == torch.arange(g * g, device=tile.device)[:, None]
            weights = torch.softmax((cos / temperature).masked_fill(~inside, float("-inf")), 1)
            weights = torch.nan_to_num(weights)  # a view without locations: all-zero weights
            sims[j].append((weights * cos).sum(dim=1))
            pooled[j].append(F.normalize(weights @ emb, dim=-1))
    return [torch.stack(s) for s in sims], [torch.stack(p) for p in pooled]


def sample_dense_targets(
    teacher: torch.Tensor, strides: Sequence[int], shapes: Sequence[Tuple[int, int]], h: int, w: int
) -> List[torch.Tensor]:
    """One image's dense teacher map (D, th, tw), covering its (h, w) valid region, sampled at
    the centres of each level's locations: list over levels of (D, Hi, Wi), re-normalised."""
    out = []
    for stride, (hi, wi) in zip(strides, shapes):
        cy, cx = location_centres(hi, wi, stride, teacher.device)
        gy, gx = cy / h * 2 - 1, cx / w * 2 - 1
        grid = torch.stack([gx, gy], dim=-1)[None]  # (1, Hi, Wi, 2), x first
        sampled = F.grid_sample(
            teacher[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        out.append(F.normalize(sampled[0], dim=0))
    return out


def mirror_tiles(tiles: torch.Tensor, g: int) -> torch.Tensor:
    """(..., g*g, D) row-major tiles -> the tiles of the horizontally flipped image."""
    shape = tiles.shape
    tiles = tiles.reshape(*shape[:-2], g, g, shape[-1]).flip(-2)
    return tiles.reshape(shape)


class ImageAlignment(nn.Module):
    """Image-level alignment loss between pooled grid embeddings and CLIP image embeddings.

    Has no parameters and no state_dict entries: the teacher and the cache are plain attributes.
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
        pool: str = "mean",
        temperature: float = 0.05,
        dense_scale: float = 1.0,
        anchor_sizes: Optional[Sequence[float]] = None,
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
            pool: ``"mean"`` (average-pool each view) or ``"max"`` (multiple-instance: soft
                maximum over each view's locations; module doc).
            temperature: softmax temperature of ``"max"`` pooling, on cosines.
            dense_scale: ``"dense"``: the teacher encodes the image at this times its size.
            anchor_sizes: ``"matched"``: the (first) anchor size of each level.
        """
        super().__init__()
        assert weight > 0, f"MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT must be > 0 here, got {weight}"
        if loss_type not in ALIGN_LOSSES:
            raise ValueError(
                f"MODEL.GRIDCLIP.IMAGE_ALIGN_LOSS={loss_type!r}; choose one of {ALIGN_LOSSES}"
            )
        if pool not in ALIGN_POOLS:
            raise ValueError(
                f"MODEL.GRIDCLIP.IMAGE_ALIGN_POOL={pool!r}; choose one of {ALIGN_POOLS}"
            )
        if not temperature > 0:
            raise ValueError(
                f"MODEL.GRIDCLIP.IMAGE_ALIGN_TEMPERATURE must be > 0, got {temperature}"
            )
        if pool == "matched" and not anchor_sizes:
            raise ValueError("IMAGE_ALIGN_POOL 'matched' needs the anchor size of each level")
        if pool == "dense" and teacher_cache is not None:
            raise ValueError(
                "MODEL.GRIDCLIP.IMAGE_ALIGN_POOL 'dense' needs the online teacher; the teacher "
                "cache holds pooled views only: set MODEL.GRIDCLIP.TEACHER_CACHE ''"
            )
        if not dense_scale > 0:
            raise ValueError(
                f"MODEL.GRIDCLIP.IMAGE_ALIGN_DENSE_SCALE must be > 0, got {dense_scale}"
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
        self.pool = pool
        self.temperature = float(temperature)
        self.dense_scale = float(dense_scale)
        self.anchor_sizes = [float(a) for a in anchor_sizes] if anchor_sizes else None
        # Plain attributes (object.__setattr__ skips nn.Module registration): never in the
        # state_dict, never given to the optimizer, never wrapped by DDP.
        object.__setattr__(self, "_teacher", teacher)
        object.__setattr__(self, "_teacher_factory", teacher_factory)
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
            "pool": g.IMAGE_ALIGN_POOL,
            "temperature": g.IMAGE_ALIGN_TEMPERATURE,
            "dense_scale": g.IMAGE_ALIGN_DENSE_SCALE,
            "anchor_sizes": level_anchor_sizes(cfg),
        }
        if g.TEACHER_CACHE:
            ret["teacher_cache"] = TeacherEmbeddingCache.load(
                g.TEACHER_CACHE, embed_dim=cfg.MODEL.CLIP.EMBED_DIM, grids=g.IMAGE_ALIGN_GRIDS
            )
            logger.info(
                f"Image alignment reads {len(ret['teacher_cache'])} cached teacher embeddings "
                f"from {g.TEACHER_CACHE}"
            )
        else:
            teacher_cfg = cfg.clone()
            ret["teacher_factory"] = lambda: build_clip_teacher_from_cfg(teacher_cfg)
        return ret

    @property
    def teacher(self) -> Optional[nn.Module]:
        """The CLIP teacher (built on first access when given a factory); None with a cache."""
        if self._teacher is None and self._teacher_factory is not None:
            object.__setattr__(self, "_teacher", self._teacher_factory())
            logger.info(
                f"Built the CLIP image teacher ({type(self._teacher).__name__}, "
                f"{self._teacher.extra_repr()})"
            )
        return self._teacher

    def teacher_on(self, device) -> nn.Module:
        """The online teacher, moved to ``device`` on first use there (lazily: the detector's
        ``.to()`` does not see it)."""
        teacher = self.teacher
        if teacher.device != torch.device(device):
            teacher.to(device)
        return teacher

    def extra_repr(self) -> str:
        source = f"cache={self.teacher_cache.path}" if self.teacher_cache else "teacher=online"
        pool = {
            "mean": "mean",
            "matched": "matched",
            "max": f"max(T={self.temperature})",
            "dense": f"dense(scale={self.dense_scale})",
        }[self.pool]
        return (
            f"loss={self.loss_type}, pool={pool}, weight={self.weight}, grids={self.grids}, "
            f"{source}"
        )

    @torch.no_grad()
    def teacher_embeddings(self, batched_inputs: List[Dict], device) -> List[torch.Tensor]:
        """Teacher views of each input: list over grids of (N, g*g, D) normalised, on ``device``."""
        if self.teacher_cache is not None:
            per_image = [
                self.teacher_cache.get(teacher_cache_key(x), self.grids) for x in batched_inputs
            ]
        else:
            teacher = self.teacher_on(device)
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
            if self.pool == "dense":
                loss = self._dense_alignment_loss(
                    grid_embeddings, strides, image_sizes, batched_inputs
                )
                return {"loss_image_align": loss * self.weight}
            teacher = self.teacher_embeddings(batched_inputs, device)
            mirror = self.teacher_cache is not None
            if self.pool in ("mean", "matched"):
                if self.pool == "mean":
                    student = pool_grid_embeddings(
                        grid_embeddings, strides, image_sizes, self.grids, self.embed_dim
                    )
                else:
                    assert len(self.anchor_sizes) == len(grid_embeddings), (
                        f"{len(self.anchor_sizes)} anchor sizes (MODEL.ANCHOR_GENERATOR.SIZES) "
                        f"for {len(grid_embeddings)} levels"
                    )
                    student = pool_matched_grid_embeddings(
                        grid_embeddings,
                        strides,
                        image_sizes,
                        self.grids,
                        self.embed_dim,
                        self.anchor_sizes,
                    )
                loss = self.alignment_loss(student, teacher, mirror)
            else:
                loss = self._instance_alignment_loss(
                    grid_embeddings, strides, image_sizes, teacher, mirror
                )
        return {"loss_image_align": loss * self.weight}

    def _dense_alignment_loss(self, grid_embeddings, strides, image_sizes, batched_inputs):
        """``dense``: each location against the teacher's dense embedding at its centre."""
        device = grid_embeddings[0].device
        teacher = self.teacher_on(device)
        per_level = [[] for _ in grid_embeddings]
        for i, ((h, w), x) in enumerate(zip(image_sizes, batched_inputs)):
            image = raw_rgb_image(x["image"].to(device), self.input_format)[:, :h, :w]
            dense = teacher.embed_dense(image[None], self.dense_scale)[0]  # (D, th, tw)
            student = [
                valid_embeddings(emb, i, stride, h, w, self.embed_dim)
                for emb, stride in zip(grid_embeddings, strides)
            ]
            shapes = [tuple(s.shape[-2:]) for s in student]
            targets = sample_dense_targets(dense, strides, shapes, h, w)
            for lvl, (s, t) in enumerate(zip(student, targets)):
                t = t.to(s.dtype)[None]
                if self.loss_type == "cosine":
                    loss = 1.0 - (s * t).sum(dim=1)
                else:
                    loss = (s - t).abs().sum(dim=1)
                per_level[lvl].append(loss.flatten())
        return torch.stack([torch.cat(x).mean() for x in per_level]).mean()

    def _instance_alignment_loss(self, grid_embeddings, strides, image_sizes, teacher, mirror):
        """``max`` pooling: the student views depend on the teacher's, so a mirrored cached
        teacher pools the student again."""

        def per_grid(views):
            sims, pooled = attention_pool_grid_embeddings(
                grid_embeddings,
                strides,
                image_sizes,
                self.grids,
                self.embed_dim,
                views,
                self.temperature,
            )
            if self.loss_type == "cosine":
                return [1.0 - s for s in sims]
            return [self._per_tile_loss(p, t) for p, t in zip(pooled, views)]

        losses = [x.mean(dim=1) for x in per_grid(teacher)]
        if mirror and any(g > 1 for g in self.grids):
            flipped = [mirror_tiles(t, g) for t, g in zip(teacher, self.grids)]
            losses = [
                torch.minimum(a, b.mean(dim=1)) if g > 1 else a
                for a, b, g in zip(losses, per_grid(flipped), self.grids)
            ]
        return torch.stack([x.mean() for x in losses]).mean()


def level_anchor_sizes(cfg) -> List[float]:
    """The first anchor size of each level of ``MODEL.RETINANET.IN_FEATURES`` (Detectron2
    repeats a single list for every level)."""
    sizes = cfg.MODEL.ANCHOR_GENERATOR.SIZES
    levels = len(cfg.MODEL.RETINANET.IN_FEATURES)
    if len(sizes) == 1:
        sizes = list(sizes) * levels
    return [float(s[0]) for s in sizes]


def build_image_alignment(cfg) -> Optional[ImageAlignment]:
    """The image-alignment module of ``cfg``, or None when IMAGE_ALIGN_WEIGHT is 0 (no teacher)."""
    weight = cfg.MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT
    if weight < 0:
        raise ValueError(f"MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT must be >= 0, got {weight}")
    if weight == 0:
        return None
    return ImageAlignment(cfg)
