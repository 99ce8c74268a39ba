"""Error bounds for the fused kernels against a float64 reference, from rounding arguments.

Used by the kernel tests and by ``python -m vitok_fast.selftest``; the bounds are derived,
never tuned to pass. Only torch is imported (no Triton), so this works everywhere.

The argument. Every kernel loads its inputs, upcasts them exactly to fp32, computes in fp32
and rounds once when it stores. The checks feed the same input values (upcast exactly) to a
float64 reference, so a kernel's error has two parts:

* **the final store**: at most one ulp of the output dtype, relative to the value
  (``STORE_ULP``). A GPU store rounds to nearest (half an ulp); Triton's CPU interpreter
  truncates bf16 (measured: about half of all stores differ from round-to-nearest), so a
  full ulp is allowed.
* **the fp32 arithmetic before it**, in units of ``U32 = 2^-24`` (fp32's unit roundoff):

  - a sum of n terms carries at most n u32 times the sum of the terms' magnitudes, in any
    summation order (the classic recursive-summation bound; tree and blocked reductions,
    as Triton emits them, do better);
  - every other operation adds a relative error of its own, ``OP_U32[op]`` u32. IEEE add,
    multiply and fused multiply-add round to nearest: 1. On sm_90 Triton does *not* emit
    IEEE division, square root or exponential for ``/``, ``tl.sqrt`` and ``tl.exp``: the
    PTX (checked by compiling the kernels for sm_90, tests/test_kernels_compile.py) holds
    ``div.full.f32``, ``sqrt.approx.ftz.f32`` and ``ex2.approx.f32``, whose documented
    worst cases (NVIDIA PTX ISA, section 9.7.3 "Floating Point Instructions") are:

    ===================  ==========================================  =========
    instruction          documented maximum error                    u32
    ===================  ==========================================  =========
    div.full.f32         2 ulp over the full range                   4
    sqrt.approx.f32      relative 2^-23                              2
    rsqrt.approx.f32     relative 2^-22.9                            2.15
    ex2.approx.f32       2 ulp from the correctly rounded result     5
    ===================  ==========================================  =========

    (one fp32 ulp is at most 2^-23 = 2 u32 relative; "2 ulp from the correctly rounded
    result" is 2.5 ulp from the exact value). The interpreter computes these with numpy,
    correctly rounded or within an ulp, so the GPU figures are the larger and are the ones
    used: one set of bounds holds for both.
  - ``tl.exp(x)`` is ``ex2(x * log2(e))`` with the product rounded (and log2(e) itself
    rounded to fp32): an absolute error of 2 |x log2 e| u32 in the exponent becomes a
    relative error ``2 |x| u32`` in the result, on top of ex2's own 5 u32
    (:func:`exp_rel`). It grows with |x|: the one error here that depends on the input's
    size. ``tl.sigmoid(x) = 1 / (1 + exp(-x))`` passes exp's error on damped by
    ``1 - sigmoid(x)`` and adds an add and a division (:func:`sigmoid_rel`).
  - a ``tl.dot`` on bf16/fp16 operands runs on tensor cores (``wgmma`` on sm_90): products
    are exact in fp32, but the accumulation has been measured to truncate rather than round
    to nearest on NVIDIA tensor cores (Fasi, Higham, Mikaitis, Pranesh, "Numerical behavior
    of NVIDIA tensor cores", PeerJ Computer Science, 2021), i.e. up to 2 u32 per add:
    :func:`dot_bound` doubles the n of the sum bound for half-precision operands. fp32
    operands use IEEE fp32 FMAs (``input_precision="ieee"``, no TF32).

``fp32_bound(n, scale, ops)`` is ``(n + ops) u32 scale``: n for the reduction, ``ops`` u32 for
the elementwise operations (default ``ELEMENTWISE_U32``: a handful of IEEE operations plus
one division and one square root, see :func:`ops_u32`), ``scale`` the magnitude of the
terms. The tests write out the operations of each kernel where that budget is not enough
(SwiGLU's sigmoid).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

U32 = 2.0 ** -24  # fp32 unit roundoff
STORE_ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# spacing of the dtype's subnormals: below it "relative" has no meaning (fp16 reaches it).
TINY = {torch.float32: 2.0 ** -149, torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24}

# Worst relative error of one fp32 operation, in u32, compiled for sm_90 or interpreted
# (the larger of the two; see the module docstring for the sources).
OP_U32 = {
    "add": 1.0, "mul": 1.0, "fma": 1.0,  # IEEE, round to nearest
    "div": 4.0,      # div.full.f32: 2 ulp
    "sqrt": 2.0,     # sqrt.approx.f32: 2^-23
    "rsqrt": 2.15,   # rsqrt.approx.f32: 2^-22.9
    "exp2": 5.0,     # ex2.approx.f32: 2 ulp from the correctly rounded result
}


def ops_u32(**counts: int) -> float:
    """Sum of the worst relative errors of the named operations, in u32:
    ``ops_u32(mul=2, div=1)`` is 6."""
    unknown = set(counts) - set(OP_U32)
    if unknown:
        raise ValueError(f"ops_u32 knows {sorted(OP_U32)}, got {sorted(unknown)}")
    return float(sum(OP_U32[op] * n for op, n in counts.items()))


# The default elementwise budget of fp32_bound: RMSNorm's chain after its sum, the longest of
# the norm / RoPE / GEMM kernels: /N, +eps, sqrt (its input's error halved), 1/., two
# multiplies: 4/2 + 1/2 + 2 + 4 + 2 = 10.5, rounded up.
ELEMENTWISE_U32 = 11.0


def fp32_bound(n_terms: int, scale, ops: float = ELEMENTWISE_U32):
    """Absolute error bound of an n-term fp32 sum followed by elementwise operations worth
    ``ops`` u32: ``(n_terms + ops) * U32 * scale`` (``scale`` a number or a tensor)."""
    return (n_terms + ops) * U32 * scale


def dot_bound(n_terms: int, scale, dtype: torch.dtype, ops: float = ELEMENTWISE_U32):
    """:func:`fp32_bound` for a ``tl.dot`` over ``n_terms``: tensor-core accumulation (bf16 /
    fp16 operands) may truncate, 2 u32 per add instead of 1."""
    per_add = 1 if dtype == torch.float32 else 2
    return fp32_bound(per_add * n_terms, scale, ops)


def exp_rel(x: torch.Tensor) -> torch.Tensor:
    """Relative error bound of ``tl.exp(x)``: ``(2 |x| + 5) u32`` (argument rounding, ex2)."""
    return (2 * x.abs() + OP_U32["exp2"]) * U32


def sigmoid_rel(x: torch.Tensor) -> torch.Tensor:
    """Relative error bound of ``tl.sigmoid(x) = 1 / (1 + exp(-x))``: exp's error times
    ``exp(-x) / (1 + exp(-x)) = 1 - sigmoid(x)``, plus the add and the division."""
    return exp_rel(x) * torch.sigmoid(-x) + ops_u32(add=1, div=1) * U32


class Within(NamedTuple):
    """Result of comparing a kernel's output with its float64 reference.

    ``ok``: every element within its bound. ``used``: the largest error/bound ratio (<= 1
    passes). ``max_err``: the largest absolute error; ``bound``: the bound at that element;
    ``max_rel_err``: the largest error relative to max |ref|.
    """
    ok: bool
    used: float
    max_err: float
    bound: float
    max_rel_err: float


def check_within(out: torch.Tensor, ref: torch.Tensor, *, rel, abs_) -> Within:
    """Elementwise ``|out - ref| <= abs_ + rel |ref|`` (``rel`` and ``abs_`` numbers or
    tensors that broadcast), plus the dtype's subnormal spacing; non-finite output fails."""
    out64, ref64 = out.detach().double(), ref.detach().double().to(out.device)
    if out64.shape != ref64.shape:
        raise ValueError(f"shape {tuple(out64.shape)} != reference shape {tuple(ref64.shape)}")
    if not out64.numel():
        return Within(True, 0.0, 0.0, 0.0, 0.0)
    if torch.is_tensor(rel):
        rel = rel.to(out64.device)
    if torch.is_tensor(abs_):
        abs_ = abs_.to(out64.device)
    err = (out64 - ref64).abs()
    bound = (abs_ + rel * ref64.abs() + TINY[out.dtype]).expand_as(err)
    finite = bool(torch.isfinite(out64).all())
    ratio = torch.where(torch.isfinite(err), err / bound, torch.full_like(err, float("inf")))
    worst = int(ratio.argmax())
    used = float(ratio.reshape(-1)[worst])
    max_err = float(err.max())
    max_rel = max_err / max(float(ref64.abs().max()), TINY[out.dtype])
    return Within(finite and used <= 1.0, used, max_err, float(bound.reshape(-1)[worst]), max_rel)


def assert_within(out: torch.Tensor, ref: torch.Tensor, *, rel, abs_, what: str) -> Within:
    """:func:`check_within`, raising ``AssertionError`` naming ``what`` on failure."""
    out64 = out.detach().double()
    assert out64.shape == ref.shape, f"{what}: shape {tuple(out64.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out64).all(), f"{what}: non-finite values"
    result = check_within(out, ref, rel=rel, abs_=abs_)
    assert result.ok, (f"{what}: max error {result.max_err:.3e} exceeds the bound: error/bound up "
                       f"to {result.used:.3f} (bound {result.bound:.2e} at that element)")
    return result
