"""A model's vocabulary at checkpoint load and at evaluation time.

- :func:`evaluation_vocabulary`: each test dataset is evaluated with its own class names (the
  model's ``set_vocabulary`` before its inference, the previous vocabulary restored after), so
  one ``--eval-only`` run can cover datasets of different vocabularies (cross-dataset transfer).
- :func:`drop_checkpoint_vocabulary`: a checkpoint's text embeddings of another vocabulary than
  the model's (which comes from the config) are replaced knowingly, with an info line, and the
  vocabulary buffers that go with them are dropped too (never half-loaded).
- :func:`trained_name_keys` / :func:`base_novel_masks`: which classes of a new vocabulary the
  model was trained on with boxes, judged by name (one rule for the predictor, prompts and
  evaluation): ViLD's and GridCLIP's score ensembles weigh base and novel classes differently.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Set

import torch
from torch import nn

from ..clip import clean_class_name
from ..data import dataset_metadata, has_class_frequencies, novel_class_mask

logger = logging.getLogger(__name__)

__all__ = [
    "base_novel_masks",
    "drop_checkpoint_vocabulary",
    "evaluation_vocabulary",
    "name_key",
    "trained_name_keys",
    "VOCABULARY_KEY_SUFFIXES",
]

#: State-dict entries that belong to a vocabulary (one row / entry per class).
TEXT_EMBEDDINGS_SUFFIX = "text_embeddings"
VOCABULARY_KEY_SUFFIXES = (TEXT_EMBEDDINGS_SUFFIX, "novel_class_mask")


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel


def name_key(name: str) -> str:
    """Names compared for base/novel: ``red_star``, ``Red star`` and ``red  star`` are one."""
    return " ".join(clean_class_name(name).lower().split())


def trained_name_keys(model: nn.Module, class_names: Sequence[str]) -> Optional[Set[str]]:
    """The :func:`name_key` of each of ``class_names`` (the model's current classes) that the
    model was trained on with boxes: ViLD keeps a per-class novel mask, GridCLIP a trained-class
    mask. None when the model keeps neither or it does not match the names."""
    inner = _unwrap(model)
    predictor = getattr(getattr(inner, "roi_heads", None), "box_predictor", None)
    novel = getattr(predictor, "novel_class_mask", None)
    trained = getattr(inner, "trained_class_mask", None)
    if novel is None and isinstance(trained, torch.Tensor):
        novel = ~trained
    if novel is None or class_names is None or len(novel) != len(class_names):
        return None
    return {name_key(n) for n, is_novel in zip(class_names, novel.tolist()) if not is_novel}


def base_novel_masks(
    model: nn.Module, names: Sequence[str], base_keys: Optional[Set[str]]
) -> Dict[str, torch.Tensor]:
    """``set_vocabulary`` keyword arguments that mark which of ``names`` are base (their
    :func:`name_key` in ``base_keys``): ViLD's ``novel_class_mask`` or GridCLIP's
    ``trained_class_mask``; empty when ``base_keys`` is None or the model takes neither."""
    if base_keys is None:
        return {}
    base = torch.tensor([name_key(n) in base_keys for n in names], dtype=torch.bool)
    parameters = inspect.signature(_unwrap(model).set_vocabulary).parameters
    if "novel_class_mask" in parameters:  # ViLD
        return {"novel_class_mask": ~base}
    if "trained_class_mask" in parameters:  # GridCLIP
        return {"trained_class_mask": base}
    return {}


@contextmanager
def evaluation_vocabulary(model: nn.Module, dataset_name: str):
    """Within the block, ``model`` detects the classes of ``dataset_name`` (its
    ``thing_classes``); the previous vocabulary is restored on exit. A no-op for closed-set
    models, datasets without class names, and a model that already has these classes."""
    inner = _unwrap(model)
    names = getattr(dataset_metadata(dataset_name), "thing_classes", None)
    current = getattr(inner, "class_names", None)
    if not hasattr(inner, "set_vocabulary") or names is None or list(current or []) == list(names):
        yield
        return
    state = inner.vocabulary_state()
    parameters = inspect.signature(inner.set_vocabulary).parameters
    if has_class_frequencies(dataset_name):  # LVIS-format: novel = its rare classes
        novel = novel_class_mask(dataset_name, len(names))
        kwargs = {
            k: v
            for k, v in (("novel_class_mask", novel), ("trained_class_mask", ~novel))
            if k in parameters
        }
    else:  # base = the classes the model was trained on with boxes, by name
        kwargs = base_novel_masks(inner, names, trained_name_keys(inner, current))
    logger.info(
        f"Evaluating {dataset_name!r} with its own {len(names)} class names "
        f"(the model had {int(state['text_embeddings'].shape[0])} classes)"
    )
    inner.set_vocabulary(list(names), **kwargs)
    try:
        yield
    finally:
        inner.restore_vocabulary(state)


def drop_checkpoint_vocabulary(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """Remove from ``state_dict`` (in place) the vocabulary entries of every module whose
    checkpoint text embeddings differ from the model's (other shape or other values): the
    model keeps the vocabulary its config gave it. Returns the removed keys."""
    own = _unwrap(model).state_dict()
    removed = []
    for key, value in own.items():
        if not key.endswith(TEXT_EMBEDDINGS_SUFFIX) or key not in state_dict:
            continue
        theirs = torch.as_tensor(state_dict[key])
        same = theirs.shape == value.shape and torch.allclose(
            theirs.float().cpu(), value.float().cpu(), atol=1e-4
        )
        if same:
            continue
        prefix = key[: -len(TEXT_EMBEDDINGS_SUFFIX)]
        owner = prefix.rsplit("text_classifier.", 1)[0] if "text_classifier." in prefix else prefix
        for other in list(state_dict):
            if other.startswith(owner) and other.endswith(VOCABULARY_KEY_SUFFIXES):
                state_dict.pop(other)
                removed.append(other)
        logger.info(
            f"Checkpoint {key} holds the text embeddings of another vocabulary "
            f"({tuple(theirs.shape)[0]} classes): the model keeps its own "
            f"({tuple(value.shape)[0]} classes, from the config)"
        )
    return removed
