"""RMSNorm and add+RMSNorm kernels against a float64 reference, forward and backward.

The kernels compute in fp32 (gradcheck in float64 does not apply); the float64 reference
is the formula itself, and the bounds come from vitok_fast/kernel_bounds.py. They hold for
the interpreter on the CPU and for kernels compiled for sm_90 (approximate sqrt, division).
"""

import pytest
import torch
import torch.nn.functional as F

from vitok_fast.kernels import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from _kernel_bounds import DTYPES, STORE_ULP, U32, assert_within, fp32_bound, ops_u32

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 1e-6
# hidden sizes from the issue (odd, non powers of two) up to 8192; token counts 1, 7, 130
SHAPES = [(1, 72), (7, 200), (130, 768), (2, 3, 1152), (2, 8192)]


def _inputs(shape, dtype, device, requires_grad=True):
    x = torch.randn(shape, device=device).to(dtype).requires_grad_(requires_grad)
    w = (1 + 0.5 * torch.randn(shape[-1], device=device)).to(dtype).requires_grad_(requires_grad)
    return x, w


def _rms64(x64, w64):
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * w64


def rstd_rel(d: int) -> float:
    """Relative error bound of the kernel's ``1 / sqrt(sum(x^2) / d + eps)``: the d-term sum
    of squares (all terms >= 0, so relative), the division by d and the add (div.full, IEEE
    add), halved by the square root, then sqrt.approx and the reciprocal (div.full)."""
    return ((d + ops_u32(div=1, add=1)) / 2 + ops_u32(sqrt=1, div=1)) * U32


def _check_norm(y, dx, dw, x, w, dy, dtype, what, dstream=None):
    """y, dx, dw of the kernel against the float64 reference at the same (upcast) inputs;
    ``dstream`` is the gradient add_rms_norm adds into dx (one more fp32 add)."""
    d = x.shape[-1]
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = _rms64(x64, w64)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    store = STORE_ULP[dtype]
    eps_r = rstd_rel(d)
    # forward: x * rstd * w, two multiplies on top of rstd's error
    assert_within(y, y64, rel=store + eps_r + ops_u32(mul=2) * U32, abs_=0.0, what=f"{what} y")
    # dx = rstd (g - xh m), g = w dy, xh = x rstd, m = sum(xh g) / d. To first order rstd's
    # error reaches dx three times (rstd, and twice through xh m), the d-term sum m with its
    # division and the six IEEE operations around it once: at most
    # (3 eps_r + (d + 12) u32) * scale with scale = rstd (|g| + |xh| mean|xh g|).
    with torch.no_grad():
        rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
        xh, g = x64 * rstd, w64 * dy.double()
        scale = rstd * (g.abs() + xh.abs() * (xh * g).abs().mean(-1, keepdim=True))
        dw_terms = (dy.double() * xh).abs().reshape(-1, d).sum(0)
    dx_abs = (3 * eps_r + (d + 12) * U32) * scale
    if dstream is not None:  # one more add: its rounding is relative to |dx| <= scale + |ds|
        dx64 = dx64 + dstream.double()
        dx_abs = dx_abs + U32 * (scale + dstream.double().abs())
    assert_within(dx, dx64, rel=store, abs_=dx_abs, what=f"{what} dx")
    # dw = sum over rows of dy * xh: terms carrying xh's error (eps_r + 2 u32), then a
    # rows-term sum (per-program partial sums, then the sum of the partial rows)
    rows = x.numel() // d
    assert_within(dw, dw64, rel=store, abs_=(eps_r + (rows + 2) * U32) * dw_terms, what=f"{what} dw")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_matches_float64_reference(shape, dtype, device):
    x, w = _inputs(shape, dtype, device)
    y = rms_norm(x, w, EPS)
    dy = torch.randn(shape, device=device).to(dtype)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    _check_norm(y, dx, dw, x, w, dy, dtype, "rms_norm")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_rms_norm_matches_float64_reference(shape, dtype, device):
    x, w = _inputs(shape, dtype, device)
    r = torch.randn(shape, device=device).to(dtype).requires_grad_()
    y, s = add_rms_norm(x, r, w, EPS)
    dy, ds = torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype)
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


def test_add_rms_norm_stream_gradient_is_exact_sum(device):
    # dx = d(norm)/ds + ds: a single fp32 add, checked where its parts are known exactly
    x, w = _inputs((5, 72), torch.float32, device)
    r = torch.randn(5, 72, device=device, requires_grad=True)
    y, s = add_rms_norm(x, r, w)
    ds = torch.randn(5, 72, device=device)
    (dx_only_stream,) = torch.autograd.grad(s, (x,), ds, retain_graph=True)
    assert torch.equal(dx_only_stream, ds)
    (dx_zero,) = torch.autograd.grad((y, s), (x,), (torch.zeros_like(y), torch.zeros_like(s)))
    assert torch.count_nonzero(dx_zero) == 0


def test_rms_norm_equals_torch_functional_in_fp32(device):
    x, w = _inputs((7, 200), torch.float32, device, requires_grad=False)
    ref = F.rms_norm(x, (200,), w, EPS)
    # both within fp32_bound(200, 1) relative of the exact value (see _check_norm)
    assert_within(rms_norm(x, w, EPS), ref, rel=2 * fp32_bound(200, 1), abs_=0.0, what="vs F.rms_norm")
    assert_within(rms_norm_ref(x, w, EPS), ref, rel=2 * fp32_bound(200, 1), abs_=0.0, what="ref vs F")


def test_rms_norm_weight_grad_is_deterministic(device):
    # the weight gradient is reduced through per-program partial rows (no atomics)
    x, w = _inputs((130, 200), torch.float32, device)
    dy = torch.randn(130, 200, device=device)
    grads = [torch.autograd.grad(rms_norm(x, w), (w,), dy)[0] for _ in range(3)]
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_rms_norm_handles_strided_rows_and_matches_contiguous(device):
    base = torch.randn(6, 2 * 72, device=device)
    x = base[:, :72]  # row stride 144: read in place
    w = torch.randn(72, device=device)
    assert torch.equal(rms_norm(x, w), rms_norm(x.contiguous(), w))
    xt = torch.randn(72, 6, device=device).t()  # last-dim stride != 1: copied deliberately
    assert torch.equal(rms_norm(xt, w), rms_norm(xt.contiguous(), w))


def test_rms_norm_reference_path_agrees(device):
    x, w = _inputs((7, 200), torch.float32, device, requires_grad=False)
    r = torch.randn(7, 200, device=device)
    bound = 2 * fp32_bound(200, 1)
    assert_within(rms_norm(x, w), rms_norm_ref(x, w), rel=bound, abs_=0.0, what="rms_norm")
    (y, s), (yr, sr) = add_rms_norm(x, r, w), add_rms_norm_ref(x, r, w)
    assert torch.equal(s, sr)
    assert_within(y, yr, rel=bound, abs_=0.0, what="add_rms_norm")


def test_rms_norm_rejects_mismatched_weight(device):
    with pytest.raises(ValueError, match=r"weight of shape \(72,\)"):
        rms_norm(torch.randn(3, 72, device=device), torch.randn(71, device=device))
    with pytest.raises(ValueError, match="residual of x's shape"):
        add_rms_norm(torch.randn(3, 72, device=device), torch.randn(3, 71, device=device),
                     torch.randn(72, device=device))
