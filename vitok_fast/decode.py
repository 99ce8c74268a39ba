"""Decode latents written by ``python -m vitok_fast.encode`` back to pixels.

    python -m vitok_fast.decode --ckpt runs/s1/final --latents latents/imagenet256 --out decoded/

Writes ``000000.png``, ... (images) or ``000000.mp4``, ... (videos) in item order, from the
posterior mean (``--sample`` draws z = mean + exp(logvar / 2) * eps instead).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from vitok_fast import cli
from vitok_fast import metrics as M


@torch.no_grad()
def decode_latents(model, latents: str | Path, out: str | Path, *, batch_size: int = 32,
                   sample: bool = False, max_samples: int | None = None, device="cpu",
                   tile=None, overlap=None, fps: float = 8.0, seed: int = 0) -> int:
    from safetensors.torch import load_file

    from vitok_fast.latents import load_latents
    from vitok_fast.media import to_array, write_image, write_video

    index, shards = load_latents(latents)
    c = model.config.channels
    if index["config"]["channels"] != c or index["config"]["patch_size"] != model.config.patch_size \
            or index["config"]["tubelet_size"] != model.config.tubelet_size:
        raise ValueError(
            f"{latents} holds latents of {index['model']} with c={index['config']['channels']}, "
            f"p={index['config']['patch_size']}, q={index['config']['tubelet_size']}; the checkpoint "
            f"is {model.config.name} with c={c}, p={model.config.patch_size}, "
            f"q={model.config.tubelet_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device).manual_seed(seed)
    total = index["num_samples"] if max_samples is None else min(max_samples, index["num_samples"])
    n = 0
    bar = tqdm(total=total, desc="decode", unit="item")
    for shard in shards:
        tensors = load_file(shard)
        mean, logvar = tensors["mean"], tensors["logvar"]
        for i in range(0, mean.shape[0], batch_size):
            if n >= total:
                break
            m = mean[i:i + batch_size][: total - n].to(device, torch.float32)
            z = m
            if sample:
                lv = logvar[i:i + batch_size][: total - n].to(device, torch.float32)
                z = m + torch.exp(0.5 * lv) * torch.randn(m.shape, generator=generator, device=device)
            pixels = M.quantize(model.decode(z, tile=tile, overlap=overlap)).cpu()
            for item in pixels:
                if item.ndim == 3:
                    write_image(out / f"{n:06d}.png", to_array(item))
                else:
                    write_video(out / f"{n:06d}.mp4", to_array(item), fps)
                n += 1
            bar.update(pixels.shape[0])
    bar.close()
    return n


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="python -m vitok_fast.decode", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="directory written by ViTok.save_pretrained")
    p.add_argument("--latents", required=True, type=cli.existing_dir,
                   help="directory written by vitok_fast.encode")
    p.add_argument("--out", required=True, type=cli.output_dir, help="output directory")
    p.add_argument("--batch-size", type=cli.positive_int, default=32)
    p.add_argument("--max-samples", type=cli.positive_int)
    p.add_argument("--sample", action="store_true", help="decode a posterior sample, not the mean")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0)
    p.add_argument("--fps", type=cli.positive_float, default=8.0,
                   help="frame rate of decoded videos")
    p.add_argument("--tile", type=cli.positive_int, help="decode in tiles of this many pixels")
    p.add_argument("--overlap", type=cli.nonnegative_int, help="tile overlap in pixels")
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument("--device", type=cli.device, default=cli.default_device())
    args = p.parse_args(argv)

    from vitok_fast.checkpoint import resolve_ckpt
    from vitok_fast.model import ViTok

    model = ViTok.from_pretrained(resolve_ckpt(args.ckpt), device=args.device,
                                  **({"use_kernels": False} if args.no_kernels else {})).eval()
    cli.check_sizes(model.config, tile=args.tile, overlap=args.overlap)
    n = decode_latents(model, args.latents, args.out, batch_size=args.batch_size,
                       sample=args.sample, max_samples=args.max_samples, device=args.device,
                       tile=args.tile, overlap=args.overlap, fps=args.fps, seed=args.seed)
    print(f"decoded {n} items to {args.out}", file=sys.stderr)
    return n


if __name__ == "__main__":
    cli.run(main)
