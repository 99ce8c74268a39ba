"""Reconstruct image and video files with a ViTok checkpoint; side-by-side comparisons out.

    python -m vitok_fast.reconstruct --ckpt runs/s1/final photo.jpg clip.mp4 --out recon/
    python -m vitok_fast.reconstruct --ckpt runs/s1/final photos/ --out recon/

A folder stands for the image and video files directly in it. For each input writes
``<name>_recon.png`` / ``.mp4`` and ``<name>_compare.png`` / ``.mp4`` (input left,
reconstruction right), prints the per-file PSNR and writes them to ``<out>/psnr.json``.
Inputs keep their size, centre-cropped to a multiple of the patch (``--resolution R``
resizes the shorter side to R and centre-crops R x R instead); big inputs can be tiled with
``--tile``. An image model reconstructs a video frame by frame. A file that cannot be
reconstructed (unreadable, smaller than one patch, an image for a video model) is reported
and skipped; ``psnr.json`` holds the others, and the exit status is 2 if any failed.
Reading and writing the files and fitting pixels to the model are vitok_fast/media.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from vitok_fast import cli
from vitok_fast import metrics as M
from vitok_fast.fileio import atomic_write
# File I/O and the pixel preparation live in vitok_fast/media.py; re-exported here.
from vitok_fast.media import (fit_to_model, read_image, read_video,  # noqa: F401
                              reconstruct_pixels, to_array, to_pixels, write_image, write_video)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".webm", ".avi", ".mov", ".mkv"}


# -- the command ----------------------------------------------------------------------------


def reconstruct_file(model, path: Path, out: Path, *, resolution=None, max_frames=None,
                     tile=None, overlap=None, device="cpu") -> float:
    cfg = model.config
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTS:
        array, fps = read_video(path, max_frames)
        x = fit_to_model(to_pixels(array), cfg, resolution, path)  # (3, T, H, W)
        if cfg.is_video:
            T = x.shape[1] // cfg.tubelet_size * cfg.tubelet_size
            if T == 0:
                raise ValueError(f"{path} has {x.shape[1]} frames, fewer than one tubelet of "
                                 f"{cfg.tubelet_size} frames of {cfg.name}")
            x = x[:, :T]
            recon = reconstruct_pixels(model, x[None].to(device), tile, overlap)[0]
        else:  # an image model: every frame is an image
            frames = x.transpose(0, 1).to(device)
            recon = torch.cat([reconstruct_pixels(model, f[None], tile, overlap)
                               for f in frames]).transpose(0, 1)
    elif suffix in IMAGE_EXTS:
        if cfg.is_video:
            raise ValueError(f"{cfg.name} is a video model (tubelets of {cfg.tubelet_size} "
                             f"frames); it cannot reconstruct the image {path}")
        x = fit_to_model(to_pixels(read_image(path)), cfg, resolution, path)
        recon = reconstruct_pixels(model, x[None].to(device), tile, overlap)[0]
    else:
        raise ValueError(f"unsupported input {path}: expected an image "
                         f"({', '.join(sorted(IMAGE_EXTS))}) or a video ({', '.join(sorted(VIDEO_EXTS))})")

    real, fake = M.quantize(x), M.quantize(recon.cpu())
    both = torch.cat([real, fake], dim=-1)  # side by side along the width
    if real.ndim == 3:
        psnr = M.psnr(real[None], fake[None]).item()
        write_image(out / f"{path.stem}_recon.png", to_array(fake))
        write_image(out / f"{path.stem}_compare.png", to_array(both))
    else:  # per-frame PSNR averaged over frames, like the evaluation
        psnr = M.psnr(real.transpose(0, 1), fake.transpose(0, 1)).mean().item()
        write_video(out / f"{path.stem}_recon.mp4", to_array(fake), fps)
        write_video(out / f"{path.stem}_compare.mp4", to_array(both), fps)
    return psnr


def expand_inputs(inputs) -> list[Path]:
    """Files as given, a folder as the image and video files directly in it (sorted); every
    input must exist and every output name (the file's stem) must be distinct."""
    paths, missing = [], []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(f for f in path.iterdir()
                           if f.is_file() and f.suffix.lower() in IMAGE_EXTS | VIDEO_EXTS)
            if not found:
                raise cli.UserError(
                    f"{path} is a folder with no image ({', '.join(sorted(IMAGE_EXTS))}) or video "
                    f"({', '.join(sorted(VIDEO_EXTS))}) files directly in it; pass files or "
                    f"another folder")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            missing.append(text)
    if missing:
        raise cli.UserError(f"expected existing image or video files (or folders of them); "
                            f"these do not exist: {', '.join(missing)}")
    stems = {}
    for path in paths:
        if path.stem in stems and stems[path.stem] != path:
            raise cli.UserError(f"{stems[path.stem]} and {path} would both write "
                                f"{path.stem}_recon.*; rename one or run them separately")
        stems[path.stem] = path
    return list(dict.fromkeys(paths))


def main(argv=None) -> dict:
    p = cli.ArgumentParser(prog="python -m vitok_fast.reconstruct", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image or video files, or folders of them")
    p.add_argument("--ckpt", required=True, help="directory written by ViTok.save_pretrained")
    p.add_argument("--out", required=True, type=cli.output_dir, help="output directory")
    p.add_argument("--resolution", type=cli.positive_int,
                   help="resize shorter side and centre-crop to R x R")
    p.add_argument("--max-frames", type=cli.positive_int,
                   help="read at most this many frames of a video")
    p.add_argument("--tile", type=cli.positive_int, help="tile size in pixels for big inputs")
    p.add_argument("--overlap", type=cli.nonnegative_int,
                   help="tile overlap in pixels (default tile/4)")
    p.add_argument("--no-kernels", action="store_true", help="plain PyTorch ops instead of Triton")
    p.add_argument("--device", type=cli.device, default=cli.default_device())
    args = p.parse_args(argv)

    from vitok_fast.checkpoint import resolve_ckpt
    from vitok_fast.model import ViTok

    paths = expand_inputs(args.inputs)
    model = ViTok.from_pretrained(resolve_ckpt(args.ckpt), device=args.device,
                                  **({"use_kernels": False} if args.no_kernels else {})).eval()
    cli.check_sizes(model.config, resolution=args.resolution, tile=args.tile, overlap=args.overlap)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, failed = {}, {}
    for path in tqdm(paths, desc="reconstruct", unit="file", disable=len(paths) < 2):
        try:
            results[str(path)] = reconstruct_file(
                model, path, out, resolution=args.resolution, max_frames=args.max_frames,
                tile=args.tile, overlap=args.overlap, device=args.device)
        except cli.USER_ERRORS as e:  # this file is bad: say why, go on with the others
            failed[str(path)] = str(e)
            print(f"failed: {path}: {e}", file=sys.stderr)
            continue
        print(f"{results[str(path)]:8.3f} dB  {path}")
    atomic_write(out / "psnr.json",
                 lambda f: Path(f).write_text(json.dumps(results, indent=2) + "\n"))
    print(f"wrote {len(results)} reconstructions to {out}", file=sys.stderr)
    if failed:
        raise cli.UserError(f"{len(failed)} of {len(paths)} inputs failed ({', '.join(failed)}; "
                            f"reasons above); {out / 'psnr.json'} holds the {len(results)} done")
    return results


if __name__ == "__main__":
    cli.run(main)
