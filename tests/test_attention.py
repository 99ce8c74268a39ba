"""Attention backends (vitok_fast/attention.py): every backend that runs on the CPU agrees
with float64 attention, names are checked, the default is "sdpa", "auto" is plain SDPA on
the CPU, the CUDA path's tuner picks the fastest correct candidate and stays out of compiled
graphs, and the model's output is bit-for-bit what it was before the backends existed.
check_backend and the safety of "auto" are in test_attention_check.py."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from vitok_fast import ViTok, ViTokConfig, ops
from vitok_fast import attention as A
from vitok_fast.model import CONFIG_FILE, Attention

CPU_BACKENDS = ("sdpa", "flash", "math", "auto")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(autouse=True)
def _clean_cache():
    A.clear_autotune_cache()
    A._SAID.clear()  # "auto"'s once-per-process warnings, so each test sees its own
    yield
    A.clear_autotune_cache()


def _qkv(B, H, N, D, dtype=torch.float32, model_layout=False):
    """q, k, v (B, H, N, D); with ``model_layout`` v is the model's permuted view of a packed
    (B, N, 3, H, D) projection (no unit stride but the last)."""
    q, k = torch.randn(B, H, N, D, dtype=torch.float64), torch.randn(B, H, N, D, dtype=torch.float64)
    if model_layout:
        v = torch.randn(B, N, 3, H, D, dtype=torch.float64)[:, :, 2].transpose(1, 2)
    else:
        v = torch.randn(B, H, N, D, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (q, k, v))


def _reference(q, k, v):
    q, k, v = (t.double() for t in (q, k, v))
    return ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1) @ v


# -- numerics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,model_layout", [((2, 3, 37, 64), False), ((2, 2, 64, 72), True)])
def test_cpu_backends_match_float64_attention(backend, dtype, shape, model_layout):
    q, k, v = _qkv(*shape, dtype=dtype, model_layout=model_layout)
    out = A.attention(q, k, v, backend)
    assert out.shape == shape and out.dtype == dtype
    # The CPU kernels accumulate in fp32 and round once to the output dtype: at most half an
    # ulp of max|v| (outputs are convex combinations of v's rows) plus a few fp32 roundings
    # (measured: <= 2.2 fp32 eps for fp32, 0.11 bf16 eps for bf16).
    vmax = v.double().abs().max().item()
    tol = (0.5 * torch.finfo(dtype).eps + 4 * torch.finfo(torch.float32).eps) * vmax
    err = (out.double() - _reference(q, k, v)).abs().max().item()
    assert err <= tol, (backend, err, tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("N,D", [(37, 64), (64, 72)])
def test_cpu_backends_gradients_match_float64(backend, N, D):
    q, k, v = _qkv(2, 2, N, D, dtype=torch.float64)
    grad_out = torch.randn(2, 2, N, D, dtype=torch.float64)

    def grads(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(fn(*leaves), leaves, grad_out.to(dtype))

    ref = grads(_reference, torch.float64)
    got = grads(lambda *t: A.attention(*t, backend), torch.float32)
    # backward reduces over N keys (dq, dk) or N queries (dv): rounding grows like log2(N)
    # fp32 eps; measured <= 7.3 eps x max|grad| at N = 64, allowed 4 log2(N) eps
    eps = torch.finfo(torch.float32).eps
    for name, g, r in zip("qkv", got, ref):
        err = (g.double() - r).abs().max().item()
        tol = 4 * math.log2(N) * eps * r.abs().max().item()
        assert err <= tol, (backend, name, err, tol)


def test_auto_on_cpu_is_plain_sdpa_untimed():
    q, k, v = _qkv(2, 2, 16, 64, model_layout=True)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    assert torch.equal(A.attention(*leaves, "auto"), F.scaled_dot_product_attention(*leaves))
    assert A.autotune_choices() == {}  # nothing timed, nothing cached


def test_meta_device_runs_any_backend_for_flop_counting():
    from vitok_fast.flops import count_vitok

    auto = count_vitok(ViTokConfig.from_name("T-T/8"), 32)["total"]["macs"]
    pinned = count_vitok(ViTokConfig.from_name("T-T/8", attention_backend="cudnn"), 32)["total"]["macs"]
    assert pinned == auto > 0


# -- names and devices ------------------------------------------------------------------------


def test_unknown_backend_is_a_clear_error():
    q, k, v = _qkv(1, 2, 8, 64)
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash3'; expected one of "
                                         r"\['sdpa', 'auto', 'flash', 'cudnn', 'efficient', 'math', 'fa4'\]"):
        A.attention(q, k, v, "flash3")
    with pytest.raises(ValueError, match=r"ViTokConfig.attention_backend must be one of .*'fa4'.*got 'Flash'"):
        ViTokConfig.from_name("T-T/8", attention_backend="Flash")
    with pytest.raises(ValueError, match="unknown attention backend"):
        Attention(64, 2, use_kernels=False, backend="xformers")


@pytest.mark.parametrize("backend", [n for n, s in A.SUPPORT.items() if "cpu" not in s.devices])
def test_cuda_only_backend_on_cpu_is_a_clear_error(backend):
    # decided: an error, not a silent fallback (a pinned backend must not quietly run another)
    q, k, v = _qkv(1, 2, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=rf"'{backend}' runs on cuda tensors, got cpu tensors; "
                                         r"pin a backend .*'sdpa'.*attention_backend='sdpa'"):
        A.attention(q, k, v, backend)


def test_fa4_adapter_passes_bnhd_views_and_unpacks_out_lse(monkeypatch):
    """FA4 (flash-attn-4 4.0.0b36: flash_attn.cute.flash_attn_func) takes (B, N, H, D) with a
    unit last stride and returns (out, lse); a stand-in with that contract, run on the CPU,
    checks the adapter's transposes (the real kernel needs a Hopper/Blackwell GPU)."""
    q, k, v = _qkv(2, 3, 16, 72, model_layout=True)
    seen = []

    def fake_flash_attn_func(q, k, v, softmax_scale=None):
        seen.append((tuple(q.shape), q.stride(-1), k.data_ptr(), v.data_ptr()))
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        return out.transpose(1, 2), torch.zeros(2, 3, 16)

    monkeypatch.setattr(A, "_fa4_import", lambda: (fake_flash_attn_func, None))
    assert torch.equal(A._fa4(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert seen == [((2, 16, 3, 72), 1, k.data_ptr(), v.data_ptr())]  # views: no copies
    monkeypatch.setattr(A, "_fa4_import", lambda: (None, "ModuleNotFoundError: No module named 'flash_attn'"))
    with pytest.raises(ImportError, match=r"'fa4' needs the flash-attn-4 package \(pip install --pre "
                                          r"flash-attn-4\), which did not import: ModuleNotFound"):
        A._fa4(q, k, v)


# -- the CUDA tuner's logic, run on the CPU with CPU candidates -----------------------------


def test_autotune_picks_fastest_correct_candidate_and_caches_it():
    q, k, v = _qkv(2, 2, 32, 72, model_layout=True)
    with pytest.warns(UserWarning, match="'auto' skips attention backend 'efficient' runs on cuda"):
        entry = A.autotune(q, k, v, candidates=("math", "flash", "sdpa", "efficient"))
    assert entry["errors"] == {"efficient": "unsupported: attention backend 'efficient' runs on "
                                            "cuda tensors, got cpu tensors"}
    assert set(entry["ms"]) == {"math", "flash", "sdpa"} and min(entry["ms"].values()) > 0
    assert entry["backend"] == min(entry["ms"], key=entry["ms"].get)
    assert entry["compiled"] == min(("math", "flash"), key=entry["ms"].get)  # SDPA restricted ones
    # no grad needed here: a forward-only entry; later calls are a lookup
    assert list(A.autotune_choices()) == ["2x2x32x72 float32 cpu fwd"]
    assert A._cached_or_tuned(q, k, v) == entry["backend"]
    assert len(A.autotune_choices()) == 1


def test_autotune_drops_a_wrong_kernel(monkeypatch):
    q, k, v = _qkv(1, 2, 16, 64)
    monkeypatch.setitem(A._CALLS, "flash",
                        lambda q, k, v, scale=None: F.scaled_dot_product_attention(q, k, v) + 0.1)
    entry = A.autotune(q, k, v, candidates=("flash", "math"))
    assert entry["backend"] == "math" and set(entry["ms"]) == {"math"}
    assert entry["errors"]["flash"].startswith("wrong: out differs from the torch.float64 reference")


def test_check_stays_in_the_inputs_dtype_under_autocast():
    # scores of magnitude ~ 9 * 8 (|q|, |k| ~ 3 over 64 dims): under the caller's bf16
    # autocast the fp32 kernel and the float64 reference must not run in bf16
    q, k, v = (3 * t for t in _qkv(1, 2, 64, 64))
    plain = A.check_backend("math", q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = A.check_backend("math", q, k, v)
    assert inside["max_rel_err"] == plain["max_rel_err"] < plain["bound"] < 1e-3


def test_autotune_inside_checkpoint_keeps_gradients_exact():
    """Timing a backward inside the model's forward, under activation checkpointing's
    saved-tensor hooks, must neither fail nor disturb the outer gradients, nor move the
    global RNG (exact resume)."""
    q, k, v = _qkv(1, 2, 16, 64, dtype=torch.float64)
    x = torch.randn(1, 2, 16, 64, dtype=torch.float64, requires_grad=True)

    def block(x, tune):
        qq = q + x
        if tune:
            entry = A.autotune(qq, k, v, candidates=("math", "sdpa"))
            assert entry["errors"] == {} and set(entry["ms"]) == {"math", "sdpa"}
        return F.scaled_dot_product_attention(qq, k, v).square().sum()

    plain = torch.autograd.grad(block(x, False), x)[0]
    rng = torch.get_rng_state()
    ckpt = torch.utils.checkpoint.checkpoint(block, x, True, use_reentrant=False)
    assert torch.equal(torch.get_rng_state(), rng)  # tuning drew from its own generator
    assert torch.equal(torch.autograd.grad(ckpt, x)[0], plain)
    assert list(A.autotune_choices()) == ["1x2x16x64 float64 cpu fwd+bwd"]


def test_compiled_graph_reads_the_cache_and_never_times():
    """While torch.compile traces, the tuner's lookup is a constant: the cached choice for
    compiled graphs (an SDPA backend) or plain SDPA on a miss; a pinned backend traces
    through sdpa_kernel with no graph break."""
    q, k, v = _qkv(1, 2, 16, 64)
    hit = q.clone().requires_grad_()  # its key ("fwd+bwd") is cached below, q's ("fwd") is not
    A._CHOICES[A._key(hit, k, v)] = {"backend": "fa4", "compiled": "math", "ms": {}, "errors": {}}

    def f(q, hit, k, v):
        return (A._CALLS[A._cached_or_tuned(hit, k, v)](hit, k, v), A._cached_or_tuned(q, k, v),
                A.attention(q, k, v, "math"))

    explained = torch._dynamo.explain(f)(q, hit, k, v)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    out, missed, pinned = torch.compile(f, fullgraph=True)(q, hit, k, v)
    assert missed == "sdpa"
    ref = _reference(q, k, v)
    assert (out.double() - ref).abs().max() < 1e-5 and (pinned.double() - ref).abs().max() < 1e-5
    assert len(A.autotune_choices()) == 1  # the miss was not tuned


def test_tune_runs_compiled_blocks_eagerly_and_fills_the_cache(monkeypatch):
    """attention.tune: a model whose blocks are compiled (as train/stage1.py --compile does)
    runs its tuning forward eagerly — nothing is traced — so every attention key is timed;
    the RNG and .grad are untouched. The CUDA-only part of "auto" is routed to the CPU tuner."""
    monkeypatch.setattr(A, "_auto", A._cached_or_tuned)  # tune on the CPU, as on CUDA
    model = ViTok.from_name("T-T/8", use_kernels=False, attention_backend="auto")
    for transformer in (model.encoder.transformer, model.decoder.transformer):
        for block in transformer.blocks:
            block.compile()
    model.encoder.requires_grad_(False)  # stage 2: a frozen encoder is tuned forward-only
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch._dynamo.reset()
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    rng = torch.get_rng_state()
    choices = A.tune(model, x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # nothing compiled
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    # 16 tokens, 2 heads of 32, fp32: the encoder forward-only, the decoder forward+backward
    assert sorted(choices) == ["2x2x16x32 float32 cpu fwd", "2x2x16x32 float32 cpu fwd+bwd"]
    assert all(c["backend"] in ("sdpa", "flash", "math") for c in choices.values())


# -- the model --------------------------------------------------------------------------------


def _old_attention_forward(self, x, cos, sin):
    """model.py's Attention.forward before the backends existed (commit 66666c8)."""
    B, N, D = x.shape
    q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
    q, k = ops.rope_3d_qk(q, k, cos, sin, self.use_kernels)
    out = F.scaled_dot_product_attention(q, k, v)
    return self.proj(out.transpose(1, 2).reshape(B, N, D))


def _run(model, x):
    g = torch.Generator().manual_seed(1)
    rec, post = model(x, generator=g)
    loss = rec.square().mean() + post.kl()
    return rec, post.mean, torch.autograd.grad(loss, list(model.parameters()))


def test_model_output_and_gradients_unchanged_by_the_refactor(monkeypatch):
    model = ViTok.from_name("T-T/8", use_kernels=False)
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    new = _run(model, x)
    monkeypatch.setattr(Attention, "forward", _old_attention_forward)
    old = _run(model, x)
    assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])
    assert all(torch.equal(a, b) for a, b in zip(new[2], old[2]))


def test_default_backend_is_sdpa_everywhere():
    from vitok_fast.training import add_common_args
    import argparse

    parser = argparse.ArgumentParser()
    add_common_args(parser)
    assert parser.parse_args([]).attention_backend == "sdpa"
    assert ViTokConfig.from_name("T-T/8").attention_backend == "sdpa"
    model = ViTok.from_name("T-T/8", use_kernels=False)
    assert {m.backend for m in model.modules() if isinstance(m, Attention)} == {"sdpa"}
    assert Attention(64, 2, use_kernels=False).backend == "sdpa"


def test_pinned_backends_keep_weights_and_agree():
    auto = ViTok.from_name("T-T/8", use_kernels=False)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    ref = _run(auto, x)[0]
    for backend in ("math", "flash", "sdpa"):
        model = ViTok.from_name("T-T/8", use_kernels=False, attention_backend=backend)
        model.load_state_dict(auto.state_dict())  # same keys and shapes: strict load passes
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in auto.parameters())
        assert {m.backend for m in model.modules() if isinstance(m, Attention)} == {backend}
        # the kernels differ only in fp32 rounding; the pixels are O(1)
        assert (_run(model, x)[0] - ref).abs().max() < 1e-5


def test_attention_backend_round_trips_through_config_json(tmp_path):
    model = ViTok.from_name("T-T/8", use_kernels=False, attention_backend="math")
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert config["attention_backend"] == "math"
    loaded = ViTok.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.attention_backend == "math"
    assert {m.backend for m in loaded.modules() if isinstance(m, Attention)} == {"math"}
    assert ViTok.from_pretrained(tmp_path / "ckpt", attention_backend="sdpa").config.attention_backend == "sdpa"
    # a config.json written before the field existed loads with the default
    del config["attention_backend"]
    (tmp_path / "ckpt" / CONFIG_FILE).write_text(json.dumps(config))
    old = ViTok.from_pretrained(tmp_path / "ckpt")
    assert old.config.attention_backend == "sdpa"
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert (old(x, sample=False)[0] - loaded(x, sample=False)[0]).abs().max() < 1e-5
