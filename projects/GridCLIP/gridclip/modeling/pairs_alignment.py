"""Phrase-to-grid alignment: GridCLIP learns from image-text pairs without boxes.

On a batch of captioned images (``DATASETS.PAIRS_TRAIN``, :mod:`gridclip.data.captions`) the
vocabulary is the batch's distinct phrases (by :func:`~gridclip.data.captions.phrase_key`).
For image ``i`` and phrase ``p``:

    s(i, p) = cos(grid embedding at l*, text embedding of p),  l* = the location (all FPN
              levels, valid region) of the image's highest detection logit for p,
              t * cos + max anchor offset (the selection is not differentiated)

and, with ``t`` the classifier's logit scale, a contrastive loss in both directions over the
batch, in the spirit of DetCLIPv2's word-region alignment: for every (image, phrase of its
caption) pair, cross-entropy of ``t * s(i, p)`` against ``t * s(i, q)`` for the batch's phrases
``q`` not in image ``i``'s caption (phrase direction), and against ``t * s(j, p)`` for the
batch's images ``j`` whose caption lacks ``p`` (image direction); mean of the two, averaged over
the pairs, times ``MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT``.

The location is the one GridCLIP would report for the phrase (its objectness, the anchor
offsets, included), not the one of maximum cosine: with the plain maximum over locations the
argmax often fell on coarse P6/P7 cells covering several objects, training them to match
phrases, and on the embedded world (seed 1) the detector lost 12 AP (20.1 / APr 13.3 against
32.3 / 21.6 box-only; large objects' AP 25 against 55): README.

Why this and not Detic's image-label loss (the max-size location's logit trained for the
image's labels): Detic's loss trains a *fixed* class list with sigmoid logits; a caption's
phrases are an open, per-batch vocabulary, and captions are incomplete (an object left out of
a caption is not absent), which a contrastive ranking over the batch tolerates better than
independent "absent" targets for every unnamed class. The max over locations picks the one
location that best explains the phrase (gradients flow only there), as DetCLIPv2's max over
regions; Detic's max-size box would need proposals GridCLIP does not have.

Text embeddings of phrases come from the class-name machinery
(:func:`gridclip.modeling.vocabulary.resolve_vocabulary`: CLIP text encoder, prompt ensemble,
on-disk cache), computed once when the model is built for every phrase of the pair datasets.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import DatasetCatalog
from torch import nn
from torchvision.ops import nms

from ..data.captions import pair_phrase_keys
from ..data.phrases import phrase_count
from .image_alignment import valid_embeddings
from .vocabulary import resolve_vocabulary

logger = logging.getLogger(__name__)

__all__ = [
    "PairsAlignment",
    "build_pairs_alignment",
    "phrase_grid_scores",
    "pairs_contrastive_loss",
    "caption_pseudo_boxes",
    "pseudo_box_targets",
]

_FAR = -1e4  # a finite "minus infinity": exp() of it is 0 in float32, and so is its gradient


def phrase_grid_scores(
    grid_embeddings: Sequence[torch.Tensor],
    strides: Sequence[int],
    image_sizes: Sequence[Tuple[int, int]],
    phrase_embeddings: torch.Tensor,
    embed_dim: int,
    objectness: Optional[Sequence[torch.Tensor]] = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """(N, P): per image and phrase, the cosine between the phrase embedding and the image's
    grid embedding at the location (every level, valid region) that best matches the phrase.

    Without ``objectness`` the best location is the one of maximum cosine (the score is that
    maximum). With ``objectness`` (per level (N, A, Hi, Wi) anchor logit offsets, or (N, 1, Hi,
    Wi)) it is the location of the highest *detection logit* ``scale * cos + max offset``, the
    one GridCLIP would report: the selection is not differentiated, and the score is the
    cosine there. Gradients reach only the selected locations' embeddings.
    """
    phrases = F.normalize(phrase_embeddings.float(), dim=-1)
    scores = []
    for i, (h, w) in enumerate(image_sizes):
        rows = [
            valid_embeddings(x, i, stride, h, w, embed_dim).transpose(0, 1).reshape(embed_dim, -1)
            for x, stride in zip(grid_embeddings, strides)
        ]
        cos = phrases @ torch.cat(rows, dim=1)  # (P, locations)
        if objectness is None:
            scores.append(cos.max(dim=1).values)
            continue
        bonus = torch.cat(
            [
                _valid_map(o, i, stride, h, w).amax(dim=0).flatten()
                for o, stride in zip(objectness, strides)
            ]
        )
        with torch.no_grad():
            best = (cos * float(scale) + bonus.to(cos.dtype)).argmax(dim=1)  # (P,)
        scores.append(cos.gather(1, best[:, None])[:, 0])
    return torch.stack(scores)


def _valid_map(x: torch.Tensor, i: int, stride: int, h: int, w: int) -> torch.Tensor:
    """Image ``i``'s (C, h_l, w_l) map of one level over its valid (unpadded) region."""
    valid_h = max(1, min(x.shape[2], math.ceil(h / stride)))
    valid_w = max(1, min(x.shape[3], math.ceil(w / stride)))
    return x[i, :, :valid_h, :valid_w].float()


def pairs_contrastive_loss(
    scores: torch.Tensor, positives: torch.Tensor, scale: float
) -> torch.Tensor:
    """Contrastive loss of (N, P) image-phrase scores (module doc), unweighted.

    Args:
        scores: s(i, p).
        positives: (N, P) bool, phrase p is in image i's caption.
        scale: logit scale t.
    Returns:
        the mean over positive pairs of (phrase-direction + image-direction cross-entropy) / 2;
        0 (with gradients) when there is no positive pair.
    """
    positives = positives.to(torch.bool)
    if not bool(positives.any()):
        return scores.sum() * 0.0
    logits = scores * float(scale)
    negatives = logits.masked_fill(positives, _FAR)
    # phrase direction: against the phrases absent from image i
    lse_phrases = torch.logsumexp(negatives, dim=1, keepdim=True)  # (N, 1)
    # image direction: against the images whose caption lacks phrase p
    lse_images = torch.logsumexp(negatives, dim=0, keepdim=True)  # (1, P)
    loss_phrase = torch.logaddexp(logits, lse_phrases) - logits
    loss_image = torch.logaddexp(logits, lse_images) - logits
    per_pair = (loss_phrase + loss_image) / 2
    return per_pair[positives].mean()


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
    """Phrase-to-grid alignment loss on image-text pairs; holds the phrase text embeddings
    (a non-persistent buffer: not in checkpoints) and their keys."""

    @configurable
    def __init__(
        self,
        *,
        phrase_keys: Sequence[str],
        phrase_embeddings: torch.Tensor,
        embed_dim: int,
        weight: float,
        loss_type: str = "contrastive",
        pseudo_min_score: float = 0.2,
    ):
        """
        Args:
            phrase_keys: the P phrase keys the training data may use.
            phrase_embeddings: (P, D) their text embeddings.
            embed_dim: D.
            weight: loss weight (> 0).
            loss_type: "contrastive" (this module's loss) or "pseudo_boxes" (the detector's
                focal loss on :func:`caption_pseudo_boxes`, computed by the meta-architecture,
                :meth:`GridCLIP.pairs_losses`; this module then holds the phrase vocabulary).
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
        if loss_type not in ("contrastive", "pseudo_boxes"):
            raise ValueError(
                f"MODEL.GRIDCLIP.PAIRS_LOSS = {loss_type!r}: "
                "must be 'contrastive' or 'pseudo_boxes'"
            )
        if not 0.0 <= pseudo_min_score < 1.0:
            raise ValueError(
                f"MODEL.GRIDCLIP.PAIRS_PSEUDO_MIN_SCORE = {pseudo_min_score}: must be in [0, 1)"
            )
        self.loss_type = loss_type
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
            "loss_type": cfg.MODEL.GRIDCLIP.PAIRS_LOSS,
            "pseudo_min_score": cfg.MODEL.GRIDCLIP.PAIRS_PSEUDO_MIN_SCORE,
        }

    def extra_repr(self) -> str:
        return f"phrases={len(self.index)}, weight={self.weight}, loss={self.loss_type}"

    @staticmethod
    def batch_keys(batched_inputs: List[Dict]) -> List[str]:
        """The batch's distinct phrase keys, sorted: the columns of :meth:`batch_vocabulary`,
        :meth:`batch_rows` and :meth:`batch_counts`."""
        return sorted({p["key"] for x in batched_inputs for p in x["phrases"]})

    def batch_rows(self, batched_inputs: List[Dict]) -> torch.Tensor:
        """(P,) long: the rows of :attr:`phrase_embeddings` of the batch's phrase columns."""
        keys = self.batch_keys(batched_inputs)
        missing = [k for k in keys if k not in self.index]
        if missing:
            raise KeyError(
                f"phrases {missing[:5]} of the batch were not embedded when the model was built: "
                "are their images from a dataset of DATASETS.PAIRS_TRAIN?"
            )
        return torch.tensor([self.index[k] for k in keys], dtype=torch.long)

    def batch_vocabulary(self, batched_inputs: List[Dict]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The batch's distinct phrases: their (P, D) embeddings and the (N, P) positives
        (columns: :meth:`batch_keys`)."""
        rows = self.batch_rows(batched_inputs)
        column = {k: j for j, k in enumerate(self.batch_keys(batched_inputs))}
        positives = torch.zeros(len(batched_inputs), len(column), dtype=torch.bool)
        for i, x in enumerate(batched_inputs):
            for p in x["phrases"]:
                positives[i, column[p["key"]]] = True
        embeddings = self.phrase_embeddings[rows.to(self.phrase_embeddings.device)]
        return embeddings, positives

    def batch_counts(self, batched_inputs: List[Dict]) -> torch.Tensor:
        """(N, P) long, the columns of :meth:`batch_vocabulary`: how many objects image ``i``'s
        captions name for phrase ``p`` (:func:`phrase_count`; the largest when several
        captions name it), 0 when they do not name it, -1 when they name it without a count
        ("blue rings")."""
        column = {k: j for j, k in enumerate(self.batch_keys(batched_inputs))}
        counts = torch.zeros(len(batched_inputs), len(column), dtype=torch.long)
        for i, x in enumerate(batched_inputs):
            for p in x["phrases"]:
                j = column[p["key"]]
                n = phrase_count(p["text"])
                counts[i, j] = -1 if n is None or counts[i, j] < 0 else max(int(counts[i, j]), n)
        return counts

    def forward(
        self,
        grid_embeddings: Sequence[torch.Tensor],
        strides: Sequence[int],
        image_sizes: Sequence[Tuple[int, int]],
        batched_inputs: List[Dict],
        scale: float,
        objectness: Optional[Sequence[torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        """{"loss_pairs": weighted loss} of a batch of pair inputs (each with ``phrases``);
        ``objectness``: the anchor offsets that select each phrase's location
        (:func:`phrase_grid_scores`), or None for the location of maximum cosine."""
        device = grid_embeddings[0].device
        embeddings, positives = self.batch_vocabulary(batched_inputs)
        if embeddings.shape[0] == 0:
            return {"loss_pairs": sum(x.sum() for x in grid_embeddings) * 0.0}
        with torch.autocast(device_type=device.type, enabled=False):
            scores = phrase_grid_scores(
                grid_embeddings,
                strides,
                image_sizes,
                embeddings.to(device),
                self.embed_dim,
                None if objectness is None else [o.detach() for o in objectness],
                scale,
            )
            loss = pairs_contrastive_loss(scores, positives.to(device), scale)
        return {"loss_pairs": loss * self.weight}


def build_pairs_alignment(cfg):
    """The pairs-alignment module of ``cfg``, or None when PAIRS_LOSS_WEIGHT is 0."""
    weight = cfg.MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT
    if weight < 0:
        raise ValueError(f"MODEL.GRIDCLIP.PAIRS_LOSS_WEIGHT must be >= 0, got {weight}")
    if weight == 0:
        return None
    return PairsAlignment(cfg)
