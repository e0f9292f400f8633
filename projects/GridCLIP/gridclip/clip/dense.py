"""Dense (grid) features from CLIP's ModifiedResNet at any input size.

CLIP's ResNet ends in an attention pool whose positional embedding is fixed to the training
resolution (7x7 for RN50 at 224 px). Here it is interpolated to any feature-map size, and the
pool's value path (``c_proj(v_proj(x + pos))``, as in MaskCLIP) is applied at every location with
1x1-convolution semantics, which maps grid features into CLIP's joint image-text space.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

from .fused import fused_trunk, use_fused_forward

__all__ = [
    "CLIP_PIXEL_MEAN",
    "CLIP_PIXEL_STD",
    "CLIP_PIXEL_MEAN_255",
    "CLIP_PIXEL_STD_255",
    "interpolate_positional_embedding",
    "attnpool_pooled",
    "attnpool_dense",
    "modified_resnet_features",
    "MODIFIED_RESNET_STRIDES",
]

#: CLIP's RGB normalisation on a 0-1 scale.
CLIP_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
#: The same on a 0-255 scale (Detectron2's MODEL.PIXEL_MEAN / PIXEL_STD with INPUT.FORMAT RGB).
CLIP_PIXEL_MEAN_255 = tuple(m * 255.0 for m in CLIP_PIXEL_MEAN)
CLIP_PIXEL_STD_255 = tuple(s * 255.0 for s in CLIP_PIXEL_STD)

#: Output strides of ``modified_resnet_features``.
MODIFIED_RESNET_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def interpolate_positional_embedding(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Resize a CLIP attention-pool positional embedding to an h x w grid.

    Args:
        pos: (1 + h0*w0, C), a class-token row then a square h0 x w0 grid (row-major).
        h, w: target grid size.
    Returns:
        (1 + h*w, C): the class-token row unchanged, the grid resized bicubically
        (``align_corners=False``). At h, w == h0, w0 the input is returned as is.
    """
    assert pos.ndim == 2, f"positional embedding must be (1 + h0*w0, C), got {tuple(pos.shape)}"
    n, c = pos.shape
    side = int(round(math.sqrt(n - 1)))
    assert side * side == n - 1, f"positional embedding of {n} rows is not 1 + a square grid"
    assert h > 0 and w > 0, f"grid size must be positive, got {h}x{w}"
    if (h, w) == (side, side):
        return pos
    grid = pos[1:].float().reshape(side, side, c).permute(2, 0, 1)[None]  # (1, C, h0, w0)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    grid = grid[0].reshape(c, h * w).t().to(pos.dtype)
    return torch.cat([pos[:1], grid], dim=0)


def attnpool_pooled(attnpool, x: torch.Tensor) -> torch.Tensor:
    """CLIP's attention pooling of a feature map of any size.

    Same computation as ``clip.model.AttentionPool2d.forward`` (the mean feature queries all
    locations) with the positional embedding interpolated to (H, W); at the native size it is
    exactly ``model.encode_image``'s pooling.

    Args:
        attnpool: a ``clip.model.AttentionPool2d``.
        x: (N, C, H, W) trunk features (res5).
    Returns:
        (N, D) image embeddings in CLIP's joint space (not normalised).
    """
    assert x.ndim == 4, f"expected (N, C, H, W) features, got {tuple(x.shape)}"
    _, _, h, w = x.shape
    pos = interpolate_positional_embedding(attnpool.positional_embedding, h, w)
    x = x.flatten(start_dim=2).permute(2, 0, 1)  # (HW, N, C)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (1 + HW, N, C)
    x = x + pos[:, None, :].to(x.dtype)
    out, _ = F.multi_head_attention_forward(
        query=x[:1],
        key=x,
        value=x,
        embed_dim_to_check=x.shape[-1],
        num_heads=attnpool.num_heads,
        q_proj_weight=attnpool.q_proj.weight,
        k_proj_weight=attnpool.k_proj.weight,
        v_proj_weight=attnpool.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([attnpool.q_proj.bias, attnpool.k_proj.bias, attnpool.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=attnpool.c_proj.weight,
        out_proj_bias=attnpool.c_proj.bias,
        use_separate_proj_weight=True,
        training=attnpool.training,
        need_weights=False,
    )
    return out.squeeze(0)


def attnpool_dense(attnpool, x: torch.Tensor, add_positional: bool = True) -> torch.Tensor:
    """Per-location embeddings in CLIP's joint space: ``c_proj(v_proj(x + pos))``.

    The value path of the attention pool applied at every grid cell (MaskCLIP's dense
    features), as two 1x1 convolutions: cost O(H*W*C*(C+D)), no attention.

    Args:
        attnpool: a ``clip.model.AttentionPool2d``.
        x: (N, C, H, W) trunk features (any H, W).
        add_positional: add the (interpolated) positional embedding first, as the pool does.
    Returns:
        (N, D, H, W) embeddings (not normalised); differentiable w.r.t. x and the projections.
    """
    assert x.ndim == 4, f"expected (N, C, H, W) features, got {tuple(x.shape)}"
    n, c, h, w = x.shape
    assert (
        c == attnpool.v_proj.in_features
    ), f"features have {c} channels, the attention pool expects {attnpool.v_proj.in_features}"
    if add_positional:
        pos = interpolate_positional_embedding(attnpool.positional_embedding, h, w)[1:]
        x = x + pos.t().reshape(1, c, h, w).to(x.dtype)
    v = F.conv2d(x, attnpool.v_proj.weight[:, :, None, None], attnpool.v_proj.bias)
    return F.conv2d(v, attnpool.c_proj.weight[:, :, None, None], attnpool.c_proj.bias)


def modified_resnet_features(visual, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Run the stem and the four stages of a ``clip.model.ModifiedResNet``.

    Args:
        visual: ``clip_model.visual`` (a ModifiedResNet).
        images: (N, 3, H, W) CLIP-normalised RGB images, any H, W.
    Returns:
        {"res2": (N, 4w, H/4, W/4), "res3": (N, 8w, H/8, W/8), "res4": (N, 16w, H/16, W/16),
        "res5": (N, 32w, H/32, W/32)} with w = the trunk width (64 for RN50); sizes floor-divided.
    """
    assert hasattr(visual, "layer4") and hasattr(
        visual, "attnpool"
    ), f"expected CLIP's ModifiedResNet, got {type(visual).__name__} (a ViT has no grid trunk)"
    assert (
        images.ndim == 4 and images.shape[1] == 3
    ), f"expected (N, 3, H, W) images, got {tuple(images.shape)}"
    x = images.to(visual.conv1.weight.dtype)
    stages = [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
    stem = [(visual.conv1, visual.bn1), (visual.conv2, visual.bn2), (visual.conv3, visual.bn3)]
    if use_fused_forward(visual, [bn for _, bn in stem], stages):  # eval: BN folded (fused.py)
        outputs = fused_trunk(stem, visual.avgpool, stages, x)
        return {name: y.contiguous() for name, y in zip(("res2", "res3", "res4", "res5"), outputs)}
    x = visual.relu1(visual.bn1(visual.conv1(x)))
    x = visual.relu2(visual.bn2(visual.conv2(x)))
    x = visual.relu3(visual.bn3(visual.conv3(x)))
    x = visual.avgpool(x)
    res2 = visual.layer1(x)
    res3 = visual.layer2(res2)
    res4 = visual.layer3(res3)
    res5 = visual.layer4(res4)
    return {"res2": res2, "res3": res3, "res4": res4, "res5": res5}
