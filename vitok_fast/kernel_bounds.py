"""Error bounds for the kernel tests, from rounding arguments (not tuned to pass).

Every kernel loads its inputs, upcasts them exactly to fp32, computes in fp32 and rounds
once when it stores. The tests feed the same input values (upcast exactly) to a float64
reference, so a kernel's error has two parts:

* the final store: at most one ulp of the output dtype, relative to the value
  (``STORE_ULP``). On a GPU the store rounds to nearest (half an ulp); Triton's CPU
  interpreter truncates bf16 (measured: about half of all stores differ from
  round-to-nearest), so a full ulp is allowed;
* the fp32 arithmetic before it: a sum of n terms carries at most about n * u32 times the
  sum of the terms' magnitudes (the classic recursive-summation bound; Triton's tree
  reductions do better, log2 n), and each further multiply, divide, exp or sqrt adds a
  few u32 relative. ``fp32_bound(n, scale)`` is ``(n + 8) u32 scale``: n for the
  reduction, 8 for the handful of elementwise ops, ``scale`` the magnitude of the terms.
"""

from __future__ import annotations

import torch

U32 = 2.0 ** -24  # fp32 unit roundoff
STORE_ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# spacing of the dtype's subnormals: below it "relative" has no meaning (fp16 reaches it).
TINY = {torch.float32: 2.0 ** -149, torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24}


def fp32_bound(n_terms: int, scale: float) -> float:
    return (n_terms + 8) * U32 * float(scale)


def assert_within(out: torch.Tensor, ref: torch.Tensor, *, rel: float, abs_, what: str):
    """Elementwise ``|out - ref| <= abs_ + rel |ref|`` (``abs_`` a number or a tensor that
    broadcasts), plus the dtype's subnormal spacing."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    assert out64.shape == ref64.shape, f"{what}: shape {tuple(out64.shape)} != {tuple(ref64.shape)}"
    err = (out64 - ref64).abs()
    bound = abs_ + rel * ref64.abs() + TINY[out.dtype]
    excess = (err - bound).max().item() if err.numel() else 0.0
    abs_max = abs_.max().item() if torch.is_tensor(abs_) else abs_
    assert torch.isfinite(out64).all(), f"{what}: non-finite values"
    assert excess <= 0, (f"{what}: max error {err.max().item():.3e} exceeds the bound "
                         f"(rel {rel:.2e}, abs up to {abs_max:.2e}) by {excess:.3e}")
