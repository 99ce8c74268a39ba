"""Per-channel statistics of a tokenizer's latents: the shift and scale a diffusion model needs.

    python -m vitok_fast.latent_stats --ckpt runs/stage1-S-B_16 --data /data/imagenet/train \\
        --resolution 256 --out stats.json
    torchrun --nproc_per_node 8 -m vitok_fast.latent_stats --ckpt ... --data ...   # sharded

A diffusion model is trained on z' = (z - shift_factor) * scaling_factor, so that its
latents have zero mean and unit variance (SD-VAE's ``scaling_factor`` 0.18215 plays this
role). ``python -m vitok_fast.encode`` writes the same numbers beside its shards; this tool
computes them without writing shards.

Definitions, for latents z of shape (N, c, ...) (images (N, c, H/p, W/p), videos
(N, c, T/q, H/p, W/p)), every position of every item counted once:
  ``mean[k]``, ``std[k]``  mean and population standard deviation (divided by the count, not
      count - 1) of channel k over all N items and all latent positions;
  ``shift_factor``  the mean of every element of every channel (= the mean of ``mean``,
      since every channel has the same count);
  ``scaling_factor``  1 / the population standard deviation of every element of every
      channel about ``shift_factor``;
  ``count``  elements per channel; ``num_samples`` items.
z is the posterior mean by default; ``--sample`` uses z = mean + exp(logvar / 2) * eps with
eps drawn from a generator seeded per item (by ``--seed`` and the item's position in the
data set), so the statistics do not depend on batch size, workers or ranks.

Moments are kept in float64 as (count, mean, M2) per channel and merged with Chan et al.'s
parallel update, so partitions (shards, ranks) combine exactly to the statistics of their
concatenation, up to float64 rounding. The computation (``compute_stats``, ``Moments``) is in
vitok_fast/latents.py; this module is the command line around it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from vitok_fast import cli

# The statistics live in vitok_fast/latents.py with the shard format; re-exported here, and
# imported when used (--help imports no torch).
__getattr__ = cli.lazy_exports(__name__, dict.fromkeys(
    ("Moments", "compute_stats", "merge_all", "stats_dict", "stats_latents",
     "write_stats"), "vitok_fast.latents"))
STATS_FILE = "stats.json"  # = vitok_fast.latents.STATS_FILE, which imports torch

def main(argv=None) -> dict:
    p = cli.ArgumentParser(prog="python -m vitok_fast.latent_stats", description=__doc__)
    cli.add_ckpt(p, required=True)
    p.add_argument("--data", required=True, help="any source vitok_fast.data.make_dataset reads")
    cli.add_out(p, "JSON file to write", type=cli.output_file, default=STATS_FILE)
    p.add_argument("--resolution", type=int, help="centre-crop size (default: the checkpoint's "
                   "training resolution, else 256 images, 128 videos)")
    p.add_argument("--frames", type=int, help="frames per clip for video models (default: the "
                   "checkpoint's, else 16)")
    p.add_argument("--batch-size", type=int, default=32, help="items per forward pass")
    p.add_argument("--num-workers", type=int, default=2, help="data-loader worker processes")
    p.add_argument("--max-samples", type=int, help="only the first N items of the data set")
    p.add_argument("--sample", action="store_true",
                   help="statistics of posterior samples, not of the posterior mean")
    p.add_argument("--seed", type=int, default=0, help="seed of the --sample noise")
    p.add_argument("--tile", type=int, help="encode in tiles of this many pixels")
    p.add_argument("--overlap", type=int, help="tile overlap in pixels")
    cli.add_no_kernels(p)
    cli.add_device(p)
    args = p.parse_args(argv)
    for name in ("batch_size", "max_samples", "resolution", "frames"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be 0 or more, got {args.num_workers}")
    if Path(args.out).is_dir():
        raise IsADirectoryError(f"--out expects a JSON file path, got the directory {args.out}; "
                                f"e.g. {Path(args.out) / STATS_FILE}")

    import torch
    import torch.distributed as dist

    from vitok_fast import distributed as D

    from vitok_fast.data import make_dataset
    from vitok_fast.latents import compute_stats, write_stats

    # under torchrun: the process group on this attempt's own store (distributed.setup)
    device = D.setup(args.device).device

    model, folder, size = cli.load_vitok(args.ckpt, "latent_stats", device=device,
                                         no_kernels=args.no_kernels, resolution=args.resolution,
                                         frames=args.frames, tile=args.tile, overlap=args.overlap,
                                         verbose=not dist.is_initialized() or dist.get_rank() == 0)
    resolution, frames = size["resolution"], size["frames"]
    dataset = make_dataset(args.data, resolution, frames, train=False, with_meta=True)
    stats = compute_stats(model, dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                          device=device, max_samples=args.max_samples, sample=args.sample,
                          seed=args.seed, tile=args.tile, overlap=args.overlap)
    stats = {"model": model.config.name, "ckpt": str(folder.resolve()), "data": args.data,
             "resolution": resolution, "frames": frames,
             **{k: size[k] for k in ("trained_resolution", "trained_frames", "size_source")},
             **stats}
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_stats(Path(args.out), stats)
        print(f"{stats['num_samples']} items ({len(stats['skipped'])} unreadable skipped): "
              f"shift_factor {stats['shift_factor']:.6g}, scaling_factor "
              f"{stats['scaling_factor']:.6g}; wrote {args.out}", file=sys.stderr)
    if dist.is_initialized():
        D.cleanup()
    return stats


if __name__ == "__main__":
    cli.run(main)
