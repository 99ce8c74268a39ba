"""The pieces the training scripts share (train/stage1.py, stage2.py, dit.py): arguments,
optimizer and schedule, the non-finite guard, EMA, throughput and MFU, held-out evaluation,
logging, stopping on a signal. vitok_fast/run.py assembles them into the run skeleton; the
loops themselves stay in the scripts, where a reader can see them.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import os
import random
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from vitok_fast import attention, cli
from vitok_fast import distributed as D
from vitok_fast.config import ViTokConfig
from vitok_fast.checkpoint import step_dir_name
from vitok_fast.fileio import atomic_write
from vitok_fast.losses import psnr
from vitok_fast.options import (SMOKE, add_common_args, add_dist_timeout,  # noqa: F401 (were here)
                                add_run_args, finalize_args)

# -- arguments: vitok_fast/options.py (torch-free, so that --help imports no torch) ----------

# Arguments that fix the sample stream, the noise and the schedule: a resume that changes
# one of them is no longer an exact continuation.
_RESUME_EXACT = ("seed", "global_batch_size", "max_steps", "resolution", "frames", "frame_stride",
                 "data", "lr", "warmup_frac", "min_lr")


def resume_differences(saved: dict, args) -> list[str]:
    """Arguments whose change since the checkpoint breaks an exact resume, as ``a -> b``."""
    return [f"--{k.replace('_', '-')} {saved[k]} -> {getattr(args, k)}" for k in _RESUME_EXACT
            if k in saved and saved[k] != getattr(args, k)]


def check_resume_model(checkpoint: Path, config: ViTokConfig, asked: str) -> None:
    """A checkpoint of another model (size, channels, patch, ...) cannot be resumed into this
    run: say which config fields differ and how to get on, before any weight is loaded.
    ``asked`` says where this run's model comes from (``--model S-B/16 --channels 16``)."""
    from vitok_fast.pretrained import CONFIG_FILE

    saved = ViTokConfig.from_dict(json.loads((Path(checkpoint) / CONFIG_FILE).read_text()))
    changed = saved.differences(config)
    if changed:
        raise cli.UserError(
            f"cannot resume from {checkpoint}: it holds {saved.name} with {saved.channels} "
            f"channels, this run asks for {config.name} with {config.channels} ({asked}); "
            f"differing config fields: {'; '.join(changed)}. Use the run's own settings, "
            f"another --out, or --resume '' to start fresh in this one")


def restore_run_state(state: dict, args, guard: "NonFiniteGuard", rank: int, main_rank: bool) -> int:
    """Restore what both stages' checkpoints share (non-finite guard, this rank's RNG) and
    return the step; warn when changed settings make the resume inexact."""
    guard.load_state_dict(state["guard"])
    set_rng_state(state["rng"][rank % len(state["rng"])])
    changed = resume_differences(state["args"], args)
    if changed and main_rank:
        print(f"warning: resuming with changed settings ({', '.join(changed)}): the run "
              f"continues, but not exactly as the original would have", file=sys.stderr)
    return state["step"]


def accumulation_steps(global_batch: int, micro_batch: int, world: int) -> int:
    if global_batch % (micro_batch * world):
        raise ValueError(
            f"--global-batch-size {global_batch} must be a multiple of --micro-batch-size "
            f"{micro_batch} x world size {world} = {micro_batch * world}")
    return global_batch // (micro_batch * world)


def autocast_dtype(args, device: torch.device) -> torch.dtype:
    name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    return torch.bfloat16 if name == "bf16" else torch.float32


def build_lpips(args, device):
    """LPIPS (VGG) before anything else runs, so a missing VGG file stops the run at once."""
    if args.lpips_weight <= 0:
        return None
    from vitok_fast.perceptual import load_lpips

    return load_lpips(args.lpips_vgg, device=device)


def tune_attention(model: nn.Module, args, device: torch.device, dtype: torch.dtype,
                   main_rank: bool):
    """With ``--attention-backend auto`` on CUDA: check and time the attention backends once
    for this run's shapes, before compiled blocks are traced, on a random batch so the data
    stream is untouched. Every rank calls it (rank 0 chooses and broadcasts each shape's
    kernel: the same on every rank); rank 0 prints the choices. Nothing to do for a pinned
    backend or on the CPU (``"auto"`` is plain SDPA there)."""
    if device.type != "cuda" or model.config.attention_backend != "auto":
        return
    size = (args.resolution,) * 2 if args.frames == 1 else (args.frames, *(args.resolution,) * 2)
    noise = torch.Generator(device).manual_seed(0)
    x = torch.rand(args.micro_batch_size, 3, *size, device=device, generator=noise) * 2 - 1
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        choices = attention.tune(model, x)
    if main_rank:
        print(f"attention backends: {({k: v['backend'] for k, v in choices.items()})}")


# -- stopping on a signal -----------------------------------------------------------------


class StopOnSignal:
    """Preemption-safe training. Once :meth:`arm` has been called, SIGINT (Ctrl-C), SIGTERM
    (kill, a scheduler's preemption) and SIGUSR1 (SLURM's warning before the time limit) only
    set a flag; the loop finishes its step, saves a checkpoint through its usual path and
    calls :meth:`exit`, which prints the command that resumes and exits with 128 + the
    signal's number: 130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1 (Linux numbering).
    A second SIGINT exits at once (status 130) without saving: the last checkpoint stays.

        def main(argv=None):
            with StopOnSignal() as stop:      # restores the previous handlers on the way out
                return train(argv, stop)

        def train(argv, stop):
            ...set-up: process group, model, checkpoint...
            stop.arm()                        # before the data-loader workers fork: they
            batches = iter(loader)            # inherit the handlers and keep serving
            while step < max_steps:
                ...one step...
                if stop.agreed(device):       # every rank, every step
                    break
            stop.exit_if_stopped(step, max_steps, saved_at, checkpoint, logger, out_dir,
                                 __file__, argv, main_rank)   # saves, says how to resume, exits

    Before :meth:`arm` the signals keep their usual effect, so that a job stuck in set-up
    (a rendezvous, a slow file system) still dies at once. Under torchrun a signal may reach
    one rank only, or reach ranks in different steps; :meth:`agreed` all-reduces the flag
    (one 4-byte MAX per step) so that every rank stops after the same step. Outside the main
    thread (no signal handlers there) it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None  # the first signal this process got
        self.step: int | None = None  # the last step finished (TrainingRun.tick), for errors
        self.stopped_by: int | None = None  # the signal every rank agreed to stop on
        self.interrupts = 0
        self._previous = {}

    def __enter__(self) -> "StopOnSignal":
        return self

    def arm(self) -> None:
        """From now on a signal stops the run after the current step."""
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if exc is not None and D.peer_failure(exc):
            self.lost_peer(exc)

    def lost_peer(self, exc: BaseException) -> None:
        """Another rank died or went silent (a collective or the rendezvous ran past
        ``--dist-timeout``, a connection closed): one line naming this rank and the step,
        then exit 1 at once, without waiting on the process group, so that ``torchrun
        --max-restarts`` restarts the job (from the last checkpoint) or the scheduler
        requeues it. No checkpoint: the step cannot finish without its peers."""
        where = f"in step {self.step + 1}" if self.step is not None else "during set-up"
        reason = cli.first_sentence(exc, 200)
        sys.stdout.flush()
        print(f"\nerror: rank {os.environ.get('RANK', '0')} lost contact with the other ranks "
              f"{where} ({type(exc).__name__}: {reason}); exiting so that torchrun "
              f"--max-restarts or the scheduler can restart the job from the last checkpoint",
              file=sys.stderr, flush=True)
        os._exit(1)  # the process group's clean-up could wait on the silent peer

    def _handle(self, signum, frame) -> None:
        # os.write, not print: the handler may interrupt a print on the same stream, and a
        # buffered stream refuses to be re-entered.
        loud = os.environ.get("RANK", "0") == "0"
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                if loud:
                    os.write(2, b"\nsecond SIGINT: exiting now, without a checkpoint (the last "
                                b"saved one stays)\n")
                os._exit(128 + signal.SIGINT)
        if self.signum is None:
            self.signum = signum
            if loud:
                os.write(2, f"\n{signal.Signals(signum).name}: finishing this step, then saving "
                            f"a checkpoint (Ctrl-C again to exit at once)\n".encode())

    @property
    def requested(self) -> bool:
        """A signal reached this process (this rank only: see :meth:`agreed`)."""
        return self.signum is not None

    @property
    def stopped(self) -> bool:
        """:meth:`agreed` said stop: true on every rank after the same step."""
        return self.stopped_by is not None

    @property
    def exit_code(self) -> int:
        return 128 + int(self.stopped_by or self.signum)

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank had been signalled when it got here (a collective:
        every rank calls it at the same point of each step). The flag is read once: a signal
        that lands during the all-reduce counts at the next step, on every rank alike. The
        exit code follows the largest signal number."""
        import torch.distributed as dist

        signum = self.signum or 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([signum], dtype=torch.int32, device=device)
            signum = int(D.all_max(flag).item())
        if signum:
            self.stopped_by = signum
        return bool(signum)

    def exit(self, step: int, checkpoint, command: str, main_rank: bool = True):
        """Say where the run stopped and how to continue it; exit with 128 + signal."""
        if main_rank:
            print(f"stopped by {signal.Signals(self.stopped_by).name} after step {step}: "
                  f"checkpoint {checkpoint}\nto resume: {command}", file=sys.stderr, flush=True)
        raise SystemExit(self.exit_code)

    def exit_if_stopped(self, step: int, max_steps: int, saved_at: int, checkpoint, logger,
                        out_dir, script, argv, main_rank: bool) -> None:
        """After the loop: if the ranks agreed to stop before ``max_steps``, save the
        checkpoint of ``step`` (unless the loop just saved it), close the logs and the process
        group, and :meth:`exit`. A stop in the last step lets the run finish normally."""
        if not self.stopped or step >= max_steps:
            return
        if saved_at != step:
            checkpoint(step)
        logger.close()
        D.cleanup()
        ckpt = Path(out_dir) / step_dir_name(step)
        self.exit(step, ckpt, resume_command(script, argv, ckpt), main_rank)


def already_finished(step: int, max_steps: int, out_dir, main_rank: bool) -> bool:
    """A resumed run with no step left says so (rank 0) and releases the process group."""
    if step < max_steps:
        return False
    if main_rank:
        print(f"run already finished at step {step} ({out_dir}); nothing to do")
    D.cleanup()
    return True


def resume_command(script, argv: list[str] | None, checkpoint) -> str:
    """The command line that continues this run from ``checkpoint``: the same arguments
    (``argv``, default the command line's) with ``--resume`` set, under the same torchrun
    layout if launched by torchrun."""
    args, skip = [], False
    for a in sys.argv[1:] if argv is None else argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            args.append(a)
    script = Path(script)
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    tail = shlex.join([str(script), *args, "--resume", str(checkpoint)])
    per_node = os.environ.get("LOCAL_WORLD_SIZE")
    if per_node is None:
        return f"python {tail}"
    nodes = int(os.environ.get("WORLD_SIZE", per_node)) // int(per_node)
    if nodes == 1:
        return f"torchrun --standalone --nproc-per-node {per_node} {tail}"
    return (f"torchrun --nnodes {nodes} --nproc-per-node {per_node} <your --rdzv-* options> "
            f"{tail}   (on every node)")


# -- optimizer and schedule -----------------------------------------------------------------


def peak_lr(args) -> float:
    """[paper] 1e-4 per 256 samples, counting every frame of a clip (batch * frames / 256)."""
    return args.lr if args.lr is not None else 1e-4 * args.global_batch_size * args.frames / 256


def build_optimizer(module: nn.Module, lr: float, weight_decay: float, device: torch.device,
                    betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW [paper: betas (0.9, 0.95), wd 1e-4]; no decay on norms and biases (1-d tensors),
    fused on CUDA."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def cosine_schedule(optimizer, peak: float, total_steps: int, warmup_frac: float = 0.03,
                    min_lr: float = 1e-5):
    """Linear warm-up over ``warmup_frac`` of the steps, then cosine to ``min_lr``
    [authors' code]. If the peak is below ``min_lr`` (tiny batches) the floor is the peak."""
    warmup = max(1, round(warmup_frac * total_steps))
    floor = min(min_lr, peak)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return (floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))) / peak

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class NonFiniteGuard:
    """Skip steps whose loss or gradient norm is NaN/inf; stop after ``limit`` in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.skipped = limit, 0, 0

    def check(self, loss: float, grad_norm: float, step: int) -> bool:
        """True if the step may be applied."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"{self.in_a_row} non-finite steps in a row (last at step {step}: loss {loss}, "
                f"grad norm {grad_norm}); stopping. Lower --lr, use --dtype fp32 to rule out "
                f"bf16 overflow, or resume from an earlier checkpoint.")
        return False

    def state_dict(self):
        return {"in_a_row": self.in_a_row, "skipped": self.skipped}

    def load_state_dict(self, s):
        self.in_a_row, self.skipped = s["in_a_row"], s["skipped"]


class EMA:
    """An exponential moving average of a module's parameters, kept in fp32 in a full copy
    of ``model`` so that it can be evaluated and saved as a ViTok [paper: decay 0.9999,
    stage 2 only]. ``track`` picks the sub-module whose parameters are averaged."""

    def __init__(self, model: nn.Module, decay: float, track: str = "decoder"):
        self.decay, self.track = decay, track
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.model.get_submodule(self.track).parameters())
        params = list(model.get_submodule(self.track).parameters())
        torch._foreach_lerp_(ema_params, [p.detach().float() for p in params], 1.0 - self.decay)


def noise_seed(seed: int, step: int, chunk: int) -> int:
    """The posterior-sampling seed of micro-batch ``chunk`` (= micro index * world + rank) of
    ``step``: a pure function of the global sample positions, so 1 process x k micro-batches
    and k processes x 1 draw the same noise, and a resumed run the same as an uninterrupted
    one."""
    return int(np.random.SeedSequence([seed, step, chunk, 7]).generate_state(1)[0])


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- throughput and MFU --------------------------------------------------------------------


def model_macs(config: ViTokConfig, frames: int, resolution: int) -> int:
    """Multiply-accumulates of one forward pass on one sample, from the same counter as
    ``bench/flops.py`` (FlopCounterMode on the meta device; S-B/16 at 256p: 34.7 G)."""
    from vitok_fast.flops import count_vitok

    return count_vitok(config, resolution, frames)["total"]["macs"]


# Dense bf16 tensor-core peaks in FLOP/s (vendor data sheets), for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
                   "L40S": 362e12, "A10G": 70e12, "RTX 4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


class Throughput:
    """Samples/s over the steps since the last call, and the model FLOPs utilisation:
    MFU = 3 x 2 x MACs (forward + backward) x samples/s / peak, model only (LPIPS and the
    discriminator are not counted: they are overhead)."""

    def __init__(self, macs_per_sample: int, device: torch.device, world: int,
                 trained_fraction: float = 1.0):
        self.flops_per_sample = 2 * macs_per_sample * (1 + 2 * trained_fraction)
        self.peak = peak_flops(device)
        self.world, self.device = world, device
        self.t0, self.samples, self.history = time.perf_counter(), 0, []

    def tick(self, samples: int) -> None:
        self.samples += samples

    def rate(self) -> tuple[float, float | None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        per_s = self.samples / max(now - self.t0, 1e-9)
        self.t0, self.samples = now, 0
        mfu = per_s * self.flops_per_sample / (self.peak * self.world) if self.peak else None
        self.history.append(per_s)
        return per_s, mfu


def write_bench(path, args, throughput: Throughput, device, world: int, skip_first: int = 1):
    """The ``--bench-out`` record: median samples/s over the logged windows after the first
    ``skip_first`` (compile and warm-up), MFU, peak memory and the run's settings, as JSON.
    The benchmark driver (bench/train_throughput.py) adds the commit it measured."""
    rates = throughput.history[skip_first:] or throughput.history
    per_s = float(np.median(rates)) if rates else float("nan")
    mfu = per_s * throughput.flops_per_sample / (throughput.peak * world) if throughput.peak else None
    record = {
        "name": Path(path).stem, "model": args.model, "resolution": args.resolution,
        "frames": args.frames, "global_batch": args.global_batch_size,
        "micro_batch": args.micro_batch_size, "world": world,
        "compile": args.compile, "kernels": not args.no_kernels,
        "activation_checkpointing": args.activation_checkpointing,
        "lpips": args.lpips_weight > 0, "dtype": str(autocast_dtype(args, device)),
        "images_per_s_total": per_s, "images_per_s_per_gpu": per_s / world, "mfu": mfu,
        "mfu_counts": "model fwd+bwd matmuls and attention (6 x MACs); LPIPS not counted",
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda" else None,
        "windows": rates, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else "cpu", "torch": torch.__version__, "triton": _triton_version(),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda p: Path(p).write_text(json.dumps(record, indent=2) + "\n"))
    return record


def _triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


# -- held-out evaluation and logging (rank 0 writes) ---------------------------------------


def image_data(args, device: torch.device):
    """The autoencoder stages' data: the training stream of ``--data`` and the held-out
    batch of ``--val-data`` on ``device`` (None without one); a bad path, pattern or file
    is a user error naming its option. A folder given without ``--val-data`` gives up a
    fixed slice of its files (1%, at least 4; :func:`vitok_fast.data.split_heldout`) as the
    held-out set, excluded from training and reported; ``args.heldout`` describes it."""
    from vitok_fast.data import UnreadableItem, make_dataset, split_heldout

    with cli.option("--data", args.data):
        train_set = make_dataset(args.data, args.resolution, args.frames,
                                 frame_stride=args.frame_stride, train=True, seed=args.seed)
    args.heldout = args.val_data
    if args.val_data is None:
        total = len(getattr(train_set, "files", ()))
        train_set, held = split_heldout(train_set)
        if held is not None:
            batch = []
            for i in range(len(held)):  # the first readable ones, centre-cropped
                try:
                    batch.append(held[i])
                except UnreadableItem:
                    continue
                if len(batch) == args.val_images:
                    break
            args.heldout = (f"a held-out slice of --data: {len(held.files)} of its {total} files, "
                            f"excluded from training")
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"no --val-data: holding out {len(held.files)} of the {total} files of "
                      f"{args.data} (evenly spaced, excluded from training) for the held-out "
                      f"PSNR and sample grids (--val-data '' for none); e.g. {held.files[0]}",
                      file=sys.stderr)
            return train_set, torch.stack(batch).to(device) if batch else None
    with cli.option("--val-data", args.val_data):
        val_batch = heldout_batch(args, args.val_images)
    return train_set, (val_batch.to(device) if val_batch is not None else None)


def heldout_batch(args, n: int) -> torch.Tensor | None:
    """The first ``n`` held-out samples, centre-cropped: the same every evaluation."""
    from vitok_fast.data import make_dataset

    source = args.val_data
    if not source:
        return None
    ds = make_dataset(source, args.resolution, args.frames, frame_stride=args.frame_stride,
                      train=False, seed=args.seed)
    items = [x for _, x in zip(range(n), ds)]  # the first n readable items, none substituted
    return torch.stack(items)


@torch.no_grad()
def evaluate(model: nn.Module, batch: torch.Tensor, dtype: torch.dtype):
    """Reconstruct ``batch`` from the posterior mean; returns (mean PSNR in dB, recon)."""
    was_training = model.training
    model.eval()
    with torch.autocast(batch.device.type, dtype=dtype, enabled=dtype != torch.float32):
        recon, _ = model(batch, sample=False)
    model.train(was_training)
    recon = recon.float().clamp(-1, 1)
    return float(psnr(batch, recon).mean()), recon


def save_grid(path, inputs: torch.Tensor, recon: torch.Tensor) -> None:
    """A PNG: each row an input beside its reconstruction, captioned with the
    reconstruction's PSNR (videos: a row of input frames over a row of reconstructed frames,
    per clip)."""
    from vitok_fast.media import save_sample_grid

    if inputs.ndim == 4:
        scores = psnr(inputs.float().cpu(), recon.float().cpu().clamp(-1, 1))
        pairs = torch.stack([inputs.float().cpu(), recon.float().cpu()], 1).flatten(0, 1)
        captions = [c for s in scores.tolist() for c in ("input", f"{s:.2f} dB")]
        save_sample_grid(path, pairs, len(inputs), captions=captions)
        return
    from PIL import Image

    rows = [torch.cat(list(clip.unbind(1)), dim=2) for pair in zip(inputs, recon)
            for clip in pair]  # (3, H, T*W)
    grid = torch.cat(rows, dim=1)
    pixels = ((grid.float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the rows of ``metrics.jsonl`` at steps <= ``step`` (none for ``step`` 0, a fresh
    start), rewriting it atomically; a torn last line is dropped too. Returns the rows
    dropped."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            row_step = None
        if step and row_step is not None and row_step <= step:
            keep.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(keep)))
    return dropped


class RunLogger:
    """Rank 0's view of a run: a tqdm bar, TensorBoard scalars, ``metrics.jsonl`` (one line
    per logged step) and ``loss.png``. Other ranks get a logger that does nothing.

    A run resumed at step ``start`` continues the log of the checkpoint it resumed: rows
    logged after that step (by the run that went on past its last checkpoint before it
    died) are dropped from ``metrics.jsonl``, atomically, and TensorBoard is told to purge
    them (``purge_step``); the resumed run logs those steps again. A fresh start
    (``start`` 0) begins both logs empty."""

    def __init__(self, out_dir, active: bool, start: int, total: int, desc: str):
        self.active, self.out_dir = active, Path(out_dir)
        self.writer = self.bar = None
        if not active:
            return
        from tqdm import tqdm

        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)
        dropped = truncate_metrics(self.out_dir / "metrics.jsonl", start)
        if dropped:
            self.print(f"metrics.jsonl: dropped {dropped} row(s) logged after step {start}, "
                       f"the step this run continues from")
        try:
            from torch.utils.tensorboard import SummaryWriter

            # Events at steps >= purge_step written before are hidden from TensorBoard.
            self.writer = SummaryWriter(str(self.out_dir / "tb"),
                                        purge_step=start + 1 if start else 0)
        except ImportError:
            self.print("tensorboard is not installed: scalars go to metrics.jsonl only "
                       "(pip install tensorboard)")
        self.metrics = open(self.out_dir / "metrics.jsonl", "a")

    def print(self, message: str) -> None:
        if self.active:
            (self.bar.write if self.bar is not None else print)(message)

    def step(self, n: int = 1) -> None:
        if self.active:
            self.bar.update(n)

    def log(self, step: int, scalars: dict, bar: dict | None = None) -> None:
        if not self.active:
            return
        if bar:
            self.bar.set_postfix(bar, refresh=False)
        if self.writer is not None:
            for key, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(key, value, step)
        self.metrics.write(json.dumps({"step": step, **scalars}) + "\n")
        self.metrics.flush()

    def plot(self) -> None:
        """``loss.png``: each logged scalar under train/ and val/ against the step."""
        if not self.active:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in open(self.out_dir / "metrics.jsonl")]
        keys = sorted({k for r in rows for k in r if k.startswith(("train/", "val/"))})
        if not keys:
            return
        fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2 * len(keys)), sharex=True,
                                 squeeze=False)
        for ax, key in zip(axes[:, 0], keys):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            ax.plot(*zip(*pts))
            ax.set_ylabel(key, fontsize=8)
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        fig.savefig(self.out_dir / "loss.png", dpi=80)
        plt.close(fig)

    def close(self) -> None:
        if self.active:
            self.bar.close()
            if self.writer is not None:
                self.writer.close()
            self.metrics.close()
