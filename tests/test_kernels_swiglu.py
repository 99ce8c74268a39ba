"""SwiGLU kernels (two-tensor and packed) against a float64 reference, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from vitok_fast.kernels import swiglu, swiglu_packed, swiglu_packed_ref, swiglu_ref
from _kernel_bounds import DTYPES, STORE_ULP, assert_within, fp32_bound, one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

# MLP hidden sizes: odd (72, 200), the T model's 176, ViTok's 2048 / 3072 shrunk in tokens
SHAPES = [(1, 72), (7, 200), (2, 65, 176), (3, 1152), (2, 3072)]


def _check(y, dg, du, g, u, dy, dtype, what):
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    y64 = F.silu(g64) * u64
    dg64, du64 = torch.autograd.grad(y64, (g64, u64), dy.double())
    store = STORE_ULP[dtype]
    # y and du are products (sigmoid = a few fp32 ops): relative bounds
    assert_within(y, y64, rel=store + fp32_bound(0, 1), abs_=0.0, what=f"{what} y")
    assert_within(du, du64, rel=store + fp32_bound(0, 1), abs_=0.0, what=f"{what} du")
    # dg = dy u s (1 + g (1 - s)) cancels near g = -1.28: bound by its terms' magnitude
    with torch.no_grad():
        s = torch.sigmoid(g64)
        scale = (dy.double() * u64 * s).abs() * (1 + g64.abs() * (1 - s))
    assert_within(dg, dg64, rel=store, abs_=fp32_bound(0, 1) * scale, what=f"{what} dg")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu_packed_matches_float64_reference(shape, dtype):
    packed = (2 * torch.randn(*shape[:-1], 2 * shape[-1])).to(dtype).requires_grad_()
    y = swiglu_packed(packed)
    dy = torch.randn(shape).to(dtype)
    (dpacked,) = torch.autograd.grad(y, (packed,), dy)
    assert y.shape == shape and dpacked.dtype == dtype
    g, u = packed.chunk(2, dim=-1)
    dg, du = dpacked.chunk(2, dim=-1)
    _check(y, dg, du, g, u, dy, dtype, "swiglu_packed")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_swiglu_two_tensors_matches_float64_reference(shape, dtype):
    g = (2 * torch.randn(shape)).to(dtype).requires_grad_()
    u = torch.randn(shape).to(dtype).requires_grad_()
    y = swiglu(g, u)
    dy = torch.randn(shape).to(dtype)
    dg, du = torch.autograd.grad(y, (g, u), dy)
    _check(y, dg, du, g, u, dy, dtype, "swiglu")


def test_swiglu_on_chunk_views_equals_packed_and_reference():
    packed = torch.randn(2, 7, 400, requires_grad=True)
    gate, up = packed.chunk(2, dim=-1)  # strided views, read in place
    y = swiglu(gate, up)
    assert torch.equal(y, swiglu_packed(packed))
    dy = torch.randn_like(y)
    (d_two,) = torch.autograd.grad(y, (packed,), dy)
    (d_packed,) = torch.autograd.grad(swiglu_packed(packed), (packed,), dy)
    assert torch.equal(d_two, d_packed)
    yr = swiglu_packed_ref(packed)
    assert_within(y, yr, rel=2 * fp32_bound(0, 1), abs_=0.0, what="vs swiglu_ref")
    assert torch.equal(swiglu_ref(gate, up), yr)


def test_swiglu_rejects_bad_shapes():
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(torch.randn(3, 8), torch.randn(3, 9))
    with pytest.raises(ValueError, match="even last dim"):
        swiglu_packed(torch.randn(3, 9))
