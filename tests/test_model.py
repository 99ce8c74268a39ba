"""Model shapes, parameter counts, conventions of docs/design.md section 4, variable resolution."""

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from vitok_fast import PAPER_VARIANTS, ViTok, ViTokConfig
from vitok_fast.kernels import patchify, unpatchify


def tiny(name="T-T/8", **kw):
    return ViTok.from_name(name, use_kernels=False, **kw).eval()


@pytest.mark.parametrize("name", PAPER_VARIANTS)
def test_paper_variant_shapes_on_meta(name):
    cfg = ViTokConfig.from_name(name)
    with torch.device("meta"):
        model = ViTok(cfg)
        size = (1, 3, 16, 128, 128) if cfg.is_video else (1, 3, 256, 256)
        x = torch.empty(size)
    rec, post = model(x, sample=False)
    assert rec.shape == x.shape
    t, h, w = cfg.grid(*(size[2:] if cfg.is_video else (1, *size[2:])))
    latent = (1, cfg.channels, t, h, w) if cfg.is_video else (1, cfg.channels, h, w)
    assert tuple(post.mean.shape) == latent
    assert post.mean.numel() == cfg.E(*(size[2:] if cfg.is_video else (1, *size[2:])))


@pytest.mark.parametrize("name,x_shape,z_shape", [
    ("T-T/8", (2, 3, 32, 48), (2, 16, 4, 6)),
    ("T-T/16", (1, 3, 32, 32), (1, 16, 2, 2)),
    ("T-T/2x8", (2, 3, 4, 16, 24), (2, 16, 2, 2, 3)),
    ("T-T/1x8", (1, 3, 3, 16, 16), (1, 16, 3, 2, 2)),
])
def test_tiny_forward_shapes_and_finite(name, x_shape, z_shape):
    model = tiny(name, channels=16)
    x = torch.rand(x_shape) * 2 - 1
    rec, post = model(x)
    assert rec.shape == x.shape and tuple(post.mean.shape) == z_shape
    assert torch.isfinite(rec).all() and torch.isfinite(post.kl())


def _analytic_params(cfg: ViTokConfig) -> tuple[int, int]:
    """Independent count from docs/design.md section 1: 4d^2 attention + 3 d h SwiGLU + 2 norms per block."""
    def stack(d, depth, hidden):
        return depth * (4 * d * d + 3 * d * hidden + 2 * d) + d
    P, c = cfg.patch_dim, cfg.channels
    enc = (P * cfg.encoder_width + cfg.encoder_width
           + stack(cfg.encoder_width, cfg.encoder_depth, cfg.encoder_mlp_hidden)
           + cfg.encoder_width * 2 * c + 2 * c)
    dec = (c * cfg.decoder_width + cfg.decoder_width
           + stack(cfg.decoder_width, cfg.decoder_depth, cfg.decoder_mlp_hidden)
           + cfg.decoder_width * P + P)
    return enc, dec


@pytest.mark.parametrize("name,paper_total_m", [
    ("S-B/16", 129.0), ("S-L/16", 426.8), ("B-B/16", 171.6), ("S-B/8", None), ("S-B/4x8", None)])
def test_parameter_counts(name, paper_total_m):
    cfg = ViTokConfig.from_name(name)
    with torch.device("meta"):
        model = ViTok(cfg)
    enc = sum(p.numel() for p in model.encoder.parameters())
    dec = sum(p.numel() for p in model.decoder.parameters())
    assert (enc, dec) == _analytic_params(cfg)
    if paper_total_m is not None:
        # [paper] Table 1/3; our blocks have no biases, the paper's count has ~0.3% more.
        assert abs((enc + dec) / 1e6 - paper_total_m) / paper_total_m < 0.01


def test_paper_table1_sizes():
    # S encoder and B decoder of S-B/16 against Table 1's 43.3M / 85.8M.
    with torch.device("meta"):
        model = ViTok.from_name("S-B/16")
    enc = sum(p.numel() for p in model.encoder.parameters()) / 1e6
    dec = sum(p.numel() for p in model.decoder.parameters()) / 1e6
    assert abs(enc - 43.3) / 43.3 < 0.01 and abs(dec - 85.8) / 85.8 < 0.01


def test_patchify_matches_spec_and_unpatchify_inverts():
    x = torch.randn(2, 3, 8, 32, 48)
    tokens = patchify(x, 4, 8)
    spec = rearrange(x, "b c (t q) (h p1) (w p2) -> b (t h w) (q p1 p2 c)", q=4, p1=8, p2=8)
    assert torch.equal(tokens, spec)
    assert tokens.shape == (2, 2 * 4 * 6, 4 * 8 * 8 * 3)
    assert torch.equal(unpatchify(tokens, 4, 8, 8, 32, 48), x)
    image = torch.randn(2, 3, 32, 48)
    assert torch.equal(unpatchify(patchify(image, 1, 16), 1, 16, 1, 32, 48).squeeze(2), image)


def test_embed_is_a_linear_on_flattened_tubelets():
    # docs/design.md section 1: the paper's Conv3d(kernel = stride = q x p x p) is exactly a Linear on patchify(x).
    model = tiny("T-T/2x8")
    x = torch.randn(1, 3, 4, 16, 16)
    w = model.encoder.embed.weight  # (d, q*p*p*3), inputs ordered (q, p1, p2, c)
    conv_w = rearrange(w, "d (q p1 p2 c) -> d c q p1 p2", q=2, p1=8, p2=8)
    conv = F.conv3d(x, conv_w, model.encoder.embed.bias, stride=(2, 8, 8))
    from vitok_fast import ops
    ours = ops.tubelet_embed(x, w, model.encoder.embed.bias, 2, 8, use_kernels=False)
    torch.testing.assert_close(ours, rearrange(conv, "b d t h w -> b (t h w) d"))


def test_kl_matches_spec_formula_and_clamps_logvar():
    model = tiny()
    with torch.no_grad():  # push log-variances far outside [-30, 20]
        model.encoder.to_moments.bias[model.config.channels:] = 1e4
    post = model.encode(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert post.logvar.max().item() == 20.0
    m, lv = post.mean.double(), post.logvar.double()
    expected = 0.5 * torch.mean(m**2 + lv.exp() - 1 - lv)
    assert math.isclose(post.kl().item(), expected.item(), rel_tol=1e-5)


def test_sample_uses_mean_and_std():
    model = tiny()
    post = model.encode(torch.rand(1, 3, 16, 16) * 2 - 1)
    g = torch.Generator().manual_seed(1)
    z = post.sample(g)
    noise = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z, post.mean + torch.exp(0.5 * post.logvar) * noise)
    assert torch.equal(post.mode(), post.mean)


def test_variable_resolution_same_weights():
    model = tiny()
    a = torch.rand(1, 3, 64, 64) * 2 - 1
    b = torch.rand(1, 3, 96, 128) * 2 - 1
    ra, pa = model(a, sample=False)
    rb, pb = model(b, sample=False)
    assert ra.shape == a.shape and rb.shape == b.shape
    assert tuple(pb.mean.shape) == (1, 16, 12, 16)
    # A 64x64 crop is not the same input as the 96x128 image: different token grids.
    # What must hold is that the 64x64 input encodes identically in a batch of its own or
    # stacked with another 64x64 image (no batch coupling, no baked-in size).
    both, _ = model(torch.cat([a, a.flip(-1)]), sample=False)
    torch.testing.assert_close(both[:1], ra, rtol=1e-5, atol=1e-5)


def test_image_equals_single_frame_video_for_image_model():
    model = tiny()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    img, _ = model(x, sample=False)
    vid, post = model(x.unsqueeze(2), sample=False)
    assert post.mean.shape == (2, 16, 1, 4, 4)
    torch.testing.assert_close(vid.squeeze(2), img, rtol=1e-5, atol=1e-5)


def test_kernel_switch_paths_agree():
    cfg = ViTokConfig.from_name("T-T/8")
    fused = ViTok(cfg).eval()
    ref = ViTok(ViTokConfig.from_name("T-T/8", use_kernels=False)).eval()
    ref.load_state_dict(fused.state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out_fused, _ = fused(x, sample=False)
    out_ref, _ = ref(x, sample=False)
    torch.testing.assert_close(out_fused, out_ref, rtol=1e-4, atol=1e-5)


def test_nvtx_spans_are_free_when_disabled_and_named_when_enabled():
    from vitok_fast import profiling
    assert profiling.span("x") is profiling.span("y")  # one shared null context
    model = tiny()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    profiling.enable_ranges(True)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(x)
    finally:
        profiling.enable_ranges(False)
    names = {e.name for e in prof.events()}
    assert {"embed", "attention", "mlp", "bottleneck", "head"} <= names


def test_grad_checkpointing_gives_the_same_gradients():
    model = tiny().train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    def grads():
        model.zero_grad()
        rec, post = model(x, sample=False)
        (rec.square().mean() + post.kl()).backward()
        return [p.grad.clone() for p in model.parameters()]
    plain = grads()
    model.set_grad_checkpointing(True)
    ckpt = grads()
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
