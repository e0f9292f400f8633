"""Grid embeddings computed only at the locations inference scores.

At inference GridCLIP scores the text product only at the locations its gate keeps
(``TEST_TOPK_LOCATIONS``, the exact score-threshold pruning; ``GridCLIP._scored_locations``):
at 800x1216, 1,000 of P3's 15,200. With the 1x1 embedding conv (the configs'), a location's
embedding depends on that location only: the conv is a (C -> D) linear map of the class
tower's C features there, and the dense CLIP term is a bilinear sample (or the cell itself, or
an average-pooled cell) of the normalised res5 map. So the D-dimensional map need not exist for
every location: :class:`EmbeddingRowsOnDemand` keeps the tower's C-channel features and makes
the embedding rows of the kept locations only. At 800x1216 that skips the 1x1 conv to D = 1,024
channels, the bilinear upsampling of the dense term to P3 and P4, its normalisation and the
sum over all ~20,000 locations (docs/BENCHMARKS.md, issue 13, seventh pass).

The rows equal those of the full maps up to float rounding (tests: relative 1e-5); the bilinear
sample follows ``F.interpolate(mode="bilinear", align_corners=False)``'s sampling rule.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["EmbeddingRowsOnDemand", "bilinear_rows", "dense_resampling"]


def dense_resampling(level_size, dense_size) -> str:
    """How the dense CLIP map (res5's size) is brought to a level of ``level_size`` (H, W):
    ``"same"`` (the map itself), ``"upsample"`` (bilinear, levels finer than res5) or ``"pool"``
    (adaptive average pooling, coarser ones). The one rule of the full maps
    (``GridCLIP._add_dense_clip``) and of the rows made on demand."""
    (height, width), (h5, w5) = tuple(level_size), tuple(dense_size)
    if (height, width) == (h5, w5):
        return "same"
    return "upsample" if height >= h5 and width >= w5 else "pool"


def _source_index(size_in: int, size_out: int, index: Tensor):
    """``F.interpolate``'s bilinear source of output ``index`` (align_corners=False): the two
    input indices and the weight of the second."""
    scale = size_in / size_out
    src = ((index.to(torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    low = src.floor().long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    return low, high, src - low.to(src.dtype)


def bilinear_rows(feature: Tensor, size, locations: Tensor) -> Tensor:
    """Rows of ``F.interpolate(feature[None], size, mode="bilinear", align_corners=False)``.

    Args:
        feature: (D, h, w) one image's map.
        size: (H, W) of the upsampled map.
        locations: (M,) flat indices into the (H, W) map.
    Returns:
        (M, D) the upsampled map's values at ``locations``.
    """
    height, width = size
    d, h, w = feature.shape
    y0, y1, wy = _source_index(h, height, torch.div(locations, width, rounding_mode="floor"))
    x0, x1, wx = _source_index(w, width, locations % width)
    flat = feature.reshape(d, h * w).t()  # (h*w, D)
    wy, wx = wy[:, None].to(feature.dtype), wx[:, None].to(feature.dtype)
    top = flat[y0 * w + x0] * (1 - wx) + flat[y0 * w + x1] * wx
    bottom = flat[y1 * w + x0] * (1 - wx) + flat[y1 * w + x1] * wx
    return top * (1 - wy) + bottom * wy


class EmbeddingRowsOnDemand:
    """One level's grid embeddings as rows, made only for the locations asked for.

    ``rows(image, locations)`` is ``embedding_rows(grid_embed(features) + dense term)[image]
    [locations]`` without the full maps (module doc).
    """

    def __init__(
        self,
        features: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        dense: Optional[Tensor] = None,
        dense_scale: Optional[Tensor] = None,
    ):
        """
        Args:
            features: (N, C, H, W) the class tower's output at this level.
            weight: (D, C) the 1x1 embedding conv's weight; bias: (D,) or None.
            dense: (N, D, h5, w5) the normalised dense CLIP map, or None (no dense term).
            dense_scale: the dense term's weight (a scalar tensor).
        """
        self.features = features
        self.weight = weight
        self.bias = bias
        self.dense = dense
        self.dense_scale = dense_scale

    def rows(self, image: int, locations: Optional[Tensor] = None) -> Tensor:
        """(M, D) embedding rows of image ``image`` at ``locations`` ((H*W) order; None: all)."""
        feature = self.features[image]
        c, height, width = feature.shape
        feature_rows = feature.permute(1, 2, 0).reshape(-1, c)  # (H*W, C), no copy channels-last
        if locations is not None:
            feature_rows = feature_rows[locations]
        if self.bias is None:
            out = feature_rows @ self.weight.t()
        else:
            out = torch.addmm(self.bias, feature_rows, self.weight.t())
        if self.dense is None:
            return out
        return out + self._dense_rows(image, (height, width), locations).to(out.dtype)

    def _dense_rows(self, image: int, size, locations: Optional[Tensor]) -> Tensor:
        """The dense CLIP term at ``locations``, as ``GridCLIP._add_dense_clip`` resamples it:
        the cell itself at res5's size, bilinear upsampling above it, average pooling below."""
        dense = self.dense[image]  # (D, h5, w5)
        height, width = size
        if locations is None:
            locations = torch.arange(height * width, device=dense.device)
        how = dense_resampling(size, dense.shape[-2:])
        if how == "upsample":
            level = bilinear_rows(dense, (height, width), locations)
        else:
            level = dense if how == "same" else F.adaptive_avg_pool2d(dense, (height, width))
            level = level.reshape(level.shape[0], -1).t()[locations]
        return F.normalize(level, dim=1) * self.dense_scale
