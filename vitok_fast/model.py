"""ViTok: a Vision-Transformer image and video autoencoder built from Llama blocks.

Reads top to bottom like the paper's Figure 1 (arXiv 2501.09755, Section 2;
docs/design.md section 1): tubelet embed -> encoder blocks -> KL bottleneck -> linear "upsample" ->
decoder blocks -> head + unpatchify.

``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` come from vitok_fast/hub.py's
``HubMixin`` over the directory format of vitok_fast/pretrained.py (``CONFIG_FILE``,
``WEIGHTS_FILE``, ``save_model_dir``, ``load_model_dir``, re-exported here); tiled
encode/decode is vitok_fast/tiling.py. Neither imports this module.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from vitok_fast import ops
from vitok_fast.attention import DEFAULT_BACKEND, attention, validate_backend
from vitok_fast.config import ViTokConfig
from vitok_fast.hub import HubMixin
from vitok_fast.kernels import rope_cos_sin
from vitok_fast.pretrained import CONFIG_FILE, WEIGHTS_FILE, load_model_dir, save_model_dir  # noqa: F401 (re-exported)
from vitok_fast.profiling import span
from vitok_fast.tiling import tiled_decode, tiled_encode

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, use_kernels: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.use_kernels = use_kernels

    def forward(self, x, residual=None):
        """``norm(x)``; or, given the residual stream, ``(norm(x + residual), x + residual)``
        in one fused pass."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps, self.use_kernels)
        return ops.add_rms_norm(x, residual, self.weight, self.eps, self.use_kernels)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with 3D RoPE on q and k, no biases.

    ``backend`` picks the attention kernel (vitok_fast/attention.py; default "sdpa":
    PyTorch's own choice; "auto": the fastest that passes a forward+backward check on CUDA)."""

    def __init__(self, dim: int, heads: int, use_kernels: bool, backend: str = DEFAULT_BACKEND):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.use_kernels = use_kernels
        self.backend = validate_backend(backend)

    def forward(self, x, cos, sin):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k = ops.rope_3d_qk(q, k, cos, sin, self.use_kernels)
        out = attention(q, k, v, self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)`` with w1 and w3 packed into one GEMM (``w13``)."""

    def __init__(self, dim: int, hidden: int, use_kernels: bool):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.use_kernels = use_kernels

    def forward(self, x):
        # the fused op reads the packed (gate, up) GEMM output directly
        return self.w2(ops.swiglu_packed(self.w13(x), self.use_kernels))


class Block(nn.Module):
    """Llama block: pre-RMSNorm attention and pre-RMSNorm SwiGLU, each with a residual.

    The residual adds are fused into the following norm (``add_rms_norm``), so a block
    takes and returns the stream as a pair ``(x, residual)`` whose sum is the usual
    ``x`` of an unfused block: ``residual`` is None for the first block, and the last
    block's pair is summed by the transformer's final norm.
    """

    def __init__(self, dim: int, heads: int, mlp_hidden: int, eps: float, use_kernels: bool,
                 attention_backend: str = DEFAULT_BACKEND):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps, use_kernels)
        self.attn = Attention(dim, heads, use_kernels, attention_backend)
        self.mlp_norm = RMSNorm(dim, eps, use_kernels)
        self.mlp = SwiGLU(dim, mlp_hidden, use_kernels)

    def forward(self, x, residual, cos, sin):
        with span("attention"):
            h, residual = self._norm(self.attn_norm, x, residual)
            x = self.attn(h, cos, sin)
        with span("mlp"):
            h, residual = self.mlp_norm(x, residual)
            x = self.mlp(h)
        return x, residual

    @staticmethod
    def _norm(norm, x, residual):
        return (norm(x), x) if residual is None else norm(x, residual)


class Transformer(nn.Module):
    """A stack of Llama blocks and a final RMSNorm; builds its RoPE tables from the grid."""

    def __init__(self, dim, depth, heads, mlp_hidden, eps, theta, use_kernels,
                 attention_backend=DEFAULT_BACKEND):
        super().__init__()
        self.head_dim = dim // heads
        self.theta = theta
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_hidden, eps, use_kernels, attention_backend) for _ in range(depth))
        self.norm = RMSNorm(dim, eps, use_kernels)
        self.grad_checkpointing = False

    @classmethod
    def from_config(cls, cfg: ViTokConfig, side: str) -> "Transformer":
        """The encoder's or decoder's stack (``side`` is "encoder" or "decoder")."""
        size = lambda field: getattr(cfg, f"{side}_{field}")
        return cls(size("width"), size("depth"), size("heads"), size("mlp_hidden"),
                   cfg.norm_eps, cfg.rope_theta, cfg.use_kernels, cfg.attention_backend)

    def forward(self, x, grid):
        cos, sin = rope_cos_sin(grid, self.head_dim, self.theta, device=x.device)
        residual = None
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, residual = checkpoint(block, x, residual, cos, sin, use_reentrant=False)
            else:
                x, residual = block(x, residual, cos, sin)
        return self.norm(x, residual)[0]  # closes the last block's (x, residual) pair


class DiagonalGaussian:
    """The KL bottleneck's posterior q(z | x) = N(mean, exp(logvar)).

    ``mean`` and ``logvar`` have the latent layout: ``(B, c, H', W')`` for images and
    ``(B, c, T', H', W')`` for videos.
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar

    @property
    def std(self):
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                            dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """[authors' code] KL to N(0, I), a mean over batch, tokens and channels (not a sum)."""
        m, lv = self.mean.float(), self.logvar.float()
        return 0.5 * torch.mean(m.pow(2) + lv.exp() - 1.0 - lv)


class TubeletEmbed(nn.Linear):
    """The encoder's first Linear, ``patchify(x) @ W.T + b``, as one fused op (ops.tubelet_embed).

    An ``nn.Linear`` called as a module, so that hooks on Linear layers (diffusers' layerwise
    casting and group offloading, accelerate's device maps) cast or fetch its weights."""

    def forward(self, x, q: int, p: int, use_kernels: bool):
        return ops.tubelet_embed(x, self.weight, self.bias, q, p, use_kernels)


class TubeletHead(nn.Linear):
    """The decoder's last Linear and unpatchify, ``unpatchify(h @ W.T + b)``, as one fused op
    (ops.tubelet_unembed); an ``nn.Linear`` called as a module, as :class:`TubeletEmbed`."""

    def forward(self, h, q: int, p: int, T: int, H: int, W: int, use_kernels: bool):
        return ops.tubelet_unembed(h, self.weight, self.bias, q, p, T, H, W, use_kernels)


class Encoder(nn.Module):
    """Tubelet embed -> Llama blocks -> final norm -> Linear to the bottleneck's 2c moments."""

    def __init__(self, cfg: ViTokConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = TubeletEmbed(cfg.patch_dim, cfg.encoder_width)
        self.transformer = Transformer.from_config(cfg, "encoder")
        self.to_moments = nn.Linear(cfg.encoder_width, 2 * cfg.channels)

    def forward(self, x, grid):
        cfg = self.cfg
        with span("embed"):
            h = self.embed(x, cfg.tubelet_size, cfg.patch_size, cfg.use_kernels)
        h = self.transformer(h, grid)
        with span("bottleneck"):
            return self.to_moments(h)


class Decoder(nn.Module):
    """Linear "upsample" c -> d -> Llama blocks -> final norm -> head + unpatchify."""

    def __init__(self, cfg: ViTokConfig):
        super().__init__()
        self.cfg = cfg
        self.upsample = nn.Linear(cfg.channels, cfg.decoder_width)
        self.transformer = Transformer.from_config(cfg, "decoder")
        self.head = TubeletHead(cfg.decoder_width, cfg.patch_dim)

    def forward(self, z_tokens, grid):
        cfg = self.cfg
        with span("bottleneck"):
            h = self.upsample(z_tokens)
        h = self.transformer(h, grid)
        T, H, W = grid[0] * cfg.tubelet_size, grid[1] * cfg.patch_size, grid[2] * cfg.patch_size
        with span("head"):
            return self.head(h, cfg.tubelet_size, cfg.patch_size, T, H, W, cfg.use_kernels)


class ViTok(HubMixin, nn.Module):
    """ViTok autoencoder. ``model(x)`` returns ``(reconstruction, posterior)``.

    Pixels are ``(B, 3, H, W)`` images or ``(B, 3, T, H, W)`` videos in [-1, 1]; any H, W
    divisible by the patch and T divisible by the tubelet works, with the same weights.
    Latents are ``(B, c, H/p, W/p)`` for images and ``(B, c, T/q, H/p, W/p)`` for videos.
    """

    config_class = ViTokConfig  # save_pretrained / from_pretrained / push_to_hub: vitok_fast/hub.py
    config_tag = "vitok_config"

    # The dtype the layers compute in when it is not the weights' storage dtype: set where the
    # stored weights are cast up layer by layer for each call (AutoencoderViTok's
    # enable_layerwise_casting); None: the weights' own dtype.
    compute_dtype: torch.dtype | None = None

    def __init__(self, config: ViTokConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.apply(_init_weights)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ViTok":
        return cls(ViTokConfig.from_name(name, **overrides))

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.encoder.transformer.grad_checkpointing = enabled
        self.decoder.transformer.grad_checkpointing = enabled

    # -- the autoencoder ------------------------------------------------------------------

    def encode(self, x: torch.Tensor, tile=None, overlap=None) -> DiagonalGaussian:
        """Pixels (B, 3, H, W) or (B, 3, T, H, W) in [-1, 1] -> the posterior over latents.

        ``x`` must have the model's dtype (float32 unless the model was cast), or any of
        float32 / bfloat16 / float16 inside ``torch.autocast``; anything else (float64 for a
        float32 model, integer pixels) is refused here, before any kernel runs. Values are not checked (that would cost a
        device sync per call): a NaN or inf anywhere in a sample makes that sample's whole
        latent NaN, since attention mixes every token with every other; the other samples
        of the batch are unaffected. ``tile``/``overlap`` (pixels; (frames, h, w) for
        videos) encode big inputs in overlapping pieces blended across the seams: see
        vitok_fast/tiling.py."""
        if tile is not None:
            self._check_dtype(x, "pixels")
            return tiled_encode(self, x, tile, overlap)
        self._check_pixels(x)
        video = x if x.ndim == 5 else x.unsqueeze(2)
        grid = self.config.grid(*video.shape[2:])
        moments = self.encoder(video, grid)
        mean, logvar = moments.chunk(2, dim=-1)
        logvar = logvar.clamp(self.config.logvar_min, self.config.logvar_max)
        layout = "b (t h w) c -> b c t h w" if x.ndim == 5 else "b (t h w) c -> b c (t h) w"
        to_latent = lambda m: rearrange(m, layout, t=grid[0], h=grid[1], w=grid[2])
        return DiagonalGaussian(to_latent(mean), to_latent(logvar))

    def decode(self, z: torch.Tensor, tile=None, overlap=None) -> torch.Tensor:
        """Latents (B, c, H/p, W/p) or (B, c, T/q, H/p, W/p) -> pixels, roughly in [-1, 1].

        The same dtype rule as :meth:`encode`; a NaN or inf in a sample's latent makes that
        sample's whole output NaN, the rest of the batch is unaffected."""
        if tile is not None:
            self._check_dtype(z, "latent")
            return tiled_decode(self, z, tile, overlap)
        self._check_latent(z)
        video = z if z.ndim == 5 else z.unsqueeze(2)
        grid = tuple(video.shape[2:])
        pixels = self.decoder(rearrange(video, "b c t h w -> b (t h w) c"), grid)
        return pixels if z.ndim == 5 else pixels.squeeze(2)

    def forward(self, x: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    # -- input checks, at the edge, before any kernel runs ---------------------------------

    def _check_dtype(self, x, what: str) -> None:
        """Floating point, and the model's compute dtype (its weights' dtype unless
        ``compute_dtype`` says otherwise) unless autocast picks the matmul dtype."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of {what}, got {type(x).__name__}")
        dtype = self.compute_dtype or next(self.parameters()).dtype
        if not x.is_floating_point():
            expected = ("floating-point pixels in [-1, 1]" if what == "pixels"
                        else "a floating-point latent")
            hint = "; convert with x.float() / 127.5 - 1" if what == "pixels" else ""
            raise TypeError(f"expected {expected}, got dtype {x.dtype} (the model's dtype is "
                            f"{dtype}){hint}")
        # autocast casts each matmul's inputs itself, so it takes any of the three; a float64
        # model (reference maths in tests) takes float64, and no other model does
        if x.dtype != dtype and not (x.dtype in _AUTOCAST_INPUTS and _autocast_on(x.device)):
            raise TypeError(
                f"expected {what} in the model's dtype {dtype} (or float32, bfloat16 or float16 "
                f"inside torch.autocast), got dtype {x.dtype}; convert with x.to({dtype})")

    def _check_pixels(self, x) -> None:
        cfg = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of pixels, got {type(x).__name__}")
        if x.ndim not in (4, 5):
            raise ValueError(
                f"expected images (B, {cfg.in_channels}, H, W) or videos "
                f"(B, {cfg.in_channels}, T, H, W), got a {x.ndim}-d tensor of shape {tuple(x.shape)}")
        self._check_dtype(x, "pixels")
        if x.shape[0] == 0:
            raise ValueError(f"expected a batch of at least 1, got an empty batch of shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"expected {cfg.in_channels} channels (RGB) in dim 1, got {x.shape[1]} "
                f"(shape {tuple(x.shape)})")
        p, q = cfg.patch_size, cfg.tubelet_size
        for axis, size in (("H", x.shape[-2]), ("W", x.shape[-1])):
            if size < p or size % p:
                raise ValueError(
                    f"{axis} must be a positive multiple of the patch size {p} for {cfg.name}, "
                    f"got {axis} = {size}")
        if q > 1 and x.ndim == 4:
            raise ValueError(
                f"{cfg.name} is a video model with tubelets of {q} frames: expected videos "
                f"(B, 3, T, H, W) with T a multiple of {q}, got images of shape {tuple(x.shape)}")
        if x.ndim == 5 and (x.shape[2] < q or x.shape[2] % q):
            raise ValueError(
                f"T must be a positive multiple of the tubelet size {q} for {cfg.name}, "
                f"got T = {x.shape[2]}")

    def _check_latent(self, z) -> None:
        c = self.config.channels
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor latent, got {type(z).__name__}")
        if z.ndim not in (4, 5):
            raise ValueError(
                f"expected latents (B, {c}, H', W') or (B, {c}, T', H', W'), got a {z.ndim}-d "
                f"tensor of shape {tuple(z.shape)}")
        self._check_dtype(z, "latent")
        if z.shape[0] == 0 or 0 in z.shape[2:]:
            raise ValueError(f"expected a non-empty latent, got shape {tuple(z.shape)}")
        if z.shape[1] != c:
            raise ValueError(f"expected {c} latent channels in dim 1, got {z.shape[1]} "
                             f"(shape {tuple(z.shape)})")


_AUTOCAST_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


def _autocast_on(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device autocast does not know (meta, for FLOP counting)
        return False


def _init_weights(module: nn.Module) -> None:
    # [ours] Llama/ViT-style: N(0, 0.02) weights, zero biases; norms start at 1.
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
