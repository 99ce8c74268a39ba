"""Tubelet embed and unembed: the encoder's first Linear and the decoder's head.

docs/design.md section 4: the embed is ``patchify(x) @ W.T + b`` and the head is
``unpatchify(h @ W.T + b)``, with patchify
``rearrange(x, "b c (t q) (h p1) (w p2) -> b (t h w) (q p1 p2 c)")``. Images ``(B, 3, H, W)``
are videos with T = 1 and q = 1.

The fused versions never materialise the patch matrix. Both are GEMMs whose one side is
the pixel tensor read (or written) through the patchify index map, and that map is
separable: the element (token m, feature k) of ``patchify(x)`` sits at
``row_offset[m] + col_offset[k]`` in x's storage, with
``row_offset[(b, t, h, w)] = b sB + t q sT + h p sH + w p sW`` and
``col_offset[(i, j, l, c)] = i sT + j sH + l sW + c sC``. So one GEMM kernel whose operands
are each described by a row-offset and a column-offset vector covers all six products:
the embed's forward (pixels x W^T), its dx (dY x W scattered into pixels) and dW
(dY^T x pixels), and the head's forward (h x W^T scattered into pixels), dh and dW. For a
plain strided matrix the offset vectors are ``arange * stride``. The vectors are tiny
(tokens + features integers) next to the tensors they index.
Every pixel belongs to exactly one tubelet, so the scatters write each pixel once: no
atomics, no zero-fill. The bias gradients are plain reductions in torch.

The weight gradients reduce over every token (M = batch x tokens, thousands to a quarter
million) into a small (d, K) matrix: tiled 128 x 128 that is only (d/128)(K/128) programs
(36 for S/B models) on a GPU with 132 SMs. So their token reduction is split (split-K):
:func:`weight_grad_grid` picks, from the shapes and the SM count alone, how many slices the
tokens are cut into so that the grid has at least two programs per SM; each program sums
its slice into its own fp32 ``(d, K)`` slab of a partial buffer, and ``torch.sum`` over the
slabs finishes it. No atomics, and the split depends only on the shapes and the device, so
the result is bit-for-bit reproducible run to run (as rms_norm's partial buffer).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.flop_counter import register_flop_formula

from ._triton import tl, triton
from .utils import _sm_count, autocast_inputs, check_device, interpreted


def _as_video(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(2) if x.ndim == 4 else x


def patchify(x: torch.Tensor, q: int, p: int) -> torch.Tensor:
    """``(B, C, T, H, W)`` or ``(B, C, H, W)`` -> ``(B, N, q*p*p*C)`` tokens in (t, h, w) order."""
    return rearrange(_as_video(x), "b c (t q) (h p1) (w p2) -> b (t h w) (q p1 p2 c)",
                     q=q, p1=p, p2=p)


def unpatchify(tokens: torch.Tensor, q: int, p: int, T: int, H: int, W: int,
               channels: int = 3) -> torch.Tensor:
    """Exact inverse of :func:`patchify`; returns ``(B, C, T, H, W)``."""
    return rearrange(tokens, "b (t h w) (q p1 p2 c) -> b c (t q) (h p1) (w p2)",
                     t=T // q, h=H // p, w=W // p, q=q, p1=p, p2=p, c=channels)


def tubelet_embed_ref(x, weight, bias, q: int, p: int) -> torch.Tensor:
    """Plain-PyTorch reference: ``patchify(x) @ weight.T + bias`` -> ``(B, N, d)``."""
    return F.linear(patchify(x, q, p), weight, bias)


def tubelet_unembed_ref(h, weight, bias, q: int, p: int, T: int, H: int, W: int) -> torch.Tensor:
    """Plain-PyTorch reference: ``unpatchify(h @ weight.T + bias)`` -> ``(B, C, T, H, W)``."""
    channels = weight.shape[0] // (q * p * p)
    return unpatchify(F.linear(h, weight, bias), q, p, T, H, W, channels)


@triton.jit
def _tile_offsets(ROW, COL, s0, s1, r, c, n_r, n_c, GATHER: tl.constexpr):
    """Offsets of an operand's (r, c) tile. The pixel operand (GATHER) reads them from its
    offset vectors (indices clamped in range; the caller masks the element access). A
    strided operand computes them from its strides, from the raw indices, so Triton sees
    the unit stride and vectorises the loads."""
    if GATHER:
        ro = tl.load(ROW + tl.minimum(r, n_r - 1))
        co = tl.load(COL + tl.minimum(c, n_c - 1))
    else:
        ro = r.to(tl.int64) * s0
        co = c.to(tl.int64) * s1
    return ro[:, None] + co[None, :]


@triton.jit
def _offset_gemm(A, A_ROW, A_COL, sa0, sa1, B, B_ROW, B_COL, sb0, sb1,
                 C, C_ROW, C_COL, sc0, sc1, BIAS, M, N, K, K_CHUNK, sc_split,
                 A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, C_SCATTER: tl.constexpr,
                 HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``C[m, n] = sum_k A[m, k] B[k, n] (+ bias[n])`` with fp32 accumulation; each operand
    is strided or, for the pixel tensor, addressed through (row, col) offset vectors.

    Split-K: program (i, j, s) sums k in ``[s K_CHUNK, (s + 1) K_CHUNK)`` (K_CHUNK a multiple
    of BLOCK_K, so a tile never straddles two slices) into slab s of C, ``sc_split``
    elements apart; one slice (K_CHUNK >= K, grid axis 2 of size 1) is the plain GEMM."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = tl.program_id(2) * K_CHUNK
    C += tl.program_id(2).to(tl.int64) * sc_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, tl.minimum(k_lo + K_CHUNK, K), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(A + _tile_offsets(A_ROW, A_COL, sa0, sa1, rm, rk, M, K, A_GATHER),
                    mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0)
        b = tl.load(B + _tile_offsets(B_ROW, B_COL, sb0, sb1, rk, rn, K, N, B_GATHER),
                    mask=(rk < K)[:, None] & (rn < N)[None, :], other=0.0)
        if UPCAST:
            # Triton's CPU interpreter mis-computes tl.dot on bf16 operands; bf16 x bf16
            # products are exact in fp32, so the upcast computes the same sum.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:  # fp32 operands: full fp32 products, as torch's fp32 matmul (no TF32)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(C + _tile_offsets(C_ROW, C_COL, sc0, sc1, rm, rn, M, N, C_SCATTER),
             acc.to(C.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


class _Operand(NamedTuple):
    """A GEMM operand: the tensor, and how element (i, j) is found in it — through the
    offset vectors ``rows[i] + cols[j]`` (``gather``, the pixel tensor) or the strides
    ``i * s0 + j * s1``. Unused fields hold placeholders the kernel never reads."""
    tensor: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    s0: int
    s1: int
    gather: bool


def _strided(t: torch.Tensor, transpose: bool = False) -> _Operand:
    """A 2-D matrix (or its transpose) read through its strides."""
    s0, s1 = t.stride()[::-1] if transpose else t.stride()
    return _Operand(t, t, t, s0, s1, False)


def _pixels(x: torch.Tensor, q: int, p: int, transpose: bool = False) -> _Operand:
    """``patchify(x)`` (or its transpose) read in place from x's storage."""
    rows, cols = _pixel_offsets(x, q, p)
    return _Operand(x, cols, rows, 0, 0, True) if transpose else _Operand(x, rows, cols, 0, 0, True)


def _arange(n, stride, device):
    return torch.arange(n, device=device, dtype=torch.int64) * stride


def _pixel_offsets(x: torch.Tensor, q: int, p: int):
    """Row (token) and column (feature) offsets of ``patchify(x)`` inside x's storage."""
    B, C, T, H, W = x.shape
    sB, sC, sT, sH, sW = x.stride()
    dev = x.device
    rows = (_arange(B, sB, dev)[:, None, None, None] + _arange(T // q, q * sT, dev)[:, None, None]
            + _arange(H // p, p * sH, dev)[:, None] + _arange(W // p, p * sW, dev)).reshape(-1)
    cols = (_arange(q, sT, dev)[:, None, None, None] + _arange(p, sH, dev)[:, None, None]
            + _arange(p, sW, dev)[:, None] + _arange(C, sC, dev)).reshape(-1)
    return rows, cols


class GemmGrid(NamedTuple):
    """A GEMM launch: tile sizes, tiles along the output's rows and columns, and the split of
    the reduction (``splits`` slices of ``chunk`` indices). ``programs`` is the grid size."""
    block_m: int
    block_n: int
    block_k: int
    tiles_m: int
    tiles_n: int
    splits: int
    chunk: int

    @property
    def programs(self) -> int:
        return self.tiles_m * self.tiles_n * self.splits


def _blocks(interpreted: bool, ieee: bool):
    if interpreted:  # few large programs (see utils.py)
        return 64, 64, 64
    return 128, 128, (32 if ieee else 64)


def gemm_grid(M: int, N: int, K: int, *, min_programs: int = 1, interpreted: bool = False,
              ieee: bool = False) -> GemmGrid:
    """The launch of an (M, K) @ (K, N) GEMM: 128 x 128 tiles on a GPU (64 in the
    interpreter), and the reduction split into enough slices that the grid has at least
    ``min_programs`` programs, while every slice keeps at least one BLOCK_K step. Pure:
    depends on its arguments only (hence deterministic run to run)."""
    bm, bn, bk = _blocks(interpreted, ieee)
    tiles_m, tiles_n = triton.cdiv(M, bm), triton.cdiv(N, bn)
    k_blocks = max(1, triton.cdiv(K, bk))
    want = max(1, triton.cdiv(min_programs, tiles_m * tiles_n))
    # slices of a whole number of BLOCK_K steps, floor-divided so there are >= `want`
    chunk_blocks = max(1, k_blocks // want)
    splits = triton.cdiv(k_blocks, chunk_blocks)
    return GemmGrid(bm, bn, bk, tiles_m, tiles_n, splits, chunk_blocks * bk)


def weight_grad_grid(out_rows: int, out_cols: int, tokens: int, *, sm_count: int,
                     interpreted: bool = False, ieee: bool = False) -> GemmGrid:
    """The launch of a tubelet weight gradient ``(out_rows, out_cols) = sum over tokens``: at
    least two programs per SM (four programs in the interpreter, where each costs Python
    time). E.g. S-B/16's embed dW (768 x 768) at batch 8 (2048 tokens) on a 132-SM H100:
    36 tiles x 8 slices = 288 programs."""
    target = 4 if interpreted else 2 * sm_count
    return gemm_grid(out_rows, out_cols, tokens, min_programs=target, interpreted=interpreted,
                     ieee=ieee)


def _launch(a: _Operand, b: _Operand, c: _Operand, M: int, N: int, K: int, grid: GemmGrid,
            bias=None, sc_split: int = 0):
    interp = interpreted(c.tensor)
    ieee = interp or a.tensor.dtype == torch.float32
    warps, stages = (4, 1) if interp else (8, 3)
    _offset_gemm[(grid.tiles_m, grid.tiles_n, grid.splits)](
        *a[:5], *b[:5], *c[:5], bias if bias is not None else c.tensor, M, N, K, grid.chunk,
        sc_split, A_GATHER=a.gather, B_GATHER=b.gather, C_SCATTER=c.gather,
        HAS_BIAS=bias is not None, UPCAST=interp, IEEE=ieee, BLOCK_M=grid.block_m,
        BLOCK_N=grid.block_n, BLOCK_K=grid.block_k, num_warps=warps, num_stages=stages)


def _gemm(a: _Operand, b: _Operand, c: _Operand, M: int, N: int, K: int, bias=None):
    """``c = a @ b (+ bias)``: (M, K) @ (K, N) -> (M, N), one program per output tile."""
    interp = interpreted(c.tensor)
    if M and N:
        grid = gemm_grid(M, N, K, interpreted=interp, ieee=interp or a.tensor.dtype == torch.float32)
        _launch(a, b, c, M, N, K, grid._replace(splits=1, chunk=max(K, 1)), bias)
    return c.tensor


def _weight_grad(a: _Operand, b: _Operand, dw: torch.Tensor, M: int, N: int, K: int):
    """``dw = a @ b`` for a weight gradient, (M, K) @ (K, N) with K the (long) token axis:
    split-K into fp32 slabs, summed in a fixed order (see the module docstring)."""
    interp = interpreted(dw)
    ieee = interp or a.tensor.dtype == torch.float32
    sms = 0 if interp else _sm_count(dw.device.index if dw.device.index is not None
                                     else torch.cuda.current_device())
    grid = weight_grad_grid(M, N, K, sm_count=sms, interpreted=interp, ieee=ieee)
    if grid.splits == 1:
        return _gemm(a, b, _strided(dw), M, N, K)
    partial = torch.empty((grid.splits, M, N), dtype=torch.float32, device=dw.device)
    _launch(a, b, _strided(partial[0]), M, N, K, grid, sc_split=partial.stride(0))
    return torch.sum(partial, 0, out=dw) if dw.dtype == torch.float32 else dw.copy_(partial.sum(0))


def _tokens(video_shape, q: int, p: int) -> int:
    B, _, T, H, W = video_shape
    return B * (T // q) * (H // p) * (W // p)


# -- the custom ops (torch.library): fake impls for compile/export, autograd registered ------
#
# One op per product, so the backward computes only the gradients autograd asks for (the
# encoder's pixels usually need none). The bias gradients are torch reductions.


@torch.library.custom_op("vitok::tubelet_embed", mutates_args=())
def _embed_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, q: int,
              p: int) -> torch.Tensor:
    check_device(x, weight)
    _check_embed(x, weight, bias, q, p)
    _check_dtypes("tubelet_embed", x, weight, bias)
    video = _as_video(x)
    d, K = weight.shape
    M = _tokens(video.shape, q, p)
    out = torch.empty((M, d), dtype=x.dtype, device=x.device)
    # out (M, d) = patches (M, K) @ W^T (K, d) + b
    _gemm(_pixels(video, q, p), _strided(weight, transpose=True), _strided(out), M, d, K, bias)
    return out.view(video.shape[0], M // video.shape[0], d)


@torch.library.custom_op("vitok::tubelet_embed_dx", mutates_args=())
def _embed_dx_op(dy: torch.Tensor, weight: torch.Tensor, x_shape: list[int], q: int,
                 p: int) -> torch.Tensor:
    """d pixels: d patches (M, K) = dy (M, d) @ W (d, K), scattered into the pixels."""
    check_device(dy, weight)
    d, K = weight.shape
    dy2 = dy.reshape(-1, d)
    dx = torch.empty(x_shape, dtype=dy.dtype, device=dy.device)
    _gemm(_strided(dy2), _strided(weight), _pixels(_as_video(dx), q, p), dy2.shape[0], K, d)
    return dx


@torch.library.custom_op("vitok::tubelet_embed_dweight", mutates_args=())
def _embed_dweight_op(dy: torch.Tensor, x: torch.Tensor, q: int, p: int) -> torch.Tensor:
    """dW (d, K) = dy^T (d, M) @ patches (M, K), split-K over the tokens."""
    check_device(dy, x)
    video = _as_video(x)
    d, K = dy.shape[-1], q * p * p * video.shape[1]
    dy2 = dy.reshape(-1, d)
    dw = torch.empty((d, K), dtype=x.dtype, device=x.device)
    return _weight_grad(_strided(dy2, transpose=True), _pixels(video, q, p), dw, d, K, dy2.shape[0])


@torch.library.custom_op("vitok::tubelet_unembed", mutates_args=())
def _unembed_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, q: int, p: int,
                T: int, H: int, W: int) -> torch.Tensor:
    check_device(h, weight)
    _check_unembed(h, weight, bias, q, p, T, H, W)
    _check_dtypes("tubelet_unembed", h, weight, bias)
    K, d = weight.shape
    h2 = h.reshape(-1, d)
    out = torch.empty((h.shape[0], K // (q * p * p), T, H, W), dtype=h.dtype, device=h.device)
    # patches (M, K) = h (M, d) @ W^T (d, K) + b, written into pixels
    _gemm(_strided(h2), _strided(weight, transpose=True), _pixels(out, q, p), h2.shape[0], K, d, bias)
    return out


@torch.library.custom_op("vitok::tubelet_unembed_dh", mutates_args=())
def _unembed_dh_op(dpix: torch.Tensor, weight: torch.Tensor, q: int, p: int) -> torch.Tensor:
    """dh (M, d) = d patches (M, K) @ W (K, d), reading dpix through any strides."""
    check_device(dpix, weight)
    K, d = weight.shape
    M = _tokens(dpix.shape, q, p)
    dh = torch.empty((M, d), dtype=dpix.dtype, device=dpix.device)
    _gemm(_pixels(dpix, q, p), _strided(weight), _strided(dh), M, d, K)
    return dh.view(dpix.shape[0], M // dpix.shape[0], d)


@torch.library.custom_op("vitok::tubelet_unembed_dweight", mutates_args=())
def _unembed_dweight_op(dpix: torch.Tensor, h: torch.Tensor, q: int, p: int) -> torch.Tensor:
    """dW (K, d) = d patches^T (K, M) @ h (M, d), split-K over the tokens."""
    check_device(dpix, h)
    d, K = h.shape[-1], q * p * p * dpix.shape[1]
    h2 = h.reshape(-1, d)
    dw = torch.empty((K, d), dtype=h.dtype, device=h.device)
    return _weight_grad(_pixels(dpix, q, p, transpose=True), _strided(h2), dw, K, d, h2.shape[0])


@_embed_op.register_fake
def _(x, weight, bias, q, p):
    video = _as_video(x)
    N = _tokens(video.shape, q, p) // video.shape[0]
    return x.new_empty((video.shape[0], N, weight.shape[0]))


@_embed_dx_op.register_fake
def _(dy, weight, x_shape, q, p):
    return dy.new_empty(x_shape)


@_embed_dweight_op.register_fake
def _(dy, x, q, p):
    return x.new_empty((dy.shape[-1], q * p * p * x.shape[1]))


@_unembed_op.register_fake
def _(h, weight, bias, q, p, T, H, W):
    return h.new_empty((h.shape[0], weight.shape[0] // (q * p * p), T, H, W))


@_unembed_dh_op.register_fake
def _(dpix, weight, q, p):
    return dpix.new_empty((dpix.shape[0], _tokens(dpix.shape, q, p) // dpix.shape[0], weight.shape[1]))


@_unembed_dweight_op.register_fake
def _(dpix, h, q, p):
    return h.new_empty((q * p * p * dpix.shape[1], h.shape[-1]))


def _save_tubelet(ctx, inputs, output):
    """Both ops save their activation (pixels x, or tokens h) and the weight."""
    activation, weight, bias, q, p = inputs[:5]
    ctx.save_for_backward(activation, weight)
    ctx.meta = (q, p, bias is not None)


def _embed_grad(ctx, dy):
    x, weight = ctx.saved_tensors
    q, p, has_bias = ctx.meta
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.vitok.tubelet_embed_dx(dy, weight, x.shape, q, p)
    if ctx.needs_input_grad[1]:
        dw = torch.ops.vitok.tubelet_embed_dweight(dy, x, q, p)
    if has_bias and ctx.needs_input_grad[2]:
        db = dy.reshape(-1, dy.shape[-1]).sum(0, dtype=torch.float32).to(weight.dtype)
    return dx, dw, db, None, None


def _unembed_grad(ctx, dpix):
    h, weight = ctx.saved_tensors
    q, p, has_bias = ctx.meta
    dh = dw = db = None
    if ctx.needs_input_grad[0]:
        dh = torch.ops.vitok.tubelet_unembed_dh(dpix, weight, q, p)
    if ctx.needs_input_grad[1]:
        dw = torch.ops.vitok.tubelet_unembed_dweight(dpix, h, q, p)
    if has_bias and ctx.needs_input_grad[2]:
        B, C, T, H, W = dpix.shape
        per_feature = dpix.reshape(B, C, T // q, q, H // p, p, W // p, p).sum(
            (0, 2, 4, 6), dtype=torch.float32)  # (C, q, p, p)
        db = per_feature.permute(1, 2, 3, 0).reshape(-1).to(weight.dtype)
    return dh, dw, db, None, None, None, None, None


_embed_op.register_autograd(_embed_grad, setup_context=_save_tubelet)
_unembed_op.register_autograd(_unembed_grad, setup_context=_save_tubelet)


# FLOP formulas (2 x MACs, torch's convention), so FlopCounterMode counts the fused path as
# it counts the reference path's F.linear (addmm) and its backward matmuls: every product
# is (tokens M) x (patch dim K) x (width d), whatever the layout of its operands.
def _gemm_flops(tokens_shape, weight_shape) -> int:
    tokens = 1
    for s in tokens_shape:
        tokens *= s
    return 2 * tokens * weight_shape[0] * weight_shape[1]


@register_flop_formula(torch.ops.vitok.tubelet_embed)
def _(x_shape, w_shape, *args, out_shape, **kwargs) -> int:
    return _gemm_flops(out_shape[:-1], w_shape)


@register_flop_formula([torch.ops.vitok.tubelet_embed_dx, torch.ops.vitok.tubelet_unembed])
def _(tokens_shape, w_shape, *args, **kwargs) -> int:  # dy (B, N, d) or h (B, N, d)
    return _gemm_flops(tokens_shape[:-1], w_shape)


@register_flop_formula(torch.ops.vitok.tubelet_embed_dweight)
def _(dy_shape, x_shape, *args, out_shape, **kwargs) -> int:  # dW (d, K)
    return _gemm_flops(dy_shape[:-1], out_shape)


@register_flop_formula(torch.ops.vitok.tubelet_unembed_dh)
def _(dpix_shape, w_shape, *args, out_shape, **kwargs) -> int:  # dh (B, N, d)
    return _gemm_flops(out_shape[:-1], w_shape)


@register_flop_formula(torch.ops.vitok.tubelet_unembed_dweight)
def _(dpix_shape, h_shape, *args, out_shape, **kwargs) -> int:
    return _gemm_flops(h_shape[:-1], out_shape)


def _check_dtypes(name, x, weight, bias):
    dtypes = {x.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1:
        raise ValueError(f"{name} expects input, weight and bias of one dtype (as F.linear), got "
                         f"{x.dtype}, {weight.dtype}{f', {bias.dtype}' if bias is not None else ''}")


def _check_embed(x, weight, bias, q, p):
    if x.ndim not in (4, 5):
        raise ValueError(f"tubelet_embed expects pixels (B, C, H, W) or (B, C, T, H, W), "
                         f"got shape {tuple(x.shape)}")
    video = _as_video(x)
    _, C, T, H, W = video.shape
    if T % q or H % p or W % p or min(T, H, W) == 0:
        raise ValueError(f"tubelet_embed expects T divisible by q={q} and H, W by p={p}, "
                         f"got (T, H, W) = {(T, H, W)}")
    if weight.ndim != 2 or weight.shape[1] != q * p * p * C:
        raise ValueError(f"tubelet_embed expects weight (d, q*p*p*C) = (d, {q * p * p * C}), "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"tubelet_embed expects bias ({weight.shape[0]},), got {tuple(bias.shape)}")


def tubelet_embed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  q: int, p: int) -> torch.Tensor:
    """Fused ``patchify(x) @ weight.T + bias`` -> ``(B, N, d)``, reading pixels in place."""
    check_device(x, weight)
    _check_embed(x, weight, bias, q, p)
    x, weight, bias = autocast_inputs(x, weight, bias)
    _check_dtypes("tubelet_embed", x, weight, bias)
    return torch.ops.vitok.tubelet_embed(x, weight, bias, q, p)


def _check_unembed(h, weight, bias, q, p, T, H, W):
    K = weight.shape[0]
    tokens = (T // q) * (H // p) * (W // p)
    if T % q or H % p or W % p or K % (q * p * p) or tokens == 0:
        raise ValueError(f"tubelet_unembed expects T divisible by q={q}, H and W by p={p} and "
                         f"weight rows a multiple of q*p*p={q * p * p}, got (T, H, W) = {(T, H, W)} "
                         f"and weight {tuple(weight.shape)}")
    if h.shape[-1] != weight.shape[1] or h.ndim != 3 or h.shape[1] != tokens:
        raise ValueError(f"tubelet_unembed expects h (B, {tokens}, {weight.shape[1]}) for "
                         f"(T, H, W) = {(T, H, W)}, got {tuple(h.shape)}")
    if bias is not None and tuple(bias.shape) != (K,):
        raise ValueError(f"tubelet_unembed expects bias ({K},), got {tuple(bias.shape)}")


def tubelet_unembed(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    q: int, p: int, T: int, H: int, W: int) -> torch.Tensor:
    """Fused ``unpatchify(h @ weight.T + bias)`` -> ``(B, C, T, H, W)``, written in place."""
    check_device(h, weight)
    _check_unembed(h, weight, bias, q, p, T, H, W)
    h, weight, bias = autocast_inputs(h, weight, bias)
    _check_dtypes("tubelet_unembed", h, weight, bias)
    return torch.ops.vitok.tubelet_unembed(h, weight, bias, q, p, T, H, W)
