"""Sample a class-conditional DiT trained on ViTok latents and decode with the ViTok.

    python -m vitok_fast.sample --dit runs/dit-DiT-XL_1 --vitok runs/s2 --classes 1,2,3 \\
        --cfg 1.5 --steps 250 --per-class 4 --out samples/

DDIM (eta 0) with classifier-free guidance (docs/generation.md). ``--dit`` is a train/dit.py
run (its latest checkpoint's EMA weights), a checkpoint directory, or its ``ema/`` folder;
the latent statistics come from the run's ``latents.json``. Writes one PNG per image sample
(an MP4 per video sample) named ``<class>_<i>.png``, and ``samples.npz`` with ``pixels``
(uint8, N x H x W x 3 or N x T x H x W x 3), ``latents`` (the denormalised ViTok latents)
and ``labels``; ``python -m vitok_fast.evaluate --generated DIR`` scores them.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from vitok_fast.cli import UserError, run
# What train/dit.py shares with sampling lives in vitok_fast/dit.py and vitok_fast/media.py.
from vitok_fast.dit import LATENT_FILE, decode_samples, find_latent_info  # noqa: F401
from vitok_fast.fileio import atomic_write
from vitok_fast.media import save_sample_grid, to_array, to_uint8, write_video  # noqa: F401

def parse_classes(text: str, num_classes: int) -> list[int]:
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise UserError(f"--classes expects comma-separated class indices such as 1,2,3, "
                        f"got {text!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise UserError(f"--classes must name classes in [0, {num_classes - 1}] (the DiT has "
                        f"{num_classes}), got {text!r}")
    return classes


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m vitok_fast.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dit", required=True, help="train/dit.py run, checkpoint or ema folder")
    p.add_argument("--vitok", help="the ViTok that encoded the latents (default: the run's)")
    p.add_argument("--classes", default="0", help="comma-separated class indices")
    p.add_argument("--per-class", type=int, default=1, help="samples per class")
    p.add_argument("--cfg", type=float, default=1.5, help="guidance scale [paper: 1.5]")
    p.add_argument("--steps", type=int, default=250, help="DDIM steps [paper: 250]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.per_class < 1 or args.batch_size < 1:
        raise UserError(f"--per-class and --batch-size must be at least 1, got "
                        f"{args.per_class} and {args.batch_size}")

    from vitok_fast.checkpoint import resolve_ckpt
    from vitok_fast.dit import DiT, Diffusion, LatentNorm
    from vitok_fast.model import ViTok
    from PIL import Image

    overrides = {"use_kernels": False} if args.no_kernels else {}
    dit_dir = resolve_ckpt(args.dit)
    info = find_latent_info(dit_dir)
    dit = DiT.from_pretrained(dit_dir, device=args.device, **overrides).eval()
    vitok_path = args.vitok or info.get("vitok")
    if not vitok_path:
        raise UserError("pass --vitok: the run does not record which ViTok encoded its latents")
    vitok = ViTok.from_pretrained(resolve_ckpt(vitok_path), device=args.device, **overrides).eval()
    norm = LatentNorm(info["stats"], info.get("per_channel_norm", False))
    shape = tuple(info["latent_shape"])
    if shape[0] != vitok.config.channels:
        raise UserError(f"the DiT was trained on {shape[0]}-channel latents, the ViTok "
                        f"{vitok_path} has {vitok.config.channels} channels: pass the ViTok "
                        f"that encoded the DiT's latents")
    classes = parse_classes(args.classes, dit.config.num_classes)
    labels = torch.tensor(classes).repeat_interleave(args.per_class)

    diffusion, gen = Diffusion(), torch.Generator(args.device).manual_seed(args.seed)
    latents, pixels = [], []
    for i in range(0, len(labels), args.batch_size):
        y = labels[i:i + args.batch_size].to(args.device)
        z = diffusion.ddim_sample(dit, (len(y), *shape), y, steps=args.steps, cfg=args.cfg,
                                  generator=gen, device=args.device, progress=True)
        z = norm.denormalize(z)
        latents.append(z.cpu())
        pixels.append(decode_samples(vitok, z))
    latents, pixels = torch.cat(latents), to_uint8(torch.cat(pixels))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = np.stack([to_array(x) for x in pixels])
    counts: dict[int, int] = {}
    for y, array in zip(labels.tolist(), arrays):
        k = counts[y] = counts.get(y, -1) + 1
        if array.ndim == 3:
            atomic_write(out / f"{y:04d}_{k:04d}.png",
                         lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
        else:  # the container is picked by the suffix: write .mp4, then rename into place
            final, tmp = out / f"{y:04d}_{k:04d}.mp4", out / f".{y:04d}_{k:04d}.tmp.mp4"
            write_video(tmp, array)
            os.replace(tmp, final)
    atomic_write(out / "samples.npz", lambda tmp: np.savez(
        open(tmp, "wb"), pixels=arrays, latents=latents.numpy(), labels=labels.numpy()))
    print(f"{len(labels)} samples of classes {classes} (cfg {args.cfg}, {args.steps} DDIM steps) "
          f"-> {out}")
    return {"n": len(labels), "out": str(out), "shape": list(arrays.shape)}


if __name__ == "__main__":
    run(main)
