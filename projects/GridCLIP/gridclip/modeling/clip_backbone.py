"""CLIP's image encoder (ModifiedResNet) as a Detectron2 backbone, with a RetinaNet FPN on top.

GridCLIP starts its backbone from CLIP's image encoder (the paper's choice for the R50 models:
CLIP RN50), so the grid features begin in a space CLIP's attention pool already maps to the
joint image-text space. The trunk's stem + ``layer1..layer4`` become Detectron2's
``res2..res5`` (strides 4, 8, 16, 32); the attention pool is not part of the detector.

Input: images normalised with CLIP's pixel mean/std, RGB (``INPUT.FORMAT: RGB`` and
``MODEL.PIXEL_MEAN/STD`` = ``gridclip.clip.CLIP_PIXEL_MEAN_255/STD_255``, see Base-GridCLIP.yaml).

Batch norm: stages up to ``MODEL.CLIP_RESNET.FREEZE_AT`` are frozen (parameters fixed, BN turned
into ``FrozenBatchNorm2d``). In the trainable stages, BN is also turned into
``FrozenBatchNorm2d`` when the trunk is initialised from CLIP: CLIP's statistics were estimated
on large batches, and detection batches of 1-4 images per device would only make them noisy
(the same policy as Detectron2's ImageNet ResNets, ``MODEL.RESNETS.NORM: FrozenBN``). A randomly
initialised trunk (``INIT_FROM_CLIP: False``, an ablation) keeps trainable ``BatchNorm2d`` in its
trainable stages, since frozen random statistics make training diverge.
"""

from __future__ import annotations

import copy
import logging
from typing import Dict, List, Sequence

import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from torch import nn
from torch.nn import functional as F

from ..clip import attnpool_dense, load_clip_from_cfg
from ..clip.fused import fused_trunk, use_fused_forward

logger = logging.getLogger(__name__)

__all__ = [
    "CLIPResNet",
    "CLIPResNetFPN",
    "DenseCLIPProjection",
    "FPN_TOP_BLOCKS",
    "build_clip_resnet_backbone",
    "build_clip_resnet_fpn",
    "build_clip_resnet_fpn_backbone",
    "build_clip_resnet_rcnn_fpn_backbone",
    "build_dense_clip_projection",
    "clip_visual_from_cfg",
]

STAGE_NAMES = ("res2", "res3", "res4", "res5")
STAGE_STRIDES = {"stem": 4, "res2": 4, "res3": 8, "res4": 16, "res5": 32}

# Architectures of OpenAI's ModifiedResNet CLIPs (as in ``clip.model.build_model``), used to
# build a randomly initialised trunk without reading a weights file.
KNOWN_ARCHITECTURES = {
    "RN50": dict(layers=(3, 4, 6, 3), width=64, output_dim=1024, input_resolution=224),
    "RN101": dict(layers=(3, 4, 23, 3), width=64, output_dim=512, input_resolution=224),
    "RN50x4": dict(layers=(4, 6, 10, 6), width=80, output_dim=640, input_resolution=288),
    "RN50x16": dict(layers=(6, 8, 18, 8), width=96, output_dim=768, input_resolution=384),
    "RN50x64": dict(layers=(3, 15, 36, 10), width=128, output_dim=1024, input_resolution=448),
}


class CLIPResNet(Backbone):
    """The trunk of CLIP's ``ModifiedResNet`` (stem + 4 stages) as a Detectron2 ``Backbone``.

    ``forward(x)`` with x of shape (N, 3, H, W), normalised with CLIP's mean/std, returns
    ``{name: (N, C_name, H / stride, W / stride)}`` for ``out_features`` among res2..res5.
    """

    def __init__(
        self,
        visual: nn.Module,
        out_features: Sequence[str] = ("res3", "res4", "res5"),
        freeze_at: int = 0,
        frozen_bn_in_trainable_stages: bool = True,
    ):
        """
        Args:
            visual: a ``clip.model.ModifiedResNet`` (e.g. ``clip_model.visual``); its modules
                are copied, the attention pool is left out.
            out_features: subset of res2..res5 to return.
            freeze_at: 0 trains everything, 1 freezes the stem, 2 the stem and res2, ...
            frozen_bn_in_trainable_stages: turn the BN of trainable stages into FrozenBN too.
        """
        super().__init__()
        for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "avgpool", "layer1"):
            assert hasattr(visual, name), (
                f"expected a CLIP ModifiedResNet (clip_model.visual), got {type(visual).__name__} "
                f"without {name!r}; ViT CLIPs have no convolutional trunk to use as a backbone"
            )
        unknown = [f for f in out_features if f not in STAGE_NAMES]
        assert not unknown, f"CLIPResNet: unknown out_features {unknown}; choose from {STAGE_NAMES}"
        assert (
            0 <= freeze_at <= 5
        ), f"MODEL.CLIP_RESNET.FREEZE_AT must be in [0, 5], got {freeze_at}"
        visual = copy.deepcopy(visual).float()
        self.stem = nn.Sequential(
            visual.conv1, visual.bn1, nn.ReLU(inplace=True),
            visual.conv2, visual.bn2, nn.ReLU(inplace=True),
            visual.conv3, visual.bn3, nn.ReLU(inplace=True),
            visual.avgpool,
        )  # fmt: skip
        # Only the stages up to the last requested one: unused parameters would upset DDP.
        num_stages = max(STAGE_NAMES.index(f) for f in out_features) + 1
        self.stage_names = STAGE_NAMES[:num_stages]
        for i, name in enumerate(self.stage_names):
            self.add_module(name, getattr(visual, f"layer{i + 1}"))
        self._out_features = [f for f in STAGE_NAMES if f in out_features]
        self._out_feature_strides = {f: STAGE_STRIDES[f] for f in self._out_features}
        self._out_feature_channels = {
            f: getattr(self, f)[-1].conv3.out_channels for f in self._out_features
        }
        self.freeze_at = freeze_at
        self._freeze(freeze_at, frozen_bn_in_trainable_stages)

    def _freeze(self, freeze_at: int, frozen_bn_in_trainable_stages: bool) -> None:
        blocks = [("stem", self.stem)] + [(n, getattr(self, n)) for n in self.stage_names]
        for index, (name, block) in enumerate(blocks, start=1):
            if index <= freeze_at:
                for p in block.parameters():
                    p.requires_grad_(False)
                setattr(self, name, FrozenBatchNorm2d.convert_frozen_batchnorm(block))
            elif frozen_bn_in_trainable_stages:
                setattr(self, name, FrozenBatchNorm2d.convert_frozen_batchnorm(block))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        assert x.dim() == 4 and x.shape[1] == 3, f"CLIPResNet takes (N, 3, H, W), got {x.shape}"
        x = x.to(self.stem[0].weight.dtype)
        stages = [getattr(self, name) for name in self.stage_names]
        stem = [
            (self.stem[0], self.stem[1]),
            (self.stem[3], self.stem[4]),
            (self.stem[6], self.stem[7]),
        ]
        # In eval mode, BN folded into the convolutions, channels-last on a CPU (clip/fused.py);
        # the outputs stay channels-last, so that the FPN's and heads' convolutions run in it too.
        if use_fused_forward(self, [bn for _, bn in stem], stages):
            per_stage = fused_trunk(stem, self.stem[9], stages, x)
        else:
            per_stage, x = [], self.stem(x)
            for stage in stages:
                x = stage(x)
                per_stage.append(x)
        return {
            name: y for name, y in zip(self.stage_names, per_stage) if name in self._out_features
        }

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            f: ShapeSpec(
                channels=self._out_feature_channels[f], stride=self._out_feature_strides[f]
            )
            for f in self._out_features
        }


def _random_modified_resnet(arch: Dict) -> nn.Module:
    from clip.model import ModifiedResNet

    return ModifiedResNet(
        layers=arch["layers"],
        output_dim=arch["output_dim"],
        heads=arch["width"] * 32 // 64,
        input_resolution=arch["input_resolution"],
        width=arch["width"],
    )


def _architecture_of(visual: nn.Module) -> Dict:
    return dict(
        layers=tuple(len(getattr(visual, f"layer{i}")) for i in range(1, 5)),
        width=visual.conv3.out_channels,
        output_dim=visual.output_dim,
        input_resolution=visual.input_resolution,
    )


def clip_visual_from_cfg(cfg) -> nn.Module:
    """The ModifiedResNet the CLIP-ResNet backbone starts from: ``MODEL.CLIP``'s visual tower
    (``MODEL.CLIP_RESNET.INIT_FROM_CLIP``), else a randomly initialised one of its architecture
    (known RN* architectures need no weights file). Read-only: it may be the memoised CLIP."""
    init_from_clip = cfg.MODEL.CLIP_RESNET.INIT_FROM_CLIP
    name = cfg.MODEL.CLIP.NAME
    if not init_from_clip and name in KNOWN_ARCHITECTURES:
        return _random_modified_resnet(KNOWN_ARCHITECTURES[name])
    # The shared, memoised instance: callers copy what they keep (CLIPResNet deep-copies the
    # trunk, DenseCLIPProjection the projections), so one model build copies CLIP once, not per
    # caller.
    visual = load_clip_from_cfg(cfg, copy_model=False).visual
    if not hasattr(visual, "layer1"):
        raise ValueError(
            f"MODEL.CLIP.NAME={name!r} is not a ModifiedResNet CLIP; "
            "build_clip_resnet_fpn_backbone needs an RN* (or the embedded ResNet) CLIP"
        )
    if not init_from_clip:
        visual = _random_modified_resnet(_architecture_of(visual))
    return visual


class DenseCLIPProjection(nn.Module):
    """CLIP's attention-pool value path at every res5 cell: ``c_proj(v_proj(res5 + pos))``.

    Maps the trunk's res5 features into CLIP's joint image-text space per location (MaskCLIP's
    dense features; at CLIP's native resolution their attention-weighted mean is CLIP's image
    embedding). Frozen: it keeps CLIP's meaning of the joint space while the trunk trains.
    """

    def __init__(self, attnpool: nn.Module):
        """
        Args:
            attnpool: a ``clip.model.AttentionPool2d`` (``clip_model.visual.attnpool``); its
                positional embedding and value / output projections are copied.
        """
        super().__init__()
        self.v_proj = copy.deepcopy(attnpool.v_proj).float()
        self.c_proj = copy.deepcopy(attnpool.c_proj).float()
        self.positional_embedding = nn.Parameter(
            attnpool.positional_embedding.detach().clone().float()
        )
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def in_channels(self) -> int:
        return self.v_proj.in_features

    @property
    def embed_dim(self) -> int:
        return self.c_proj.out_features

    def forward(self, res5: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) res5 features -> (N, D, h, w) CLIP-space embeddings (not normalised)."""
        return attnpool_dense(self, res5.to(self.v_proj.weight.dtype))


def build_dense_clip_projection(cfg) -> DenseCLIPProjection:
    """The :class:`DenseCLIPProjection` of the CLIP that ``MODEL.CLIP_RESNET`` starts from."""
    return DenseCLIPProjection(clip_visual_from_cfg(cfg).attnpool)


@BACKBONE_REGISTRY.register()
def build_clip_resnet_backbone(cfg, input_shape: ShapeSpec) -> CLIPResNet:
    """CLIP ModifiedResNet trunk from ``MODEL.CLIP`` (weights) and ``MODEL.CLIP_RESNET``."""
    assert input_shape.channels == 3, f"the CLIP trunk takes RGB images, got {input_shape.channels}"
    if cfg.INPUT.FORMAT != "RGB":
        logger.warning(
            f"INPUT.FORMAT is {cfg.INPUT.FORMAT!r} but CLIP's image encoder expects RGB images "
            "normalised with CLIP's pixel mean/std (see Base-GridCLIP.yaml)"
        )
    init_from_clip = cfg.MODEL.CLIP_RESNET.INIT_FROM_CLIP
    name = cfg.MODEL.CLIP.NAME
    visual = clip_visual_from_cfg(cfg)
    logger.info(
        f"CLIP ResNet backbone ({name}, {'CLIP weights' if init_from_clip else 'random init'}, "
        f"FREEZE_AT={cfg.MODEL.CLIP_RESNET.FREEZE_AT})"
    )
    return CLIPResNet(
        visual,
        out_features=cfg.MODEL.CLIP_RESNET.OUT_FEATURES,
        freeze_at=cfg.MODEL.CLIP_RESNET.FREEZE_AT,
        frozen_bn_in_trainable_stages=init_from_clip,
    )


class CLIPResNetFPN(FPN):
    """Detectron2's FPN over a :class:`CLIPResNet` that also returns trunk features.

    ``forward(x)`` returns the FPN levels (``p*``) and, for each name in ``trunk_outputs``, the
    trunk's own map (e.g. ``res5`` for GridCLIP's dense CLIP term), so a model reads what it
    needs from the backbone's outputs. ``output_shape()`` lists both; models select their
    levels by name (``MODEL.RETINANET.IN_FEATURES``, ``MODEL.RPN/ROI_HEADS.IN_FEATURES``).
    Parameters and state-dict keys are those of :class:`FPN`.
    """

    def __init__(self, *, trunk_outputs: Sequence[str] = (), **kwargs):
        """
        Args:
            trunk_outputs: names of bottom-up features to return besides the FPN levels.
            kwargs: arguments of :class:`FPN`.
        """
        super().__init__(**kwargs)
        trunk_shapes = self.bottom_up.output_shape()
        missing = [f for f in trunk_outputs if f not in trunk_shapes]
        assert not missing, f"the trunk does not output {missing} (has {list(trunk_shapes)})"
        self.trunk_outputs = list(trunk_outputs)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        trunk = self.bottom_up(x)
        outputs = self.top_down(trunk)
        outputs.update({f: trunk[f] for f in self.trunk_outputs})
        return outputs

    def top_down(self, trunk: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """FPN levels from the trunk's features: lateral 1x1 convs, nearest 2x upsampling and
        sum (or mean, ``fuse_type`` avg) from the coarsest level down, 3x3 output convs, then
        the top block on its input (a trunk feature or an FPN level)."""
        num_levels = len(self.in_features)
        levels: List[torch.Tensor] = [None] * num_levels
        # lateral_convs / output_convs are ordered coarsest first.
        merged = None
        for i, (lateral, output) in enumerate(zip(self.lateral_convs, self.output_convs)):
            lateral_features = lateral(trunk[self.in_features[num_levels - 1 - i]])
            if merged is None:
                merged = lateral_features
            else:
                merged = lateral_features + F.interpolate(merged, scale_factor=2.0, mode="nearest")
                if self._fuse_type == "avg":
                    merged /= 2
            levels[num_levels - 1 - i] = output(merged)
        if self.top_block is not None:
            name = self.top_block.in_feature
            source = trunk[name] if name in trunk else levels[self._out_features.index(name)]
            levels.extend(self.top_block(source))
        assert len(levels) == len(self._out_features), "one output per FPN level"
        return dict(zip(self._out_features, levels))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        shapes = super().output_shape()
        trunk_shapes = self.bottom_up.output_shape()
        shapes.update({f: trunk_shapes[f] for f in self.trunk_outputs})
        return shapes


#: ``top_block`` values of :func:`build_clip_resnet_fpn`.
FPN_TOP_BLOCKS = ("p6p7", "maxpool")


def build_clip_resnet_fpn(
    cfg, input_shape: ShapeSpec, top_block: str, trunk_outputs: Sequence[str] = ()
) -> CLIPResNetFPN:
    """CLIP ModifiedResNet trunk (``MODEL.CLIP``, ``MODEL.CLIP_RESNET``) + FPN.

    Uses ``MODEL.FPN.IN_FEATURES`` (must be among ``MODEL.CLIP_RESNET.OUT_FEATURES``),
    ``MODEL.FPN.OUT_CHANNELS``, ``MODEL.FPN.NORM`` and ``MODEL.FPN.FUSE_TYPE``.

    Args:
        top_block: ``"p6p7"``: RetinaNet's P6/P7 by strided convs from the last trunk feature;
            ``"maxpool"``: Faster R-CNN's P6 by max-pooling P5.
        trunk_outputs: trunk features also returned (see :class:`CLIPResNetFPN`).
    """
    if top_block not in FPN_TOP_BLOCKS:
        raise ValueError(f"top_block={top_block!r}; choose one of {FPN_TOP_BLOCKS}")
    bottom_up = build_clip_resnet_backbone(cfg, input_shape)
    in_features: List[str] = list(cfg.MODEL.FPN.IN_FEATURES)
    shapes = bottom_up.output_shape()
    missing = [f for f in in_features if f not in shapes]
    if missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES {in_features} asks for {missing}, which "
            f"MODEL.CLIP_RESNET.OUT_FEATURES {list(cfg.MODEL.CLIP_RESNET.OUT_FEATURES)} lacks"
        )
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    if top_block == "p6p7":
        block = LastLevelP6P7(shapes[in_features[-1]].channels, out_channels, in_features[-1])
    else:
        block = LastLevelMaxPool()
    return CLIPResNetFPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        trunk_outputs=trunk_outputs,
    )


@BACKBONE_REGISTRY.register()
def build_clip_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> CLIPResNetFPN:
    """RetinaNet's (GridCLIP's) backbone: CLIP trunk + FPN with P6/P7 from the last trunk
    feature; with ``MODEL.GRIDCLIP.DENSE_CLIP`` it also returns the trunk's ``res5``."""
    trunk_outputs = ("res5",) if cfg.MODEL.GRIDCLIP.DENSE_CLIP else ()
    if trunk_outputs and "res5" not in cfg.MODEL.CLIP_RESNET.OUT_FEATURES:
        raise ValueError(
            "MODEL.GRIDCLIP.DENSE_CLIP reads the trunk's res5: add 'res5' to "
            f"MODEL.CLIP_RESNET.OUT_FEATURES {list(cfg.MODEL.CLIP_RESNET.OUT_FEATURES)} or set "
            "MODEL.GRIDCLIP.DENSE_CLIP False"
        )
    return build_clip_resnet_fpn(cfg, input_shape, "p6p7", trunk_outputs)


@BACKBONE_REGISTRY.register()
def build_clip_resnet_rcnn_fpn_backbone(cfg, input_shape: ShapeSpec) -> CLIPResNetFPN:
    """Faster R-CNN's (ViLD's) backbone: CLIP trunk + FPN P2-P5 and P6 by max-pool, so ViLD
    starts from the same CLIP trunk as GridCLIP."""
    return build_clip_resnet_fpn(cfg, input_shape, "maxpool")
