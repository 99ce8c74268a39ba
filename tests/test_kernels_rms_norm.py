"""RMSNorm and add+RMSNorm kernels against a float64 reference, forward and backward.

The kernels compute in fp32 (gradcheck in float64 does not apply); the float64 reference
is the formula itself, and the bounds come from tests/_kernel_bounds.py.
"""

import pytest
import torch
import torch.nn.functional as F

from vitok_fast.kernels import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from _kernel_bounds import (DTYPES, STORE_ULP, U32, assert_within, fp32_bound,  # noqa: F401
                            one_thread)

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 1e-6
# hidden sizes from the issue (odd, non powers of two) up to 8192; token counts 1, 7, 130
SHAPES = [(1, 72), (7, 200), (130, 768), (2, 3, 1152), (2, 8192)]


def _inputs(shape, dtype, requires_grad=True):
    x = torch.randn(shape).to(dtype).requires_grad_(requires_grad)
    w = (1 + 0.5 * torch.randn(shape[-1])).to(dtype).requires_grad_(requires_grad)
    return x, w


def _rms64(x64, w64):
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * w64


def _check_norm(y, dx, dw, x, w, dy, dtype, what, dstream=None):
    """y, dx, dw of the kernel against the float64 reference at the same (upcast) inputs;
    ``dstream`` is the gradient add_rms_norm adds into dx (one more fp32 add)."""
    d = x.shape[-1]
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = _rms64(x64, w64)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    store = STORE_ULP[dtype]
    # forward: a product of x, 1/rms and w; 1/rms from a d-term sum of squares (all >= 0)
    assert_within(y, y64, rel=store + (d + 8) * U32, abs_=0.0, what=f"{what} y")
    # dx = rstd (g - xh mean(xh g)) with g = w dy: the terms reach rstd (|g| + |xh| mean|xh g|)
    with torch.no_grad():
        rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
        xh, g = x64 * rstd, w64 * dy.double()
        scale = rstd * (g.abs() + xh.abs() * (xh * g).abs().mean(-1, keepdim=True))
        dw_terms = (dy.double() * xh).abs().reshape(-1, d).sum(0)
    if dstream is not None:
        dx64 = dx64 + dstream.double()
        scale = scale + dstream.double().abs()
    assert_within(dx, dx64, rel=store, abs_=fp32_bound(d, 1) * scale, what=f"{what} dx")
    # dw = sum over rows of dy xh: a rows-term sum of terms that carry xh's own d-term error
    rows = x.numel() // d
    assert_within(dw, dw64, rel=store, abs_=fp32_bound(rows + d, 1) * dw_terms, what=f"{what} dw")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_matches_float64_reference(shape, dtype):
    x, w = _inputs(shape, dtype)
    y = rms_norm(x, w, EPS)
    dy = torch.randn(shape).to(dtype)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    _check_norm(y, dx, dw, x, w, dy, dtype, "rms_norm")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_rms_norm_matches_float64_reference(shape, dtype):
    x, w = _inputs(shape, dtype)
    r = torch.randn(shape).to(dtype).requires_grad_()
    y, s = add_rms_norm(x, r, w, EPS)
    dy, ds = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    dx, dr, dw = torch.autograd.grad((y, s), (x, r, w), (dy, ds))
    store = STORE_ULP[dtype]
    # the stream: one fp32 add of two exactly upcast values, then the store
    assert_within(s, x.double() + r.double(), rel=store + U32, abs_=0.0, what="x + residual")
    # the norm is of the stream as stored (as in the unfused path); check it from there, and
    # its gradient, which also carries the stream's own gradient ds into dx and dr
    s_stored = s.detach().requires_grad_()
    y_again = rms_norm(s_stored, w, EPS)  # same kernel maths, for dw and dx's norm part
    dns, dw_again = torch.autograd.grad(y_again, (s_stored, w), dy)
    _check_norm(y, dx, dw, s_stored, w, dy, dtype, "add_rms_norm", dstream=ds)
    assert torch.equal(dx, dr), "x and residual enter as a sum: their gradients are one tensor"
    assert torch.equal(y, y_again) and torch.equal(dw, dw_again)


def test_add_rms_norm_stream_gradient_is_exact_sum():
    # dx = d(norm)/ds + ds: a single fp32 add, checked where its parts are known exactly
    x, w = _inputs((5, 72), torch.float32)
    r = torch.randn(5, 72, requires_grad=True)
    y, s = add_rms_norm(x, r, w)
    ds = torch.randn(5, 72)
    (dx_only_stream,) = torch.autograd.grad(s, (x,), ds, retain_graph=True)
    assert torch.equal(dx_only_stream, ds)
    (dx_zero,) = torch.autograd.grad((y, s), (x,), (torch.zeros_like(y), torch.zeros_like(s)))
    assert torch.count_nonzero(dx_zero) == 0


def test_rms_norm_equals_torch_functional_in_fp32():
    x, w = _inputs((7, 200), torch.float32, requires_grad=False)
    ref = F.rms_norm(x, (200,), w, EPS)
    assert_within(rms_norm(x, w, EPS), ref, rel=(200 + 8) * U32 * 2, abs_=0.0, what="vs F.rms_norm")
    assert_within(rms_norm_ref(x, w, EPS), ref, rel=(200 + 8) * U32 * 2, abs_=0.0, what="ref vs F")


def test_rms_norm_weight_grad_is_deterministic():
    # the weight gradient is reduced through per-program partial rows (no atomics)
    x, w = _inputs((130, 200), torch.float32)
    dy = torch.randn(130, 200)
    grads = [torch.autograd.grad(rms_norm(x, w), (w,), dy)[0] for _ in range(3)]
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_rms_norm_handles_strided_rows_and_matches_contiguous():
    base = torch.randn(6, 2 * 72)
    x = base[:, :72]  # row stride 144: read in place
    w = torch.randn(72)
    assert torch.equal(rms_norm(x, w), rms_norm(x.contiguous(), w))
    xt = torch.randn(72, 6).t()  # last-dim stride != 1: copied deliberately
    assert torch.equal(rms_norm(xt, w), rms_norm(xt.contiguous(), w))


def test_rms_norm_reference_path_agrees():
    x, w = _inputs((7, 200), torch.float32, requires_grad=False)
    r = torch.randn(7, 200)
    bound = (200 + 8) * U32 * 2
    assert_within(rms_norm(x, w), rms_norm_ref(x, w), rel=bound, abs_=0.0, what="rms_norm")
    (y, s), (yr, sr) = add_rms_norm(x, r, w), add_rms_norm_ref(x, r, w)
    assert torch.equal(s, sr)
    assert_within(y, yr, rel=bound, abs_=0.0, what="add_rms_norm")


def test_rms_norm_rejects_mismatched_weight():
    with pytest.raises(ValueError, match=r"weight of shape \(72,\)"):
        rms_norm(torch.randn(3, 72), torch.randn(71))
    with pytest.raises(ValueError, match="residual of x's shape"):
        add_rms_norm(torch.randn(3, 72), torch.randn(3, 71), torch.randn(72))
