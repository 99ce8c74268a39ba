"""Encode a data set to latents (safetensors shards), e.g. to train a diffusion model on them.

    python -m vitok_fast.encode --ckpt runs/s1/final --data /data/imagenet/train \\
        --resolution 256 --out latents/imagenet256

Writes ``latents-00000.safetensors``, ... each holding ``mean`` and ``logvar`` of the
posterior, (N, c, H/p, W/p) for images or (N, c, T/q, H/p, W/p) for videos, in item
order, and ``index.json`` (model config, resolution, shards and counts). Keeping logvar lets
a diffusion trainer draw z = mean + exp(logvar / 2) * eps per epoch, as LDM-style training
does, or use the mean alone. A run that stops resumes from the last complete shard (the
evaluation transform is deterministic, so items keep their order). ``python -m
vitok_fast.decode`` turns the shards back into pixels.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from vitok_fast import cli
from vitok_fast.fileio import atomic_write

INDEX_FILE = "index.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def shard_name(k: int) -> str:
    return f"latents-{k:05d}.safetensors"


def _write_index(out: Path, index: dict) -> None:

    atomic_write(out / INDEX_FILE, lambda p: Path(p).write_text(json.dumps(index, indent=2) + "\n"))


def settings_differences(old: dict, new: dict, keys) -> list[str]:
    """``key: old -> new`` for each setting that differs (a model config by its fields, the
    run-time kernel switches aside)."""
    from vitok_fast.config import ViTokConfig

    changed = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if k == "config" and isinstance(a, dict) and isinstance(b, dict):
            changed += [f"config.{d}" for d in ViTokConfig.from_dict(a).differences(b)]
        elif a != b:
            changed.append(f"{k}: {a} -> {b}")
    return changed


@torch.no_grad()
def encode_dataset(model, dataset, out: Path, *, resolution: int, frames: int = 1,
                   shard_size: int = 1024, batch_size: int = 32, dtype=torch.float32,
                   max_samples: int | None = None, num_workers: int = 0, device="cpu",
                   tile=None, overlap=None, meta: dict | None = None) -> dict:
    from safetensors.torch import save_file


    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    index = {"model": cfg.name, "config": json.loads(cfg.to_json()), "resolution": resolution,
             "frames": frames, "dtype": str(dtype).replace("torch.", ""), "shard_size": shard_size,
             **(meta or {}), "shards": [], "num_samples": 0, "complete": False}
    if (out / INDEX_FILE).is_file():
        old = json.loads((out / INDEX_FILE).read_text())
        keys = ("model", "config", "resolution", "frames", "dtype", "shard_size")
        changed = settings_differences(old, index, keys)
        if changed:
            raise ValueError(f"{out} already holds latents of another run, made with other "
                             f"settings ({'; '.join(changed)}); resume with the same settings "
                             f"or choose another --out")
        index = old
        if index["complete"]:
            print(f"{out} is already complete ({index['num_samples']} items)", file=sys.stderr)
            return index
    done = index["num_samples"]  # items in complete shards, all before any partial one
    try:
        total = len(dataset)
    except TypeError:  # a stream of unknown length
        total = None
    if max_samples is not None:
        total = max_samples if total is None else min(total, max_samples)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        num_workers = min(num_workers, 1)  # more workers would each replay the stream
        items = torch.utils.data.DataLoader(_IterWrap(dataset, done, total),
                                            batch_size=batch_size, num_workers=num_workers)
    else:
        stop = total if total is not None else len(dataset)
        items = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(done, stop)),
                                            batch_size=batch_size, num_workers=num_workers)
    model.eval()
    buffer_mean, buffer_logvar = [], []
    pending = 0

    def flush():
        nonlocal pending
        k = len(index["shards"])
        tensors = {"mean": torch.cat(buffer_mean).to(dtype).contiguous(),
                   "logvar": torch.cat(buffer_logvar).to(dtype).contiguous()}
        atomic_write(out / shard_name(k), lambda p: save_file(tensors, p))
        index["shards"].append({"file": shard_name(k), "count": pending})
        index["num_samples"] += pending
        _write_index(out, index)  # after the shard: the index never names a missing file
        buffer_mean.clear(), buffer_logvar.clear()
        pending = 0

    bar = tqdm(total=None if total is None else total - done, desc="encode", unit="item")
    for x in items:
        posterior = model.encode(x.to(device), tile=tile, overlap=overlap)
        mean, logvar = posterior.mean.float().cpu(), posterior.logvar.float().cpu()
        start = 0
        while start < mean.shape[0]:  # split a batch across a shard boundary
            take = min(shard_size - pending, mean.shape[0] - start)
            buffer_mean.append(mean[start:start + take])
            buffer_logvar.append(logvar[start:start + take])
            pending += take
            start += take
            if pending == shard_size:
                flush()
        bar.update(x.shape[0])
    bar.close()
    if pending:
        flush()
    index["complete"] = True
    _write_index(out, index)
    return index


class _IterWrap(torch.utils.data.IterableDataset):
    def __init__(self, dataset, start, stop):
        self.dataset, self.start, self.stop = dataset, start, stop

    def __iter__(self):
        return itertools.islice(iter(self.dataset), self.start, self.stop)


def load_latents(directory: str | Path) -> tuple[dict, list[Path]]:
    """The index and shard paths of an encode run, checking every shard is there."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(f"expected {index_path} written by vitok_fast.encode, it does not exist")
    index = json.loads(index_path.read_text())
    shards = [directory / s["file"] for s in index["shards"]]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"{index_path} names shards that do not exist: {missing}")
    return index, shards


def main(argv=None) -> dict:
    p = cli.ArgumentParser(prog="python -m vitok_fast.encode", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="directory written by ViTok.save_pretrained")
    p.add_argument("--data", required=True, help="any source vitok_fast.data.make_dataset reads")
    p.add_argument("--out", required=True, type=cli.output_dir,
                   help="output directory for shards and index.json")
    p.add_argument("--resolution", type=cli.positive_int,
                   help="centre-crop size (default 256 images, 128 videos)")
    p.add_argument("--frames", type=cli.positive_int,
                   help="frames per clip for video models (default 16)")
    p.add_argument("--shard-size", type=cli.positive_int, default=1024, help="items per shard")
    p.add_argument("--batch-size", type=cli.positive_int, default=32)
    p.add_argument("--num-workers", type=cli.nonnegative_int, default=2)
    p.add_argument("--max-samples", type=cli.positive_int, help="encode only the first N items")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="storage dtype")
    p.add_argument("--tile", type=cli.positive_int, help="encode in tiles of this many pixels")
    p.add_argument("--overlap", type=cli.nonnegative_int, help="tile overlap in pixels")
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument("--device", type=cli.device, default=cli.default_device())
    args = p.parse_args(argv)

    from vitok_fast.data import make_dataset
    from vitok_fast.evaluate import resolve_ckpt
    from vitok_fast.model import ViTok

    model = ViTok.from_pretrained(resolve_ckpt(args.ckpt), device=args.device,
                                  **({"use_kernels": False} if args.no_kernels else {}))
    video = model.config.is_video
    resolution = args.resolution or (128 if video else 256)
    frames = args.frames or (16 if video else 1)
    cli.check_sizes(model.config, resolution=resolution, frames=args.frames, tile=args.tile,
                    overlap=args.overlap)
    with cli.option("--data", args.data):
        dataset = make_dataset(args.data, resolution, frames, train=False)
    index = encode_dataset(model, dataset, Path(args.out), resolution=resolution, frames=frames,
                           shard_size=args.shard_size, batch_size=args.batch_size,
                           dtype=DTYPES[args.dtype], max_samples=args.max_samples,
                           num_workers=args.num_workers, device=args.device, tile=args.tile,
                           overlap=args.overlap, meta={"ckpt": str(args.ckpt), "data": args.data})
    print(f"{index['num_samples']} items in {len(index['shards'])} shards under {args.out}")
    return index


if __name__ == "__main__":
    cli.run(main)
