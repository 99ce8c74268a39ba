"""Tubelet embed / unembed kernels against a float64 patchify + linear reference."""

import pytest
import torch
import torch.nn.functional as F

from vitok_fast.config import SIZES
from vitok_fast.kernels import (patchify, tubelet_embed, tubelet_embed_ref, tubelet_unembed,
                                tubelet_unembed_ref, unpatchify)
from vitok_fast.kernels.tubelet import weight_grad_grid
from _kernel_bounds import DTYPES, STORE_ULP, assert_within, dot_bound, fp32_bound

pytestmark = pytest.mark.usefixtures("one_thread")

# (pixel shape, q, p, width): images with p = 8 and 16, a non-square image, a video, and
# 256 tokens, where the interpreter splits the weight gradients' token sum (split-K) in 2
CASES = [((2, 3, 32, 32), 1, 8, 64), ((1, 3, 16, 40), 1, 8, 200),
         ((1, 3, 32, 32), 1, 16, 72), ((1, 3, 4, 16, 24), 2, 8, 72), ((4, 3, 64, 64), 1, 8, 64)]


def _thw(shape):
    return (1, *shape[2:]) if len(shape) == 4 else shape[2:]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_tubelet_embed_matches_float64_reference(case, dtype, device):
    shape, q, p, d = case
    K = q * p * p * 3
    x = (2 * torch.rand(shape, device=device) - 1).to(dtype).requires_grad_()
    w = (0.05 * torch.randn(d, K, device=device)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(d, device=device)).to(dtype).requires_grad_()
    y = tubelet_embed(x, w, b, q, p)
    dy = torch.randn(y.shape, device=device).to(dtype)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)

    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = F.linear(patchify(x64, q, p), w64, b64)
    dx64, dw64, db64 = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    store = STORE_ULP[dtype]
    with torch.no_grad():  # magnitudes of the summed terms, for the fp32 accumulation bound
        pa, wa, dya = patchify(x64, q, p).abs(), w64.abs(), dy.double().abs()
        M = pa.shape[0] * pa.shape[1]
        y_terms = F.linear(pa, wa, b64.abs())
        dx_terms = unpatchify(dya @ wa, q, p, *_thw(shape)).reshape(x.shape)
        dw_terms = dya.reshape(M, d).t() @ pa.reshape(M, K)
        db_terms = dya.reshape(M, d).sum(0)
    # GEMMs: K, d and M-term dot products (dW's split over programs, then summed: still M
    # terms); half-precision operands accumulate on tensor cores (dot_bound)
    assert_within(y, y64, rel=store, abs_=dot_bound(K + 1, y_terms, dtype), what="embed y")
    assert_within(dx, dx64, rel=store, abs_=dot_bound(d, dx_terms, dtype), what="embed dx")
    assert_within(dw, dw64, rel=store, abs_=dot_bound(M, dw_terms, dtype), what="embed dW")
    assert_within(db, db64, rel=store, abs_=fp32_bound(M, 1) * db_terms, what="embed db")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_tubelet_unembed_matches_float64_reference(case, dtype, device):
    shape, q, p, d = case
    K = q * p * p * 3
    T, H, W = _thw(shape)
    N = (T // q) * (H // p) * (W // p)
    h = torch.randn(shape[0], N, d, device=device).to(dtype).requires_grad_()
    w = (0.05 * torch.randn(K, d, device=device)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(K, device=device)).to(dtype).requires_grad_()
    y = tubelet_unembed(h, w, b, q, p, T, H, W)
    assert y.shape == (shape[0], 3, T, H, W)
    dy = torch.randn(y.shape, device=device).to(dtype)
    dh, dw, db = torch.autograd.grad(y, (h, w, b), dy)

    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
    y64 = unpatchify(F.linear(h64, w64, b64), q, p, T, H, W)
    dh64, dw64, db64 = torch.autograd.grad(y64, (h64, w64, b64), dy.double())
    store = STORE_ULP[dtype]
    with torch.no_grad():
        ha, wa = h64.abs(), w64.abs()
        dpa = patchify(dy.double().abs(), q, p)
        M = shape[0] * N
        y_terms = unpatchify(F.linear(ha, wa, b64.abs()), q, p, T, H, W)
        dh_terms = dpa @ wa
        dw_terms = dpa.reshape(M, K).t() @ ha.reshape(M, d)
        db_terms = dpa.reshape(M, K).sum(0)
    assert_within(y, y64, rel=store, abs_=dot_bound(d + 1, y_terms, dtype), what="unembed y")
    assert_within(dh, dh64, rel=store, abs_=dot_bound(K, dh_terms, dtype), what="unembed dh")
    assert_within(dw, dw64, rel=store, abs_=dot_bound(M, dw_terms, dtype), what="unembed dW")
    assert_within(db, db64, rel=store, abs_=fp32_bound(M, 1) * db_terms, what="unembed db")


def test_tubelet_kernels_equal_reference_path_in_fp32(device):
    x = torch.rand(2, 3, 4, 16, 16, device=device) * 2 - 1
    w, b = 0.05 * torch.randn(64, 2 * 8 * 8 * 3, device=device), torch.randn(64, device=device)
    y, yr = tubelet_embed(x, w, b, 2, 8), tubelet_embed_ref(x, w, b, 2, 8)
    terms = F.linear(patchify(x, 2, 8).abs(), w.abs(), b.abs())
    assert_within(y, yr, rel=0.0, abs_=2 * fp32_bound(w.shape[1] + 1, 1) * terms, what="embed")
    w2, b2 = 0.05 * torch.randn(384, 64, device=device), torch.randn(384, device=device)
    o, orf = tubelet_unembed(y, w2, b2, 2, 8, 4, 16, 16), tubelet_unembed_ref(y, w2, b2, 2, 8, 4, 16, 16)
    terms = unpatchify(F.linear(y.abs(), w2.abs(), b2.abs()), 2, 8, 4, 16, 16)
    assert_within(o, orf, rel=0.0, abs_=2 * fp32_bound(65, 1) * terms, what="unembed")


def test_tubelet_embed_reads_strided_pixels_in_place(device):
    # a channels-last image: the kernel reads it through its strides, no copy, same result
    x = torch.randn(2, 3, 16, 16, device=device).to(memory_format=torch.channels_last)
    w, b = torch.randn(64, 192, device=device), torch.randn(64, device=device)
    assert torch.equal(tubelet_embed(x, w, b, 1, 8), tubelet_embed(x.contiguous(), w, b, 1, 8))
    # and the unembed's backward reads a non-contiguous incoming gradient the same way
    h = torch.randn(2, 4, 64, device=device, requires_grad=True)
    w2 = torch.randn(192, 64, device=device)
    out = tubelet_unembed(h, w2, None, 1, 8, 1, 16, 16)
    g = torch.randn(2, 1, 16, 16, 3, device=device).permute(0, 4, 1, 2, 3)
    (dh,) = torch.autograd.grad(out, (h,), g)
    (dh2,) = torch.autograd.grad(tubelet_unembed(h, w2, None, 1, 8, 1, 16, 16), (h,), g.contiguous())
    assert torch.equal(dh, dh2)


def test_tubelet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        tubelet_embed(torch.randn(1, 3, 20, 16), torch.randn(8, 192), None, 1, 8)
    with pytest.raises(ValueError, match=r"weight \(d, q\*p\*p\*C\)"):
        tubelet_embed(torch.randn(1, 3, 16, 16), torch.randn(8, 191), None, 1, 8)
    with pytest.raises(ValueError, match=r"expects h \(B, 4, 8\)"):
        tubelet_unembed(torch.randn(1, 5, 8), torch.randn(192, 8), None, 1, 8, 1, 16, 16)


def test_tubelet_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match="one dtype"):
        tubelet_embed(torch.randn(1, 3, 16, 16), torch.randn(8, 192).bfloat16(), None, 1, 8)


def test_split_k_case_really_splits_under_the_interpreter():
    # the last CASES entry: 256 tokens into a (64, 192) embed dW and a (192, 64) unembed dW
    for rows, cols in ((64, 192), (192, 64)):
        grid = weight_grad_grid(rows, cols, 4 * 8 * 8, sm_count=0, interpreted=True)
        assert grid.splits == 2 and grid.programs == 6


# (model, pixel shape per sample, q, p): S-B/16 and S-L/16 at 256p and 512p, S-B/4x8 video
GPU_SHAPES = [("S-B/16", (3, 256, 256), 1, 16), ("S-B/16", (3, 512, 512), 1, 16),
              ("S-L/16", (3, 256, 256), 1, 16), ("S-L/16", (3, 512, 512), 1, 16),
              ("S-B/4x8", (3, 16, 128, 128), 4, 8)]


@pytest.mark.parametrize("ieee", (False, True), ids=("bf16", "fp32"))
@pytest.mark.parametrize("batch", (8, 16, 32, 64, 128, 256))
@pytest.mark.parametrize("model,pixels,q,p", GPU_SHAPES, ids=[f"{m}-{'x'.join(map(str, px))}"
                                                              for m, px, _, _ in GPU_SHAPES])
def test_weight_grads_fill_an_h100(model, pixels, q, p, batch, ieee):
    # Both weight gradients of the model's tubelet layers on a 132-SM H100: the encoder's
    # embed (d_enc, K) and the decoder's head (K, d_dec), summed over batch x tokens.
    sms = 132
    enc, dec = model[0], model[2]
    d_enc, d_dec = SIZES[enc]["width"], SIZES[dec]["width"]
    K = q * p * p * 3
    T, H, W = (1, *pixels[1:]) if len(pixels) == 3 else pixels[1:]
    tokens = batch * (T // q) * (H // p) * (W // p)
    for rows, cols in ((d_enc, K), (K, d_dec)):
        grid = weight_grad_grid(rows, cols, tokens, sm_count=sms, ieee=ieee)
        assert grid.tiles_m * grid.tiles_n == -(-rows // 128) * -(-cols // 128)  # 36 or 54
        assert grid.programs >= 2 * sms, grid
        # each slice is a whole number of BLOCK_K steps and the slices cover the tokens once
        assert grid.chunk % grid.block_k == 0
        assert (grid.splits - 1) * grid.chunk < tokens <= grid.splits * grid.chunk
        # and the fp32 partial slabs stay small next to the activations (< 64 MiB)
        assert grid.splits * rows * cols * 4 < 64 * 2 ** 20, grid


def test_weight_grads_are_bit_reproducible(device):
    # split-K sums fixed slices in a fixed order: two runs give the same bits
    x = torch.rand(4, 3, 64, 64, device=device) * 2 - 1
    w = (0.05 * torch.randn(64, 192, device=device)).requires_grad_()
    h = torch.randn(4, 64, 64, device=device, requires_grad=True)
    w2 = (0.05 * torch.randn(192, 64, device=device)).requires_grad_()
    dy = torch.randn(4, 64, 64, device=device)
    dpix = torch.randn(4, 3, 1, 64, 64, device=device)

    def grads():
        (dw,) = torch.autograd.grad(tubelet_embed(x, w, None, 1, 8), (w,), dy)
        (dw2,) = torch.autograd.grad(tubelet_unembed(h, w2, None, 1, 8, 1, 64, 64), (w2,), dpix)
        return dw, dw2

    first, second = grads(), grads()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
