"""The training scripts' command-line options (train/stage1.py, stage2.py, dit.py): torch-free,
so that a script's ``--help`` and its argument errors import no torch (vitok_fast/training.py
re-exports them, where they were; their choices and defaults come from vitok_fast/defaults.py).
"""

from __future__ import annotations

import argparse
import os

from vitok_fast import cli
from vitok_fast.defaults import ATTENTION_BACKENDS, DEFAULT_ATTENTION_BACKEND, DEFAULT_DIST_TIMEOUT_S


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Arguments both stages take, each checked as it is parsed (vitok_fast/cli.py). Defaults
    are the paper's (docs/design.md section 2) for ViTok S-B/16 at 256p; ``--data`` has no default
    outside ``--smoke``, which swaps in a CPU-sized run on the embedded photos."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="S-B/16", help="paper-style name, e.g. S-B/16, S-L/16, S-B/4x8")
    g.add_argument("--channels", type=cli.positive_int, default=16,
                   help="bottleneck channels c [paper: 16]")
    g.add_argument("--resolution", type=cli.positive_int, default=None,
                   help="crop size (default: the paper's 256 for image models, 128 for video models)")
    g.add_argument("--frames", type=cli.positive_int, default=None,
                   help="frames per clip (default: 1 for image models, 16 for video models)")
    g.add_argument("--frame-stride", type=cli.positive_int, default=1,
                   help="take every k-th frame of a video when cutting clips")
    g.add_argument("--data", default=None, help="folder, video file, 'shards/{000..099}.tar', "
                   "'embedded' (the 15 photos shipped with scikit-image) or 'embedded-video'; "
                   "required unless --smoke (which uses embedded / embedded-video)")
    g.add_argument("--val-data", default=None, help="held-out data for the PSNR and image grids "
                   "(default: the embedded held-out photos for embedded data, a fixed 1%% slice "
                   "of a folder's files, excluded from training, else none; '' for none)")
    g.add_argument("--num-workers", type=cli.nonnegative_int, default=4,
                   help="data-loader workers per rank")
    g = p.add_argument_group("optimisation")
    g.add_argument("--global-batch-size", type=cli.positive_int, default=None,
                   help="images (or clips) per optimizer step over all ranks (default: the "
                   "paper's 1024 images / 256 clips in stage 1, 256 / 128 in stage 2)")
    g.add_argument("--micro-batch-size", type=cli.positive_int, default=32,
                   help="per rank and forward pass; the rest is gradient accumulation")
    g.add_argument("--max-steps", type=cli.positive_int, default=100_000,
                   help="optimizer steps of the whole run")
    g.add_argument("--lr", type=cli.positive_float, default=None,
                   help="peak lr (default: 1e-4 * global batch * frames / 256)")
    g.add_argument("--min-lr", type=cli.nonnegative_float, default=1e-5,
                   help="lr at the end of the cosine decay")
    g.add_argument("--warmup-frac", type=cli.fraction, default=0.03,
                   help="fraction of --max-steps with a linear lr warm-up")
    g.add_argument("--weight-decay", type=cli.nonnegative_float, default=1e-4,
                   help="AdamW weight decay")
    g.add_argument("--grad-clip", type=cli.positive_float, default=1.0,
                   help="clip the gradient's global norm to this")
    g.add_argument("--lpips-weight", type=cli.nonnegative_float, default=1.0, help="eta [paper: 1.0]")
    cli.add_lpips_vgg(g)
    g.add_argument("--max-nonfinite", type=cli.positive_int, default=10,
                   help="stop after this many non-finite steps in a row")
    g.add_argument("--seed", type=cli.nonnegative_int, default=0,
                   help="seed of the weights, the data order and the noise")
    g = p.add_argument_group("speed")
    g.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute block activations in backward: less memory, more compute")
    cli.add_no_kernels(g)
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS,
                   default=DEFAULT_ATTENTION_BACKEND,
                   help="attention kernel (docs/attention.md): 'sdpa' = PyTorch's choice; 'auto' "
                   "checks and times the CUDA kernels once per shape, the same choice on every rank")
    g.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                   help="data parallel: DDP (a full model per GPU) or FSDP (sharded)")
    cli.add_device(g, later=True)
    add_dist_timeout(g)
    g = add_run_args(p, "<stage>-<model>", save_every=2000)
    g.add_argument("--eval-every", type=cli.positive_int, default=1000,
                   help="steps between held-out PSNR and sample grids")
    g.add_argument("--val-images", type=cli.positive_int, default=8,
                   help="held-out samples per evaluation (--val-data '' for none)")
    g.add_argument("--bench-out", type=cli.output_file, default=None,
                   help="write throughput (images/s, MFU) as JSON here at the end of the run")
    g.add_argument("--smoke", action="store_true",
                   help="a CPU-sized run: T-T/8 at 32px, batch 8, 30 steps, embedded data, "
                   "random LPIPS backbone unless --lpips-vgg is given")


def add_run_args(p: argparse.ArgumentParser, name: str, save_every: int):
    """The "run" group of every training script (both stages and train/dit.py): where the run
    lives, how it resumes, how often it saves and logs. Returns the group for more."""
    g = p.add_argument_group("run")
    cli.add_out(g, f"run directory (default: runs/{name})", dest="out_dir",
                deprecated=("--out-dir",))
    g.add_argument("--resume", default="auto", help="'auto' (latest checkpoint in --out if "
                   "any), a checkpoint directory, or '' to start fresh")
    g.add_argument("--keep", type=cli.positive_int, default=3, help="checkpoints to keep")
    g.add_argument("--save-every", type=cli.positive_int, default=save_every,
                   help="steps between checkpoints")
    g.add_argument("--log-every", type=cli.positive_int, default=10,
                   help="steps between log lines")
    return g


def add_dist_timeout(group) -> None:
    """``--dist-timeout``, which every training script takes (docs/training.md)."""
    group.add_argument("--dist-timeout", type=cli.positive_float, default=DEFAULT_DIST_TIMEOUT_S,
                       help="seconds a rank waits for the others (the rendezvous, each "
                       "collective) before it exits non-zero, naming the step, so that torchrun "
                       "or the scheduler restarts the job instead of it hanging; must cover rank "
                       "0's checkpoint writes and sample grids")


# [ours] The paper's lr rule gives 3e-6 at batch 8, far too low for a model this small.
SMOKE = dict(model="T-T/8", resolution=32, global_batch_size=8, micro_batch_size=4, max_steps=30,
             lr=1e-3,
             save_every=10, eval_every=10, log_every=5, num_workers=0, val_images=4)


def finalize_args(args, parser, stage: str) -> argparse.Namespace:
    """Apply ``--smoke`` (only to options the user left at their defaults) and the defaults
    that depend on the model (frames, resolution, batch sizes); check the sizes against the
    model and that there is ``--data``, all before any work starts."""
    if args.smoke:
        for key, value in SMOKE.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
        if args.lpips_vgg is None:
            args.lpips_vgg = "random"
    from vitok_fast.config import ViTokConfig

    try:
        config = ViTokConfig.from_name(args.model, channels=args.channels)
    except ValueError as e:
        parser.error(f"argument --model: {e}")
    video = config.is_video
    if args.frames is None:
        args.frames = 16 if video else 1
    if args.resolution is None:  # [paper] 256p images, 128p videos (as evaluate and encode)
        args.resolution = 128 if video else 256
    cli.check_sizes(config, resolution=args.resolution, frames=args.frames)
    if args.data is None:
        if not args.smoke:
            parser.error("argument --data is required (a folder, a video file, "
                         "'shards/{000..099}.tar', or 'embedded' for the 15 photos shipped with "
                         "scikit-image; --smoke uses those)")
        args.data = "embedded-video" if video else "embedded"
    if args.val_data is None and args.data in ("embedded", "embedded-video"):
        args.val_data = args.data + ":val"
    if args.global_batch_size is None:  # [paper] Section 2.3
        args.global_batch_size = {("stage1", False): 1024, ("stage1", True): 256,
                                  ("stage2", False): 256, ("stage2", True): 128}[stage, video]
    if args.out_dir is None:
        args.out_dir = os.path.join("runs", f"{stage}-{args.model.replace('/', '_')}")
    return args
