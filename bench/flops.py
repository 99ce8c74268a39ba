"""Parameters and multiply-accumulates of ViTok against SD-VAE, counted with one counter.

    python bench/flops.py --model S-B/16                  # 256p image, table
    python bench/flops.py --model S-B/16 --resolution 512
    python bench/flops.py --model S-B/4x8                 # video: 16x128x128 clips
    python bench/flops.py --all --json -                  # every paper variant, JSON on stdout
    python bench/flops.py --against images                # today's image tokenizers at 256p
    python bench/flops.py --against all --json peers.json # images at 256, videos at 256 and 128
    python bench/flops.py --against flux1-vae,wan2.1-vae --resolution 512
    python bench/flops.py --list                          # the peers --against knows

"GMACs" are multiply-accumulates: what the paper calls "GFLOPs". "GFLOPs" here are 2 x MACs.
SD-VAE is diffusers' AutoencoderKL with the Stable Diffusion VAE configuration and random
weights, applied frame by frame to videos.

--against compares with the tokenizers of today's generators (bench/peers.py: each a diffusers
class with its released configuration, the source named beside it). Images are counted at
--resolution (default 256) against ViTok S-B/16; video VAEs on the clip length each takes
nearest 16 frames (1 + 4k or 1 + 8k: 17; Mochi 1 + 6k: 19) at 256 and 128 (or --resolution)
against ViTok S-B/4x8 on 16 frames, per input frame. Each peer is also set beside the ViTok
with the nearest pixels per latent float (bench/peers.py matched_vitok), as compression
trades against quality. A peer that cannot be built here is skipped with a one-line reason.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import peers
from vitok_fast.cli import ArgumentParser, UserError, run
from vitok_fast.config import ViTokConfig
from vitok_fast.flops import compare

# The rows of the paper's tables: (model, resolution, frames).
ALL_ROWS = (
    ("S-B/16", 256, 1), ("S-B/16", 512, 1), ("S-L/16", 256, 1), ("B-B/16", 256, 1),
    ("S-B/8", 256, 1), ("S-B/32", 256, 1),
    ("S-B/4x8", 128, 16), ("S-B/8x8", 128, 16), ("S-B/4x16", 128, 16),
)


def _against(text: str) -> list:
    try:
        return peers.select(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="S-B/16",
                        help="paper-style name, e.g. S-B/16, S-L/16, S-B/4x8 (default S-B/16)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="pixels per side (default 256 for images, 128 for video models)")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames per clip for video models (default 16); images use 1")
    parser.add_argument("--channels", type=int, default=16, help="bottleneck channels c (default 16)")
    parser.add_argument("--all", action="store_true", help="every variant of the paper's tables")
    parser.add_argument("--json", metavar="PATH", help="also write the counts as JSON ('-' for stdout)")
    parser.add_argument("--against", type=_against, metavar="NAME[,NAME...]",
                        help="compare with today's tokenizers instead of SD-VAE: ids from --list, "
                        "or images, videos, all")
    parser.add_argument("--list", action="store_true", help="list the tokenizers --against knows")
    parser.add_argument("--plot", metavar="PNG", help="with --against: MACs per pixel against pixels "
                        "per latent float, every model a labelled point (at the image resolution)")
    return parser.parse_args(argv)


def rows_to_count(args) -> list[tuple[ViTokConfig, int, int]]:
    if args.all:
        return [(ViTokConfig.from_name(m, channels=args.channels), r, f) for m, r, f in ALL_ROWS]
    config = ViTokConfig.from_name(args.model, channels=args.channels)
    frames = args.frames if args.frames is not None else (16 if config.is_video else 1)
    resolution = args.resolution if args.resolution is not None else (128 if config.is_video else 256)
    return [(config, resolution, frames)]


def _paper(fig, key):
    return "" if fig is None or fig[key] is None else f"{fig[key]:.1f}"


def _diff(ours, fig, key):
    if fig is None or fig[key] is None:
        return ""
    return f"{100 * (ours - fig[key]) / fig[key]:+.1f}%"


def format_table(rows: list[dict]) -> str:
    head = (f"{'model':<14} {'input':<11} {'part':<8} {'params(M)':>10} {'GMACs':>9} {'GFLOPs':>9}"
            f" | {'paper M':>8} {'paper GMACs':>11} {'d params':>9} {'d GMACs':>8}")
    lines = [head, "-" * len(head)]
    for row in rows:
        size = f"{row['resolution']}x{row['resolution']}"
        size = size if row["frames"] == 1 else f"{row['frames']}x{size}"
        for label, counts, paper in (("ViTok " + row["model"], row, row["paper"]),
                                     ("SD-VAE", row["sd_vae"], None)):
            for part in ("encoder", "decoder", "total"):
                params_m, gmacs = counts[part]["params"] / 1e6, counts[part]["macs"] / 1e9
                fig = paper[part] if paper else (row["paper_sd_vae"] if part == "total" else None)
                name = label if part == "encoder" else ""
                lines.append(
                    f"{name:<14} {size if part == 'encoder' else '':<11} {part:<8} {params_m:>10.2f} "
                    f"{gmacs:>9.2f} {2 * gmacs:>9.2f} | {_paper(fig, 'params_m'):>8} "
                    f"{_paper(fig, 'gmacs'):>11} {_diff(params_m, fig, 'params_m'):>9} "
                    f"{_diff(gmacs, fig, 'gmacs'):>8}")
            lines.append(f"{'':<14} {'':<11} latent {tuple(counts['latent_shape'])}, E = {counts['E']}")
        lines.append(f"{'':<14} {'':<11} SD-VAE : ViTok MACs = "
                     f"{row['macs_ratio_sd_vae_over_vitok']:.2f}x")
        lines.append("")
    lines.append("GMACs = multiply-accumulates (the paper's 'GFLOPs'); GFLOPs = 2 x GMACs. "
                 "Batch 1; SD-VAE runs videos frame by frame.")
    return "\n".join(lines)


def write_json(path: str, body: dict, **units) -> None:
    """The counts as JSON at ``path`` ('-': stdout), with the counter and what the units are."""
    payload = {"counter": "torch.utils.flop_counter.FlopCounterMode (meta device)",
               "torch": torch.__version__,
               "units": {"macs": "multiply-accumulates", "params": "count", **units}, **body}
    text = json.dumps(payload, indent=2)
    if path == "-":
        print(text)
    else:
        Path(path).write_text(text + "\n")


def list_peers() -> str:
    lines = [f"{'id':<28} {'kind':<6} {'diffusers class':<26} {'frames':<7} config source"]
    for p in peers.PEERS:
        frames = "1" if p.kind == "image" else f"1+{p.temporal}k"
        lines.append(f"{p.name:<28} {p.kind:<6} {p.cls:<26} {frames:<7} {p.source}")
    return "\n".join(lines)


def format_against(result: dict) -> str:
    """The peers table: each model, its counts, its compression and both ratios."""
    twins = {(m["name"], m["resolution"]): m for m in result["matched"]}
    head = (f"{'model':<28} {'input':<11} {'params(M)':>9} {'enc GMACs':>9} {'dec GMACs':>9} "
            f"{'GMACs/frame':>11} {'px/float':>8} | {'x paper ViTok':>16} | {'x matched ViTok':>30}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        size = f"{r['resolution']}x{r['resolution']}"
        size = size if r["frames"] == 1 else f"{r['frames']}x{size}"
        twin = twins.get((r["name"], r["resolution"]))
        paper = "" if r["ratio_to_vitok"] is None else f"{r['ratio_to_vitok']:.2f}x {r['vitok_reference']}"
        matched = "" if twin is None else (f"{twin['ratio_to_vitok_matched']:.2f}x {twin['vitok_matched']}"
                                           f" ({twin['vitok_matched_pixels_per_float']:.1f})")
        lines.append(f"{r['name']:<28} {size:<11} {r['params'] / 1e6:>9.1f} {r['macs_encode'] / 1e9:>9.1f} "
                     f"{r['macs_decode'] / 1e9:>9.1f} {r['macs_per_frame'] / 1e9:>11.2f} "
                     f"{r['pixels_per_float']:>8.1f} | {paper:>16} | {matched:>30}")
    lines += ["", "GMACs = multiply-accumulates, encode + decode, batch 1; videos per input frame. "
              "px/float = input values (frames x H x W x 3) per latent float.",
              "x paper ViTok: the peer's MACs per frame over ViTok S-B/16 (images) or S-B/4x8 "
              "(16-frame clips); x matched ViTok: over the ViTok with the nearest px/float "
              "(its px/float in brackets)."]
    lines += [f"skipped {why}" for why in result["skipped"]]
    return "\n".join(lines)


def plot_against(result: dict, path: str, resolution: int) -> None:
    """MACs per pixel against pixels per latent float, log scales, every model a labelled
    point at ``resolution``: peers (o images, s clips per frame), ViTok's paper models in red,
    its matched-compression variants as hollow red markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 7))
    taken: dict = {}
    for r in (r for r in result["rows"] if r["resolution"] == resolution):
        peer = r["name"] in peers.BY_NAME
        x, y = r["pixels_per_float"], r["macs_per_frame"] / resolution**2
        marker = "o" if r["kind"] == "image" else "s"
        if not peer and " c=" in r["name"]:  # a matched variant: c differs, MACs barely
            ax.scatter(x, y, marker=marker, s=30, facecolors="none", edgecolors="tab:red")
            continue
        color = "tab:red" if not peer else ("tab:blue" if r["kind"] == "image" else "tab:green")
        ax.scatter(x, y, marker=marker, s=36, color=color)
        spot = (round(5 * math.log10(x)), round(10 * math.log10(y)))  # near points: labels stack
        taken[spot] = taken.get(spot, -1) + 1
        right = x > 120  # at the right edge the label goes above, to the left of its point
        ax.annotate(r["name"] if peer else f"ViTok {r['name']}", (x, y), fontsize=7,
                    xytext=(-3 if right else 5, (9 if right else 3) - 9 * taken[spot]),
                    textcoords="offset points", ha="right" if right else "left")
    for marker, label, style in (("o", "image peers", dict(color="tab:blue")),
                                 ("s", "video peers (per frame)", dict(color="tab:green")),
                                 ("o", "ViTok (paper models)", dict(color="tab:red")),
                                 ("o", "ViTok, c matched to a peer", dict(facecolors="none", edgecolors="tab:red"))):
        ax.scatter([], [], marker=marker, label=label, **style)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("pixels per latent float (input values / latent size; higher = more compression)")
    ax.set_ylabel("multiply-accumulates per pixel (encode + decode, batch 1)")
    ax.set_title(f"Tokenizers at {resolution}x{resolution}: cost against compression "
                 "(counted on the meta device; bench/flops.py --against)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def against(args) -> int:
    start = time.perf_counter()
    images = (args.resolution,) if args.resolution else (256,)
    videos = (args.resolution,) if args.resolution else (256, 128)
    result = peers.compare(args.against, images, videos)
    if args.json != "-":
        print(format_against(result))
        print(f"counted in {time.perf_counter() - start:.1f} s with "
              f"torch.utils.flop_counter.FlopCounterMode on the meta device")
    if args.json:
        import diffusers
        write_json(args.json, {"diffusers": diffusers.__version__, **result},
                   pixels_per_float="input values (frames x H x W x 3) per latent float",
                   ratio_to_vitok="macs_per_frame / vitok_reference's macs_per_frame")
    if args.plot:
        plot_against(result, args.plot, images[0])
        print(f"wrote {args.plot}", file=sys.stderr if args.json == "-" else sys.stdout)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        print(list_peers())
        return 0
    if args.plot and not args.against:
        raise UserError("--plot draws the --against table: give --against too (e.g. --against all)")
    if args.against:
        if args.all or args.frames is not None:
            raise UserError("--against counts each peer on its own clip length beside the paper's "
                            "ViTok: drop --all / --frames (see --help)")
        if args.resolution is not None and (args.resolution <= 0 or args.resolution % 64):
            raise UserError(f"--resolution with --against must be a positive multiple of 64 (the "
                            f"largest downsampling, DC-AE f64's), got {args.resolution}")
        return against(args)
    start = time.perf_counter()
    try:
        rows = [compare(config, resolution, frames) for config, resolution, frames in rows_to_count(args)]
    except (ValueError, TypeError) as e:  # a bad name, size or channel count: say which
        print(f"error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    if args.json != "-":
        # Stdout stays pure JSON with --json -, so the table goes only to the other form.
        print(format_table(rows))
        print(f"counted {len(rows)} row(s) in {elapsed:.1f} s with "
              f"torch.utils.flop_counter.FlopCounterMode on the meta device")
    if args.json:
        write_json(args.json, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
