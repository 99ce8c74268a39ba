"""The tokenizers users pick today, built from diffusers with their released configurations.

Shared by bench/flops.py, bench/bench_e2e.py and bench/roofline.py (``--against``). Every
peer is a diffusers class and a configuration; the comment beside each says where that
configuration comes from (a diffusers class default, the conversion script diffusers used
to publish the weights, or the model's card). Weights are random or absent (meta device):
multiply-accumulates and speed do not depend on them, and nothing is downloaded.

A peer whose class is missing from the installed diffusers, or that needs an optional
package (RAE: ``transformers``), cannot be built: ``unavailable(peer)`` says why in one line
and the benches skip it. Nothing is ever faked.

Counts: parameters of the encoder side (everything up to the latent: encoder, quant conv)
and the decoder side; multiply-accumulates (MACs) of one encode and one decode at batch 1,
counted with vitok_fast.flops' counter (torch FlopCounterMode on the meta device).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from vitok_fast.config import ViTokConfig
from vitok_fast.flops import count_macs, count_vitok

# diffusers' scripts/ at the commit read for this file (huggingface/diffusers 58eb52c, Aug 2026).
_SCRIPTS = "diffusers scripts/"


@dataclasses.dataclass(frozen=True)
class Peer:
    """One released tokenizer: how to build it and what it was published with."""
    name: str  # stable lower-case id, e.g. "flux1-vae"
    title: str  # what users call it
    cls: str  # diffusers class
    config: dict  # keyword arguments of ``cls``
    source: str  # where ``config`` comes from
    kind: str = "image"  # "image" or "video"
    temporal: int = 1  # video: frames come as 1 + temporal * k
    published_params: float | None = None  # total parameters as published, if anywhere
    published_where: str = ""
    requires: str = ""  # an optional Python package the class needs
    resolutions: tuple = ()  # only these input sides (empty: any multiple of the downsampling)
    latent_key: str = "latent_dist"  # attribute of encode()'s output holding the latent
    pad_first: int = 0  # frames the model's own forward() replicates before a clip's first


_SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, act_fn="silu", norm_num_groups=32,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, sample_size=512,
)
_DCAE_IN_F32 = dict(  # dc-ae-f32c32-in-1.0 (and -mix-1.0): no attention scales, BN in the ResBlocks
    latent_channels=32,
    encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    encoder_layers_per_block=[0, 4, 8, 2, 2, 2], decoder_layers_per_block=[0, 5, 10, 2, 2, 2],
    encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6,
    decoder_norm_types=["batch_norm"] * 3 + ["rms_norm"] * 3,
    decoder_act_fns=["relu"] * 3 + ["silu"] * 3, scaling_factor=0.3189,
)

PEERS = (
    # -- images --
    Peer("sd-vae", "SD-VAE (SD 1.x/2.x)", "AutoencoderKL", _SD_VAE,
         "vae/config.json of the Stable Diffusion v1/v2 releases (vitok_fast.flops.SD_VAE_CONFIG)",
         published_params=83_653_863, published_where="docs/design.md section 3 (83.7M as shipped)"),
    Peer("flux1-vae", "FLUX.1 VAE", "AutoencoderKL",
         dict(_SD_VAE, latent_channels=16, sample_size=1024, use_quant_conv=False,
              use_post_quant_conv=False),
         "black-forest-labs/FLUX.1-dev vae/config.json: the SD-VAE layout with 16 latent "
         "channels and no quant convs"),
    Peer("flux2-vae", "FLUX.2 VAE", "AutoencoderKLFlux2", {},
         "diffusers AutoencoderKLFlux2 class defaults, which " + _SCRIPTS +
         "convert_flux2_to_diffusers.py instantiates unchanged for the released flux2-vae"),
    Peer("dc-ae-f32c32-sana-1.0", "DC-AE f32c32 (SANA 1.0)", "AutoencoderDC",
         dict(latent_channels=32,
              encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
              decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
              encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
              decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
              encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
              decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
              encoder_layers_per_block=[2, 2, 2, 3, 3, 3], decoder_layers_per_block=[3] * 6,
              downsample_block_type="conv", upsample_block_type="interpolate",
              decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407),
         _SCRIPTS + "convert_dcae_to_diffusers.py get_ae_config('dc-ae-f32c32-sana-1.0')",
         latent_key="latent"),
    Peer("dc-ae-f32c32-in-1.0", "DC-AE f32c32 (ImageNet)", "AutoencoderDC", _DCAE_IN_F32,
         _SCRIPTS + "convert_dcae_to_diffusers.py get_ae_config('dc-ae-f32c32-in-1.0'); "
         "down/upsampling: the class default pixel (un)shuffle", latent_key="latent"),
    Peer("dc-ae-f64c128-in-1.0", "DC-AE f64c128 (ImageNet)", "AutoencoderDC",
         dict(_DCAE_IN_F32, latent_channels=128,
              encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 4,
              decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 4,
              encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024, 2048],
              decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024, 2048],
              encoder_layers_per_block=[0, 4, 8, 2, 2, 2, 2],
              decoder_layers_per_block=[0, 5, 10, 2, 2, 2, 2],
              encoder_qkv_multiscales=((),) * 7, decoder_qkv_multiscales=((),) * 7,
              decoder_norm_types=["batch_norm"] * 3 + ["rms_norm"] * 4,
              decoder_act_fns=["relu"] * 3 + ["silu"] * 4, scaling_factor=0.2889),
         _SCRIPTS + "convert_dcae_to_diffusers.py get_ae_config('dc-ae-f64c128-in-1.0')",
         latent_key="latent"),
    Peer("qwen-image-vae", "Qwen-Image VAE", "AutoencoderKLQwenImage", {},
         "diffusers AutoencoderKLQwenImage class defaults (Qwen/Qwen-Image vae/config.json: "
         "base_dim 96, z_dim 16, dim_mult 1,2,4,4); run on one-frame clips"),
    Peer("rae-dinov2-b", "RAE (DINOv2-B encoder, ViT-XL decoder)", "AutoencoderRAE",
         dict(encoder_type="dinov2", encoder_hidden_size=768, encoder_patch_size=14,
              encoder_num_hidden_layers=12, encoder_input_size=224, patch_size=16,
              decoder_hidden_size=1152, decoder_num_hidden_layers=28,
              decoder_num_attention_heads=16, decoder_intermediate_size=4096),
         _SCRIPTS + "convert_rae_to_diffusers.py (encoder_type dinov2 = "
         "facebook/dinov2-with-registers-base; DECODER_CONFIGS['ViTXL'], variant ViTXL_n08; "
         "encoder_input_size 224, patch_size 16 -> 256x256 output)",
         requires="transformers", resolutions=(256,), latent_key="latent"),
    Peer("taesd", "TAESD", "AutoencoderTiny", {},
         "diffusers AutoencoderTiny class defaults (madebyollin/taesd config.json)",
         latent_key="latents"),
    # -- videos --
    Peer("wan2.1-vae", "Wan 2.1 VAE", "AutoencoderKLWan", {},
         "diffusers AutoencoderKLWan class defaults (Wan-AI/Wan2.1-T2V-14B-Diffusers "
         "vae/config.json; " + _SCRIPTS + "convert_wan_to_diffusers.py convert_vae)",
         kind="video", temporal=4, published_params=127e6,
         published_where="Wan technical report (arXiv 2503.20314) section 3.1: "
         "Wan-VAE has 127M parameters"),
    Peer("wan2.2-vae", "Wan 2.2 VAE (TI2V-5B)", "AutoencoderKLWan",
         dict(base_dim=160, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
              decoder_base_dim=256, scale_factor_temporal=4, scale_factor_spatial=16,
              patch_size=2),
         _SCRIPTS + "convert_wan_to_diffusers.py vae22_diffusers_config", kind="video", temporal=4),
    Peer("hunyuanvideo-vae", "HunyuanVideo VAE", "AutoencoderKLHunyuanVideo", {},
         "diffusers AutoencoderKLHunyuanVideo class defaults (hunyuanvideo-community/"
         "HunyuanVideo vae/config.json)", kind="video", temporal=4),
    Peer("ltx-video-0.9.0-vae", "LTX-Video 0.9.0 VAE", "AutoencoderKLLTXVideo", {},
         "diffusers AutoencoderKLLTXVideo class defaults = " + _SCRIPTS +
         "convert_ltx_to_diffusers.py get_vae_config('0.9.0')", kind="video", temporal=8),
    Peer("ltx-video-0.9.5-vae", "LTX-Video 0.9.5 VAE", "AutoencoderKLLTXVideo",
         dict(latent_channels=128, block_out_channels=(128, 256, 512, 1024, 2048),
              down_block_types=("LTXVideo095DownBlock3D",) * 4,
              decoder_block_out_channels=(256, 512, 1024), layers_per_block=(4, 6, 6, 2, 2),
              decoder_layers_per_block=(5, 5, 5, 5),
              spatio_temporal_scaling=(True, True, True, True),
              decoder_spatio_temporal_scaling=(True, True, True),
              decoder_inject_noise=(False, False, False, False),
              downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
              upsample_residual=(True, True, True), upsample_factor=(2, 2, 2),
              timestep_conditioning=True, patch_size=4, patch_size_t=1, resnet_norm_eps=1e-6,
              encoder_causal=True, decoder_causal=False, spatial_compression_ratio=32,
              temporal_compression_ratio=8),
         _SCRIPTS + "convert_ltx_to_diffusers.py get_vae_config('0.9.5')", kind="video", temporal=8),
    Peer("cogvideox-vae", "CogVideoX VAE", "AutoencoderKLCogVideoX", {},
         "diffusers AutoencoderKLCogVideoX class defaults (THUDM/CogVideoX-2b vae/config.json; "
         "5b differs only in scaling_factor)", kind="video", temporal=4),
    Peer("cosmos-cv8x8x8", "Cosmos CV8x8x8 1.0", "AutoencoderKLCosmos", {},
         "diffusers AutoencoderKLCosmos class defaults = " + _SCRIPTS +
         "convert_cosmos_to_diffusers.py VAE_CONFIGS['CV8x8x8-1.0']", kind="video", temporal=8),
    Peer("vidtok-kl-causal-488-4chn", "VidTok KL causal 4x8x8, 4 ch", "AutoencoderVidTok", {},
         "diffusers AutoencoderVidTok class defaults: ch 128, ch_mult 1,2,4,4, z_channels 4, "
         "KL, causal, 3 spatial and 2 temporal downsamplings (microsoft/VidTok "
         "vidtok_kl_causal_488_4chn); its forward() replicates the first frame 3 times before "
         "encoding (17 frames in, 5 latent frames, 17 out), and so do we",
         kind="video", temporal=4, pad_first=3),
    Peer("mochi-vae", "Mochi 1 VAE", "AutoencoderKLMochi", {},
         "diffusers AutoencoderKLMochi class defaults (genmo/mochi-1-preview vae/config.json)",
         kind="video", temporal=6),
)
BY_NAME = {p.name: p for p in PEERS}
IMAGES = tuple(p.name for p in PEERS if p.kind == "image")
VIDEOS = tuple(p.name for p in PEERS if p.kind == "video")

# The paper's ViTok each peer is first compared with, per kind.
VITOK_REFERENCE = {"image": "S-B/16", "video": "S-B/4x8"}
VITOK_FRAMES = 16  # the paper's clips (Tables 4-5)


def select(spec: str) -> list[Peer]:
    """``NAME[,NAME...]``, ``images``, ``videos`` or ``all`` -> peers; ValueError on a bad name."""
    names: list[str] = []
    for part in (s.strip() for s in spec.split(",")):
        group = {"images": IMAGES, "videos": VIDEOS, "all": IMAGES + VIDEOS}.get(part)
        if group is not None:
            names += group
        elif part in BY_NAME:
            names.append(part)
        else:
            raise ValueError(f"unknown tokenizer {part!r}: expected images, videos, all or a "
                             f"comma list of {', '.join(BY_NAME)}")
    return [BY_NAME[n] for n in dict.fromkeys(names)]


def frames_for(peer: Peer, frames: int = VITOK_FRAMES) -> int:
    """The clip length a causal video VAE takes (1 + temporal * k) nearest ``frames``, never
    fewer: 17 for 4x and 8x temporal compression, 19 for Mochi's 6x. Images: 1."""
    if peer.kind == "image":
        return 1
    return 1 + peer.temporal * math.ceil((frames - 1) / peer.temporal)


def unavailable(peer: Peer) -> str | None:
    """Why ``peer`` cannot be built here, in one line; None when it can."""
    import diffusers

    if not hasattr(diffusers, peer.cls):
        return f"{peer.name}: diffusers {diffusers.__version__} has no {peer.cls}; upgrade diffusers"
    if peer.requires:
        import importlib.util
        if importlib.util.find_spec(peer.requires) is None:
            return (f"{peer.name}: {peer.cls} needs the optional package '{peer.requires}'; "
                    f"pip install 'vitok_fast[peers]'")
    return None


def check_resolution(peer: Peer, resolution: int) -> str | None:
    """Why ``peer`` is not run at ``resolution`` (one line), or None."""
    if peer.resolutions and resolution not in peer.resolutions:
        return (f"{peer.name}: released for {'/'.join(map(str, peer.resolutions))}x"
                f"{'/'.join(map(str, peer.resolutions))} only, not {resolution}")
    return None


def build(peer: Peer, device="meta", dtype=torch.float32) -> torch.nn.Module:
    """The peer's diffusers module on ``device`` (random weights off meta), in eval mode."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    with torch.device(device):
        model = getattr(diffusers, peer.cls)(**peer.config)
    for knob in ("use_framewise_encoding", "use_framewise_decoding"):
        # HunyuanVideo's default splits a clip of more than 16 frames into overlapping
        # 17-frame windows, a memory saving that costs 32% more MACs at 17 frames; like
        # tiling (off in every peer), we count the model's one pass over the clip.
        if getattr(model, knob, False):
            setattr(model, knob, False)
    # .to(device): VidTok makes a parameter with the legacy torch.Tensor([...]), which ignores
    # the default device.
    return model.to(device=device, dtype=dtype).eval()


def make_input(peer: Peer, resolution: int, frames: int, batch: int = 1, device="meta",
               dtype=torch.float32) -> torch.Tensor:
    """Pixels in [-1, 1] in the layout the peer's encode takes."""
    video_layout = peer.kind == "video" or peer.cls == "AutoencoderKLQwenImage"
    shape = (batch, 3, frames, resolution, resolution) if video_layout else (batch, 3, resolution, resolution)
    if device == "meta" or torch.device(device).type == "meta":
        return torch.empty(shape, device="meta", dtype=dtype)
    return torch.rand(shape, device=device, dtype=dtype) * 2 - 1


def encode(peer: Peer, model, x: torch.Tensor) -> torch.Tensor:
    """The latent a generator would see (the posterior mean for KL VAEs)."""
    if peer.pad_first:
        x = torch.cat([x[:, :, :1].expand(-1, -1, peer.pad_first, -1, -1), x], dim=2)
    out = getattr(model.encode(x), peer.latent_key)
    return out.mode() if peer.latent_key == "latent_dist" else out


def decode(peer: Peer, model, z: torch.Tensor) -> torch.Tensor:
    if getattr(model.config, "timestep_conditioning", False):
        # LTX-Video 0.9.5's decoder is conditioned on a denoising timestep; the pipeline's
        # default decode_timestep is 0.
        out = model.decode(z, temb=torch.zeros(z.shape[0], device=z.device, dtype=z.dtype))
    else:
        out = model.decode(z)
    return out if isinstance(out, torch.Tensor) else out.sample


def _encoder_side(model) -> list[torch.nn.Module]:
    """The modules that run in encode(): the encoder and any quant conv."""
    return [model.encoder] + [getattr(model, n) for n in ("quant_conv",) if getattr(model, n, None) is not None]


def count(peer: Peer, resolution: int, frames: int | None = None) -> dict:
    """Parameters, MACs and latent of one encode + decode at batch 1 on the meta device."""
    frames = frames_for(peer) if frames is None else frames
    model = build(peer)
    x = make_input(peer, resolution, frames)
    # Under the meta device: Cosmos makes its Haar-wavelet filters inside forward.
    with torch.no_grad(), torch.device("meta"):
        enc_macs, z = count_macs(lambda: encode(peer, model, x))
        dec_macs, y = count_macs(lambda: decode(peer, model, z))
    total = sum(p.numel() for p in model.parameters())
    enc_params = sum(p.numel() for m in _encoder_side(model) for p in m.parameters())
    latent = list(z.shape[1:])
    if len(latent) == 4 and latent[1] == 1 and peer.kind == "image":
        latent = [latent[0], *latent[2:]]  # Qwen-Image: a one-frame clip is an image
    return {"params": total, "params_encoder": enc_params, "params_decoder": total - enc_params,
            "latent_shape": latent, "output_shape": list(y.shape[1:]),
            "macs_encode": enc_macs, "macs_decode": dec_macs}


def pixels_per_float(resolution: int, frames: int, latent_shape) -> float:
    """Input values (frames x H x W x 3) per latent float: the compression a generator sees."""
    return frames * resolution * resolution * 3 / math.prod(latent_shape)


def row(name: str, kind: str, resolution: int, frames: int, counts: dict, source: str,
        reference: dict | None) -> dict:
    """One row of ``bench/flops.py --json`` (the schema of issue 19)."""
    total = counts["macs_encode"] + counts["macs_decode"]
    per_frame = total / frames
    return {
        "name": name, "kind": kind, "resolution": resolution, "frames": frames,
        "params": counts["params"], "params_encoder": counts["params_encoder"],
        "params_decoder": counts["params_decoder"], "latent_shape": counts["latent_shape"],
        "pixels_per_float": pixels_per_float(resolution, frames, counts["latent_shape"]),
        "macs_encode": counts["macs_encode"], "macs_decode": counts["macs_decode"],
        "macs_total": total, "macs_per_frame": per_frame,
        "ratio_to_vitok": None if reference is None else per_frame / reference["macs_per_frame"],
        "vitok_reference": None if reference is None else reference["name"],
        "config_source": source,
    }


def vitok_name(config: ViTokConfig) -> str:
    return config.name if config.channels == 16 else f"{config.name} c={config.channels}"


def vitok_row(config: ViTokConfig, resolution: int, frames: int) -> dict:
    c = count_vitok(config, resolution, frames)
    counts = {"params": c["total"]["params"], "params_encoder": c["encoder"]["params"],
              "params_decoder": c["decoder"]["params"], "latent_shape": c["latent_shape"],
              "macs_encode": c["encoder"]["macs"], "macs_decode": c["decoder"]["macs"]}
    source = ("vitok_fast.config.ViTokConfig.from_name: the paper's Table 1 sizes"
              + ("" if config.channels == 16 else f", c = {config.channels} bottleneck channels "
                 "(matched compression, not a paper model)"))
    return row(vitok_name(config), "video" if frames > 1 else "image", resolution, frames,
               counts, source, None)


# The matched-compression ViTok: the paper's tubelets (its reference first) with the
# bottleneck width c chosen for them, c at least the paper's 16. So more compression than the
# paper models' 48 pixels per float comes from a larger tubelet, as in the paper (S-B/32,
# S-B/4x16, S-B/8x8), not from a c the paper never trains; less comes from a wider c.
_MATCH_SHAPES = {"image": ("S-B/16", "S-B/8", "S-B/32"), "video": ("S-B/4x8", "S-B/4x16", "S-B/8x8")}
_MATCH_MIN_CHANNELS = 16
_MATCH_TOLERANCE = math.log(1.05)


def matched_vitok(kind: str, target: float) -> ViTokConfig:
    """The ViTok whose pixels per latent float (q p^2 3 / c, c >= 16) matches ``target``:
    the first of the paper's tubelets (reference first) where some c comes within 5%, else
    the nearest in log ratio over all of them."""
    best = None
    for name in _MATCH_SHAPES[kind]:
        values = ViTokConfig.from_name(name).patch_dim
        c = min(range(_MATCH_MIN_CHANNELS, values + 1), key=lambda c: abs(math.log(values / c / target)))
        miss = abs(math.log(values / c / target))
        if miss <= _MATCH_TOLERANCE:
            return ViTokConfig.from_name(name, channels=c)
        if best is None or miss < best[0]:
            best = (miss, name, c)
    return ViTokConfig.from_name(best[1], channels=best[2])


def compare(selected: list[Peer], image_resolutions, video_resolutions, progress=None) -> dict:
    """The ``--against`` table: ViTok's paper reference, each peer and its matched-compression
    ViTok, at every resolution of its kind. Returns ``{"rows", "matched", "skipped"}``:
    rows in the issue-19 schema (ViTok rows included), one ``matched`` entry per peer row with
    both ratios, and one line per peer that was not counted and why."""
    rows: dict[tuple, dict] = {}
    matched, skipped = [], []

    def vitok(config: ViTokConfig, resolution: int, frames: int) -> dict:
        key = (vitok_name(config), resolution, frames)
        if key not in rows:
            rows[key] = vitok_row(config, resolution, frames)
        return rows[key]

    for peer in selected:
        why = unavailable(peer)
        if why:
            skipped.append(why)
            continue
        frames = frames_for(peer)
        vitok_frames = VITOK_FRAMES if peer.kind == "video" else 1
        for resolution in image_resolutions if peer.kind == "image" else video_resolutions:
            why = check_resolution(peer, resolution)
            if why:
                skipped.append(why)
                continue
            if progress:
                progress(f"{peer.name} {resolution}")
            reference = vitok(ViTokConfig.from_name(VITOK_REFERENCE[peer.kind]), resolution, vitok_frames)
            r = row(peer.name, peer.kind, resolution, frames, count(peer, resolution, frames),
                    peer.source, reference)
            rows[(peer.name, resolution, frames)] = r
            twin = vitok(matched_vitok(peer.kind, r["pixels_per_float"]), resolution, vitok_frames)
            matched.append({"name": peer.name, "resolution": resolution,
                            "pixels_per_float": r["pixels_per_float"],
                            "vitok_reference": reference["name"],
                            "ratio_to_vitok": r["ratio_to_vitok"],
                            "vitok_matched": twin["name"],
                            "vitok_matched_pixels_per_float": twin["pixels_per_float"],
                            "ratio_to_vitok_matched": r["macs_per_frame"] / twin["macs_per_frame"]})
    order = {"image": 0, "video": 1}
    # Images then videos, larger inputs first, ViTok rows before the peers (order kept).
    out = sorted(rows.values(), key=lambda r: (order[r["kind"]], -r["resolution"], r["name"] in BY_NAME))
    return {"rows": out, "matched": matched, "skipped": skipped}
