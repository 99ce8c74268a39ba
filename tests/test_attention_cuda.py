"""The attention backends on a CUDA GPU (skipped without one): every backend that runs agrees
with fp32 attention at ViTok's head sizes in bf16, forward and backward; "auto" tunes once
per key, picks the fastest correct candidate it timed, and a compiled model uses the cached
SDPA choice. Written in a session without a GPU: not yet run on one."""

import pytest
import torch

from vitok_fast import ViTok
from vitok_fast import attention as A

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ("sdpa", "flash", "cudnn", "efficient", "math", "fa4")


@pytest.fixture(autouse=True)
def _clean_cache():
    A.clear_autotune_cache()
    yield
    A.clear_autotune_cache()


def _qkv(B, H, N, D, grad=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16)
    q, k = make(B, H, N, D), make(B, H, N, D)
    v = make(B, N, 3, H, D)[:, :, 2].transpose(1, 2)  # the model's layout
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _fp32_attention(q, k, v):
    q, k, v = (t.float() for t in (q, k, v))
    return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ v


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("H,D", [(12, 64), (16, 72)])
def test_gpu_backends_match_fp32_forward_and_backward(backend, H, D):
    if backend == "fa4" and not A.fa4_available():
        pytest.skip("flash-attn-4 is not importable here")
    q, k, v = _qkv(2, H, 256, D, grad=True)
    grad_out = torch.randn(2, H, 256, D, device="cuda", dtype=torch.bfloat16)
    out = A.attention(q, k, v, backend)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_out = _fp32_attention(q, k, v)
    ref = torch.autograd.grad(ref_out, (q, k, v), grad_out.float())
    # bf16 kernels: output rounding and bf16 P in the PV matmul, a few bf16 eps (2^-7) of
    # the output's scale; gradients accumulate over 256 keys/queries in fp32 from bf16
    # operands, allowed 4 eps of their scale
    eps = torch.finfo(torch.bfloat16).eps
    assert (out.float() - ref_out).abs().max() <= 4 * eps * v.float().abs().max()
    for name, a, b in zip("qkv", got, ref):
        assert (a.float() - b).abs().max() <= 4 * eps * b.abs().max(), name


def test_gpu_auto_tunes_once_per_key_and_picks_the_fastest_it_timed():
    q, k, v = _qkv(4, 12, 1024, 64)
    out = A.attention(q, k, v, "auto")
    choices = A.autotune_choices()
    assert len(choices) == 1
    (entry,) = choices.values()
    assert entry["backend"] in A.AUTO_CANDIDATES and entry["ms"]
    assert entry["backend"] == min(entry["ms"], key=entry["ms"].get)
    err, tol = A.reference_error(out, q, k, v)
    assert err <= tol
    A.attention(q, k, v, "auto")
    assert len(A.autotune_choices()) == 1  # a lookup, not a second tuning
    with torch.enable_grad():
        q.requires_grad_()
        A.attention(q, k, v, "auto")
    assert sorted(key.split()[-1] for key in A.autotune_choices()) == ["fwd", "fwd+bwd"]


def test_gpu_compiled_model_matches_eager_auto():
    model = ViTok.from_name("S-B/16").cuda().eval()
    x = torch.rand(2, 3, 256, 256, device="cuda") * 2 - 1
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(x, sample=False)[0]  # tunes (256 tokens, 12 x 64, forward only)
        assert len(A.autotune_choices()) == 1
        compiled = torch.compile(model)(x, sample=False)[0]
    assert len(A.autotune_choices()) == 1  # the compiled graph read the cache
    assert (compiled.float() - eager.float()).abs().max() < 0.05
