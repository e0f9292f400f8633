"""ViLD-like two-stage open-vocabulary baseline (Gu et al., arXiv 2104.13921) on Detectron2.

Faster R-CNN R50-FPN whose box classifier is replaced by CLIP text embeddings:

- **ViLD-text** (:class:`ViLDOutputLayers`): box-head feature -> Linear -> D (CLIP space) ->
  L2-norm; logits = cos(region, text embedding) / T for the K classes (a frozen buffer) plus a
  learned background embedding (also normalised) as Detectron2's background class K (last).
  Softmax cross-entropy over base classes + background, novel (LVIS ``r``) logits masked out.
  Class-agnostic box regression.
- **ViLD-image**: L1 distillation of the normalised region embeddings of up to N proposals per
  image to the frozen CLIP teacher's embeddings of the cropped proposals (1x + 1.5x crops):
  ``loss_vild_image = IMAGE_DISTILL_WEIGHT * mean over regions of sum over D |s - t|``, i.e.
  ViLD's mean-L1 x D with the weight 0.5 ViLD uses for R50. The distilled proposals are extra
  RoIs beside the sampled ones (same box-head pass), not part of the CE / box losses.
  Teacher: ``online`` (CLIP on the current top-N RPN proposals each iteration) or ``cache``
  (boxes + embeddings precomputed by ``tools/cache_vild_teacher.py``, see ``vild_teacher.py``).
- **ViLD-ensemble** (``MODEL.VILD.ENSEMBLE``): a second projection (image branch) trained only
  by distillation, the text branch only by CE; at test time
  ``p = p_text^(1-w) * p_img^(w)`` per class with w = w_base or w_novel (background: w_base).

The frozen CLIP teacher is held by the :class:`ViLD` meta-architecture outside its module tree:
it is not in ``state_dict`` (never saved in checkpoints) and is built lazily, only when online
distillation needs it.
"""
from __future__ import annotations

import functools
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.layers import ShapeSpec, batched_nms, cat
from detectron2.modeling import (
    BACKBONE_REGISTRY,
    META_ARCH_REGISTRY,
    ROI_HEADS_REGISTRY,
    Backbone,
    GeneralizedRCNN,
)
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.roi_heads import FastRCNNOutputLayers, StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import _log_classification_stats
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from .text_classifier import TextEmbeddingClassifier, check_text_embeddings, l2_normalize

logger = logging.getLogger(__name__)

__all__ = [
    "ViLD",
    "ViLDROIHeads",
    "ViLDOutputLayers",
    "ensemble_probabilities",
    "fast_rcnn_inference_topk",
    "vild_text_embeddings_from_cfg",
    "build_clip_resnet_rcnn_fpn_backbone",
]

TEACHER_SOURCES = ("online", "cache")


# ------------------------------------------------------------------------------- helpers
def _train_metadata(cfg):
    names = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
    if not names:
        raise ValueError("ViLD needs DATASETS.TRAIN (or DATASETS.TEST) to know its classes")
    return MetadataCatalog.get(names[0])


def vild_text_embeddings_from_cfg(cfg) -> Tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings and novel-class mask of the training dataset of ``cfg``.

    Returns:
        text_embeddings: (C, D) from ``gridclip.clip.text_embeddings_from_cfg`` for the
            dataset's ``thing_classes`` (checked against ROI_HEADS.NUM_CLASSES).
        novel_class_mask: (C,) bool, True for LVIS frequency ``r``; all False when the
            dataset has no frequencies (then IGNORE_NOVEL_IN_TRAINING must be off).
    """
    from gridclip.clip import text_embeddings_from_cfg
    from gridclip.data import novel_class_mask

    from .vocabulary import check_class_count

    metadata = _train_metadata(cfg)
    thing_classes = getattr(metadata, "thing_classes", None)
    if thing_classes is None:
        raise ValueError(
            f"dataset {metadata.name!r} has no 'thing_classes' metadata: ViLD needs the class "
            "names to build its text classifier (register it with gridclip.data)"
        )
    text_embeddings = text_embeddings_from_cfg(cfg, thing_classes)
    check_class_count(text_embeddings, cfg, metadata)
    try:
        novel = novel_class_mask(metadata)
    except KeyError:
        if cfg.MODEL.VILD.IGNORE_NOVEL_IN_TRAINING:
            raise ValueError(
                f"MODEL.VILD.IGNORE_NOVEL_IN_TRAINING is True but dataset {metadata.name!r} has "
                "no 'class_frequencies' (LVIS f/c/r) metadata to tell novel classes; register it "
                "with gridclip.data.register_lvis_format_dataset or set "
                "MODEL.VILD.IGNORE_NOVEL_IN_TRAINING False"
            )
        novel = torch.zeros(len(thing_classes), dtype=torch.bool)
    return text_embeddings, novel


def ensemble_probabilities(
    text_probs: torch.Tensor,
    image_probs: torch.Tensor,
    novel_class_mask: torch.Tensor,
    image_weight_base: float,
    image_weight_novel: float,
) -> torch.Tensor:
    """ViLD-ensemble: per-class weighted geometric mean of the two branches' probabilities.

    Args:
        text_probs, image_probs: (R, K+1) softmax outputs, background last.
        novel_class_mask: (K,) bool.
    Returns:
        (R, K+1): ``p_text^(1-w) * p_img^w`` with w = image_weight_novel on novel classes and
        image_weight_base on base classes and on background (a trained class). Not
        renormalised, as in ViLD.
    """
    K = novel_class_mask.numel()
    assert text_probs.shape == image_probs.shape and text_probs.shape[1] == K + 1, (
        f"ensemble: text {tuple(text_probs.shape)} / image {tuple(image_probs.shape)} "
        f"probabilities for {K} classes + background"
    )
    w = torch.full((K + 1,), float(image_weight_base), device=text_probs.device)
    w[:K][novel_class_mask.to(text_probs.device)] = float(image_weight_novel)
    return text_probs.pow(1.0 - w) * image_probs.pow(w)


def fast_rcnn_inference_topk(
    boxes: List[torch.Tensor],
    scores: List[torch.Tensor],
    image_shapes: List[Tuple[int, int]],
    score_thresh: float,
    nms_thresh: float,
    topk_per_image: int,
    pre_nms_topk: int = 1000,
) -> Tuple[List[Instances], List[torch.Tensor]]:
    """Same results as Detectron2's ``fast_rcnn_inference``, fast for large vocabularies.

    Detectron2 runs per-class NMS on every (box, class) pair above the score threshold: with a
    low threshold, 1,000 proposals and 1,203 classes that is over a million candidates. Here
    NMS runs on the ``pre_nms_topk`` best candidates only, and the set is grown (x4) until it
    yields ``topk_per_image`` survivors or holds every candidate. The result is exact (up to
    score ties): greedy per-class NMS decides each candidate from higher-scoring candidates of
    its class only, which the top set always contains, and a survivor outside the top set scores
    below every survivor inside it.

    Args/returns: as ``detectron2.modeling.roi_heads.fast_rcnn.fast_rcnn_inference``.
    """
    results = [
        _inference_single_image_topk(
            b, s, shape, score_thresh, nms_thresh, topk_per_image, pre_nms_topk
        )
        for b, s, shape in zip(boxes, scores, image_shapes)
    ]
    return [r[0] for r in results], [r[1] for r in results]


def _inference_single_image_topk(
    boxes, scores, image_shape, score_thresh, nms_thresh, topk_per_image, pre_nms_topk
):
    """boxes (R, 4) or (R, K*4), scores (R, K+1) -> (Instances, kept proposal indices)."""
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    proposal_index = torch.arange(boxes.shape[0], device=boxes.device)
    if not valid.all():
        boxes, scores, proposal_index = boxes[valid], scores[valid], proposal_index[valid]
    scores = scores[:, :-1]
    num_classes = scores.shape[1]
    num_reg = boxes.shape[1] // 4
    boxes = Boxes(boxes.reshape(-1, 4))
    boxes.clip(image_shape)
    boxes = boxes.tensor.view(-1, num_reg, 4)

    flat_scores = scores.reshape(-1)
    candidates = (flat_scores > score_thresh).nonzero().squeeze(1)  # (box, class) pair ids
    candidate_scores = flat_scores[candidates]
    count = max(int(pre_nms_topk), topk_per_image if topk_per_image > 0 else 0, 1)
    while True:
        count = min(count, candidates.numel())
        top_scores, order = candidate_scores.topk(count)  # sorted, highest first
        pairs = candidates[order]
        rows, classes = pairs // num_classes, pairs % num_classes
        top_boxes = boxes[rows, 0] if num_reg == 1 else boxes[rows, classes]
        keep = batched_nms(top_boxes, top_scores, classes, nms_thresh)
        done = count == candidates.numel() or (0 <= topk_per_image <= keep.numel())
        if done:
            break
        count *= 4
    if topk_per_image >= 0:
        keep = keep[:topk_per_image]
    result = Instances(image_shape)
    result.pred_boxes = Boxes(top_boxes[keep])
    result.scores = top_scores[keep]
    result.pred_classes = classes[keep]
    return result, proposal_index[rows[keep]]


# --------------------------------------------------------------------------- output layers
class ViLDOutputLayers(FastRCNNOutputLayers):
    """ViLD's region classifier (text branch, optional image branch) + class-agnostic boxes.

    ``forward(x)`` returns ``(scores (R, K+1), deltas (R, 4))`` (background last, as Detectron2
    expects); in eval mode with the ensemble on, ``(scores, deltas, image_scores)``.
    """

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        text_embeddings: torch.Tensor,
        num_classes: Optional[int] = None,
        temperature: float = 0.01,
        novel_class_mask: Optional[torch.Tensor] = None,
        ignore_novel_in_training: bool = True,
        image_distill_weight: float = 0.5,
        ensemble: bool = False,
        ensemble_image_weight_base: float = 1.0 / 3.0,
        ensemble_image_weight_novel: float = 2.0 / 3.0,
        test_pre_nms_topk: int = 1000,
        **kwargs,
    ):
        """
        Args:
            text_embeddings: (K, D) class text embeddings (normalised here, kept as a buffer).
            num_classes: optional check: must equal K.
            temperature: logits = cos / temperature (ViLD: 0.01).
            novel_class_mask: (K,) bool, True = novel (masked out of the training softmax,
                ``image_weight_novel`` in the ensemble). None = no novel class.
            ignore_novel_in_training: mask novel logits out of the training softmax.
            image_distill_weight: weight of ``loss_vild_image`` (0 disables distillation).
            ensemble: add the image-branch projection; combine both branches at test time.
            ensemble_image_weight_base/novel: image-branch weight w in the geometric ensemble.
            test_pre_nms_topk: initial candidate count of :func:`fast_rcnn_inference_topk`.
            kwargs: the arguments of ``FastRCNNOutputLayers`` (box2box_transform, test_*,
                cls_agnostic_bbox_reg=True required, loss weights, ...).
        """
        text_embeddings = check_text_embeddings(text_embeddings, source="ViLD text embeddings")
        K, D = text_embeddings.shape
        if num_classes is not None and num_classes != K:
            raise ValueError(
                f"ViLD: {K} text embeddings but num_classes = {num_classes} "
                "(MODEL.ROI_HEADS.NUM_CLASSES)"
            )
        if not kwargs.get("cls_agnostic_bbox_reg", False):
            raise ValueError(
                "ViLD needs class-agnostic box regression (MODEL.ROI_BOX_HEAD."
                "CLS_AGNOSTIC_BBOX_REG True): novel classes have no box regressor of their own"
            )
        if kwargs.get("use_sigmoid_ce", False) or kwargs.get("use_fed_loss", False):
            raise ValueError(
                "ViLD trains with softmax cross-entropy: set MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE "
                "and USE_FED_LOSS False"
            )
        assert temperature > 0, f"MODEL.VILD.TEMPERATURE must be positive, got {temperature}"
        super().__init__(input_shape, num_classes=K, **kwargs)
        del self.cls_score  # replaced by the projection(s) + text classifier below
        input_size = self.bbox_pred.in_features
        # Region embedding heads (box-head feature -> CLIP space).
        self.text_projection = nn.Linear(input_size, D)
        self.image_projection = nn.Linear(input_size, D) if ensemble else None
        for layer in (self.text_projection, self.image_projection):
            if layer is not None:
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.constant_(layer.bias, 0.0)
        self.text_classifier = TextEmbeddingClassifier(
            text_embeddings,
            logit_scale=1.0 / temperature,
            max_logit_scale=max(100.0, 1.0 / temperature),
        )
        # Learned background embedding, init N(0, 0.01) as in ViLD; used L2-normalised.
        self.background_embedding = nn.Parameter(torch.randn(D) * 0.01)
        self._set_novel_class_mask(novel_class_mask, K)
        self.ignore_novel_in_training = bool(ignore_novel_in_training)
        self.image_distill_weight = float(image_distill_weight)
        self.ensemble = bool(ensemble)
        self.ensemble_image_weight_base = float(ensemble_image_weight_base)
        self.ensemble_image_weight_novel = float(ensemble_image_weight_novel)
        self.test_pre_nms_topk = int(test_pre_nms_topk)
        self._warned_novel_gt = False

    @classmethod
    def from_config(cls, cfg, input_shape, text_embeddings=None, novel_class_mask=None):
        ret = super().from_config(cfg, input_shape)
        if text_embeddings is None:
            text_embeddings, novel_class_mask = vild_text_embeddings_from_cfg(cfg)
        v = cfg.MODEL.VILD
        ret.update(
            {
                "text_embeddings": text_embeddings,
                "temperature": v.TEMPERATURE,
                "novel_class_mask": novel_class_mask,
                "ignore_novel_in_training": v.IGNORE_NOVEL_IN_TRAINING,
                "image_distill_weight": v.IMAGE_DISTILL_WEIGHT,
                "ensemble": v.ENSEMBLE,
                "ensemble_image_weight_base": v.ENSEMBLE_IMAGE_WEIGHT_BASE,
                "ensemble_image_weight_novel": v.ENSEMBLE_IMAGE_WEIGHT_NOVEL,
            }
        )
        return ret

    # ----------------------------------------------------------------------- vocabulary
    @property
    def num_classes(self) -> int:
        classifier = self._modules.get("text_classifier")
        return classifier.num_classes if classifier is not None else self._num_classes_at_init

    @num_classes.setter
    def num_classes(self, value: int) -> None:  # set by FastRCNNOutputLayers.__init__
        self._num_classes_at_init = int(value)

    @property
    def embed_dim(self) -> int:
        return self.text_classifier.embed_dim

    def _set_novel_class_mask(self, mask: Optional[torch.Tensor], num_classes: int) -> None:
        mask = (
            torch.zeros(num_classes, dtype=torch.bool)
            if mask is None
            else torch.as_tensor(mask, dtype=torch.bool).flatten()
        )
        assert mask.numel() == num_classes, (
            f"novel_class_mask has {mask.numel()} entries for {num_classes} classes"
        )
        classifier = self._modules.get("text_classifier")
        device = classifier.text_embeddings.device if classifier is not None else None
        self.register_buffer("novel_class_mask", mask.to(device), persistent=True)

    def set_vocabulary(
        self, text_embeddings: torch.Tensor, novel_class_mask: Optional[torch.Tensor] = None
    ) -> None:
        """Replace the K class embeddings (any K, same D). ``novel_class_mask`` (K,) bool says
        which classes count as novel for the ensemble weights and the training mask; default:
        all novel (none of them was trained with boxes under this vocabulary)."""
        self.text_classifier.set_vocabulary(text_embeddings)
        K = self.num_classes
        if novel_class_mask is None:
            novel_class_mask = torch.ones(K, dtype=torch.bool)
        self._set_novel_class_mask(novel_class_mask, K)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint with another vocabulary size: adopt the shape of its novel-class mask
        # (the text classifier adopts its embeddings the same way).
        key = prefix + "novel_class_mask"
        if key in state_dict and state_dict[key].shape != self.novel_class_mask.shape:
            self._set_novel_class_mask(state_dict[key], state_dict[key].numel())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------------------- forward
    def class_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(R, D) region embeddings (any norm) -> (R, K+1) logits, background last, fp32."""
        foreground = self.text_classifier(embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            background = l2_normalize(embeddings.float()) @ l2_normalize(
                self.background_embedding.float()
            )
            background = self.text_classifier.logit_scale * background
        return torch.cat([foreground, background[:, None]], dim=1)

    def forward(self, x: torch.Tensor):
        """
        Args:
            x: (R, C) or (R, C, h, w) box-head features.
        Returns:
            scores (R, K+1) text-branch logits, deltas (R, 4); plus image-branch logits
            (R, K+1) in eval mode with the ensemble on.
        """
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        scores = self.class_logits(self.text_projection(x))
        deltas = self.bbox_pred(x)
        if self.ensemble and not self.training:
            return scores, deltas, self.class_logits(self.image_projection(x))
        return scores, deltas

    def distill_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """(R, ...) box-head features -> (R, D) normalised embeddings that ViLD-image trains
        (the image branch with the ensemble, else the shared text-branch embedding)."""
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        projection = self.image_projection if self.ensemble else self.text_projection
        return l2_normalize(projection(x).float())

    # ----------------------------------------------------------------------------- losses
    def mask_novel_logits(self, scores: torch.Tensor) -> torch.Tensor:
        """Training: novel classes get -inf logits (no probability mass, no gradient)."""
        if not self.ignore_novel_in_training or not self.novel_class_mask.any():
            return scores
        if self.novel_class_mask.all():
            raise ValueError(
                "ViLD: every class of the vocabulary is marked novel, so training would mask "
                "all of them; pass novel_class_mask to set_vocabulary or set "
                "MODEL.VILD.IGNORE_NOVEL_IN_TRAINING False"
            )
        mask = torch.cat([self.novel_class_mask, self.novel_class_mask.new_zeros(1)])
        return scores.masked_fill(mask[None, :], float("-inf"))

    def losses(self, predictions, proposals):
        """``loss_cls`` (softmax CE, base + background, novel masked) and ``loss_box_reg``.

        Proposals matched to a novel class (present only if the training data was not the
        base-only split) are left out of the CE with a warning.
        """
        scores, deltas = predictions[:2]
        gt_classes = cat([p.gt_classes for p in proposals]) if proposals else scores.new_zeros(
            (0,), dtype=torch.long
        )
        scores = self.mask_novel_logits(scores)
        _log_classification_stats(scores, gt_classes)
        labels = gt_classes
        if self.ignore_novel_in_training and self.novel_class_mask.any():
            novel_gt = self._is_novel(gt_classes)
            if novel_gt.any():
                if not self._warned_novel_gt:
                    logger.warning(
                        "ViLD: training proposals matched to novel classes (annotations of "
                        "frequency 'r' in the training set); they are left out of loss_cls. "
                        "Train on the base-only split."
                    )
                    self._warned_novel_gt = True
                labels = gt_classes.masked_fill(novel_gt, -100)  # F.cross_entropy's ignore
        num_valid = max(int((labels >= 0).sum()), 1)
        loss_cls = F.cross_entropy(scores, labels, reduction="sum") / num_valid
        if labels.numel() == 0:
            loss_cls = scores.sum() * 0.0
        if proposals:
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals])
            gt_boxes = cat(
                [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals]
            )
        else:
            proposal_boxes = gt_boxes = deltas.new_zeros((0, 4))
        losses = {
            "loss_cls": loss_cls,
            "loss_box_reg": self.box_reg_loss(proposal_boxes, gt_boxes, deltas, gt_classes),
        }
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def _is_novel(self, gt_classes: torch.Tensor) -> torch.Tensor:
        fg = (gt_classes >= 0) & (gt_classes < self.num_classes)
        novel = torch.zeros_like(fg)
        novel[fg] = self.novel_class_mask[gt_classes[fg]]
        return novel

    def distillation_loss(
        self, box_features: torch.Tensor, teacher_embeddings: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        """ViLD-image: ``{"loss_vild_image": w * (1/R) sum_r ||s_r - t_r||_1}``.

        Args:
            box_features: (R, ...) box-head features of the distilled proposals.
            teacher_embeddings: (R, D) CLIP embeddings of their crops (normalised here too).
        """
        student = self.distill_embeddings(box_features)
        assert student.shape == teacher_embeddings.shape, (
            f"ViLD-image: student {tuple(student.shape)} vs teacher "
            f"{tuple(teacher_embeddings.shape)} embeddings (MODEL.CLIP.EMBED_DIM must be the "
            "teacher's dimension)"
        )
        teacher = l2_normalize(teacher_embeddings.float().to(student.device))
        loss = F.l1_loss(student, teacher, reduction="sum") / max(student.shape[0], 1)
        return {"loss_vild_image": loss * self.image_distill_weight}

    # -------------------------------------------------------------------------- inference
    def predict_boxes(self, predictions, proposals):
        return super().predict_boxes(predictions[:2], proposals)

    def predict_boxes_for_gt_classes(self, predictions, proposals):
        return super().predict_boxes_for_gt_classes(predictions[:2], proposals)

    def predict_probs(self, predictions, proposals):
        """(R, K+1) per image: text-branch softmax, or the ensemble when image scores exist."""
        probs = F.softmax(predictions[0], dim=-1)
        if len(predictions) > 2:
            probs = ensemble_probabilities(
                probs,
                F.softmax(predictions[2], dim=-1),
                self.novel_class_mask,
                self.ensemble_image_weight_base,
                self.ensemble_image_weight_novel,
            )
        return probs.split([len(p) for p in proposals], dim=0)

    def inference(self, predictions, proposals):
        boxes = self.predict_boxes(predictions, proposals)
        scores = self.predict_probs(predictions, proposals)
        return fast_rcnn_inference_topk(
            boxes,
            scores,
            [p.image_size for p in proposals],
            self.test_score_thresh,
            self.test_nms_thresh,
            self.test_topk_per_image,
            self.test_pre_nms_topk,
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embed_dim={self.embed_dim}, "
            f"ensemble={self.ensemble}, image_distill_weight={self.image_distill_weight}"
        )


# ------------------------------------------------------------------------------- ROI heads
@ROI_HEADS_REGISTRY.register()
class ViLDROIHeads(StandardROIHeads):
    """``StandardROIHeads`` with :class:`ViLDOutputLayers` and ViLD-image distillation.

    In training, ``forward`` also takes ``distill_proposals``: per image an ``Instances`` with
    ``proposal_boxes`` (in the input image's coordinates) and ``teacher_embeddings`` (R_i, D).
    Their RoI features go through the box head in the same pass as the sampled proposals.
    """

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        assert isinstance(self.box_predictor, ViLDOutputLayers), (
            f"ViLDROIHeads needs a ViLDOutputLayers box predictor, got "
            f"{type(self.box_predictor).__name__}"
        )
        if self.train_on_pred_boxes:
            raise ValueError("ViLDROIHeads does not support MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES")

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = ViLDOutputLayers(cfg, ret["box_head"].output_shape)
        return ret

    @property
    def num_classes(self) -> int:
        # Follows the vocabulary (set_vocabulary / checkpoints): the background label is K.
        predictor = self._modules.get("box_predictor")
        return predictor.num_classes if predictor is not None else self._num_classes_at_init

    @num_classes.setter
    def num_classes(self, value: int) -> None:  # set by ROIHeads.__init__
        self._num_classes_at_init = int(value)

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
        distill_proposals: Optional[List[Instances]] = None,
    ):
        if not self.training:
            return super().forward(images, features, proposals, targets)
        assert targets, "'targets' argument is required during training"
        proposals = self.label_and_sample_proposals(proposals, targets)
        losses = self._forward_box(features, proposals, distill_proposals)
        losses.update(self._forward_mask(features, proposals))
        losses.update(self._forward_keypoint(features, proposals))
        return proposals, losses

    def _forward_box(self, features, proposals, distill_proposals=None):
        predictor = self.box_predictor
        if not self.training or distill_proposals is None or predictor.image_distill_weight <= 0:
            return super()._forward_box(features, proposals)
        assert len(distill_proposals) == len(proposals), (
            f"{len(distill_proposals)} distill proposal sets for {len(proposals)} images"
        )
        in_features = [features[f] for f in self.box_in_features]
        sampled = self.box_pooler(in_features, [p.proposal_boxes for p in proposals])
        distilled = self.box_pooler(in_features, [d.proposal_boxes for d in distill_proposals])
        box_features = self.box_head(torch.cat([sampled, distilled], dim=0))
        num_sampled = sampled.shape[0]
        losses = predictor.losses(predictor(box_features[:num_sampled]), proposals)
        teacher = cat([d.teacher_embeddings for d in distill_proposals])
        losses.update(predictor.distillation_loss(box_features[num_sampled:], teacher))
        storage = get_event_storage()
        storage.put_scalar("vild/num_distill_proposals", teacher.shape[0] / max(len(proposals), 1))
        return losses


# ---------------------------------------------------------------------------------- backbone
@BACKBONE_REGISTRY.register()
def build_clip_resnet_rcnn_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """CLIP ModifiedResNet trunk + Faster R-CNN's FPN (P2-P5 + P6 by max-pool).

    The two-stage counterpart of ``build_clip_resnet_fpn_backbone`` (RetinaNet's P3-P7), so
    ViLD can start from the same CLIP trunk as GridCLIP. Uses ``MODEL.CLIP_RESNET.*`` for the
    trunk and ``MODEL.FPN.IN_FEATURES / OUT_CHANNELS / NORM / FUSE_TYPE``.
    """
    from .clip_backbone import build_clip_resnet_backbone

    bottom_up = build_clip_resnet_backbone(cfg, input_shape)
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    missing = [f for f in in_features if f not in bottom_up.output_shape()]
    if missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES {in_features} asks for {missing}, which "
            f"MODEL.CLIP_RESNET.OUT_FEATURES {list(cfg.MODEL.CLIP_RESNET.OUT_FEATURES)} lacks"
        )
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


# -------------------------------------------------------------------------- meta-architecture
def _build_teacher(cfg):
    from gridclip.clip import build_clip_teacher_from_cfg

    return build_clip_teacher_from_cfg(cfg)


@META_ARCH_REGISTRY.register()
class ViLD(GeneralizedRCNN):
    """Faster R-CNN with ViLD's open-vocabulary ROI heads and online/cached CLIP distillation.

    Inputs are Detectron2's (``DatasetMapper`` / :class:`~gridclip.modeling.vild_teacher.
    ViLDDatasetMapper` dicts); images in ``INPUT.FORMAT`` (RGB with CLIP's pixel mean/std in
    the shipped configs). The frozen CLIP teacher is not a submodule: not in ``state_dict``,
    built on first use by online distillation (or given with :meth:`set_clip_teacher`), moved
    to the images' device when used.
    """

    @configurable
    def __init__(
        self,
        *,
        clip_teacher: Optional[nn.Module] = None,
        clip_teacher_builder=None,
        teacher_source: str = "online",
        num_distill_proposals: int = 300,
        crop_scales: Sequence[float] = (1.0, 1.5),
        vocabulary_cfg=None,
        class_names: Optional[Sequence[str]] = None,
        **kwargs,
    ):
        """
        Args:
            clip_teacher: a ``CLIPImageTeacher`` (anything with ``embed_boxes(image, boxes,
                scales)``); None = build it with ``clip_teacher_builder`` when first needed.
            clip_teacher_builder: zero-argument callable returning the teacher.
            teacher_source: ``online`` or ``cache`` (inputs carry ``distill_proposals``).
            num_distill_proposals: proposals distilled per image (top-N RPN proposals online).
            crop_scales: teacher crop scales (ViLD: 1x and 1.5x, embeddings summed).
            vocabulary_cfg: config used to embed class names in :meth:`set_vocabulary`.
            class_names: names of the K classes (informative; None when unknown).
            kwargs: ``GeneralizedRCNN`` arguments; ``roi_heads`` must be :class:`ViLDROIHeads`.
        """
        super().__init__(**kwargs)
        if not isinstance(self.roi_heads, ViLDROIHeads):
            raise ValueError(
                f"ViLD needs MODEL.ROI_HEADS.NAME 'ViLDROIHeads', got "
                f"{type(self.roi_heads).__name__}"
            )
        if teacher_source not in TEACHER_SOURCES:
            raise ValueError(
                f"MODEL.VILD.TEACHER must be one of {TEACHER_SOURCES}, got {teacher_source!r}"
            )
        if self.input_format not in (None, "RGB", "BGR"):
            raise ValueError(f"ViLD: INPUT.FORMAT must be RGB or BGR, got {self.input_format!r}")
        self.teacher_source = teacher_source
        self.num_distill_proposals = int(num_distill_proposals)
        self.crop_scales = tuple(float(s) for s in crop_scales)
        self._clip_teacher_builder = clip_teacher_builder
        self._vocabulary_cfg = vocabulary_cfg
        self.class_names: Optional[List[str]] = list(class_names) if class_names else None
        self.set_clip_teacher(clip_teacher)
        self.register_load_state_dict_post_hook(ViLD._forget_names_of_other_vocabulary)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        v = cfg.MODEL.VILD
        if v.TEACHER == "cache" and v.IMAGE_DISTILL_WEIGHT > 0 and not v.TEACHER_CACHE:
            raise ValueError(
                "MODEL.VILD.TEACHER is 'cache' but MODEL.VILD.TEACHER_CACHE is empty: build a "
                "cache with tools/cache_vild_teacher.py and set its directory"
            )
        metadata = _train_metadata(cfg)
        ret.update(
            {
                "clip_teacher_builder": functools.partial(_build_teacher, cfg.clone()),
                "teacher_source": v.TEACHER,
                "num_distill_proposals": v.NUM_DISTILL_PROPOSALS,
                "crop_scales": v.CROP_SCALES,
                "vocabulary_cfg": cfg.clone(),
            }
        )
        names = getattr(metadata, "thing_classes", None)
        ret["class_names"] = list(names) if names is not None else None
        return ret

    # --------------------------------------------------------------------------- teacher
    @property
    def clip_teacher(self) -> nn.Module:
        """The frozen CLIP image teacher (built on first access if a builder is known)."""
        if self._clip_teacher is None:
            if self._clip_teacher_builder is None:
                raise RuntimeError(
                    "ViLD: online distillation needs a CLIP teacher; build the model from a "
                    "config (MODEL.CLIP) or call model.set_clip_teacher(teacher)"
                )
            logger.info("Building the frozen CLIP teacher for ViLD-image distillation")
            self.set_clip_teacher(self._clip_teacher_builder())
        return self._clip_teacher

    def set_clip_teacher(self, teacher: Optional[nn.Module]) -> None:
        """Use ``teacher`` (kept outside the module tree: never in state_dict/checkpoints)."""
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher.eval()
        object.__setattr__(self, "_clip_teacher", teacher)

    @property
    def distillation_enabled(self) -> bool:
        return self.roi_heads.box_predictor.image_distill_weight > 0

    # ------------------------------------------------------------------------ vocabulary
    @staticmethod
    def _forget_names_of_other_vocabulary(module: "ViLD", incompatible_keys) -> None:
        # load_state_dict may adopt a checkpoint's vocabulary of another size: its names are
        # not in the checkpoint.
        if module.class_names is not None and len(module.class_names) != module.num_classes:
            module.class_names = None

    @property
    def text_embeddings(self) -> torch.Tensor:
        """(K, D) normalised class text embeddings (a buffer of the text classifier)."""
        return self.roi_heads.box_predictor.text_classifier.text_embeddings

    @property
    def num_classes(self) -> int:
        return self.roi_heads.box_predictor.num_classes

    def set_vocabulary(self, vocabulary, novel_class_mask: Optional[torch.Tensor] = None) -> None:
        """Detect another vocabulary: class names, a (K, D) tensor/array, or a ``.npy``/``.pt``
        path (see ``gridclip.modeling.vocabulary.resolve_vocabulary``). Any K; the buffer is
        replaced (moved by ``.to()``, saved in checkpoints).

        ``novel_class_mask`` (K,) bool marks the novel classes (ensemble weight
        ENSEMBLE_IMAGE_WEIGHT_NOVEL; masked in training). Default: with class names, a class is
        base iff it was a base class of the current vocabulary under the same name
        (case-insensitive); with embeddings, every class is novel.
        """
        from .vocabulary import resolve_vocabulary

        text_embeddings, names = resolve_vocabulary(vocabulary, self._vocabulary_cfg)
        predictor = self.roi_heads.box_predictor
        text_embeddings = check_text_embeddings(
            text_embeddings, embed_dim=predictor.embed_dim, source="ViLD vocabulary"
        )
        old_names = self.class_names
        if novel_class_mask is None and names is not None and old_names is not None:
            from gridclip.clip import clean_class_name

            def key(name):
                return clean_class_name(name).lower()

            old_novel = predictor.novel_class_mask.tolist()
            base = {key(n) for n, novel in zip(old_names, old_novel) if not novel}
            novel_class_mask = torch.tensor([key(n) not in base for n in names])
        predictor.set_vocabulary(text_embeddings, novel_class_mask)
        self.class_names = names
        logger.info(
            f"ViLD vocabulary set to {predictor.num_classes} classes "
            f"({int(predictor.novel_class_mask.sum())} novel)"
        )

    # --------------------------------------------------------------------------- forward
    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """Training: Detectron2's losses + ``loss_vild_image``; inference as GeneralizedRCNN."""
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        gt_instances = None
        if "instances" in batched_inputs[0]:
            gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        if self.proposal_generator is not None:
            proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        else:
            proposals = [x["proposals"].to(self.device) for x in batched_inputs]
            proposal_losses = {}
        distill_proposals = None
        if self.distillation_enabled:
            distill_proposals = self.distillation_proposals(batched_inputs, proposals)
        _, detector_losses = self.roi_heads(
            images, features, proposals, gt_instances, distill_proposals=distill_proposals
        )
        if self.vis_period > 0 and get_event_storage().iter % self.vis_period == 0:
            self.visualize_training(batched_inputs, proposals)
        return {**detector_losses, **proposal_losses}

    def teacher_image(self, image: torch.Tensor) -> torch.Tensor:
        """A model input image (3, H, W) in INPUT.FORMAT -> float RGB 0-255 on the device."""
        image = self._move_to_current_device(image).float()
        return image.flip(0) if self.input_format == "BGR" else image

    def distillation_proposals(
        self, batched_inputs: List[Dict], proposals: List[Instances]
    ) -> List[Instances]:
        """Per image: ``proposal_boxes`` (R_i <= N) and ``teacher_embeddings`` (R_i, D).

        ``online``: the top-N RPN proposals (sorted by objectness), boxes under 1 px dropped,
        embedded by the CLIP teacher from the raw input image. ``cache``: the mapper's
        ``distill_proposals`` (see ``ViLDDatasetMapper``).
        """
        N = self.num_distill_proposals
        if self.teacher_source == "cache":
            if "distill_proposals" not in batched_inputs[0]:
                raise KeyError(
                    "MODEL.VILD.TEACHER is 'cache' but the inputs carry no 'distill_proposals': "
                    "build the training loader with gridclip.modeling.ViLDDatasetMapper(cfg, "
                    "is_train=True) (train_net.py does this for META_ARCHITECTURE 'ViLD')"
                )
            return [x["distill_proposals"][:N].to(self.device) for x in batched_inputs]
        teacher = self.clip_teacher
        if next(teacher.parameters()).device != self.device:
            teacher.to(self.device)
        out = []
        for x, p in zip(batched_inputs, proposals):
            boxes = p.proposal_boxes[:N]
            boxes = boxes[boxes.nonempty(threshold=1.0)]
            with torch.no_grad():
                embeddings = teacher.embed_boxes(
                    self.teacher_image(x["image"]), boxes.tensor, scales=self.crop_scales
                )
            distill = Instances(p.image_size)
            distill.proposal_boxes = boxes
            distill.teacher_embeddings = embeddings.to(self.device).float()
            out.append(distill)
        return out
