"""SwiGLU kernels (two-tensor and packed) against a float64 reference, forward and backward.

The sigmoid's error grows with |gate| on sm_90 (exp is ex2.approx of a rounded product):
the bounds carry it per element (vitok_fast/kernel_bounds.py, sigmoid_rel)."""

import pytest
import torch
import torch.nn.functional as F

from vitok_fast.kernels import swiglu, swiglu_packed, swiglu_packed_ref, swiglu_ref
from _kernel_bounds import DTYPES, STORE_ULP, U32, assert_within, fp32_bound, ops_u32, sigmoid_rel

pytestmark = pytest.mark.usefixtures("one_thread")

# MLP hidden sizes: odd (72, 200), the T model's 176, ViTok's 2048 / 3072 shrunk in tokens
SHAPES = [(1, 72), (7, 200), (2, 65, 176), (3, 1152), (2, 3072)]


def _check(y, dg, du, g, u, dy, dtype, what):
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    y64 = F.silu(g64) * u64
    dg64, du64 = torch.autograd.grad(y64, (g64, u64), dy.double())
    store = STORE_ULP[dtype]
    with torch.no_grad():
        g64 = g64.detach()
        s = torch.sigmoid(g64)
        s_rel = sigmoid_rel(g64)  # tl.sigmoid = 1 / (1 + exp(-g)): grows with |g| on sm_90
        # y = g s u and du = dy g s: two multiplies on top of the sigmoid
        prod_rel = s_rel + ops_u32(mul=2) * U32
        # dg = (dy u) s (1 + g (1 - s)) cancels near g = -1.28: bounded by its terms. To first
        # order the sigmoid's error reaches it as (1 + |g|) s_rel, the five IEEE operations
        # (1 - s, g *, 1 +, two multiplies) as 6 u32 (1 + |g| (1 - s)); both times |dy u s|.
        dg_abs = (dy.double() * u64 * s).abs() * (
            (1 + g64.abs()) * s_rel + 6 * U32 * (1 + g64.abs() * (1 - s)))
    assert_within(y, y64, rel=store + prod_rel, abs_=0.0, what=f"{what} y")
    assert_within(du, du64, rel=store + prod_rel, abs_=0.0, what=f"{what} du")
    assert_within(dg, dg64, rel=store, abs_=dg_abs, what=f"{what} dg")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu_packed_matches_float64_reference(shape, dtype, device):
    packed = (2 * torch.randn(*shape[:-1], 2 * shape[-1], device=device)).to(dtype).requires_grad_()
    y = swiglu_packed(packed)
    dy = torch.randn(shape, device=device).to(dtype)
    (dpacked,) = torch.autograd.grad(y, (packed,), dy)
    assert y.shape == shape and dpacked.dtype == dtype
    g, u = packed.chunk(2, dim=-1)
    dg, du = dpacked.chunk(2, dim=-1)
    _check(y, dg, du, g, u, dy, dtype, "swiglu_packed")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_swiglu_two_tensors_matches_float64_reference(shape, dtype, device):
    g = (2 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    u = torch.randn(shape, device=device).to(dtype).requires_grad_()
    y = swiglu(g, u)
    dy = torch.randn(shape, device=device).to(dtype)
    dg, du = torch.autograd.grad(y, (g, u), dy)
    _check(y, dg, du, g, u, dy, dtype, "swiglu")


def test_swiglu_on_chunk_views_equals_packed_and_reference(device):
    packed = torch.randn(2, 7, 400, device=device, requires_grad=True)
    gate, up = packed.chunk(2, dim=-1)  # strided views, read in place
    y = swiglu(gate, up)
    assert torch.equal(y, swiglu_packed(packed))
    dy = torch.randn_like(y)
    (d_two,) = torch.autograd.grad(y, (packed,), dy)
    (d_packed,) = torch.autograd.grad(swiglu_packed(packed), (packed,), dy)
    assert torch.equal(d_two, d_packed)
    yr = swiglu_packed_ref(packed)
    # both within the kernel's bound of the exact value (the eager one is the tighter)
    with torch.no_grad():
        rel = 2 * (sigmoid_rel(gate.double()) + ops_u32(mul=2) * U32)
    assert_within(y, yr, rel=rel, abs_=0.0, what="vs swiglu_ref")
    assert torch.equal(swiglu_ref(gate, up), yr)


def test_swiglu_rejects_bad_shapes(device):
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(torch.randn(3, 8, device=device), torch.randn(3, 9, device=device))
    with pytest.raises(ValueError, match="even last dim"):
        swiglu_packed(torch.randn(3, 9, device=device))
