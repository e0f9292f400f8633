"""GridCLIP's classification loss: RetinaNet's sigmoid focal loss, computed without expanding.

Detectron2's ``RetinaNet.losses`` evaluates ``sigmoid_focal_loss_jit`` on a (valid anchors, K)
matrix: for GridCLIP that means expanding each location's logits to its A anchors (A = 9),
gathering the valid anchors, building an int64 one-hot target and running about fifteen
elementwise passes (forward and backward) over ~64 M elements per 512x768 image at 866 classes,
each pass allocating a fresh tensor of that size. :func:`grid_focal_loss` returns the same value
(the sum over valid anchors and classes of ``alpha_t * (1 - p_t) ** gamma * BCE-with-logits``)
and the same gradients, computed differently:

- every element that is not a positive (anchor, class) pair has target 0, so its loss is
  ``(1 - alpha) * p ** gamma * softplus(z)``; the few positive pairs (one per positive anchor)
  get ``alpha * (1 - p) ** gamma * softplus(-z)`` separately, and are excluded (set to weight 0,
  not subtracted) from the negative pass;
- **shared logits** (per-location embeddings without anchor offsets): the A anchors of a
  location have the same logits, so the negative term of (location, class) is computed once and
  weighted by the number of valid anchors of that location that are not positives of that class
  (an exact integer weight): A times fewer elements;
- **anchor offsets** (``logit = cls(location, class) + offset(location, anchor)``) or per-anchor
  embeddings: every (anchor, class) element is evaluated, but in blocks of locations small enough
  to stay in cache, with the per-anchor logits formed block by block and never stored;
- loss and gradients are computed in one pass (the gradients of the block are reduced at once to
  the (location, class) logits and the (location, anchor) offsets), so the backward pass only
  scales the stored gradients: no (anchors x classes) tensor is kept for autograd.

The value is mathematically identical; in floating point it differs from Detectron2's by
summation order only (``tests/test_gridclip.py`` checks 1e-5 relative on value and gradients).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["grid_focal_loss", "FOCAL_LOSS_IMPLS"]

#: ``MODEL.GRIDCLIP.FOCAL_LOSS_IMPL`` values: this module's, or Detectron2's on expanded logits.
FOCAL_LOSS_IMPLS = ("grid", "detectron2")

# Elements per block: the block's per-anchor logits and about six float32 temporaries of this
# size (1 MiB each) stay in cache; the fastest of 2**14 ... 2**22 on an AVX-512 CPU, one thread.
DEFAULT_BLOCK_ELEMENTS = 1 << 18


def softplus_from_sigmoid(z: Tensor, p: Tensor, one_minus_p: Tensor) -> Tensor:
    """``softplus(z) = log(1 + exp(z))`` given ``p = sigmoid(z)`` and ``1 - p`` (rounded),
    accurate to a few float32 ulps for every z, with one vectorised ``log`` (PyTorch's CPU
    ``softplus`` / ``log1p`` / ``log_sigmoid`` kernels are several times slower than ``log``).

    ``softplus(z) = max(z, 0) - log(max(p, 1 - p))``, exactly. For z <= 0 the rounding of
    ``v = fl(1 - p)`` (v in [0.5, 1]) is compensated: ``1 - p = v + d`` with
    ``d = (1 - v) - p``, where ``1 - v`` is exact (Sterbenz) and so is the subtraction of p
    while p >= 2**-24 (below, its rounding is negligible against softplus(z) ~ p), and
    ``log(v + d) = log(v) + d / v`` to within 2**-49. For z > 0, ``1 - p`` is exact and d = 0.
    ``tests/test_gridclip.py`` checks it against float64 over z in [-80, 80].
    """
    w = torch.maximum(p, one_minus_p)
    d = torch.rsub(one_minus_p, 1.0).sub_(p).div_(w)
    return torch.clamp_min(z, 0.0).sub_(w.log_()).sub_(d)


def _negative_terms(
    z: Tensor,
    gamma: float,
    weight: Optional[Tensor] = None,
    fix: Optional[Callable[[Tensor, Tensor], None]] = None,
    with_grad: bool = True,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Sum over ``z`` of ``w * p**gamma * softplus(z)`` and its elementwise gradient
    ``w * p**gamma * (gamma * (1 - p) * softplus(z) + p)`` (p = sigmoid(z)); the (1 - alpha)
    factor is applied by the caller. ``w``: ``weight`` (broadcast to z; None: 1), then
    ``fix(p, w * p**gamma)`` may overwrite some elements of the latter in place."""
    p = torch.sigmoid(z)
    q = torch.rsub(p, 1.0)
    sp = softplus_from_sigmoid(z, p, q)
    pg = p * p if gamma == 2.0 else p.pow(gamma)
    if weight is not None:
        pg.mul_(weight)
    if fix is not None:
        fix(p, pg)
    loss = torch.dot(pg.reshape(-1), sp.reshape(-1))
    if not with_grad:
        return loss, None
    # pg * (gamma * (1 - p) * sp + p), in place in q
    grad = torch.add(p, q.mul_(sp), alpha=gamma, out=q).mul_(pg)
    return loss, grad


def _positive_terms(z: Tensor, gamma: float) -> Tuple[Tensor, Tensor]:
    """Elementwise ``(1 - p)**gamma * softplus(-z)`` and its gradient
    ``-(1 - p)**gamma * (gamma * p * softplus(-z) + 1 - p)`` (alpha applied by the caller)."""
    p = torch.sigmoid(z)
    q = torch.sigmoid(-z)  # 1 - p, without cancellation for large z
    sp = F.softplus(-z)
    qg = q.pow(gamma)
    return qg * sp, -qg * (gamma * p * sp + q)


def _reweight_pairs(flat_index: Tensor, weight: Tensor, gamma: float):
    """``fix`` for :func:`_negative_terms`: elements ``flat_index`` get weight ``weight``."""

    def fix(p: Tensor, pg: Tensor) -> None:
        p_pair = p.view(-1)[flat_index]
        pg_pair = p_pair * p_pair if gamma == 2.0 else p_pair.pow(gamma)
        pg.view(-1)[flat_index] = pg_pair * weight

    return fix


def _zero_pairs(index: Tuple[Tensor, ...]):
    """``fix`` for :func:`_negative_terms`: elements ``index`` get weight 0."""

    def fix(p: Tensor, pg: Tensor) -> None:
        pg[index] = 0.0

    return fix


class _GridFocalLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, offsets, labels, num_classes, alpha, gamma, block_elements):
        needs_grad = ctx.needs_input_grad[0] or (offsets is not None and ctx.needs_input_grad[1])
        loss, grad_logits, grad_offsets = _focal_loss_and_grads(
            logits.detach(),
            offsets.detach() if offsets is not None else None,
            labels,
            num_classes,
            float(alpha),
            float(gamma),
            int(block_elements),
            needs_grad,
        )
        ctx.save_for_backward(grad_logits, grad_offsets)
        ctx.dtypes = (logits.dtype, offsets.dtype if offsets is not None else None)
        return loss.to(torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad_logits, grad_offsets = ctx.saved_tensors
        dl = (grad_logits * grad_output).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        do = None
        if ctx.needs_input_grad[1] and grad_offsets is not None:
            do = (grad_offsets * grad_output).to(ctx.dtypes[1])
        return dl, do, None, None, None, None, None


def _focal_loss_and_grads(
    logits: Tensor,
    offsets: Optional[Tensor],
    labels: Tensor,
    num_classes: int,
    alpha: float,
    gamma: float,
    block_elements: int,
    needs_grad: bool,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    n, m, k = logits.shape
    assert k == num_classes, f"logits have {k} classes, expected {num_classes}"
    assert labels.dim() == 2 and labels.shape[0] == n, f"labels {tuple(labels.shape)}"
    group = labels.shape[1] // max(m, 1)
    assert group * m == labels.shape[1], f"{labels.shape[1]} anchors for {m} rows"
    if offsets is not None:
        assert offsets.shape == (n, m, group), f"offsets {tuple(offsets.shape)} != {(n, m, group)}"
    w_neg = 1.0 - alpha if alpha >= 0 else 1.0
    w_pos = alpha if alpha >= 0 else 1.0

    x = logits.float().reshape(n * m, k)
    labels = labels.reshape(n * m, group)
    rows_total = n * m
    valid = labels >= 0
    positive = valid & (labels < num_classes)
    pos_row, pos_anchor = positive.nonzero(as_tuple=True)
    pos_class = labels[pos_row, pos_anchor]
    grad_x = torch.zeros_like(x) if needs_grad else None
    o = grad_o = None
    if offsets is not None:
        o = offsets.float().reshape(rows_total, group)
        grad_o = torch.zeros_like(o) if needs_grad else None

    total = torch.zeros((), dtype=torch.float64, device=x.device)
    if offsets is None:
        # Shared logits: the negative term of (row, class) counts once per valid anchor of the
        # row that is not a positive of that class: weight = valid anchors of the row, minus
        # the row's positives of the class (exact small integers; no subtraction of losses).
        anchors_valid = valid.sum(dim=1).to(x.dtype)  # (R,)
        pair, pair_count = torch.unique(pos_row * k + pos_class, return_counts=True)  # sorted
        pair_weight = anchors_valid[pair // k] - pair_count.to(x.dtype)
        rows_per_block = max(1, block_elements // max(k, 1))
        starts = list(range(0, rows_total, rows_per_block))
        bounds = torch.tensor(starts + [rows_total], device=x.device) * k
        cuts = torch.searchsorted(pair, bounds).tolist()
        for b, start in enumerate(starts):
            end = min(start + rows_per_block, rows_total)
            lo, hi = cuts[b], cuts[b + 1]
            fix = None
            if hi > lo:
                fix = _reweight_pairs(pair[lo:hi] - start * k, pair_weight[lo:hi], gamma)
            weight = anchors_valid[start:end, None]
            loss, grad = _negative_terms(x[start:end], gamma, weight, fix, needs_grad)
            total += loss
            if needs_grad:
                torch.mul(grad, w_neg, out=grad_x[start:end])
    else:
        # Per-anchor logits x[row, class] + o[row, anchor], formed block by block of rows.
        weight_anchor = valid.to(x.dtype)[:, :, None]  # (R, G, 1): 0 for ignored anchors
        any_ignored = bool((~valid).any())
        # pos_row is sorted (nonzero() is row-major): a block's positives are a slice.
        rows_per_block = max(1, block_elements // max(k * group, 1))
        starts = list(range(0, rows_total, rows_per_block))
        cuts = torch.searchsorted(
            pos_row, torch.tensor(starts + [rows_total], device=x.device)
        ).tolist()
        for b, start in enumerate(starts):
            end = min(start + rows_per_block, rows_total)
            z = x[start:end, None, :] + o[start:end, :, None]  # (r, G, K)
            lo, hi = cuts[b], cuts[b + 1]
            fix = None
            if hi > lo:  # positive pairs: their negative term is excluded (weight 0)
                fix = _zero_pairs((pos_row[lo:hi] - start, pos_anchor[lo:hi], pos_class[lo:hi]))
            weight = weight_anchor[start:end] if any_ignored else None
            loss, grad = _negative_terms(z, gamma, weight, fix, needs_grad)
            total += loss
            if needs_grad:
                grad.mul_(w_neg)
                torch.sum(grad, dim=1, out=grad_x[start:end])
                torch.sum(grad, dim=2, out=grad_o[start:end])
    total *= w_neg

    if pos_row.numel():
        z = x[pos_row, pos_class]
        if o is not None:
            z = z + o[pos_row, pos_anchor]
        loss, grad = _positive_terms(z, gamma)
        total += w_pos * loss.sum(dtype=torch.float64)
        if needs_grad:
            grad = grad * w_pos
            grad_x.view(-1).index_add_(0, pos_row * k + pos_class, grad)
            if grad_o is not None:
                grad_o.view(-1).index_add_(0, pos_row * group + pos_anchor, grad)
    if needs_grad:
        grad_x = grad_x.view(n, m, k)
        grad_o = grad_o.view(n, m, group) if grad_o is not None else None
    return total, grad_x, grad_o


def grid_focal_loss(
    logits: Tensor,
    offsets: Optional[Tensor],
    labels: Tensor,
    num_classes: int,
    alpha: float = 0.25,
    gamma: float = 2.0,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> Tensor:
    """RetinaNet's summed sigmoid focal loss over valid anchors, for logits shared by groups of
    anchors; see the module doc.

    Args:
        logits: (N, M, K) class logits of M rows (locations, or anchors), differentiable.
        offsets: (N, M, G) per-anchor logit offsets (differentiable), or None: the G anchors of
            a row share its logits.
        labels: (N, M*G) anchor labels in row-major (row, anchor) order, RetinaNet's convention:
            -1 ignored, 0..K-1 positive of that class, K background.
        num_classes: K.
        alpha, gamma: the focal loss's (alpha < 0: no alpha weighting).
    Returns:
        A float32 scalar equal to ``sigmoid_focal_loss_jit(expanded_logits[valid], one_hot,
        alpha, gamma, reduction="sum")`` (up to summation order), with the same gradients.
    """
    return _GridFocalLoss.apply(logits, offsets, labels, num_classes, alpha, gamma, block_elements)
