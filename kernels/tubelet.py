"""Tubelet embed and unembed: the encoder's first Linear and the decoder's head.

SPEC.md section 4: the embed is ``patchify(x) @ W.T + b`` and the head is
``unpatchify(h @ W.T + b)``, with patchify
``rearrange(x, "b c (t q) (h p1) (w p2) -> b (t h w) (q p1 p2 c)")``. Images ``(B, 3, H, W)``
are videos with T = 1 and q = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


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


# The fused Triton versions arrive with the kernels issue; until then the entry points
# are the references, so the model's kernel path is already exercised end to end.
tubelet_embed = tubelet_embed_ref
tubelet_unembed = tubelet_unembed_ref
