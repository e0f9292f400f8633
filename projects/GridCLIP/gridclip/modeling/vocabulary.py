"""Open-vocabulary helpers shared by GridCLIP and the ViLD baseline.

A *vocabulary* is what a user hands a detector to say which classes to find: a list of class
names (embedded with CLIP's text encoder and prompt ensemble), a ready ``(C, D)`` matrix of text
embeddings, or the path of such a matrix saved as ``.npy`` (or ``.pt``).
"""

from __future__ import annotations

import logging
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .text_classifier import check_text_embeddings, normalize_class_names

logger = logging.getLogger(__name__)

__all__ = [
    "resolve_vocabulary",
    "load_text_embeddings_file",
    "check_class_count",
    "num_classes_key",
]

Vocabulary = Union[Sequence[str], torch.Tensor, np.ndarray, str, os.PathLike]

_EMBEDDING_FILE_EXTENSIONS = (".npy", ".pt", ".pth")


def load_text_embeddings_file(path: Union[str, os.PathLike]) -> torch.Tensor:
    """Load and check a (C, D) text-embedding matrix from a ``.npy`` or ``.pt`` file."""
    from gridclip.clip import load_text_embeddings

    path = os.fspath(path)
    if not path.endswith(_EMBEDDING_FILE_EXTENSIONS):
        raise ValueError(
            f"{path}: unknown text-embedding file type; expected one of "
            f"{_EMBEDDING_FILE_EXTENSIONS}"
        )
    return check_text_embeddings(load_text_embeddings(path), source=path)


def resolve_vocabulary(
    vocabulary: Vocabulary, cfg=None
) -> Tuple[torch.Tensor, Optional[List[str]]]:
    """Turn a user vocabulary into ``(text_embeddings, class_names)``.

    Args:
        vocabulary: one of
            - a list/tuple of class names: embedded with CLIP's text encoder through
              ``gridclip.clip.text_embeddings_from_cfg`` (prompt ensemble ``MODEL.CLIP.PROMPTS``,
              cached in ``MODEL.CLIP.TEXT_CACHE_DIR``); ``MODEL.CLIP.TEXT_EMBEDDINGS`` is ignored
              here since it holds the embeddings of another vocabulary;
            - a ``(C, D)`` tensor or ndarray of text embeddings;
            - a path to a ``.npy`` / ``.pt`` file holding such a matrix.
        cfg: the model's config; needed only for class names (which CLIP, which prompts).

    Returns:
        text_embeddings: (C, D) float32 tensor on the CPU (not yet normalised).
        class_names: the cleaned list of names, or None when embeddings were given.
    """
    if isinstance(vocabulary, (str, os.PathLike)):
        return load_text_embeddings_file(vocabulary), None
    if isinstance(vocabulary, (torch.Tensor, np.ndarray)):
        embeddings = torch.as_tensor(vocabulary).detach().cpu()
        return check_text_embeddings(embeddings, source="vocabulary embeddings"), None
    if isinstance(vocabulary, (list, tuple)):
        if any(not isinstance(n, str) for n in vocabulary):
            raise TypeError(
                "vocabulary: a list must hold class names (str); got "
                f"{sorted({type(n).__name__ for n in vocabulary})}"
            )
        names = normalize_class_names(vocabulary)
        if cfg is None:
            raise ValueError(
                "vocabulary: class names need the model config (which CLIP, which prompts) to be "
                "embedded; pass cfg, or pass a (C, D) text-embedding matrix instead of names"
            )
        from gridclip.clip import text_embeddings_from_cfg

        text_cfg = cfg.clone()
        text_cfg.defrost()
        text_cfg.MODEL.CLIP.TEXT_EMBEDDINGS = ""  # that file belongs to another vocabulary
        embeddings = text_embeddings_from_cfg(text_cfg, names)
        embeddings = check_text_embeddings(
            torch.as_tensor(embeddings).detach().cpu(),
            num_classes=len(names),
            source=f"CLIP text embeddings of {len(names)} class names",
        )
        return embeddings, names
    raise TypeError(
        "vocabulary must be a list of class names, a (C, D) tensor/ndarray, or a path to a "
        f".npy/.pt file; got {type(vocabulary).__name__}"
    )


def num_classes_key(cfg) -> str:
    """The config key that holds the class count of ``cfg``'s meta-architecture."""
    if cfg.MODEL.META_ARCHITECTURE in ("GridCLIP", "RetinaNet"):
        return "MODEL.RETINANET.NUM_CLASSES"
    return "MODEL.ROI_HEADS.NUM_CLASSES"


def check_class_count(text_embeddings: torch.Tensor, cfg, metadata=None) -> None:
    """Raise a clear error unless the vocabulary, the config and the dataset agree on C.

    Args:
        text_embeddings: (C, D) class text embeddings.
        cfg: the model config; its class count is ``num_classes_key(cfg)``.
        metadata: optional ``MetadataCatalog`` entry of the training dataset (``thing_classes``).
    """
    num_text = int(text_embeddings.shape[0])
    key = num_classes_key(cfg)
    node = cfg
    for part in key.split(".")[:-1]:
        node = getattr(node, part)
    num_cfg = int(getattr(node, key.split(".")[-1]))
    source = cfg.MODEL.CLIP.TEXT_EMBEDDINGS or "the text embeddings of the class names"
    if num_text != num_cfg:
        raise ValueError(
            f"class count mismatch: {source} has {num_text} classes but {key} = {num_cfg}. "
            f"Set {key} {num_text} (or use text embeddings of the dataset's classes)."
        )
    thing_classes = getattr(metadata, "thing_classes", None) if metadata is not None else None
    if thing_classes is not None and len(thing_classes) != num_text:
        raise ValueError(
            f"class count mismatch: dataset {metadata.name!r} has {len(thing_classes)} classes "
            f"(metadata.thing_classes) but {source} has {num_text} and {key} = {num_cfg}"
        )
