"""Sample a class-conditional DiT trained on ViTok latents and decode with the ViTok.

    python -m vitok_fast.sample --dit runs/dit-DiT-XL_1 --classes cat,dog --cfg 1.5 \\
        --steps 250 --per-class 4 --out samples/

DDIM (eta 0) with classifier-free guidance (docs/generation.md). ``--dit`` is a train/dit.py
run (its latest checkpoint's EMA weights), a checkpoint directory, or its ``ema/`` folder;
the latent statistics, the class names and the ViTok (unless ``--vitok`` is given) come from
the run's ``latents.json``. ``--classes`` takes class names or indices. Writes one PNG per
image sample (an MP4 per video sample) named ``<class>/<i>.png``; ``grid.png``, one row per
class, each row labelled; ``samples.npz`` with ``pixels`` (uint8, N x H x W x 3 or
N x T x H x W x 3), ``latents`` (the denormalised ViTok latents) and ``labels``; and
``sample.json`` (the settings, the resolution and each file's class).
``python -m vitok_fast.evaluate --generated DIR`` scores them. Every option is checked before
a model loads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vitok_fast import cli
from vitok_fast.cli import UserError, run

# What train/dit.py shares with sampling lives in vitok_fast/dit.py and vitok_fast/media.py;
# re-exported here, and imported when used (--help imports no torch).
__getattr__ = cli.lazy_exports(__name__, {
    **dict.fromkeys(("LATENT_FILE", "decode_samples", "find_latent_info"), "vitok_fast.dit"),
    **dict.fromkeys(("save_sample_grid", "to_array", "to_uint8", "write_video"), "vitok_fast.media")})

TRAIN_STEPS = 1000  # the DDPM timesteps of vitok_fast.dit.Diffusion, which train/dit.py trains

def parse_classes(text: str, names: list[str], num_classes: int) -> list[int]:
    """``--classes``: comma-separated class names (those of the run's latents.json) or
    indices, mixed as one likes; every one checked."""
    classes, bad = [], []
    for part in (c.strip() for c in text.split(",")):
        if not part:
            continue
        if part in names:
            classes.append(names.index(part))
        elif part.lstrip("-").isdigit() and 0 <= int(part) < num_classes:
            classes.append(int(part))
        else:
            bad.append(part)
    if bad or not classes:
        known = (f"names {', '.join(names[:20])}{' ...' if len(names) > 20 else ''} or "
                 if names else "")
        raise UserError(f"--classes expects comma-separated class {known}indices in "
                        f"[0, {num_classes - 1}] (the DiT has {num_classes} classes), got "
                        f"{', '.join(bad) or repr(text)}")
    return classes


def run_path(text, run_dir: Path) -> str:
    """A path recorded in a run's latents.json: absolute as written now; an older run's
    relative path is tried from here, then from the run directory."""
    path = Path(text).expanduser()
    if path.is_absolute() or path.exists():
        return str(path)
    for folder in (run_dir, *run_dir.parents):
        if (folder / path).exists():
            return str(folder / path)
    return str(path)


def main(argv=None) -> dict:
    p = cli.ArgumentParser(prog="python -m vitok_fast.sample", description=__doc__)
    p.add_argument("--dit", required=True, type=cli.existing_dir,
                   help="train/dit.py run, checkpoint or ema folder")
    cli.add_ckpt(p, dest="vitok", deprecated=("--vitok",), type=cli.existing_dir,
                 help="the ViTok that encoded the latents (default: the one the DiT run names)")
    p.add_argument("--classes", default="0",
                   help="comma-separated class names (as in the run's latents.json) or indices")
    p.add_argument("--per-class", type=cli.positive_int, default=1, help="samples per class")
    p.add_argument("--cfg", type=cli.nonnegative_float, default=1.5,
                   help="guidance scale, 1 = none [paper: 1.5]")
    p.add_argument("--steps", type=steps_type, default=250,
                   help=f"DDIM steps, 1 to {TRAIN_STEPS} [paper: 250]")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0, help="seed of the sampling noise")
    p.add_argument("--batch-size", type=cli.positive_int, default=64,
                   help="samples per forward pass")
    cli.add_out(p, "output directory for the images, grid.png, sample.json and samples.npz",
                required=True)
    cli.add_no_kernels(p)
    cli.add_device(p)
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    from vitok_fast.checkpoint import resolve_ckpt
    from vitok_fast.dit import LATENT_FILE, DiT, Diffusion, LatentNorm, decode_samples, find_latent_info
    from vitok_fast.fileio import atomic_write
    from vitok_fast.media import save_sample_grid, to_array, to_uint8, write_video
    from vitok_fast.model import ViTok

    # -- what the run says, checked before any model loads ------------------------------------
    overrides = {"use_kernels": False} if args.no_kernels else {}
    dit_dir = resolve_ckpt(args.dit, quiet=True)
    run_dir = next((f for f in (dit_dir, *dit_dir.parents) if (f / LATENT_FILE).is_file()), dit_dir)
    info = find_latent_info(dit_dir)
    names = list(info.get("classes") or [])
    dit_config = json.loads((dit_dir / "config.json").read_text()) \
        if (dit_dir / "config.json").is_file() else {}
    num_classes = dit_config.get("num_classes", max(1, len(names)))
    classes = parse_classes(args.classes, names, num_classes)
    vitok_path = args.vitok or (run_path(info["vitok"], run_dir) if info.get("vitok") else None)
    if not vitok_path:
        raise UserError("pass --ckpt (the ViTok): the run does not record which ViTok encoded its latents")
    if not Path(vitok_path).is_dir():
        raise UserError(f"the run's latents.json names the ViTok {info['vitok']}, which is not a "
                        f"directory from here; pass --ckpt")
    labels = torch.tensor(classes).repeat_interleave(args.per_class)

    dit = DiT.from_pretrained(dit_dir, device=args.device, **overrides).eval()
    vitok = ViTok.from_pretrained(resolve_ckpt(vitok_path, quiet=True), device=args.device,
                                  **overrides).eval()
    norm = LatentNorm(info["stats"], info.get("per_channel_norm", False))
    shape = tuple(info["latent_shape"])
    if shape[0] != vitok.config.channels:
        raise UserError(f"the DiT was trained on {shape[0]}-channel latents, the ViTok "
                        f"{vitok_path} has {vitok.config.channels} channels: pass the ViTok "
                        f"that encoded the DiT's latents")
    p_, q_ = vitok.config.patch_size, vitok.config.tubelet_size
    height, width = shape[-2] * p_, shape[-1] * p_
    frames = shape[1] * q_ if len(shape) == 4 else 1
    label_of = lambda y: names[y] if y < len(names) else str(y)  # noqa: E731
    print(f"sample: DiT {dit.config.name} from {dit_dir}, ViTok {vitok.config.name} from "
          f"{vitok_path}: {len(labels)} samples at {height}x{width} px"
          + (f" x {frames} frames" if frames > 1 else "") + " (the latents' size: "
          f"{'x'.join(map(str, shape))}) of classes {', '.join(label_of(c) for c in classes)}",
          file=sys.stderr)

    diffusion, gen = Diffusion(), torch.Generator(args.device).manual_seed(args.seed)
    latents, pixels = [], []
    for i in range(0, len(labels), args.batch_size):
        y = labels[i:i + args.batch_size].to(args.device)
        z = diffusion.ddim_sample(dit, (len(y), *shape), y, steps=args.steps, cfg=args.cfg,
                                  generator=gen, device=args.device, progress=True)
        z = norm.denormalize(z)
        latents.append(z.cpu())
        pixels.append(decode_samples(vitok, z))
    latents, pixels = torch.cat(latents), to_uint8(torch.cat(pixels))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = np.stack([to_array(x) for x in pixels])
    counts: dict[int, int] = {}
    files = []
    for y, array in zip(labels.tolist(), arrays):
        k = counts[y] = counts.get(y, -1) + 1
        name = f"{safe_name(label_of(y))}/{k:04d}"
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        if array.ndim == 3:
            atomic_write(out / f"{name}.png",
                         lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
            files.append(f"{name}.png")
        else:  # the container is picked by the suffix: write .mp4, then rename into place
            final, tmp = out / f"{name}.mp4", out / f"{name}.tmp.mp4"
            write_video(tmp, array)
            os.replace(tmp, final)
            files.append(f"{name}.mp4")
    atomic_write(out / "samples.npz", lambda tmp: np.savez(
        open(tmp, "wb"), pixels=arrays, latents=latents.numpy(), labels=labels.numpy()))
    save_sample_grid(out / "grid.png", pixels, len(classes), labels=[label_of(c) for c in classes])
    record = {"dit": str(dit_dir.resolve()), "vitok": str(Path(vitok_path).resolve()),
              "resolution": height, "width": width, "frames": frames,
              "latent_shape": list(shape), "cfg": args.cfg, "steps": args.steps,
              "seed": args.seed, "classes": [label_of(c) for c in classes],
              "class_indices": classes,
              "files": [{"file": f, "label": y, "class": label_of(y)}
                        for f, y in zip(files, labels.tolist())]}
    atomic_write(out / "sample.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    print(f"{len(labels)} samples of classes {record['classes']} (cfg {args.cfg}, {args.steps} "
          f"DDIM steps, {height}x{width} px) -> {out} (grid.png: one row per class)")
    return {"n": len(labels), "out": str(out), "shape": list(arrays.shape), **record}


def steps_type(text: str) -> int:
    """``--steps``: DDIM steps, at most the training schedule's timesteps."""
    value = cli.positive_int(text)
    if value > TRAIN_STEPS:
        raise argparse.ArgumentTypeError(f"expected at most the {TRAIN_STEPS} timesteps the DiT "
                                         f"was trained with, got {value}")
    return value


def safe_name(label: str) -> str:
    """A class name as a folder name (no separators)."""
    return label.replace("/", "_").replace("\\", "_") or "_"


if __name__ == "__main__":
    run(main)
