"""Video generation, end to end, on a CPU: a tubelet ViTok + class-conditional DiT on Moving Digits.

    python bench/generation_moving_digits.py --json bench/results/generation_moving_digits_cpu.json \\
        --grid bench/results/generation_moving_digits_cpu.png --save-run runs/moving_digits

Moving Digits: scikit-learn's 1797 8x8 digits, nearest-upsampled 2x (as generation_digits.py
upsamples them, here to 16x16), one per clip on a black 32x32 canvas for 16 frames, moving
at a constant velocity (speed 1..2 px/frame, any direction) and bouncing off the borders;
start and velocity come from a seeded generator; label = the digit's class. The digits are
split by source digit as generation_digits.py splits them (fixed, stratified 80/20), so no
held-out digit is ever seen in any position.

On fresh training clips each step: a T-T/4x8 ViTok at width 128 (tubelets of 4 frames x 8x8
pixels; c = 4 channels, so a (4, 4, 4, 4) latent per clip, E = 256) with MSE + 1e-3 KL. Four clips per training digit are encoded
and written as labelled shards with stats.json (the format ``python -m vitok_fast.encode``
writes) and read back through the DiT's reader; a DiT-T/2 (1 x 2 x 2 patches: 4 x 2 x 2
tokens) learns them for 9000 steps (DDPM epsilon-prediction; otherwise the hyperparameters
of generation_digits.py);
50 clips per class are sampled with DDIM (50 steps) at CFG 1.5 and decoded through the
ViTok's video path.

Every frame is read the same way, samples and real clips alike: the 16x16 window centred on
the frame's centre of mass (how MNIST centres its digits), averaged back to 8x8. An SVM fit
on the frames of real training clips read that way scores it:

  accuracy_conditional    frames of the samples classified as the class asked for,
                          averaged over all frames of all samples
  temporal_consistency    fraction of samples whose frames get the same class (any class)
                          in at least 14 of 16 frames: a digit that morphs fails it
  motion                  {"samples", "real"}: mean per-frame displacement, in pixels, of the
                          frame's centre of mass; real = held-out clips. A frozen video
                          scores 0, a flickering one far above real
  accuracy_real_heldout   the SVM on the frames of real held-out clips: the ceiling
  tokenizer_psnr_heldout  the ViTok's PSNR on real held-out clips (posterior mean)
  fd_samples / fd_real    Frechet distance to the held-out clips in the PCA(16) space of
                          the flattened real training clips, for the samples and for real
                          training clips

Target (docs/generation.md): accuracy_conditional >= 0.85, temporal_consistency >= 0.85 and
motion within a factor 2 of real, in under 15 minutes on 2 CPU cores.
tests/test_generation.py runs a shorter version of the same code.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vitok_fast.cli import UserError, run
from vitok_fast.fileio import atomic_write


def _sibling(name: str):
    """A script beside this one, loaded from its file (bench/ is not a package)."""
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"vitok_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


digits = _sibling("generation_digits")

SIZE, FRAMES, UP = 32, 16, 2          # canvas side, frames per clip, digit upsampling
DIGIT = 8 * UP                        # the digit's side on the canvas
ROOM = SIZE - DIGIT                   # positions 0..ROOM along each axis
SPEED = (1.0, 2.0)                    # pixels per frame
MODEL = "T-T/4x8"
# [ours] both sides of the T-T/4x8 widened from 64 to 128 (4 heads of 32, SwiGLU 8d/3 = 344):
# a tubelet holds 4x8x8x3 = 768 numbers, 4x an 8x8 image patch. At width 64 the tokenizer
# plateaued near 19 dB and followed the digit to 1.45 px a frame (600 steps: 16.6 dB); at 128,
# 600 steps give 19.0 dB and 0.46 px (seed 0, the tests' short run).
WIDTH = 128
VITOK_LR = 1e-3  # at width 128: 19.0 dB at 600 steps against 18.6 dB at the digits' 2e-3
# [ours] the bottleneck and the DiT's steps, chosen by the paper's learning 2 (seed 0, the
# same tokenizer recipe): E = 512 (c = 8) gave 0.24 accuracy and 0.004 consistency, E = 256
# (c = 4) 0.60 / 0.17 and E = 128 (c = 2) 0.61 / 0.24 after 3000 DiT steps; 9000 steps took
# c = 4 to 0.855 / 0.60 and c = 2 to 0.77 / 0.47 (docs/generation.md)
CHANNELS, DIT_STEPS = 4, 9000
CONSISTENT = 14                       # frames of 16 that must agree (temporal_consistency)
KEYS = ("accuracy_conditional", "temporal_consistency", "motion", "accuracy_real_heldout",
        "tokenizer_psnr_heldout", "tokenizer_tracking_heldout_px", "tokenizer", "fd_samples", "fd_real", "seconds", "seed", "cfg",
        "sampling_steps", "device", "versions")


# -- the clips --------------------------------------------------------------------------------


def trajectories(n: int, generator: torch.Generator, frames: int = FRAMES) -> torch.Tensor:
    """(n, frames, 2) integer (row, col) of the digit's top-left corner: a uniform start in
    [0, ROOM]^2, a uniform direction and speed, reflected at the borders."""
    start = torch.rand(n, 2, generator=generator, dtype=torch.float64) * ROOM
    angle = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * math.pi
    speed = SPEED[0] + (SPEED[1] - SPEED[0]) * torch.rand(n, generator=generator, dtype=torch.float64)
    velocity = speed[:, None] * torch.stack([angle.sin(), angle.cos()], 1)
    free = start[:, None] + torch.arange(frames, dtype=torch.float64)[None, :, None] * velocity[:, None]
    folded = free % (2 * ROOM)  # bouncing = a triangle wave of period 2 ROOM
    return torch.where(folded > ROOM, 2 * ROOM - folded, folded).round().long()


def render(X: np.ndarray, positions: torch.Tensor) -> torch.Tensor:
    """Digits (n, 64) in 0..16 at ``positions`` (n, T, 2) -> clips (n, 3, T, SIZE, SIZE) in
    [-1, 1], grey in all three channels."""
    n, T = positions.shape[:2]
    glyph = torch.from_numpy(np.asarray(X, dtype=np.float32)).view(n, 8, 8) / 16.0
    glyph = glyph.repeat_interleave(UP, 1).repeat_interleave(UP, 2)
    canvas = torch.zeros(n, T, SIZE, SIZE)
    span = torch.arange(DIGIT)
    rows = (positions[..., 0, None] + span)[..., :, None]  # (n, T, DIGIT, 1)
    cols = (positions[..., 1, None] + span)[..., None, :]  # (n, T, 1, DIGIT)
    canvas[torch.arange(n)[:, None, None, None], torch.arange(T)[None, :, None, None],
           rows, cols] = glyph[:, None]
    return (canvas * 2 - 1).unsqueeze(1).expand(-1, 3, -1, -1, -1).contiguous()


def make_clips(X: np.ndarray, copies: int, generator: torch.Generator) -> torch.Tensor:
    """``copies`` clips of each digit (digit-major order), each its own trajectory."""
    X = np.repeat(X, copies, axis=0)
    return render(X, trajectories(len(X), generator))


# -- reading frames ---------------------------------------------------------------------------


def grey_frames(clips: torch.Tensor) -> torch.Tensor:
    """(N, 3, T, H, W) in [-1, 1] -> (N, T, H, W) intensities in [0, 1]."""
    return ((clips.float().clamp(-1, 1).mean(1) + 1) / 2)


def centre_of_mass(frames: torch.Tensor) -> torch.Tensor:
    """(..., H, W) intensities -> (..., 2) (row, col) centre of mass in pixels; the canvas
    centre for an empty frame."""
    H, W = frames.shape[-2:]
    mass = frames.sum((-2, -1))
    r = (frames.sum(-1) * torch.arange(H, dtype=frames.dtype)).sum(-1)
    c = (frames.sum(-2) * torch.arange(W, dtype=frames.dtype)).sum(-1)
    com = torch.stack([r, c], -1) / mass.clamp_min(1e-6)[..., None]
    centre = torch.tensor([(H - 1) / 2, (W - 1) / 2], dtype=frames.dtype)
    return torch.where((mass > 1e-6)[..., None], com, centre)


def read_digits(clips: torch.Tensor) -> np.ndarray:
    """(N, 3, T, H, W) clips -> (N, T, 64) pixels in 0..16: every frame's DIGIT x DIGIT window
    centred on its centre of mass (kept inside the canvas), averaged back to 8x8."""
    frames = grey_frames(clips)
    N, T = frames.shape[:2]
    flat = frames.reshape(N * T, SIZE, SIZE)
    top = (centre_of_mass(flat) - (DIGIT - 1) / 2).round().long().clamp(0, ROOM)
    span = torch.arange(DIGIT)
    rows = (top[:, 0, None] + span)[:, :, None]
    cols = (top[:, 1, None] + span)[:, None, :]
    window = flat[torch.arange(N * T)[:, None, None], rows, cols]
    return (F.avg_pool2d(window[:, None], UP) * 16).reshape(N, T, 64).numpy()


def frame_classifier(clips: torch.Tensor, labels: np.ndarray):
    """An SVM fit on every 4th frame of real ``clips`` read by :func:`read_digits`; returns
    ``predict(clips) -> (N, T)`` classes of every frame."""
    from sklearn.svm import SVC

    frames = read_digits(clips)[:, ::4]
    svm = SVC(gamma=0.001).fit(frames.reshape(-1, 64), np.repeat(labels, frames.shape[1]))
    return lambda x: svm.predict(read_digits(x).reshape(-1, 64)).reshape(len(x), -1)


def motion(clips: torch.Tensor) -> float:
    """Mean distance, in pixels, the centre of mass moves from one frame to the next."""
    com = centre_of_mass(grey_frames(clips).double())
    return float((com[:, 1:] - com[:, :-1]).norm(dim=-1).mean())


# -- the models -------------------------------------------------------------------------------


def widths(width: int) -> dict:
    """ViTokConfig fields for both sides of T-T/4x8 at ``width`` (T itself is 64)."""
    if width == 64:
        return {}
    if width % 32:
        raise UserError(f"--width must be a multiple of 32 (heads of 32), got {width}")
    return {f"{side}_{k}": v for side in ("encoder", "decoder")
            for k, v in (("width", width), ("heads", width // 32),
                         ("mlp_hidden", -(-8 * width // 3 // 8) * 8))}


def train_vitok(X: np.ndarray, steps: int, seed: int, batch: int = 32, lr: float = VITOK_LR,
                channels: int = CHANNELS, width: int = WIDTH):
    """A T-T/4x8 ViTok (both sides at ``width``) on fresh clips of the digits ``X`` every
    step (MSE + 1e-3 KL): the loop of generation_digits.py, each batch rendered from the
    digits drawn."""
    return digits.train_vitok(X, steps, seed, batch=batch, lr=lr, channels=channels, name=MODEL,
                              make=lambda pick, gen: render(X[pick.numpy()],
                                                            trajectories(len(pick), gen)),
                              **widths(width))


def tracking(recon: torch.Tensor, clips: torch.Tensor) -> float:
    """Mean distance, in pixels, between the centre of mass of each reconstructed frame and
    that of the real frame: a tokenizer that blurs or freezes the motion inside a tubelet
    (a broken unembed) is far off, one that follows the digit is well under a pixel."""
    com = lambda x: centre_of_mass(grey_frames(x).double())
    return float((com(recon) - com(clips)).norm(dim=-1).mean())


@torch.no_grad()
def encode_clips(vitok, clips: torch.Tensor, batch: int = 128):
    """Posterior mean and log-variance of every clip, in batches."""
    parts = [vitok.encode(clips[i:i + batch]) for i in range(0, len(clips), batch)]
    return torch.cat([p.mean for p in parts]), torch.cat([p.logvar for p in parts])


@torch.no_grad()
def reconstruct(vitok, clips: torch.Tensor, batch: int = 128) -> torch.Tensor:
    return torch.cat([vitok(clips[i:i + batch], sample=False)[0].clamp(-1, 1)
                      for i in range(0, len(clips), batch)])


def load_tokenizer(path):
    """A tubelet ViTok saved before (``--save-run DIR`` writes DIR/vitok), checked to fit the
    clips: a video model whose tubelets tile 16 frames of 32x32."""
    from vitok_fast.model import ViTok

    try:
        vitok = ViTok.from_pretrained(path, use_kernels=False)
    except (OSError, ValueError) as e:
        raise UserError(f"--vitok expects a ViTok model folder (--save-run DIR writes DIR/vitok), "
                        f"got {path}: {e}") from e
    c = vitok.config
    if not c.is_video or FRAMES % c.tubelet_size or SIZE % c.patch_size:
        raise UserError(f"--vitok {path} is {c.name}: moving digits need a video ViTok whose "
                        f"tubelets tile {FRAMES} frames of {SIZE}x{SIZE}")
    return vitok.eval()


def save_run(directory, vitok, dit, latents: dict, meta: dict) -> Path:
    """The ViTok and the DiT as ``python -m vitok_fast.sample`` reads them: ``vitok/`` and a
    ``dit/`` folder holding the DiT and the ``latents.json`` train/dit.py would write."""
    from vitok_fast.dit import LATENT_FILE

    directory = Path(directory)
    vitok.save_pretrained(directory / "vitok")
    dit.save_pretrained(directory / "dit")
    info = {"stats": latents["stats"], "per_channel_norm": False,
            "latent_shape": list(latents["mean"].shape[1:]), "vitok": str(directory / "vitok"),
            "classes": latents["index"]["classes"], **meta}
    atomic_write(directory / "dit" / LATENT_FILE,
                 lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    return directory


# -- the check --------------------------------------------------------------------------------


def run_check(seed: int = 0, *, vitok_steps: int = 2000, dit_steps: int = DIT_STEPS,
              clips_per_digit: int = 4, per_class: int = 50, cfg: float = 1.5,
              sampling_steps: int = 50, channels: int = CHANNELS, width: int = WIDTH,
              vitok_lr: float = VITOK_LR, grid: str | None = None, save: str | None = None,
              workdir: str | None = None, vitok_dir: str | None = None,
              dit_model: str = "DiT-T/2") -> dict:
    """The whole check; returns the record with KEYS (device and versions left to main)."""
    from sklearn.decomposition import PCA

    from vitok_fast.dit import LatentNorm
    from vitok_fast.latents import load_latent_set, write_latent_set
    from vitok_fast.losses import psnr

    start = time.perf_counter()
    X_train, X_held, y_train, y_held = digits.digits_split()
    gen = torch.Generator().manual_seed(10_000 + seed)  # the fixed clips, apart from training's
    held = make_clips(X_held, 1, gen)

    if vitok_dir is None:
        vitok = train_vitok(X_train, vitok_steps, seed, lr=vitok_lr, channels=channels,
                            width=width)
        tokenizer = {"model": MODEL, "width": width, "channels": channels, "lr": vitok_lr,
                     "steps": vitok_steps}
    else:  # a tokenizer trained before (--save-run's vitok/): the DiT half alone
        vitok = load_tokenizer(vitok_dir)
        c = vitok.config
        tokenizer = {"model": c.name, "width": c.encoder_width, "channels": c.channels,
                     "from": str(vitok_dir)}
    held_recon = reconstruct(vitok, held)
    tokenizer_psnr = float(psnr(held, held_recon).mean())
    print(f"ViTok: held-out PSNR {tokenizer_psnr:.2f} dB after {time.perf_counter() - start:.0f} s",
          file=sys.stderr)

    # the labelled latent shards + stats.json, written and read back as a real run would
    train_clips = make_clips(X_train, clips_per_digit, gen)
    train_labels = torch.from_numpy(np.repeat(y_train, clips_per_digit))
    mean, logvar = encode_clips(vitok, train_clips)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        write_latent_set(tmp, mean, logvar, train_labels, classes=[str(k) for k in range(10)],
                         paths=[f"moving-digits/train/{i // clips_per_digit}/{i % clips_per_digit}"
                                for i in range(len(train_labels))],
                         meta={"model": MODEL, "resolution": SIZE, "frames": FRAMES})
        latents = load_latent_set(tmp)
    norm = LatentNorm(latents["stats"])
    z = norm.normalize(latents["mean"])
    dit, diffusion = digits.train_dit(z, latents["label"], len(latents["index"]["classes"]),
                                      dit_steps, seed, name=dit_model)

    labels = torch.arange(10).repeat_interleave(per_class)
    samples = digits.generate(vitok, dit, diffusion, norm, labels, z.shape[1:], cfg,
                              sampling_steps, seed)

    predict = frame_classifier(train_clips[::clips_per_digit], y_train)
    pred, pred_held = predict(samples), predict(held)
    agree = np.array([np.bincount(p, minlength=10).max() for p in pred])

    flat = lambda clips: grey_frames(clips).flatten(1).numpy().astype(np.float64)
    pca = PCA(n_components=16, random_state=0).fit(flat(train_clips[::clips_per_digit]))
    record = {
        "accuracy_conditional": float((pred == labels.numpy()[:, None]).mean()),
        "temporal_consistency": float((agree >= CONSISTENT).mean()),
        "motion": {"samples": motion(samples), "real": motion(held)},
        "accuracy_real_heldout": float((pred_held == y_held[:, None]).mean()),
        "tokenizer_psnr_heldout": tokenizer_psnr,
        "tokenizer_tracking_heldout_px": tracking(held_recon, held),
        "tokenizer": {**tokenizer, "E": int(mean[0].numel())}, "dit": dit_model,
        "fd_samples": digits.frechet(pca.transform(flat(samples)), pca.transform(flat(held))),
        "fd_real": digits.frechet(pca.transform(flat(train_clips[::clips_per_digit])),
                                  pca.transform(flat(held))),
        "seconds": round(time.perf_counter() - start, 1),
        "seed": seed, "cfg": cfg, "sampling_steps": sampling_steps,
    }
    if grid:  # rows of frames: the first two samples of each class, one row each
        rows = samples.view(10, per_class, *samples.shape[1:])[:, :2].flatten(0, 1)
        digits.save_grid(grid, rows.transpose(1, 2).flatten(0, 1), rows=len(rows))
    if save:
        save_run(save, vitok, dit, latents, {"benchmark": "bench/generation_moving_digits.py",
                                             "seed": seed})
    return record


def environment(threads: int) -> dict:
    """device and versions, and how loaded the machine was (a shared machine slows a run)."""
    import platform

    import sklearn

    from vitok_fast.benchmarking import git_commit

    return {
        "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"{threads} torch thread(s); load average {os.getloadavg()[0]:.1f} at the end",
        "versions": {"torch": torch.__version__, "sklearn": sklearn.__version__,
                     "python": platform.python_version(), "commit": git_commit()},
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance [paper: 1.5]")
    p.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--per-class", type=int, default=50, help="samples per class")
    p.add_argument("--vitok-steps", type=int, default=2000)
    p.add_argument("--dit-steps", type=int, default=DIT_STEPS)
    p.add_argument("--clips-per-digit", type=int, default=4,
                   help="clips encoded per training digit for the DiT")
    p.add_argument("--channels", type=int, default=CHANNELS, help="ViTok latent channels c "
                   "(E = 64 c)")
    p.add_argument("--width", type=int, default=WIDTH,
                   help="ViTok width, both sides (T is 64; heads of 32)")
    p.add_argument("--vitok-lr", type=float, default=VITOK_LR, help="ViTok peak learning rate")
    p.add_argument("--vitok", metavar="DIR", help="use this trained tokenizer (a --save-run's "
                   "DIR/vitok) instead of training one: the DiT half alone")
    p.add_argument("--dit-model", default="DiT-T/2", help="the DiT (DiT-T/1: 4x the tokens)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (generation_digits.py "
                   "says why 1)")
    p.add_argument("--json", help="write the record here")
    p.add_argument("--grid", help="write a PNG here: 2 samples per class, a row of 16 frames each")
    p.add_argument("--save-run", help="save the ViTok and the DiT here for python -m "
                   "vitok_fast.sample (--dit DIR/dit)")
    args = p.parse_args(argv)
    for key in ("sampling_steps", "per_class", "vitok_steps", "dit_steps", "clips_per_digit",
                "channels", "width"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.per_class < 2 and args.grid:
        raise UserError(f"--grid shows 2 samples per class: --per-class must be at least 2, "
                        f"got {args.per_class}")
    widths(args.width)  # a width that is not a multiple of 32: said before any work
    if args.vitok:
        load_tokenizer(args.vitok)
    from vitok_fast.dit import DiTConfig
    try:
        DiTConfig.from_name(args.dit_model)
    except ValueError as e:
        raise UserError(f"--dit-model: {e}") from e
    if not args.vitok_lr > 0:
        raise UserError(f"--vitok-lr must be positive, got {args.vitok_lr}")
    torch.set_num_threads(args.threads)
    record = run_check(args.seed, vitok_steps=args.vitok_steps, dit_steps=args.dit_steps,
                       clips_per_digit=args.clips_per_digit, per_class=args.per_class,
                       cfg=args.cfg, sampling_steps=args.sampling_steps, channels=args.channels,
                       width=args.width, vitok_lr=args.vitok_lr, grid=args.grid,
                       save=args.save_run, vitok_dir=args.vitok, dit_model=args.dit_model)
    record.update(environment(args.threads))
    print(json.dumps(record, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(args.json),
                     lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    return record


if __name__ == "__main__":
    run(main)
