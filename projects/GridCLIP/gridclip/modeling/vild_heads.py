"""ViLD's ROI heads: region embeddings scored against CLIP text embeddings, ViLD-image
distillation RoIs, ViLD-ensemble. See :mod:`gridclip.modeling.vild` for the whole model.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import FastRCNNOutputLayers, StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import _log_classification_stats
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from ..data import has_class_frequencies, novel_class_mask
from .box_voting import check_box_voting_iou
from .fast_rcnn_topk import fast_rcnn_inference_topk
from .text_classifier import TextEmbeddingClassifier, check_text_embeddings, l2_normalize
from .vocabulary import vocabulary_dataset, vocabulary_from_cfg

logger = logging.getLogger(__name__)

__all__ = [
    "ViLDOutputLayers",
    "ViLDROIHeads",
    "ensemble_probabilities",
    "vild_text_embeddings_from_cfg",
]


# ------------------------------------------------------------------------------- helpers
def vild_text_embeddings_from_cfg(cfg) -> Tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings and novel-class mask of the training dataset of ``cfg``.

    Returns:
        text_embeddings: (C, D) from :func:`gridclip.modeling.vocabulary.vocabulary_from_cfg`
            (the dataset's ``thing_classes``, checked against ROI_HEADS.NUM_CLASSES).
        novel_class_mask: (C,) bool, True for LVIS frequency ``r``; all False when the
            dataset has no frequencies (then IGNORE_NOVEL_IN_TRAINING must be off, unless the
            config has no DATASETS.TRAIN: evaluation needs no novel masking).
    """
    name = vocabulary_dataset(cfg)
    if name is None:
        raise ValueError("ViLD needs DATASETS.TRAIN (or DATASETS.TEST) to know its classes")
    text_embeddings, _ = vocabulary_from_cfg(cfg)
    num_classes = text_embeddings.shape[0]
    training = len(cfg.DATASETS.TRAIN) > 0
    if has_class_frequencies(name) or (training and cfg.MODEL.VILD.IGNORE_NOVEL_IN_TRAINING):
        novel = novel_class_mask(name, num_classes, setting="MODEL.VILD.IGNORE_NOVEL_IN_TRAINING")
    else:
        novel = torch.zeros(num_classes, dtype=torch.bool)
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
        test_box_voting_iou: float = 0.0,
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
            test_box_voting_iou: box voting after NMS (:func:`fast_rcnn_inference_topk`);
                0 = off.
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
        self.test_box_voting_iou = check_box_voting_iou(
            test_box_voting_iou, "MODEL.VILD.TEST_BOX_VOTING_IOU"
        )
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
                "test_box_voting_iou": v.TEST_BOX_VOTING_IOU,
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
        assert (
            mask.numel() == num_classes
        ), f"novel_class_mask has {mask.numel()} entries for {num_classes} classes"
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
        image_key = prefix + "image_projection.weight"
        if self.image_projection is not None and image_key not in state_dict:
            logger.warning(
                "MODEL.VILD.ENSEMBLE is on but the checkpoint has no image-branch projection "
                f"({prefix}image_projection): it was trained without the ensemble, so the image "
                "branch stays untrained and the ensembled scores are meaningless"
            )
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
        if proposals:
            gt_classes = cat([p.gt_classes for p in proposals])
        else:
            gt_classes = scores.new_zeros((0,), dtype=torch.long)
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
            self.test_box_voting_iou,
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
        assert len(distill_proposals) == len(
            proposals
        ), f"{len(distill_proposals)} distill proposal sets for {len(proposals)} images"
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
