"""The project's ``DatasetMapper``s.

- :class:`CheckedDatasetMapper`: Detectron2's ``DatasetMapper`` whose images follow the
  project's one image rule (:mod:`.images`, docs/RELIABILITY.md "Images"): Detectron2's
  ``read_image`` converts 8-bit files the same way (gray/palette/alpha to 3 channels, EXIF
  orientation), but a 16-bit or float file (PIL modes ``I;16``, ``I``, ``F``) goes through PIL's
  8-bit conversion, which clips every value above 255 to white, silently. Such a file (told by its
  header, read without decoding) is read by :func:`~.images.read_image_bgr` instead, and its
  pixels replace Detectron2's before the first augmentation (:class:`ImageOfTheRule`, the
  mapper's first augmentation), so Detectron2's ``__call__`` is used as it is. An unreadable,
  truncated or refused image is an error that says which file, instead of a bare PIL/IO error
  deep inside a data-loader worker.
- :class:`PairsDatasetMapper`: image-text pairs; a teacher's pseudo-boxes (the dicts'
  ``annotations``, :func:`~.captions.attach_pseudo_boxes`) go through the same augmentation as
  the image and come out as ``pseudo_boxes`` (``Instances``: ``gt_boxes``, ``gt_classes`` = the
  phrase's index in ``phrases``), never as ``instances``: a pair input stays a pair input.
- :class:`ViLDDatasetMapper`: also attaches ViLD's cached distillation proposals
  (:class:`gridclip.clip.teacher_cache.TeacherCache`). It applies the training augmentation
  (resize, flip) to the cached boxes, so they line up with the augmented image; the crop
  embeddings are those of the un-augmented crops (CLIP is nearly flip-invariant; ViLD does the
  same).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, Instances
from PIL import Image

from ..clip.loading import clip_model_key, resolve_clip_weights
from ..clip.teacher_cache import TeacherCache
from .images import read_image_rgb

__all__ = [
    "CheckedDatasetMapper",
    "ImageOfTheRule",
    "ImageReadError",
    "PairsDatasetMapper",
    "ViLDDatasetMapper",
    "read_image_by_the_rule",
]

#: PIL modes Detectron2's ``read_image`` converts wrongly (PIL's 8-bit conversion clips them)
NOT_8BIT_MODES = frozenset(("I;16", "I;16B", "I;16L", "I;16N", "I", "F"))


class ImageReadError(RuntimeError):
    """An image of the dataset could not be decoded."""


def read_image_by_the_rule(file_name: str, image_format: str) -> Optional[np.ndarray]:
    """The image of ``file_name`` in ``image_format`` (``INPUT.FORMAT``) by the project's rule
    when Detectron2's ``read_image`` would convert it wrongly (a 16-bit or float file); None for
    every other file (Detectron2 reads those exactly as the rule does). Only the header is read
    to tell."""
    with open(file_name, "rb") as f:
        mode = Image.open(f).mode  # lazy: the header only
    if mode not in NOT_8BIT_MODES:
        return None
    # Detectron2's own conversion from 8-bit RGB to the configured format (RGB, BGR, L, YUV).
    return utils.convert_PIL_to_numpy(Image.fromarray(read_image_rgb(file_name)), image_format)


class ImageOfTheRule(T.Augmentation):
    """The first augmentation of :class:`CheckedDatasetMapper`: puts the image the mapper read by
    the project's rule (:func:`read_image_by_the_rule`, same size) in place of the one
    Detectron2's ``read_image`` made, then changes nothing else (a no-op transform)."""

    def __init__(self):
        super().__init__()
        self.pending: Optional[np.ndarray] = None

    def get_transform(self, image):
        return T.NoOpTransform()

    def __call__(self, aug_input):
        if self.pending is not None:
            aug_input.image, self.pending = self.pending, None
        return T.NoOpTransform()


class CheckedDatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` with the project's image rule and named image errors."""

    @configurable
    def __init__(self, is_train: bool, *, augmentations, **kwargs):
        self.image_of_the_rule = ImageOfTheRule()
        super().__init__(is_train, augmentations=[self.image_of_the_rule, *augmentations], **kwargs)

    def __call__(self, dataset_dict):
        try:
            self.image_of_the_rule.pending = read_image_by_the_rule(
                dataset_dict["file_name"], self.image_format
            )
            return super().__call__(dataset_dict)
        except (OSError, SyntaxError, ValueError) as e:
            # PIL raises OSError for truncated data and UnidentifiedImageError (an OSError) for
            # unknown formats; SyntaxError for some malformed headers; the image rule
            # ImageInputError (a ValueError) for images it refuses.
            if isinstance(e, ImageReadError):
                raise
            raise ImageReadError(
                f"Cannot read image {dataset_dict.get('file_name')!r} "
                f"(image_id {dataset_dict.get('image_id')}): {type(e).__name__}: {e}"
            ) from e
        finally:
            self.image_of_the_rule.pending = None


class PairsDatasetMapper(CheckedDatasetMapper):
    """:class:`CheckedDatasetMapper` for image-text pairs (module doc)."""

    def __call__(self, dataset_dict):
        out = super().__call__(dataset_dict)
        if "instances" in out:
            out["pseudo_boxes"] = out.pop("instances")
        return out


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
