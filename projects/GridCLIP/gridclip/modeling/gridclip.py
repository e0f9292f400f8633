"""GridCLIP: a one-stage open-vocabulary detector (RetinaNet with a CLIP text classifier).

The classification branch of RetinaNet ends in grid embeddings in CLIP's joint image-text space
instead of per-class logits; a class's logit is ``scale * cos(grid embedding, text embedding) +
prior bias`` against fixed CLIP text embeddings (:class:`TextEmbeddingClassifier`). Anchor
matching, the focal and box losses, box decoding and NMS are RetinaNet's.

The head predicts one D-d embedding per grid cell, shared by its A anchors: the text
  product costs H*W*K*D instead of H*W*A*K*D. Anchors of one location would then all get the
  same score, although only some of them fit an object (the others are trained as negatives and
  their boxes are not regressed): NMS would keep an arbitrary one. So by default
  (``MODEL.GRIDCLIP.ANCHOR_OFFSET``) a class-agnostic logit offset per anchor, predicted from the
  box tower (A channels), is added: ``logit(location, anchor, class) = cls(location, class) +
  offset(location, anchor)``. Inference never materialises per-anchor scores: it ranks
  (location, class) pairs by ``cls + max over anchors of offset``, keeps the top ones and only
  then expands them to their A anchors, which selects exactly the anchors RetinaNet's per-anchor
  top-k would. The same offsets make the per-location objectness that gates the text product
  (below). (One embedding per anchor, ``EMBED_PER_ANCHOR``, was measured and removed: 3.65x
  slower at 800x1216, and over 3 seeds on the embedded world not better: APr -0.9, AP +0.3 on
  average; docs/RESULTS.md.)

Scoring only promising locations (inference; ``MODEL.GRIDCLIP.TEST_TOPK_LOCATIONS``). The text
product costs (locations x classes x D); at 800x1216 and 10,000 classes it is most of the
inference (docs/BENCHMARKS.md). A location's **objectness** is the maximum of its anchor offsets:
the class-agnostic part of every logit there, from the box tower, trained by the focal loss like
the rest of the logit (no extra loss, no training change). Before the product, per image and level:

1. exact pruning: ``logit <= logit_scale + bias + offset`` (the cosine is at most 1), so a
   location whose ``logit_scale + bias + objectness`` is below the logit of
   ``SCORE_THRESH_TEST`` cannot produce a detection and is not scored (always on);
2. top-K: of the rest, only the K locations of highest objectness are scored, so the
   vocabulary costs at most K x C per level. Exact when K covers every location that can
   reach the detections (K >= the level's locations always); otherwise an approximation whose
   accuracy is measured (docs/RESULTS.md, docs/BENCHMARKS.md).

A dedicated objectness output trained by its own focal loss ("a positive anchor of a trained
class at this location", issue 13) ranked locations losslessly (K = 100 as K = 0), but the
detector trained with that loss was below the default in all 3 seeds (APr -2.4 / -1.3 / -3.7):
removed; its numbers are in docs/RESULTS.md and docs/BENCHMARKS.md.

``MODEL.GRIDCLIP.OBJECTNESS_RANKER`` keeps the ranking without that cost: the same kind of
output (one logit per location, 3x3 conv on the box tower, the same focal loss and target) on
the box tower's features *detached*, ``loss_objectness_ranker``. No gradient of it reaches the
detector and the conv is built from a forked random state, so the detector trains exactly as
without it (same initialisation, same gradients: tests); only the ranking is learned. It then
ranks the locations for step 2 instead of the anchor offsets (step 1 still uses the offsets:
that bound is exact). It never enters the detection scores. Because the detector does not
depend on it, the ranker can also be fitted afterwards onto a trained detector
(``MODEL.GRIDCLIP.TRAIN_OBJECTNESS_RANKER_ONLY`` with ``MODEL.WEIGHTS``): every other weight
frozen, only ``loss_objectness_ranker`` computed, the detector bit for bit the checkpoint's.

Training on base classes only (``MODEL.GRIDCLIP.IGNORE_NOVEL_IN_TRAINING``): the focal loss
covers the columns of classes annotated in training (LVIS OVD: frequencies f and c); novel
columns are left out of the loss, not treated as negatives. All classes are scored at test time.

The classification loss is RetinaNet's sigmoid focal loss with its normaliser, evaluated by
:func:`~gridclip.modeling.focal_loss.grid_focal_loss` on the per-location logits (and anchor
offsets) without expanding them to (anchors x classes): the same value and gradients as
``RetinaNet.losses`` on expanded logits (the tests' oracle), several times cheaper.

As a :class:`RetinaNet` subclass it overrides the hooks: ``forward_training`` (anchor labels in
the trained class space, then :meth:`GridCLIP.losses`), ``losses`` and ``forward_inference``.
``forward`` keeps :class:`DenseDetector`'s steps (preprocess, backbone, head, training or
inference + Detectron2's post-processing) with GridCLIP's two additions: the head's grid
embeddings (not per-anchor logits) plus the dense CLIP term on the backbone's ``res5`` output,
and the image-level alignment loss, which needs the raw inputs. The head is in ``head.py``.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import batched_nms
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, build_backbone
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.box_regression import Box2BoxTransform, _dense_box_regression_loss
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage
from fvcore.nn import sigmoid_focal_loss_jit
from torch import Tensor, nn

from ..clip import build_clip_teacher_from_cfg
from ..data import novel_class_mask
from .box_refinement import BoxRefiner, build_box_refiner, check_refine_steps
from .box_voting import check_box_voting_iou, kept_boxes
from .clip_backbone import DenseCLIPProjection, build_dense_clip_projection
from .clip_rescoring import check_rescoring_settings, clip_rescored_scores
from .embedding_rows import EmbeddingRowsOnDemand, dense_resampling
from .focal_loss import grid_focal_loss
from .head import EMBED_KERNEL_SIZES, GridCLIPHead
from .image_alignment import ImageAlignment, build_image_alignment
from .pairs_alignment import (
    PairsAlignment,
    build_pairs_alignment,
    caption_pseudo_boxes,
    pseudo_box_targets,
)
from .teacher_holder import TeacherHolder
from .vocabulary import resolve_vocabulary, vocabulary_from_cfg

logger = logging.getLogger(__name__)

__all__ = ["GridCLIP", "GridCLIPHead", "trained_class_mask_from_cfg", "EMBED_KERNEL_SIZES"]


def trained_class_mask_from_cfg(cfg, num_classes: int) -> Tensor:
    """(K,) bool: the classes whose focal-loss columns are trained.

    All classes, unless ``MODEL.GRIDCLIP.IGNORE_NOVEL_IN_TRAINING``: then the base classes
    (frequency f or c) of the training dataset's ``class_frequencies`` metadata (an error if the
    dataset has none).
    """
    mask = torch.ones(num_classes, dtype=torch.bool)
    if not cfg.MODEL.GRIDCLIP.IGNORE_NOVEL_IN_TRAINING or not len(cfg.DATASETS.TRAIN):
        return mask
    name = cfg.DATASETS.TRAIN[0]
    novel = novel_class_mask(name, num_classes, setting="MODEL.GRIDCLIP.IGNORE_NOVEL_IN_TRAINING")
    if bool(novel.all()):
        raise ValueError(
            f"dataset {name!r}: every class is novel (frequency 'r'); nothing to train"
        )
    logger.info(
        f"GridCLIP trains the classification loss on {int((~novel).sum())} base classes of "
        f"{num_classes} ({int(novel.sum())} novel classes excluded) of {name!r}"
    )
    return ~novel


@META_ARCH_REGISTRY.register()
class GridCLIP(RetinaNet):
    """RetinaNet whose classifier is CLIP's text embeddings; see the module docstring.

    Extra training loss: ``loss_image_align`` (image-level alignment with a CLIP teacher) when
    ``MODEL.GRIDCLIP.IMAGE_ALIGN_WEIGHT > 0``. Use :meth:`set_vocabulary` to detect other classes.
    Image-text pairs in a training batch (inputs with ``phrases``, no ``instances``) train
    ``loss_pairs`` (:meth:`pairs_losses`, ``MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT > 0``), the box
    inputs of the same batch the box losses.
    """

    @configurable
    def __init__(
        self,
        *,
        head: GridCLIPHead,
        image_alignment: Optional[ImageAlignment] = None,
        trained_class_mask: Optional[Tensor] = None,
        class_names: Optional[Sequence[str]] = None,
        vocabulary_cfg=None,
        dense_clip: Optional[DenseCLIPProjection] = None,
        dense_clip_weight: float = 1.0,
        test_topk_locations: int = 0,
        clip_ensemble: Optional[TeacherHolder] = None,
        clip_ensemble_weights: Tuple[float, float] = (0.35, 0.65),
        clip_ensemble_crop_scales: Sequence[float] = (1.0, 1.5),
        clip_ensemble_share_iou: float = 1.0,
        test_clip_ensemble: Optional[bool] = None,
        pairs_pseudo_clip_weight: float = 0.65,
        pairs_pseudo_clip_crop_scales: Sequence[float] = (1.0, 1.5),
        pairs_alignment: Optional[PairsAlignment] = None,
        train_objectness_ranker_only: bool = False,
        test_box_voting_iou: float = 0.0,
        box_refiner: Optional[BoxRefiner] = None,
        box_refine_loss_weight: float = 1.0,
        test_box_refine_steps: int = 1,
        **kwargs,
    ):
        """
        Args:
            head: a :class:`GridCLIPHead` (holds the text embeddings; K = its class count).
            image_alignment: image-level alignment module, or None to disable it.
            trained_class_mask: (K,) bool, classes trained by the focal loss (default: all).
            class_names: names of the K classes, if known (informative: demos, logs).
            vocabulary_cfg: the config used to embed class names in :meth:`set_vocabulary`.
            dense_clip: CLIP's attention-pool value path (:class:`DenseCLIPProjection`) on the
                backbone's ``res5`` output; its normalised output, resampled to every level, is
                added to the grid embeddings (``MODEL.GRIDCLIP.DENSE_CLIP``). The backbone must
                return the CLIP trunk's ``res5`` (``build_clip_resnet_fpn_backbone`` does).
            dense_clip_weight: initial value of the learned scale of that term.
            test_topk_locations: at inference, score at most this many locations per level and
                image, those of highest objectness (module doc); 0 = every location. Needs the
                anchor offsets (per-location head with ``anchor_offset``).
            clip_ensemble: a holder of the frozen CLIP image teacher to rescore the final
                detections with (F-VLM's score ensemble, :meth:`clip_ensemble_scores`), or None.
            clip_ensemble_weights: (w_base, w_novel): the CLIP score's exponent for classes
                trained by the focal loss and for the others.
            clip_ensemble_crop_scales: crops around each box given to the teacher (embeddings
                summed), as ViLD's region teacher.
            clip_ensemble_share_iou: detections overlapping a higher-scored one by more than
                this IoU share its crops (1: every detection cropped).
            test_clip_ensemble: rescore the final detections with ``clip_ensemble`` at
                inference; None: whenever there is one. False keeps the teacher for the
                pseudo-box search alone.
            pairs_pseudo_clip_weight: the CLIP score's exponent when the pseudo-box search
                (:meth:`find_pseudo_boxes`) ranks a phrase's candidates; 0: no CLIP ranking. A
                training setting of its own (``MODEL.GRIDCLIP.PAIRS_PSEUDO_CLIP_WEIGHT``), not
                the inference weights, so that tuning inference never changes what pairs train.
            pairs_pseudo_clip_crop_scales: the crops around each candidate CLIP sees in that
                ranking (``MODEL.GRIDCLIP.PAIRS_PSEUDO_CLIP_CROP_SCALES``), likewise its own.
            pairs_alignment: the phrase vocabulary and settings of training on image-text
                pairs (inputs with ``phrases`` and no ``instances``; loss:
                :meth:`pairs_pseudo_box_loss`), or None (``MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT``).
            train_objectness_ranker_only: train the head's objectness ranker alone: every other
                parameter frozen (``requires_grad`` off), training returns only
                ``loss_objectness_ranker`` (module doc).
            test_box_voting_iou: at inference, replace each box NMS keeps by the score-weighted
                mean of the same-class candidates overlapping it by at least this IoU
                (:func:`box_voting`); 0 = off.
            box_refiner: class-agnostic refinement of the kept boxes (:class:`BoxRefiner`,
                trained by ``loss_box_refine``), or None.
            box_refine_loss_weight: weight of ``loss_box_refine``.
            test_box_refine_steps: how many times the refiner regresses each kept box at
                inference; the pseudo-box search (:meth:`find_pseudo_boxes`) refines once.
            kwargs: the arguments of :class:`RetinaNet` except ``head`` and ``num_classes``.
        """
        assert isinstance(head, GridCLIPHead), f"GridCLIP needs a GridCLIPHead, got {type(head)}"
        super().__init__(head=head, num_classes=head.num_classes, **kwargs)
        self.image_alignment = image_alignment
        self.pairs_alignment = pairs_alignment
        self.dense_clip = dense_clip
        if dense_clip is not None:
            shapes = self.backbone.output_shape()
            if "res5" not in shapes:
                raise ValueError(
                    "MODEL.GRIDCLIP.DENSE_CLIP needs a backbone that returns CLIP's ResNet trunk's "
                    "res5 (MODEL.BACKBONE.NAME build_clip_resnet_fpn_backbone, 'res5' in "
                    f"MODEL.CLIP_RESNET.OUT_FEATURES); {type(self.backbone).__name__} returns "
                    f"{sorted(shapes)}"
                )
            channels = shapes["res5"].channels
            if dense_clip.in_channels != channels or dense_clip.embed_dim != head.embed_dim:
                raise ValueError(
                    "MODEL.GRIDCLIP.DENSE_CLIP: the CLIP attention pool maps "
                    f"{dense_clip.in_channels} -> {dense_clip.embed_dim} channels, but res5 has "
                    f"{channels} and the text embeddings are {head.embed_dim}-d "
                    "(MODEL.CLIP.EMBED_DIM): another CLIP?"
                )
            self.dense_clip_scale = nn.Parameter(torch.tensor(float(dense_clip_weight)))
        if test_topk_locations < 0:
            raise ValueError(f"MODEL.GRIDCLIP.TEST_TOPK_LOCATIONS={test_topk_locations} < 0")
        if test_topk_locations and head.anchor_offset is None:
            raise ValueError(
                "MODEL.GRIDCLIP.TEST_TOPK_LOCATIONS ranks locations by their anchor offsets: it "
                "needs the per-location head with MODEL.GRIDCLIP.ANCHOR_OFFSET (and A > 1 anchors)"
            )
        self.test_topk_locations = int(test_topk_locations)
        self.test_box_voting_iou = check_box_voting_iou(
            test_box_voting_iou, "MODEL.GRIDCLIP.TEST_BOX_VOTING_IOU"
        )
        self.box_refiner = box_refiner
        self.box_refine_loss_weight = float(box_refine_loss_weight)
        self.test_box_refine_steps = check_refine_steps(
            test_box_refine_steps, "MODEL.GRIDCLIP.TEST_BOX_REFINE_STEPS"
        )
        self.clip_ensemble = clip_ensemble
        self.test_clip_ensemble = (
            clip_ensemble is not None if test_clip_ensemble is None else bool(test_clip_ensemble)
        )
        if self.test_clip_ensemble and clip_ensemble is None:
            raise ValueError("test_clip_ensemble needs clip_ensemble (the frozen CLIP teacher)")
        w = float(pairs_pseudo_clip_weight)
        if not 0.0 <= w <= 1.0:
            raise ValueError(
                f"MODEL.GRIDCLIP.PAIRS_PSEUDO_CLIP_WEIGHT = {pairs_pseudo_clip_weight!r}: must be "
                "in [0, 1] (0: no CLIP ranking of the pseudo-box candidates)"
            )
        self.pairs_pseudo_clip_weight = w
        scales = [float(x) for x in pairs_pseudo_clip_crop_scales]
        if not scales or min(scales) <= 0:
            raise ValueError(
                "MODEL.GRIDCLIP.PAIRS_PSEUDO_CLIP_CROP_SCALES must be positive factors, got "
                f"{list(pairs_pseudo_clip_crop_scales)}"
            )
        self.pairs_pseudo_clip_crop_scales = tuple(scales)
        (
            self.clip_ensemble_weights,
            self.clip_ensemble_crop_scales,
            self.clip_ensemble_share_iou,
        ) = check_rescoring_settings(
            clip_ensemble_weights,
            clip_ensemble_crop_scales,
            clip_ensemble_share_iou,
            "MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE_WEIGHTS",
            "MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE_CROP_SCALES",
            "MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE_SHARE_IOU",
        )
        self.class_names = list(class_names) if class_names is not None else None
        self._vocabulary_cfg = vocabulary_cfg
        self._set_trained_class_mask(trained_class_mask)
        self.register_load_state_dict_post_hook(GridCLIP._sync_vocabulary_after_load)
        self.train_objectness_ranker_only = bool(train_objectness_ranker_only)
        if self.train_objectness_ranker_only:
            if head.objectness is None:
                raise ValueError(
                    "MODEL.GRIDCLIP.TRAIN_OBJECTNESS_RANKER_ONLY needs the ranker: set "
                    "MODEL.GRIDCLIP.OBJECTNESS_RANKER True"
                )
            for name, param in self.named_parameters():
                param.requires_grad_(name.startswith("head.objectness."))

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        backbone_shape = backbone.output_shape()
        feature_shapes = [backbone_shape[f] for f in cfg.MODEL.RETINANET.IN_FEATURES]
        text_embeddings, class_names = cls.vocabulary_from_cfg(cfg)
        head = GridCLIPHead(cfg, feature_shapes, text_embeddings)
        vocabulary_cfg = cfg.clone()
        cfg_for_teacher = cfg.clone()
        # the pseudo-box search of pair training ranks with the frozen CLIP (its own weight)
        rank_pairs = (
            cfg.MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT > 0
            and cfg.MODEL.GRIDCLIP.PAIRS_PSEUDO_CLIP_WEIGHT > 0
        )
        return {
            "backbone": backbone,
            "head": head,
            "image_alignment": build_image_alignment(cfg),
            "trained_class_mask": trained_class_mask_from_cfg(cfg, text_embeddings.shape[0]),
            "class_names": class_names,
            "vocabulary_cfg": vocabulary_cfg,
            "dense_clip": (
                build_dense_clip_projection(cfg) if cfg.MODEL.GRIDCLIP.DENSE_CLIP else None
            ),
            "dense_clip_weight": cfg.MODEL.GRIDCLIP.DENSE_CLIP_WEIGHT,
            "test_topk_locations": cfg.MODEL.GRIDCLIP.TEST_TOPK_LOCATIONS,
            "clip_ensemble": (
                TeacherHolder(
                    builder=lambda: build_clip_teacher_from_cfg(cfg_for_teacher),
                    name="CLIP teacher of the score ensemble",
                )
                if cfg.MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE or rank_pairs
                else None
            ),
            "test_clip_ensemble": cfg.MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE,
            "pairs_pseudo_clip_weight": cfg.MODEL.GRIDCLIP.PAIRS_PSEUDO_CLIP_WEIGHT,
            "pairs_pseudo_clip_crop_scales": cfg.MODEL.GRIDCLIP.PAIRS_PSEUDO_CLIP_CROP_SCALES,
            "clip_ensemble_weights": cfg.MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE_WEIGHTS,
            "clip_ensemble_crop_scales": cfg.MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE_CROP_SCALES,
            "clip_ensemble_share_iou": cfg.MODEL.GRIDCLIP.TEST_CLIP_ENSEMBLE_SHARE_IOU,
            "pairs_alignment": build_pairs_alignment(cfg),
            "train_objectness_ranker_only": cfg.MODEL.GRIDCLIP.TRAIN_OBJECTNESS_RANKER_ONLY,
            "test_box_voting_iou": cfg.MODEL.GRIDCLIP.TEST_BOX_VOTING_IOU,
            "box_refiner": build_box_refiner(cfg, feature_shapes),
            "box_refine_loss_weight": cfg.MODEL.GRIDCLIP.BOX_REFINE_LOSS_WEIGHT,
            "test_box_refine_steps": cfg.MODEL.GRIDCLIP.TEST_BOX_REFINE_STEPS,
            "anchor_generator": build_anchor_generator(cfg, feature_shapes),
            "box2box_transform": Box2BoxTransform(weights=cfg.MODEL.RETINANET.BBOX_REG_WEIGHTS),
            "anchor_matcher": Matcher(
                cfg.MODEL.RETINANET.IOU_THRESHOLDS,
                cfg.MODEL.RETINANET.IOU_LABELS,
                allow_low_quality_matches=True,
            ),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "head_in_features": cfg.MODEL.RETINANET.IN_FEATURES,
            "focal_loss_alpha": cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA,
            "smooth_l1_beta": cfg.MODEL.RETINANET.SMOOTH_L1_LOSS_BETA,
            "box_reg_loss_type": cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE,
            "test_score_thresh": cfg.MODEL.RETINANET.SCORE_THRESH_TEST,
            "test_topk_candidates": cfg.MODEL.RETINANET.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": cfg.MODEL.RETINANET.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "vis_period": cfg.VIS_PERIOD,
            "input_format": cfg.INPUT.FORMAT,
        }

    @staticmethod
    def vocabulary_from_cfg(cfg) -> Tuple[Tensor, Optional[List[str]]]:
        """The (K, D) class text embeddings of a config, checked against it and its dataset.

        ``MODEL.CLIP.TEXT_EMBEDDINGS`` if set, else CLIP text embeddings of the class names of
        ``DATASETS.TRAIN[0]`` (or ``DATASETS.TEST[0]`` when there is no training set); see
        :func:`gridclip.modeling.vocabulary.vocabulary_from_cfg`.
        """
        return vocabulary_from_cfg(cfg)

    # ------------------------------------------------------------------------- vocabulary
    @property
    def text_embeddings(self) -> Tensor:
        """(K, D) L2-normalised class text embeddings (a buffer of the head's classifier)."""
        return self.head.classifier.text_embeddings

    def _set_trained_class_mask(self, mask: Optional[Tensor]) -> None:
        k = self.head.num_classes
        if mask is None:
            mask = torch.ones(k, dtype=torch.bool)
        mask = torch.as_tensor(mask, dtype=torch.bool)
        assert mask.shape == (k,), f"trained_class_mask must be ({k},), got {tuple(mask.shape)}"
        # Not persistent: derived from the dataset's metadata, and reset with the vocabulary.
        self.register_buffer("trained_class_mask", mask.to(self.pixel_mean.device), False)

    def set_vocabulary(self, vocabulary, trained_class_mask: Optional[Tensor] = None) -> None:
        """Detect another set of classes.

        Args:
            vocabulary: class names (embedded with this model's CLIP and prompts), a (C, D)
                tensor/ndarray of text embeddings, or a path to a .npy/.pt of one.
            trained_class_mask: (C,) bool, classes the model was trained on with boxes; the
                others get the CLIP score ensemble's novel weight (and further training leaves
                them out of the focal loss). Default: all (every class weighed as base).

        The text-embedding buffer is replaced (it stays a buffer: moved by ``.to()``, saved in
        checkpoints), ``num_classes`` becomes C, and every class is scored (and, if trained
        further, trained unless novel).
        """
        text_embeddings, names = resolve_vocabulary(vocabulary, self._vocabulary_cfg)
        self.head.classifier.set_vocabulary(text_embeddings)
        self.num_classes = self.head.num_classes
        self.class_names = names
        self._set_trained_class_mask(trained_class_mask)
        logger.info(f"GridCLIP vocabulary set to {self.num_classes} classes")

    def vocabulary_state(self) -> Dict:
        """A copy of the current vocabulary (text embeddings, names, trained-class mask), for
        :meth:`restore_vocabulary` after a temporary :meth:`set_vocabulary`."""
        return {
            "text_embeddings": self.text_embeddings.detach().clone(),
            "class_names": None if self.class_names is None else list(self.class_names),
            "trained_class_mask": self.trained_class_mask.detach().clone(),
        }

    def restore_vocabulary(self, state: Dict) -> None:
        """Go back to a vocabulary saved by :meth:`vocabulary_state`."""
        self.head.classifier.set_vocabulary(state["text_embeddings"])
        self.num_classes = self.head.num_classes
        self.class_names = state["class_names"]
        self._set_trained_class_mask(state["trained_class_mask"])

    @staticmethod
    def _sync_vocabulary_after_load(module: "GridCLIP", incompatible_keys) -> None:
        # load_state_dict may adopt a checkpoint's vocabulary of another size.
        if module.num_classes != module.head.num_classes:
            module.num_classes = module.head.num_classes
            module.class_names = None
            module._set_trained_class_mask(None)

    # ---------------------------------------------------------------------------- forward
    def forward(self, batched_inputs: List[Dict[str, Tensor]]):
        """Same inputs and outputs as :class:`RetinaNet` (losses include ``loss_image_align``).

        In training, inputs with ``phrases`` and no ``instances`` are image-text pairs: a batch
        may mix them with box inputs (:class:`gridclip.engine.pairs.JointLoader`); each group
        gets its own forward pass (pair images have their own size) and the losses of both are
        returned (box losses on the box inputs, ``loss_pairs`` on the pairs).
        """
        if self.training:
            pairs = [x for x in batched_inputs if "instances" not in x and "phrases" in x]
            if pairs:
                boxes = [x for x in batched_inputs if "instances" in x or "phrases" not in x]
                losses = self._forward_one(pairs, pairs_only=True)
                if boxes:
                    losses.update(self._forward_one(boxes))
                return losses
        return self._forward_one(batched_inputs)

    def _forward_one(self, batched_inputs: List[Dict[str, Tensor]], pairs_only: bool = False):
        """:meth:`forward` on inputs of one kind: image-text pairs (``pairs_only``) or not."""
        images = self.preprocess_image(batched_inputs)
        backbone_features = self.backbone(images.tensor)
        features = [backbone_features[f] for f in self.head_in_features]
        # At inference the embeddings are made only where the gate scores (embedding_rows.py).
        on_demand = not self.training and self.head.embeds_per_location
        predictions = self.predict(features, backbone_features.get("res5"), on_demand)

        if pairs_only:
            # image-text pairs
            return self.pairs_losses(images, features, predictions, batched_inputs)
        if self.training:
            assert "instances" in batched_inputs[0], "Instance annotations are missing in training!"
            gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
            losses = self.forward_training(images, features, predictions, gt_instances)
            if self.image_alignment is not None and not self.train_objectness_ranker_only:
                losses.update(self.image_alignment_losses(images, predictions, batched_inputs))
            return losses
        results = self.forward_inference(images, features, predictions)
        if self.test_clip_ensemble:
            for inst, inputs in zip(results, batched_inputs):
                inst.scores = self.clip_ensemble_scores(inst, inputs["image"])
        return GeneralizedRCNN._postprocess(results, batched_inputs, images.image_sizes)

    @torch.no_grad()
    def clip_ensemble_scores(self, detections: Instances, image: Tensor) -> Tensor:
        """F-VLM's score ensemble: ``p_det^(1 - w) * p_clip^w`` per detection.

        ``p_clip`` is the frozen CLIP teacher's probability of the detection's class among the
        vocabulary: softmax of CLIP's logit scale x cos(the teacher's embedding of the box's
        crops, the class text embeddings). ``w`` is ``clip_ensemble_weights[0]`` for classes
        the focal loss trained (base) and ``[1]`` for the others (novel).

        Args:
            detections: one image's detections, boxes in the coordinates of ``image``.
            image: that image as given to the model: (3, H, W), 0-255, ``INPUT.FORMAT``.
        """
        rgb = image.to(self.device, torch.float32)
        if self.input_format == "BGR":
            rgb = rgb.flip(0)
        return clip_rescored_scores(
            detections.scores,
            detections.pred_boxes.tensor,
            detections.pred_classes,
            rgb,
            self.clip_ensemble.on(self.device),
            self.text_embeddings,
            self.trained_class_mask,
            self.clip_ensemble_weights,
            self.clip_ensemble_crop_scales,
            self.clip_ensemble_share_iou,
        )

    def predict(
        self, features: List[Tensor], res5: Optional[Tensor] = None, rows_on_demand: bool = False
    ) -> List:
        """The head's raw outputs ``[grid_embeddings, box_deltas, anchor_offsets]`` (see
        :meth:`GridCLIPHead.forward_embeddings`), the grid embeddings with the dense CLIP term
        of ``res5`` (the backbone's trunk output) when it is on; a fourth, the objectness
        ranker's logits, only when the head has one.

        ``rows_on_demand`` (inference, 1x1 embedding conv): per level an
        :class:`EmbeddingRowsOnDemand` instead of the grid embeddings, which
        :meth:`forward_inference` asks for the rows of the locations it scores only.
        """
        if rows_on_demand:
            predictions = list(self.head.forward_towers(features))
            dense, scale = None, None
            if self.dense_clip is not None:
                assert res5 is not None, "the dense CLIP term needs the backbone's res5 output"
                dense, scale = F.normalize(self.dense_clip(res5), dim=1), self.dense_clip_scale
            conv = self.head.grid_embed
            weight = conv.weight.reshape(conv.out_channels, -1)
            predictions[0] = [
                EmbeddingRowsOnDemand(x, weight, conv.bias, dense, scale) for x in predictions[0]
            ]
        else:
            predictions = list(self.head.forward_embeddings(features))
            if self.dense_clip is not None:
                assert res5 is not None, "the dense CLIP term needs the backbone's res5 output"
                predictions[0] = self._add_dense_clip(predictions[0], res5)
        if predictions[3] is None:
            predictions = predictions[:3]
        return predictions

    def image_alignment_losses(
        self, images: ImageList, predictions: List, batched_inputs: List[Dict]
    ) -> Dict[str, Tensor]:
        """``{"loss_image_align"}``: grid embeddings pooled and aligned with the CLIP teacher's
        embeddings of the raw input images (:class:`ImageAlignment`)."""
        shapes = self.backbone.output_shape()
        strides = [shapes[f].stride for f in self.head_in_features]
        return self.image_alignment(predictions[0], strides, images.image_sizes, batched_inputs)

    def pairs_losses(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: List,
        batched_inputs: List[Dict],
    ) -> Dict[str, Tensor]:
        """``{"loss_pairs"}`` of a batch of image-text pairs (no boxes): the focal loss on
        their caption pseudo-boxes (:meth:`pairs_pseudo_box_loss`). Only this loss: pair images
        train no box-regression or image-alignment loss (the box inputs of the batch do, in
        their own pass: :meth:`forward`)."""
        if self.pairs_alignment is None:
            raise ValueError(
                "a training batch of image-text pairs (inputs with 'phrases', no 'instances') "
                "needs MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT > 0 and DATASETS.PAIRS_TRAIN"
            )
        loss = self.pairs_pseudo_box_loss(images, features, predictions, batched_inputs)
        return {"loss_pairs": loss}

    def pairs_pseudo_box_loss(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: List,
        batched_inputs: List[Dict],
    ) -> Tensor:
        """The focal loss of a batch of image-text pairs against caption pseudo-boxes, times
        ``MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT``.

        The vocabulary is the batch's distinct phrases. Per image, each phrase its captions
        name gets the detector's own best boxes for it (:func:`caption_pseudo_boxes` on this
        forward's detached logits and boxes, as many as the caption counts, at least
        ``PAIRS_PSEUDO_MIN_SCORE``; refined by the box refiner when there is one). Anchors are
        matched to the pseudo-boxes as to ground truth (``anchor_matcher``). Targets, per
        (anchor, phrase):

        - an anchor matched to a pseudo-box of phrase p: positive for p, negative for every
          other phrase of the batch (an object has one name);
        - otherwise, for a phrase the image's captions name and whose objects were all found
          (as many pseudo-boxes as its count): negative;
        - otherwise (phrases the caption does not name, since captions leave objects out, and
          named phrases with objects not found yet): no target.

        (:func:`pseudo_box_targets`.) Normalised by the number of positive anchors, as
        RetinaNet's focal loss. A batch carrying a teacher's pseudo-boxes
        (:meth:`given_pseudo_boxes`) trains on those instead of searching its own.
        """
        grid_embeddings, box_deltas, anchor_offsets = predictions[:3]
        alignment = self.pairs_alignment
        rows, named, counts = alignment.batch_phrases(batched_inputs)
        named, counts = named.to(self.device), counts.to(self.device)
        embeddings = alignment.phrase_embeddings[rows.to(alignment.phrase_embeddings.device)]
        logits = self.head.anchor_logits(
            grid_embeddings, anchor_offsets, text_embeddings=embeddings
        )  # (N, R, P)
        num_phrases = logits.shape[-1]
        anchors = Boxes.cat(self.anchor_generator(features))
        with torch.no_grad():
            given = self.given_pseudo_boxes(batched_inputs)
            if given is not None:
                found, columns = given
            else:
                found, columns = self.find_pseudo_boxes(
                    images,
                    features,
                    box_deltas,
                    logits.detach(),
                    named,
                    counts,
                    [x["image"] for x in batched_inputs],
                    alignment.phrase_embeddings,
                    rows,
                    alignment.pseudo_min_score,
                    anchors,
                )
            labels = []
            for b, c in zip(found, columns):
                image_labels = torch.full(
                    (len(anchors),), num_phrases, dtype=torch.long, device=self.device
                )
                if len(b):
                    matched, match_labels = self.anchor_matcher(pairwise_iou(Boxes(b), anchors))
                    image_labels = c[matched]
                    image_labels[match_labels == 0] = num_phrases
                    image_labels[match_labels == -1] = -1
                labels.append(image_labels)
            labels = torch.stack(labels)  # (N, R): -1 ignore, 0..P-1 phrase, P background
            found_counts = torch.stack([torch.bincount(c, minlength=num_phrases) for c in columns])
            targets, targeted = pseudo_box_targets(labels, named, counts, found_counts)
        positive = (labels >= 0) & (labels < num_phrases)
        loss = self._focal_sum(logits[targeted], targets[targeted])
        get_event_storage().put_scalar(
            "pairs_pseudo_boxes", sum(len(b) for b in found) / len(found)
        )
        return loss / max(int(positive.sum()), 1) * alignment.weight

    def given_pseudo_boxes(
        self, batched_inputs: List[Dict]
    ) -> Optional[Tuple[List[Tensor], List[Tensor]]]:
        """A teacher's pseudo-boxes carried by a pair batch (``pseudo_boxes``, with
        ``MODEL.GRIDCLIP.PAIRS_PSEUDO_BOXES``: :class:`gridclip.data.mapper.PairsDatasetMapper`)
        as :meth:`find_pseudo_boxes` returns its own (per image: boxes, phrase columns of
        :meth:`PairsAlignment.batch_phrases`); None when the batch carries none."""
        carried = ["pseudo_boxes" in x for x in batched_inputs]
        if not any(carried):
            return None
        if not all(carried):
            raise ValueError(
                "a pair batch mixes images with and without teacher pseudo-boxes "
                "(MODEL.GRIDCLIP.PAIRS_PSEUDO_BOXES labels every pair image)"
            )
        column = {k: j for j, k in enumerate(self.pairs_alignment.batch_keys(batched_inputs))}
        found, columns = [], []
        for x in batched_inputs:
            given = x["pseudo_boxes"]
            keys = [x["phrases"][int(c)]["key"] for c in given.gt_classes]
            found.append(given.gt_boxes.tensor.to(self.device, torch.float32))
            columns.append(
                torch.tensor([column[k] for k in keys], dtype=torch.long, device=self.device)
            )
        return found, columns

    @torch.no_grad()
    def find_pseudo_boxes(
        self,
        images: ImageList,
        features: List[Tensor],
        box_deltas: List[Tensor],
        logits: Tensor,
        named: Tensor,
        counts: Tensor,
        raw_images: List[Tensor],
        vocabulary: Tensor,
        rows: Tensor,
        min_score: float,
        anchors: Optional[Boxes] = None,
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """Caption pseudo-boxes of a batch (:meth:`pairs_pseudo_box_loss`;
        ``tools/pseudo_box_quality.py`` measures them on annotated images).

        Args:
            images, features, box_deltas: this forward's (:meth:`predict`).
            logits: (N, R, P) per-anchor logits of the P phrase columns.
            named: (N, P) bool, image i's captions name phrase p; counts: (N, P) how many
                objects (< 1: unknown, one is taken).
            raw_images: the model's input images (``batched_inputs[i]["image"]``), for the CLIP
                score ensemble that ranks each phrase's candidates when it is on.
            vocabulary: (V, D) text embeddings the ensemble's softmax runs over; rows: (P,)
                each column's row in it.
            min_score: ``min_score`` of :func:`caption_pseudo_boxes`.
        Returns:
            per image, the (K, 4) pseudo-boxes (refined by the box refiner when there is one)
            and their (K,) phrase columns.
        """
        if anchors is None:
            anchors = Boxes.cat(self.anchor_generator(features))
        deltas = torch.cat([permute_to_N_HWA_K(x, 4) for x in box_deltas], dim=1)
        found, columns = [], []
        for i, image_size in enumerate(images.image_sizes):
            phrases = named[i].nonzero().squeeze(1)
            boxes = Boxes(self.box2box_transform.apply_deltas(deltas[i], anchors.tensor))
            boxes.clip(image_size)
            rescore = None
            if self.pseudo_box_ranking_weight > 0:
                rescore = self._pseudo_box_rescorer(raw_images[i], vocabulary, rows[phrases.cpu()])
            b, c, _ = caption_pseudo_boxes(
                logits[i][:, phrases],
                boxes.tensor,
                counts[i, phrases].clamp(min=1).tolist(),
                min_score=min_score,
                rescore=rescore,
            )
            found.append(b)
            columns.append(phrases[c])
        if self.box_refiner is not None:
            # One step, whatever TEST_BOX_REFINE_STEPS says: labels a teacher refined twice
            # trained a worse second round (README, "Training with image-text pairs").
            found = self.box_refiner.refine(features, found)
        return found, columns

    @property
    def pseudo_box_ranking_weight(self) -> float:
        """The CLIP score's exponent with which :meth:`find_pseudo_boxes` ranks a phrase's
        candidates (``PAIRS_PSEUDO_CLIP_WEIGHT``); 0 when it does not rank (no teacher)."""
        return self.pairs_pseudo_clip_weight if self.clip_ensemble is not None else 0.0

    def _pseudo_box_rescorer(self, image: Tensor, vocabulary: Tensor, phrase_rows: Tensor):
        """``rescore`` of :func:`caption_pseudo_boxes` for one image: the CLIP score ensemble
        of inference (:meth:`clip_ensemble_scores`) over ``vocabulary``, every phrase with the
        weight ``PAIRS_PSEUDO_CLIP_WEIGHT`` (a caption's phrases are an open vocabulary; 0.65,
        F-VLM's novel-class weight, with which the pairs results were measured); the crops
        are the search's own (``PAIRS_PSEUDO_CLIP_CROP_SCALES``); ``phrase_rows``: the vocabulary
        rows of the image's phrase columns. Every candidate is cropped: crop sharing
        (``TEST_CLIP_ENSEMBLE_SHARE_IOU``) is an inference setting, and the pairs results were
        measured without it."""
        rgb = image.to(self.device, torch.float32)
        if self.input_format == "BGR":
            rgb = rgb.flip(0)
        untrained = torch.zeros(len(vocabulary), dtype=torch.bool, device=self.device)
        phrase_rows = phrase_rows.to(self.device)

        def rescore(boxes: Tensor, columns: Tensor, probs: Tensor) -> Tensor:
            return clip_rescored_scores(
                probs,
                boxes,
                phrase_rows[columns],
                rgb,
                self.clip_ensemble.on(self.device),
                vocabulary,
                untrained,
                (self.pairs_pseudo_clip_weight, self.pairs_pseudo_clip_weight),
                self.pairs_pseudo_clip_crop_scales,
            )

        return rescore

    def _add_dense_clip(self, grid_embeddings: List[Tensor], res5: Tensor) -> List[Tensor]:
        """grid embedding + scale * normalised CLIP dense embedding, resampled per level."""
        dense = F.normalize(self.dense_clip(res5), dim=1)  # (N, D, h5, w5)
        out = []
        for x in grid_embeddings:
            h, w = x.shape[-2:]
            how = dense_resampling((h, w), dense.shape[-2:])
            if how == "same":
                level = dense
            elif how == "upsample":
                level = F.interpolate(dense, size=(h, w), mode="bilinear", align_corners=False)
            else:
                level = F.adaptive_avg_pool2d(dense, (h, w))
            level = F.normalize(level, dim=1).to(x.dtype) * self.dense_clip_scale
            out.append(x + level)
        return out

    def forward_training(self, images, features, predictions, gt_instances):
        """
        Args:
            predictions: [grid_embeddings, box_deltas, anchor_offsets(, objectness)] from
                :meth:`predict`.
        Returns:
            {"loss_cls", "loss_box_reg"} as RetinaNet, over the trained classes, and
            "loss_objectness_ranker" when the head has the (detached) objectness ranker.
        """
        grid_embeddings, box_deltas, anchor_offsets = predictions[:3]
        objectness = predictions[3] if len(predictions) > 3 else None
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        pred_deltas = [permute_to_N_HWA_K(x, 4) for x in box_deltas]
        trained = self.trained_class_mask
        trained_indices = None
        if not bool(trained.all()):
            trained_indices = trained.nonzero().flatten()
            gt_labels = self._to_trained_labels(gt_labels, trained_indices)
        num_trained = int(trained.sum())
        losses = {}
        if objectness is not None:
            objectness = torch.cat([permute_to_N_HWA_K(x, 1) for x in objectness], dim=1)
            losses["loss_objectness_ranker"] = self.objectness_loss(
                objectness[..., 0], torch.stack(gt_labels), num_trained
            )
        if self.train_objectness_ranker_only:
            return losses

        rows = torch.cat([self.head.embedding_rows(x) for x in grid_embeddings], dim=1)
        logits = self.head.logits(rows, trained_indices)  # (N, M, K'), M rows of G anchors
        offsets = None
        if anchor_offsets is not None and self.head.anchors_per_embedding > 1:
            n, m = logits.shape[:2]
            offsets = torch.cat([permute_to_N_HWA_K(x, 1) for x in anchor_offsets], dim=1)
            offsets = offsets.view(n, m, self.head.anchors_per_embedding)
        losses.update(self.losses(anchors, [logits], gt_labels, pred_deltas, gt_boxes, offsets))
        if self.box_refiner is not None:
            losses["loss_box_refine"] = self.box_refine_loss(
                features, anchors, pred_deltas, gt_labels, gt_boxes, num_trained
            )
        return losses

    def box_refine_loss(
        self,
        features: List[Tensor],
        anchors: List[Boxes],
        pred_deltas: List[Tensor],
        gt_labels: List[Tensor],
        gt_boxes: List[Tensor],
        num_classes: int,
    ) -> Tensor:
        """``loss_box_refine``: the refiner trained on the dense head's decoded boxes at the
        positive anchors (of the ``num_classes`` trained classes), each to its anchor's ground
        truth (:meth:`BoxRefiner.losses`), times ``box_refine_loss_weight``."""
        all_anchors = Boxes.cat(anchors).tensor
        deltas = torch.cat(pred_deltas, dim=1).detach()
        boxes, targets = [], []
        for labels, image_deltas, image_gt in zip(gt_labels, deltas, gt_boxes):
            index = ((labels >= 0) & (labels < num_classes)).nonzero().squeeze(1)
            boxes.append(
                self.box2box_transform.apply_deltas(image_deltas[index], all_anchors[index])
            )
            targets.append(image_gt[index])
        loss = self.box_refiner.losses(features, boxes, targets)
        return loss * self.box_refine_loss_weight

    def objectness_loss(self, objectness: Tensor, gt_labels: Tensor, num_classes: int) -> Tensor:
        """Sigmoid focal loss (RetinaNet's alpha, gamma) of the per-location objectness logits.

        Args:
            objectness: (N, M) logits, one per location (M = sum of Hi*Wi).
            gt_labels: (N, M*A) anchor labels {-1 ignore, 0..K-1 class, K background} over the
                trained classes, A anchors per location in anchor order.
            num_classes: K.
        Returns:
            The loss summed over the locations with a target, divided by the number of positive
            locations (at least 1). A location is positive when one of its anchors is, negative
            when all are background, else (ignored anchors only, e.g. of novel classes when they
            are left out of training) not in the loss.
        """
        n, m = objectness.shape
        labels = gt_labels.view(n, m, -1)
        positive = ((labels >= 0) & (labels < num_classes)).any(dim=2)
        negative = (labels == num_classes).all(dim=2)
        valid = positive | negative
        loss = self._focal_sum(objectness[valid], positive[valid])
        return loss / max(int(positive.sum()), 1)

    def _focal_sum(self, logits: Tensor, targets: Tensor) -> Tensor:
        """RetinaNet's sigmoid focal loss (this model's alpha, gamma), summed."""
        return sigmoid_focal_loss_jit(
            logits,
            targets.to(logits.dtype),
            alpha=self.focal_loss_alpha,
            gamma=self.focal_loss_gamma,
            reduction="sum",
        )

    def _to_trained_labels(self, gt_labels: List[Tensor], trained_indices: Tensor) -> List[Tensor]:
        """Anchor labels {-1 ignore, 0..K-1 class, K background} -> {-1, 0..K'-1, K'} over the
        K' trained classes. A box of a class outside the trained set makes its anchors
        "ignore": neither positive nor negative."""
        num_trained = trained_indices.numel()
        device = trained_indices.device
        lookup = torch.full((self.num_classes + 2,), -1, dtype=torch.long, device=device)
        lookup[trained_indices + 1] = torch.arange(num_trained, device=device)
        lookup[self.num_classes + 1] = num_trained
        return [lookup[labels + 1] for labels in gt_labels]

    def losses(
        self,
        anchors,
        pred_logits,
        gt_labels,
        pred_anchor_deltas,
        gt_boxes,
        anchor_offsets: Optional[Tensor] = None,
    ):
        """:meth:`RetinaNet.losses` (same normaliser, ``num_pos_anchors`` event, box loss) with
        the focal loss of :func:`grid_focal_loss` on logits shared by groups of anchors.

        Args:
            anchors, gt_labels, pred_anchor_deltas, gt_boxes: as :meth:`RetinaNet.losses`, the
                labels over the K' = ``pred_logits[0].shape[-1]`` classes trained (K' is read
                from the logits, not from ``self.num_classes``).
            pred_logits: list of (N, M_i, K') logits, M = sum(M_i) embedding rows, each shared
                by R / M anchors (R / M = 1: per-anchor logits, as RetinaNet's).
            anchor_offsets: (N, M, R / M) per-anchor logit offsets, or None.
        """
        logits = torch.cat(pred_logits, dim=1) if len(pred_logits) > 1 else pred_logits[0]
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        num_classes = logits.shape[-1]
        valid_mask = gt_labels >= 0
        pos_mask = valid_mask & (gt_labels != num_classes)
        num_pos_anchors = pos_mask.sum().item()
        get_event_storage().put_scalar("num_pos_anchors", num_pos_anchors / num_images)
        normalizer = self._ema_update("loss_normalizer", max(num_pos_anchors, 1), 100)
        loss_cls = grid_focal_loss(
            logits,
            anchor_offsets,
            gt_labels,
            num_classes,
            alpha=self.focal_loss_alpha,
            gamma=self.focal_loss_gamma,
        )
        loss_box_reg = _dense_box_regression_loss(
            anchors,
            self.box2box_transform,
            pred_anchor_deltas,
            gt_boxes,
            pos_mask,
            box_reg_loss_type=self.box_reg_loss_type,
            smooth_l1_beta=self.smooth_l1_beta,
        )
        return {"loss_cls": loss_cls / normalizer, "loss_box_reg": loss_box_reg / normalizer}

    def forward_inference(
        self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]
    ) -> List[Instances]:
        """Ranks (location, class) pairs, expands only the top ones to anchors (module doc).

        Args:
            predictions: [grid_embeddings, box_deltas, anchor_offsets(, objectness)] from
                :meth:`predict`.
        """
        grid_embeddings, box_deltas, anchor_offsets = predictions[:3]
        objectness = predictions[3] if len(predictions) > 3 else None
        anchors = self.anchor_generator(features)
        # Per level (N, Hi*Wi, D) embedding rows, one per location, or rows made on demand.
        rows = [
            x if isinstance(x, EmbeddingRowsOnDemand) else self.head.embedding_rows(x)
            for x in grid_embeddings
        ]
        deltas = [permute_to_N_HWA_K(x, 4) for x in box_deltas]
        offsets = None
        if anchor_offsets is not None:
            offsets = [permute_to_N_HWA_K(x, self.head.num_anchors) for x in anchor_offsets]
        if objectness is not None:
            objectness = [permute_to_N_HWA_K(x, 1)[..., 0] for x in objectness]
        results: List[Instances] = []
        for img_idx, image_size in enumerate(images.image_sizes):
            per_level = []
            for level, level_anchors in enumerate(anchors):
                level_deltas = deltas[level][img_idx]
                level_offsets = offsets[level][img_idx] if offsets is not None else None
                level_objectness = objectness[level][img_idx] if objectness is not None else None
                locations = self._scored_locations(level_offsets, level_objectness)
                if locations is not None and locations.numel() == 0:
                    continue  # no location of this level can reach the score threshold
                if isinstance(rows[level], EmbeddingRowsOnDemand):
                    level_rows = rows[level].rows(img_idx, locations)
                elif locations is not None:
                    level_rows = rows[level][img_idx][locations]
                else:
                    level_rows = rows[level][img_idx]
                if locations is not None:  # score a subset: gather its anchors, deltas
                    group = level_offsets.shape[1]
                    anchor_idxs = (
                        locations[:, None] * group + torch.arange(group, device=locations.device)
                    ).flatten()
                    level_offsets = level_offsets[locations]
                    level_deltas = level_deltas[anchor_idxs]
                    level_anchors = level_anchors[anchor_idxs]
                per_level.append(
                    self._score_level(
                        level_anchors, level_rows, level_deltas, level_offsets, image_size
                    )
                )
            if not per_level:
                per_level.append(self._no_detections(image_size, deltas[0].device))
            pred = Instances.cat(per_level)
            keep = batched_nms(  # per-class NMS, as RetinaNet
                pred.pred_boxes.tensor, pred.scores, pred.pred_classes, self.test_nms_thresh
            )
            keep = keep[: self.max_detections_per_image]
            kept = pred[keep]
            kept.pred_boxes = Boxes(
                kept_boxes(
                    pred.pred_boxes.tensor,
                    pred.scores,
                    pred.pred_classes,
                    keep,
                    self.test_box_voting_iou,
                )
            )
            results.append(kept)
        if self.box_refiner is not None:
            refined = self.box_refiner.refine(
                features, [r.pred_boxes.tensor for r in results], self.test_box_refine_steps
            )
            for r, boxes in zip(results, refined):
                r.pred_boxes = Boxes(boxes)
        return results

    @staticmethod
    def _no_detections(image_size: Tuple[int, int], device) -> Instances:
        return Instances(
            image_size,
            pred_boxes=Boxes(torch.zeros(0, 4, device=device)),
            scores=torch.zeros(0, device=device),
            pred_classes=torch.zeros(0, dtype=torch.long, device=device),
        )

    def _scored_locations(
        self, offsets: Optional[Tensor], ranking: Optional[Tensor] = None
    ) -> Optional[Tensor]:
        """The locations of one level of one image whose classes are scored (module doc).

        Args:
            offsets: (Hi*Wi, A) anchor logit offsets, or None (ANCHOR_OFFSET off: no objectness).
            ranking: (Hi*Wi,) the objectness ranker's logits, or None: then the top-K ranks by
                the maximum anchor offset. (The exact pruning always uses the offsets.)
        Returns:
            Ascending location indices, or None for all of them (nothing pruned). Exact pruning
            (no class logit there can pass ``test_score_thresh``) is applied on a CPU (not on a
            GPU: it never changes the detections); then at most ``test_topk_locations`` (if > 0)
            of the highest objectness are kept.
        """
        if offsets is None:
            return None
        objectness = offsets.max(dim=1).values  # (Hi*Wi,)
        keep = None
        # The pruning pays on a CPU, where the text product is the cost; on a GPU it would cost
        # two host syncs per level and image for a product the device does in microseconds
        # (docs/BENCHMARKS.md, GPU figures). Exact either way: it never changes the detections.
        if 0.0 < self.test_score_thresh < 1.0 and not offsets.is_cuda:
            classifier = self.head.classifier
            # logit <= scale * cos + bias + offset, cos <= 1 (+ the text product's rounding)
            cos_bound = 1.0 + classifier.product_error_bound
            best_class_logit = float(classifier.logit_scale) * cos_bound + float(classifier.bias)
            thresh = math.log(self.test_score_thresh / (1.0 - self.test_score_thresh))
            passing = objectness + best_class_logit > thresh
            if not bool(passing.all()):
                keep = passing.nonzero().flatten()
        k = self.test_topk_locations
        num_left = objectness.numel() if keep is None else keep.numel()
        if 0 < k < num_left:
            if ranking is not None:
                objectness = ranking
            candidates = objectness if keep is None else objectness[keep]
            top = candidates.topk(k).indices
            keep = top if keep is None else keep[top]
            keep = keep.sort().values  # the ungated order: same ties, same results
        return keep

    #: Above this many (row, class) pairs, the threshold-first top-k is used on a GPU too (it
    #: bounds the memory of ``logits + row_bonus``: 21,000 classes x 15,200 P3 locations).
    EXHAUSTIVE_TOP_PAIRS_LIMIT = 64 * 2**20

    @classmethod
    def _top_pairs(
        cls,
        logits: Tensor,
        row_bonus: Optional[Tensor],
        k: int,
        exhaustive: Optional[bool] = None,
    ) -> Tuple[Tensor, Tensor]:
        """The k largest ``logits[row, class] + row_bonus[row]``: (rows, classes), best first.

        ``exhaustive`` (default: on a GPU, up to ``EXHAUSTIVE_TOP_PAIRS_LIMIT`` pairs): one
        ``torch.topk`` over every pair, no host sync; otherwise the threshold-first method below
        (two host syncs, far less work on a CPU). The same pairs either way, ties aside.

        Threshold first, then a top-k over the few pairs that pass: the ``c = ceil(k / M)``
        largest values of every row are M*c >= k actual pairs, so the k-th largest of them,
        ``tau``, is a lower bound of the k-th largest pair: every top-k pair is >= tau. One
        comparison pass over the logits (each row against ``tau - row_bonus``) finds those
        pairs; ``logits + row_bonus`` is never materialised. (A ``torch.topk`` over the
        candidate rows' values, an earlier method, took 1.3 s of a 13.8 s CPU inference at
        10,000 classes, docs/BENCHMARKS.md; gathering those rows and adding their bonus, the
        next one, 0.4 s of 7.6 s.) NaN logits (whose scores fail the score threshold later
        anyway) fail the comparison; if fewer than k pairs pass (tau itself NaN), a plain top-k
        over every pair.
        """
        num_rows, num_classes = logits.shape
        k = min(k, logits.numel())
        if k == 0:
            empty = torch.zeros(0, dtype=torch.long, device=logits.device)
            return empty, empty
        if exhaustive is None:
            exhaustive = logits.is_cuda and logits.numel() <= cls.EXHAUSTIVE_TOP_PAIRS_LIMIT
        if not exhaustive:
            c = -(-k // num_rows)
            row_top = logits.max(dim=1).values[:, None] if c == 1 else logits.topk(c, dim=1).values
            if row_bonus is not None:
                row_top = row_top + row_bonus[:, None]
            tau = row_top.flatten().topk(k).values[-1]
            # Every pair with logit + bonus >= tau, found by comparing the logits in place with
            # each row's bound tau - bonus (no (rows, classes) copy with the bonus added). The
            # bound is lowered by a few units of rounding so that no pair at tau is lost to the
            # subtraction's rounding; the top-k below ranks the exact sums, so the extra pairs
            # change nothing.
            bound = tau
            if row_bonus is not None:
                slack = 4 * torch.finfo(logits.dtype).eps * (tau.abs() + row_bonus.abs())
                bound = (tau - row_bonus - slack)[:, None]
            passing = (logits >= bound).flatten().nonzero().flatten()
            if passing.numel() >= k:
                rows = torch.div(passing, num_classes, rounding_mode="floor")
                values = logits.flatten()[passing]
                if row_bonus is not None:
                    values = values + row_bonus[rows]
                top = values.topk(k).indices
                return rows[top], passing[top] % num_classes
            # NaN: comparisons fail; rank every pair as torch.topk does (below)
        values = logits if row_bonus is None else logits + row_bonus[:, None]
        idxs = values.flatten().topk(k).indices
        return torch.div(idxs, num_classes, rounding_mode="floor"), idxs % num_classes

    #: The text product of one level is computed in blocks of rows of at most this many
    #: (row, class) logits (128 MiB in fp32): at 21,000 classes every P3 location of an
    #: 800x1216 image would otherwise be one 1.3 GB matrix (with its top-k temporaries, more).
    SCORE_BLOCK_ELEMENTS = 32 * 2**20

    def _score_level(
        self,
        anchors: Boxes,
        rows: Tensor,
        deltas: Tensor,
        offsets: Optional[Tensor],
        image_size: Tuple[int, int],
    ) -> Instances:
        """The text product of one level's (M, D) embedding rows and its decoding
        (:meth:`_decode_level`), in blocks of rows when M x K exceeds
        :attr:`SCORE_BLOCK_ELEMENTS`: each block keeps its own top candidates and the best
        ``TOPK_CANDIDATES_TEST`` of their union are those of the whole level (every candidate
        of the level's top-k is in its block's top-k), ties aside."""
        num_rows = rows.shape[0]
        block = max(1, self.SCORE_BLOCK_ELEMENTS // max(1, self.head.num_classes))
        if num_rows <= block:
            return self._decode_level(anchors, self.head.logits(rows), deltas, offsets, image_size)
        group = deltas.shape[0] // num_rows
        parts = []
        for start in range(0, num_rows, block):
            stop = min(start + block, num_rows)
            parts.append(
                self._decode_level(
                    anchors[start * group : stop * group],
                    self.head.logits(rows[start:stop]),
                    deltas[start * group : stop * group],
                    offsets[start:stop] if offsets is not None else None,
                    image_size,
                )
            )
        merged = Instances.cat(parts)
        if len(merged) > self.test_topk_candidates:
            # stable: the anchors of one location (one score without offsets) keep their order,
            # which decides the one NMS keeps among equal scores
            order = merged.scores.sort(descending=True, stable=True).indices
            merged = merged[order[: self.test_topk_candidates]]
        return merged

    def _decode_level(
        self,
        anchors: Boxes,
        logits: Tensor,
        deltas: Tensor,
        offsets: Optional[Tensor],
        image_size: Tuple[int, int],
    ) -> Instances:
        """Decode one feature level of one image.

        Keeps the ``TOPK_CANDIDATES_TEST`` best anchor-class candidates with probability above
        ``SCORE_THRESH_TEST``, as RetinaNet does, without per-anchor scores for every class:

        - with anchor offsets: the top-k (row, class) pairs by ``logit + max offset`` contain the
          top-k (anchor, class) candidates; they are expanded to their A anchors and the top-k
          of those k*A is kept (exactly RetinaNet's selection, ties aside);
        - without (rows = anchors, or A anchors sharing one score): the top
          ``max(1, k // S)`` rows-class pairs, S anchors per row, each expanded to its S anchors
          (RetinaNet's selection when k is a multiple of S, ties aside).

        Args:
            anchors: Boxes of this level, (Hi*Wi*A, 4).
            logits: (M, K) class logits, M = Hi*Wi locations.
            deltas: (Hi*Wi*A, 4) box deltas.
            offsets: (Hi*Wi, A) anchor logit offsets, or None.
        Returns:
            Instances with ``pred_boxes``, ``scores``, ``pred_classes``.
        """
        num_rows = logits.shape[0]
        group = deltas.shape[0] // max(num_rows, 1)
        assert (
            group * num_rows == deltas.shape[0]
        ), f"{deltas.shape[0]} anchors are not a multiple of {num_rows} score rows"
        topk = self.test_topk_candidates
        if offsets is not None:
            assert offsets.shape == (
                num_rows,
                group,
            ), f"offsets {offsets.shape} != ({num_rows}, {group})"
            rows, classes = self._top_pairs(logits, offsets.max(dim=1).values, topk)
            candidates = logits[rows, classes][:, None] + offsets[rows]  # (P, A)
            anchor_logits, idxs = candidates.flatten().topk(min(topk, candidates.numel()))
            pairs = torch.div(idxs, group, rounding_mode="floor")
            anchor_idxs = rows[pairs] * group + idxs % group
            classes = classes[pairs]
        else:
            rows, classes = self._top_pairs(logits, None, max(1, topk // group))
            anchor_logits = logits[rows, classes]
            anchor_idxs = rows
            if group > 1:
                anchor_idxs = (
                    rows[:, None] * group + torch.arange(group, device=rows.device)
                ).flatten()
                anchor_logits = anchor_logits.repeat_interleave(group)
                classes = classes.repeat_interleave(group)
        scores = anchor_logits.sigmoid()
        keep = scores > self.test_score_thresh
        scores, anchor_idxs, classes = scores[keep], anchor_idxs[keep], classes[keep]
        pred_boxes = self.box2box_transform.apply_deltas(
            deltas[anchor_idxs], anchors.tensor[anchor_idxs]
        )
        return Instances(
            image_size, pred_boxes=Boxes(pred_boxes), scores=scores, pred_classes=classes
        )
