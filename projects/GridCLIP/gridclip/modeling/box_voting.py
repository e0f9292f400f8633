"""Box voting: refine each box NMS keeps with the boxes it suppressed.

A dense detector regresses every anchor once; NMS then keeps the highest-scoring box of a
cluster and throws away the others, although several of them often localise the object better.
Box voting (Gidaris & Komodakis, "Object detection via a multi-region & semantic
segmentation-aware CNN model", 2015) replaces each kept box by the score-weighted mean of the
candidates of the same class that overlap it by at least ``iou_thresh``, itself included. The
score and the class are unchanged, so only localisation (AP75 and above) can move.
"""

from __future__ import annotations

import torch
from detectron2.structures.boxes import Boxes, matched_pairwise_iou
from torch import Tensor
from torchvision.ops import box_iou

from ..utils.tracing import is_exporting


def box_voting(
    boxes: Tensor,
    scores: Tensor,
    classes: Tensor,
    keep: Tensor,
    iou_thresh: float,
) -> Tensor:
    """Score-weighted mean of each kept box's same-class neighbours.

    Args:
        boxes: (R, 4) candidate boxes (XYXY), all those NMS saw.
        scores: (R,) their scores (the weights; non-negative).
        classes: (R,) their classes.
        keep: (P,) indices of the boxes NMS kept.
        iou_thresh: a candidate votes for a kept box of its class if their IoU is at least this
            (in (0, 1]; 1 keeps the boxes as they are, up to identical duplicates).
    Returns:
        (P, 4) the voted boxes, in ``keep``'s order.
    """
    if not 0.0 < iou_thresh <= 1.0:
        raise ValueError(f"box voting IoU threshold {iou_thresh} is not in (0, 1]")
    if not is_exporting():
        return _same_class_voting(boxes, scores, classes, keep, iou_thresh)
    kept = boxes[keep]
    # torchvision's box_iou, not Detectron2's Boxes (whose constructor branches on the tensor's
    # size: torch.export cannot trace that for data-dependent box counts). Zero-area pairs give
    # NaN, which never passes the threshold.
    iou = box_iou(kept, boxes)  # (P, R)
    votes = (iou >= iou_thresh) & (classes[keep][:, None] == classes[None, :])
    weights = votes.to(boxes.dtype) * scores.clamp(min=0)[None, :]
    total = weights.sum(dim=1, keepdim=True)
    voted = weights @ boxes / total.clamp(min=torch.finfo(boxes.dtype).tiny)
    # A kept box votes for itself unless its score is 0 or its area is: then it stays as it
    # is. (No data-dependent branch: the function is traced as is by tools/export.py.)
    return torch.where(total > 0, voted, kept)


def _same_class_voting(
    boxes: Tensor, scores: Tensor, classes: Tensor, keep: Tensor, iou_thresh: float
) -> Tensor:
    """:func:`box_voting` over the (kept box, candidate) pairs of the same class only.

    The dense form computes the IoU of every kept box with every candidate: at LVIS settings
    300 x 25,000 pairs of which a few thousand share a class (1,203 classes). Here the
    candidates are sorted by class and each kept box meets only its class's range. Same result
    up to float rounding (tests); eager only (its sizes depend on the data, so an exported graph
    keeps the dense form).
    """
    order = classes.argsort(stable=True)
    sorted_classes = classes[order]
    kept_classes = classes[keep]
    start = torch.searchsorted(sorted_classes, kept_classes, side="left")
    counts = torch.searchsorted(sorted_classes, kept_classes, side="right") - start
    owner = torch.repeat_interleave(torch.arange(keep.numel(), device=boxes.device), counts)
    first = torch.cumsum(counts, 0) - counts  # each kept box's first pair
    within = torch.arange(owner.numel(), device=boxes.device) - first[owner]
    candidate = order[start[owner] + within]
    kept = boxes[keep]
    b = boxes[candidate]
    iou = matched_pairwise_iou(Boxes(kept[owner]), Boxes(b))  # zero-area pairs: NaN, never pass
    weights = (iou >= iou_thresh).to(boxes.dtype) * scores[candidate].clamp(min=0)
    total = boxes.new_zeros(keep.numel()).index_add_(0, owner, weights)
    summed = boxes.new_zeros(keep.numel(), 4).index_add_(0, owner, weights[:, None] * b)
    voted = summed / total[:, None].clamp(min=torch.finfo(boxes.dtype).tiny)
    return torch.where(total[:, None] > 0, voted, kept)


def check_box_voting_iou(value: float, key: str) -> float:
    """A ``TEST_BOX_VOTING_IOU`` setting as a float in [0, 1] (0 = off); ``key`` names it."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{key}={value} is not in [0, 1] (0 = off)")
    return float(value)


def kept_boxes(
    boxes: Tensor, scores: Tensor, classes: Tensor, keep: Tensor, iou_thresh: float
) -> Tensor:
    """The boxes NMS kept: ``boxes[keep]``, voted (:func:`box_voting`) when ``iou_thresh > 0``."""
    if iou_thresh > 0:
        return box_voting(boxes, scores, classes, keep, iou_thresh)
    return boxes[keep]
