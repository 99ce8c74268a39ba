"""vitok_fast.diffusers.AutoencoderViTok: AutoencoderKL's interface, ViTok's numbers bit for bit."""

import dataclasses
import importlib
import inspect
import json
import sys

import numpy as np
import pytest
import torch

from vitok_fast import ViTok, ViTokConfig

diffusers = pytest.importorskip("diffusers")
from vitok_fast.diffusers import AutoencoderViTok, DiagonalGaussianDistribution  # noqa: E402

STATS = {"shift_factor": 0.25, "scaling_factor": 0.5, "mean": [0.0] * 16, "std": [2.0] * 16}


def _vitok(name="T-T/8"):
    model = ViTok.from_name(name, use_kernels=False).eval()
    with torch.no_grad():  # non-trivial weights everywhere, norms included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def pair():
    model = _vitok()
    return model, AutoencoderViTok.from_vitok(model, stats=STATS)


X = lambda: torch.rand(2, 3, 32, 48) * 2 - 1  # noqa: E731


def test_encode_equals_vitok_bit_for_bit(pair):
    model, vae = pair
    x = X()
    with torch.no_grad():
        post, ref = vae.encode(x).latent_dist, model.encode(x)
    assert isinstance(post, DiagonalGaussianDistribution) and post.mean.shape == (2, 16, 4, 6)
    assert torch.equal(post.mean, ref.mean) and torch.equal(post.logvar, ref.logvar)
    assert torch.equal(post.std, ref.std) and torch.equal(post.mode(), ref.mean)
    assert torch.equal(post.sample(_gen(3)), ref.sample(_gen(3)))
    assert not torch.equal(post.sample(_gen(3)), post.sample(_gen(4)))


def test_decode_equals_vitok_bit_for_bit(pair):
    model, vae = pair
    z = torch.randn(2, 16, 4, 6)
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, model.decode(z))


def test_forward_decodes_the_mean_by_default_unlike_vitok(pair):
    model, vae = pair
    x = X()
    with torch.no_grad():
        mean_recon = vae(x).sample
        assert torch.equal(mean_recon, model(x, sample=False)[0])
        sampled = vae(x, sample_posterior=True, generator=_gen(5)).sample
        assert torch.equal(sampled, model(x, generator=_gen(5))[0])  # ViTok samples by default
        assert (sampled - mean_recon).abs().max() > 0


def test_return_dict_false_gives_tuples(pair):
    model, vae = pair
    x = X()
    with torch.no_grad():
        (post,) = vae.encode(x, return_dict=False)
        (pixels,) = vae.decode(post.mode(), return_dict=False)
        (recon,) = vae(x, return_dict=False)
    assert torch.equal(post.mean, model.encode(x).mean)
    assert torch.equal(pixels, recon) and pixels.shape == (2, 3, 32, 48)


@pytest.mark.parametrize("name, shape", [("T-T/8", (3, 3, 16, 24)), ("T-T/2x8", (2, 3, 4, 16, 16))])
def test_kl_is_a_per_sample_sum_and_vitoks_is_the_mean(name, shape):
    model = _vitok(name)
    vae = AutoencoderViTok.from_vitok(model)
    x = torch.rand(shape) * 2 - 1
    with torch.no_grad():
        post, vitok_post = vae.encode(x).latent_dist, model.encode(x)
    m, lv = post.mean.double().numpy(), post.logvar.double().numpy()
    per_item = 0.5 * (m**2 + np.exp(lv) - 1 - lv).reshape(shape[0], -1)
    kl = post.kl()
    assert kl.shape == (shape[0],) and kl.dtype == torch.float32
    np.testing.assert_allclose(kl.numpy(), per_item.sum(1), rtol=1e-5)
    # ViTok's own kl(): one scalar, the mean over batch, tokens and channels
    assert vitok_post.kl().ndim == 0
    np.testing.assert_allclose(vitok_post.kl().item(), per_item.mean(), rtol=1e-5)
    per_value = kl / post.mean[0].numel()  # the wrapper's KL per latent value, then the batch mean
    np.testing.assert_allclose(per_value.mean().item(), vitok_post.kl().item(), rtol=1e-5)


def test_kl_std_and_sample_match_diffusers_own_distribution(pair):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as Reference
    model, vae = pair
    with torch.no_grad():
        post = vae.encode(X()).latent_dist
        other = vae.encode(X()).latent_dist
    ref = Reference(torch.cat([post.mean, post.logvar], dim=1))
    ref_other = Reference(torch.cat([other.mean, other.logvar], dim=1))
    assert torch.equal(post.std, ref.std) and torch.equal(post.var, ref.var)
    assert torch.equal(post.sample(_gen(7)), ref.sample(_gen(7)))
    torch.testing.assert_close(post.kl(), ref.kl(), rtol=1e-6, atol=0)
    torch.testing.assert_close(post.kl(other), ref.kl(ref_other), rtol=1e-6, atol=0)
    assert post.kl().shape == (2,) and (post.kl(post) == 0).all()


def test_config_holds_latent_factors_and_channels(pair, tmp_path):
    model, vae = pair
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.5, 0.25)
    assert vae.config.latent_channels == 16 and vae.config.name == "T-T/8"
    plain = AutoencoderViTok.from_vitok(model)
    assert (plain.config.scaling_factor, plain.config.shift_factor) == (1.0, 0.0)
    (tmp_path / "stats.json").write_text(json.dumps({**STATS, "scaling_factor": 0.125}))
    from_path = AutoencoderViTok.from_vitok(model, stats=tmp_path / "stats.json")
    assert from_path.config.scaling_factor == 0.125
    assert vae.vitok is model  # the same weights, not a copy


@pytest.mark.parametrize("stats, error, match", [
    ({"scaling_factor": 0.5}, ValueError, r"must hold 'shift_factor' and 'scaling_factor'.*got \['scaling_factor'\]"),
    ({"scaling_factor": 0.0, "shift_factor": 0.0}, ValueError, r"scaling_factor must be > 0"),
    ({"scaling_factor": float("nan"), "shift_factor": 0.0}, ValueError, r"scaling_factor must be a finite number"),
    ("/nonexistent/stats.json", FileNotFoundError, r"expected a stats.json .* at /nonexistent/stats.json"),
])
def test_bad_stats_say_what_is_expected(stats, error, match):
    with pytest.raises(error, match=match):
        AutoencoderViTok.from_vitok(_vitok(), stats=stats)


def test_tiling_runs_vitoks_tiled_encode_and_decode():
    model = _vitok()
    vae = AutoencoderViTok.from_vitok(model)
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        whole = vae.encode(x).latent_dist.mean
        vae.enable_tiling(32, 8)
        tiled = vae.encode(x).latent_dist.mean
        assert torch.equal(tiled, model.encode(x, tile=32, overlap=8).mean)
        assert (tiled - whole).abs().max() > 0  # the tiles really are separate passes
        assert torch.equal(vae.decode(tiled).sample, model.decode(tiled, tile=32, overlap=8))
        vae.disable_tiling()
        assert torch.equal(vae.encode(x).latent_dist.mean, whole)


def test_save_and_load_in_diffusers_layout_round_trips_bit_for_bit(pair, tmp_path):
    model, vae = pair
    vae.save_pretrained(tmp_path / "vae")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "vitok_autoencoder.py"]
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderViTok"
    assert config["auto_map"] == {"AutoModel": "vitok_autoencoder.AutoencoderViTok"}
    assert (config["scaling_factor"], config["shift_factor"], config["latent_channels"]) == (0.5, 0.25, 16)
    loaded = AutoencoderViTok.from_pretrained(tmp_path / "vae").eval()
    assert loaded.vitok.config == model.config
    x = X()
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).latent_dist.mean, model.encode(x).mean)
        assert torch.equal(loaded(x, sample_posterior=True, generator=_gen(1)).sample,
                           model(x, generator=_gen(1))[0])
    half = AutoencoderViTok.from_pretrained(tmp_path / "vae", torch_dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_video_model_forward_equals_vitok():
    model = _vitok("T-T/2x8")
    vae = AutoencoderViTok.from_vitok(model)
    x = torch.rand(1, 3, 4, 16, 24) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae(x, sample_posterior=True, generator=_gen(2)).sample,
                           model(x, generator=_gen(2))[0])
    assert vae.config.tubelet_size == 2


def test_init_arguments_mirror_vitokconfig():
    params = inspect.signature(AutoencoderViTok.__init__).parameters
    fields = {f.name: f.default for f in dataclasses.fields(ViTokConfig)}
    fields["latent_channels"] = fields.pop("channels")
    assert set(params) - {"self"} == set(fields) | {"scaling_factor", "shift_factor", "sample_size"}
    assert {k: params[k].default for k in fields} == fields


def test_without_diffusers_the_import_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "vitok_fast.diffusers")
    with pytest.raises(ImportError, match=r"needs diffusers: pip install 'vitok_fast\[diffusers\]'"):
        importlib.import_module("vitok_fast.diffusers")
