"""torch.profiler traces of one stage-1 training step and of one encode+decode, with the
model's named ranges, and the top-10 kernels by self device time.

On an H100 (or any CUDA GPU):

    python bench/profile_step.py                      # S-B/16, 256p, batch 64, bf16, kernels on
    python bench/profile_step.py --model S-L/16 --batch 32 --compile
    # -> bench/results/profiles/train_step_<gpu>.json.gz, encode_decode_<gpu>.json.gz
    #    (open in https://ui.perfetto.dev or chrome://tracing) and profile_<gpu>.json / .md
    #    (top-10 kernels and time per named range)

The training step is the real one of train/stage1.py: bf16 autocast forward,
MSE + LPIPS + 1e-3 * KL (vitok_fast.losses.reconstruction_loss), backward, gradient clipping
at 1.0, fused AdamW step (vitok_fast.training.build_optimizer). LPIPS uses a random VGG
backbone (same FLOPs as the real one, no weights file) unless --lpips-vgg PATH is given.
The encode+decode is inference: the model cast to bf16, posterior mean, no autograd.
vitok_fast.profiling.enable_ranges() is on, so the trace shows the model's ranges (embed,
attention, mlp, bottleneck, head) as record_function spans, and NVTX ranges for Nsight:

    nsys profile -t cuda,nvtx -o vitok_step python bench/profile_step.py

A few warm-up steps run before the profiled one, outside the profiler (cuDNN autotuning,
the allocator, and compilation with --compile, under which the per-block ranges may be
fused away). On a CPU it profiles a tiny model (T-T/8, 32px, batch 2, fp32, kernels in
Triton's interpreter) to exercise the code path, and the table lists CPU operators by self
CPU time instead of kernels.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import re
import shutil
from pathlib import Path

from vitok_fast.interpret import interpret_without_cuda

interpret_without_cuda()  # our kernels on the CPU: before triton loads

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from vitok_fast.fileio import atomic_write  # noqa: E402
from vitok_fast.losses import reconstruction_loss  # noqa: E402
from vitok_fast.model import ViTok  # noqa: E402
from vitok_fast.profiling import enable_ranges, ranges_enabled  # noqa: E402
from vitok_fast.benchmarking import git_commit  # noqa: E402
from vitok_fast.training import build_optimizer, clip_grad_norm  # noqa: E402

# The spans vitok_fast/model.py opens (vitok_fast.profiling.span).
MODEL_RANGES = ("embed", "attention", "mlp", "bottleneck", "head")
STEP_RANGES = ("train_step", "encode_decode")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _self_device_us(e) -> float:
    # torch >= 2.4 names it self_device_time_total; older releases self_cuda_time_total
    return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0))


def _device_us(e) -> float:
    return float(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0))


def top_ops(prof, gpu: bool, n: int = 10) -> dict:
    """The ``n`` kernels with the most self device time (GPU), or the ``n`` operators with the
    most self CPU time (CPU); our own ranges and the profiler's step markers are not ops."""
    ranges = set(MODEL_RANGES) | set(STEP_RANGES)
    events = [e for e in prof.key_averages() if e.key not in ranges
              and not e.key.startswith("ProfilerStep")]
    if gpu:
        # kernels (and memcpy / memset), not the GPU-side copies of record_function ranges
        # (ours, or torch's own such as "Optimizer.step#AdamW.step")
        events = [e for e in events if e.device_type == DeviceType.CUDA
                  and not getattr(e, "is_user_annotation", False)
                  and not e.key.startswith("Optimizer.")]
        time_of = _self_device_us
    else:
        events = [e for e in events if e.device_type == DeviceType.CPU]
        time_of = lambda e: float(e.self_cpu_time_total)  # noqa: E731
    total = sum(time_of(e) for e in events)
    ranked = sorted(events, key=time_of, reverse=True)[:n]
    return {
        "metric": "self device time (us), GPU kernels" if gpu else "self CPU time (us), CPU operators",
        "total_us": total,
        "rows": [{"name": e.key, "calls": e.count, "self_us": time_of(e),
                  "pct": 100 * time_of(e) / total if total else 0.0} for e in ranked],
    }


def range_times(prof, gpu: bool) -> dict:
    """Calls, CPU time and (GPU) device time inside each named range, children included.
    The model's ranges cover the forward pass; backward kernels run outside them, under the
    autograd nodes (``...Backward``)."""
    out = {}
    for e in prof.key_averages():
        if e.key in MODEL_RANGES or e.key in STEP_RANGES:
            r = out.setdefault(e.key, {"calls": 0, "cpu_us": 0.0, "device_us": 0.0 if gpu else None})
            if e.device_type == DeviceType.CPU:
                r["calls"] += e.count
                r["cpu_us"] += float(e.cpu_time_total)
            if gpu:  # the CPU span's kernels, or the GPU-side annotation: the larger
                r["device_us"] = max(r["device_us"], _device_us(e))
    return out


def export_trace(prof, path: Path, gzip_above_mb: float) -> Path:
    """Chrome trace JSON at ``path``; gzipped (``.json.gz``) when bigger than the threshold."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    if path.stat().st_size > gzip_above_mb * 2**20:
        gz = path.with_name(path.name + ".gz")
        with open(path, "rb") as src, gzip.open(gz, "wb") as dst:
            shutil.copyfileobj(src, dst)
        path.unlink()
        return gz
    return path


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _activities(device):
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def build(args):
    device = args.device
    model = ViTok.from_name(args.model, use_kernels=not args.no_kernels).to(device)
    if args.compile:  # as train/stage1.py: every block in place
        for transformer in (model.encoder.transformer, model.decoder.transformer):
            for block in transformer.blocks:
                block.compile()
    lpips = None
    if args.lpips_weight > 0:
        from vitok_fast.perceptual import load_lpips
        lpips = load_lpips(args.lpips_vgg, pretrained_backbone=args.lpips_vgg is not None,
                           device=device)
    return model, lpips


def pixels(args, generator) -> torch.Tensor:
    cfg_video = args.frames > 1
    R = args.resolution
    shape = (args.batch, 3, args.frames, R, R) if cfg_video else (args.batch, 3, R, R)
    return torch.rand(*shape, generator=generator, device=args.device) * 2 - 1


def _profile(fn, name: str, args):
    """``args.warmup`` unprofiled calls, then one call profiled inside a range ``name``;
    returns the profiler, the peak device memory of that call (None on the CPU) and its result."""
    device = args.device
    for _ in range(args.warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with profile(activities=_activities(device)) as prof:
        with record_function(name):
            result = fn()
        _sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return prof, peak, result


def profile_train_step(model, lpips, args):
    """Warm-up steps, then one profiled step; returns the profiler."""
    device, dtype = args.device, args.dtype
    optimizer = build_optimizer(model, 1e-4, 1e-4, device)  # [paper] AdamW, wd 1e-4
    gen = torch.Generator(device).manual_seed(0)
    x = pixels(args, gen)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            recon, posterior = model(x, generator=gen)
            loss, _ = reconstruction_loss(x, recon, posterior, lpips, lpips_weight=args.lpips_weight,
                                          kl_weight=1e-3)
        loss.backward()
        clip_grad_norm(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    prof, peak, loss = _profile(step, "train_step", args)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the profiled training step gave a non-finite loss {loss.item()}")
    del optimizer
    return prof, peak


@torch.no_grad()
def profile_encode_decode(model, args):
    device = args.device
    model.eval().to(args.dtype)  # inference as bench/bench_e2e.py runs it: weights in bf16
    gen = torch.Generator(device).manual_seed(1)
    x = pixels(args, gen).to(args.dtype)
    run = lambda: model.decode(model.encode(x).mode())  # noqa: E731
    prof, peak, out = _profile(run, "encode_decode", args)
    if out.shape != x.shape:
        raise RuntimeError(f"encode+decode returned shape {tuple(out.shape)}, expected {tuple(x.shape)}")
    return prof, peak


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"## Profiles: ViTok {s['model']}, {s['input']}, batch {s['batch']}, {s['dtype']}, "
             f"{'compiled' if s['compile'] else 'eager'}, kernels {'off' if s['no_kernels'] else 'on'}",
             "", f"{report['device']}, torch {report['torch']}, commit {str(report['commit'])[:12]}", ""]
    for part in ("train_step", "encode_decode"):
        p = report[part]
        top = p["top"]
        lines += [f"### {part.replace('_', ' ')}: top {len(top['rows'])} by {top['metric']}", "",
                  f"trace: `{p['trace']}`" + (f"; peak memory {p['peak_mem_bytes'] / 2**20:.0f} MiB"
                                              if p["peak_mem_bytes"] else ""), "",
                  "| # | kernel / op | calls | self time (us) | % |", "|---|---|---|---|---|"]
        for i, r in enumerate(top["rows"], 1):
            name = r["name"] if len(r["name"]) <= 90 else r["name"][:87] + "..."
            lines.append(f"| {i} | `{name}` | {r['calls']} | {r['self_us']:.0f} | {r['pct']:.1f} |")
        lines += ["", "| range | calls | CPU time (us) | device time (us) |", "|---|---|---|---|"]
        for name, r in p["ranges"].items():
            dev = "" if r["device_us"] is None else f"{r['device_us']:.0f}"
            lines.append(f"| {name} | {r['calls']} | {r['cpu_us']:.0f} | {dev} |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None,
                    help="T-T/8 at 32px, batch 2 (default: on without a GPU)")
    ap.add_argument("--model", default=None, help="default S-B/16 (T-T/8 with --tiny)")
    ap.add_argument("--resolution", type=int, default=None, help="default 256 (32 with --tiny)")
    ap.add_argument("--frames", type=int, default=None, help="video models: default 16")
    ap.add_argument("--batch", type=int, default=None, help="default 64 (2 with --tiny)")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                    help="autocast / inference dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile every block, as training does")
    ap.add_argument("--no-kernels", action="store_true", help="plain-PyTorch ops instead of the Triton kernels")
    ap.add_argument("--lpips-vgg", default=None, help="VGG16 weights for LPIPS (default: random backbone)")
    ap.add_argument("--lpips-weight", type=float, default=1.0, help="eta; 0 drops LPIPS from the step")
    ap.add_argument("--warmup", type=int, default=None, help="unprofiled steps first (default 3; 1 with --tiny)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results" / "profiles")
    ap.add_argument("--gzip-above-mb", type=float, default=5.0, help="gzip traces bigger than this")
    args = ap.parse_args(argv)
    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda given, but torch sees no CUDA device; use --device cpu")
    args.tiny = (not cuda) if args.tiny is None else args.tiny
    args.model = args.model or ("T-T/8" if args.tiny else "S-B/16")
    from vitok_fast.config import ViTokConfig
    try:
        cfg = ViTokConfig.from_name(args.model)
    except ValueError as e:
        ap.error(f"--model: {e}")
    args.frames = args.frames or (16 if cfg.is_video and not args.tiny else 4 if cfg.is_video else 1)
    args.resolution = args.resolution or (32 if args.tiny else 128 if cfg.is_video else 256)
    args.batch = args.batch or (2 if args.tiny else 64)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    for name in ("resolution", "batch"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    before = ranges_enabled()
    enable_ranges(True)
    try:
        return run(args)
    finally:
        enable_ranges(before)  # callers (tests) get the process back as it was


def run(args) -> dict:
    device = args.device
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()})"
    tag = _slug(name) if device.type == "cuda" else "cpu_tiny" if args.tiny else "cpu"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model, lpips = build(args)
    inp = f"{args.resolution}x{args.resolution}" if args.frames == 1 else \
        f"{args.frames}x{args.resolution}x{args.resolution}"
    report = dict(device=name, torch=torch.__version__, commit=git_commit(), settings=dict(
        model=args.model, input=inp, batch=args.batch, dtype=str(args.dtype).replace("torch.", ""),
        compile=args.compile, no_kernels=args.no_kernels, warmup_steps=args.warmup,
        lpips="off" if args.lpips_weight <= 0 else ("VGG16 from " + args.lpips_vgg if args.lpips_vgg
                                                    else "random VGG16 backbone"),
        train_step="autocast fwd, MSE + LPIPS + 1e-3 KL, backward, clip 1.0, AdamW step",
        encode_decode="bf16 weights, posterior mean, no grad" if args.dtype != torch.float32
        else "fp32 weights, posterior mean, no grad"))
    gpu = device.type == "cuda"
    prof, peak = profile_train_step(model, lpips, args)
    report["train_step"] = dict(trace=str(export_trace(prof, args.out_dir / f"train_step_{tag}.json",
                                                       args.gzip_above_mb)),
                                peak_mem_bytes=peak, top=top_ops(prof, gpu), ranges=range_times(prof, gpu))
    del prof
    prof, peak = profile_encode_decode(model, args)
    report["encode_decode"] = dict(trace=str(export_trace(prof, args.out_dir / f"encode_decode_{tag}.json",
                                                          args.gzip_above_mb)),
                                   peak_mem_bytes=peak, top=top_ops(prof, gpu), ranges=range_times(prof, gpu))
    for part in ("train_step", "encode_decode"):  # paths relative to the repository when inside it
        p = Path(report[part]["trace"]).resolve()
        report[part]["trace"] = str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)
    md = markdown(report)
    json_path = args.out_dir / f"profile_{tag}.json"
    atomic_write(json_path, lambda p: Path(p).write_text(json.dumps(report, indent=1) + "\n"))
    atomic_write(json_path.with_suffix(".md"), lambda p: Path(p).write_text(md + "\n"))
    print(md)
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
