"""Latent shards: the one format of encoded data sets, written, read, indexed and summarised.

``python -m vitok_fast.encode`` (:func:`encode_dataset`), ``python -m vitok_fast.latent_stats``
(:func:`compute_stats`), ``python -m vitok_fast.decode`` (:func:`load_latents`), the DiT
trainer and sampler (:func:`load_latent_set`) and the digits benchmark
(:func:`write_latent_set`) all go through here.

A latent directory holds ``latents-00000.safetensors``, ... each with ``mean`` and ``logvar``
of the posterior, (N, c, H/p, W/p) for images or (N, c, T/q, H/p, W/p) for videos, and
``label`` (N,) int64 (-1 where the data has no labels), in item order; ``index.json``; and
``stats.json``, the per-channel latent statistics (``shift_factor``, ``scaling_factor``,
per-channel ``mean`` and ``std``) over every item written.

The fields of ``index.json``, its per-shard side files and the resume rule are written out
in ``python -m vitok_fast.encode --help`` (vitok_fast/encode.py); the definitions of the
statistics (population moments in float64, merged with Chan et al.'s parallel update, so
shards and ranks combine exactly) in ``python -m vitok_fast.latent_stats --help``.
"""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitok_fast.fileio import atomic_write

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
    from vitok_fast.distributed import rank_world, strided_shard

    if not getattr(dataset, "with_meta", False):
        raise ValueError("compute_stats needs a dataset made with make_dataset(..., with_meta=True)")
    rank, world = rank_world()
    if isinstance(dataset, torch.utils.data.IterableDataset):
        num_workers = min(num_workers, 1)  # more workers would each replay the stream
    loader = torch.utils.data.DataLoader(strided_shard(dataset, rank, world, max_samples),
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


# -- the shard directory and its index ---------------------------------------------------------


INDEX_FILE = "index.json"


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
    describes (see the module docstring); the shards hold mean and logvar either way.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

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


def _stem(source: str) -> str:
    """A source's file name without a media suffix (``photos/cat/0.jpg`` -> ``0``; names
    like ``skimage.data.astronaut`` stay whole)."""
    name = Path(source).name
    return name.rsplit(".", 1)[0] if Path(name).suffix.lower() in _MEDIA_SUFFIXES else name


_MEDIA_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".mp4",
                   ".webm", ".avi", ".mov", ".mkv"}


def item_names(directory: str | Path) -> list[dict]:
    """Per item of an encode run, in order: ``source`` (the file it was encoded from, or
    None where the index does not say), ``label`` (-1 unlabelled), ``class`` (its name, or
    None) and ``name``, what a decoded item is called: ``<class>/<stem>`` for labelled items,
    ``<stem>`` otherwise, ``<NNNNNN>`` without a source; a name met twice gets ``_<item>``."""
    from safetensors import safe_open

    directory = Path(directory)
    index, shards = load_latents(directory)
    classes = index.get("classes") or []
    items, seen = [], set()
    for shard, file in zip(index["shards"], shards):
        try:
            paths = _read_shard_lists(directory, shard).get("paths") or []
        except FileNotFoundError:
            paths = []
        with safe_open(str(file), framework="pt") as f:
            labels = f.get_tensor("label").tolist() if "label" in f.keys() else []
        for i in range(shard["count"]):
            n = len(items)
            source = paths[i] if i < len(paths) else None
            label = labels[i] if i < len(labels) else -1
            cls = classes[label] if 0 <= label < len(classes) else None
            stem = _stem(source) if source else f"{n:06d}"
            name = f"{cls}/{stem}" if cls else stem
            if name in seen:
                name = f"{name}_{n:06d}"
            seen.add(name)
            items.append({"source": source, "label": label, "class": cls, "name": name})
    return items


# -- labelled latent sets in memory (the DiT trainer, the digits benchmark) ------------------


def load_latent_set(directory, posterior_dtype=torch.float32) -> dict:
    """Every item of a labelled latent directory, in memory: ``mean``, ``logvar`` (N, c, ...),
    ``label`` (N,) int64 (-1 unlabelled), and the directory's ``index`` and ``stats``."""
    from safetensors.torch import load_file

    index, shards = load_latents(directory)
    stats_path = Path(directory) / "stats.json"
    if not stats_path.is_file():
        raise FileNotFoundError(f"expected {stats_path} (latent shift and scale, written by "
                                f"python -m vitok_fast.encode); it does not exist")
    parts = [load_file(s) for s in shards]
    if any("label" not in p for p in parts):
        raise ValueError(f"the shards under {directory} hold no 'label': re-encode them with a "
                         f"python -m vitok_fast.encode that records labels (class folders)")
    cat = lambda key, dtype: torch.cat([p[key] for p in parts]).to(dtype)
    return {"mean": cat("mean", posterior_dtype), "logvar": cat("logvar", posterior_dtype),
            "label": cat("label", torch.int64), "index": index,
            "stats": json.loads(stats_path.read_text())}


class LatentItems(torch.utils.data.Dataset):
    """A loaded latent set (load_latent_set) as a map-style data set of (mean, logvar, label);
    a key may be a sampler's (index, seed)."""

    def __init__(self, latents: dict):
        self.mean, self.logvar, self.label = latents["mean"], latents["logvar"], latents["label"]

    def __len__(self):
        return len(self.mean)

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key  # the sampler's (index, seed)
        return self.mean[i], self.logvar[i], self.label[i]


def write_latent_set(out, mean, logvar, label, classes, paths, meta: dict | None = None,
                     shard_size: int = 1024) -> dict:
    """Write labelled latents and their stats in the encode format (bench and smoke runs;
    python -m vitok_fast.encode writes the same for real data sets)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, start in enumerate(range(0, len(mean), shard_size)):
        sl = slice(start, start + shard_size)
        tensors = {"mean": mean[sl].float().contiguous(), "logvar": logvar[sl].float().contiguous(),
                   "label": label[sl].long().contiguous()}
        name = f"latents-{k:05d}.safetensors"
        atomic_write(out / name, lambda p: save_file(tensors, p))
        shards.append({"file": name, "count": len(tensors["mean"]), "paths": list(paths[sl])})
    index = {**(meta or {}), "classes": list(classes), "shards": shards,
             "num_samples": len(mean), "complete": True}
    z = mean.double().transpose(0, 1).flatten(1)  # (c, N * tokens)
    stats = {"shift_factor": float(z.mean()), "scaling_factor": float(1 / z.std()),
             "mean": z.mean(1).tolist(), "std": z.std(1).tolist(), "num_samples": len(mean),
             "source": "posterior mean"}
    atomic_write(out / "index.json", lambda p: Path(p).write_text(json.dumps(index, indent=2) + "\n"))
    atomic_write(out / "stats.json", lambda p: Path(p).write_text(json.dumps(stats, indent=2) + "\n"))
    return index
