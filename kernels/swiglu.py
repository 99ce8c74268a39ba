"""SwiGLU gate (docs/design.md section 4): ``silu(gate) * up``.

The model's MLP computes gate and up with one GEMM (``w13``) into a packed ``(..., 2h)``
tensor; :func:`swiglu_packed` reads that tensor directly (gate = first half, up = second
half) and its backward writes ``d(packed)`` in one buffer, so neither the ``chunk`` nor its
backward's concatenation costs a copy. :func:`swiglu` takes gate and up as two tensors
(any row stride, e.g. the two chunks of the packed tensor) through the same kernels.

Math in fp32, one rounding at the store: with ``s = sigmoid(g)``,
``y = g s u``, ``dg = dy u s (1 + g (1 - s))``, ``du = dy g s``. The backward recomputes
``s`` from the inputs instead of saving the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import tl, triton
from .utils import as_rows, check_device, interpreted


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch reference."""
    return F.silu(gate) * up


def swiglu_packed_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Reference on the packed ``(..., 2h)`` output of ``w13``: gate first, then up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_ref(gate, up)


@triton.jit
def _swiglu_fwd(G, U, Y, M, H, stride_g, stride_u, stride_y,
                BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :]
    mask = (rows < M) & (cols < H)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + rows * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, G, U, DG, DU, M, H, stride_dy, stride_g, stride_u, stride_dg, stride_du,
                BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :]
    mask = (rows < M) & (cols < H)
    dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * g * s
    tl.store(DG + rows * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows * stride_du + cols, du.to(DU.dtype.element_ty), mask=mask)


def _grid(t, M, H):
    block_h = min(triton.next_power_of_2(max(H, 1)), 1024)
    if interpreted(t):  # few large programs (see utils.py)
        block_m = triton.next_power_of_2(max(1, min(M, (1 << 16) // block_h)))
    else:
        block_m = max(1, 4096 // block_h)
    return (triton.cdiv(M, block_m), triton.cdiv(H, block_h)), block_m, block_h


def _fwd(g2, u2):
    M, H = g2.shape
    y = torch.empty((M, H), dtype=g2.dtype, device=g2.device)
    grid, bm, bh = _grid(g2, M, H)
    if M and H:
        _swiglu_fwd[grid](g2, u2, y, M, H, g2.stride(0), u2.stride(0), y.stride(0),
                          BLOCK_M=bm, BLOCK_H=bh, num_warps=4)
    return y


def _bwd(dy2, g2, u2, dg2, du2):
    M, H = g2.shape
    grid, bm, bh = _grid(g2, M, H)
    if M and H:
        _swiglu_bwd[grid](dy2, g2, u2, dg2, du2, M, H, dy2.stride(0), g2.stride(0), u2.stride(0),
                          dg2.stride(0), du2.stride(0), BLOCK_M=bm, BLOCK_H=bh, num_warps=4)


# -- the custom ops (torch.library): fake impls for compile/export, autograd registered ------


@torch.library.custom_op("vitok::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check(gate, up)
    return _fwd(as_rows(gate), as_rows(up)).view(gate.shape)


@torch.library.custom_op("vitok::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dy: torch.Tensor, gate: torch.Tensor,
                        up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_device(dy, gate, up)
    g2, u2 = as_rows(gate), as_rows(up)
    dg2, du2 = (torch.empty(g2.shape, dtype=g2.dtype, device=g2.device) for _ in range(2))
    _bwd(as_rows(dy), g2, u2, dg2, du2)
    return dg2.view(gate.shape), du2.view(gate.shape)


@torch.library.custom_op("vitok::swiglu_packed", mutates_args=())
def _swiglu_packed_op(gate_up: torch.Tensor) -> torch.Tensor:
    _check_packed(gate_up)
    gu = as_rows(gate_up)
    H = gu.shape[1] // 2
    return _fwd(gu[:, :H], gu[:, H:]).view(*gate_up.shape[:-1], H)


@torch.library.custom_op("vitok::swiglu_packed_backward", mutates_args=())
def _swiglu_packed_backward_op(dy: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    check_device(dy, gate_up)
    gu = as_rows(gate_up)
    H = gu.shape[1] // 2
    dgu = torch.empty(gu.shape, dtype=gu.dtype, device=gu.device)
    _bwd(as_rows(dy), gu[:, :H], gu[:, H:], dgu[:, :H], dgu[:, H:])
    return dgu.view(gate_up.shape)


@_swiglu_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@_swiglu_backward_op.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


@_swiglu_packed_op.register_fake
def _(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@_swiglu_packed_backward_op.register_fake
def _(dy, gate_up):
    return gate_up.new_empty(gate_up.shape)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # the backward recomputes sigmoid from the inputs


_swiglu_op.register_autograd(
    lambda ctx, dy: torch.ops.vitok.swiglu_backward(dy, *ctx.saved_tensors), setup_context=_save_inputs)
_swiglu_packed_op.register_autograd(
    lambda ctx, dy: torch.ops.vitok.swiglu_packed_backward(dy, *ctx.saved_tensors),
    setup_context=_save_inputs)


def _check(gate, up):
    check_device(gate, up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu expects gate and up of one shape and dtype, got "
                         f"{tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}")


def _check_packed(gate_up):
    check_device(gate_up)
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu_packed expects an even last dim (gate and up halves), "
                         f"got shape {tuple(gate_up.shape)}")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Fused ``silu(gate) * up`` for any leading shape; gate and up may be strided views."""
    _check(gate, up)
    return torch.ops.vitok.swiglu(gate, up)


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """Fused SwiGLU on the packed ``(..., 2h)`` ``w13`` output -> ``(..., h)``."""
    _check_packed(gate_up)
    return torch.ops.vitok.swiglu_packed(gate_up)
