"""SwiGLU gate (SPEC.md section 4): ``silu(gate) * up``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch reference."""
    return F.silu(gate) * up


swiglu = swiglu_ref
