"""The one dispatch layer between the model and vitok_fast.kernels.

Each op takes ``use_kernels``: when True, the tensor is fp32, bf16 or fp16, and Triton can run
on its device (CUDA, or the CPU under ``TRITON_INTERPRET=1``), the fused kernel runs;
otherwise the plain-PyTorch reference does. The reference path is what every kernel is
checked against. Where Triton is not installed at all, ``use_kernels=True`` means the
reference, and the first op to fall back says so in one warning per process. The fused ops
are ``torch.ops.vitok.*`` custom ops (kernels/*.py), so the choice made here is all that
torch.compile and torch.export see of it: one op node, or the reference's ATen ops. On the
meta device (shape-only runs: bench/roofline.py) the kernel path runs those ops' fake
implementations.
"""

from __future__ import annotations

import os
import warnings

import torch

from vitok_fast import kernels as K

_warned_no_triton = False


def triton_can_run(t: torch.Tensor) -> bool:
    """True where a Triton kernel can run on ``t``'s device."""
    if not K.HAS_TRITON:
        return False
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _no_triton_warning() -> None:
    global _warned_no_triton
    if not _warned_no_triton:
        _warned_no_triton = True
        warnings.warn("use_kernels=True but Triton is not installed: running the plain-PyTorch "
                      "reference ops (same results, slower); pip install triton for the fused "
                      "kernels, or pass use_kernels=False to silence this", stacklevel=3)


# The kernels compute in fp32 and serve the training dtypes; a float64 model (used by
# tests as an exact reference) runs the float64 reference maths instead of silently
# dropping to fp32.
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fused(use_kernels: bool, t: torch.Tensor) -> bool:
    """On the meta device (shape-only runs) the kernel path is its custom ops' fake
    implementations, so a trace sees each fused op as the one ``vitok::`` op it is."""
    if use_kernels and not K.HAS_TRITON:
        _no_triton_warning()
        return False
    return use_kernels and t.dtype in _KERNEL_DTYPES and (triton_can_run(t) or t.is_meta)


def rms_norm(x, weight, eps, use_kernels):
    return (K.rms_norm if _fused(use_kernels, x) else K.rms_norm_ref)(x, weight, eps)


def add_rms_norm(x, residual, weight, eps, use_kernels):
    """``(rms_norm(x + residual), x + residual)``: the pre-norm block's fused residual add."""
    return (K.add_rms_norm if _fused(use_kernels, x) else K.add_rms_norm_ref)(x, residual, weight, eps)


def swiglu(gate, up, use_kernels):
    return (K.swiglu if _fused(use_kernels, gate) else K.swiglu_ref)(gate, up)


def swiglu_packed(gate_up, use_kernels):
    """SwiGLU on the packed ``w13`` output ``(..., 2h)``: gate first, then up."""
    return (K.swiglu_packed if _fused(use_kernels, gate_up) else K.swiglu_packed_ref)(gate_up)


def rope_3d_qk(q, k, cos, sin, use_kernels):
    return (K.rope_3d_qk if _fused(use_kernels, q) else K.rope_3d_qk_ref)(q, k, cos, sin)


def tubelet_embed(x, weight, bias, q, p, use_kernels):
    return (K.tubelet_embed if _fused(use_kernels, x) else K.tubelet_embed_ref)(x, weight, bias, q, p)


def tubelet_unembed(h, weight, bias, q, p, T, H, W, use_kernels):
    fn = K.tubelet_unembed if _fused(use_kernels, h) else K.tubelet_unembed_ref
    return fn(h, weight, bias, q, p, T, H, W)
