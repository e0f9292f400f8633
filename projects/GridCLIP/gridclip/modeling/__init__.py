"""Models: importing this package registers GridCLIP, the ViLD heads and the CLIP backbone."""
from .text_classifier import TextEmbeddingClassifier, check_text_embeddings, l2_normalize
from .vild import ViLD, ViLDOutputLayers, ViLDROIHeads  # noqa: F401  (registers ViLD)
from .vild_teacher import TeacherCache, ViLDDatasetMapper  # noqa: F401

__all__ = ["TextEmbeddingClassifier", "check_text_embeddings", "l2_normalize"]
