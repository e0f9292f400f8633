"""Checks and normalisation of CLIP embedding matrices, shared by the CLIP layer and the models."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["l2_normalize", "check_text_embeddings"]


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise along ``dim``; zero vectors stay zero instead of becoming NaN."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


def check_text_embeddings(
    text_embeddings: torch.Tensor,
    embed_dim: Optional[int] = None,
    num_classes: Optional[int] = None,
    source: str = "text embeddings",
) -> torch.Tensor:
    """Validate a (C, D) text-embedding matrix and return it as float32.

    Raises ValueError naming ``source`` for a wrong rank, dimension, class count, an empty
    vocabulary, or non-finite / all-zero rows.
    """
    if not isinstance(text_embeddings, torch.Tensor):
        text_embeddings = torch.as_tensor(text_embeddings)
    if text_embeddings.ndim != 2:
        raise ValueError(
            f"{source}: expected a (num_classes, embed_dim) matrix, got shape "
            f"{tuple(text_embeddings.shape)}"
        )
    C, D = text_embeddings.shape
    if C == 0:
        raise ValueError(f"{source}: the vocabulary is empty (0 classes)")
    if embed_dim is not None and D != embed_dim:
        raise ValueError(
            f"{source}: embedding dimension {D} does not match the model's CLIP embedding "
            f"dimension {embed_dim} (MODEL.CLIP.EMBED_DIM). Were they computed with another CLIP?"
        )
    if num_classes is not None and C != num_classes:
        raise ValueError(
            f"{source}: {C} class embeddings but the dataset/model has {num_classes} classes"
        )
    text_embeddings = text_embeddings.float()
    if not torch.isfinite(text_embeddings).all():
        bad = (~torch.isfinite(text_embeddings).all(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"{source}: non-finite values in class rows {bad[:10]}")
    zero_rows = (text_embeddings.norm(dim=1) == 0).nonzero().flatten().tolist()
    if zero_rows:
        raise ValueError(f"{source}: all-zero embedding rows {zero_rows[:10]}")
    return text_embeddings
