"""Encode a data set to latents (safetensors shards), e.g. to train a diffusion model on them.

    python -m vitok_fast.encode --ckpt runs/s1/final --data /data/imagenet/train \\
        --resolution 256 --out latents/imagenet256

Writes ``latents-00000.safetensors``, ... each holding ``mean`` and ``logvar`` of the
posterior, (N, c, H/p, W/p) for images or (N, c, T/q, H/p, W/p) for videos, and ``label``
(N,) int64 (-1 where the data has no labels), in item order; ``index.json``; and
``stats.json``, the per-channel latent statistics of ``python -m vitok_fast.latent_stats``
(``shift_factor``, ``scaling_factor``, per-channel ``mean`` and ``std``) over every item
written. Keeping logvar lets a diffusion trainer draw z = mean + exp(logvar / 2) * eps per
epoch, as LDM-style training does, or use the mean alone.

``index.json`` holds the model config, resolution, ``classes`` (class names in label order;
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
from vitok_fast.latent_stats import STATS_FILE, Moments, merge_all, stats_dict, stats_latents, \
    write_stats

INDEX_FILE = "index.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def shard_name(k: int) -> str:
    return f"latents-{k:05d}.safetensors"


# Per-shard lists (paths, skipped, moments) that index.json holds once the run is complete.
# While it runs they live in one small file beside each shard, so that writing the index
# after every shard costs O(shards), not O(items written so far): for ImageNet's 1.28M
# paths, rewriting them all after each of 1251 shards would write ~50 GB of JSON.
SHARD_LISTS = ("paths", "skipped", "moments")


def meta_name(k: int) -> str:
    return f"latents-{k:05d}.json"


def _dump(path: Path, obj) -> None:
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2) + "\n"))


def _write_index(out: Path, index: dict) -> None:
    if index["complete"]:
        _dump(out / INDEX_FILE, index)
        return
    slim = [{k: v for k, v in s.items() if k not in SHARD_LISTS} for s in index["shards"]]
    _dump(out / INDEX_FILE, {**index, "shards": slim})


def _read_shard_lists(out: Path, shard: dict) -> dict:
    if all(k in shard for k in SHARD_LISTS):
        return shard
    path = out / shard.get("meta", "")
    if not path.is_file():
        raise FileNotFoundError(f"{out / INDEX_FILE} lists {shard['file']} but its per-item "
                                f"record {path} is missing; choose another --out")
    return {**shard, **{k: v for k, v in json.loads(path.read_text()).items() if k in SHARD_LISTS}}


def _totals(index: dict) -> None:
    """num_samples, num_skipped and next_item follow from the shards listed."""
    shards = index["shards"]
    index["num_samples"] = sum(s["count"] for s in shards)
    index["num_skipped"] = sum(len(s["skipped"]) for s in shards)
    index["next_item"] = shards[-1]["end"] if shards else 0


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
                   tile=None, overlap=None, meta: dict | None = None, sample: bool = False,
                   seed: int = 0) -> dict:
    """Encode the readable items of ``dataset`` (made with ``with_meta=True``) into shards.

    ``max_samples`` limits the run to the first N items of the data set (unreadable ones
    among them are skipped and listed). ``sample``/``seed`` choose what stats.json
    describes (see vitok_fast.latent_stats); the shards hold mean and logvar either way.
    """
    from safetensors.torch import save_file

    if not getattr(dataset, "with_meta", False):
        raise ValueError("encode_dataset needs a dataset made with make_dataset(..., "
                         "with_meta=True), whose items say which file they came from")
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    index = {"model": cfg.name, "config": json.loads(cfg.to_json()), "resolution": resolution,
             "frames": frames, "dtype": str(dtype).replace("torch.", ""), "shard_size": shard_size,
             "sample": sample, "seed": seed, **(meta or {}),
             "classes": list(getattr(dataset, "classes", [])), "shards": [], "num_samples": 0,
             "num_skipped": 0, "next_item": 0, "complete": False}
    if (out / INDEX_FILE).is_file():
        old = json.loads((out / INDEX_FILE).read_text())
        keys = ("model", "config", "resolution", "frames", "dtype", "shard_size", "sample", "seed")
        changed = settings_differences(old, index, keys)
        if changed:
            raise ValueError(f"{out} already holds latents of another run, made with other "
                             f"settings ({'; '.join(changed)}); resume with the same settings "
                             f"or choose another --out")
        if any("end" not in s for s in old["shards"]):
            raise ValueError(f"{out} was written by an older vitok_fast.encode (no per-item paths "
                             f"or moments in {INDEX_FILE}); choose another --out")
        index = old
        index["shards"] = [_read_shard_lists(out, s) for s in index["shards"]]
        _totals(index)
        if index["complete"]:
            print(f"{out} is already complete ({index['num_samples']} items)", file=sys.stderr)
            return index
    start = index["next_item"]  # data set position after the last complete shard
    if isinstance(dataset, torch.utils.data.IterableDataset):
        dataset.rank, dataset.world = 0, 1  # one process encodes the whole stream, in order
        stop = max_samples
        num_workers = min(num_workers, 1)  # more workers would each replay the stream
        source = _IterWrap(dataset, start, stop)
    else:
        stop = len(dataset) if max_samples is None else min(len(dataset), max_samples)
        source = torch.utils.data.Subset(dataset, range(start, max(start, stop)))
    from vitok_fast.data import collate_items

    items = torch.utils.data.DataLoader(source, batch_size=batch_size, num_workers=num_workers,
                                        collate_fn=collate_items)
    model.eval()
    buf = {"mean": [], "logvar": [], "label": [], "path": [], "position": []}
    skipped: list[dict] = []  # unreadable files met since the last shard

    def flush(end: int):
        k = len(index["shards"])
        tensors = {"mean": torch.stack(buf["mean"]).to(dtype).contiguous(),
                   "logvar": torch.stack(buf["logvar"]).to(dtype).contiguous(),
                   "label": torch.tensor(buf["label"], dtype=torch.int64)}
        # statistics of the latents as stored, computed per shard from the whole shard, so
        # they do not depend on batch boundaries (a resumed run merges the same numbers)
        z = stats_latents(tensors["mean"].float(), tensors["logvar"].float(), buf["position"],
                          sample=sample, seed=seed)
        atomic_write(out / shard_name(k), lambda p: save_file(tensors, p))
        lists = {"paths": list(buf["path"]), "skipped": list(skipped),
                 "moments": Moments.of(z).to_json()}
        _dump(out / meta_name(k), lists)
        index["shards"].append({"file": shard_name(k), "count": len(buf["label"]), "end": end,
                                "meta": meta_name(k), **lists})
        _totals(index)
        _write_index(out, index)  # after the shard: the index never names a missing file
        for v in buf.values():
            v.clear()
        skipped.clear()

    bar = tqdm(total=None if stop is None else max(0, stop - start), desc="encode", unit="item")
    position = start
    for batch in items:
        mean = logvar = None
        if batch["x"] is not None:
            posterior = model.encode(batch["x"].to(device), tile=tile, overlap=overlap)
            mean, logvar = posterior.mean.float().cpu(), posterior.logvar.float().cpu()
        good = {int(i): j for j, i in enumerate(batch["index"].tolist())}
        bad = {int(i): (path, reason) for i, path, reason in batch["skipped"]}
        for i in sorted([*good, *bad]):  # data set order, readable or not
            position = i + 1
            if i in bad:
                skipped.append({"path": bad[i][0], "reason": bad[i][1]})
                continue
            j = good[i]
            buf["mean"].append(mean[j]), buf["logvar"].append(logvar[j])
            buf["label"].append(int(batch["label"][j])), buf["path"].append(batch["path"][j])
            buf["position"].append(i)
            if len(buf["label"]) == shard_size:
                flush(position)
        bar.update(len(good) + len(bad))
    bar.close()
    if buf["label"]:
        flush(position)
    elif skipped:  # unreadable files after the last item belong to the last shard
        if not index["shards"]:
            raise ValueError(f"no readable item in the data set: all {len(skipped)} failed to "
                             f"decode, e.g. {skipped[0]['path']}: {skipped[0]['reason']}")
        last = index["shards"][-1]
        last["skipped"] += skipped
        last["end"] = position
        _dump(out / last["meta"], {k: last[k] for k in SHARD_LISTS})
        _totals(index)
    if not index["shards"]:
        raise ValueError("the data set gave no items to encode")
    moments = merge_all((Moments.from_json(s["moments"]) for s in index["shards"]), cfg.channels)
    write_stats(out / STATS_FILE, {"model": cfg.name, "resolution": resolution, "frames": frames,
                                   "dtype": index["dtype"],
                                   **stats_dict(moments, num_samples=index["num_samples"],
                                                sample=sample, seed=seed)})
    index["complete"], index["stats"] = True, STATS_FILE
    for shard in index["shards"]:
        shard.pop("meta", None)
    _write_index(out, index)  # now with every shard's lists; their side files can go
    for k in range(len(index["shards"])):
        (out / meta_name(k)).unlink(missing_ok=True)
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


def iter_latents(directory: str | Path):
    """``(mean, logvar, label)`` per item of an encode run, in order; label -1 where the
    shards have none (those written before labels were recorded)."""
    from safetensors.torch import load_file

    _, shards = load_latents(directory)
    for shard in shards:
        tensors = load_file(shard)
        n = tensors["mean"].shape[0]
        labels = tensors.get("label", torch.full((n,), -1, dtype=torch.int64))
        for i in range(n):
            yield tensors["mean"][i], tensors["logvar"][i], int(labels[i])


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
    p.add_argument("--max-samples", type=cli.positive_int, help="encode only the first N items of the data set")
    p.add_argument("--sample", action="store_true",
                   help="stats.json of posterior samples, not of the posterior mean")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0, help="seed of the --sample noise")
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
        dataset = make_dataset(args.data, resolution, frames, train=False, with_meta=True)
    index = encode_dataset(model, dataset, Path(args.out), resolution=resolution, frames=frames,
                           shard_size=args.shard_size, batch_size=args.batch_size,
                           dtype=DTYPES[args.dtype], max_samples=args.max_samples,
                           num_workers=args.num_workers, device=args.device, tile=args.tile,
                           overlap=args.overlap, meta={"ckpt": str(args.ckpt), "data": args.data},
                           sample=args.sample, seed=args.seed)
    print(f"{index['num_samples']} items in {len(index['shards'])} shards under {args.out}"
          + (f"; {index['num_skipped']} unreadable files skipped (listed in {INDEX_FILE})"
             if index["num_skipped"] else ""))
    return index


if __name__ == "__main__":
    cli.run(main)
