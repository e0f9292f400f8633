"""F-VLM's score ensemble with a frozen CLIP, for any detector's final detections.

A detection's score becomes ``p_det^(1 - w) * p_clip^w``: ``p_clip`` is the frozen CLIP's
probability of the detection's class among the vocabulary (softmax of CLIP's logit scale x
cos(CLIP's embedding of the box's crops, the class text embeddings)); ``w`` is one weight for
classes the detector was trained on (base) and another for the others (novel). GridCLIP
(``MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE``) and the ViLD baseline (``MODEL.VILD.TEST_CLIP_ENSEMBLE``)
both rescore with this one function, so that a comparison can give both the same rescoring.

The frozen CLIP's crops are most of the cost (two crops per detection, 100-300 detections per
image), and many detections are one object under several class names, with boxes that differ by a
pixel or two. With ``share_iou`` < 1 the boxes are grouped by NMS at that IoU and each group's
highest-scored box is cropped once for all of them (:func:`shared_crop_groups`); every detection
still gets CLIP's probability of its own class.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou, nms

__all__ = [
    "check_rescoring_settings",
    "clip_rescored_scores",
    "shared_crop_groups",
]


def check_rescoring_settings(
    weights: Sequence[float],
    crop_scales: Sequence[float],
    share_iou: float,
    weights_key: str,
    scales_key: str,
    share_key: str,
) -> Tuple[Tuple[float, float], Tuple[float, ...], float]:
    """Validated ``(w_base, w_novel)``, crop scales and crop-sharing IoU (in (0, 1]; 1: every
    box cropped on its own); the keys name the config options."""
    checked = tuple(float(w) for w in weights)
    if len(checked) != 2 or not all(0.0 <= w <= 1.0 for w in checked):
        raise ValueError(
            f"{weights_key} must be two exponents in [0, 1] (base, novel), got {list(weights)}"
        )
    if not crop_scales or min(crop_scales) <= 0:
        raise ValueError(f"{scales_key} must be positive factors, got {list(crop_scales)}")
    share = float(share_iou)
    if not 0.0 < share <= 1.0:
        raise ValueError(f"{share_key} = {share_iou!r}: must be in (0, 1] (1 = no crop sharing)")
    return checked, tuple(float(s) for s in crop_scales), share


def shared_crop_groups(boxes: Tensor, scores: Tensor, share_iou: float) -> Tuple[Tensor, Tensor]:
    """Which boxes are cropped, and whose crop each box uses.

    Returns ``(cropped, owner)``: indices of the boxes NMS keeps at ``share_iou`` (a box is
    dropped when it overlaps a higher-scored kept box by IoU > ``share_iou``), and for every box
    the position in ``cropped`` of its crop: its own when kept, else the kept box it overlaps
    most. ``share_iou`` = 1 keeps every box (no sharing)."""
    n = boxes.shape[0]
    if share_iou >= 1.0 or n < 2:
        every = torch.arange(n, device=boxes.device)
        return every, every
    cropped = nms(boxes.float(), scores.float(), share_iou)
    owner = box_iou(boxes.float(), boxes[cropped].float()).argmax(dim=1)
    owner[cropped] = torch.arange(cropped.numel(), device=boxes.device)
    return cropped, owner


@torch.no_grad()
def clip_rescored_scores(
    scores: Tensor,
    boxes: Tensor,
    classes: Tensor,
    image_rgb: Tensor,
    teacher,
    text_embeddings: Tensor,
    trained_class_mask: Tensor,
    weights: Tuple[float, float],
    crop_scales: Sequence[float],
    share_iou: float = 1.0,
) -> Tensor:
    """The rescored ``scores`` of one image's detections.

    Args:
        scores, boxes, classes: (N,), (N, 4) XYXY in ``image_rgb``'s pixels, (N,) class indices.
        image_rgb: (3, H, W) float RGB 0-255, the image the boxes are in.
        teacher: a frozen CLIP image teacher (``embed_boxes(image, boxes, scales)`` and
            ``logit_scale``), on the device to run on.
        text_embeddings: (K, D) class text embeddings of the vocabulary.
        trained_class_mask: (K,) bool, True for classes the detector was trained on.
        weights: (w_base, w_novel).
        crop_scales: crops around each box given to the teacher (embeddings summed).
        share_iou: boxes overlapping a higher-scored one by more than this share its crops
            (:func:`shared_crop_groups`); 1 = every box cropped.
    """
    if len(scores) == 0:
        return scores
    cropped, owner = shared_crop_groups(boxes, scores, share_iou)
    crops = teacher.embed_boxes(image_rgb, boxes[cropped], scales=crop_scales)
    crops = crops[owner.to(crops.device)]
    text = F.normalize(text_embeddings.float(), dim=-1).to(crops.device)
    probs = torch.softmax(teacher.logit_scale * crops @ text.t(), dim=1)
    p_clip = probs.gather(1, classes.to(probs.device)[:, None]).squeeze(1).to(scores.device)
    w_base, w_novel = weights
    trained = trained_class_mask.to(scores.device)[classes.to(scores.device)]
    w = torch.where(trained, torch.full_like(scores, w_base), torch.full_like(scores, w_novel))
    tiny = torch.finfo(scores.dtype).tiny
    return scores.clamp_min(tiny).pow(1.0 - w) * p_clip.clamp_min(tiny).pow(w)
