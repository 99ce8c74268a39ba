"""3D rotary position embedding (docs/design.md section 4).

A head vector of size D has P = D/2 rotary pairs in the "rotate-half" layout: pair j rotates
``(x[j], x[j+P])`` by angle a_j. The pairs are cut into three contiguous segments for the
t, h and w axes of sizes P - 2(P//3), P//3, P//3 [ours]; in a segment of n pairs, pair k
has frequency theta^(-k/n) and a_j = (that axis's integer grid position) * frequency.

The kernel reads q and k where they lie: in the model they are permuted views
``(B, H, N, D)`` of the packed qkv projection ``(B, N, 3, H, D)`` (no unit stride but the
last), and it takes any strides for the first three dims, so no ``.contiguous()`` copy is
made. It writes the rotated heads contiguous ``(B, H, N, D)``, the layout
``F.scaled_dot_product_attention`` reads best. One launch covers q and k (grid axis 1).
The backward is the inverse rotation (the same kernel with ``sin`` negated), applied to
dq and dk in one launch.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton
from .utils import check_device, interpreted


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Rotary pairs given to the (t, h, w) axes."""
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
                device=None, dtype=torch.float32) -> torch.Tensor:
    """Angles ``(N, P)`` for a (T', H', W') token grid in (t, h, w) raster order."""
    T, H, W = grid
    positions = torch.stack(torch.meshgrid(
        torch.arange(T, device=device), torch.arange(H, device=device),
        torch.arange(W, device=device), indexing="ij"), dim=-1).reshape(-1, 3).to(dtype)
    segments = []
    for axis, n in enumerate(rope_split(head_dim)):
        freq = theta ** (-torch.arange(n, device=device, dtype=torch.float64) / n)
        segments.append(positions[:, axis, None] * freq.to(dtype))
    return torch.cat(segments, dim=-1)


def rope_cos_sin(grid, head_dim: int, theta: float = 10000.0, device=None, dtype=torch.float32):
    """``cos, sin`` tables ``(N, P)`` for :func:`rope_3d` (fp32 in the model)."""
    angles = rope_angles(grid, head_dim, theta, device, dtype)
    return angles.cos(), angles.sin()


def rope_3d_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch reference on ``x (..., N, D)`` with ``cos, sin (N, D/2)``; math in fp32
    (fp64 for fp64 inputs)."""
    pairs = x.shape[-1] // 2
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xf[..., :pairs], xf[..., pairs:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rope_3d_qk_ref(q, k, cos, sin):
    """Reference for rotating q and k together (the kernel does both in one launch)."""
    return rope_3d_ref(q, cos, sin), rope_3d_ref(k, cos, sin)


@triton.jit
def _rope_tile(X, Y, COS, SIN, r0, R, H, N, P, sxb, sxh, sxn, syb, syh, syn,
               BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    # A tile is BLOCK_R rows of the flattened (b, h, n) index by all P pairs; each row's
    # address comes from its own (b, h, n), so any strides of the first three dims work.
    rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
    pairs = tl.arange(0, BLOCK_P)
    mask = (rows < R)[:, None] & (pairs < P)[None, :]
    n = rows % N
    h = (rows // N) % H
    b = rows // (N * H)
    x_ptr = X + (b * sxb + h * sxh + n * sxn)[:, None] + pairs[None, :]
    y_ptr = Y + (b * syb + h * syh + n * syn)[:, None] + pairs[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + P, mask=mask, other=0.0).to(tl.float32)
    cs_off = n[:, None] * P + pairs[None, :]
    cos = tl.load(COS + cs_off, mask=mask, other=0.0)
    sin = tl.load(SIN + cs_off, mask=mask, other=0.0)
    tl.store(y_ptr, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + P, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_qk(Q, K, QO, KO, COS, SIN, R, H, N, P, sqb, sqh, sqn, skb, skh, skn, sob, soh, son,
             BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    r0 = tl.program_id(0) * BLOCK_R
    if tl.program_id(1) == 0:
        _rope_tile(Q, QO, COS, SIN, r0, R, H, N, P, sqb, sqh, sqn, sob, soh, son,
                   BLOCK_R, BLOCK_P)
    else:
        _rope_tile(K, KO, COS, SIN, r0, R, H, N, P, skb, skh, skn, sob, soh, son,
                   BLOCK_R, BLOCK_P)


def _as_bhnd(x: torch.Tensor) -> torch.Tensor:
    """``(..., N, D)`` as a 4-D ``(B, H, N, D)`` view with a unit last stride."""
    if x.stride(-1) != 1:
        x = x.contiguous()  # deliberate: the kernel needs unit stride between pair halves
    while x.ndim < 4:
        x = x.unsqueeze(0)
    if x.ndim > 4:
        x = x.reshape(-1, *x.shape[-3:])  # copies only if the leading dims do not flatten
    return x


def _rotate(q, k, cos, sin):
    """Rotate q (and k, if given) in one launch; returns contiguous outputs of q's shape."""
    check_device(*(t for t in (q, k, cos, sin) if t is not None))
    q4 = _as_bhnd(q)
    k4 = _as_bhnd(k) if k is not None else q4
    B, H, N, D = q4.shape
    P = D // 2
    qo = torch.empty(q4.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(q4.shape, dtype=q.dtype, device=q.device) if k is not None else qo
    block_p = triton.next_power_of_2(P)
    R = B * H * N
    cap = (1 << 16) if interpreted(q) else 2048
    block_r = triton.next_power_of_2(max(1, min(R, cap // block_p)))
    grid = (triton.cdiv(R, block_r), 2 if k is not None else 1)
    cos, sin = cos.contiguous(), sin.contiguous()
    if R:
        _rope_qk[grid](q4, k4, qo, ko, cos, sin, R, H, N, P, *q4.stride()[:3], *k4.stride()[:3],
                       *qo.stride()[:3], BLOCK_R=block_r, BLOCK_P=block_p, num_warps=4)
    return qo.view(q.shape), (ko.view(q.shape) if k is not None else None)


# -- the custom ops (torch.library): fake impls for compile/export, autograd registered ------
#
# The backward is the inverse rotation: the same op with ``sin`` negated (a (N, D/2) table).
# cos and sin are constants of the token grid and get no gradient.


@torch.library.custom_op("vitok::rope_3d", mutates_args=())
def _rope_3d_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    _check(x, cos, sin, "x")
    return _rotate(x, None, cos, sin)[0]


@torch.library.custom_op("vitok::rope_3d_qk", mutates_args=())
def _rope_3d_qk_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_qk(q, k, cos, sin)
    return _rotate(q, k, cos, sin)


@_rope_3d_op.register_fake
def _(x, cos, sin):
    return x.new_empty(x.shape)


@_rope_3d_qk_op.register_fake
def _(q, k, cos, sin):
    return q.new_empty(q.shape), q.new_empty(q.shape)


def _save_tables(ctx, inputs, output):
    ctx.save_for_backward(*inputs[-2:])


def _rope_3d_grad(ctx, dy):
    cos, sin = ctx.saved_tensors
    return torch.ops.vitok.rope_3d(dy, cos, -sin), None, None


def _rope_3d_qk_grad(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    return (*torch.ops.vitok.rope_3d_qk(dq, dk, cos, -sin), None, None)


_rope_3d_op.register_autograd(_rope_3d_grad, setup_context=_save_tables)
_rope_3d_qk_op.register_autograd(_rope_3d_qk_grad, setup_context=_save_tables)


def _check(x, cos, sin, name):
    if x.ndim < 2 or x.shape[-1] % 2:
        raise ValueError(f"rope_3d expects {name} of shape (..., N, D) with an even head size D, "
                         f"got {tuple(x.shape)}")
    want = (x.shape[-2], x.shape[-1] // 2)
    for tname, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != want:
            raise ValueError(f"rope_3d expects {tname} of shape (N, D/2) = {want} for {name} of "
                             f"shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise ValueError(f"rope_3d expects fp32 {tname} tables (rope_cos_sin), got {t.dtype}")


def _check_qk(q, k, cos, sin):
    _check(q, cos, sin, "q")
    if k.shape != q.shape or k.dtype != q.dtype:
        raise ValueError(f"rope_3d_qk expects q and k of one shape and dtype, got "
                         f"{tuple(q.shape)} {q.dtype} and {tuple(k.shape)} {k.dtype}")


def rope_3d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Fused 3D RoPE on ``x (..., N, D)`` with fp32 ``cos, sin (N, D/2)``; any strides."""
    check_device(x, cos, sin)
    _check(x, cos, sin, "x")
    return torch.ops.vitok.rope_3d(x, cos, sin)


def rope_3d_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q and k (same shape ``(B, H, N, D)``, any strides) in one launch."""
    check_device(q, k, cos, sin)
    _check_qk(q, k, cos, sin)
    return torch.ops.vitok.rope_3d_qk(q, k, cos, sin)
