"""Bad inputs give a clear error, raised at the edge, naming what was expected and what was given."""

import pytest
import torch

from vitok_fast import ViTok, ViTokConfig


@pytest.fixture(scope="module")
def image_model():
    return ViTok.from_name("T-T/8", use_kernels=False).eval()


@pytest.fixture(scope="module")
def video_model():
    return ViTok.from_name("T-T/2x8", use_kernels=False).eval()


@pytest.mark.parametrize("x,pattern", [
    (torch.zeros(3, 16, 16), r"images \(B, 3, H, W\) or videos \(B, 3, T, H, W\), got a 3-d tensor of shape \(3, 16, 16\)"),
    (torch.zeros(1, 1, 2, 3, 16, 16), r"got a 6-d tensor"),
    (torch.zeros(2, 1, 16, 16), r"expected 3 channels \(RGB\) in dim 1, got 1"),
    (torch.zeros(2, 4, 16, 16), r"expected 3 channels \(RGB\) in dim 1, got 4"),
    (torch.zeros(1, 3, 20, 16), r"H must be a positive multiple of the patch size 8 for T-T/8, got H = 20"),
    (torch.zeros(1, 3, 16, 30), r"W must be a positive multiple of the patch size 8 for T-T/8, got W = 30"),
    (torch.zeros(1, 3, 4, 16), r"H must be a positive multiple of the patch size 8 for T-T/8, got H = 4"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), r"floating-point pixels .* got dtype torch\.uint8"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.int64), r"got dtype torch\.int64"),
    (torch.zeros(0, 3, 16, 16), r"batch of at least 1, got an empty batch of shape \(0, 3, 16, 16\)"),
])
def test_bad_pixels_for_image_model(image_model, x, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        image_model.encode(x)
    with pytest.raises((ValueError, TypeError), match=pattern):
        image_model(x)


def test_not_a_tensor(image_model):
    with pytest.raises(TypeError, match="expected a torch.Tensor of pixels, got ndarray"):
        import numpy as np
        image_model.encode(np.zeros((1, 3, 16, 16), dtype=np.float32))


@pytest.mark.parametrize("x,pattern", [
    (torch.zeros(1, 3, 3, 16, 16), r"T must be a positive multiple of the tubelet size 2 for T-T/2x8, got T = 3"),
    (torch.zeros(1, 3, 16, 16), r"video model with tubelets of 2 frames: expected videos .* got images of shape \(1, 3, 16, 16\)"),
])
def test_bad_frames_for_video_model(video_model, x, pattern):
    with pytest.raises(ValueError, match=pattern):
        video_model.encode(x)


@pytest.mark.parametrize("z,pattern", [
    (torch.zeros(1, 8, 2, 2), r"expected 16 latent channels in dim 1, got 8"),
    (torch.zeros(1, 16, 2), r"expected latents \(B, 16, H', W'\) or \(B, 16, T', H', W'\), got a 3-d tensor"),
    (torch.zeros(1, 16, 2, 2, dtype=torch.int32), r"floating-point latent, got dtype torch\.int32"),
    (torch.zeros(0, 16, 2, 2), r"non-empty latent, got shape \(0, 16, 2, 2\)"),
])
def test_bad_latents(image_model, z, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        image_model.decode(z)


@pytest.mark.parametrize("name", ["S-X/16", "SB/16", "S-B/", "S-B/16x", "vitok", "S-B-L/16", ""])
def test_unknown_model_name(name):
    with pytest.raises(ValueError, match=rf"unknown model name {name!r}: expected '<enc>-<dec>/<p>'"):
        ViTokConfig.from_name(name)


@pytest.mark.parametrize("c", [0, -4])
def test_bottleneck_channels_must_be_positive(c):
    with pytest.raises(ValueError, match=rf"ViTokConfig.channels must be a positive integer, got {c}"):
        ViTokConfig.from_name("S-B/16", channels=c)


@pytest.mark.parametrize("width,heads,pattern", [
    (64, 16, r"encoder head dim must be even and at least 6 .* got 64/16 = 4"),
    (60, 4, r"encoder head dim must be even .* got 60/4 = 15"),
    (64, 3, r"encoder_width must be divisible by encoder_heads, got 64 and 3"),
])
def test_head_dim_that_cannot_be_split_for_3d_rope(width, heads, pattern):
    with pytest.raises(ValueError, match=pattern):
        ViTokConfig.from_name("T-T/8", encoder_width=width, encoder_heads=heads)


def test_unknown_override():
    with pytest.raises(TypeError, match=r"unknown ViTokConfig field\(s\) \['patch'\]"):
        ViTokConfig.from_name("S-B/16", patch=8)


def test_errors_raise_before_any_kernel_runs(image_model, monkeypatch):
    from vitok_fast import ops
    def boom(*a, **k):
        raise AssertionError("a kernel ran on bad input")
    monkeypatch.setattr(ops, "tubelet_embed", boom)
    with pytest.raises(ValueError, match="patch size"):
        image_model.encode(torch.zeros(1, 3, 20, 16))
