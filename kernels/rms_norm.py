"""RMSNorm (SPEC.md section 4): ``F.rms_norm(x, (d,), weight, eps)``, statistics in fp32."""

from __future__ import annotations

import torch


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


rms_norm = rms_norm_ref
add_rms_norm = add_rms_norm_ref
