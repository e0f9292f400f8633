"""F-VLM's score ensemble with a frozen CLIP, for any detector's final detections.

A detection's score becomes ``p_det^(1 - w) * p_clip^w``: ``p_clip`` is the frozen CLIP's
probability of the detection's class among the vocabulary (softmax of CLIP's logit scale x
cos(CLIP's embedding of the box's crops, the class text embeddings)); ``w`` is one weight for
classes the detector was trained on (base) and another for the others (novel). GridCLIP
(``MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE``) and the ViLD baseline (``MODEL.VILD.TEST_CLIP_ENSEMBLE``)
both rescore with this one function, so that a comparison can give both the same rescoring.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["check_rescoring_settings", "clip_rescored_scores"]


def check_rescoring_settings(
    weights: Sequence[float], crop_scales: Sequence[float], weights_key: str, scales_key: str
) -> Tuple[Tuple[float, float], Tuple[float, ...]]:
    """Validated ``(w_base, w_novel)`` and crop scales; the keys name the config options."""
    checked = tuple(float(w) for w in weights)
    if len(checked) != 2 or not all(0.0 <= w <= 1.0 for w in checked):
        raise ValueError(
            f"{weights_key} must be two exponents in [0, 1] (base, novel), got {list(weights)}"
        )
    if not crop_scales or min(crop_scales) <= 0:
        raise ValueError(f"{scales_key} must be positive factors, got {list(crop_scales)}")
    return checked, tuple(float(s) for s in crop_scales)


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
    """
    if len(scores) == 0:
        return scores
    crops = teacher.embed_boxes(image_rgb, boxes, scales=crop_scales)
    text = F.normalize(text_embeddings.float(), dim=-1).to(crops.device)
    probs = torch.softmax(teacher.logit_scale * crops @ text.t(), dim=1)
    p_clip = probs.gather(1, classes.to(probs.device)[:, None]).squeeze(1).to(scores.device)
    w_base, w_novel = weights
    trained = trained_class_mask.to(scores.device)[classes.to(scores.device)]
    w = torch.where(trained, torch.full_like(scores, w_base), torch.full_like(scores, w_novel))
    tiny = torch.finfo(scores.dtype).tiny
    return scores.clamp_min(tiny).pow(1.0 - w) * p_clip.clamp_min(tiny).pow(w)
