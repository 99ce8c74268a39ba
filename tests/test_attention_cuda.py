"""The attention backends on a CUDA GPU (``pytest -m gpu``; skipped without one): every
backend the SUPPORT table admits passes check_backend (forward and backward on the full
tensors, the model's q, k, v views, against fp32 math within the derived bound) at ViTok's
head sizes in bf16; FA4 at the L decoder's 72 is a clear error when pinned and skipped by
"auto"; "auto" checks and tunes once per key and picks the fastest it timed; a compiled
model uses the cached SDPA choice. Written in a session without a GPU: not yet run on one."""

import pytest
import torch

from vitok_fast import ViTok
from vitok_fast import attention as A

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ("sdpa", "flash", "cudnn", "efficient", "math", "fa4")


@pytest.fixture(autouse=True)
def _clean_cache():
    A.clear_autotune_cache()
    A._SAID.clear()
    yield
    A.clear_autotune_cache()


def _qkv(B, H, N, D):
    """The model's layout: q, k, v permuted views of one packed (B, N, 3, H, D) projection."""
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, N, 3, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    return qkv.permute(2, 0, 3, 1, 4)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("H,D", [(12, 64), (16, 72)])
def test_gpu_backends_pass_check_backend_forward_and_backward(backend, H, D):
    if backend == "fa4" and not A.fa4_available():
        pytest.skip("flash-attn-4 is not importable here")
    q, k, v = _qkv(4, H, 1024, D)
    r = A.check_backend(backend, q, k, v)
    if A.unsupported(backend, q, v):
        assert not r["supported"] and r["error"].startswith("unsupported:")
        return
    assert r["supported"] and r["ok"], r["error"]
    assert 0 < r["max_rel_err"] <= r["bound"] < 12 * 2.0 ** -8  # a few bf16 roundings


def test_gpu_fa4_at_head_dim_72_is_a_clear_error_and_auto_skips_it():
    q, k, v = _qkv(2, 16, 256, 72)
    with pytest.raises(ValueError, match=r"'fa4' supports head dims \[64, 96, 128\].*got 72"):
        A.attention(q, k, v, "fa4")
    with pytest.warns(UserWarning, match=r"'auto' skips attention backend 'fa4'"):
        entry = A.autotune(q, k, v)
    assert entry["errors"]["fa4"].startswith("unsupported:") and entry["backend"] != "fa4"


def test_gpu_auto_tunes_once_per_key_and_picks_the_fastest_it_timed():
    q, k, v = _qkv(4, 12, 1024, 64)
    A.attention(q, k, v, "auto")
    choices = A.autotune_choices()
    assert len(choices) == 1
    (entry,) = choices.values()
    assert entry["backend"] in A.AUTO_CANDIDATES and entry["ms"]
    assert entry["backend"] == min(entry["ms"], key=entry["ms"].get)
    assert A.check_backend(entry["backend"], q, k, v)["ok"]
    A.attention(q, k, v, "auto")
    assert len(A.autotune_choices()) == 1  # a lookup, not a second tuning
    with torch.enable_grad():
        q.requires_grad_()
        A.attention(q, k, v, "auto")
    assert sorted(key.split()[-1] for key in A.autotune_choices()) == ["fwd", "fwd+bwd"]


def test_gpu_compiled_model_matches_eager_auto():
    model = ViTok.from_name("S-B/16", attention_backend="auto").cuda().eval()
    x = torch.rand(2, 3, 256, 256, device="cuda") * 2 - 1
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(x, sample=False)[0]  # tunes (256 tokens, 12 x 64, forward only)
        assert len(A.autotune_choices()) == 1
        compiled = torch.compile(model)(x, sample=False)[0]
    assert len(A.autotune_choices()) == 1  # the compiled graph read the cache
    assert (compiled.float() - eager.float()).abs().max() < 0.05
