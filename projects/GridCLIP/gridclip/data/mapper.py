"""The project's ``DatasetMapper``s.

- :class:`CheckedDatasetMapper`: Detectron2's ``read_image`` already converts grayscale/RGBA to
  the configured format and applies EXIF orientation; this subclass only turns an unreadable or
  truncated image into an error that says which file, instead of a bare PIL/IO error deep inside
  a data-loader worker.
- :class:`ViLDDatasetMapper`: also attaches ViLD's cached distillation proposals
  (:class:`gridclip.clip.teacher_cache.TeacherCache`). It applies the training augmentation
  (resize, flip) to the cached boxes, so they line up with the augmented image; the crop
  embeddings are those of the un-augmented crops (CLIP is nearly flip-invariant; ViLD does the
  same).
"""

from __future__ import annotations

from typing import Optional

import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.structures import Boxes, Instances

from ..clip.loading import clip_model_key, resolve_clip_weights
from ..clip.teacher_cache import TeacherCache

__all__ = ["CheckedDatasetMapper", "ImageReadError", "ViLDDatasetMapper"]


class ImageReadError(RuntimeError):
    """An image of the dataset could not be decoded."""


class CheckedDatasetMapper(DatasetMapper):
    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except (OSError, SyntaxError, ValueError) as e:
            # PIL raises OSError for truncated data and UnidentifiedImageError (an OSError) for
            # unknown formats; SyntaxError for some malformed headers.
            if isinstance(e, ImageReadError):
                raise
            raise ImageReadError(
                f"Cannot read image {dataset_dict.get('file_name')!r} "
                f"(image_id {dataset_dict.get('image_id')}): {type(e).__name__}: {e}"
            ) from e


class ViLDDatasetMapper(CheckedDatasetMapper):
    """The project's ``DatasetMapper`` that, for ``MODEL.VILD.TEACHER "cache"`` in training,
    also attaches the cached distillation proposals of each image as
    ``dataset_dict["distill_proposals"]``: an ``Instances`` with ``proposal_boxes`` (the cached
    boxes under the same resize/flip as the image, clipped) and ``teacher_embeddings`` (R, D).
    Otherwise it behaves exactly like ``CheckedDatasetMapper`` (so it can serve any model).
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        teacher_cache: Optional[TeacherCache] = None,
        num_distill_proposals: int = 300,
        **kwargs,
    ):
        super().__init__(is_train, **kwargs)
        self.teacher_cache = teacher_cache
        self.num_distill_proposals = int(num_distill_proposals)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        vild = cfg.MODEL.VILD
        if is_train and vild.TEACHER == "cache" and vild.IMAGE_DISTILL_WEIGHT > 0:
            c = cfg.MODEL.CLIP
            ret["teacher_cache"] = TeacherCache(
                vild.TEACHER_CACHE,
                embed_dim=c.EMBED_DIM,
                crop_scales=vild.CROP_SCALES,
                teacher_input_size=c.TEACHER_INPUT_SIZE,
                clip_model=clip_model_key(resolve_clip_weights(c.WEIGHTS, c.NAME, c.CACHE_DIR)),
                num_distill_proposals=vild.NUM_DISTILL_PROPOSALS,
            )
        ret["num_distill_proposals"] = vild.NUM_DISTILL_PROPOSALS
        return ret

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        # Called in training with the transforms applied to the image: the right hook for boxes.
        super()._transform_annotations(dataset_dict, transforms, image_shape)
        if self.teacher_cache is not None:
            dataset_dict["distill_proposals"] = self._cached_proposals(
                dataset_dict, transforms, image_shape
            )

    def _cached_proposals(self, dataset_dict, transforms, image_shape) -> Instances:
        size = None
        if "height" in dataset_dict and "width" in dataset_dict:
            size = (dataset_dict["height"], dataset_dict["width"])
        entry = self.teacher_cache.get(dataset_dict["image_id"], size)
        boxes = entry["boxes"][: self.num_distill_proposals].numpy()
        embeddings = entry["embeddings"][: self.num_distill_proposals].float()
        boxes = Boxes(torch.as_tensor(transforms.apply_box(boxes), dtype=torch.float32))
        boxes.clip(image_shape)
        keep = boxes.nonempty(threshold=1.0)  # crops of < 1 px are meaningless
        proposals = Instances(image_shape)
        proposals.proposal_boxes = boxes[keep]
        proposals.teacher_embeddings = embeddings[keep]
        return proposals
