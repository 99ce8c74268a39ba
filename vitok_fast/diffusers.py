"""ViTok as a diffusers autoencoder: ``AutoencoderViTok``, used like ``AutoencoderKL``.

    from vitok_fast import ViTok
    from vitok_fast.diffusers import AutoencoderViTok

    vae = AutoencoderViTok.from_vitok(ViTok.from_pretrained("runs/s1/final"), stats="latents/stats.json")
    z = vae.encode(x).latent_dist.sample(generator)          # x: (B, 3, H, W) in [-1, 1]
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor   # what a diffusion model sees
    x_hat = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample
    vae.save_pretrained("vae/")   # diffusers' layout: config.json + diffusion_pytorch_model.safetensors
                                  # (+ vitok_autoencoder.py, for diffusers.AutoModel)

The wrapper runs ViTok's own encode and decode, so its outputs equal ViTok's bit for bit.
Two conventions differ between ViTok and diffusers, and the wrapper follows diffusers:

- ``forward(sample, sample_posterior=False)`` decodes the posterior's mean by default;
  ViTok's ``model(x)`` samples the posterior by default (``sample=True``, as in training).
- ``latent_dist.kl()`` is per sample, a sum over every non-batch dim (shape ``(B,)``), as in
  diffusers and LDM; ViTok's ``posterior.kl()`` is one scalar, a mean over batch, tokens and
  channels.

As in ``AutoencoderKL``, encode and decode leave the latents unscaled: ``config.shift_factor``
and ``config.scaling_factor`` (from ``stats.json``) are for the diffusion model's side; for
pipelines that ignore the shift (DiT, Stable Diffusion) build it with ``from_vitok(...,
shift=False)``. diffusers' slicing, tiling, layerwise casting, group offloading, device maps,
gradient checkpointing and regional compilation work as for ``AutoencoderKL``
(docs/interop.md has the table and the tests).

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
DEFAULT_SAMPLE_SIZE = 256  # [paper] the image models' training resolution (256p)

# the module a saved folder's config.json names in auto_map, for diffusers.AutoModel
AUTO_MODULE = "vitok_autoencoder"
_AUTO_MODULE_SOURCE = '''"""AutoencoderViTok for diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True).

The class lives in the vitok_fast package (pip install 'vitok_fast[diffusers]'); this file,
written by AutoencoderViTok.save_pretrained, only points to it.
"""

from vitok_fast.diffusers import AutoencoderViTok  # noqa: F401
'''


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
    diffusers), the latent statistics ``scaling_factor`` and ``shift_factor``, and
    ``sample_size``, the input side the model was trained at (the default tile). Build one
    from a ViTok with :meth:`from_vitok`, or load one saved by ``save_pretrained`` with
    ``from_pretrained`` (a folder or a Hub id, as for any diffusers model). ``self.vitok`` is
    the wrapped model.

    diffusers' memory features work as for ``AutoencoderKL`` (docs/interop.md has the table):
    slicing and tiling; layerwise casting (every Linear, the fused tubelet embed and head
    included); group offloading at block level (each ViTok block a group, and the encoder's
    and decoder's other layers one group each, so ``encode`` and ``decode`` called directly
    work) and leaf level; gradient checkpointing (ViTok's own, per block); ``device_map``
    loads (a ViTok block is never split); regional compilation of the blocks.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]  # vitok_fast.model.Block: attention + MLP with a fused residual
    _repeated_blocks = ["Block"]  # compile_repeated_blocks() compiles each ViTok block
    # block-level group offloading recurses into these children by name (at every depth), down
    # to the two Transformers, whose block lists become the groups; Encoder.forward and
    # Decoder.forward then onload their own embed / head / bottleneck layers, so vae.encode()
    # and vae.decode() work without going through forward()
    _group_offload_block_modules = ["vitok", "encoder", "decoder", "transformer"]

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
        sample_size: int | list = DEFAULT_SAMPLE_SIZE,
    ):
        super().__init__()
        fields = {f.name: self.config[f.name] for f in dataclasses.fields(ViTokConfig)
                  if f.name != "channels"}
        self.vitok = ViTok(ViTokConfig(**fields, channels=latent_channels))
        _check_sample_size(sample_size, patch_size)
        self.use_tiling = False
        self.use_slicing = False
        self.tile, self.overlap = None, None

    @classmethod
    def from_vitok(cls, model: ViTok, stats: dict | str | os.PathLike | None = None, *,
                   shift: bool = True, sample_size: int | tuple = DEFAULT_SAMPLE_SIZE
                   ) -> "AutoencoderViTok":
        """Wrap ``model`` (shared, not copied: the wrapper and ``model`` are the same weights).

        ``stats``: the ``stats.json`` that ``python -m vitok_fast.encode`` writes, as a dict
        or its path; its ``shift_factor`` and ``scaling_factor`` go to the config (for
        pipelines that compute ``(z - shift_factor) * scaling_factor``: SD3, FLUX). With
        ``shift=False`` the config gets ``shift_factor = 0`` and ``scaling_factor = 1 / the
        latents' RMS about 0`` (``1 / sqrt(std^2 + mean^2)``), right for pipelines that
        ignore ``shift_factor`` and scale by ``scaling_factor`` alone (DiT, Stable Diffusion
        1/2/XL): their diffusion model then sees latents of unit second moment. Without stats,
        scaling 1.0 and shift 0.0. ``sample_size``: the input side (pixels; or (h, w)) the
        model was trained at, the default tile of :meth:`enable_tiling`.
        """
        if not isinstance(model, ViTok):
            raise TypeError(f"expected a vitok_fast.ViTok, got {type(model).__name__}")
        fields = model.config.to_dict()
        fields["latent_channels"] = fields.pop("channels")
        if isinstance(sample_size, tuple):
            sample_size = list(sample_size)
        with torch.device("meta"):  # the wrapper's own ViTok is replaced below: no weights
            vae = cls(**fields, **_latent_factors(stats, shift), sample_size=sample_size)
        vae.vitok = model
        return vae

    # -- tiling and slicing, as AutoencoderKL's ----------------------------------------------

    def enable_tiling(self, tile: int | tuple | None = None, overlap: int | tuple | None = None
                      ) -> None:
        """Encode and decode in overlapping tiles of ``tile`` pixels (default: the config's
        ``sample_size``, as AutoencoderKL's; ``(frames, h, w)`` for videos), blended across the
        seams (vitok_fast/tiling.py); ``overlap`` defaults to a quarter of the tile. Inputs no
        bigger than one tile run whole."""
        self.use_tiling, self.tile, self.overlap = True, tile, overlap

    def disable_tiling(self) -> None:
        self.use_tiling, self.tile, self.overlap = False, None, None

    def enable_slicing(self) -> None:
        """Encode and decode a batch one sample at a time (less activation memory; the same
        results up to float rounding)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def _tiling(self) -> tuple:
        """ViTok's ``tile=`` and ``overlap=`` for this call: (None, None) without tiling."""
        if not self.use_tiling:
            return None, None
        tile = self.config.sample_size if self.tile is None else self.tile
        return (tuple(tile) if isinstance(tile, list) else tile), self.overlap

    # -- diffusers' memory switches that need ViTok's own hooks -----------------------------

    def enable_layerwise_casting(self, *args, **kwargs) -> None:
        """diffusers' layerwise casting (same arguments): weights stored in ``storage_dtype``,
        each layer cast to ``compute_dtype`` for its call. Inputs are then expected in the
        compute dtype, which ViTok's input check is told here."""
        super().enable_layerwise_casting(*args, **kwargs)
        self.vitok.compute_dtype = self.dtype  # diffusers' dtype is the hooks' compute dtype

    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None) -> None:
        """ViTok's checkpointing: each block's activations recomputed in backward, through
        ``torch.utils.checkpoint`` with ``use_reentrant=False`` (diffusers' default too)."""
        if gradient_checkpointing_func is not None:
            raise ValueError(
                "AutoencoderViTok checkpoints each ViTok block with torch.utils.checkpoint "
                "(use_reentrant=False); a custom gradient_checkpointing_func is not supported: "
                "call enable_gradient_checkpointing() without it")
        self.vitok.set_grad_checkpointing(True)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None
                                    ) -> None:
        self.vitok.set_grad_checkpointing(enable)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.vitok.encoder.transformer.grad_checkpointing

    # -- loading by name: diffusers.AutoModel ------------------------------------------------

    def to_json_string(self) -> str:
        """The config as diffusers writes it, plus the ``auto_map`` that lets
        ``diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)`` find this class
        through the small module :meth:`save_pretrained` writes next to it."""
        config = json.loads(super().to_json_string())
        config["auto_map"] = {"AutoModel": f"{AUTO_MODULE}.{type(self).__name__}"}
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # auto_map is for AutoModel, not an __init__ argument: no "unexpected key" warning
        config_dict = {k: v for k, v in config_dict.items() if k != "auto_map"}
        return super().extract_init_dict(config_dict, **kwargs)

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        """diffusers' ``save_pretrained`` (same arguments), plus ``vitok_autoencoder.py``, the
        module ``auto_map`` names: it imports this class from vitok_fast, which must be
        installed where the folder is loaded."""
        if is_main_process:
            Path(save_directory).mkdir(parents=True, exist_ok=True)
            (Path(save_directory) / f"{AUTO_MODULE}.py").write_text(_AUTO_MODULE_SOURCE)
        return super().save_pretrained(save_directory, *args, is_main_process=is_main_process,
                                       **kwargs)

    # -- the autoencoder, with AutoencoderKL's signatures -----------------------------------

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Pixels ``(B, 3, H, W)`` or ``(B, 3, T, H, W)`` in [-1, 1] -> ``AutoencoderKLOutput``
        whose ``latent_dist`` is the posterior (or the tuple ``(latent_dist,)``)."""
        tile, overlap = self._tiling()
        if self.use_slicing and x.shape[0] > 1:
            parts = [self.vitok.encode(piece, tile=tile, overlap=overlap) for piece in x.split(1)]
            mean = torch.cat([p.mean for p in parts])
            logvar = torch.cat([p.logvar for p in parts])
        else:
            posterior = self.vitok.encode(x, tile=tile, overlap=overlap)
            mean, logvar = posterior.mean, posterior.logvar
        latent_dist = DiagonalGaussianDistribution(mean, logvar)
        if not return_dict:
            return (latent_dist,)
        return AutoencoderKLOutput(latent_dist=latent_dist)

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        """Latents ``(B, c, H/p, W/p)`` or ``(B, c, T/q, H/p, W/p)`` -> ``DecoderOutput`` with
        ``sample`` the pixels (or the tuple ``(pixels,)``). ``generator`` is accepted for
        AutoencoderKL's signature and unused: ViTok's decoder is deterministic."""
        tile, overlap = self._tiling()
        if self.use_slicing and z.shape[0] > 1:
            pixels = torch.cat([self.vitok.decode(piece, tile=tile, overlap=overlap)
                                for piece in z.split(1)])
        else:
            pixels = self.vitok.decode(z, tile=tile, overlap=overlap)
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


def _check_sample_size(size, patch_size: int) -> None:
    sizes = size if isinstance(size, (list, tuple)) else [size]
    if not (1 <= len(sizes) <= 2 and all(isinstance(n, int) and not isinstance(n, bool)
                                         and n >= patch_size and n % patch_size == 0
                                         for n in sizes)):
        raise ValueError(f"sample_size must be an int or (height, width), each a positive "
                         f"multiple of the patch size {patch_size}, got {size!r}")


def _latent_factors(stats, shift: bool = True) -> dict:
    """``{"scaling_factor", "shift_factor"}`` from a stats.json dict or path (None: 1 and 0);
    with ``shift=False``, shift 0 and the scaling that gives unit second moment about 0."""
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
    if not shift:  # E[z^2] = std^2 + mean^2 about 0, with std = 1 / scaling_factor
        second_moment = factors["scaling_factor"] ** -2 + factors["shift_factor"] ** 2
        factors = {"scaling_factor": second_moment ** -0.5, "shift_factor": 0.0}
    return factors
