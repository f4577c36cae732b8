"""Loss-Hessian-vector product of softmax cross-entropy with respect to the logits.

For logits ``z`` and a tangent ``u``, both of shape (N, V), with ``p = softmax(z)``
taken per row, the product is

    out[n] = c[n] * (p_n * u_n - p_n * (p_n . u_n)) = c[n] * p_n * (u_n - p_n . u_n)

which is ``H_n u_n`` with ``H_n = c[n] (diag(p_n) - p_n p_n^T)``, the Hessian of
``c[n] * CE(z_n, t_n)`` w.r.t. ``z_n``. The Hessian does not depend on the target
class: the target only decides whether a row counts (``ignore_index``) and, with
class weights, how much it counts (pass ``weight=class_weight[target]``).

Three backends compute the same function:

* ``"triton"``: a fused split-V kernel (see ``curvops.kernels._ce_hvp_triton``):
  one read of ``z`` and ``u`` from device memory, one write of ``out``, no
  (N, V) intermediate beyond the output.
* ``"compile"``: the eager formula under ``torch.compile`` (Inductor fuses it into
  a reduction and a pointwise pass; 2 reads of z and u plus the write).
* ``"eager"``: plain torch ops, accumulating in float32 (float64 for float64
  inputs).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["cross_entropy_hvp"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_BACKENDS = ("auto", "eager", "compile", "triton")
_REDUCTIONS = ("mean", "sum")


def cross_entropy_hvp(
    logits: Tensor,
    u: Tensor,
    *,
    target: Tensor | None = None,
    ignore_index: int = -100,
    weight: Tensor | None = None,
    reduction: str = "mean",
    normalizer: float | int | Tensor | None = None,
    backend: str = "auto",
    out: Tensor | None = None,
    lse_out: Tensor | None = None,
) -> Tensor:
    """Multiply the cross-entropy Hessian w.r.t. the logits by ``u``, row by row.

    Computes ``out[n] = c[n] * (p_n * u_n - p_n * (p_n . u_n))`` with
    ``p_n = softmax(logits[n])`` and the row coefficient
    ``c[n] = weight[n] * valid[n] / normalizer``.

    Parameters
    ----------
    logits : Tensor, shape (N, V)
        float16, bfloat16, float32 or float64. Rows may be strided (row stride
        != V, e.g. a slice of a larger tensor); the last dimension should have
        stride 1 for speed (any stride is accepted).
    u : Tensor, shape (N, V)
        Tangent, floating point, same device as ``logits``. Its dtype is the
        output dtype.
    target : Tensor of shape (N,), integer, optional
        Class indices. Only used to mask rows equal to ``ignore_index``
        (the Hessian of softmax cross-entropy does not depend on the target).
        ``None`` counts every row.
    ignore_index : int, default -100
        Rows whose target equals it get ``c = 0`` (their output is zero).
    weight : Tensor of shape (N,), floating, optional
        Per-token weights multiplying ``c``. For torch's per-class weights ``w``
        pass ``weight=w[target]`` (clamp ignored targets to a valid index first);
        the default ``"mean"`` normalizer ``sum(weight * valid)`` then matches
        ``F.cross_entropy(..., weight=w)``.
    reduction : {"mean", "sum"}, default "mean"
        ``"mean"``: ``normalizer`` defaults to ``sum(weight * valid)`` (the number
        of counted rows when ``weight`` is None). ``"sum"``: ``normalizer``
        defaults to 1.
    normalizer : float, int or 0-d Tensor, optional
        When given, ``c`` is divided by it under either reduction. Callers that
        sum curvature over several batches pass the whole-dataset count here so
        that every batch is scaled alike. A 0-d CUDA tensor avoids a host sync.
    backend : {"auto", "triton", "compile", "eager"}, default "auto"
        ``"auto"`` picks ``"triton"`` for CUDA tensors when triton is importable
        and ``"eager"`` otherwise. On the CPU, ``"eager"`` is the default because
        the op is memory-bound and ``torch.compile`` saves one pass over memory
        at the price of seconds of compilation per new shape. ``"triton"`` on
        CPU tensors runs the same kernel through the Triton interpreter and
        needs ``TRITON_INTERPRET=1`` in the environment before triton is first
        imported (triton decorates its library functions at import).
    out : Tensor of shape (N, V), optional
        Contiguous tensor of ``u``'s dtype and device to write the result to; it
        may be ``u`` itself (the product replaces the tangent: one (N, V) tensor
        fewer). No other overlap with the inputs is allowed. Default: a new tensor.
    lse_out : Tensor of shape (N,), optional
        Contiguous floating tensor on the logits' device that receives
        ``logsumexp(logits[n])`` for every row, ignored rows included (the loss
        value follows from it). The Triton kernel computes it on the way, at no
        extra pass over the logits; the other backends spend one.

    Returns
    -------
    Tensor, shape (N, V)
        ``out`` when given; otherwise a new contiguous tensor. Dtype of ``u``.
        Arithmetic is done in float32 (float64 when either input is float64)
        whatever the input dtype.

    Raises
    ------
    TypeError
        Non-tensor or non-floating ``logits``/``u``/``weight``, non-integer
        ``target``.
    ValueError
        Shape or device mismatch, unknown ``reduction`` or ``backend``.
    RuntimeError
        ``backend="triton"`` where it cannot run (CPU tensors without
        ``TRITON_INTERPRET=1``, or triton not importable).

    Notes
    -----
    Label smoothing needs no parameter: the smoothed loss of a row is
    ``-sum_k a_k log p_k`` with ``a = (1 - eps) onehot(t) + eps / V``, and for any
    ``a`` with ``sum_k a_k = 1`` the Hessian of ``-sum_k a_k log softmax(z)_k`` is
    ``diag(p) - p p^T``: the term is linear in log-softmax, whose Hessian is the
    same for every component up to sign. Soft (probability) targets likewise.
    With class weights and smoothing, each row's weights sum to
    ``(1 - eps) w_t + eps / V * sum_k w_k``; pass that as ``weight`` and
    ``normalizer=sum(w[t])`` to match torch.

    A ``"mean"`` over zero counted rows returns zeros (torch's loss is NaN there).

    Memory: ``"triton"`` and ``"compile"`` allocate only the output. ``"eager"``
    allocates two (N, V) tensors in the accumulation dtype (softmax and the
    output before the final cast), plus a float copy of ``u`` when ``u`` is not
    in that dtype, plus the output when its dtype differs.
    """
    _check_inputs(logits, u, target, weight, reduction, backend)
    _check_outputs(logits, u, out, lse_out)
    coeff = _row_coefficients(logits, u, target, ignore_index, weight, reduction, normalizer)
    chosen = _resolve_backend(backend, logits)
    if chosen == "triton":
        from curvops.kernels import _ce_hvp_triton  # lazy: keeps `import curvops` triton-free

        return _ce_hvp_triton.ce_hvp_triton(logits, u, coeff, out=out, lse=lse_out)
    if lse_out is not None:
        # Before the product: ``out`` may be ``u``, never ``logits``, so the logits survive.
        lse_out.copy_(torch.logsumexp(logits.to(coeff.dtype), dim=-1))
    result = _eager(logits, u, coeff) if chosen == "eager" else _compiled()(logits, u, coeff)
    return result if out is None else out.copy_(result)


def _check_outputs(logits: Tensor, u: Tensor, out: Tensor | None, lse_out: Tensor | None) -> None:
    if out is not None:
        if not isinstance(out, Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        if out.shape != u.shape or out.dtype != u.dtype or out.device != u.device or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous tensor of shape {tuple(u.shape)}, dtype {u.dtype} on {u.device}, "
                f"got shape {tuple(out.shape)}, dtype {out.dtype} on {out.device}"
                f"{'' if out.is_contiguous() else ', not contiguous'}"
            )
        same_u = out.data_ptr() == u.data_ptr() and out.stride() == u.stride()
        if not same_u and (_overlaps(out, u) or _overlaps(out, logits)):
            raise ValueError("out may be u itself but must not otherwise overlap logits or u")
    if lse_out is not None:
        if not isinstance(lse_out, Tensor):
            raise TypeError(f"lse_out must be a torch.Tensor or None, got {type(lse_out).__name__}")
        n = logits.shape[0]
        if (
            lse_out.shape != (n,)
            or not lse_out.dtype.is_floating_point
            or lse_out.device != logits.device
            or not lse_out.is_contiguous()
        ):
            raise ValueError(
                f"lse_out must be a contiguous floating tensor of shape ({n},) on {logits.device}, got shape "
                f"{tuple(lse_out.shape)}, dtype {lse_out.dtype} on {lse_out.device}"
            )


def _overlaps(a: Tensor, b: Tensor) -> bool:
    """Whether the memory spans of two tensors intersect (conservative: spans, not elements)."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False

    def span(t: Tensor) -> tuple[int, int]:
        start = t.data_ptr()
        extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) + 1
        return start, start + extent * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _acc_dtype(logits: Tensor, u: Tensor) -> torch.dtype:
    if logits.dtype == torch.float64 or u.dtype == torch.float64:
        return torch.float64
    return torch.float32


def _check_inputs(
    logits: Tensor,
    u: Tensor,
    target: Tensor | None,
    weight: Tensor | None,
    reduction: str,
    backend: str,
) -> None:
    for name, t in (("logits", logits), ("u", u)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (N, V), got {tuple(logits.shape)}")
    if u.shape != logits.shape:
        raise ValueError(f"u must have the shape of logits {tuple(logits.shape)}, got {tuple(u.shape)}")
    if u.device != logits.device:
        raise ValueError(f"u is on {u.device} but logits on {logits.device}")
    n = logits.shape[0]
    if target is not None:
        if not isinstance(target, Tensor):
            raise TypeError(f"target must be a torch.Tensor or None, got {type(target).__name__}")
        if target.dtype not in _INT_DTYPES:
            raise TypeError(f"target must have an integer dtype, got {target.dtype}")
        if target.shape != (n,):
            raise ValueError(f"target must have shape ({n},), got {tuple(target.shape)}")
        if target.device != logits.device:
            raise ValueError(f"target is on {target.device} but logits on {logits.device}")
    if weight is not None:
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
        if weight.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"weight must have a floating dtype, got {weight.dtype}")
        if weight.shape != (n,):
            raise ValueError(f"weight must be per-token with shape ({n},), got {tuple(weight.shape)}")
        if weight.device != logits.device:
            raise ValueError(f"weight is on {weight.device} but logits on {logits.device}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def _row_coefficients(
    logits: Tensor,
    u: Tensor,
    target: Tensor | None,
    ignore_index: int,
    weight: Tensor | None,
    reduction: str,
    normalizer: float | int | Tensor | None,
) -> Tensor:
    """``c[n] = weight[n] * valid[n] / normalizer`` as an (N,) tensor in the accumulation dtype."""
    acc = _acc_dtype(logits, u)
    n = logits.shape[0]
    if weight is None:
        num = torch.ones(n, dtype=acc, device=logits.device)
    else:
        num = weight.to(acc)
    if target is not None:
        num = torch.where(target == ignore_index, torch.zeros((), dtype=acc, device=num.device), num)
    if normalizer is None:
        if reduction == "sum":
            return num.contiguous()
        norm = num.sum()
    elif isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a scalar, got shape {tuple(normalizer.shape)}")
        norm = normalizer.reshape(()).to(device=logits.device, dtype=acc)
    else:
        norm = torch.tensor(float(normalizer), dtype=acc, device=logits.device)
    # Zero numerators stay exactly zero, so an all-ignored batch (0 / 0) gives zeros.
    return torch.where(num == 0, torch.zeros((), dtype=acc, device=num.device), num / norm).contiguous()


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str, logits: Tensor) -> str:
    if backend == "auto":
        if logits.is_cuda and _triton_importable():
            return "triton"
        return "eager"
    if backend == "triton":
        if not logits.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported "
                f"to run the kernel through the Triton interpreter; got tensors on {logits.device}. "
                "Use backend='eager' or 'auto' on the CPU."
            )
        if not _triton_importable():
            raise RuntimeError("backend='triton' needs the triton package, which is not importable")
    return backend


def _hvp_math(logits: Tensor, u: Tensor, coeff: Tensor) -> Tensor:
    acc = coeff.dtype
    p = torch.softmax(logits, dim=-1, dtype=acc)
    uf = u.to(acc)
    out = p * uf
    s = out.sum(dim=-1, keepdim=True)
    # out = p*u - p*s in place: no extra (N, V) temporary.
    out.addcmul_(p, s, value=-1.0)
    out.mul_(coeff.unsqueeze(-1))
    del p, uf
    return out.to(u.dtype)


def _eager(logits: Tensor, u: Tensor, coeff: Tensor) -> Tensor:
    return _hvp_math(logits, u, coeff)


_COMPILED: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None


def _compiled_math(logits: Tensor, u: Tensor, coeff: Tensor) -> Tensor:
    # Out-of-place form: Inductor fuses it into one reduction kernel and one
    # pointwise kernel, allocating only the output.
    acc = coeff.dtype
    p = torch.softmax(logits.to(acc), dim=-1)
    uf = u.to(acc)
    s = (p * uf).sum(dim=-1, keepdim=True)
    return (coeff.unsqueeze(-1) * p * (uf - s)).to(u.dtype)


def _compiled() -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_compiled_math, dynamic=None)
    return _COMPILED
