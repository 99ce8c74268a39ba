"""Encode a data set to latents (safetensors shards), e.g. to train a diffusion model on them.

    python -m vitok_fast.encode --ckpt runs/stage1-S-B_16 --data /data/imagenet/train \\
        --resolution 256 --out latents/imagenet256

Writes ``latents-00000.safetensors``, ... each holding ``mean`` and ``logvar`` of the
posterior, (N, c, H/p, W/p) for images or (N, c, T/q, H/p, W/p) for videos, and ``label``
(N,) int64 (-1 where the data has no labels), in item order; ``index.json``; and
``stats.json``, the per-channel latent statistics of ``python -m vitok_fast.latent_stats``
(``shift_factor``, ``scaling_factor``, per-channel ``mean`` and ``std``) over every item
written. Keeping logvar lets a diffusion trainer draw z = mean + exp(logvar / 2) * eps per
epoch, as LDM-style training does, or use the mean alone.

``index.json`` holds the model config, resolution (by default the checkpoint's training
resolution; ``trained_resolution`` and ``size_source`` say where it came from), ``classes`` (class names in label order;
[] when the data has none), ``num_samples`` (items written), ``num_skipped`` and per shard
``file``, ``count``, ``paths`` (the source of each item, in order), ``skipped`` (the
unreadable files met while filling it, as {path, reason}: none is ever replaced by another
item), ``end`` (the data set position after it) and ``moments`` (float64 per-channel count,
mean and M2 of its latents); until the run is complete those per-shard lists live in
``latents-00000.json`` beside each shard instead, so the index stays small while it is
rewritten after every shard. A run that stops resumes after the last complete shard (the
evaluation transform is deterministic, so items keep their order), and the statistics are
merged from every shard's moments, so a resumed run writes the same stats.json as an
uninterrupted one. ``python -m vitok_fast.decode`` turns the shards back into pixels.
The format and the encode loop (``encode_dataset``) are vitok_fast/latents.py; this module is
the command line around them.
"""

from __future__ import annotations

from pathlib import Path

from vitok_fast import cli

# The format and the encode loop live in vitok_fast/latents.py; re-exported here, where they
# were, and imported when used (--help imports no torch).
__getattr__ = cli.lazy_exports(__name__, dict.fromkeys(
    ("INDEX_FILE", "SHARD_LISTS", "encode_dataset", "iter_latents", "load_latents", "meta_name",
     "settings_differences", "shard_name"), "vitok_fast.latents"))

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # storage dtype -> torch.<name>


def main(argv=None) -> dict:
    p = cli.ArgumentParser(prog="python -m vitok_fast.encode", description=__doc__)
    cli.add_ckpt(p, required=True)
    p.add_argument("--data", required=True, help="any source vitok_fast.data.make_dataset reads")
    cli.add_out(p, "output directory for shards and index.json", required=True)
    p.add_argument("--resolution", type=cli.positive_int,
                   help="centre-crop size (default: the checkpoint's training resolution, else "
                   "256 images, 128 videos)")
    p.add_argument("--frames", type=cli.positive_int,
                   help="frames per clip for video models (default: the checkpoint's, else 16)")
    p.add_argument("--shard-size", type=cli.positive_int, default=1024, help="items per shard")
    p.add_argument("--batch-size", type=cli.positive_int, default=32, help="items per forward pass")
    p.add_argument("--num-workers", type=cli.nonnegative_int, default=2,
                   help="data-loader worker processes")
    p.add_argument("--max-samples", type=cli.positive_int, help="encode only the first N items of the data set")
    p.add_argument("--sample", action="store_true",
                   help="stats.json of posterior samples, not of the posterior mean")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0, help="seed of the --sample noise")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="storage dtype")
    p.add_argument("--tile", type=cli.positive_int, help="encode in tiles of this many pixels")
    p.add_argument("--overlap", type=cli.nonnegative_int, help="tile overlap in pixels")
    cli.add_no_kernels(p)
    cli.add_device(p)
    args = p.parse_args(argv)

    import torch

    from vitok_fast.data import make_dataset
    from vitok_fast.latents import INDEX_FILE, encode_dataset

    model, folder, size = cli.load_vitok(args.ckpt, "encode", device=args.device,
                                         no_kernels=args.no_kernels, resolution=args.resolution,
                                         frames=args.frames, tile=args.tile,
                                         overlap=args.overlap)
    resolution, frames = size["resolution"], size["frames"]
    with cli.option("--data", args.data):
        dataset = make_dataset(args.data, resolution, frames, train=False, with_meta=True)
    index = encode_dataset(model, dataset, Path(args.out), resolution=resolution, frames=frames,
                           shard_size=args.shard_size, batch_size=args.batch_size,
                           dtype=getattr(torch, DTYPES[args.dtype]), max_samples=args.max_samples,
                           num_workers=args.num_workers, device=args.device, tile=args.tile,
                           overlap=args.overlap, meta={"ckpt": str(folder.resolve()), "data": args.data,
                                 **{k: size[k] for k in ("trained_resolution", "trained_frames",
                                                         "size_source")}},
                           sample=args.sample, seed=args.seed)
    print(f"{index['num_samples']} items in {len(index['shards'])} shards under {args.out}"
          + (f"; {index['num_skipped']} unreadable files skipped (listed in {INDEX_FILE})"
             if index["num_skipped"] else ""))
    return index


if __name__ == "__main__":
    cli.run(main)
