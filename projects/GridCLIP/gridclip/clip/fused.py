"""Inference forward of CLIP's ModifiedResNet trunk with batch norm folded into the convolutions.

At inference a batch norm with running statistics is an affine map per channel, so a
convolution followed by it is one convolution with rescaled weights and a bias::

    bn(conv(x)) = conv(x; w * s) + (beta - mean * s),   s = gamma / sqrt(var + eps)

The trunk then runs one kernel per convolution instead of a convolution and a separate pass
over its output, and on a CPU with channels-last activations, in which oneDNN runs the 3x3
convolutions faster (the 1x1 ones stay memory-bound matrix products either way). On one CPU
thread at 800x1216 the RN50 trunk takes 3.4-3.5 s instead of 4.6-5.3 s (docs/BENCHMARKS.md,
issue 13, seventh pass, with the command). The weights are folded at every call, so nothing is
cached that a training step or a loaded checkpoint could make stale, and the modules and their
state dicts stay CLIP's.

Used by the detector's trunk (``CLIPResNet`` in eval mode) and by every CLIP image forward of
the frozen teacher (``modified_resnet_features``). Training keeps the modules' own forward:
trainable ``BatchNorm2d`` uses batch statistics there, and the training numerics stay as they
were. Results equal the modules' own forward up to float rounding (relative 1e-6; tested).
"""

from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from ..utils.tracing import is_exporting

__all__ = [
    "folded_conv_bn",
    "can_fold",
    "fusable_blocks",
    "fused_bottleneck",
    "fused_stem",
    "fused_trunk",
    "inference_layout",
    "use_fused_forward",
]

_BOTTLENECK_PARTS = ("conv1", "bn1", "conv2", "bn2", "avgpool", "conv3", "bn3", "downsample")


def can_fold(bn: nn.Module) -> bool:
    """Whether ``bn`` is an affine map here: a frozen BN, or a ``BatchNorm2d`` in eval mode
    with running statistics."""
    if isinstance(bn, FrozenBatchNorm2d):
        return True
    return (
        isinstance(bn, nn.BatchNorm2d)
        and not bn.training
        and bn.running_mean is not None
        and bn.running_var is not None
    )


def folded_conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module) -> torch.Tensor:
    """``bn(conv(x))`` as one convolution (``bn`` must satisfy :func:`can_fold`)."""
    scale = (bn.running_var + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    weight = conv.weight * scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype)
    return F.conv2d(
        x, weight, shift.to(weight.dtype), conv.stride, conv.padding, conv.dilation, conv.groups
    )


def _is_clip_bottleneck(block: nn.Module) -> bool:
    if not all(hasattr(block, name) for name in _BOTTLENECK_PARTS):
        return False
    if not all(can_fold(getattr(block, f"bn{i}")) for i in (1, 2, 3)):
        return False
    if not all(isinstance(getattr(block, f"conv{i}"), nn.Conv2d) for i in (1, 2, 3)):
        return False
    down = block.downsample
    if down is None:
        return True
    parts = list(down.children())
    return (
        len(parts) == 3
        and isinstance(parts[0], (nn.AvgPool2d, nn.Identity))
        and isinstance(parts[1], nn.Conv2d)
        and can_fold(parts[2])
    )


def fusable_blocks(stages: Iterable[nn.Module]) -> bool:
    """Whether every block of ``stages`` (``nn.Sequential`` of CLIP ``Bottleneck``s) has CLIP's
    layout (conv-BN-ReLU, conv-BN-ReLU, avg pool, conv-BN, avg-pool-conv-BN shortcut) with
    foldable BNs; anything else runs its own forward."""
    return all(_is_clip_bottleneck(block) for stage in stages for block in stage)


def fused_bottleneck(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A CLIP ``Bottleneck``'s forward with its BNs folded (see :func:`fusable_blocks`)."""
    out = F.relu_(folded_conv_bn(x, block.conv1, block.bn1))
    out = F.relu_(folded_conv_bn(out, block.conv2, block.bn2))
    out = folded_conv_bn(block.avgpool(out), block.conv3, block.bn3)
    if block.downsample is None:
        identity = x
    else:
        pool, conv, bn = list(block.downsample.children())
        identity = folded_conv_bn(pool(x), conv, bn)
    return F.relu_(out.add_(identity))


def fused_stem(
    pairs: Sequence[Tuple[nn.Conv2d, nn.Module]], pool: nn.Module, x: torch.Tensor
) -> torch.Tensor:
    """CLIP's stem: each (conv, BN) pair followed by a ReLU, then the average pool."""
    for conv, bn in pairs:
        x = F.relu_(folded_conv_bn(x, conv, bn))
    return pool(x)


def fused_trunk(
    stem: Sequence[Tuple[nn.Conv2d, nn.Module]],
    pool: nn.Module,
    stages: Sequence[nn.Module],
    x: torch.Tensor,
) -> List[torch.Tensor]:
    """The whole trunk folded: the stem (:func:`fused_stem`) on ``x`` in the
    :func:`inference_layout`, then every block of ``stages``; each stage's output, in order
    (channels-last on a CPU)."""
    x = fused_stem(stem, pool, inference_layout(x))
    outputs = []
    for stage in stages:
        for block in stage:
            x = fused_bottleneck(block, x)
        outputs.append(x)
    return outputs


def inference_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the memory layout the trunk's convolutions run fastest in: channels-last on a
    CPU (oneDNN), unchanged elsewhere (not measured on GPUs)."""
    if x.device.type == "cpu" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def use_fused_forward(module: nn.Module, stem_bns: Sequence[nn.Module], stages) -> bool:
    """The folded forward applies: ``module`` is in eval mode, not being traced or exported
    (an exported graph keeps the modules' ops, which the runtime fuses itself), every stem BN
    is foldable and every block has CLIP's layout."""
    if module.training or is_exporting():
        return False
    return all(can_fold(bn) for bn in stem_bns) and fusable_blocks(stages)
