"""The frozen CLIP image encoder used as a distillation teacher.

GridCLIP aligns pooled grid embeddings with the teacher's embedding of the whole image (and
optionally of its tiles); ViLD distils region embeddings to the teacher's embeddings of proposal
crops at 1x and 1.5x. All views are cut and resized with one ``torchvision.ops.roi_align`` call
per chunk (anti-aliased by its adaptive sampling), so whole images, tiles and boxes go through
exactly the same path.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from .dense import (
    CLIP_PIXEL_MEAN_255,
    CLIP_PIXEL_STD_255,
    attnpool_pooled,
    modified_resnet_features,
)
from .loading import clip_embed_dim, load_clip_from_cfg

logger = logging.getLogger(__name__)

__all__ = ["CLIPImageTeacher", "build_clip_teacher_from_cfg"]


class CLIPImageTeacher(nn.Module):
    """Frozen wrapper around a CLIP model's visual encoder.

    Always in eval mode, parameters with ``requires_grad=False``, every method runs under
    ``torch.no_grad``. Inputs are RGB images on a 0-255 scale (any float dtype/device; moved to
    the teacher's device). Outputs are float32, L2-normalised, on the teacher's device.

    A ModifiedResNet teacher runs at any ``input_size`` (its attention-pool positional
    embedding is interpolated); at the model's native resolution it equals
    ``clip_model.encode_image``. A ViT teacher needs ``input_size`` == its native resolution.
    """

    def __init__(self, clip_model, input_size: int = 224, chunk_size: int = 64):
        """
        Args:
            clip_model: a ``clip.model.CLIP``; only its ``visual`` tower is kept (and frozen in
                place: pass a copy if the model is used elsewhere for training).
            input_size: side of the square crops fed to CLIP (RN50: 224).
            chunk_size: crops per CLIP forward (bounds memory for hundreds of boxes).
        """
        super().__init__()
        self.visual = clip_model.visual
        self.embed_dim = clip_embed_dim(clip_model)
        # CLIP's learned temperature: image-text logits = logit_scale x cosine.
        scale = getattr(clip_model, "logit_scale", None)
        self.logit_scale = float(scale.exp()) if scale is not None else 100.0
        self.input_size = int(input_size)
        self.chunk_size = int(chunk_size)
        assert self.input_size >= 32, f"teacher input size {input_size} is below CLIP's stride 32"
        assert self.chunk_size > 0, f"chunk_size must be positive, got {chunk_size}"
        self.is_resnet = hasattr(self.visual, "attnpool")
        if not self.is_resnet:
            native = int(self.visual.input_resolution)
            assert self.input_size == native, (
                f"a ViT CLIP teacher runs only at its native resolution {native}, got input "
                f"size {input_size} (MODEL.CLIP.TEACHER_INPUT_SIZE)"
            )
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.register_buffer(
            "pixel_mean", torch.tensor(CLIP_PIXEL_MEAN_255).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(CLIP_PIXEL_STD_255).view(1, 3, 1, 1), persistent=False
        )
        self.train(False)

    def train(self, mode: bool = True):
        # The teacher never trains: BatchNorm statistics and weights stay CLIP's.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, embed_dim={self.embed_dim}, frozen=True"

    # ------------------------------------------------------------------------------ internals
    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB 0-255 -> CLIP-normalised float32 on the teacher's device."""
        assert (
            images.ndim == 4 and images.shape[1] == 3
        ), f"expected (N, 3, H, W) RGB images, got {tuple(images.shape)}"
        images = images.to(device=self.device, dtype=torch.float32)
        return (images - self.pixel_mean) / self.pixel_std

    def _encode(self, crops: torch.Tensor) -> torch.Tensor:
        """(K, 3, S, S) normalised crops -> (K, D) float32 embeddings (not normalised)."""
        dtype = next(self.visual.parameters()).dtype
        crops = crops.to(dtype)
        if self.is_resnet:
            res5 = modified_resnet_features(self.visual, crops)["res5"]
            return attnpool_pooled(self.visual.attnpool, res5).float()
        return self.visual(crops).float()

    def _embed_rois(self, images: torch.Tensor, rois: torch.Tensor, chunk_size: Optional[int]):
        """Crop rois (K, 5) = (batch index, x1, y1, x2, y2) from normalised images, resize to
        input_size, encode; returns (K, D) normalised float32."""
        chunk = int(chunk_size or self.chunk_size)
        out = []
        for start in range(0, rois.shape[0], chunk):
            crops = roi_align(
                images,
                rois[start : start + chunk],
                output_size=(self.input_size, self.input_size),
                spatial_scale=1.0,
                sampling_ratio=-1,  # adaptive: averages ceil(bin size) samples (anti-aliasing)
                aligned=True,
            )
            out.append(F.normalize(self._encode(crops), dim=-1))
        if not out:
            return images.new_zeros((0, self.embed_dim))
        return torch.cat(out, dim=0)

    # ---------------------------------------------------------------------------------- API
    @torch.no_grad()
    def embed_images(self, images: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
        """
        Args:
            images: (N, 3, H, W) RGB, 0-255.
        Returns:
            (N, D) L2-normalised embeddings of the whole images resized to input_size square.
        """
        return self.embed_tiles(images, grids=(1,), chunk_size=chunk_size)[0][:, 0]

    @torch.no_grad()
    def embed_tiles(
        self, images: torch.Tensor, grids: Sequence[int] = (1, 2), chunk_size: Optional[int] = None
    ) -> List[torch.Tensor]:
        """Embeddings of the g x g tiles of each image, for each g in ``grids``.

        Args:
            images: (N, 3, H, W) RGB, 0-255.
            grids: tile counts per side (1 = the whole image).
        Returns:
            list over grids of (N, g*g, D) L2-normalised embeddings, tiles in row-major order.
        """
        images = self._normalize(images)
        n, _, h, w = images.shape
        rois, counts = [], []
        for g in grids:
            g = int(g)
            assert g >= 1, f"grid sizes must be >= 1, got {list(grids)}"
            ys = torch.linspace(0, h, g + 1, device=self.device)
            xs = torch.linspace(0, w, g + 1, device=self.device)
            y1, x1 = torch.meshgrid(ys[:-1], xs[:-1], indexing="ij")
            y2, x2 = torch.meshgrid(ys[1:], xs[1:], indexing="ij")
            tiles = torch.stack([x1, y1, x2, y2], dim=-1).reshape(g * g, 4)
            idx = torch.arange(n, device=self.device, dtype=torch.float32)
            idx = idx.repeat_interleave(g * g)[:, None]
            rois.append(torch.cat([idx, tiles.repeat(n, 1)], dim=1))
            counts.append(g * g)
        emb = self._embed_rois(images, torch.cat(rois, dim=0), chunk_size)
        out, start = [], 0
        for c in counts:
            out.append(emb[start : start + n * c].reshape(n, c, -1))
            start += n * c
        return out

    @torch.no_grad()
    def embed_boxes(
        self,
        image: torch.Tensor,
        boxes: torch.Tensor,
        scales: Sequence[float] = (1.0, 1.5),
        chunk_size: Optional[int] = None,
    ) -> torch.Tensor:
        """ViLD's region teacher: crops around each box at each scale, embeddings ensembled.

        Args:
            image: (3, H, W) RGB, 0-255.
            boxes: (R, 4) XYXY in absolute pixels of ``image`` (a tensor or ``Boxes``).
            scales: each box is enlarged about its centre by each factor and clipped to the
                image; the per-scale normalised embeddings are summed.
        Returns:
            (R, D) L2-normalised embeddings (R may be 0).
        """
        boxes = getattr(boxes, "tensor", boxes)  # also accepts detectron2.structures.Boxes
        assert image.ndim == 3, f"expected one (3, H, W) image, got {tuple(image.shape)}"
        assert (
            boxes.ndim == 2 and boxes.shape[1] == 4
        ), f"expected (R, 4) XYXY boxes, got {tuple(boxes.shape)}"
        assert len(scales) > 0, "at least one crop scale is needed"
        images = self._normalize(image[None])
        _, _, h, w = images.shape
        boxes = boxes.to(device=self.device, dtype=torch.float32)
        r = boxes.shape[0]
        if r == 0:
            return boxes.new_zeros((0, self.embed_dim))
        ctr = (boxes[:, :2] + boxes[:, 2:]) / 2
        size = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1.0)  # degenerate boxes: 1 px
        rois = []
        for s in scales:
            half = size * float(s) / 2
            xy1 = ctr - half
            xy2 = ctr + half
            crop = torch.cat([xy1, xy2], dim=1)
            crop[:, 0::2] = crop[:, 0::2].clamp(0, w)
            crop[:, 1::2] = crop[:, 1::2].clamp(0, h)
            rois.append(crop)
        rois = torch.cat(rois, dim=0)
        rois = torch.cat([rois.new_zeros((rois.shape[0], 1)), rois], dim=1)
        emb = self._embed_rois(images, rois, chunk_size).reshape(len(scales), r, -1)
        return F.normalize(emb.sum(dim=0), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`embed_images`."""
        return self.embed_images(images)


def build_clip_teacher_from_cfg(cfg) -> CLIPImageTeacher:
    """The teacher of ``cfg.MODEL.CLIP`` (its own copy of the CLIP visual tower, on CPU)."""
    clip_model = load_clip_from_cfg(cfg, copy_model=True)
    return CLIPImageTeacher(clip_model, input_size=cfg.MODEL.CLIP.TEACHER_INPUT_SIZE)
