"""Models: importing this package registers GridCLIP, the ViLD heads and the CLIP backbone."""

from .clip_backbone import build_clip_resnet_backbone, build_clip_resnet_fpn_backbone  # noqa: F401
from .gridclip import GridCLIP, GridCLIPHead  # noqa: F401  (registers GridCLIP)
from .image_alignment import ImageAlignment  # noqa: F401
from .text_classifier import TextEmbeddingClassifier, check_text_embeddings, l2_normalize
from .vild import ViLD, ViLDOutputLayers, ViLDROIHeads  # noqa: F401  (registers ViLD)
from .vocabulary import check_class_count, resolve_vocabulary  # noqa: F401

__all__ = ["TextEmbeddingClassifier", "check_text_embeddings", "l2_normalize"]
