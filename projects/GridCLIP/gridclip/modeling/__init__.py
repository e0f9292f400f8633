"""Models: importing this package registers GridCLIP, the ViLD heads and the CLIP backbone."""
from .text_classifier import TextEmbeddingClassifier, check_text_embeddings, l2_normalize

__all__ = ["TextEmbeddingClassifier", "check_text_embeddings", "l2_normalize"]
