"""RMSNorm (docs/design.md section 4): ``F.rms_norm(x, (d,), weight, eps)``, statistics in fp32.

Forward: one program normalises a tile of whole rows (the row is the reduction, so a row
never spans programs), keeps ``1/rms`` per row for the backward. The fused residual variant
``add_rms_norm(x, residual)`` also writes ``x + residual`` (the new residual stream) from the
same pass, so a pre-norm block reads the stream once.

Backward, with ``xh = x / rms`` and ``g = weight * dy``:
``dx = (g - xh * mean(xh * g)) / rms`` and ``dweight = sum over rows of dy * xh``.
The weight gradient is reduced without atomics: each of a fixed number of persistent
programs accumulates its rows' ``dy * xh`` in fp32 into its own row of a ``(programs, d)``
buffer, which is then summed by ``torch.sum``. The number of programs depends only on the
device and the shape, so the result is bit-for-bit reproducible run to run.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton
from .utils import as_rows, check_device, num_programs, rows_per_program


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain-PyTorch reference; statistics in fp32 for half-precision inputs (fp64 for fp64)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.to(compute)).to(x.dtype)


def add_rms_norm_ref(x, residual, weight, eps: float = 1e-6):
    """Reference of the fused residual variant: returns ``(rms_norm(x + residual), x + residual)``."""
    summed = x + residual
    return rms_norm_ref(summed, weight, eps), summed


@triton.jit
def _rms_norm_fwd(X, R, W, Y, S, RSTD, M, N, stride_x, stride_r, stride_y, stride_s, eps,
                  HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)[:, None]
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # Normalise the sum as stored (rounded to the stream's dtype), as the unfused
        # ``rms_norm(x + residual)`` does, so the two paths see the same stream.
        summed = x.to(S.dtype.element_ty)
        tl.store(S + rows64 * stride_s + cols[None, :], summed, mask=mask)
        x = summed.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DS, DX, DW_PARTIAL, M, N, stride_dy, stride_x, stride_ds,
                  stride_dx, programs, iters, HAS_DSUM: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # Persistent loop: program `pid` takes row blocks pid, pid + programs, ... (`iters` of
    # them, the last possibly past M: masked)
    for it in range(iters):
        rows = (pid + it * programs) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows64 = rows.to(tl.int64)[:, None]
        mask = (rows < M)[:, None] & col_mask[None, :]
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
        xh = x * rstd[:, None]
        g = dy * w[None, :]
        dx = (g - xh * (tl.sum(xh * g, axis=1) / N)[:, None]) * rstd[:, None]
        if HAS_DSUM:  # gradient arriving at the residual stream output of add_rms_norm
            dx += tl.load(DS + rows64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xh, axis=0)
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=col_mask)


def _check(x, weight, residual=None):
    check_device(x, weight)
    if weight.ndim != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm expects weight of shape ({x.shape[-1]},) matching x's last dim, "
                         f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_rms_norm expects residual of x's shape {tuple(x.shape)}, "
                         f"got {tuple(residual.shape)}")
    if x.shape[-1] > 65536:
        raise ValueError(f"rms_norm kernels hold a row in one block: hidden size <= 65536, got {x.shape[-1]}")


def _forward(x, residual, weight, eps):
    x2 = as_rows(x)
    M, N = x2.shape
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if residual is not None:  # the stream (and the normed output) in the promoted dtype, as x + r
        r2 = as_rows(residual)
        summed = torch.empty((M, N), dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    else:
        r2 = summed = x2  # unused
    y = torch.empty((M, N), dtype=summed.dtype, device=x.device)
    block_n = triton.next_power_of_2(N)
    block_m = min(rows_per_program(x, block_n), triton.next_power_of_2(max(M, 1)))
    if M:
        _rms_norm_fwd[(triton.cdiv(M, block_m),)](
            x2, r2, weight, y, summed, rstd, M, N, x2.stride(0), r2.stride(0), y.stride(0),
            summed.stride(0), eps, HAS_RESIDUAL=residual is not None, BLOCK_M=block_m,
            BLOCK_N=block_n, num_warps=8 if block_n >= 2048 else 4)
    return y.view(x.shape), (summed.view(x.shape) if residual is not None else None), rstd


def _backward(dy, x, weight, rstd, dsum):
    dy2, x2 = as_rows(dy), as_rows(x)
    M, N = x2.shape
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    ds2 = as_rows(dsum) if dsum is not None else dy2
    block_n = triton.next_power_of_2(N)
    block_m = min(rows_per_program(x, block_n), triton.next_power_of_2(max(M, 1)))
    programs = num_programs(x, triton.cdiv(M, block_m))
    dw_partial = torch.zeros((programs, N), dtype=torch.float32, device=x.device)
    if M:
        _rms_norm_bwd[(programs,)](
            dy2, x2, weight, rstd, ds2, dx, dw_partial, M, N, dy2.stride(0), x2.stride(0),
            ds2.stride(0), dx.stride(0), programs, triton.cdiv(triton.cdiv(M, block_m), programs),
            HAS_DSUM=dsum is not None, BLOCK_M=block_m,
            BLOCK_N=block_n, num_warps=8 if block_n >= 2048 else 4)
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


# -- the custom ops (torch.library): fake impls for compile/export, autograd registered ------
#
# vitok::rms_norm and vitok::add_rms_norm also return 1/rms per row (fp32), which the
# backward op reads; the public functions below return only what the unfused maths does.


@torch.library.custom_op("vitok::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, weight)
    y, _, rstd = _forward(x, None, weight, eps)
    return y, rstd


@torch.library.custom_op("vitok::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x, weight, residual)
    return _forward(x, residual, weight, eps)


@torch.library.custom_op("vitok::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          rstd: torch.Tensor, dsum: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    check_device(dy, x, weight)
    return _backward(dy, x, weight, rstd, dsum)


def _rows(x):
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty((_rows(x),), dtype=torch.float32)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype),
            x.new_empty((_rows(x),), dtype=torch.float32))


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, dsum):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _rms_norm_grad(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.vitok.rms_norm_backward(dy, x, weight, rstd, None)
    return dx, dw, None


def _add_rms_norm_setup(ctx, inputs, output):
    x, residual, weight, _ = inputs
    ctx.save_for_backward(output[1], weight, output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.dtypes = (x.dtype, residual.dtype)


def _add_rms_norm_grad(ctx, dy, dsum, _drstd):
    summed, weight, rstd = ctx.saved_tensors
    # The backward kernel adds the stream's own gradient into d(summed), which is then
    # the gradient of both x and residual.
    d, dw = torch.ops.vitok.rms_norm_backward(dy, summed, weight, rstd, dsum)
    dx_dtype, dr_dtype = ctx.dtypes
    return d.to(dx_dtype), d.to(dr_dtype), dw, None


_rms_norm_op.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)
_add_rms_norm_op.register_autograd(_add_rms_norm_grad, setup_context=_add_rms_norm_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Fused RMSNorm over the last dim of ``x`` (any leading shape), fp32 statistics."""
    _check(x, weight)
    return torch.ops.vitok.rms_norm(x, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` in one pass over the residual stream."""
    _check(x, weight, residual)
    y, summed, _ = torch.ops.vitok.add_rms_norm(x, residual, weight, eps)
    return y, summed
