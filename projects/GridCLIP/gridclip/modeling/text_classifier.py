"""A zero-shot classifier whose weights are fixed CLIP text embeddings.

Shared by GridCLIP (grid embeddings) and the ViLD baseline (region embeddings). The text
embeddings are a (C, D) buffer: L2-normalised, saved in checkpoints, moved by ``.to()``, never
trained. ``set_vocabulary`` replaces them (any C) for open-vocabulary inference.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Union

import torch
from torch import nn

from ..clip.embeddings import check_text_embeddings, l2_normalize

logger = logging.getLogger(__name__)

#: ``MODEL.GRIDCLIP.TEXT_PRODUCT_DTYPE`` values (:meth:`TextEmbeddingClassifier.set_product_dtype`)
PRODUCT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = [
    "PRODUCT_DTYPES",
    "TextEmbeddingClassifier",
    "l2_normalize",
    "check_text_embeddings",
]


class TextEmbeddingClassifier(nn.Module):
    """Scores embeddings against class text embeddings by scaled cosine similarity.

    ``forward(x)`` with x of shape (..., D) returns logits (..., C)
    = logit_scale * cos(x, text_embeddings) + bias.

    The similarity is computed in fp32 even under autocast, so low-precision training cannot
    overflow the scaled cosine.
    """

    def __init__(
        self,
        text_embeddings: torch.Tensor,
        *,
        logit_scale: float = 1.0,
        learn_logit_scale: bool = False,
        max_logit_scale: float = 100.0,
        bias: float = 0.0,
        learn_bias: bool = False,
    ):
        super().__init__()
        if not (math.isfinite(max_logit_scale) and max_logit_scale >= 1.0):
            raise ValueError(f"max_logit_scale must be a finite number >= 1, got {max_logit_scale}")
        if not (math.isfinite(logit_scale) and 1.0 <= logit_scale <= max_logit_scale):
            # a fixed scale outside the clamp range would be changed silently (<= 0: NaN logits)
            raise ValueError(
                f"logit_scale must be in [1, {max_logit_scale:g}] (cosine logits are multiplied by "
                f"it; GridCLIP: MODEL.GRIDCLIP.LOGIT_SCALE, ViLD: 1 / MODEL.VILD.TEMPERATURE), "
                f"got {logit_scale}"
            )
        text_embeddings = check_text_embeddings(text_embeddings)
        self.register_buffer("text_embeddings", l2_normalize(text_embeddings), persistent=True)
        log_scale = torch.tensor(float(logit_scale)).log()
        if learn_logit_scale:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale, persistent=False)
        self.max_logit_scale = float(max_logit_scale)
        self.product_dtype = torch.float32
        if learn_bias:
            self.bias = nn.Parameter(torch.tensor(float(bias)))
        else:
            self.register_buffer("bias", torch.tensor(float(bias)), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.text_embeddings.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.text_embeddings.shape[1]

    @property
    def logit_scale(self) -> torch.Tensor:
        # Bounded: a runaway learned temperature cannot blow the logits up.
        return self.log_logit_scale.exp().clamp(1.0, self.max_logit_scale)

    def set_product_dtype(self, dtype: Union[str, torch.dtype]) -> None:
        """The dtype of the text product at inference (not in training, whose logits are fp32).

        ``float32`` (default), ``bfloat16`` (CPUs with AVX512-BF16/AMX, GPUs) or ``float16``
        (GPUs): the scaled row embeddings and the text embeddings are rounded to it, the product
        accumulates in the kernel's precision and the logits come back as fp32. Cosines then
        differ from fp32 by at most :attr:`product_error_bound` (tests check it).
        """
        if isinstance(dtype, str):
            if dtype not in PRODUCT_DTYPES:
                raise ValueError(
                    f"text product dtype {dtype!r}: choose one of {sorted(PRODUCT_DTYPES)}"
                )
            dtype = PRODUCT_DTYPES[dtype]
        assert dtype in PRODUCT_DTYPES.values(), f"unsupported text product dtype {dtype}"
        self.product_dtype = dtype

    @property
    def product_error_bound(self) -> float:
        """Bound of |cos - cos in fp32| of the inference product in :attr:`product_dtype`.

        Unit vectors rounded to a format of unit roundoff u change a dot product by at most
        (2u + u^2) (Cauchy-Schwarz), the product's own rounding to that format by u * |cos|:
        3u + u^2 in all; the kernels accumulate in fp32 (its error, ~D * 2^-24, is folded in as
        one more u). 0 in fp32 (the reference).
        """
        if self.product_dtype == torch.float32:
            return 0.0
        u = torch.finfo(self.product_dtype).eps / 2
        return 4 * u + u * u

    def set_vocabulary(self, text_embeddings: torch.Tensor) -> None:
        """Replace the class embeddings (any number of classes, same dimension)."""
        text_embeddings = check_text_embeddings(text_embeddings, embed_dim=self.embed_dim)
        buf = l2_normalize(text_embeddings).to(self.text_embeddings.device)
        # Re-register so the buffer keeps being a buffer (saved, moved by .to()) with a new shape.
        self.register_buffer("text_embeddings", buf, persistent=True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint may carry a vocabulary of another size: adopt its shape before loading.
        key = prefix + "text_embeddings"
        if key in state_dict and state_dict[key].shape != self.text_embeddings.shape:
            self.set_vocabulary(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self, x: torch.Tensor, text_embeddings: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """
        Args:
            x: (..., D) embeddings (not necessarily normalised).
            text_embeddings: optional (C', D) classifier to use instead of the buffer.
        Returns:
            (..., C) logits.
        """
        weight = (
            self.text_embeddings
            if text_embeddings is None
            else l2_normalize(text_embeddings.to(x.device).float())
        )
        assert (
            x.shape[-1] == weight.shape[1]
        ), f"embedding dim {x.shape[-1]} != text embedding dim {weight.shape[1]}"
        with torch.autocast(device_type=x.device.type, enabled=False):
            # scale * cos + bias in one output pass: the scale is folded into the (rows, D)
            # normalisation and the bias into addmm (the (rows, C) matrix is the big one: at
            # 10,000 classes this saves two of its three passes).
            x = x.float()
            shape = x.shape[:-1]
            x = x.reshape(-1, x.shape[-1])
            x = x * (self.logit_scale / x.norm(dim=-1, keepdim=True).clamp_min(1e-6))
            if self.product_dtype != torch.float32 and not torch.is_grad_enabled():
                # scaled cosines in low precision, the bias added in fp32
                low = self.product_dtype
                logits = torch.mm(x.to(low), weight.to(low).t()).float().add_(self.bias)
            else:
                logits = torch.addmm(self.bias.to(x.dtype), x, weight.t())
            return logits.view(*shape, weight.shape[0])

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embed_dim={self.embed_dim}"
