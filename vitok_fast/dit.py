"""Class-conditional DiT on ViTok latents, and the diffusion it is trained and sampled with.

Peebles & Xie, "Scalable Diffusion Models with Transformers" (DiT), as the ViTok paper uses it
(arXiv 2501.09755, Section 3.3, Table 6, Figure 5; docs/generation.md):

  latent (B, c, H', W') or (B, c, T', H', W')  -> patchify (p x p over H', W'; 1 over T')
  -> Linear -> DiT blocks (adaLN-Zero on timestep + class embeddings) -> adaLN final layer
  -> Linear -> unpatchify -> predicted noise, same shape as the latent

The blocks are built from our Llama parts (vitok_fast/model.py: RMSNorm, SwiGLU, attention
with 3D RoPE over the latent grid), so the fused kernels run and a video latent goes through
the same code as an image latent. [ours] DiT's LayerNorm / GELU-MLP / fixed sin-cos position
table become RMSNorm / SwiGLU / 3D RoPE; everything else (adaLN-Zero, class dropout for
classifier-free guidance, the size table) is DiT's.

The diffusion [DiT, paper]: DDPM epsilon-prediction, 1000 steps with linear betas 1e-4..0.02,
trained with the simple MSE loss; DDIM sampling (eta 0, 250 steps by default) with
classifier-free guidance (scale 1.5 by default). DiT also learns the variance (its "learned
sigma" head and VLB loss); we do not: DDIM with eta 0 never uses it (docs/generation.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from vitok_fast.cli import UserError
from vitok_fast.kernels import rope_cos_sin
from vitok_fast.kernels.rope import rope_split
from vitok_fast.latents import load_latent_set, write_latent_set  # noqa: F401 (re-exported)
from vitok_fast.hub import HubMixin
from vitok_fast.model import Attention, RMSNorm, SwiGLU

# [DiT] Table 1: blocks, hidden size, heads. SwiGLU hidden 8d/3 (rounded up to a multiple
# of 8) keeps the MLP's parameter count of DiT's 4d GELU MLP [ours]. "T" is a tiny size of
# ours for tests and CPU runs, not in the paper.
SIZES = {
    "S": dict(depth=12, width=384, heads=6),
    "B": dict(depth=12, width=768, heads=12),
    "L": dict(depth=24, width=1024, heads=16),
    "XL": dict(depth=28, width=1152, heads=16),
    "T": dict(depth=4, width=128, heads=4),
}


def _swiglu_hidden(width: int) -> int:
    return 8 * math.ceil(8 * width / 3 / 8)


@dataclass
class DiTConfig:
    """Everything that fixes a DiT's weights, plus the run-time kernel switches."""

    name: str = "DiT-XL/1"
    depth: int = 28
    width: int = 1152
    heads: int = 16
    mlp_hidden: int = 3072
    patch_size: int = 1  # p over the latent grid [paper: 1 for ViTok's /16 latents]
    channels: int = 16  # c, the ViTok latent channels
    num_classes: int = 1000
    class_dropout: float = 0.1  # [DiT] labels replaced by the null class for CFG
    frequency_dim: int = 256  # [DiT] sinusoidal timestep features before the MLP
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    use_kernels: bool = True
    attention_backend: str = "auto"

    def __post_init__(self):
        for field in ("depth", "width", "heads", "mlp_hidden", "patch_size", "channels",
                      "num_classes", "frequency_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DiTConfig.{field} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width must be divisible by heads, got {self.width} and {self.heads}")
        head_dim = self.width // self.heads
        if head_dim % 2 or min(rope_split(head_dim)) < 1:
            raise ValueError(f"head dim must be even and at least 6 for 3D RoPE, got "
                             f"{self.width}/{self.heads}")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"class_dropout must be in [0, 1), got {self.class_dropout}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "DiTConfig":
        """``DiT-XL/1``, ``DiT-B/2``, ``DiT-T/1`` ...: size, then the patch size over the latent grid."""
        size, _, patch = name.removeprefix("DiT-").partition("/")
        if size not in SIZES or not patch.isdigit() or int(patch) < 1:
            raise ValueError(f"unknown DiT name {name!r}: expected 'DiT-<size>/<patch>' with a size "
                             f"from {list(SIZES)} (e.g. 'DiT-XL/1', 'DiT-B/2')")
        known = {f.name for f in dataclasses.fields(cls)}
        if set(overrides) - known:
            raise TypeError(f"unknown DiTConfig field(s) {sorted(set(overrides) - known)}")
        s = SIZES[size]
        fields = dict(name=name, patch_size=int(patch), mlp_hidden=_swiglu_hidden(s["width"]), **s)
        return cls(**{**fields, **overrides})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "DiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        if set(data) - known:
            raise ValueError(f"config has unknown field(s) {sorted(set(data) - known)}; "
                             f"is this a DiT checkpoint?")
        return cls(**data)


# -- conditioning ----------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """[DiT] Sinusoidal features of t, then Linear -> SiLU -> Linear."""

    def __init__(self, width: int, frequency_dim: int):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    """[DiT] One embedding per class plus the null class (index ``num_classes``), which
    replaces a label with probability ``dropout`` in training: the unconditional model
    that classifier-free guidance needs, in the same network."""

    def __init__(self, num_classes: int, width: int, dropout: float):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, width)
        self.num_classes, self.dropout = num_classes, dropout

    def forward(self, y, drop: torch.Tensor | None = None):
        if drop is not None:
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.table(y)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


# -- the network -----------------------------------------------------------------------------


class DiTBlock(nn.Module):
    """[DiT] adaLN-Zero block: the conditioning regresses a shift, scale and gate for each of
    attention and MLP; the gates start at zero, so every block starts as the identity."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.width
        # [ours] RMSNorm without its own gain, as DiT's LayerNorm has none: adaLN's scale is the gain
        self.attn_norm = RMSNorm(d, cfg.norm_eps, cfg.use_kernels).requires_grad_(False)
        self.attn = Attention(d, cfg.heads, cfg.use_kernels, cfg.attention_backend)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps, cfg.use_kernels).requires_grad_(False)
        self.mlp = SwiGLU(d, cfg.mlp_hidden, cfg.use_kernels)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c, cos, sin):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN(c).chunk(6, dim=-1)
        x = x + gate_a[:, None] * self.attn(modulate(self.attn_norm(x), shift_a, scale_a), cos, sin)
        return x + gate_m[:, None] * self.mlp(modulate(self.mlp_norm(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.width
        self.norm = RMSNorm(d, cfg.norm_eps, cfg.use_kernels).requires_grad_(False)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.linear = nn.Linear(d, cfg.patch_size**2 * cfg.channels)

    def forward(self, x, c):
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(HubMixin, nn.Module):
    """``model(z_t, t, y)`` predicts the noise in ``z_t``; latents ``(B, c, H', W')`` or
    ``(B, c, T', H', W')`` with H', W' divisible by the patch size; ``y`` class indices,
    ``num_classes`` being the null class. Saved and loaded as the same two files as a ViTok
    (vitok_fast/hub.py), so vitok_fast.checkpoint keeps runs of both."""

    config_class = DiTConfig
    config_tag = "dit_config"

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        self.embed = nn.Linear(cfg.patch_size**2 * cfg.channels, cfg.width)
        self.t_embed = TimestepEmbedder(cfg.width, cfg.frequency_dim)
        self.y_embed = LabelEmbedder(cfg.num_classes, cfg.width, cfg.class_dropout)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg)
        self.head_dim = cfg.width // cfg.heads
        self.reset_parameters()

    @classmethod
    def from_name(cls, name: str, **overrides) -> "DiT":
        return cls(DiTConfig.from_name(name, **overrides))

    def reset_parameters(self):
        """[DiT] Xavier-uniform linears, N(0, 0.02) embeddings, and adaLN-Zero: every
        modulation and the output layer start at zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias) if m.bias is not None else None
        nn.init.normal_(self.y_embed.table.weight, std=0.02)
        for mlp in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(mlp.weight, std=0.02)
        for layer in [b.adaLN[-1] for b in self.blocks] + [self.final.adaLN[-1], self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z, t, y, drop_labels: torch.Tensor | None = None):
        cfg, p = self.config, self.config.patch_size
        video = z if z.ndim == 5 else z.unsqueeze(2)
        if video.ndim != 5 or video.shape[1] != cfg.channels or video.shape[-1] % p or video.shape[-2] % p:
            raise ValueError(f"expected latents (B, {cfg.channels}, H', W') or (B, {cfg.channels}, "
                             f"T', H', W') with H', W' divisible by {p}, got {tuple(z.shape)}")
        T, H, W = video.shape[2], video.shape[3] // p, video.shape[4] // p
        x = self.embed(rearrange(video, "b c t (h p) (w q) -> b (t h w) (p q c)", p=p, q=p))
        c = self.t_embed(t) + self.y_embed(y, drop_labels)
        cos, sin = rope_cos_sin((T, H, W), self.head_dim, cfg.rope_theta, device=z.device)
        for block in self.blocks:
            x = block(x, c, cos, sin)
        out = rearrange(self.final(x, c), "b (t h w) (p q c) -> b c t (h p) (w q)",
                        t=T, h=H, w=W, p=p, q=p)
        return out if z.ndim == 5 else out.squeeze(2)

# -- the diffusion ---------------------------------------------------------------------------


class Diffusion:
    """[DiT, DDPM] ``q(z_t | z_0) = N(sqrt(abar_t) z_0, (1 - abar_t) I)`` with linear betas."""

    def __init__(self, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.steps = steps
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
        self.alphas_bar = torch.cumprod(1 - betas, dim=0)

    def loss(self, model, z0, y, generator=None, drop_labels=None):
        """The simple loss ``|| eps - eps_theta(z_t, t, y) ||^2`` at a uniform t per sample."""
        B = z0.shape[0]
        t = torch.randint(0, self.steps, (B,), device=z0.device, generator=generator)
        eps = torch.randn(z0.shape, device=z0.device, generator=generator, dtype=z0.dtype)
        ab = self.alphas_bar.to(z0.device)[t].float().view(B, *[1] * (z0.ndim - 1))
        z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
        return F.mse_loss(model(z_t, t, y, drop_labels).float(), eps.float())

    @torch.no_grad()
    def ddim_sample(self, model, shape, y, *, steps: int = 250, cfg: float = 1.5,
                    generator=None, device="cpu", progress: bool = False):
        """DDIM (eta 0) over ``steps`` evenly spaced timesteps [DiT's respacing], with
        classifier-free guidance ``eps_u + cfg * (eps_c - eps_u)`` on every channel
        ([ours]: DiT's code guides only the first 3 of SD-VAE's 4 channels).
        ``cfg`` 1 samples the conditional model alone; ``y`` equal to the null class
        samples the unconditional one."""
        if not 1 <= steps <= self.steps:
            raise ValueError(f"sampling steps must be in [1, {self.steps}], got {steps}")
        null = torch.full_like(y, model.config.num_classes)
        times = torch.linspace(0, self.steps - 1, steps, dtype=torch.float64).round().long().tolist()
        ab = self.alphas_bar
        z = torch.randn(shape, generator=generator, device=device)
        iterator = list(reversed(range(len(times))))
        if progress:
            from tqdm import tqdm
            iterator = tqdm(iterator, desc="DDIM", leave=False)
        for i in iterator:
            t = times[i]
            t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
            if cfg == 1.0:
                eps = model(z, t_batch, y).float()
            else:
                eps_c, eps_u = model(torch.cat([z, z]), torch.cat([t_batch, t_batch]),
                                     torch.cat([y, null])).float().chunk(2)
                eps = eps_u + cfg * (eps_c - eps_u)
            a_t = float(ab[t])
            a_prev = float(ab[times[i - 1]]) if i > 0 else 1.0
            z0 = (z - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
            z = math.sqrt(a_prev) * z0 + math.sqrt(1 - a_prev) * eps
        return z


class LatentNorm:
    """``z_norm = (z - shift_factor) * scaling_factor`` from stats.json (one shift and scale
    for all channels, as SD-VAE's ``scaling_factor``), or with ``per_channel`` each
    channel's own mean and std; ``denormalize`` inverts it before decoding."""

    def __init__(self, stats: dict, per_channel: bool = False):
        if per_channel:
            self.shift = torch.tensor(stats["mean"], dtype=torch.float32)
            self.scale = 1.0 / torch.tensor(stats["std"], dtype=torch.float32)
        else:
            self.shift = torch.tensor(float(stats.get("shift_factor", 0.0)))
            self.scale = torch.tensor(float(stats["scaling_factor"]))
        self.per_channel = per_channel

    def _view(self, t, z):
        t = t.to(z.device, z.dtype)
        return t.view(1, -1, *[1] * (z.ndim - 2)) if self.per_channel else t

    def normalize(self, z):
        return (z - self._view(self.shift, z)) * self._view(self.scale, z)

    def denormalize(self, z):
        return z / self._view(self.scale, z) + self._view(self.shift, z)


# -- sampling: what train/dit.py and python -m vitok_fast.sample share -----------------------


LATENT_FILE = "latents.json"


def find_latent_info(path: Path) -> dict:
    """``latents.json`` of the run that ``path`` (run, checkpoint or ema folder) belongs to."""
    for folder in (path, *list(path.parents)[:3]):
        if (folder / LATENT_FILE).is_file():
            return json.loads((folder / LATENT_FILE).read_text())
    raise FileNotFoundError(f"no {LATENT_FILE} in {path} or the three folders above it: expected "
                            f"a run directory of train/dit.py (it writes {LATENT_FILE}) or a "
                            f"checkpoint inside one")


@torch.no_grad()
def decode_samples(vitok, z: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """ViTok latents -> pixels in [-1, 1], in batches."""
    if vitok is None:
        raise UserError("decoding samples needs the ViTok that encoded the latents: pass --vitok")
    z = z.to(next(vitok.parameters()).device)
    return torch.cat([vitok.decode(z[i:i + batch_size]).float().clamp(-1, 1).cpu()
                      for i in range(0, len(z), batch_size)])
