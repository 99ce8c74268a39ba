"""Fused ops for ViTok, installed as ``vitok_fast.kernels``.

One file per op (Liger-Kernel style), each holding its Triton forward and backward kernels,
their registration as ``torch.library`` custom ops in the ``vitok`` namespace (a fake
implementation for torch.compile and torch.export, the backward registered with
``register_autograd``; see docs/kernels.md, "Custom ops"), the public entry point the kernel path
calls, and a plain-PyTorch reference (``*_ref``) that the model's ``use_kernels=False`` path
calls and every test checks against. Kernels run on CUDA, or on CPU under TRITON_INTERPRET=1.
Without Triton installed the package still imports: the references work, and a fused
function raises a clear error (``HAS_TRITON`` says which; see _triton.py).
"""

from ._triton import HAS_TRITON

from .rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from .rope import rope_3d, rope_3d_qk, rope_3d_qk_ref, rope_3d_ref, rope_angles, rope_cos_sin, rope_split
from .swiglu import swiglu, swiglu_packed, swiglu_packed_ref, swiglu_ref
from .tubelet import (patchify, tubelet_embed, tubelet_embed_ref, tubelet_unembed,
                      tubelet_unembed_ref, unpatchify)

__all__ = [
    "HAS_TRITON", "add_rms_norm", "add_rms_norm_ref", "patchify", "rms_norm", "rms_norm_ref", "rope_3d",
    "rope_3d_qk", "rope_3d_qk_ref", "rope_3d_ref", "rope_angles", "rope_cos_sin", "rope_split",
    "swiglu", "swiglu_packed", "swiglu_packed_ref", "swiglu_ref", "tubelet_embed", "tubelet_embed_ref", "tubelet_unembed",
    "tubelet_unembed_ref", "unpatchify",
]
