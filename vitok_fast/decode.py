"""Decode latents written by ``python -m vitok_fast.encode`` back to pixels.

    python -m vitok_fast.decode --ckpt runs/stage1-S-B_16 --latents latents/imagenet256 --out decoded/

Writes one PNG per image (an MP4 per video) named after the file it was encoded from, under
its class for labelled data (``<class>/<stem>.png``; ``<stem>.png`` unlabelled; ``000000.png``
where index.json names no source), from the posterior mean (``--sample`` draws
z = mean + exp(logvar / 2) * eps instead), and ``decode.json``: the model, checkpoint and
resolution, and per item its ``output``, ``source``, ``label`` and ``class``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vitok_fast import cli


@cli.no_grad
def decode_latents(model, latents: str | Path, out: str | Path, *, batch_size: int = 32,
                   sample: bool = False, max_samples: int | None = None, device="cpu",
                   tile=None, overlap=None, fps: float = 8.0, seed: int = 0) -> int:
    import torch
    from safetensors.torch import load_file
    from tqdm import tqdm

    from vitok_fast import metrics as M
    from vitok_fast.fileio import atomic_write
    from vitok_fast.latents import item_names, load_latents
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
    names = item_names(latents)
    written = []
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
                target = out / (names[n]["name"] + (".png" if item.ndim == 3 else ".mp4"))
                target.parent.mkdir(parents=True, exist_ok=True)
                if item.ndim == 3:
                    write_image(target, to_array(item))
                else:
                    write_video(target, to_array(item), fps)
                written.append({"output": str(target.relative_to(out)), **{
                    k: names[n][k] for k in ("source", "label", "class")}})
                n += 1
            bar.update(pixels.shape[0])
    bar.close()
    record = {"model": model.config.name, "latents": str(Path(latents).resolve()),
              "resolution": index.get("resolution"), "frames": index.get("frames"),
              "sample": sample, "items": written}
    atomic_write(out / "decode.json", lambda p: Path(p).write_text(json.dumps(record, indent=2) + "\n"))
    return n


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="python -m vitok_fast.decode", description=__doc__)
    cli.add_ckpt(p, required=True)
    p.add_argument("--latents", required=True, type=cli.existing_dir,
                   help="directory written by vitok_fast.encode")
    cli.add_out(p, "output directory for the images and videos", required=True)
    p.add_argument("--batch-size", type=cli.positive_int, default=32, help="latents per forward pass")
    p.add_argument("--max-samples", type=cli.positive_int, help="decode only the first N latents")
    p.add_argument("--sample", action="store_true", help="decode a posterior sample, not the mean")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0, help="seed of the --sample noise")
    p.add_argument("--fps", type=cli.positive_float, default=8.0,
                   help="frame rate of decoded videos")
    p.add_argument("--tile", type=cli.positive_int, help="decode in tiles of this many pixels")
    p.add_argument("--overlap", type=cli.nonnegative_int, help="tile overlap in pixels")
    cli.add_no_kernels(p)
    cli.add_device(p)
    args = p.parse_args(argv)

    from vitok_fast.latents import load_latents

    index, _ = load_latents(args.latents)  # names a missing index.json or shard
    # the latents fix the size; the line says it beside the checkpoint's training setting
    model, _, _ = cli.load_vitok(args.ckpt, "decode", device=args.device,
                                 no_kernels=args.no_kernels, resolution=index.get("resolution"),
                                 frames=index.get("frames"), tile=args.tile, overlap=args.overlap,
                                 given="the latents' size")
    model.eval()
    n = decode_latents(model, args.latents, args.out, batch_size=args.batch_size,
                       sample=args.sample, max_samples=args.max_samples, device=args.device,
                       tile=args.tile, overlap=args.overlap, fps=args.fps, seed=args.seed)
    print(f"decoded {n} items to {args.out}", file=sys.stderr)
    return n


if __name__ == "__main__":
    cli.run(main)
