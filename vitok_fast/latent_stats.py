"""Per-channel statistics of a tokenizer's latents: the shift and scale a diffusion model needs.

    python -m vitok_fast.latent_stats --ckpt runs/s1/final --data /data/imagenet/train \\
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
concatenation, up to float64 rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

STATS_FILE = "stats.json"


@dataclass
class Moments:
    """Per-channel count, mean and M2 (sum of squared deviations from the mean), float64."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, channels: int) -> "Moments":
        return cls(0, np.zeros(channels), np.zeros(channels))

    @classmethod
    def of(cls, z: torch.Tensor) -> "Moments":
        """Moments of a batch of latents (N, c, ...), channel axis 1."""
        x = z.detach().to("cpu", torch.float64).transpose(0, 1).reshape(z.shape[1], -1).numpy()
        mean = x.mean(axis=1)
        return cls(int(x.shape[1]), mean, ((x - mean[:, None]) ** 2).sum(axis=1))

    def merge(self, other: "Moments") -> "Moments":
        """Chan et al.'s parallel update: the moments of the two partitions together."""
        if other.count == 0:
            return Moments(self.count, self.mean.copy(), self.m2.copy())
        if self.count == 0:
            return Moments(other.count, other.mean.copy(), other.m2.copy())
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta ** 2 * (self.count * other.count / n)
        return Moments(n, mean, m2)

    def to_json(self) -> dict:
        # Python's float repr round-trips float64 exactly, so a resumed run merges the same bits
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "Moments":
        return cls(int(d["count"]), np.asarray(d["mean"], np.float64),
                   np.asarray(d["m2"], np.float64))


def merge_all(parts, channels: int) -> Moments:
    total = Moments.empty(channels)
    for part in parts:
        total = total.merge(part)
    return total


def stats_dict(moments: Moments, *, num_samples: int, sample: bool, seed: int) -> dict:
    """The stats.json content (see the module docstring for the definitions)."""
    if moments.count == 0:
        raise ValueError("no latents to compute statistics of: the data set gave no readable item")
    channels = len(moments.mean)
    shift = float(moments.mean.mean())
    # M2 of all elements about the global mean: the channels' M2 plus each channel's offset
    m2 = float(moments.m2.sum() + moments.count * ((moments.mean - shift) ** 2).sum())
    std = (m2 / (moments.count * channels)) ** 0.5
    return {"shift_factor": shift, "scaling_factor": 1.0 / std, "global_std": std,
            "mean": moments.mean.tolist(), "std": np.sqrt(moments.m2 / moments.count).tolist(),
            "count": moments.count, "num_samples": num_samples, "channels": channels,
            "sample": sample, "seed": seed if sample else None}


def stats_latents(mean: torch.Tensor, logvar: torch.Tensor, positions, *, sample: bool,
                  seed: int) -> torch.Tensor:
    """The latents the statistics describe: the posterior mean, or with ``sample`` one draw
    per item whose noise depends only on ``seed`` and the item's position in the data set."""
    if not sample:
        return mean
    from vitok_fast.data import sample_seed

    eps = torch.stack([torch.randn(mean.shape[1:], dtype=torch.float32,
                                   generator=torch.Generator().manual_seed(
                                       sample_seed(seed, 0, int(i), purpose=3)))
                       for i in positions])
    return mean.float() + torch.exp(0.5 * logvar.float()) * eps


def write_stats(path: Path, stats: dict) -> None:
    from vitok_fast.fileio import atomic_write

    atomic_write(Path(path), lambda p: Path(p).write_text(json.dumps(stats, indent=2) + "\n"))


@torch.no_grad()
def compute_stats(model, dataset, *, batch_size: int = 32, num_workers: int = 0, device="cpu",
                  max_samples: int | None = None, sample: bool = False, seed: int = 0,
                  tile=None, overlap=None, progress: bool = True) -> dict:
    """stats.json's content for ``dataset`` (a ``with_meta`` dataset), over all ranks.

    Each rank takes items rank, rank + world, ... of the first ``max_samples``; the ranks'
    moments are gathered and merged in rank order. Adds ``skipped``: [{path, reason}].
    """
    import torch.distributed as dist
    from tqdm import tqdm

    from vitok_fast.data import collate_items
    from vitok_fast.evaluate import _distributed, _shard

    if not getattr(dataset, "with_meta", False):
        raise ValueError("compute_stats needs a dataset made with make_dataset(..., with_meta=True)")
    rank, world = _distributed()
    if isinstance(dataset, torch.utils.data.IterableDataset):
        num_workers = min(num_workers, 1)  # more workers would each replay the stream
    loader = torch.utils.data.DataLoader(_shard(dataset, rank, world, max_samples),
                                         batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=collate_items)
    model.eval()
    moments, n, skipped = Moments.empty(model.config.channels), 0, []
    for batch in tqdm(loader, desc="latent stats", unit="batch", disable=not progress or rank != 0):
        skipped += [{"path": path, "reason": reason} for _, path, reason in batch["skipped"]]
        if batch["x"] is None:
            continue
        posterior = model.encode(batch["x"].to(device), tile=tile, overlap=overlap)
        z = stats_latents(posterior.mean.float().cpu(), posterior.logvar.float().cpu(),
                          batch["index"], sample=sample, seed=seed)
        moments = moments.merge(Moments.of(z))
        n += z.shape[0]
    parts = [(moments.to_json(), n, skipped)]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (moments.to_json(), n, skipped))
    total = merge_all((Moments.from_json(m) for m, _, _ in parts), model.config.channels)
    stats = stats_dict(total, num_samples=sum(k for _, k, _ in parts), sample=sample, seed=seed)
    stats["skipped"] = [s for _, _, part in parts for s in part]
    return stats


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m vitok_fast.latent_stats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="directory written by ViTok.save_pretrained")
    p.add_argument("--data", required=True, help="any source vitok_fast.data.make_dataset reads")
    p.add_argument("--out", default=STATS_FILE, help=f"JSON file to write (default {STATS_FILE})")
    p.add_argument("--resolution", type=int, help="centre-crop size (default 256 images, 128 videos)")
    p.add_argument("--frames", type=int, help="frames per clip for video models (default 16)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--max-samples", type=int, help="only the first N items of the data set")
    p.add_argument("--sample", action="store_true",
                   help="statistics of posterior samples, not of the posterior mean")
    p.add_argument("--seed", type=int, default=0, help="seed of the --sample noise")
    p.add_argument("--tile", type=int, help="encode in tiles of this many pixels")
    p.add_argument("--overlap", type=int, help="tile overlap in pixels")
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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

    import torch.distributed as dist

    from vitok_fast.data import make_dataset
    from vitok_fast.evaluate import resolve_ckpt
    from vitok_fast.model import ViTok

    device = torch.device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    model = ViTok.from_pretrained(resolve_ckpt(args.ckpt), device=device,
                                  **({"use_kernels": False} if args.no_kernels else {}))
    video = model.config.is_video
    resolution = args.resolution or (128 if video else 256)
    frames = args.frames or (16 if video else 1)
    dataset = make_dataset(args.data, resolution, frames, train=False, with_meta=True)
    stats = compute_stats(model, dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                          device=device, max_samples=args.max_samples, sample=args.sample,
                          seed=args.seed, tile=args.tile, overlap=args.overlap)
    stats = {"model": model.config.name, "ckpt": str(args.ckpt), "data": args.data,
             "resolution": resolution, "frames": frames, **stats}
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_stats(Path(args.out), stats)
        print(f"{stats['num_samples']} items ({len(stats['skipped'])} unreadable skipped): "
              f"shift_factor {stats['shift_factor']:.6g}, scaling_factor "
              f"{stats['scaling_factor']:.6g}; wrote {args.out}", file=sys.stderr)
    if dist.is_initialized():
        dist.destroy_process_group()
    return stats


if __name__ == "__main__":
    from vitok_fast import cli

    cli.run(main)
