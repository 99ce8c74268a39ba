"""3D rotary position embedding (SPEC.md section 4).

A head vector of size D has P = D/2 rotary pairs in the "rotate-half" layout: pair j rotates
``(x[j], x[j+P])`` by angle a_j. The pairs are cut into three contiguous segments for the
t, h and w axes of sizes P - 2(P//3), P//3, P//3 [ours]; in a segment of n pairs, pair k
has frequency theta^(-k/n) and a_j = (that axis's integer grid position) * frequency.
"""

from __future__ import annotations

import torch


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


rope_3d = rope_3d_ref
rope_3d_qk = rope_3d_qk_ref
