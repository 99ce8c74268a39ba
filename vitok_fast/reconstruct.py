"""Reconstruct image and video files with a ViTok checkpoint; side-by-side comparisons out.

    python -m vitok_fast.reconstruct --ckpt runs/stage1-S-B_16 photo.jpg clip.mp4 --out recon/
    python -m vitok_fast.reconstruct --ckpt runs/stage1-S-B_16 photos/ --out recon/

A folder stands for the image and video files anywhere under it (class folders included). For
each input writes ``<name>_recon.png`` / ``.mp4`` and ``<name>_compare.png`` / ``.mp4`` (input
left, reconstruction right), where ``<name>`` is a file's stem, or for a folder's files their
path under it (``<class>/<stem>``); prints the per-file PSNR and writes them to
``<out>/psnr.json``, and the settings (model, checkpoint, resolution and where it came from,
each file's output name) to ``<out>/reconstruct.json``. Inputs are resized (shorter side) and
centre-cropped to the checkpoint's training resolution, or ``--resolution R``; ``--native``
(and a model folder that records no training resolution) keeps each input's size, centre-
cropped to a multiple of the patch; big inputs can be tiled with ``--tile``. An image model reconstructs a video frame by frame. A file that cannot be
reconstructed (unreadable, smaller than one patch, an image for a video model) is reported
and skipped; ``psnr.json`` holds the others, and the exit status is 2 if any failed.
Reading and writing the files and fitting pixels to the model are vitok_fast/media.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vitok_fast import cli

# File I/O and the pixel preparation live in vitok_fast/media.py; re-exported here, and
# imported when used (--help imports no torch).
__getattr__ = cli.lazy_exports(__name__, dict.fromkeys(
    ("fit_to_model", "read_image", "read_video", "reconstruct_pixels", "to_array", "to_pixels",
     "write_image", "write_video"), "vitok_fast.media"))

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".webm", ".avi", ".mov", ".mkv"}


# -- the command ----------------------------------------------------------------------------


def reconstruct_file(model, path: Path, out: Path, *, resolution=None, max_frames=None,
                     tile=None, overlap=None, device="cpu", name: str | None = None) -> float:
    """Reconstruct one file into ``out/<name>_recon.*`` and ``out/<name>_compare.*`` (``name``
    defaults to the file's stem; a folder's files keep their path under it, ``<class>/<stem>``);
    returns the PSNR."""
    import torch

    from vitok_fast import metrics as M
    from vitok_fast.media import (fit_to_model, read_image, read_video, reconstruct_pixels,
                                  to_array, to_pixels, write_image, write_video)

    cfg = model.config
    name = name or path.stem
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
        write_image(out / f"{name}_recon.png", to_array(fake))
        write_image(out / f"{name}_compare.png", to_array(both))
    else:  # per-frame PSNR averaged over frames, like the evaluation
        psnr = M.psnr(real.transpose(0, 1), fake.transpose(0, 1)).mean().item()
        write_video(out / f"{name}_recon.mp4", to_array(fake), fps)
        write_video(out / f"{name}_compare.mp4", to_array(both), fps)
    return psnr


def expand_inputs(inputs) -> dict[Path, str]:
    """``{file: output name}``: files as given (named by their stem), a folder as the image
    and video files anywhere under it (sorted; named by their path under it without the
    suffix, so class folders give ``<class>/<stem>``); every input must exist and every
    output name be distinct."""
    named, missing = {}, []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*")
                           if f.is_file() and f.suffix.lower() in IMAGE_EXTS | VIDEO_EXTS
                           and not any(part.startswith(".") for part in f.relative_to(path).parts))
            if not found:
                raise cli.UserError(
                    f"{path} is a folder with no image ({', '.join(sorted(IMAGE_EXTS))}) or video "
                    f"({', '.join(sorted(VIDEO_EXTS))}) files in it; pass files or another folder")
            for f in found:
                named.setdefault(f, f.relative_to(path).with_suffix("").as_posix())
        elif path.is_file():
            named.setdefault(path, path.stem)
        else:
            missing.append(text)
    if missing:
        raise cli.UserError(f"expected existing image or video files (or folders of them); "
                            f"these do not exist: {', '.join(missing)}")
    owners = {}
    for path, name in named.items():
        if name in owners:
            raise cli.UserError(f"{owners[name]} and {path} would both write {name}_recon.*; "
                                f"rename one or run them separately")
        owners[name] = path
    return named


def main(argv=None) -> dict:
    p = cli.ArgumentParser(prog="python -m vitok_fast.reconstruct", description=__doc__)
    p.add_argument("inputs", nargs="+", help="image or video files, or folders of them")
    cli.add_ckpt(p, required=True)
    cli.add_out(p, "output directory for the reconstructions and psnr.json", required=True)
    p.add_argument("--resolution", type=cli.positive_int,
                   help="resize shorter side and centre-crop to R x R (default: the checkpoint's "
                   "training resolution; a model folder without one keeps each input's size)")
    p.add_argument("--native", action="store_true",
                   help="keep each input's size (centre-cropped to whole patches) even where the "
                   "checkpoint records its training resolution")
    p.add_argument("--max-frames", type=cli.positive_int,
                   help="read at most this many frames of a video")
    p.add_argument("--tile", type=cli.positive_int, help="tile size in pixels for big inputs")
    p.add_argument("--overlap", type=cli.nonnegative_int,
                   help="tile overlap in pixels (default tile/4)")
    cli.add_no_kernels(p)
    cli.add_device(p)
    args = p.parse_args(argv)

    from tqdm import tqdm

    from vitok_fast.fileio import atomic_write

    if args.native and args.resolution:
        raise cli.UserError(f"--native keeps each input's size, --resolution {args.resolution} "
                            f"resizes it: give one of them")
    named = expand_inputs(args.inputs)
    model, folder, size = cli.load_vitok(
        args.ckpt, "reconstruct", device=args.device, no_kernels=args.no_kernels,
        resolution=args.resolution, tile=args.tile, overlap=args.overlap,
        native=lambda size: args.native or size["size_source"] == "default")
    model.eval()
    resolution = size["resolution"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, failed = {}, {}
    paths = list(named)
    for path in tqdm(paths, desc="reconstruct", unit="file", disable=len(paths) < 2):
        try:
            (out / named[path]).parent.mkdir(parents=True, exist_ok=True)
            results[str(path)] = reconstruct_file(
                model, path, out, resolution=resolution, max_frames=args.max_frames,
                tile=args.tile, overlap=args.overlap, device=args.device, name=named[path])
        except cli.USER_ERRORS as e:  # this file is bad: say why, go on with the others
            failed[str(path)] = str(e)
            print(f"failed: {path}: {e}", file=sys.stderr)
            continue
        print(f"{results[str(path)]:8.3f} dB  {path}")
    atomic_write(out / "psnr.json",
                 lambda f: Path(f).write_text(json.dumps(results, indent=2) + "\n"))
    settings = {"model": model.config.name, "ckpt": str(folder.resolve()),
                "resolution": resolution, "native_size": resolution is None,
                **{k: size[k] for k in ("trained_resolution", "size_source")},
                "files": [{"source": str(p), "output": named[p], "psnr": results[str(p)]}
                          for p in paths if str(p) in results]}
    atomic_write(out / "reconstruct.json",
                 lambda f: Path(f).write_text(json.dumps(settings, indent=2) + "\n"))
    print(f"wrote {len(results)} reconstructions to {out}", file=sys.stderr)
    if failed:
        raise cli.UserError(f"{len(failed)} of {len(paths)} inputs failed ({', '.join(failed)}; "
                            f"reasons above); {out / 'psnr.json'} holds the {len(results)} done")
    return results


if __name__ == "__main__":
    cli.run(main)
