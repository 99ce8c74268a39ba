"""Reconstruction quality of a ViTok checkpoint on a data set, at the paper's protocol.

    python -m vitok_fast.evaluate --ckpt runs/stage1-S-B_16 --data /data/imagenet/val \\
        --inception weights-inception-2015-12-05-6726825d.pth --lpips-vgg vgg16-397923af.pth
    torchrun --nproc_per_node 8 -m vitok_fast.evaluate --ckpt ... --data ...   # sharded

Images: rFID, PSNR, SSIM, LPIPS at 256p (or --resolution 512) centre crops. Videos (a model
with tubelets of q > 1 frames): rFVD on 16x128x128 clips, PSNR, SSIM and LPIPS per frame.
Prints a table and writes JSON; the metric definitions are in vitok_fast/metrics.py and
docs/evaluation.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from vitok_fast import cli

IMAGE_METRICS = ("psnr", "ssim", "lpips", "fid")
VIDEO_METRICS = ("psnr", "ssim", "lpips", "fvd")

# re-exported: the other tools took resolve_ckpt from here, and _shard and _distributed are
# the names the data-sharding helpers had here; imported when used (--help imports no torch)
__getattr__ = cli.lazy_exports(__name__, {
    "resolve_ckpt": "vitok_fast.checkpoint", "_shard": "vitok_fast.distributed:strided_shard",
    "_distributed": "vitok_fast.distributed:rank_world"})


@cli.no_grad
def evaluate(model, dataset, *, metrics=None, batch_size: int = 16, device="cpu",
             lpips_model=None, inception=None, i3d=None, num_workers: int = 0,
             max_samples: int | None = None, sample: bool = False, tile=None, overlap=None,
             autocast_dtype=None, progress: bool = True) -> dict:
    """Reconstruct every item of ``dataset`` and return the mean metrics over all ranks.

    ``dataset`` items are (3, H, W) images or (3, T, H, W) clips in [-1, 1] (the data
    contract), or the dicts of a ``with_meta`` dataset: then unreadable items are dropped,
    never replaced, and listed in ``skipped`` ([{path, reason}], all ranks). ``num_samples``
    counts the items actually reconstructed (a plain evaluation dataset raises
    ``UnreadableItem`` instead). The networks for LPIPS / FID / FVD must be
    given when their metric is asked.
    """
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from vitok_fast import metrics as M
    from vitok_fast.distributed import rank_world, strided_shard

    video = model.config.is_video
    metrics = tuple(metrics or (VIDEO_METRICS if video else IMAGE_METRICS))
    allowed = VIDEO_METRICS if video else IMAGE_METRICS
    unknown = [m for m in metrics if m not in allowed]
    if unknown:
        raise ValueError(f"unknown metrics {unknown} for a {'video' if video else 'image'} model; "
                         f"expected a subset of {list(allowed)}")
    needs = {"lpips": lpips_model, "fid": inception, "fvd": i3d}
    for name, net in needs.items():
        if name in metrics and net is None:
            raise ValueError(f"metric {name!r} asked for but no network for it was given")

    rank, world = rank_world()
    if isinstance(dataset, torch.utils.data.IterableDataset):
        # several workers would each replay the whole stream: one worker keeps it exact
        num_workers = min(num_workers, 1)
    with_meta = getattr(dataset, "with_meta", False)
    if with_meta:
        from vitok_fast.data import collate_items
    loader = torch.utils.data.DataLoader(strided_shard(dataset, rank, world, max_samples),
                                         batch_size=batch_size, num_workers=num_workers,
                                         **({"collate_fn": collate_items} if with_meta else {}))
    model.eval()
    # per-frame metrics treat a (B, 3, T, H, W) clip as B*T images
    frames = (lambda u: u.transpose(1, 2).flatten(0, 1)) if video else (lambda u: u)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # psnr, ssim, lpips, frames
    samples = torch.zeros((), dtype=torch.float64, device=device)
    # Frechet statistics exist on every rank from the start, so that all ranks join the
    # all-reduce even when one of them got no items
    if "fid" in metrics:
        features, dim = (lambda u: M.inception_features(inception, u)), 2048
    elif "fvd" in metrics:
        features, dim = (lambda u: M.i3d_features(i3d, u)), 400
    else:
        features, dim = None, 0
    real_stats, fake_stats = M.FrechetStats(dim, device), M.FrechetStats(dim, device)
    skipped = []

    for x in tqdm(loader, desc="evaluate", unit="batch", disable=not progress or rank != 0):
        if with_meta:
            skipped += [{"path": path, "reason": reason} for _, path, reason in x["skipped"]]
            x = x["x"]
            if x is None:  # every item of this batch was unreadable
                continue
        if x.ndim != (5 if video else 4):
            raise ValueError(
                f"expected data items {'(3, T, H, W) clips' if video else '(3, H, W) images'} for "
                f"{model.config.name}, got a batch of shape {tuple(x.shape)}")
        x = x.to(device)
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            posterior = model.encode(x, tile=tile, overlap=overlap)
            z = posterior.sample() if sample else posterior.mode()
            recon = model.decode(z, tile=tile, overlap=overlap)
        real_u8, fake_u8 = M.quantize(x), M.quantize(recon)
        rf, ff = frames(real_u8), frames(fake_u8)
        samples += x.shape[0]
        sums[3] += rf.shape[0]
        if "psnr" in metrics:
            sums[0] += M.psnr(rf, ff).sum()
        if "ssim" in metrics:
            sums[1] += M.ssim(rf, ff).sum()
        if "lpips" in metrics:
            sums[2] += lpips_model(M.dequantize(rf), M.dequantize(ff)).double().sum()
        if features is not None:  # FID on images, FVD on whole clips
            real_stats.update(features(real_u8)), fake_stats.update(features(fake_u8))

    if world > 1:
        dist.all_reduce(sums), dist.all_reduce(samples)
        real_stats.all_reduce(), fake_stats.all_reduce()
        if with_meta:
            parts = [None] * world
            dist.all_gather_object(parts, skipped)
            skipped = [s for part in parts for s in part]
    n, count = int(samples.item()), sums[3].item()
    if n == 0:
        raise ValueError("the data set gave no items to evaluate"
                         + (f": all {len(skipped)} were unreadable, e.g. {skipped[0]['path']}: "
                            f"{skipped[0]['reason']}" if skipped else ""))
    results = {"num_samples": n}
    if with_meta:
        results["skipped"] = skipped
    if "psnr" in metrics:
        results["psnr"] = sums[0].item() / count
    if "ssim" in metrics:
        results["ssim"] = sums[1].item() / count
    if "lpips" in metrics:
        results["lpips"] = sums[2].item() / count
    if "fid" in metrics:
        results["rfid"] = M.frechet_distance(real_stats, fake_stats)
    if "fvd" in metrics:
        results["rfvd"] = M.frechet_distance(real_stats, fake_stats)
    return results


# -- generation: gFID and gIS of samples against reference statistics ------------------------


GENERATION_METRICS = ("gfid", "gis", "gfvd")


def _samples_path(path) -> Path:
    """``samples.npz`` inside a folder written by python -m vitok_fast.sample, else ``path``."""
    path = Path(path)
    return path / "samples.npz" if path.is_dir() and (path / "samples.npz").is_file() else path


def _npz_pixels(path: Path, what: str):
    """The uint8 pixels of an .npz: its ``pixels`` (our samples) or ``arr_0`` (ADM's batches)."""
    import numpy as np

    data = np.load(path)
    key = next((k for k in ("pixels", "arr_0") if k in data), None)
    if key is None:
        raise ValueError(f"{path} holds {sorted(data)}: expected 'pixels' or 'arr_0' {what}")
    return data[key]


def load_generated(path, resolution: int | None = None) -> tuple[torch.Tensor, list[dict]]:
    """uint8 (N, 3, H, W) images and the unreadable files skipped ([{path, reason}]) from a
    folder written by python -m vitok_fast.sample (its samples.npz), an .npz holding
    ``pixels`` or ``arr_0`` (ADM's reference batches) as (N, H, W, 3) uint8, or any folder of
    images, read as every tool reads data (vitok_fast.data: recursive, class folders
    included, unreadable files skipped and named): each image resized (shorter side) and
    centre-cropped to ``resolution`` (default: the shorter side of the first readable one),
    the evaluation transform."""
    import numpy as np
    import torch

    from vitok_fast import metrics as M

    path = _samples_path(path)
    if path.is_file() and path.suffix == ".npz":
        images = _npz_pixels(path, "images")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3) in {path}, got {images.dtype} "
                             f"{images.shape} (video samples: score them with FVD, not gFID)")
        images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        if resolution is not None and images.shape[-2:] != (resolution, resolution):
            images = M.quantize(_fit(M.dequantize(images), resolution))
        return images, []
    if not path.is_dir():
        raise FileNotFoundError(f"expected a folder of samples or images, or an .npz, got {path}")
    from vitok_fast.data import IMAGE_EXTS, collate_items, make_dataset, scan_files

    if resolution is None:  # the size of the first image that reads
        from PIL import Image

        for file in scan_files(path, IMAGE_EXTS):
            try:
                with Image.open(file) as im:
                    resolution = min(im.size)
                break
            except Exception:  # noqa: BLE001 -- unreadable: the dataset skips and names it
                continue
        else:
            raise FileNotFoundError(f"{path} holds no samples.npz and no readable image, "
                                    f"searched recursively")
    dataset = make_dataset(str(path), resolution, train=False, with_meta=True)
    batch = collate_items([dataset[i] for i in range(len(dataset))])
    skipped = [{"path": p, "reason": r} for _, p, r in batch["skipped"]]
    if batch["x"] is None:
        raise ValueError(f"no image under {path} reads: {skipped[:3]}")
    return M.quantize(batch["x"]), skipped


def _fit(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] resized (shorter side) and centre-cropped to ``resolution``."""
    import torch
    import torch.nn.functional as F

    H, W = x.shape[-2:]
    s = resolution / min(H, W)
    size = (max(resolution, round(H * s)), max(resolution, round(W * s)))
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return x[..., top:top + resolution, left:left + resolution].clamp(-1, 1)


@cli.no_grad
def generation_metrics(images: torch.Tensor, ref, inception, *, batch_size: int = 50,
                       device="cpu", splits: int = 10, progress: bool = True):
    """gFID of uint8 images (N, 3, H, W) against ``ref`` (a FrechetStats, (mu, sigma), or
    None for none),
    and the Inception Score over ``splits`` splits, with the FID Inception of rFID
    (features "2048" and "logits_unbiased", as torch-fidelity computes them). Returns
    ``(results, stats of the images)``."""
    import torch
    from tqdm import tqdm

    from vitok_fast import metrics as M

    if isinstance(ref, tuple):
        ref = _stats_from_moments(*ref)
    stats = M.FrechetStats(2048)
    logits = []
    for i in tqdm(range(0, len(images), batch_size), desc="gFID", disable=not progress):
        features, batch_logits = inception(images[i:i + batch_size].to(device))
        stats.update(features.cpu())
        logits.append(batch_logits.double().cpu())
    p = torch.cat(logits).softmax(-1)
    scores = []
    for part in p.chunk(splits):  # [Salimans et al. 2016] exp E_x KL(p(y|x) || p(y))
        py = part.mean(0, keepdim=True)
        scores.append(torch.exp((part * (part.clamp_min(1e-30).log() - py.log())).sum(1).mean()))
    scores = torch.stack(scores)
    results = {"gfid": M.frechet_distance(ref, stats)} if ref is not None else {}
    return {**results, "gis": float(scores.mean()),
            "gis_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "num_samples": len(images)}, stats


def _stats_from_moments(mu, sigma, n: int = 50_000) -> "M.FrechetStats":
    """FrechetStats whose mean and covariance are exactly ``mu`` and ``sigma`` (any n >= 2)."""
    import torch

    from vitok_fast import metrics as M

    mu, sigma = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64)
    stats = M.FrechetStats(mu.numel())
    stats.n += n
    stats.sum += mu * n
    stats.outer += sigma * (n - 1) + n * torch.outer(mu, mu)
    return stats


def generated_clips(path) -> bool:
    """True if ``path`` (a samples folder, an .npz, or a folder of files) holds video samples:
    5-d pixels in its .npz, or video files and no images under the folder (recursive, as
    every tool reads folders: sample writes ``<class>/<k>.mp4``)."""
    import numpy as np

    from vitok_fast.data import IMAGE_EXTS, VIDEO_EXTS, scan_files

    path = _samples_path(path)
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as data:
            key = next((k for k in ("pixels", "arr_0") if k in data), None)
            return key is not None and data[key].ndim == 5
    if not path.is_dir():
        return False
    return bool(scan_files(path, VIDEO_EXTS)) and not scan_files(path, IMAGE_EXTS)


def load_generated_clips(path) -> torch.Tensor:
    """uint8 clips (N, 3, T, H, W) from samples.npz / an .npz holding (N, T, H, W, 3) uint8
    ``pixels`` or ``arr_0``, or a folder of video files of one size."""
    import numpy as np
    import torch

    from vitok_fast.data import VIDEO_EXTS
    from vitok_fast.media import read_video

    path = _samples_path(path)
    if path.is_file() and path.suffix == ".npz":
        clips = _npz_pixels(path, "clips")
    else:
        from vitok_fast.data import scan_files

        videos = scan_files(path, VIDEO_EXTS)  # class folders included
        if not videos:
            raise FileNotFoundError(f"{path} holds no samples.npz and no videos "
                                    f"({', '.join(VIDEO_EXTS)})")
        frames = [read_video(f)[0] for f in videos]
        shapes = sorted({c.shape for c in frames})
        if len(shapes) > 1:
            raise ValueError(f"the videos in {path} have {len(shapes)} shapes (T, H, W, 3) "
                             f"{shapes[:3]}: generated clips must share one; pass samples.npz")
        clips = np.stack(frames)
    if clips.dtype != np.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(f"expected uint8 clips (N, T, H, W, 3) in {path}, got {clips.dtype} "
                         f"{clips.shape}")
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).contiguous()


@cli.no_grad
def i3d_stats(batches, i3d, *, device="cpu", progress: bool = True) -> "M.FrechetStats":
    """FVD statistics (I3D's 400 logits) of uint8 clips (B, 3, T, H, W), batch by batch."""
    from tqdm import tqdm

    from vitok_fast import metrics as M

    stats = M.FrechetStats(400)
    for clips in tqdm(batches, desc="I3D", disable=not progress):
        stats.update(M.i3d_features(i3d, clips.to(device)).cpu())
    return stats


def real_clip_batches(source, frames: int, resolution: int, batch_size: int):
    """uint8 clips of a real video folder (UCF-101's class folders, any layout
    vitok_fast.data reads) at the generated clips' size: shorter side resized to
    ``resolution``, centre crop, the first ``frames`` frames (the evaluation protocol)."""
    import torch

    from vitok_fast import metrics as M
    from vitok_fast.data import make_dataset

    dataset = make_dataset(str(source), resolution, frames, train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    return (M.quantize(x) for x in loader)


def evaluate_generated_videos(args, clips: torch.Tensor) -> dict:
    """gFVD of generated uint8 clips (N, 3, T, H, W) against ``--ref-stats``: an .npz with
    the I3D ``mu`` and ``sigma``, samples (samples.npz or a folder of same-size clips), or a
    folder of real videos, read at the samples' size."""
    import numpy as np

    from vitok_fast import metrics as M

    i3d = M.load_i3d(args.i3d, args.device)
    batches = lambda x: (x[i:i + args.batch_size] for i in range(0, len(x), args.batch_size))
    T, H, W = clips.shape[2:]
    ref = None
    if args.ref_stats:
        ref_path = Path(args.ref_stats)
        data = np.load(ref_path) if ref_path.suffix == ".npz" and ref_path.is_file() else None
        if data is not None and "mu" in data and "sigma" in data:
            if data["mu"].shape != (400,):
                raise ValueError(f"--ref-stats {ref_path} holds statistics of {data['mu'].shape} "
                                 f"features; gFVD needs I3D's 400 (written by --stats-out on "
                                 f"clips)")
            ref = _stats_from_moments(data["mu"], data["sigma"])
        elif data is not None or (ref_path / "samples.npz").is_file():
            ref = i3d_stats(batches(load_generated_clips(ref_path)), i3d, device=args.device)
        else:
            if H != W:
                raise ValueError(f"real reference videos are centre-cropped square; the samples "
                                 f"are {H}x{W}: pass reference statistics or clips of that size")
            ref = i3d_stats(real_clip_batches(ref_path, T, H, args.batch_size), i3d,
                            device=args.device)
    stats = i3d_stats(batches(clips), i3d, device=args.device)
    results = {"generated": str(args.generated), "ref_stats": args.ref_stats,
               **({"gfvd": M.frechet_distance(ref, stats)} if ref is not None else {}),
               "num_samples": len(clips), "frames": T, "resolution": [H, W],
               "protocol": f"I3D 400-d logits ({M.I3D_FILE}), TF1 bilinear resize to 224, "
                           f"[-1, 1]"}
    return results, stats


def evaluate_generated(args) -> dict:
    """``--generated DIR --ref-stats REF``: gFID and gIS; ``--stats-out`` keeps the mu/sigma."""
    import numpy as np

    from vitok_fast import metrics as M
    from vitok_fast.fileio import atomic_write

    if not args.ref_stats and not args.stats_out:
        raise ValueError("--generated needs --ref-stats (an .npz with mu and sigma, e.g. ADM's "
                         "VIRTUAL_imagenet256_labeled.npz, or a folder / .npz of real images), "
                         "or --stats-out to write the statistics of DIR as a reference")
    if args.metrics:  # under --generated the metrics are gFID (with --ref-stats) and gIS
        asked = [m.strip() for m in args.metrics.split(",") if m.strip()]
        if not asked or set(asked) - set(GENERATION_METRICS):
            raise cli.UserError(f"--metrics {args.metrics}: with --generated expected a subset of "
                                f"{','.join(GENERATION_METRICS)} (reconstruction metrics need "
                                f"--ckpt and --data)")
    ref_path = Path(args.ref_stats) if args.ref_stats else None
    if ref_path is not None and not ref_path.exists():
        raise FileNotFoundError(f"--ref-stats {ref_path} does not exist: expected an .npz with mu "
                                f"and sigma, or a folder / .npz of real images")
    out = Path(args.out) if args.out else default_generated_out(args.generated)
    if generated_clips(args.generated):  # video samples: gFVD with I3D
        with cli.option("--generated", args.generated):
            clips = load_generated_clips(args.generated)
        results, stats = evaluate_generated_videos(args, clips)
        if args.stats_out:
            mu, sigma = stats.mean_cov()
            atomic_write(Path(args.stats_out),
                         lambda p: np.savez(open(p, "wb"), mu=mu, sigma=sigma))
        if "gfvd" in results:
            print(f"GFVD {results['gfvd']:.4f}")
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda p: Path(p).write_text(json.dumps(results, indent=2) + "\n"))
        print(f"wrote {out}", file=sys.stderr)
        return results
    inception = M.load_inception(
        args.inception, args.device, features=("2048", "logits_unbiased"),
        without=f"the file torch-fidelity's v0.2.0 release on GitHub serves (gFID and gIS both "
                f"need it, so --metrics cannot leave it out)")
    with cli.option("--generated", args.generated):
        images, skipped = load_generated(args.generated, args.resolution)
    ref, ref_skipped = None, []
    if ref_path is not None:
        data = np.load(ref_path) if ref_path.suffix == ".npz" and ref_path.is_file() else None
        if data is not None and "mu" in data and "sigma" in data:
            ref = (data["mu"], data["sigma"])
        else:  # real images at the samples' size: their features are the reference
            with cli.option("--ref-stats", args.ref_stats):
                real, ref_skipped = load_generated(ref_path, images.shape[-1])
            _, ref = generation_metrics(real, None, inception, batch_size=args.batch_size,
                                        device=args.device)
    for name, bad in (("--generated", skipped), ("--ref-stats", ref_skipped)):
        for item in bad:
            print(f"skipped unreadable {name} file {item['path']}: {item['reason']}",
                  file=sys.stderr)
    results, stats = generation_metrics(images, ref, inception, batch_size=args.batch_size,
                                        device=args.device)
    if args.metrics:
        results = {k: v for k, v in results.items()
                   if k.split("_")[0] in asked or k == "num_samples"}
    results = {"generated": str(args.generated), "ref_stats": args.ref_stats,
               "resolution": images.shape[-1], **results,
               "skipped": skipped, "ref_skipped": ref_skipped,
               "protocol": f"torch-fidelity Inception-v3 ({M.INCEPTION_FILE}): 2048-d pool "
                           f"features for gFID, logits_unbiased for gIS (10 splits)"}
    if args.stats_out:
        mu, sigma = stats.mean_cov()
        atomic_write(Path(args.stats_out), lambda p: np.savez(open(p, "wb"), mu=mu, sigma=sigma))
    print(" | ".join(f"{k.upper()} {results[k]:.4f}" for k in GENERATION_METRICS if k in results))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: Path(p).write_text(json.dumps(results, indent=2) + "\n"))
    print(f"wrote {out}", file=sys.stderr)
    return results


def default_generated_out(generated) -> Path:
    """Where ``--generated`` writes its JSON without ``--out``: ``<folder>/eval_generated.json``
    (beside an .npz: ``<name>_eval.json``)."""
    path = Path(generated)
    return path / "eval_generated.json" if path.is_dir() else path.with_name(f"{path.stem}_eval.json")


def format_table(results: dict) -> str:
    keys = [k for k in ("rfid", "rfvd", "psnr", "ssim", "lpips") if k in results]
    head = " | ".join(f"{k.upper():>8}" for k in keys)
    row = " | ".join(f"{results[k]:8.4f}" for k in keys)
    return f"{head}\n{'-' * len(head)}\n{row}"


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="python -m vitok_fast.evaluate", description=__doc__)
    cli.add_ckpt(p)
    p.add_argument("--data", help="any source vitok_fast.data.make_dataset reads")
    p.add_argument("--generated", help="instead of --ckpt/--data: gFID and gIS of the image "
                   "samples in this folder (python -m vitok_fast.sample), or gFVD of its video "
                   "samples, against --ref-stats")
    p.add_argument("--ref-stats", help="with --generated: an .npz with mu and sigma (ADM's "
                   "reference batches hold them), a folder / .npz of real images, or a folder "
                   "of real videos (UCF-101's class folders: read at the samples' size)")
    p.add_argument("--stats-out", help="with --generated: write the samples' mu and sigma here")
    p.add_argument("--resolution", type=cli.positive_int,
                   help="centre-crop size (default: the checkpoint's training resolution, else "
                   "256 images, 128 videos)")
    p.add_argument("--frames", type=cli.positive_int,
                   help="frames per clip for video models (default: the checkpoint's, else 16)")
    p.add_argument("--metrics", help=f"comma-separated subset (images: {','.join(IMAGE_METRICS)}; "
                                     f"videos: {','.join(VIDEO_METRICS)}; --generated: "
                                     f"{','.join(GENERATION_METRICS)}); default all")
    cli.add_inception(p)
    p.add_argument("--i3d", help="FVD I3D weights (i3d_pretrained_400.pt)")  # = metrics.I3D_FILE
    cli.add_lpips_vgg(p)
    p.add_argument("--batch-size", type=cli.positive_int, default=16, help="items per forward pass")
    p.add_argument("--num-workers", type=cli.nonnegative_int, default=2,
                   help="data-loader worker processes")
    p.add_argument("--max-samples", type=cli.positive_int, help="evaluate only the first N items")
    p.add_argument("--sample", action="store_true", help="decode a posterior sample, not the mean")
    p.add_argument("--tile", type=cli.positive_int,
                   help="encode/decode in tiles of this many pixels")
    p.add_argument("--overlap", type=cli.nonnegative_int,
                   help="tile overlap in pixels (default tile/4)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="autocast dtype")
    cli.add_no_kernels(p)
    cli.add_device(p)
    cli.add_out(p, type=cli.output_file,
                help="JSON file to write (default <ckpt>/eval_<data>_<res>p.json; with "
                "--generated DIR: DIR/eval_generated.json)")
    return p.parse_args(argv)


def parse_metrics(text: str | None, video: bool, name: str) -> tuple[str, ...]:
    """``--metrics`` as a tuple, every name checked against what the model's kind allows."""
    allowed = VIDEO_METRICS if video else IMAGE_METRICS
    if not text:
        return allowed
    metrics = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in metrics if m not in allowed]
    if unknown or not metrics:
        raise cli.UserError(f"--metrics {text}: expected a comma-separated subset of "
                            f"{','.join(allowed)} for the {'video' if video else 'image'} model "
                            f"{name}, got {','.join(unknown) or 'none'}")
    return metrics


def main(argv=None) -> dict:
    args = parse_args(argv)

    import torch
    import torch.distributed as dist

    from vitok_fast import distributed as D
    from vitok_fast import metrics as M
    from vitok_fast.fileio import atomic_write

    if args.generated:
        return evaluate_generated(args)
    if not args.ckpt or not args.data:
        raise ValueError("expected --ckpt and --data (reconstruction metrics) or --generated "
                         "(generation metrics)")
    unknown = [m for m in (x.strip() for x in (args.metrics or "").split(","))
               if m and m not in IMAGE_METRICS + VIDEO_METRICS]
    if unknown:  # before the model loads; which kind of model takes which is checked after
        raise cli.UserError(f"--metrics {args.metrics}: unknown {','.join(unknown)}; expected a "
                            f"subset of {','.join(IMAGE_METRICS)} (image models) or "
                            f"{','.join(VIDEO_METRICS)} (video models)")
    from vitok_fast.data import make_dataset
    from vitok_fast.perceptual import load_lpips

    # under torchrun: the process group on this attempt's own store (distributed.setup)
    device = D.setup(args.device).device
    rank = dist.get_rank() if dist.is_initialized() else 0

    model, ckpt, size = cli.load_vitok(args.ckpt, "evaluate", device=device,
                                       no_kernels=args.no_kernels, resolution=args.resolution,
                                       frames=args.frames, tile=args.tile, overlap=args.overlap,
                                       verbose=rank == 0)
    cfg = model.config
    video = cfg.is_video
    metrics = parse_metrics(args.metrics, video, cfg.name)
    resolution, frames = size["resolution"], size["frames"]
    # every weight file is checked before the first batch, not after an hour of features
    inception = M.load_inception(args.inception, device) if "fid" in metrics else None
    i3d = M.load_i3d(args.i3d, device) if "fvd" in metrics else None
    lpips_model = load_lpips(args.lpips_vgg, device=device,
                             without="or leave LPIPS out with --metrics (e.g. psnr,ssim)"
                             ) if "lpips" in metrics else None

    with cli.option("--data", args.data):
        dataset = make_dataset(args.data, resolution, frames, train=False, with_meta=True)
    start = time.time()
    results = evaluate(model, dataset, metrics=metrics, batch_size=args.batch_size, device=device,
                       lpips_model=lpips_model, inception=inception, i3d=i3d,
                       num_workers=args.num_workers, max_samples=args.max_samples,
                       sample=args.sample, tile=args.tile, overlap=args.overlap,
                       autocast_dtype=torch.bfloat16 if args.dtype == "bf16" else None)
    results = {
        "ckpt": str(ckpt), "model": cfg.name, "channels": cfg.channels, "data": args.data,
        "resolution": resolution, "frames": frames,
        **{k: size[k] for k in ("trained_resolution", "trained_frames", "size_source")},
        "E": cfg.E(frames, resolution, resolution),
        "sample": args.sample, "dtype": args.dtype, "tile": args.tile, **results,
        "skipped_files": len(results["skipped"]),  # each listed with its reason in "skipped"
        "seconds": round(time.time() - start, 2),
        "protocol": {
            "quantized_uint8": True,
            "crop": f"shorter side to {resolution}, centre crop",
            "fid": f"torch-fidelity Inception-v3 2048-d pool ({M.INCEPTION_FILE}), TF1 bilinear resize to 299",
            "fvd": f"I3D 400-d logits ({M.I3D_FILE}), TF1 bilinear resize to 224, [-1, 1]",
            "ssim": "Gaussian 11x11 sigma 1.5, per channel, per image (per frame)",
            "lpips": ("a RANDOM VGG backbone (--lpips-vgg random): not comparable"
                      if args.lpips_vgg == "random" else "VGG16 ImageNet weights, lpips' linear heads"),
        },
    }
    if rank == 0:
        print(format_table(results))
        out = Path(args.out) if args.out else ckpt / (
            f"eval_{Path(args.data.rstrip('/')).name.replace(':', '-')}_{resolution}p.json")

        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda path: Path(path).write_text(json.dumps(results, indent=2) + "\n"))
        print(f"wrote {out}", file=sys.stderr)
    if dist.is_initialized():
        D.cleanup()
    return results


if __name__ == "__main__":
    cli.run(main)

