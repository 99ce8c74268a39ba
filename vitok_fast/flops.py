"""Parameter and multiply-accumulate counts of ViTok and SD-VAE, with one counter.

Both models are built on the meta device (no memory, no arithmetic) and run under
``torch.utils.flop_counter.FlopCounterMode``; on meta, ``scaled_dot_product_attention``
decomposes into the two batched matmuls it does, so attention is counted too. The counter
reports FLOPs = 2 x MACs; the paper's "GFLOPs" are MACs (docs/design.md section 4), so we keep MACs
and label FLOPs separately.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from vitok_fast.config import ViTokConfig
from vitok_fast.model import ViTok

# [paper] Table 1 (per size, 256p with p=16, i.e. 256 tokens): params (M), GMACs.
PAPER_SIZES = {"S": (43.3, 11.6), "B": (85.8, 23.1), "L": (383.7, 101.8)}

# [paper] Totals from Tables 3-5 keyed by (model, resolution, frames): params (M) or None, GMACs.
PAPER_TOTALS = {
    ("S-B/16", 256, 1): (129.0, 34.8),
    ("S-B/16", 512, 1): (None, 160.8),
    ("S-L/16", 256, 1): (426.8, 113.4),
    ("S-B/4x8", 128, 16): (None, 160.8),
    ("S-B/8x8", 128, 16): (None, 73.2),
    ("S-B/4x16", 128, 16): (None, 34.8),
}
# [paper] SD-VAE as the paper reports it (Table 3), keyed by resolution: params (M) or None, GMACs.
PAPER_SD_VAE = {256: (59.3, 162.2), 512: (None, 653.8)}

# The Stable Diffusion VAE's architecture (diffusers AutoencoderKL, as in SD v1/v2's
# vae/config.json); random weights, nothing downloaded.
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, act_fn="silu", norm_num_groups=32,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, sample_size=512,
)


def count_macs(fn) -> tuple[int, object]:
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops() // 2, out


def _params(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _row(model_name, resolution, frames, enc_params, enc_macs, dec_params, dec_macs,
         latent_shape) -> dict:
    E = 1
    for s in latent_shape:
        E *= s
    return {
        "model": model_name, "resolution": resolution, "frames": frames,
        "encoder": {"params": enc_params, "macs": enc_macs},
        "decoder": {"params": dec_params, "macs": dec_macs},
        "total": {"params": enc_params + dec_params, "macs": enc_macs + dec_macs},
        "latent_shape": list(latent_shape), "E": E,
    }


def count_vitok(config: ViTokConfig, resolution: int, frames: int = 1) -> dict:
    """Counts for one ViTok at ``frames x resolution x resolution`` (frames=1: an image), batch 1."""
    with torch.device("meta"):
        model = ViTok(config)
        shape = (1, 3, resolution, resolution) if frames == 1 else (1, 3, frames, resolution, resolution)
        x = torch.empty(shape)
    with torch.no_grad():
        enc_macs, posterior = count_macs(lambda: model.encode(x))
        z = posterior.mode()
        dec_macs, _ = count_macs(lambda: model.decode(z))
    return _row(config.name, resolution, frames, _params(model.encoder), enc_macs,
                _params(model.decoder), dec_macs, z.shape[1:])


def count_sd_vae(resolution: int, frames: int = 1, config: dict | None = None) -> dict:
    """Counts for diffusers' SD-VAE on one image, or frame by frame on a ``frames``-frame clip.
    ``config`` swaps in another AutoencoderKL configuration (default ``SD_VAE_CONFIG``)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**(SD_VAE_CONFIG if config is None else config))
        x = torch.empty(frames, 3, resolution, resolution)
    with torch.no_grad():
        enc_macs, posterior = count_macs(lambda: vae.encode(x).latent_dist)
        z = posterior.mode()
        dec_macs, _ = count_macs(lambda: vae.decode(z).sample)
    latent = tuple(z.shape[1:]) if frames == 1 else (frames, *z.shape[1:])
    return _row("SD-VAE", resolution, frames, _params(vae.encoder, vae.quant_conv), enc_macs,
                _params(vae.decoder, vae.post_quant_conv), dec_macs, latent)


def paper_figures(config: ViTokConfig, resolution: int, frames: int) -> dict:
    """The paper's ``{"params_m", "gmacs"}`` per part where the paper gives them, else None."""
    name = config.name
    enc, dec = name.split("/")[0].split("-")
    per_size = resolution == 256 and frames == 1 and config.patch_size == 16 and config.channels == 16
    parts = {
        "encoder": PAPER_SIZES.get(enc) if per_size else None,
        "decoder": PAPER_SIZES.get(dec) if per_size else None,
        "total": PAPER_TOTALS.get((name, resolution, frames)) if config.channels == 16 else None,
    }
    if parts["total"] is None and parts["encoder"] and parts["decoder"]:
        # [paper] docs/design.md section 1: the encoder's and decoder's Table 1 rows add up.
        parts["total"] = (round(parts["encoder"][0] + parts["decoder"][0], 1),
                          round(parts["encoder"][1] + parts["decoder"][1], 1))
    return {part: None if fig is None else {"params_m": fig[0], "gmacs": fig[1]}
            for part, fig in parts.items()}


def compare(config: ViTokConfig, resolution: int, frames: int = 1) -> dict:
    """One row of ``bench/flops.py``: ViTok, SD-VAE on the same pixels, the ratio, the paper."""
    row = count_vitok(config, resolution, frames)
    row["sd_vae"] = count_sd_vae(resolution, frames)
    row["macs_ratio_sd_vae_over_vitok"] = row["sd_vae"]["total"]["macs"] / row["total"]["macs"]
    row["paper"] = paper_figures(config, resolution, frames)
    sd = PAPER_SD_VAE.get(resolution) if frames == 1 else None
    row["paper_sd_vae"] = None if sd is None else {"params_m": sd[0], "gmacs": sd[1]}
    return row
