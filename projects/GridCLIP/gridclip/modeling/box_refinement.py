"""A second look at each of GridCLIP's final boxes: class-agnostic box refinement.

A dense head regresses every anchor once, from the features at the anchor's own location. A
two-stage detector such as the ViLD baseline pools features *inside* each proposal and
regresses again; on the embedded world that is where its lead over GridCLIP lies (level at IoU
0.5, ahead at IoU 0.75: docs/RESULTS.md, issue 16). :class:`BoxRefiner` gives GridCLIP that
second look for the few boxes it keeps: each box's FPN features are pooled (Detectron2's
``ROIPooler``, ROIAlignV2, the level chosen by the box's size) into a two-layer MLP that predicts
class-agnostic deltas (Fast R-CNN's parametrisation) from the box to its object.

Training: the boxes are the dense head's own decoded predictions at its positive anchors
(detached, so the dense regression is trained by its own loss only), at most
``samples_per_image`` per image drawn at random, each regressed to the ground-truth box of its
anchor; L1 loss on the deltas, averaged over the boxes. Inference: applied to the boxes NMS (and
box voting) kept, once or, with ``steps`` > 1, again to its own output (the same regressor: a
refined box is closer to its object than the boxes it was trained on, and a second look moves it
closer still; measured in docs/RESULTS.md); scores and classes unchanged.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import nonzero_tuple
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes
from fvcore.nn import weight_init
from torch import Tensor, nn

from ..utils import check_whole_number

__all__ = ["BoxRefiner", "build_box_refiner", "check_refine_steps"]


class BoxRefiner(nn.Module):
    """ROIAlign on the FPN levels -> FC -> FC -> 4 class-agnostic deltas."""

    def __init__(
        self,
        in_channels: int,
        strides: Sequence[int],
        pooler_resolution: int = 7,
        fc_dim: int = 256,
        samples_per_image: int = 64,
        weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
    ):
        """
        Args:
            in_channels: channels of the FPN levels.
            strides: their strides, finest first (P3-P7: 8 ... 128).
            pooler_resolution: ROIAlign output size.
            fc_dim: width of the two hidden layers.
            samples_per_image: boxes per image trained on (at most).
            weights: Fast R-CNN's delta weights.
        """
        super().__init__()
        if samples_per_image < 1:
            raise ValueError(f"box refinement: samples_per_image={samples_per_image} < 1")
        self.pooler = ROIPooler(
            output_size=pooler_resolution,
            scales=tuple(1.0 / s for s in strides),
            sampling_ratio=0,
            pooler_type="ROIAlignV2",
        )
        self.fc1 = nn.Linear(in_channels * pooler_resolution**2, fc_dim)
        self.fc2 = nn.Linear(fc_dim, fc_dim)
        self.deltas = nn.Linear(fc_dim, 4)
        for layer in (self.fc1, self.fc2):
            weight_init.c2_xavier_fill(layer)
        nn.init.normal_(self.deltas.weight, std=0.001)
        nn.init.constant_(self.deltas.bias, 0.0)
        self.samples_per_image = int(samples_per_image)
        self.transform = Box2BoxTransform(weights=tuple(weights))

    def forward(self, features: List[Tensor], boxes: List[Boxes]) -> Tensor:
        """(R, 4) deltas for the boxes of every image (concatenated in image order)."""
        x = self.pooler(features, boxes).flatten(1)
        return self.deltas(F.relu(self.fc2(F.relu(self.fc1(x)))))

    def refine(self, features: List[Tensor], boxes: List[Tensor], steps: int = 1) -> List[Tensor]:
        """Per image (R_i, 4) XYXY boxes -> the refined boxes, same order; ``steps`` times, each
        step refining the previous one's boxes."""
        steps = check_refine_steps(steps)
        if sum(len(b) for b in boxes) == 0:
            return list(boxes)
        sizes = [len(b) for b in boxes]
        refined = torch.cat(boxes)
        for _ in range(steps):
            deltas = self(features, [Boxes(b) for b in refined.split(sizes)])
            refined = self.transform.apply_deltas(deltas, refined)
        return list(refined.split(sizes))

    def losses(self, features: List[Tensor], boxes: List[Tensor], targets: List[Tensor]) -> Tensor:
        """L1 loss of the predicted deltas against the deltas from each box to its target.

        Args:
            boxes: per image (R_i, 4) boxes to refine (the dense head's, detached).
            targets: per image (R_i, 4) their ground-truth boxes.
        Returns:
            The loss summed over boxes and coordinates, divided by the number of boxes; boxes
            that cannot be refined (not finite, or under 1 px wide or high) are left out; with
            none left, a zero that keeps the graph.
        """
        kept_boxes, kept_targets = [], []
        for b, t in zip(boxes, targets):
            b = b.detach()
            usable = torch.isfinite(b).all(dim=1) & ((b[:, 2:] - b[:, :2]) >= 1.0).all(dim=1)
            index = nonzero_tuple(usable)[0]
            if index.numel() > self.samples_per_image:
                pick = torch.randperm(index.numel(), device=index.device)
                index = index[pick[: self.samples_per_image]]
            kept_boxes.append(b[index])
            kept_targets.append(t[index])
        count = sum(len(b) for b in kept_boxes)
        if count == 0:
            return sum(p.sum() for p in self.parameters()) * 0.0
        deltas = self(features, [Boxes(b) for b in kept_boxes])
        wanted = self.transform.get_deltas(torch.cat(kept_boxes), torch.cat(kept_targets))
        return F.l1_loss(deltas, wanted, reduction="sum") / count


def check_refine_steps(steps, key: str = "steps") -> int:
    """A refinement step count as an int >= 1 (``key`` names the setting in the error)."""
    return check_whole_number(steps, key, meaning="times the box refiner runs")


def build_box_refiner(cfg, feature_shapes) -> "BoxRefiner | None":
    """The refiner of ``MODEL.GRIDCLIP.BOX_REFINE`` for the head's input levels, or None. Built
    from a forked random state: the detector's initialisation is the same with or without it."""
    if not cfg.MODEL.GRIDCLIP.BOX_REFINE:
        return None
    channels = {s.channels for s in feature_shapes}
    if len(channels) != 1:
        raise ValueError(f"MODEL.GRIDCLIP.BOX_REFINE needs levels of one width, got {channels}")
    with torch.random.fork_rng(devices=[]):
        return BoxRefiner(channels.pop(), [s.stride for s in feature_shapes])
