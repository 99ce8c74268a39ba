"""Reconstruction quality of a ViTok checkpoint on a data set, at the paper's protocol.

    python -m vitok_fast.evaluate --ckpt runs/s1/final --data /data/imagenet/val \\
        --inception weights-inception-2015-12-05-6726825d.pth --lpips-vgg vgg16-397923af.pth
    torchrun --nproc_per_node 8 -m vitok_fast.evaluate --ckpt ... --data ...   # sharded

Images: rFID, PSNR, SSIM, LPIPS at 256p (or --resolution 512) centre crops. Videos (a model
with tubelets of q > 1 frames): rFVD on 16x128x128 clips, PSNR, SSIM and LPIPS per frame.
Prints a table and writes JSON; the metric definitions are in vitok_fast/metrics.py and
docs/evaluation.md. ``--generated DIR`` scores samples instead (python -m vitok_fast.sample):
gFID and gIS of images, gFVD of clips (docs/generation.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from vitok_fast import cli
from vitok_fast import metrics as M
from vitok_fast.checkpoint import resolve_ckpt  # noqa: F401 (re-exported: the other tools took it from here)
from vitok_fast.distributed import rank_world, strided_shard
from vitok_fast.fileio import atomic_write

IMAGE_METRICS = ("psnr", "ssim", "lpips", "fid")
VIDEO_METRICS = ("psnr", "ssim", "lpips", "fvd")


_shard, _distributed = strided_shard, rank_world  # the names they had here


@torch.no_grad()
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


def load_generated(path) -> torch.Tensor:
    """uint8 images (N, 3, H, W) or clips (N, 3, T, H, W) from a folder written by
    python -m vitok_fast.sample (its samples.npz), any folder of PNG/JPEG images or of video
    files of one size, or an .npz holding ``pixels`` or ``arr_0`` (ADM's reference batches)
    as (N, H, W, 3) or (N, T, H, W, 3) uint8."""
    import numpy as np
    from PIL import Image

    from vitok_fast.data import IMAGE_EXTS, VIDEO_EXTS

    path = Path(path)
    if path.is_dir() and (path / "samples.npz").is_file():
        path = path / "samples.npz"
    if path.is_file() and path.suffix == ".npz":
        data = np.load(path)
        key = next((k for k in ("pixels", "arr_0") if k in data), None)
        if key is None:
            raise ValueError(f"{path} holds {sorted(data)}: expected 'pixels' or 'arr_0' images")
        images = data[key]
    elif path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        videos = sorted(f for f in path.iterdir() if f.suffix.lower() in VIDEO_EXTS)
        if files:
            images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        elif videos:
            from vitok_fast.media import read_video

            clips = [read_video(f)[0] for f in videos]
            shapes = sorted({c.shape for c in clips})
            if len(shapes) > 1:
                raise ValueError(f"the videos in {path} have {len(shapes)} shapes (T, H, W, 3) "
                                 f"{shapes[:3]}: generated clips must share one; pass samples.npz")
            images = np.stack(clips)
        else:
            raise FileNotFoundError(f"{path} holds no samples.npz, no PNG/JPEG images and no "
                                    f"videos ({', '.join(VIDEO_EXTS)})")
    else:
        raise FileNotFoundError(f"--generated expects a folder of samples or an .npz, got {path}")
    if images.dtype != np.uint8 or images.ndim not in (4, 5) or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3) or clips (N, T, H, W, 3) in "
                         f"{path}, got {images.dtype} {images.shape}")
    order = (0, 3, 1, 2) if images.ndim == 4 else (0, 4, 1, 2, 3)
    return torch.from_numpy(images).permute(*order).contiguous()


@torch.no_grad()
def generation_metrics(images: torch.Tensor, ref, inception, *, batch_size: int = 50,
                       device="cpu", splits: int = 10, progress: bool = True):
    """gFID of uint8 images (N, 3, H, W) against ``ref`` (a FrechetStats, (mu, sigma), or
    None for none),
    and the Inception Score over ``splits`` splits, with the FID Inception of rFID
    (features "2048" and "logits_unbiased", as torch-fidelity computes them). Returns
    ``(results, stats of the images)``."""
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
    mu, sigma = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64)
    stats = M.FrechetStats(mu.numel())
    stats.n += n
    stats.sum += mu * n
    stats.outer += sigma * (n - 1) + n * torch.outer(mu, mu)
    return stats


@torch.no_grad()
def i3d_stats(batches, i3d, *, device="cpu", progress: bool = True) -> "M.FrechetStats":
    """FVD statistics (I3D's 400 logits) of uint8 clips (B, 3, T, H, W), batch by batch."""
    stats = M.FrechetStats(400)
    for clips in tqdm(batches, desc="I3D", disable=not progress):
        stats.update(M.i3d_features(i3d, clips.to(device)).cpu())
    return stats


def real_clip_batches(source, frames: int, resolution: int, batch_size: int):
    """uint8 clips of a real video folder (UCF-101's class folders, any layout
    vitok_fast.data reads) at the generated clips' size: shorter side resized to
    ``resolution``, centre crop, the first ``frames`` frames (the evaluation protocol)."""
    from vitok_fast.data import make_dataset

    dataset = make_dataset(str(source), resolution, frames, train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    return (M.quantize(x) for x in loader)


def evaluate_generated_videos(args, clips: torch.Tensor) -> dict:
    """gFVD of generated uint8 clips (N, 3, T, H, W) against ``--ref-stats``: an .npz with
    the I3D ``mu`` and ``sigma``, samples (samples.npz or a folder of same-size clips), or a
    folder of real videos, read at the samples' size."""
    import numpy as np

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
            ref = i3d_stats(batches(load_generated(ref_path)), i3d, device=args.device)
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
    """``--generated DIR --ref-stats REF``: gFID and gIS of images, gFVD of clips;
    ``--stats-out`` keeps the mu/sigma."""
    import numpy as np

    if not args.ref_stats and not args.stats_out:
        raise ValueError("--generated needs --ref-stats (an .npz with mu and sigma, e.g. ADM's "
                         "VIRTUAL_imagenet256_labeled.npz, or a folder / .npz of real images or "
                         "videos), or --stats-out to write the statistics of DIR as a reference")
    images = load_generated(args.generated)
    if images.ndim == 5:
        results, stats = evaluate_generated_videos(args, images)
    else:
        inception = M.load_inception(args.inception, args.device,
                                     features=("2048", "logits_unbiased"))
        ref = None
        if args.ref_stats:
            ref_path = Path(args.ref_stats)
            data = np.load(ref_path) if ref_path.suffix == ".npz" and ref_path.is_file() else None
            if data is not None and "mu" in data and "sigma" in data:
                ref = (data["mu"], data["sigma"])
            else:  # real images: their features are the reference
                _, ref = generation_metrics(load_generated(ref_path), None, inception,
                                            batch_size=args.batch_size, device=args.device)
        results, stats = generation_metrics(images, ref, inception, batch_size=args.batch_size,
                                            device=args.device)
        results = {"generated": str(args.generated), "ref_stats": args.ref_stats, **results,
                   "protocol": f"torch-fidelity Inception-v3 ({M.INCEPTION_FILE}): 2048-d pool "
                               f"features for gFID, logits_unbiased for gIS (10 splits)"}
    if args.stats_out:
        mu, sigma = stats.mean_cov()
        atomic_write(Path(args.stats_out), lambda p: np.savez(open(p, "wb"), mu=mu, sigma=sigma))
    print(" | ".join(f"{k.upper()} {results[k]:.4f}" for k in ("gfid", "gis", "gfvd")
                     if k in results))
    if args.out:
        atomic_write(Path(args.out), lambda p: Path(p).write_text(json.dumps(results, indent=2) + "\n"))
    return results


def format_table(results: dict) -> str:
    keys = [k for k in ("rfid", "rfvd", "psnr", "ssim", "lpips") if k in results]
    head = " | ".join(f"{k.upper():>8}" for k in keys)
    row = " | ".join(f"{results[k]:8.4f}" for k in keys)
    return f"{head}\n{'-' * len(head)}\n{row}"


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="python -m vitok_fast.evaluate", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="directory written by ViTok.save_pretrained")
    p.add_argument("--data", help="any source vitok_fast.data.make_dataset reads")
    p.add_argument("--generated", help="instead of --ckpt/--data: gFID and gIS of the image "
                   "samples in this folder (python -m vitok_fast.sample), or gFVD of its video "
                   "samples, against --ref-stats")
    p.add_argument("--ref-stats", help="with --generated: an .npz with mu and sigma (ADM's "
                   "reference batches hold them), a folder / .npz of real images, or a folder "
                   "of real videos (UCF-101's class folders: read at the samples' size)")
    p.add_argument("--stats-out", help="with --generated: write the samples' mu and sigma here")
    p.add_argument("--resolution", type=cli.positive_int,
                   help="centre-crop size (default 256 images, 128 videos)")
    p.add_argument("--frames", type=cli.positive_int,
                   help="frames per clip for video models (default 16)")
    p.add_argument("--metrics", help=f"comma-separated subset (images: {','.join(IMAGE_METRICS)}; "
                                     f"videos: {','.join(VIDEO_METRICS)}); default all")
    p.add_argument("--inception", help=f"FID Inception weights ({M.INCEPTION_FILE})")
    p.add_argument("--i3d", help=f"FVD I3D weights ({M.I3D_FILE})")
    p.add_argument("--lpips-vgg", help="VGG16 weights for LPIPS (vgg16-397923af.pth)")
    p.add_argument("--batch-size", type=cli.positive_int, default=16)
    p.add_argument("--num-workers", type=cli.nonnegative_int, default=2)
    p.add_argument("--max-samples", type=cli.positive_int, help="evaluate only the first N items")
    p.add_argument("--sample", action="store_true", help="decode a posterior sample, not the mean")
    p.add_argument("--tile", type=cli.positive_int,
                   help="encode/decode in tiles of this many pixels")
    p.add_argument("--overlap", type=cli.nonnegative_int,
                   help="tile overlap in pixels (default tile/4)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="autocast dtype")
    p.add_argument("--no-kernels", action="store_true", help="plain PyTorch ops instead of Triton")
    p.add_argument("--device", type=cli.device, default=cli.default_device())
    p.add_argument("--out", type=cli.output_file,
                   help="JSON file to write (default <ckpt>/eval_<data>_<res>p.json)")
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
    if args.generated:
        return evaluate_generated(args)
    if not args.ckpt or not args.data:
        raise ValueError("expected --ckpt and --data (reconstruction metrics) or --generated "
                         "(generation metrics)")
    from vitok_fast.data import make_dataset
    from vitok_fast.model import ViTok
    from vitok_fast.perceptual import load_lpips

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0

    ckpt = resolve_ckpt(args.ckpt)
    overrides = {"use_kernels": False} if args.no_kernels else {}
    model = ViTok.from_pretrained(ckpt, device=device, **overrides)
    cfg = model.config
    video = cfg.is_video
    metrics = parse_metrics(args.metrics, video, cfg.name)
    resolution = args.resolution or (128 if video else 256)
    frames = args.frames or (16 if video else 1)
    cli.check_sizes(cfg, resolution=resolution, frames=args.frames,
                    tile=args.tile, overlap=args.overlap)
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
        "resolution": resolution, "frames": frames, "E": cfg.E(frames, resolution, resolution),
        "sample": args.sample, "dtype": args.dtype, "tile": args.tile, **results,
        "skipped_files": len(results["skipped"]),  # each listed with its reason in "skipped"
        "seconds": round(time.time() - start, 2),
        "protocol": {
            "quantized_uint8": True,
            "crop": f"shorter side to {resolution}, centre crop",
            "fid": f"torch-fidelity Inception-v3 2048-d pool ({M.INCEPTION_FILE}), TF1 bilinear resize to 299",
            "fvd": f"I3D 400-d logits ({M.I3D_FILE}), TF1 bilinear resize to 224, [-1, 1]",
            "ssim": "Gaussian 11x11 sigma 1.5, per channel, per image (per frame)",
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
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    cli.run(main)
