"""ViTok as a diffusers autoencoder: ``AutoencoderViTok``, used like ``AutoencoderKL``.

    from vitok_fast import ViTok
    from vitok_fast.diffusers import AutoencoderViTok

    vae = AutoencoderViTok.from_vitok(ViTok.from_pretrained("runs/stage1-S-B_16"), stats="latents/stats.json")
    z = vae.encode(x).latent_dist.sample(generator)          # x: (B, 3, H, W) in [-1, 1]
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor   # what a diffusion model sees
    x_hat = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample
    vae.save_pretrained("vae/")   # diffusers' layout: config.json + diffusion_pytorch_model.safetensors

The wrapper runs ViTok's own encode and decode, so its outputs equal ViTok's bit for bit.
Two conventions differ between ViTok and diffusers, and the wrapper follows diffusers:

- ``forward(sample, sample_posterior=False)`` decodes the posterior's mean by default;
  ViTok's ``model(x)`` samples the posterior by default (``sample=True``, as in training).
- ``latent_dist.kl()`` is per sample, a sum over every non-batch dim (shape ``(B,)``), as in
  diffusers and LDM; ViTok's ``posterior.kl()`` is one scalar, a mean over batch, tokens and
  channels.

As in ``AutoencoderKL``, encode and decode leave the latents unscaled: ``config.shift_factor``
and ``config.scaling_factor`` (from ``stats.json``) are for the diffusion model's side.

diffusers is an optional extra (``pip install 'vitok_fast[diffusers]'``); ``import
vitok_fast`` does not import this module.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch

from vitok_fast.config import ViTokConfig
from vitok_fast.model import DiagonalGaussian, ViTok

try:
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput
    from diffusers.models.modeling_outputs import AutoencoderKLOutput
    from diffusers.utils.accelerate_utils import apply_forward_hook
except ImportError as e:
    raise ImportError(f"vitok_fast.diffusers needs diffusers: pip install 'vitok_fast[diffusers]' "
                      f"(or pip install diffusers); importing it failed with: {e}") from None

_DEFAULTS = ViTokConfig()  # the wrapper's defaults are ViTokConfig's (a test keeps them in step)


class DiagonalGaussianDistribution(DiagonalGaussian):
    """ViTok's posterior N(mean, exp(logvar)) with diffusers' per-sample KL.

    ``mean``, ``logvar``, ``std``, ``sample(generator)`` and ``mode()`` are ViTok's own;
    ``var`` and ``kl`` follow diffusers' ``DiagonalGaussianDistribution``.
    """

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other), other = N(0, I) by default: per sample, a sum over every
        non-batch dim, shape ``(B,)``, in float32 (ViTok's ``kl()`` is a scalar mean)."""
        m, lv = self.mean.float(), self.logvar.float()
        if other is None:
            terms = m.pow(2) + lv.exp() - 1.0 - lv
        else:
            om, olv = other.mean.float(), other.logvar.float()
            terms = (m - om).pow(2) / olv.exp() + (lv - olv).exp() - 1.0 - lv + olv
        return 0.5 * terms.sum(dim=tuple(range(1, terms.ndim)))


class AutoencoderViTok(ModelMixin, ConfigMixin):
    """A diffusers ``ModelMixin`` + ``ConfigMixin`` around one :class:`~vitok_fast.ViTok`.

    The config holds ViTokConfig's fields (``channels`` is named ``latent_channels``, as in
    diffusers) and the latent statistics ``scaling_factor`` and ``shift_factor``. Build one
    from a ViTok with :meth:`from_vitok`, or load one saved by ``save_pretrained`` with
    ``from_pretrained`` (a folder or a Hub id, as for any diffusers model). ``self.vitok`` is
    the wrapped model.
    """

    _supports_gradient_checkpointing = False  # use self.vitok.set_grad_checkpointing()

    @register_to_config
    def __init__(
        self,
        name: str = _DEFAULTS.name,
        encoder_width: int = _DEFAULTS.encoder_width,
        encoder_depth: int = _DEFAULTS.encoder_depth,
        encoder_heads: int = _DEFAULTS.encoder_heads,
        encoder_mlp_hidden: int = _DEFAULTS.encoder_mlp_hidden,
        decoder_width: int = _DEFAULTS.decoder_width,
        decoder_depth: int = _DEFAULTS.decoder_depth,
        decoder_heads: int = _DEFAULTS.decoder_heads,
        decoder_mlp_hidden: int = _DEFAULTS.decoder_mlp_hidden,
        patch_size: int = _DEFAULTS.patch_size,
        tubelet_size: int = _DEFAULTS.tubelet_size,
        latent_channels: int = _DEFAULTS.channels,
        in_channels: int = _DEFAULTS.in_channels,
        norm_eps: float = _DEFAULTS.norm_eps,
        rope_theta: float = _DEFAULTS.rope_theta,
        logvar_min: float = _DEFAULTS.logvar_min,
        logvar_max: float = _DEFAULTS.logvar_max,
        use_kernels: bool = _DEFAULTS.use_kernels,
        attention_backend: str = _DEFAULTS.attention_backend,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ):
        super().__init__()
        fields = {f.name: self.config[f.name] for f in dataclasses.fields(ViTokConfig)
                  if f.name != "channels"}
        self.vitok = ViTok(ViTokConfig(**fields, channels=latent_channels))
        self.use_tiling = False
        self.tile, self.overlap = None, None

    @classmethod
    def from_vitok(cls, model: ViTok, stats: dict | str | os.PathLike | None = None
                   ) -> "AutoencoderViTok":
        """Wrap ``model`` (shared, not copied: the wrapper and ``model`` are the same weights).

        ``stats``: the ``stats.json`` that ``python -m vitok_fast.encode`` writes, as a dict
        or its path; its ``shift_factor`` and ``scaling_factor`` go to the config. Without
        it, scaling 1.0 and shift 0.0.
        """
        if not isinstance(model, ViTok):
            raise TypeError(f"expected a vitok_fast.ViTok, got {type(model).__name__}")
        fields = model.config.to_dict()
        fields["latent_channels"] = fields.pop("channels")
        with torch.device("meta"):  # the wrapper's own ViTok is replaced below: no weights
            vae = cls(**fields, **_latent_factors(stats))
        vae.vitok = model
        return vae

    # -- tiling: ViTok's encode/decode tile= and overlap= ------------------------------------

    def enable_tiling(self, tile: int | tuple = 512, overlap: int | tuple | None = None) -> None:
        """Encode and decode in overlapping tiles of ``tile`` pixels (``(frames, h, w)`` for
        videos), blended across the seams (vitok_fast/tiling.py); ``overlap`` defaults to a
        quarter of the tile. Inputs no bigger than one tile run whole."""
        self.use_tiling, self.tile, self.overlap = True, tile, overlap

    def disable_tiling(self) -> None:
        self.use_tiling, self.tile, self.overlap = False, None, None

    # -- the autoencoder, with AutoencoderKL's signatures -----------------------------------

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Pixels ``(B, 3, H, W)`` or ``(B, 3, T, H, W)`` in [-1, 1] -> ``AutoencoderKLOutput``
        whose ``latent_dist`` is the posterior (or the tuple ``(latent_dist,)``)."""
        posterior = self.vitok.encode(x, tile=self.tile, overlap=self.overlap)
        latent_dist = DiagonalGaussianDistribution(posterior.mean, posterior.logvar)
        if not return_dict:
            return (latent_dist,)
        return AutoencoderKLOutput(latent_dist=latent_dist)

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        """Latents ``(B, c, H/p, W/p)`` or ``(B, c, T/q, H/p, W/p)`` -> ``DecoderOutput`` with
        ``sample`` the pixels (or the tuple ``(pixels,)``). ``generator`` is accepted for
        AutoencoderKL's signature and unused: ViTok's decoder is deterministic."""
        pixels = self.vitok.decode(z, tile=self.tile, overlap=self.overlap)
        if not return_dict:
            return (pixels,)
        return DecoderOutput(sample=pixels)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False,
                return_dict: bool = True, generator: torch.Generator | None = None):
        """Encode then decode: the posterior's mean by default, a sample with
        ``sample_posterior=True`` (ViTok's ``model(x)`` samples by default)."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        pixels = self.decode(z).sample
        if not return_dict:
            return (pixels,)
        return DecoderOutput(sample=pixels)


def _latent_factors(stats) -> dict:
    """``{"scaling_factor", "shift_factor"}`` from a stats.json dict or path (None: 1 and 0)."""
    if stats is None:
        return {"scaling_factor": 1.0, "shift_factor": 0.0}
    source = "stats"
    if isinstance(stats, (str, os.PathLike)):
        source = str(stats)
        try:
            stats = json.loads(Path(stats).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"expected a stats.json (written by python -m vitok_fast.encode) at {source}, "
                f"but it does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} is not valid JSON: {e}") from None
    if not isinstance(stats, dict) or not {"scaling_factor", "shift_factor"} <= set(stats):
        given = sorted(stats) if isinstance(stats, dict) else type(stats).__name__
        raise ValueError(
            f"{source} must hold 'shift_factor' and 'scaling_factor' (as python -m "
            f"vitok_fast.encode writes them to stats.json), got {given}")
    factors = {}
    for key in ("scaling_factor", "shift_factor"):
        value = stats[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{source}: {key} must be a finite number, got {value!r}")
        factors[key] = float(value)
    if factors["scaling_factor"] <= 0:
        raise ValueError(f"{source}: scaling_factor must be > 0 (1 / the latents' std), "
                         f"got {factors['scaling_factor']}")
    return factors
