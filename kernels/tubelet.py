"""Tubelet embed and unembed: the encoder's first Linear and the decoder's head.

SPEC.md section 4: the embed is ``patchify(x) @ W.T + b`` and the head is
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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from einops import rearrange

from .utils import autocast_inputs, check_device, interpreted


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
def _offset_gemm(A, B, C, BIAS, A_ROW, A_COL, B_ROW, B_COL, C_ROW, C_COL, M, N, K,
                 HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``C[m, n] = sum_k A[m, k] B[k, n] (+ bias[n])``, each operand's element (i, j) at
    ``ROW[i] + COL[j]``; fp32 accumulation."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    a_row = tl.load(A_ROW + rm, mask=rm < M, other=0)
    b_col = tl.load(B_COL + rn, mask=rn < N, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a_col = tl.load(A_COL + rk, mask=rk < K, other=0)
        b_row = tl.load(B_ROW + rk, mask=rk < K, other=0)
        a = tl.load(A + a_row[:, None] + a_col[None, :],
                    mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0)
        b = tl.load(B + b_row[:, None] + b_col[None, :],
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
    c_row = tl.load(C_ROW + rm, mask=rm < M, other=0)
    c_col = tl.load(C_COL + rn, mask=rn < N, other=0)
    tl.store(C + c_row[:, None] + c_col[None, :], acc.to(C.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


def _plain(t: torch.Tensor):
    """Row and column offsets of a 2-D strided matrix."""
    return _arange(t.shape[0], t.stride(0), t.device), _arange(t.shape[1], t.stride(1), t.device)


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


def _gemm(a, b, c, out, M, N, K, bias=None):
    """``out = a @ b (+ bias)`` with a, b, out each given as (tensor, row offsets, col offsets)."""
    (A, a_row, a_col), (B, b_row, b_col), (C, c_row, c_col) = a, b, c
    interp = interpreted(C)
    ieee = interp or A.dtype == torch.float32
    if interp:
        bm, bn, bk, warps, stages = 64, 64, 64, 4, 1
    else:
        bm, bn, bk, warps, stages = 128, 128, (32 if ieee else 64), 8, 3
    if M and N:
        grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
        _offset_gemm[grid](A, B, C, bias if bias is not None else C, a_row, a_col, b_row, b_col,
                           c_row, c_col, M, N, K, HAS_BIAS=bias is not None, UPCAST=interp,
                           IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                           num_stages=stages)
    return out


class TubeletEmbedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, q, p):
        video = _as_video(x)
        B, C, T, H, W = video.shape
        d, K = weight.shape
        pix_rows, pix_cols = _pixel_offsets(video, q, p)
        M = pix_rows.numel()
        out = torch.empty((M, d), dtype=x.dtype, device=x.device)
        w_t = (weight, _arange(K, weight.stride(1), x.device), _arange(d, weight.stride(0), x.device))
        _gemm((video, pix_rows, pix_cols), w_t, (out, *_plain(out)), out, M, d, K, bias)
        ctx.save_for_backward(video, weight)
        ctx.meta = (x.shape, q, p, bias is not None)
        return out.view(B, M // B, d)

    @staticmethod
    def backward(ctx, dy):
        video, weight = ctx.saved_tensors
        x_shape, q, p, has_bias = ctx.meta
        d, K = weight.shape
        dy2 = dy.reshape(-1, d)
        M = dy2.shape[0]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty(video.shape, dtype=video.dtype, device=video.device)
            _gemm((dy2, *_plain(dy2)), (weight, *_plain(weight)), (dx, *_pixel_offsets(dx, q, p)),
                  dx, M, K, d)
            dx = dx.view(x_shape)
        if ctx.needs_input_grad[1]:
            dw = torch.empty_like(weight)
            dy_t = (dy2, _arange(d, dy2.stride(1), dy.device), _arange(M, dy2.stride(0), dy.device))
            _gemm(dy_t, (video, *_pixel_offsets(video, q, p)), (dw, *_plain(dw)), dw, d, K, M)
        if has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0, dtype=torch.float32).to(weight.dtype)
        return dx, dw, db, None, None


class TubeletUnembedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, q, p, T, H, W):
        K, d = weight.shape
        C = K // (q * p * p)
        h2 = h.reshape(-1, d)
        M = h2.shape[0]
        B = M // ((T // q) * (H // p) * (W // p))
        out = torch.empty((B, C, T, H, W), dtype=h.dtype, device=h.device)
        w_t = (weight, _arange(d, weight.stride(1), h.device), _arange(K, weight.stride(0), h.device))
        _gemm((h2, *_plain(h2)), w_t, (out, *_pixel_offsets(out, q, p)), out, M, K, d, bias)
        ctx.save_for_backward(h2, weight)
        ctx.meta = (h.shape, q, p, bias is not None)
        return out

    @staticmethod
    def backward(ctx, dpix):
        h2, weight = ctx.saved_tensors
        h_shape, q, p, has_bias = ctx.meta
        K, d = weight.shape
        M = h2.shape[0]
        pix_rows, pix_cols = _pixel_offsets(dpix, q, p)  # any strides of the incoming grad
        dh = dw = db = None
        if ctx.needs_input_grad[0]:
            dh = torch.empty((M, d), dtype=h2.dtype, device=h2.device)
            _gemm((dpix, pix_rows, pix_cols), (weight, *_plain(weight)), (dh, *_plain(dh)),
                  dh, M, d, K)
            dh = dh.view(h_shape)
        if ctx.needs_input_grad[1]:
            dw = torch.empty_like(weight)
            _gemm((dpix, pix_cols, pix_rows), (h2, *_plain(h2)), (dw, *_plain(dw)), dw, K, d, M)
        if has_bias and ctx.needs_input_grad[2]:
            B, C, T, H, W = dpix.shape
            per_feature = dpix.view(B, C, T // q, q, H // p, p, W // p, p).sum(
                (0, 2, 4, 6), dtype=torch.float32)  # (C, q, p, p)
            db = per_feature.permute(1, 2, 3, 0).reshape(-1).to(weight.dtype)
        return dh, dw, db, None, None, None, None, None


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
    return TubeletEmbedFunction.apply(x, weight, bias, q, p)


def tubelet_unembed(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    q: int, p: int, T: int, H: int, W: int) -> torch.Tensor:
    """Fused ``unpatchify(h @ weight.T + bias)`` -> ``(B, C, T, H, W)``, written in place."""
    check_device(h, weight)
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
    h, weight, bias = autocast_inputs(h, weight, bias)
    return TubeletUnembedFunction.apply(h, weight, bias, q, p, T, H, W)
