"""``torch.library.opcheck`` on every vitok:: custom op: the schema matches what the op does
(no hidden mutation or aliasing), autograd is registered, the fake implementation gives the
real outputs' shapes, dtypes and strides (what torch.compile and torch.export plan with),
and AOTAutograd with dynamic shapes gives eager's outputs and gradients.

The shapes are the real models' (S-B/16: d = 768, 12 heads of 64, SwiGLU hidden 2048,
16 px patches; S-B/4x8: tubelets of 4 frames x 8 px) on a tiny token grid (small batch:
the checks are about the contract, not the maths, which test_kernels_<op>.py checks; the
tubelet GEMMs get 2 heads' width, as the selftest's --quick), and
odd sizes (a width, hidden size and head count no kernel block divides). On the CPU the
kernels run under Triton's interpreter; the same checks run on CUDA as ``gpu`` tests.
"""

import os

import pytest
import torch

from vitok_fast import kernels as K
from vitok_fast.config import ViTokConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def _side(name):
    c = ViTokConfig.from_name(name)
    return c.encoder_width, c.encoder_heads, c.encoder_mlp_hidden, c.tubelet_size, c.patch_size


# name: (width d, heads, SwiGLU hidden, tubelet q, patch p, pixels (B, T, H, W))
SHAPES = {
    "S-B/16": (*_side("S-B/16"), (1, 1, 32, 48)),
    "S-B/4x8": (*_side("S-B/4x8"), (1, 4, 16, 24)),
    "odd": (3 * 38, 3, 83, 1, 8, (3, 1, 8, 24)),  # 19 rotary pairs a head
}


def _where(device):
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors run the kernels only under TRITON_INTERPRET=1")
    return torch.device(device)


def _opcheck(op, *args):
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


def every_case(test):
    """Parametrise over device, model shape and dtype."""
    for name, values in (("dtype", DTYPES), ("shape", list(SHAPES)), ("device", DEVICES)):
        test = pytest.mark.parametrize(name, values)(test)
    return test


def _t(*shape, dtype, device, grad=False, scale=1.0):
    return (scale * torch.randn(*shape, device=device)).to(dtype).requires_grad_(grad)


@every_case
def test_norm_swiglu_rope_ops_pass_opcheck(shape, dtype, device):
    dev = _where(device)
    d, heads, hidden, q, p, (B, T, H, W) = SHAPES[shape]
    N = (T // q) * (H // p) * (W // p)
    t = lambda *s, **kw: _t(*s, dtype=dtype, device=dev, **kw)
    x, r, w = t(B, N, d, grad=True), t(B, N, d, grad=True), t(d, grad=True)
    _opcheck(torch.ops.vitok.rms_norm.default, x, w, 1e-6)
    _opcheck(torch.ops.vitok.add_rms_norm.default, x, r, w, 1e-6)
    rstd = torch.rand(B * N, device=dev) + 0.5
    _opcheck(torch.ops.vitok.rms_norm_backward.default, t(B, N, d), x.detach(), w.detach(), rstd, None)
    _opcheck(torch.ops.vitok.rms_norm_backward.default, t(B, N, d), x.detach(), w.detach(), rstd,
             t(B, N, d))

    packed = t(B, N, 2 * hidden, grad=True)
    gate, up = (c.detach().requires_grad_() for c in packed.chunk(2, -1))  # strided views
    _opcheck(torch.ops.vitok.swiglu_packed.default, packed)
    _opcheck(torch.ops.vitok.swiglu.default, gate, up)
    _opcheck(torch.ops.vitok.swiglu_packed_backward.default, t(B, N, hidden), packed.detach())
    _opcheck(torch.ops.vitok.swiglu_backward.default, t(B, N, hidden), gate.detach(), up.detach())

    qkv = t(B, N, 3, heads, d // heads, grad=True)
    qh, kh, _ = qkv.permute(2, 0, 3, 1, 4)  # the model's (B, H, N, D) views of packed qkv
    cos, sin = K.rope_cos_sin((T // q, H // p, W // p), d // heads, device=dev)
    _opcheck(torch.ops.vitok.rope_3d_qk.default, qh, kh, cos, sin)
    _opcheck(torch.ops.vitok.rope_3d.default, qh, cos, sin)


@every_case
def test_tubelet_ops_pass_opcheck(shape, dtype, device):
    dev = _where(device)
    d, heads, _, q, p, (B, T, H, W) = SHAPES[shape]
    # the real patch geometry (K = q p p 3 = 768 for both models), 2 heads' width: a GEMM of
    # the real d = 768 costs minutes per case under the interpreter
    d = 2 * (d // heads)
    K_ = q * p * p * 3
    N = (T // q) * (H // p) * (W // p)
    t = lambda *s, **kw: _t(*s, dtype=dtype, device=dev, **kw)
    pixels = t(B, 3, T, H, W, grad=True) if q > 1 else t(B, 3, H, W, grad=True)
    w, b = t(d, K_, grad=True, scale=0.05), t(d, grad=True)
    _opcheck(torch.ops.vitok.tubelet_embed.default, pixels, w, b, q, p)
    _opcheck(torch.ops.vitok.tubelet_embed.default, pixels, w, None, q, p)
    dy = t(B, N, d)
    _opcheck(torch.ops.vitok.tubelet_embed_dx.default, dy, w.detach(), list(pixels.shape), q, p)
    _opcheck(torch.ops.vitok.tubelet_embed_dweight.default, dy, pixels.detach(), q, p)

    h, wu, bu = t(B, N, d, grad=True), t(K_, d, grad=True, scale=0.05), t(K_, grad=True)
    _opcheck(torch.ops.vitok.tubelet_unembed.default, h, wu, bu, q, p, T, H, W)
    dpix = t(B, 3, T, H, W)
    _opcheck(torch.ops.vitok.tubelet_unembed_dh.default, dpix, wu.detach(), q, p)
    _opcheck(torch.ops.vitok.tubelet_unembed_dweight.default, dpix, h.detach(), q, p)


def test_every_vitok_op_is_opchecked():
    # a new op in kernels/ must be added to the checks above
    source = open(__file__).read()
    ops = {name for name in dir(torch.ops.vitok) if not name.startswith("_")} - {"name"}
    unchecked = sorted(op for op in ops if f"torch.ops.vitok.{op}.default" not in source)
    assert len(ops) == 15 and not unchecked, (sorted(ops), unchecked)

