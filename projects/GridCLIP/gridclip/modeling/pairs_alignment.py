"""Learning from image-text pairs without boxes: caption pseudo-boxes.

On a batch of captioned images (``DATASETS.PAIRS_TRAIN``, :mod:`gridclip.data.captions`) the
vocabulary is the batch's distinct phrases (by :func:`~gridclip.data.captions.phrase_key`). For
each phrase an image's captions name, the detector's own best boxes for it become its boxes
(:func:`caption_pseudo_boxes`): the phrase's highest-logit anchors of this very forward
(detached), NMS, as many boxes as the caption counts ("two blue rings": 2, by
:func:`~gridclip.data.phrases.phrase_count`), ranked by the frozen CLIP's score ensemble when it
is on and refined by the box refiner when there is one, at least
``MODEL.GRIDCLIP.PAIRS_PSEUDO_MIN_SCORE`` each. The detector's focal loss then trains them as
boxes of their phrase, with the targets a caption supports (:func:`pseudo_box_targets`: an
object has one name; a phrase is absent elsewhere only when all the objects it names were
found; what a caption does not name has no target, since captions leave objects out), times
``MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT`` (:meth:`GridCLIP.pairs_pseudo_box_loss`).

The caption's classes are known to be in the image: with that, and the count, choosing among the
detector's own candidates is far easier than detecting (on the embedded world's val images,
novel-class pseudo-boxes of the 300-iteration model are 87% right at IoU 0.5: README,
``tools/pseudo_box_quality.py``), and the novel classes a caption names get boxes, as in the
oracle that is trained with their real boxes.

Replaced: a contrastive phrase-to-grid loss in the spirit of DetCLIPv2's word-region alignment
(each image's phrases ranked above the batch's other phrases by the cosine at the location of
the phrase's best detection logit), which *lowered* AP and novel AP on the embedded world
(README, "Training with image-text pairs", with its commits).

Text embeddings of phrases come from the class-name machinery
(:func:`gridclip.modeling.vocabulary.resolve_vocabulary`: CLIP text encoder, prompt ensemble,
on-disk cache), computed once when the model is built for every phrase of the pair datasets.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import DatasetCatalog
from torch import nn
from torchvision.ops import nms

from ..data.captions import pair_phrase_keys
from ..data.phrases import phrase_count
from .vocabulary import resolve_vocabulary

logger = logging.getLogger(__name__)

__all__ = [
    "PairsAlignment",
    "build_pairs_alignment",
    "caption_pseudo_boxes",
    "pseudo_box_targets",
]


def caption_pseudo_boxes(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    counts: Sequence[Optional[int]],
    *,
    min_score: float,
    nms_iou: float = 0.5,
    candidates: int = 100,
    rescore: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    spare: int = 4,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's pseudo-boxes for the phrases of its caption: the detector's own best boxes
    of each phrase, as many as the caption says there are.

    Per phrase: its ``candidates`` highest-logit anchors, NMS at ``nms_iou``, the first
    ``count`` survivors (with ``rescore``: the first ``count + spare``), those whose detection
    probability (sigmoid of the logit) is at least ``min_score``; with ``rescore``, these are
    ranked again by its scores and cut to ``count``.

    Args:
        logits: (R, P) per-anchor detection logits of the caption's P phrases.
        boxes: (R, 4) the anchors' decoded boxes (XYXY).
        counts: per phrase, the number of objects it names (:func:`phrase_count`); None
            (unknown: "blue rings") takes one.
        rescore: optional ``(boxes (K, 4), columns (K,), probabilities (K,)) -> (K,)`` scores
            that rank each phrase's candidates (e.g. CLIP's score ensemble).
    Returns:
        ``(boxes (K, 4), columns (K,), probabilities (K,))``: per pseudo-box its phrase column
        and detection probability.
    """
    assert logits.dim() == 2 and boxes.shape == (logits.shape[0], 4), (logits.shape, boxes.shape)
    assert len(counts) == logits.shape[1], f"{len(counts)} counts for {logits.shape[1]} phrases"
    counts = [int(c or 1) for c in counts]
    k = min(int(candidates), logits.shape[0])
    index, columns = [], []
    for j, count in enumerate(counts):
        top, anchors = logits[:, j].topk(k)
        keep = nms(boxes[anchors].float(), top.float(), nms_iou)
        keep = keep[: count + (spare if rescore is not None else 0)]
        index.append(anchors[keep])
        columns.append(torch.full((keep.numel(),), j, dtype=torch.long, device=logits.device))
    if not index:
        return logits.new_zeros((0, 4)), logits.new_zeros((0,)).long(), logits.new_zeros((0,))
    index, columns = torch.cat(index), torch.cat(columns)
    probs = logits[index, columns].sigmoid()
    keep = probs >= min_score
    index, columns, probs = index[keep], columns[keep], probs[keep]
    if rescore is not None and len(index):
        ranking = rescore(boxes[index], columns, probs)
        chosen = []
        for j, count in enumerate(counts):
            mine = (columns == j).nonzero().squeeze(1)
            chosen.append(mine[ranking[mine].argsort(descending=True)[:count]])
        chosen = torch.cat(chosen)
        index, columns, probs = index[chosen], columns[chosen], probs[chosen]
    return boxes[index], columns, probs


def pseudo_box_targets(
    labels: torch.Tensor, named: torch.Tensor, counts: torch.Tensor, found: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Focal-loss targets of pair images from anchors matched to caption pseudo-boxes.

    Args:
        labels: (N, R) per anchor: -1 ignore, 0..P-1 matched to a pseudo-box of that phrase,
            P background.
        named: (N, P) bool, image i's captions name phrase p.
        counts: (N, P) how many objects the captions name (-1: named without a count).
        found: (N, P) how many pseudo-boxes were found.
    Returns:
        ``(targets, targeted)``, both (N, R, P): the 0/1 targets, and where there is one: every
        phrase at a matched anchor (positive for its phrase, negative for the others: an object
        has one name); at the other non-ignored anchors only the named phrases whose objects
        were all found (negative). Phrases a caption does not name have no target there
        (captions leave objects out), nor do named ones with objects still missing.
    """
    num_phrases = named.shape[1]
    positive = (labels >= 0) & (labels < num_phrases)
    complete = named.bool() & (counts > 0) & (found >= counts)
    targeted = (complete[:, None, :] & (labels >= 0)[..., None]) | positive[..., None]
    background = torch.where(labels < 0, num_phrases, labels)  # ignored anchors: all zeros
    targets = F.one_hot(background, num_phrases + 1)[..., :num_phrases]
    return targets, targeted


class PairsAlignment(nn.Module):
    """What training on image-text pairs needs besides the detector: the phrase text
    embeddings (a non-persistent buffer: not in checkpoints) and their keys, the batch's
    phrase columns and counts, the loss weight and the pseudo-box score floor. The loss itself
    is the detector's (:meth:`GridCLIP.pairs_pseudo_box_loss`)."""

    @configurable
    def __init__(
        self,
        *,
        phrase_keys: Sequence[str],
        phrase_embeddings: torch.Tensor,
        embed_dim: int,
        weight: float,
        pseudo_min_score: float = 0.2,
    ):
        """
        Args:
            phrase_keys: the P phrase keys the training data may use.
            phrase_embeddings: (P, D) their text embeddings.
            embed_dim: D.
            weight: loss weight (> 0).
            pseudo_min_score: ``min_score`` of :func:`caption_pseudo_boxes`.
        """
        super().__init__()
        assert weight > 0, f"MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT must be > 0 here, got {weight}"
        keys = list(phrase_keys)
        assert phrase_embeddings.shape == (
            len(keys),
            embed_dim,
        ), f"phrase embeddings {tuple(phrase_embeddings.shape)} != ({len(keys)}, {embed_dim})"
        self.index = {k: i for i, k in enumerate(keys)}
        self.embed_dim = int(embed_dim)
        self.weight = float(weight)
        if not 0.0 <= pseudo_min_score < 1.0:
            raise ValueError(
                f"MODEL.GRIDCLIP.PAIRS_PSEUDO_MIN_SCORE = {pseudo_min_score}: must be in [0, 1)"
            )
        self.pseudo_min_score = float(pseudo_min_score)
        self.register_buffer(
            "phrase_embeddings", F.normalize(phrase_embeddings.float(), dim=-1), False
        )

    @classmethod
    def from_config(cls, cfg):
        names = list(cfg.DATASETS.PAIRS_TRAIN)
        if not names:
            raise ValueError(
                "MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT > 0 needs image-text pair datasets in "
                "DATASETS.PAIRS_TRAIN (e.g. ('gridclip_world_pairs',))"
            )
        keys = sorted({k for n in names for k in pair_phrase_keys(DatasetCatalog.get(n))})
        if not keys:
            raise ValueError(f"DATASETS.PAIRS_TRAIN {names}: no phrase in any caption")
        embeddings, _ = resolve_vocabulary(keys, cfg)
        logger.info(f"Pairs alignment: {len(keys)} distinct phrases of {names} embedded")
        return {
            "phrase_keys": keys,
            "phrase_embeddings": embeddings,
            "embed_dim": cfg.MODEL.CLIP.EMBED_DIM,
            "weight": cfg.MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT,
            "pseudo_min_score": cfg.MODEL.GRIDCLIP.PAIRS_PSEUDO_MIN_SCORE,
        }

    def extra_repr(self) -> str:
        return (
            f"phrases={len(self.index)}, weight={self.weight}, "
            f"pseudo_min_score={self.pseudo_min_score}"
        )

    @staticmethod
    def batch_keys(batched_inputs: List[Dict]) -> List[str]:
        """The batch's distinct phrase keys, sorted: its columns (:meth:`batch_phrases`)."""
        return sorted({p["key"] for x in batched_inputs for p in x["phrases"]})

    def batch_phrases(
        self, batched_inputs: List[Dict]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's distinct phrases (keys, sorted), its P columns, in one pass:

        - ``rows`` (P,) long: each column's row of :attr:`phrase_embeddings`;
        - ``named`` (N, P) bool: image i's captions name phrase p;
        - ``counts`` (N, P) long: how many objects they name (:func:`phrase_count`; the
          largest when several captions name it), 0 when they do not name it, -1 when they
          name it without a count ("blue rings").
        """
        keys = self.batch_keys(batched_inputs)
        missing = [k for k in keys if k not in self.index]
        if missing:
            raise KeyError(
                f"phrases {missing[:5]} of the batch were not embedded when the model was built: "
                "are their images from a dataset of DATASETS.PAIRS_TRAIN?"
            )
        column = {k: j for j, k in enumerate(keys)}
        named = torch.zeros(len(batched_inputs), len(keys), dtype=torch.bool)
        counts = torch.zeros(len(batched_inputs), len(keys), dtype=torch.long)
        for i, x in enumerate(batched_inputs):
            for p in x["phrases"]:
                j = column[p["key"]]
                named[i, j] = True
                n = phrase_count(p["text"])
                counts[i, j] = -1 if n is None or counts[i, j] < 0 else max(int(counts[i, j]), n)
        rows = torch.tensor([self.index[k] for k in keys], dtype=torch.long)
        return rows, named, counts


def build_pairs_alignment(cfg):
    """The pairs-alignment module of ``cfg``, or None when PAIRS_LOSS_WEIGHT is 0."""
    weight = cfg.MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT
    if weight < 0:
        raise ValueError(f"MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT must be >= 0, got {weight}")
    if weight == 0:
        return None
    return PairsAlignment(cfg)
