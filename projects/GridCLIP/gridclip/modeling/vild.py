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
  (boxes + embeddings precomputed by ``tools/cache_vild_teacher.py``, see
  ``gridclip.clip.teacher_cache``).
- **ViLD-ensemble** (``MODEL.VILD.ENSEMBLE``): a second projection (image branch) trained only
  by distillation, the text branch only by CE; at test time
  ``p = p_text^(1-w) * p_img^(w)`` per class with w = w_base or w_novel (background: w_base).

Modules: ``vild_heads`` (output layers, ROI heads), ``fast_rcnn_topk`` (inference),
``gridclip.clip.teacher_cache`` (offline teacher cache), ``gridclip.data.mapper`` (its mapper),
this file (meta-architecture); the backbone is
``clip_backbone.build_clip_resnet_rcnn_fpn_backbone``.

The frozen CLIP teacher is held by the :class:`ViLD` meta-architecture outside its module tree
(a :class:`~gridclip.modeling.teacher_holder.TeacherHolder`): it is not in ``state_dict`` (never
saved in checkpoints) and is built lazily, only when online distillation needs it.
"""

from __future__ import annotations

import functools
import logging
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from ..clip import build_clip_teacher_from_cfg
from .clip_backbone import build_clip_resnet_rcnn_fpn_backbone
from .clip_rescoring import check_rescoring_settings, clip_rescored_scores
from .fast_rcnn_topk import fast_rcnn_inference_topk
from .teacher_holder import TeacherHolder
from .text_classifier import check_text_embeddings
from .vild_heads import (
    ViLDOutputLayers,
    ViLDROIHeads,
    ensemble_probabilities,
    vild_text_embeddings_from_cfg,
)
from .vocabulary import dataset_class_names, novel_mask_by_name, resolve_vocabulary

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


# -------------------------------------------------------------------------- meta-architecture
@META_ARCH_REGISTRY.register()
class ViLD(GeneralizedRCNN):
    """Faster R-CNN with ViLD's open-vocabulary ROI heads and online/cached CLIP distillation.

    Inputs are Detectron2's (``DatasetMapper`` / :class:`~gridclip.data.mapper.
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
        test_clip_ensemble: bool = False,
        test_clip_ensemble_weights: Sequence[float] = (0.35, 0.65),
        test_clip_ensemble_share_iou: float = 1.0,
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
            test_clip_ensemble: rescore the final detections with the frozen CLIP teacher
                (F-VLM's rule, :func:`~gridclip.modeling.clip_rescoring.clip_rescored_scores`,
                the same as GridCLIP's; crops at ``crop_scales``).
            test_clip_ensemble_weights: its (w_base, w_novel); novel = the novel-class mask.
            test_clip_ensemble_share_iou: detections overlapping a higher-scored one by more
                than this IoU share its crops (1: every detection cropped).
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
        self.test_clip_ensemble = bool(test_clip_ensemble)
        (
            self.test_clip_ensemble_weights,
            self.crop_scales,
            self.test_clip_ensemble_share_iou,
        ) = check_rescoring_settings(
            test_clip_ensemble_weights,
            crop_scales,
            test_clip_ensemble_share_iou,
            "MODEL.VILD.TEST_CLIP_ENSEMBLE_WEIGHTS",
            "MODEL.VILD.CROP_SCALES",
            "MODEL.VILD.TEST_CLIP_ENSEMBLE_SHARE_IOU",
        )
        # A plain object, not a submodule: the teacher is never in state_dict / checkpoints.
        self.teacher_holder = TeacherHolder(
            clip_teacher,
            clip_teacher_builder,
            name="CLIP teacher of ViLD-image distillation",
            missing_hint=(
                ": online distillation needs one; build the model from a config (MODEL.CLIP) or "
                "call model.set_clip_teacher(teacher)"
            ),
        )
        self._vocabulary_cfg = vocabulary_cfg
        self.class_names: Optional[List[str]] = list(class_names) if class_names else None
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
        ret.update(
            {
                "clip_teacher_builder": functools.partial(build_clip_teacher_from_cfg, cfg.clone()),
                "teacher_source": v.TEACHER,
                "num_distill_proposals": v.NUM_DISTILL_PROPOSALS,
                "crop_scales": v.CROP_SCALES,
                "vocabulary_cfg": cfg.clone(),
                "test_clip_ensemble": v.TEST_CLIP_ENSEMBLE,
                "test_clip_ensemble_weights": v.TEST_CLIP_ENSEMBLE_WEIGHTS,
                "test_clip_ensemble_share_iou": v.TEST_CLIP_ENSEMBLE_SHARE_IOU,
            }
        )
        ret["class_names"] = dataset_class_names(cfg)
        return ret

    # --------------------------------------------------------------------------- teacher
    @property
    def clip_teacher(self) -> nn.Module:
        """The frozen CLIP image teacher (built on first access if a builder is known)."""
        return self.teacher_holder.get()

    def set_clip_teacher(self, teacher: Optional[nn.Module]) -> None:
        """Use ``teacher`` (kept outside the module tree: never in state_dict/checkpoints)."""
        self.teacher_holder.set(teacher)

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
        text_embeddings, names = resolve_vocabulary(vocabulary, self._vocabulary_cfg)
        predictor = self.roi_heads.box_predictor
        text_embeddings = check_text_embeddings(
            text_embeddings, embed_dim=predictor.embed_dim, source="ViLD vocabulary"
        )
        if novel_class_mask is None and names is not None and self.class_names is not None:
            novel_class_mask = novel_mask_by_name(
                names, self.class_names, predictor.novel_class_mask
            )
        predictor.set_vocabulary(text_embeddings, novel_class_mask)
        self.class_names = names
        logger.info(
            f"ViLD vocabulary set to {predictor.num_classes} classes "
            f"({int(predictor.novel_class_mask.sum())} novel)"
        )

    def vocabulary_state(self) -> Dict:
        """A copy of the current vocabulary (text embeddings, novel-class mask, names), for
        :meth:`restore_vocabulary` after a temporary :meth:`set_vocabulary`."""
        predictor = self.roi_heads.box_predictor
        return {
            "text_embeddings": self.text_embeddings.detach().clone(),
            "novel_class_mask": predictor.novel_class_mask.detach().clone(),
            "class_names": None if self.class_names is None else list(self.class_names),
        }

    def restore_vocabulary(self, state: Dict) -> None:
        """Go back to a vocabulary saved by :meth:`vocabulary_state`."""
        predictor = self.roi_heads.box_predictor
        predictor.set_vocabulary(state["text_embeddings"], state["novel_class_mask"])
        self.class_names = state["class_names"]

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

    def inference(self, batched_inputs, detected_instances=None, do_postprocess: bool = True):
        """GeneralizedRCNN's inference; with ``test_clip_ensemble`` the detections (in the input
        images' coordinates) are rescored by the frozen CLIP before the postprocessing."""
        if not self.test_clip_ensemble:
            return super().inference(batched_inputs, detected_instances, do_postprocess)
        results = super().inference(batched_inputs, detected_instances, do_postprocess=False)
        teacher = self.teacher_holder.on(self.device)
        trained = ~self.roi_heads.box_predictor.novel_class_mask
        for inst, inputs in zip(results, batched_inputs):
            inst.scores = clip_rescored_scores(
                inst.scores,
                inst.pred_boxes.tensor,
                inst.pred_classes,
                self.teacher_image(inputs["image"]),
                teacher,
                self.text_embeddings,
                trained,
                self.test_clip_ensemble_weights,
                self.crop_scales,
                self.test_clip_ensemble_share_iou,
            )
        if not do_postprocess:
            return results
        sizes = [inst.image_size for inst in results]  # the padded batch's per-image sizes
        return GeneralizedRCNN._postprocess(results, batched_inputs, sizes)

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
                    "build the training loader with gridclip.data.ViLDDatasetMapper(cfg, "
                    "is_train=True) (train_net.py does this for META_ARCHITECTURE 'ViLD')"
                )
            return [x["distill_proposals"][:N].to(self.device) for x in batched_inputs]
        teacher = self.teacher_holder.on(self.device)  # follows the detector's device
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
