"""GGN product of a bias-free linear head followed by softmax cross-entropy, without (N, V) tensors.

For a head ``z = h Wᵀ`` (``h``: (N, d) hidden states, ``W``: (V, d) head weight), a tangent
``(ḣ, Ẇ)`` and per-row loss-Hessian coefficients ``c`` (N,), the head's part of the GGN
product ``Jᵀ H J v`` is

    ż = ḣ Wᵀ + h Ẇᵀ                         (J v at the logits)
    u = c ⊙ p ⊙ (ż − ⟨p, ż⟩)                  (H ż, p = softmax(z) per row)
    ∂h = u W,   ∂W = uᵀ h                     (Jᵀ u at the head's input and weight)

``linear_cross_entropy_ggn`` returns ``(∂h, ∂W)`` (and the rows' log-sum-exp, from
which the loss value follows) without ever holding ``z``, ``ż`` or ``u`` for all N rows:

``strategy="rows"`` (default)
    Rows in chunks of ``chunk_rows``: per chunk, the chunk's logits and tangent over the
    whole vocabulary, the fused loss-Hessian kernel
    ([`curvops.kernels.cross_entropy_hvp`][curvops.kernels.cross_entropy_hvp], Triton on CUDA; it overwrites
    the tangent with the product and yields the log-sum-exp) and two matrix products. The same
    arithmetic as the materialised path (five (N, V, d) matrix products), no
    recomputation; memory ``O(N d + V d + chunk_rows · V)``: two (chunk_rows, V) tensors.
``strategy="vocab"``
    Vocabulary tiles of ``vocab_tile`` columns, two passes: the first computes each row's
    log-sum-exp and ``⟨p, ż⟩`` with an online (running-max) softmax, the second
    recomputes the tiles and accumulates ``∂h`` and ``∂W``. Memory ``O(N d + V d + N ·
    vocab_tile)``, but eight (N, V, d) matrix products instead of five: the logits and
    their tangent are computed twice. For a vocabulary too wide for a single row chunk.

Both take the matrix products in the inputs' dtype (bf16 inputs use the tensor cores with
float32 accumulation), or in the autocast dtype inside an autocast region, and the softmax
arithmetic in float32 (float64 for float64 inputs). Results have the inputs' dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from curvops.kernels.cross_entropy_hvp import cross_entropy_hvp

__all__ = ["linear_cross_entropy_ggn", "LinearCrossEntropyGGN", "default_chunk_rows"]

_STRATEGIES = ("rows", "vocab")
#: Default budget for one (chunk_rows, V) tensor of the row strategy.
DEFAULT_CHUNK_BYTES = 256 * 2**20


class LinearCrossEntropyGGN(NamedTuple):
    """Result of ``linear_cross_entropy_ggn``.

    Attributes
    ----------
    grad_hidden : Tensor (N, d)
        ``u W``, dtype of ``h``.
    grad_weight : Tensor (V, d) or None
        ``uᵀ h``, dtype of ``W`` (None when not asked for).
    lse : Tensor (N,) or None
        Log-sum-exp of each row's logits, float32 (float64 for float64 inputs); None
        when not asked for (``return_lse=False``).
    """

    grad_hidden: Tensor
    grad_weight: Tensor | None
    lse: Tensor | None


def default_chunk_rows(vocab: int, dtype: torch.dtype, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk such that one (rows, vocab) tensor fits a memory budget.

    Parameters
    ----------
    vocab : int
        Columns of the tensor (the vocabulary size V).
    dtype : torch.dtype
        Its element type.
    budget_bytes : int, optional
        The budget (default ``DEFAULT_CHUNK_BYTES``, 256 MiB).

    Returns
    -------
    int
        At least 1.
    """
    size = torch.empty((), dtype=dtype).element_size()
    return max(1, budget_bytes // max(vocab * size, 1))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(h: Tensor, weight: Tensor, h_dot: Tensor, weight_dot: Tensor | None, coeff: Tensor) -> None:
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected h (N, d) and weight (V, d), got {tuple(h.shape)} and {tuple(weight.shape)}"
        )
    if h_dot.shape != h.shape:
        raise ValueError(f"h_dot must have the shape of h {tuple(h.shape)}, got {tuple(h_dot.shape)}")
    if weight_dot is not None and weight_dot.shape != weight.shape:
        raise ValueError(
            f"weight_dot must have the shape of weight {tuple(weight.shape)}, got {tuple(weight_dot.shape)}"
        )
    if coeff.shape != (h.shape[0],):
        raise ValueError(f"coeff must have shape ({h.shape[0]},), got {tuple(coeff.shape)}")
    dtypes = {h.dtype, weight.dtype, h_dot.dtype} | ({weight_dot.dtype} if weight_dot is not None else set())
    if len(dtypes) != 1:
        raise TypeError(f"h, weight, h_dot and weight_dot must share one dtype, got {dtypes}")


def linear_cross_entropy_ggn(
    h: Tensor,
    weight: Tensor,
    h_dot: Tensor,
    weight_dot: Tensor | None,
    coeff: Tensor,
    *,
    weight_grad: bool = True,
    strategy: str = "rows",
    chunk_rows: int | None = None,
    vocab_tile: int = 8192,
    return_lse: bool = True,
) -> LinearCrossEntropyGGN:
    """Head part of a GGN-vector product for ``z = h Wᵀ`` and softmax cross-entropy.

    Parameters
    ----------
    h : Tensor (N, d)
        Input of the head (detached).
    weight : Tensor (V, d)
        Head weight.
    h_dot : Tensor (N, d)
        Tangent of ``h`` (``J v`` of the layers below the head).
    weight_dot : Tensor (V, d) or None
        Tangent of the head weight (None: the weight is not perturbed).
    coeff : Tensor (N,)
        Loss-Hessian coefficient of each row (``a (diag p − p pᵀ)`` per row; 0 for
        ignored rows), normalisation included.
    weight_grad : bool, optional
        Whether to compute ``uᵀ h`` (the product's part for the head weight).
    strategy : {"rows", "vocab"}, optional
        Row chunks over the full vocabulary (default) or two passes over vocabulary
        tiles; see the module docstring.
    chunk_rows : int, optional
        Rows per chunk of ``"rows"``; default ``default_chunk_rows`` (one (rows, V)
        tensor of at most 256 MiB).
    vocab_tile : int, optional
        Columns per tile of ``"vocab"`` (default 8192).
    return_lse : bool, optional
        Whether to return the rows' log-sum-exp (default True; the loss value follows
        from it). Free with the Triton kernel; the CPU path spends one pass over each
        chunk's logits on it.

    Returns
    -------
    LinearCrossEntropyGGN
        ``(grad_hidden, grad_weight, lse)``.
    """
    _check(h, weight, h_dot, weight_dot, coeff)
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
    dtype = h.dtype
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type) and dtype.is_floating_point and dtype != torch.float64:
        # Under autocast the head's products run in the autocast dtype, as the model's
        # own head would; cast once here, since in-place products do not autocast.
        low = torch.get_autocast_dtype(device_type)
        h, weight, h_dot = h.to(low), weight.to(low), h_dot.to(low)
        weight_dot = None if weight_dot is None else weight_dot.to(low)
    with torch.autocast(device_type, enabled=False):
        if strategy == "rows":
            res = _by_rows(h, weight, h_dot, weight_dot, coeff, weight_grad, chunk_rows, return_lse)
        else:
            res = _by_vocab(h, weight, h_dot, weight_dot, coeff, weight_grad, vocab_tile, return_lse)
    if res.grad_hidden.dtype == dtype:
        return res
    return LinearCrossEntropyGGN(
        res.grad_hidden.to(dtype), None if res.grad_weight is None else res.grad_weight.to(dtype), res.lse
    )


def _by_rows(
    h: Tensor,
    weight: Tensor,
    h_dot: Tensor,
    weight_dot: Tensor | None,
    coeff: Tensor,
    weight_grad: bool,
    chunk_rows: int | None,
    return_lse: bool,
) -> LinearCrossEntropyGGN:
    n = h.shape[0]
    vocab = weight.shape[0]
    acc = _acc(h.dtype)
    step = chunk_rows if chunk_rows is not None else default_chunk_rows(vocab, h.dtype)
    if step < 1:
        raise ValueError(f"chunk_rows must be positive, got {step}")
    grad_h = torch.empty_like(h)
    # Low-precision weight gradients accumulate over chunks in float32 (one rounding at the end).
    grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if weight_grad else None
    lse = torch.empty(n, dtype=acc, device=h.device) if return_lse else None
    coeff = coeff.to(acc)
    wt = weight.t()
    wdt = None if weight_dot is None else weight_dot.t()
    for i in range(0, n, step):
        sl = slice(i, i + step)
        hc = h[sl]
        z = hc @ wt
        u = h_dot[sl] @ wt
        if wdt is not None:
            u.addmm_(hc, wdt)
        # The product replaces the tangent in place (two (rows, V) tensors per chunk, not
        # three); the kernel writes the rows' log-sum-exp on the way.
        cross_entropy_hvp(
            z, u, weight=coeff[sl], reduction="sum", out=u, lse_out=None if lse is None else lse[sl]
        )
        del z
        torch.mm(u, weight, out=grad_h[sl])
        if grad_w is not None:
            _add_product_(grad_w, u.t(), hc)
        del u
    out_w = None if grad_w is None else grad_w.to(weight.dtype)
    return LinearCrossEntropyGGN(grad_h, out_w, lse)


#: Whether ``torch.addmm(..., out_dtype=)`` (low-precision inputs, float32 output, CUDA)
#: works here; None until the first call decides.
_ADDMM_OUT_DTYPE: bool | None = None


def _add_product_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b``, for ``a``, ``b`` in ``acc``'s dtype or a lower one.

    Low-precision products go straight into the float32 accumulator where cuBLAS
    offers it (``out_dtype``): no rounded (V, d) partial, no separate add pass over it,
    and one bf16 rounding of ∂W instead of one per chunk (the timing: "Head GGN product"
    in benchmarks/results/lm_h200_2026-12-02.md).
    """
    global _ADDMM_OUT_DTYPE
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _ADDMM_OUT_DTYPE is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        except torch.cuda.OutOfMemoryError:
            raise  # a real failure, not a missing overload
        except (TypeError, RuntimeError, NotImplementedError):
            _ADDMM_OUT_DTYPE = False
        else:
            _ADDMM_OUT_DTYPE = True
            return
    acc.add_(a @ b)


def _by_vocab(
    h: Tensor,
    weight: Tensor,
    h_dot: Tensor,
    weight_dot: Tensor | None,
    coeff: Tensor,
    weight_grad: bool,
    tile: int,
    return_lse: bool,
) -> LinearCrossEntropyGGN:
    if tile < 1:
        raise ValueError(f"vocab_tile must be positive, got {tile}")
    n = h.shape[0]
    vocab = weight.shape[0]
    acc = _acc(h.dtype)
    coeff = coeff.to(acc)

    def tiles(j: int) -> tuple[Tensor, Tensor]:
        wj = weight[j : j + tile]
        z = (h @ wj.t()).to(acc)
        zd = h_dot @ wj.t()
        if weight_dot is not None:
            zd.addmm_(h, weight_dot[j : j + tile].t())
        return z, zd.to(acc)

    # Pass 1: running max m, l = Σ exp(z − m), s = Σ exp(z − m) ż per row.
    m = torch.full((n,), float("-inf"), dtype=acc, device=h.device)
    l = torch.zeros(n, dtype=acc, device=h.device)
    s = torch.zeros(n, dtype=acc, device=h.device)
    for j in range(0, vocab, tile):
        z, zd = tiles(j)
        m_new = torch.maximum(m, z.max(dim=1).values)
        rescale = torch.exp(m - m_new)
        e = torch.exp(z - m_new.unsqueeze(1))
        l = l * rescale + e.sum(dim=1)
        s = s * rescale + (e * zd).sum(dim=1)
        m = m_new
    lse = m + torch.log(l)
    mean_dot = s / l  # ⟨p, ż⟩

    # Pass 2: u tile by tile.
    grad_h = torch.zeros(h.shape, dtype=acc, device=h.device)
    grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=h.device) if weight_grad else None
    for j in range(0, vocab, tile):
        z, zd = tiles(j)
        u = torch.exp(z - lse.unsqueeze(1))
        u.mul_(zd.sub_(mean_dot.unsqueeze(1))).mul_(coeff.unsqueeze(1))
        u = u.to(h.dtype)
        grad_h.add_(u @ weight[j : j + tile])
        if grad_w is not None:
            torch.mm(u.t(), h, out=grad_w[j : j + tile])
    return LinearCrossEntropyGGN(grad_h.to(h.dtype), grad_w, lse if return_lse else None)
