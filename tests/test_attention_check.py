"""check_backend and the safety of "auto" (vitok_fast/attention.py), on the CPU: a correct
backend passes forward and backward on the model's real q, k, v views within the derived
bound; a wrong forward, wrong gradients (forward correct) or a wrong last head are caught;
"cannot run" is told apart from "wrong"; "auto" skips a backend the SUPPORT table rules out
(FA4 at ViTok-L's head dim 72) and says so once, skips an out-of-memory candidate for that
shape only, rejects wrong gradients, and under torch.distributed runs rank 0's choice on
every rank. CUDA runs of the same checks are in test_attention_cuda.py."""

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from vitok_fast import attention as A

U = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(autouse=True)
def _clean_state():
    A.clear_autotune_cache()
    A._SAID.clear()
    yield
    A.clear_autotune_cache()
    A._SAID.clear()


def _model_qkv(B, H, N, D, dtype=torch.float32, seed=0, amp=1.0):
    """q, k, v as the model's Attention has them: permuted views of one packed (B, N, 3, H, D)
    projection (strides (N*3*H*D, D, 3*H*D, 1)); ``amp`` scales q and k (sharper softmax)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, D, generator=g, dtype=torch.float64)
    qkv[:, :, :2] *= amp
    q, k, v = qkv.to(dtype).permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous()
    return q, k, v


class _Sabotaged(torch.autograd.Function):
    """Plain SDPA forward (correct); the backward's gradients are then broken by ``spoil``."""

    @staticmethod
    def forward(ctx, q, k, v, spoil):
        ctx.save_for_backward(q, k, v)
        ctx.spoil = spoil
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def backward(ctx, grad):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in ctx.saved_tensors]
            grads = torch.autograd.grad(F.scaled_dot_product_attention(*leaves), leaves, grad)
        return (*ctx.spoil(*grads), None)


def _sabotaged(spoil):
    return lambda q, k, v, scale=None: _Sabotaged.apply(q, k, v, spoil)


# -- check_backend ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "flash", "math"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_correct_cpu_backends_pass_forward_and_backward_on_model_views(backend, dtype):
    # ViTok-L's head dim 72, sharp scores (|q|, |k| x 3): the bound's alpha term is live
    q, k, v = _model_qkv(2, 3, 200, 72, dtype, amp=3.0)
    r = A.check_backend(backend, q, k, v)
    assert r["supported"] and r["ok"], r["error"]
    assert set(r["tensors"]) == {"out", "dq", "dk", "dv"}
    for t in r["tensors"].values():
        assert 0 < t["max_rel_err"] <= t["bound"]  # 0 would mean nothing was compared
    assert r["max_rel_err"] <= r["bound"]
    # half precision: a few roundings of the dtype (not a fudge); fp32: dominated by the
    # worst-case growth terms, (4 (D + 8) alpha + 4 N) u32 with alpha ~ 50 here
    assert r["bound"] < (12 * U[dtype] if dtype != torch.float32 else 1e-3)
    assert r["error"] is None


def test_bound_is_the_derived_formula():
    # bf16, D = 64, N = 4096, alpha = 8 (fp32 scores): out = 2u + 2 (N + 8) w + 4 (D + 8) w alpha
    u, w = 2.0 ** -8, 2.0 ** -24
    b = A.error_bounds(torch.bfloat16, head_dim=64, n_queries=4096, n_keys=4096, score_scale=8.0)
    eps_p = 2 * (72 * w * 8) + 4104 * w + u
    assert b["out"] == pytest.approx(eps_p + 4104 * w + u, rel=1e-12)
    assert b["dq"] == b["dk"] == pytest.approx(2 * eps_p + (4096 + 64 + 16) * w + 3 * u + 4104 * w + u)
    # 0.84% and 2.5%: about 2u and 6u
    assert b["out"] == pytest.approx(0.00837, abs=1e-5) and b["dq"] == pytest.approx(0.02456, abs=1e-5)
    # math with bf16 scores (allow_fp16_bf16_reduction_math_sdp): the alpha term grows to 3u
    loose = A.error_bounds(torch.bfloat16, head_dim=64, n_queries=4096, n_keys=4096,
                           score_scale=8.0, scores_in_dtype=True)
    assert loose["out"] - b["out"] == pytest.approx(2 * 3 * u * 8)
    # a blocked half-precision gradient (CPU flash: 32-row blocks) adds u per extra rounding
    blocked = A.error_bounds(torch.bfloat16, head_dim=64, n_queries=100, n_keys=100,
                             score_scale=1.0, partial_sum_terms=32)
    plain = A.error_bounds(torch.bfloat16, head_dim=64, n_queries=100, n_keys=100, score_scale=1.0)
    assert blocked["dv"] - plain["dv"] == pytest.approx(3 * u) and blocked["out"] == plain["out"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spoil,worst", [
    (lambda dq, dk, dv: (dq, torch.zeros_like(dk), dv), "dk"),   # a missing gradient
    (lambda dq, dk, dv: (dq, dv, dk), "dv"),                     # dk and dv swapped
    (lambda dq, dk, dv: (dq, dk, dv.roll(1, dims=1)), "dv"),     # heads mixed up
])
def test_wrong_gradients_with_a_correct_forward_are_rejected(monkeypatch, dtype, spoil, worst):
    q, k, v = _model_qkv(2, 4, 64, 64, dtype)
    monkeypatch.setitem(A._CALLS, "flash", _sabotaged(spoil))
    r = A.check_backend("flash", q, k, v)
    assert r["supported"] and not r["ok"] and r["worst"] == worst
    assert r["tensors"]["out"]["max_rel_err"] <= r["tensors"]["out"]["bound"]  # forward is fine
    assert r["max_rel_err"] > 3 * r["bound"]
    assert r["error"].startswith(f"wrong: {worst} differs from the torch.float64 reference by")


def test_a_wrong_last_head_is_caught_because_every_head_is_checked(monkeypatch):
    q, k, v = _model_qkv(3, 4, 32, 64, torch.bfloat16)

    def last_head_off(dq, dk, dv):
        dq = dq.clone()
        dq[-1, -1] *= -1
        return dq, dk, dv

    monkeypatch.setitem(A._CALLS, "flash", _sabotaged(last_head_off))
    r = A.check_backend("flash", q, k, v)
    assert not r["ok"] and r["worst"] == "dq" and r["max_rel_err"] > 3 * r["bound"]


def test_a_slightly_wrong_scale_is_caught_in_bf16(monkeypatch):
    q, k, v = _model_qkv(2, 2, 256, 64, torch.bfloat16)
    monkeypatch.setitem(A._CALLS, "flash", lambda q, k, v, scale=None:
                        F.scaled_dot_product_attention(q, k, v, scale=1.05 * q.shape[-1] ** -0.5))
    r = A.check_backend("flash", q, k, v)
    assert not r["ok"] and r["tensors"]["out"]["max_rel_err"] > 5 * r["tensors"]["out"]["bound"]


def test_nan_is_wrong_not_unsupported(monkeypatch):
    q, k, v = _model_qkv(1, 2, 16, 64)
    monkeypatch.setitem(A._CALLS, "flash", lambda q, k, v, scale=None:
                        F.scaled_dot_product_attention(q, k, v) * math.nan)
    r = A.check_backend("flash", q, k, v)
    assert r["supported"] and not r["ok"] and r["max_rel_err"] == math.inf


def test_cannot_run_is_unsupported_not_wrong(monkeypatch):
    q, k, v = _model_qkv(1, 2, 16, 64, torch.bfloat16)
    r = A.check_backend("cudnn", q, k, v)  # the table: CUDA only
    assert (r["ok"], r["supported"]) == (False, False)
    assert r["error"] == ("unsupported: attention backend 'cudnn' runs on cuda tensors, got cpu "
                          "tensors")
    assert math.isnan(r["max_rel_err"]) and r["tensors"] == {}

    def no_kernel(q, k, v, scale=None):
        raise RuntimeError("No available kernel. Aborting execution.")

    monkeypatch.setitem(A._CALLS, "flash", no_kernel)
    r = A.check_backend("flash", q, k, v)
    assert (r["ok"], r["supported"]) == (False, False)
    assert r["error"] == "unsupported: RuntimeError: No available kernel. Aborting execution."
    with pytest.raises(ValueError, match="check_backend checks one kernel; 'auto' is a choice"):
        A.check_backend("auto", q, k, v)


def test_check_leaves_inputs_rng_and_outer_graph_alone():
    q, k, v = _model_qkv(2, 2, 16, 64)
    q.requires_grad_()
    rng = torch.get_rng_state()
    r = A.check_backend("sdpa", q, k, v, scale=0.3)
    assert r["ok"] and q.grad is None
    assert torch.equal(torch.get_rng_state(), rng)  # grad_out came from a private generator
    # an explicit grad_out and scale are used, not the defaults
    g = torch.randn(2, 2, 16, 64)
    assert A.check_backend("sdpa", q, k, v, g, scale=0.3)["ok"]


# -- the SUPPORT table and pinned backends ----------------------------------------------------


def test_fa4_pinned_at_head_dim_72_names_the_supported_dims():
    assert A.SUPPORT["fa4"].head_dims == (64, 96, 128)
    q, k, v = _model_qkv(1, 2, 16, 72, torch.bfloat16)
    with pytest.raises(ValueError, match=r"attention backend 'fa4' supports head dims \[64, 96, 128\] "
                                         r"\(flash-attn-4's tested head dims\), got 72; pin a backend"):
        A.attention(q, k, v, "fa4")
    r = A.check_backend("fa4", q, k, v)
    assert not r["supported"] and "supports head dims [64, 96, 128]" in r["error"]
    assert A.unsupported("fa4", q.float()).startswith("attention backend 'fa4' supports head dims")
    q64 = _model_qkv(1, 2, 16, 64, torch.float32)[0]
    assert A.unsupported("fa4", q64) == ("attention backend 'fa4' supports dtypes "
                                         "['bfloat16', 'float16'], got float32")


def test_auto_skips_fa4_at_72_and_says_so_once():
    q, k, v = _model_qkv(1, 2, 16, 72, torch.bfloat16)
    with pytest.warns(UserWarning, match=r"attention 'auto' skips attention backend 'fa4' "
                                         r"supports head dims \[64, 96, 128\].*got 72"):
        entry = A.autotune(q, k, v, candidates=("fa4", "sdpa"))
    assert entry["backend"] == "sdpa" and "fa4" in entry["errors"] and set(entry["ms"]) == {"sdpa"}
    q2, k2, v2 = _model_qkv(2, 2, 16, 72, torch.bfloat16)  # another shape: skipped, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entry = A.autotune(q2, k2, v2, candidates=("fa4", "sdpa"))
    assert "fa4" in entry["errors"] and len(A.autotune_choices()) == 2


# -- "auto": out of memory, wrong gradients ---------------------------------------------------


def test_out_of_memory_skips_a_candidate_for_that_shape_only(monkeypatch):
    def flash_oom_at_32_tokens(q, k, v, scale=None):
        if q.shape[-2] == 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    monkeypatch.setitem(A._CALLS, "flash", flash_oom_at_32_tokens)
    big = A.autotune(*_model_qkv(1, 2, 32, 64), candidates=("flash", "math"))
    assert big["backend"] == "math" and set(big["ms"]) == {"math"}
    assert big["errors"]["flash"].startswith("unsupported: out of memory at q (1, 2, 32, 64)")
    small = A.autotune(*_model_qkv(1, 2, 16, 64), candidates=("flash", "math"))
    assert set(small["ms"]) == {"flash", "math"} and small["errors"] == {}  # tried again


def test_auto_rejects_a_fast_backend_with_wrong_gradients(monkeypatch):
    q, k, v = _model_qkv(2, 2, 32, 64, torch.bfloat16)
    monkeypatch.setitem(A._CALLS, "flash", _sabotaged(lambda dq, dk, dv: (dq, dv, dk)))
    monkeypatch.setattr(A, "_median_seconds", lambda fn, device: 1e-3)  # a tie: flash first
    entry = A.autotune(q, k, v, candidates=("flash", "math"))
    assert entry["backend"] == "math" and set(entry["ms"]) == {"math"}
    assert entry["errors"]["flash"].startswith("wrong: dv differs")
    # the same tie with an honest flash keeps flash: the rejection was the gradients
    monkeypatch.undo()
    monkeypatch.setattr(A, "_median_seconds", lambda fn, device: 1e-3)
    A.clear_autotune_cache()
    assert A.autotune(q, k, v, candidates=("flash", "math"))["backend"] == "flash"


# -- "auto" under torch.distributed: rank 0 chooses for everyone ------------------------------


def _rank_times(rank):
    """Fake timings that make rank 0 prefer math and rank 1 prefer flash."""
    fast = "math" if rank == 0 else "flash"
    return lambda call, leaves, grad_out: call, {A._CALLS[fast]: 1e-4}


def _ddp_worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}",
                                         rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        step, fast = _rank_times(rank)
        A._step = step
        A._median_seconds = lambda fn, device: fast.get(fn, 1e-3)
        q, k, v = _model_qkv(1, 2, 16, 64)
        entry = A.autotune(q, k, v, candidates=("flash", "math"))
        torch.save(entry, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_runs_rank_zeros_choice(tmp_path, monkeypatch):
    # alone, rank 1's timings pick flash: the broadcast is what makes it run math
    step, fast = _rank_times(1)
    monkeypatch.setattr(A, "_step", step)
    monkeypatch.setattr(A, "_median_seconds", lambda fn, device: fast.get(fn, 1e-3))
    assert A.autotune(*_model_qkv(1, 2, 16, 64), candidates=("flash", "math"))["backend"] == "flash"

    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)),
                                nprocs=2, join=True)
    entries = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [e["backend"] for e in entries] == ["math", "math"]
    assert entries[1] == entries[0]  # the whole entry (times, errors) is rank 0's
