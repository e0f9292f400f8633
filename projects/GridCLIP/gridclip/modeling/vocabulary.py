"""The one vocabulary module: what a user or a config says to detect, turned into embeddings.

A *vocabulary* is a list of class names (embedded with CLIP's text encoder and prompt ensemble),
a ready ``(C, D)`` matrix of text embeddings, or the path of such a matrix (``.safetensors``,
``.npy`` or ``.pt``). What users type (a built-in name such as ``world_novel``, names separated by
commas, a ``.txt`` file) is parsed by :func:`parse_vocabulary`; what a config says (the training
dataset's classes, or ``MODEL.CLIP.TEXT_EMBEDDINGS``) by :func:`vocabulary_from_cfg`. GridCLIP,
ViLD and the predictor call these; none has vocabulary logic of its own.
"""

from __future__ import annotations

import logging
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

from ..clip import (
    check_text_embeddings,
    clean_class_name,
    load_text_embeddings,
    text_embeddings_from_cfg,
)
from ..data import dataset_metadata, register_datasets_from_cfg
from ..data.world import world_categories

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_VOCABULARIES",
    "builtin_vocabulary",
    "check_class_count",
    "dataset_class_names",
    "load_text_embeddings_file",
    "normalize_class_names",
    "novel_mask_by_name",
    "num_classes_key",
    "parse_vocabulary",
    "resolve_vocabulary",
    "vocabulary_dataset",
    "vocabulary_from_cfg",
]

Vocabulary = Union[Sequence[str], torch.Tensor, np.ndarray, str, os.PathLike]

_EMBEDDING_FILE_EXTENSIONS = (".safetensors", ".npy", ".pt", ".pth")

#: name -> what it is (see :func:`builtin_vocabulary`)
BUILTIN_VOCABULARIES = {
    "lvis": "LVIS v1's 1,203 categories",
    "lvis_base": "LVIS v1 frequent + common categories (866, boxed in OVD training)",
    "lvis_novel": "LVIS v1 rare categories (337, the OVD novel classes)",
    "world": "the embedded world's 48 categories",
    "world_base": "the embedded world's frequent + common categories (boxed in training)",
    "world_novel": "the embedded world's rare categories (never boxed in training)",
}


def normalize_class_names(names: Sequence[str], source: str = "vocabulary") -> list:
    """Strip names and reject an empty vocabulary or duplicates with a clear error."""
    cleaned = [str(n).strip() for n in names]
    cleaned = [n for n in cleaned if n]
    if not cleaned:
        raise ValueError(f"{source}: the vocabulary is empty")
    seen, dups = set(), []
    for n in cleaned:
        key = n.lower()
        if key in seen:
            dups.append(n)
        seen.add(key)
    if dups:
        raise ValueError(f"{source}: duplicate class names {sorted(set(dups))[:10]}")
    return cleaned


def builtin_vocabulary(name: str) -> List[str]:
    """Class names of a built-in vocabulary (``BUILTIN_VOCABULARIES``), in category-id order.

    ``*_base`` keeps LVIS frequencies ``f`` and ``c``, ``*_novel`` keeps ``r``.
    """
    key = str(name).strip().lower()
    if key not in BUILTIN_VOCABULARIES:
        raise KeyError(
            f"unknown built-in vocabulary {name!r}; choose one of {sorted(BUILTIN_VOCABULARIES)} "
            "or give class names (a list, a comma-separated string or a .txt file)"
        )
    source, _, subset = key.partition("_")
    if source == "lvis":
        categories = sorted(LVIS_CATEGORIES, key=lambda c: c["id"])
    else:
        categories = world_categories()
    keep = {"": "fcr", "base": "fc", "novel": "r"}[subset]
    return [c["name"] for c in categories if c["frequency"] in keep]


def _read_vocabulary_file(path: str) -> List[str]:
    """One class name per line; blank lines and lines starting with ``#`` are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"could not read vocabulary file {path!r}: {e}") from e
    names = [line.strip() for line in lines]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise ValueError(
            f"vocabulary file {path!r} holds no class names (expected one name per line)"
        )
    return names


def parse_vocabulary(vocabulary: Vocabulary) -> Tuple[List[str], str]:
    """Turn what a user typed into ``(class_names, description)``.

    Args:
        vocabulary: a built-in name (``lvis``, ``world``, ``world_base``, ``world_novel``, ...),
            a list/tuple of class names, a path to a text file with one name per line, or a
            comma-separated string of names (``"red star, blue ring"``; one name is fine too).

    Returns:
        class_names: stripped names, non-empty, without duplicates (case-insensitive).
        description: a short human description (for logs and titles).
    """
    if isinstance(vocabulary, os.PathLike):
        vocabulary = os.fspath(vocabulary)
    if isinstance(vocabulary, str):
        text = vocabulary.strip()
        if text.lower() in BUILTIN_VOCABULARIES:
            names, description = builtin_vocabulary(text), f"built-in {text.lower()!r}"
        elif os.path.isfile(os.path.expanduser(text)):
            path = os.path.expanduser(text)
            names, description = _read_vocabulary_file(path), f"file {path!r}"
        elif text.lower().endswith(".txt") or (os.sep in text and "," not in text):
            raise FileNotFoundError(
                f"vocabulary file {text!r} does not exist (give an existing .txt file with one "
                "class name per line, comma-separated names, or a built-in vocabulary: "
                f"{sorted(BUILTIN_VOCABULARIES)})"
            )
        else:
            names, description = text.split(","), "custom"
    elif isinstance(vocabulary, (list, tuple)):
        if any(not isinstance(n, str) for n in vocabulary):
            raise TypeError(
                "vocabulary: a list must hold class names (str); got "
                f"{sorted({type(n).__name__ for n in vocabulary})}"
            )
        names, description = list(vocabulary), "custom"
    else:
        raise TypeError(
            "vocabulary must be a built-in name, a list of class names, a comma-separated string "
            f"or a .txt path; got {type(vocabulary).__name__}"
        )
    names = normalize_class_names(names, source=f"vocabulary ({description})")
    return names, f"{description}, {len(names)} classes"


def load_text_embeddings_file(path: Union[str, os.PathLike]) -> torch.Tensor:
    """Load and check a (C, D) text-embedding matrix from a ``.npy`` or ``.pt`` file."""
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


def vocabulary_dataset(cfg) -> Optional[str]:
    """The dataset whose classes a config's model detects: ``DATASETS.TRAIN[0]``, else
    ``DATASETS.TEST[0]``, else None."""
    if len(cfg.DATASETS.TRAIN):
        return cfg.DATASETS.TRAIN[0]
    if len(cfg.DATASETS.TEST):
        return cfg.DATASETS.TEST[0]
    return None


def vocabulary_from_cfg(cfg) -> Tuple[torch.Tensor, Optional[List[str]]]:
    """The (K, D) class text embeddings of a config, checked against it and its dataset.

    ``MODEL.CLIP.TEXT_EMBEDDINGS`` if set, else CLIP text embeddings of the class names of
    :func:`vocabulary_dataset`. Returns ``(text_embeddings, class_names)``; the names are the
    dataset's ``thing_classes`` (None when it has none).
    """
    register_datasets_from_cfg(cfg)
    name = vocabulary_dataset(cfg)
    metadata = dataset_metadata(name) if name else None
    thing_classes = getattr(metadata, "thing_classes", None) if metadata is not None else None
    if cfg.MODEL.CLIP.TEXT_EMBEDDINGS:
        text_embeddings, _ = resolve_vocabulary(cfg.MODEL.CLIP.TEXT_EMBEDDINGS)
    elif thing_classes is not None:
        text_embeddings, _ = resolve_vocabulary(list(thing_classes), cfg)
    else:
        raise ValueError(
            f"{cfg.MODEL.META_ARCHITECTURE} needs a vocabulary: set MODEL.CLIP.TEXT_EMBEDDINGS to "
            "a (C, D) .npy, or DATASETS.TRAIN/TEST to a registered dataset with thing_classes "
            f"(got {name!r})"
        )
    if text_embeddings.shape[1] != cfg.MODEL.CLIP.EMBED_DIM:
        raise ValueError(
            f"text embeddings are {text_embeddings.shape[1]}-d but MODEL.CLIP.EMBED_DIM = "
            f"{cfg.MODEL.CLIP.EMBED_DIM} ({cfg.MODEL.CLIP.TEXT_EMBEDDINGS or 'CLIP text'})"
        )
    check_class_count(text_embeddings, cfg, metadata)
    if len(cfg.DATASETS.TEST) and len(cfg.DATASETS.TRAIN):
        test_classes = getattr(dataset_metadata(cfg.DATASETS.TEST[0]), "thing_classes", None)
        if test_classes is not None and list(test_classes) != list(thing_classes or []):
            logger.info(
                f"DATASETS.TEST[0] {cfg.DATASETS.TEST[0]!r} has other classes than "
                f"DATASETS.TRAIN[0] {name!r}: the Trainer evaluates it with its own class names "
                "(model.set_vocabulary; call it yourself outside Trainer.test)"
            )
    return text_embeddings, list(thing_classes) if thing_classes is not None else None


def dataset_class_names(cfg) -> Optional[List[str]]:
    """``thing_classes`` of :func:`vocabulary_dataset` (None when there is none)."""
    register_datasets_from_cfg(cfg)
    name = vocabulary_dataset(cfg)
    names = getattr(dataset_metadata(name), "thing_classes", None) if name else None
    return list(names) if names is not None else None


def novel_mask_by_name(
    names: Sequence[str], reference_names: Sequence[str], reference_novel: torch.Tensor
) -> torch.Tensor:
    """(K,) bool for a new vocabulary ``names``: a class is base (False) iff it is a base class
    of the reference vocabulary (``reference_novel`` False) under the same name, compared after
    :func:`~gridclip.clip.clean_class_name` and lower-casing; every other class is novel."""

    def key(name: str) -> str:
        return clean_class_name(name).lower()

    base = {key(n) for n, novel in zip(reference_names, reference_novel.tolist()) if not novel}
    return torch.tensor([key(n) not in base for n in names])
