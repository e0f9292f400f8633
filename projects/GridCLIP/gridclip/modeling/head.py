"""GridCLIP's head: RetinaNet's towers whose classification branch ends in CLIP-space grid
embeddings, scored against fixed text embeddings by a :class:`TextEmbeddingClassifier`.

Keeps RetinaNet's ``forward(features) -> (logits, box_deltas)`` contract; GridCLIP's own training
and inference use :meth:`GridCLIPHead.forward_embeddings` and score only what they need
(:mod:`gridclip.modeling.gridclip`).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from torch import Tensor, nn

from .text_classifier import TextEmbeddingClassifier

__all__ = ["GridCLIPHead", "EMBED_KERNEL_SIZES"]

#: Valid ``MODEL.GRIDCLIP.EMBED_KERNEL_SIZE`` values (padding k // 2 keeps the grid size).
EMBED_KERNEL_SIZES = (1, 3)


class GridCLIPHead(RetinaNetHead):
    """RetinaNet's towers; the classification tower ends in CLIP-space grid embeddings.

    ``forward_embeddings(features)`` returns the raw outputs: grid embeddings (N, E, Hi, Wi) with
    E = D (one per location), box deltas (N, A*4, Hi, Wi), per-anchor logit
    offsets (N, A, Hi, Wi) (per-location head with ``anchor_offset``; else None) and, with
    ``objectness_ranker``, ranking-only objectness logits (N, 1, Hi, Wi) (else None).
    ``forward(features)`` keeps RetinaNet's contract and returns ``(logits (N, A*K, Hi, Wi), box
    deltas)``; GridCLIP's own training and inference avoid materialising those logits.
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_anchors: int,
        conv_dims: List[int],
        text_embeddings: Tensor,
        anchor_offset: bool = True,
        embed_kernel_size: int = 1,
        norm="",
        prior_prob: float = 0.01,
        logit_scale: float = 20.0,
        learn_logit_scale: bool = False,
        text_product_dtype: str = "float32",
        objectness_ranker: bool = False,
    ):
        """
        Args:
            input_shape, num_anchors, conv_dims, norm, prior_prob: as :class:`RetinaNetHead`.
            text_embeddings: (K, D) class text embeddings (a buffer of ``self.classifier``).
            anchor_offset: per-location head only: predict a class-agnostic logit offset per
                anchor from the box tower (initialised near 0).
            embed_kernel_size: kernel of the grid-embedding conv, 3 (RetinaNet's classifier)
                or 1 (the towers' four 3x3 convs already give context; cheaper at inference).
            logit_scale: cosine similarities are multiplied by this (learnable, clamped to
                [1, 100], with ``learn_logit_scale``).
            text_product_dtype: dtype of the text product at inference
                (:meth:`TextEmbeddingClassifier.set_product_dtype`).
            objectness_ranker: one class-agnostic objectness logit per location, a 3x3 conv on
                the box tower's features *detached* (no gradient reaches the detector), trained
                by GridCLIP's ``loss_objectness_ranker`` to rank locations for
                ``TEST_TOPK_LOCATIONS``. Built after every other layer from a forked random
                state, so the detector's initialisation is the same with or without it.
        """
        # RetinaNet's towers and box predictor; its K-class predictor is replaced below.
        if isinstance(embed_kernel_size, bool) or embed_kernel_size not in EMBED_KERNEL_SIZES:
            raise ValueError(
                f"MODEL.GRIDCLIP.EMBED_KERNEL_SIZE={embed_kernel_size!r}; choose one of "
                f"{EMBED_KERNEL_SIZES}"
            )
        super().__init__(
            input_shape=input_shape,
            num_classes=1,
            num_anchors=num_anchors,
            conv_dims=conv_dims,
            norm=norm,
            prior_prob=prior_prob,
        )
        del self.cls_score
        self.num_anchors = num_anchors
        self.embed_dim = int(text_embeddings.shape[1])
        out_channels = self.embed_dim
        k = int(embed_kernel_size)
        self.grid_embed = nn.Conv2d(conv_dims[-1], out_channels, kernel_size=k, padding=k // 2)
        self.anchor_offset = None
        if anchor_offset and num_anchors > 1:
            self.anchor_offset = nn.Conv2d(conv_dims[-1], num_anchors, kernel_size=3, padding=1)
        for layer in (self.grid_embed, self.anchor_offset):
            if layer is not None:
                nn.init.normal_(layer.weight, mean=0, std=0.01)
                nn.init.constant_(layer.bias, 0)
        # RetinaNet's prior: every class starts at probability prior_prob. A single learned bias
        # (shared by all classes, so it applies to novel ones too) replaces the per-class one.
        self.classifier = TextEmbeddingClassifier(
            text_embeddings,
            logit_scale=logit_scale,
            learn_logit_scale=learn_logit_scale,
            bias=-math.log((1 - prior_prob) / prior_prob),
            learn_bias=True,
        )
        self.classifier.set_product_dtype(text_product_dtype)
        self.objectness = None
        if objectness_ranker:
            # Fork the global random state: creating and initialising this conv must not shift
            # the draws of anything built (or sampled: data-loader seeds) after the head.
            with torch.random.fork_rng(devices=[]):
                self.objectness = nn.Conv2d(conv_dims[-1], 1, kernel_size=3, padding=1)
                nn.init.normal_(self.objectness.weight, mean=0, std=0.01)
                # RetinaNet's prior: start at probability prior_prob
                nn.init.constant_(self.objectness.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec], text_embeddings: Tensor):
        ret = super().from_config(cfg, input_shape)
        del ret["num_classes"]
        ret.update(
            text_embeddings=text_embeddings,
            anchor_offset=cfg.MODEL.GRIDCLIP.ANCHOR_OFFSET,
            embed_kernel_size=cfg.MODEL.GRIDCLIP.EMBED_KERNEL_SIZE,
            logit_scale=cfg.MODEL.GRIDCLIP.LOGIT_SCALE,
            learn_logit_scale=cfg.MODEL.GRIDCLIP.LEARN_LOGIT_SCALE,
            text_product_dtype=cfg.MODEL.GRIDCLIP.TEXT_PRODUCT_DTYPE,
            objectness_ranker=cfg.MODEL.GRIDCLIP.OBJECTNESS_RANKER,
        )
        return ret

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    @property
    def anchors_per_embedding(self) -> int:
        """How many anchors share one embedding: the A anchors of a location."""
        return self.num_anchors

    def forward_embeddings(
        self, features: List[Tensor]
    ) -> Tuple[List[Tensor], List[Tensor], Optional[List[Tensor]], Optional[List[Tensor]]]:
        """
        Args:
            features: FPN maps (N, C, Hi, Wi), high to low resolution.
        Returns:
            grid_embeddings: per level (N, D, Hi, Wi) (not normalised).
            box_deltas: per level (N, A*4, Hi, Wi).
            anchor_offsets: per level (N, A, Hi, Wi) logit offsets, or None.
            objectness: per level (N, 1, Hi, Wi) ranking logits of the objectness ranker
                (computed on the detached box tower), or None.
        """
        class_features, box_deltas, anchor_offsets, objectness = self.forward_towers(features)
        grid_embeddings = [self.grid_embed(x) for x in class_features]
        return grid_embeddings, box_deltas, anchor_offsets, objectness

    def forward_towers(
        self, features: List[Tensor]
    ) -> Tuple[List[Tensor], List[Tensor], Optional[List[Tensor]], Optional[List[Tensor]]]:
        """:meth:`forward_embeddings` before the embedding conv: the class tower's (N, C, Hi,
        Wi) features per level instead of the grid embeddings, the rest the same."""
        assert (
            len(features) == self._num_features
        ), f"head built for {self._num_features} levels, got {len(features)}"
        class_features, box_deltas, anchor_offsets, objectness = [], [], [], []
        for feature in features:
            class_features.append(self.cls_subnet(feature))
            box_features = self.bbox_subnet(feature)
            box_deltas.append(self.bbox_pred(box_features))
            if self.anchor_offset is not None:
                anchor_offsets.append(self.anchor_offset(box_features))
            if self.objectness is not None:  # ranking only: the detector gets no gradient
                objectness.append(self.objectness(box_features.detach()))
        if self.anchor_offset is None:
            anchor_offsets = None
        if self.objectness is None:
            objectness = None
        return class_features, box_deltas, anchor_offsets, objectness

    @property
    def embeds_per_location(self) -> bool:
        """Whether a location's grid embedding depends on that location's class features only
        (the 1x1 embedding conv): then it can be computed for chosen locations alone
        (:class:`~gridclip.modeling.embedding_rows.EmbeddingRowsOnDemand`)."""
        return self.grid_embed.kernel_size == (1, 1) and self.grid_embed.groups == 1

    def embedding_rows(self, grid_embeddings: Tensor) -> Tensor:
        """(N, D, Hi, Wi) -> (N, Hi*Wi, D), one row per location ((h, w) order)."""
        return permute_to_N_HWA_K(grid_embeddings, self.embed_dim)

    def logits(
        self,
        rows: Tensor,
        class_indices: Optional[Tensor] = None,
        text_embeddings: Optional[Tensor] = None,
    ) -> Tensor:
        """(..., D) embeddings -> (..., K) logits, or (..., len(class_indices)) for a subset,
        or (..., C) against ``text_embeddings`` (C, D) instead of the classifier's (e.g. the
        phrases of a batch of captions)."""
        if text_embeddings is None and class_indices is not None:
            text_embeddings = self.classifier.text_embeddings[class_indices]
        return self.classifier(rows, text_embeddings)

    def anchor_logits(
        self,
        grid_embeddings: List[Tensor],
        anchor_offsets: Optional[List[Tensor]] = None,
        class_indices: Optional[Tensor] = None,
        text_embeddings: Optional[Tensor] = None,
    ) -> Tensor:
        """Per-anchor logits of all levels: (N, R, K') with R = sum(Hi*Wi*A), in anchor order.

        A per-location embedding is scored once, then its logits are expanded to its A anchors
        (plus their offsets) in one allocation; K' = len(class_indices) or K, or C against
        ``text_embeddings`` (C, D) (:meth:`logits`).
        """
        rows = torch.cat([self.embedding_rows(x) for x in grid_embeddings], dim=1)
        logits = self.logits(rows, class_indices, text_embeddings)  # (N, M, K')
        group = self.anchors_per_embedding
        if group == 1:
            return logits
        n, m, k = logits.shape
        logits = logits[:, :, None, :]
        if anchor_offsets is not None:
            offsets = torch.cat([permute_to_N_HWA_K(x, 1) for x in anchor_offsets], dim=1)
            logits = logits + offsets.view(n, m, group, 1).to(logits.dtype)
        else:
            logits = logits.expand(n, m, group, k)
        return logits.reshape(n, m * group, k)

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """RetinaNet's contract: logits (N, A*K, Hi, Wi) and box deltas (N, A*4, Hi, Wi).

        Materialises per-anchor logits; GridCLIP's own training and inference do not use it.
        """
        grid_embeddings, box_deltas, anchor_offsets, _ = self.forward_embeddings(features)
        logits = []
        for i, x in enumerate(grid_embeddings):
            n, _, h, w = x.shape
            offsets = [anchor_offsets[i]] if anchor_offsets is not None else None
            level = self.anchor_logits([x], offsets)  # (N, H*W*A, K)
            k = level.shape[-1]
            logits.append(level.reshape(n, h, w, self.num_anchors * k).permute(0, 3, 1, 2))
        return logits, box_deltas
