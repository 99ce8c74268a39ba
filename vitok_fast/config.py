"""Model configurations: the paper's size presets and the names that pick them.

A name reads like the paper's (Section 3, Table 1): ``S-B/16`` is a Small encoder, a Base
decoder and 16x16 image patches; ``S-B/4x8`` is a video model with tubelets of 4 frames x
8x8 pixels. ``T`` is a tiny size of ours for tests and CPU smoke runs, not in the paper.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

from vitok_fast.attention import BACKENDS as ATTENTION_BACKENDS
from vitok_fast.kernels.rope import rope_split

# [paper] Table 1: hidden size, blocks, heads. The SwiGLU hidden size 8d/3 is [ours],
# derived from the table's parameter counts (docs/design.md section 1).
SIZES = {
    "S": dict(width=768, depth=6, heads=12, mlp_hidden=2048),
    "B": dict(width=768, depth=12, heads=12, mlp_hidden=2048),
    "L": dict(width=1152, depth=24, heads=16, mlp_hidden=3072),
    # [ours] a tiny size for tests and smoke runs; 8d/3 rounded up to a multiple of 8.
    "T": dict(width=64, depth=2, heads=2, mlp_hidden=176),
}

_NAME = re.compile(r"^(?P<enc>[A-Z])-(?P<dec>[A-Z])/(?:(?P<q>\d+)x)?(?P<p>\d+)$")

# The variants the paper reports (Tables 1-5); `bench/flops.py --all` walks these.
PAPER_VARIANTS = ("S-B/16", "S-L/16", "B-B/16", "S-B/8", "S-B/32", "S-B/4x8", "S-B/8x8", "S-B/4x16")


# Fields that change how a model runs, not what it computes: configs that differ only in
# these are the same model (a checkpoint saved with kernels loads without them).
RUNTIME_FIELDS = ("use_kernels", "attention_backend")


@dataclass
class ViTokConfig:
    """Everything that fixes a ViTok's weights, plus the run-time kernel switches.

    Fields that shape weights are checked in ``__post_init__``; input sizes are not part of
    the config (any T, H, W divisible by the tubelet works at run time).
    """

    name: str = "S-B/16"
    encoder_width: int = 768
    encoder_depth: int = 6
    encoder_heads: int = 12
    encoder_mlp_hidden: int = 2048
    decoder_width: int = 768
    decoder_depth: int = 12
    decoder_heads: int = 12
    decoder_mlp_hidden: int = 2048
    patch_size: int = 16  # p: pixels per tubelet side
    tubelet_size: int = 1  # q: frames per tubelet (1 for image models)
    channels: int = 16  # c: bottleneck channels per token [paper: 16 for the main models]
    in_channels: int = 3
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    logvar_min: float = -30.0  # [authors' code] clamp of the bottleneck's log-variance
    logvar_max: float = 20.0
    # Route RMSNorm, SwiGLU, RoPE and the tubelet embed/head through vitok_fast.kernels
    # where Triton can run (CUDA tensors, or CPU under TRITON_INTERPRET=1); the plain
    # PyTorch path is used elsewhere and is always the reference.
    use_kernels: bool = True
    # Which attention kernel runs (vitok_fast/attention.py): "sdpa" lets PyTorch choose;
    # "auto" (opt-in) checks the CUDA kernels forward and backward once per shape and keeps
    # the fastest correct one (plain SDPA on the CPU); or pin one of "flash", "cudnn",
    # "efficient", "math", "fa4". Run-time only: no weights.
    attention_backend: str = "sdpa"

    def __post_init__(self):
        def positive(field):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ViTokConfig.{field} must be a positive integer, got {value!r}")

        for field in ("encoder_width", "encoder_depth", "encoder_heads", "encoder_mlp_hidden",
                      "decoder_width", "decoder_depth", "decoder_heads", "decoder_mlp_hidden",
                      "patch_size", "tubelet_size", "channels", "in_channels"):
            positive(field)
        for side in ("encoder", "decoder"):
            width, heads = getattr(self, f"{side}_width"), getattr(self, f"{side}_heads")
            if width % heads:
                raise ValueError(
                    f"{side}_width must be divisible by {side}_heads, got {width} and {heads}")
            head_dim = width // heads
            if head_dim % 2 or min(rope_split(head_dim)) < 1:
                raise ValueError(
                    f"{side} head dim must be even and at least 6 so that 3D RoPE can give each "
                    f"of the t, h, w axes at least one rotary pair; got {width}/{heads} = "
                    f"{width / heads:g}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"ViTokConfig.attention_backend must be one of "
                             f"{list(ATTENTION_BACKENDS)}, got {self.attention_backend!r}")
        if not self.logvar_min < self.logvar_max:
            raise ValueError(f"logvar_min must be < logvar_max, got {self.logvar_min} and {self.logvar_max}")

    @property
    def is_video(self) -> bool:
        return self.tubelet_size > 1

    @property
    def patch_dim(self) -> int:
        """Values per tubelet: q * p * p * 3."""
        return self.tubelet_size * self.patch_size**2 * self.in_channels

    def grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Token grid (T', H', W') of an input of the given size."""
        return frames // self.tubelet_size, height // self.patch_size, width // self.patch_size

    def E(self, frames: int, height: int, width: int) -> int:
        """[paper] Bottleneck size E = (T/q)(H/p)(W/p) * c floats."""
        t, h, w = self.grid(frames, height, width)
        return t * h * w * self.channels

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ViTokConfig":
        """Build a config from a paper-style name such as ``S-B/16`` or ``S-L/4x8``.

        Keyword overrides set any field, e.g. ``channels=32`` or ``use_kernels=False``.
        """
        match = _NAME.match(name.strip()) if isinstance(name, str) else None
        if match is None or match["enc"] not in SIZES or match["dec"] not in SIZES:
            raise ValueError(
                f"unknown model name {name!r}: expected '<enc>-<dec>/<p>' or '<enc>-<dec>/<q>x<p>' "
                f"with sizes from {sorted(SIZES)} (e.g. 'S-B/16', 'S-L/16', 'S-B/4x8')")
        enc, dec = SIZES[match["enc"]], SIZES[match["dec"]]
        fields = dict(
            name=name.strip(),
            encoder_width=enc["width"], encoder_depth=enc["depth"],
            encoder_heads=enc["heads"], encoder_mlp_hidden=enc["mlp_hidden"],
            decoder_width=dec["width"], decoder_depth=dec["depth"],
            decoder_heads=dec["heads"], decoder_mlp_hidden=dec["mlp_hidden"],
            patch_size=int(match["p"]), tubelet_size=int(match["q"] or 1),
        )
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown ViTokConfig field(s) {sorted(unknown)}")
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ViTokConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"config has unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def differences(self, other: "ViTokConfig | dict") -> list[str]:
        """``field: mine -> other's`` for each field that differs, run-time switches aside:
        what an error says when a checkpoint or a run directory holds another model."""
        mine = self.to_dict()
        theirs = other.to_dict() if isinstance(other, ViTokConfig) else dict(other)
        return [f"{k}: {mine.get(k)} -> {theirs.get(k)}" for k in sorted({*mine, *theirs})
                if k not in RUNTIME_FIELDS and k != "name" and mine.get(k) != theirs.get(k)]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
