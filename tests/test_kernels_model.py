"""The model's kernel path (use_kernels=True) against its reference path (use_kernels=False),
on ``device`` (compiled kernels on CUDA, interpreted on the CPU). Both paths run the "math"
attention backend: the comparison isolates the fused ops, and math's backward is
deterministic on CUDA (the memory-efficient kernel's is not), which the bit-exact
checkpointing test needs."""

import pytest
import torch

from vitok_fast.model import ViTok

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [("T-T/8", (2, 3, 32, 32)), ("T-T/2x8", (1, 3, 4, 16, 16))]


def _pair(name, device, dtype=torch.float32):
    torch.manual_seed(0)
    fused = ViTok.from_name(name, use_kernels=True, attention_backend="math")
    plain = ViTok.from_name(name, use_kernels=False, attention_backend="math")
    plain.load_state_dict(fused.state_dict())
    return fused.to(device, dtype), plain.to(device, dtype)


def _run(model, x):
    model.zero_grad(set_to_none=True)
    recon, posterior = model(x, sample=False)
    loss = recon.float().square().mean() + posterior.kl()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return recon.detach(), posterior.mean.detach(), grads


def _rel(a, b):
    """Error of a relative to the reference b, in the norm: ||a - b|| / ||b||."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("name,shape", CASES, ids=[c[0] for c in CASES])
def test_kernel_path_matches_reference_path_fp32(name, shape, device):
    fused, plain = _pair(name, device)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters())
    x = torch.rand(shape, device=device) * 2 - 1
    (r1, m1, g1), (r2, m2, g2) = _run(fused, x), _run(plain, x)
    # Both paths are fp32 throughout and differ only in summation order inside each op
    # (each op's relative difference is a few u32 * log2(width) ~ 1e-6 at most, see
    # vitok_fast/kernel_bounds.py); over the ~20 ops of the T models' forward and backward chain the
    # differences add up to ~2e-5 relative in the worst case; 1e-4 leaves 5x for the
    # amplification through attention and the norms, and is 100x below a real bug's error.
    assert _rel(r1, r2) < 1e-4 and _rel(m1, m2) < 1e-4
    assert g1.keys() == g2.keys()
    for key in g1:
        assert _rel(g1[key], g2[key]) < 1e-4, key


@pytest.mark.parametrize("name,shape", CASES, ids=[c[0] for c in CASES])
def test_kernel_path_is_as_accurate_as_reference_path_bf16(name, shape, device):
    # In bf16 both paths round every op's output to 8 significant bits, at different
    # places (the kernels round once per fused op, eager rounds after every primitive,
    # and the CPU interpreter truncates), so they cannot agree bit for bit. The claim that
    # can be checked without tuning: measured against the same model in float64, the kernel
    # path's error is no larger than twice the reference path's, plus bf16's unit
    # roundoff 2^-8 (one rounding more or less on any tensor).
    fused, plain = _pair(name, device, torch.bfloat16)
    _, exact = _pair(name, device, torch.float64)
    x = (torch.rand(shape, device=device) * 2 - 1).to(torch.bfloat16)
    out_k, out_r, out_64 = _run(fused, x), _run(plain, x), _run(exact, x.double())
    for what, k, r, e in (("recon", out_k[0], out_r[0], out_64[0]),
                          ("mean", out_k[1], out_r[1], out_64[1])):
        assert _rel(k, e) <= 2 * _rel(r, e) + 2 ** -8, what
    for key in out_64[2]:
        err_k, err_r = _rel(out_k[2][key], out_64[2][key]), _rel(out_r[2][key], out_64[2][key])
        assert err_k <= 2 * err_r + 2 ** -8, f"{key}: kernel {err_k:.3e} vs reference {err_r:.3e}"


def test_kernel_path_with_grad_checkpointing_matches(device):
    fused, _ = _pair("T-T/8", device)
    x = torch.rand(1, 3, 16, 16, device=device) * 2 - 1
    r1, _, g1 = _run(fused, x)
    fused.set_grad_checkpointing(True)
    r2, _, g2 = _run(fused, x)
    assert torch.equal(r1, r2)
    for key in g1:
        assert torch.equal(g1[key], g2[key]), key


def test_state_dict_keys_unchanged_by_fused_blocks():
    model = ViTok.from_name("T-T/8")
    keys = set(model.state_dict())
    block = "encoder.transformer.blocks.0."
    for k in ("attn_norm.weight", "attn.qkv.weight", "attn.proj.weight", "mlp_norm.weight",
              "mlp.w13.weight", "mlp.w2.weight"):
        assert block + k in keys
    assert "encoder.transformer.norm.weight" in keys and "decoder.head.bias" in keys


def test_kernel_path_follows_autocast_like_reference_path(device):
    # custom autograd Functions bypass autocast; the GEMM kernels cast as F.linear would, so
    # under bf16 autocast both paths produce the same dtypes and close values
    fused, plain = _pair("T-T/8", device)
    x = torch.rand(1, 3, 16, 16, device=device) * 2 - 1
    with torch.autocast(device.type, dtype=torch.bfloat16):
        outs = [m(x, sample=False) for m in (fused, plain)]
        embeds = [m.encoder.transformer.blocks[0].attn_norm.weight.dtype for m in (fused, plain)]
    (r1, p1), (r2, p2) = outs
    assert r1.dtype == r2.dtype == torch.bfloat16 and p1.mean.dtype == p2.mean.dtype
    assert embeds[0] == embeds[1] == torch.float32
    # both are bf16 computations of the same fp32 model: compared with the fp32 model, the
    # kernel path's error is at most twice the reference path's plus bf16's unit roundoff
    with torch.no_grad():
        exact, _ = plain(x, sample=False)
    assert _rel(r1, exact) <= 2 * _rel(r2, exact) + 2 ** -8


def test_float64_model_runs_reference_maths_even_with_kernels_on(device):
    # the kernels compute in fp32; a float64 model must not silently drop to fp32
    fused, plain = _pair("T-T/8", device, torch.float64)
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64, device=device) * 2 - 1
    r1, _, g1 = _run(fused, x)
    r2, _, g2 = _run(plain, x)
    assert torch.equal(r1, r2)
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
