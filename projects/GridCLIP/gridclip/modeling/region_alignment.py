"""Region-level alignment on the dense head's own unlabelled boxes (``REGION_ALIGN_*``).

In open-vocabulary training the novel objects are in the training images without boxes: every
anchor on them is a negative of every base class, and nothing tells the grid embedding there what
the object is. Image-level alignment pools the grid embeddings over whole tiles, where such an
object is a small part of the view. This loss looks at the objects themselves, as ViLD's
region distillation does for its proposals, with the dense head's own boxes as proposals:

1. per training image, the locations of highest class-agnostic objectness (the maximum of their
   anchor offsets) give boxes (their best anchor, decoded with the predicted deltas; detached);
2. NMS at IoU 0.5; boxes that overlap a ground-truth box by IoU >= ``max_gt_iou`` are dropped
   (those objects are trained by the focal loss), and so are boxes under ``min_size`` px;
3. the first ``num_boxes`` survivors are cropped (1x and 1.5x the box) and embedded by the
   frozen CLIP teacher (the score ensemble's, :meth:`CLIPImageTeacher.embed_boxes`);
4. the loss is ``1 - cos(grid embedding at the box's location, teacher embedding)``, averaged
   over every selected box of the batch, times the weight.

The grid embedding is the one the classifier sees (the dense CLIP term included), so the loss
acts where detections are scored.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou, nms

__all__ = ["select_unlabelled_boxes", "region_alignment_loss"]


@torch.no_grad()
def select_unlabelled_boxes(
    objectness: Tensor,
    boxes: Tensor,
    gt_boxes: Tensor,
    num_boxes: int,
    max_gt_iou: float,
    min_size: float,
    candidates: int = 200,
    nms_iou: float = 0.5,
) -> Tensor:
    """Indices (into ``objectness``/``boxes``) of at most ``num_boxes`` boxes of one image, by
    decreasing objectness, after NMS, none overlapping a ground-truth box by IoU >= ``max_gt_iou``
    and none with a side under ``min_size`` pixels.

    Args:
        objectness: (R,) a score per candidate (higher: more object-like).
        boxes: (R, 4) XYXY candidate boxes.
        gt_boxes: (G, 4) XYXY ground-truth boxes of the image (G may be 0).
    """
    assert objectness.ndim == 1 and boxes.shape == (objectness.numel(), 4), (
        f"expected (R,) scores and (R, 4) boxes, got {tuple(objectness.shape)} and "
        f"{tuple(boxes.shape)}"
    )
    if objectness.numel() == 0 or num_boxes <= 0:
        return objectness.new_zeros((0,), dtype=torch.long)
    top = objectness.topk(min(candidates, objectness.numel())).indices
    cand = boxes[top].float()
    size = (cand[:, 2:] - cand[:, :2]).min(dim=1).values
    keep = size >= min_size
    if gt_boxes.numel() and max_gt_iou < 1.0:
        keep &= box_iou(cand, gt_boxes.float().to(cand.device)).max(dim=1).values < max_gt_iou
    top, cand = top[keep], cand[keep]
    if top.numel() == 0:
        return top
    kept = nms(cand, objectness[top].float(), nms_iou)
    return top[kept[:num_boxes]]


def region_alignment_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """Mean of ``1 - cos`` over every (student, teacher) row pair of every image.

    Args:
        student: per image (R_i, D) grid embeddings (any norm; they carry the gradient).
        teacher: per image (R_i, D) teacher embeddings (any norm).
    Returns:
        a scalar; 0 (still in the graph of ``student``) when no image has a box.
    """
    assert len(student) == len(teacher), "one teacher tensor per image"
    pairs: List[Tuple[Tensor, Tensor]] = []
    for s, t in zip(student, teacher):
        assert s.shape == t.shape, f"student {tuple(s.shape)} and teacher {tuple(t.shape)} differ"
        if s.shape[0]:
            pairs.append((s, t))
    if not pairs:
        return sum(s.sum() for s in student) * 0.0
    s = F.normalize(torch.cat([p[0] for p in pairs]).float(), dim=-1)
    t = F.normalize(torch.cat([p[1] for p in pairs]).float().to(s.device), dim=-1)
    return (1.0 - (s * t).sum(dim=-1)).mean()
