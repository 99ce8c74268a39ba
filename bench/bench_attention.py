"""Benchmark the attention backends at ViTok's shapes: time and TFLOP/s, forward and
forward+backward, and the winner per shape.

On an H100 (or any CUDA GPU):

    python bench/bench_attention.py
    # -> bench/results/attention_<gpu>.json and attention_<gpu>.png, and a markdown table

Shapes: 12 heads x 64 (the S and B blocks) and 16 heads x 72 (L); 256, 1024 and 4096
tokens (256p and 512p images at p=16, 1024p or 16-frame video); the batch is
``--tokens / N`` (default 131072 tokens: 512 x 256, 128 x 1024, 32 x 4096), enough
(batch x heads) tiles to keep every SM of an H100 busy. q and k are contiguous (B, H, N, D)
as the RoPE kernel writes them and v is the model's permuted view of the packed qkv
projection, so each backend pays for whatever copies the model's layout costs it.

FLOP convention (FlashAttention's benchmarks): forward = 4 * B * H * N^2 * D (the two
matmuls Q K^T and P V, 2 FLOPs per multiply-add), backward = 2.5 x forward (five matmuls;
the recomputation of the scores is not counted), so forward+backward = 3.5 x forward.
softmax and exp are not counted. Times are medians from triton.testing.do_bench (CUDA
events, L2 flushed between calls). Every backend is first checked once per shape with
``vitok_fast.attention.check_backend``: forward and backward on the full tensors against
fp32 math, within the derived bound (``max_rel_err``, ``bound``, ``worst``; see
docs/attention.md); a backend that cannot run here or is wrong gets an ``error`` and no time.
For each shape the JSON also records what the opt-in ``"auto"`` picks, timed by
vitok_fast.attention's own (shorter) timer, next to the winner measured here.

On a CPU it runs tiny shapes (sdpa, flash, math) to exercise the code path; those times say
nothing about a GPU, and nothing is written unless ``--out-dir`` is given (then
``attention_cpu.json``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from vitok_fast import attention as A
from vitok_fast.fileio import atomic_write
from vitok_fast.benchmarking import git_commit, time_call
from vitok_fast.training import peak_flops

ROOT = Path(__file__).resolve().parents[1]
HEADS = ((12, 64), (16, 72))  # (heads, head dim): S/B and L [paper Table 1]
GPU_TOKENS = (256, 1024, 4096)
GPU_TOKENS_PER_BATCH = 131072
CPU_HEADS = ((2, 64), (2, 72))
CPU_TOKENS = (16, 64)
CPU_BATCH = 2
GPU_BACKENDS = ("sdpa", "flash", "cudnn", "efficient", "fa4")  # "math": --backends, memory-heavy
CPU_BACKENDS = ("sdpa", "flash", "math")
FLOP_CONVENTION = ("FlashAttention's: forward 4*B*H*N^2*D (QK^T and PV, 2 FLOPs per MAC); "
                   "backward 2.5x forward; forward+backward 3.5x forward; softmax not counted")


def attention_flops(batch: int, heads: int, tokens: int, head_dim: int, mode: str) -> int:
    forward = 4 * batch * heads * tokens**2 * head_dim
    return forward if mode == "fwd" else forward * 7 // 2


def make_inputs(batch, heads, tokens, head_dim, device, dtype, grad: bool):
    """q, k contiguous (B, H, N, D); v a (B, H, N, D) view of a (B, N, 3, H, D) qkv buffer.
    With ``grad``, q, k and the buffer require grad (autograd.grad w.r.t. the view v stops
    at v: the view's own backward, which is not attention, is not timed)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    q, k = rnd(batch, heads, tokens, head_dim), rnd(batch, heads, tokens, head_dim)
    packed = rnd(batch, tokens, 3, heads, head_dim)
    for t in (q, k, packed):
        t.requires_grad_(grad)
    return q, k, packed[:, :, 2].transpose(1, 2)


def _case_fn(backend, q, k, v, grad_out):
    call = A._CALLS[backend]
    if grad_out is None:
        return lambda: call(q, k, v)
    return lambda: torch.autograd.grad(call(q, k, v), (q, k, v), grad_out)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def shapes(device: torch.device, tokens_per_batch: int):
    """(batch, heads, tokens, head dim) for every benchmarked shape."""
    if device.type != "cuda":
        return [(CPU_BATCH, h, n, d) for h, d in CPU_HEADS for n in CPU_TOKENS]
    return [(max(1, tokens_per_batch // n), h, n, d) for h, d in HEADS for n in GPU_TOKENS]


def run(device: torch.device, dtype: torch.dtype, backends, tokens_per_batch: int,
        out_dir: Path | None, plot: bool = True) -> dict:
    peak = peak_flops(device) if dtype in (torch.bfloat16, torch.float16) else None
    results, winners = [], []
    todo = [(s, mode) for s in shapes(device, tokens_per_batch) for mode in ("fwd", "fwd+bwd")]
    checks = {}  # (shape, backend) -> check_backend's verdict: forward+backward, once per shape
    for (B, H, N, D), mode in tqdm(todo, desc="attention", unit="shape"):
        grad = mode == "fwd+bwd"
        q, k, v = make_inputs(B, H, N, D, device, dtype, grad)
        grad_out = torch.randn(B, H, N, D, device=device, dtype=dtype) if grad else None
        flops = attention_flops(B, H, N, D, mode)
        shape = f"{B}x{H}x{N}x{D}"
        for backend in backends:
            entry = dict(shape=shape, batch=B, heads=H, tokens=N, head_dim=D, mode=mode,
                         backend=backend, flops=flops)
            if (shape, backend) not in checks:
                checks[shape, backend] = A.check_backend(backend, q, k, v)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            check = checks[shape, backend]
            if not check["ok"]:
                entry["error"] = check["error"]
                if check["supported"]:
                    entry.update(max_rel_err=check["max_rel_err"], bound=check["bound"],
                                 worst=check["worst"])
                results.append(entry)
                continue
            entry.update(max_rel_err=check["max_rel_err"], bound=check["bound"], worst=check["worst"])
            if device.type == "cuda":
                torch.cuda.nvtx.range_push(f"attention/{backend}/{mode}/{shape}")
            try:
                seconds = time_call(_case_fn(backend, q, k, v, grad_out), device)
            except Exception as e:  # noqa: BLE001 - a backend failing must not end the run
                entry["error"] = f"{type(e).__name__}: {e}"[:300]
            else:
                entry.update(seconds=seconds, tflop_per_s=flops / seconds / 1e12)
                if peak:
                    entry["pct_peak_flops"] = 100 * flops / seconds / peak
            finally:
                if device.type == "cuda":
                    torch.cuda.nvtx.range_pop()
                    torch.cuda.empty_cache()
            results.append(entry)
        timed = [r for r in results if r["shape"] == shape and r["mode"] == mode and "seconds" in r]
        row = dict(shape=shape, mode=mode, winner=min(timed, key=lambda r: r["seconds"])["backend"]
                   if timed else None)
        if device.type == "cuda":  # what the opt-in "auto" picks here, with its own timer
            with torch.set_grad_enabled(grad):
                tuned = A.autotune(q, k, v)
            row.update(auto_choice=tuned["backend"], auto_compiled_choice=tuned["compiled"],
                       auto_ms=tuned["ms"], auto_errors=tuned["errors"])
        else:
            row["auto_choice"] = "sdpa"  # the model's rule off CUDA: plain SDPA, untimed
        winners.append(row)
        del q, k, v, grad_out

    name = _device_name(device)
    import triton
    report = dict(
        device=name, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
        flash_attn_4=_version("flash-attn-4"), fa4_importable=A.fa4_available()
        if device.type == "cuda" else None,
        python=sys.version.split()[0], commit=git_commit(),
        dtype=str(dtype).replace("torch.", ""), tokens_per_batch=tokens_per_batch
        if device.type == "cuda" else None,
        flop_convention=FLOP_CONVENTION, peak_flops=peak,
        timing="triton.testing.do_bench median (CUDA events, L2 flushed)" if device.type == "cuda"
        else "median of 5 perf_counter calls after a warm-up (CPU: code path only)",
        results=results, winners=winners)
    print(markdown_table(report))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = "attention_" + (_slug(name) if device.type == "cuda" else "cpu")
        json_path = out_dir / f"{stem}.json"
        atomic_write(json_path, lambda p: Path(p).write_text(json.dumps(report, indent=1) + "\n"))
        print(f"wrote {json_path}")
        if plot:
            png = out_dir / f"{stem}.png"
            atomic_write(png, lambda p: _plot(report, p))
            print(f"wrote {png}")
    return report


def markdown_table(report) -> str:
    rows = ["| shape (BxHxNxD) | mode | backend | time (ms) | TFLOP/s | max rel err (bound) |",
            "|---|---|---|---|---|---|"]
    for r in report["results"]:
        if "error" in r:
            rows.append(f"| {r['shape']} | {r['mode']} | {r['backend']} | error: "
                        f"{r['error'][:60]} | | |")
            continue
        rows.append(f"| {r['shape']} | {r['mode']} | {r['backend']} | {r['seconds'] * 1e3:.3f} | "
                    f"{r['tflop_per_s']:.3g} | {r['max_rel_err']:.2g} ({r['bound']:.2g}) |")
    rows += ["", "| shape | mode | fastest here | auto picks |", "|---|---|---|---|"]
    rows += [f"| {w['shape']} | {w['mode']} | {w['winner']} | {w.get('auto_choice', '-')} |"
             for w in report["winners"]]
    return "\n".join(rows)


def _plot(report, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if "seconds" in r]
    backends = list(dict.fromkeys(r["backend"] for r in report["results"]))
    shapes_ = list(dict.fromkeys(r["shape"] for r in report["results"]))
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(shapes_)), 4.5), sharey=True)
    width = 0.8 / max(1, len(backends))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for j, backend in enumerate(backends):
            xs, ys = [], []
            for i, shape in enumerate(shapes_):
                match = [r for r in ok if (r["shape"], r["mode"], r["backend"]) == (shape, mode, backend)]
                if match:
                    xs.append(i + (j - (len(backends) - 1) / 2) * width)
                    ys.append(match[0]["tflop_per_s"])
            ax.bar(xs, ys, width, label=backend)
        ax.set_xticks(range(len(shapes_)))
        ax.set_xticklabels(shapes_, fontsize=7, rotation=30)
        ax.set_title(mode)
        ax.set_xlabel("B x H x N x D")
    axes[0].set_ylabel("TFLOP/s (forward 4BHN^2D; backward 2.5x)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"attention, {report['dtype']}, {report['device']}: torch {report['torch']}, "
                 f"commit {str(report['commit'])[:12]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                    help="default: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--backends", default=None,
                    help=f"comma list from {[b for b in A.BACKENDS if b != 'auto']} "
                         f"(default: {','.join(GPU_BACKENDS)} on a GPU, {','.join(CPU_BACKENDS)} on the CPU)")
    ap.add_argument("--tokens", type=int, default=GPU_TOKENS_PER_BATCH,
                    help="tokens per batch on a GPU: batch = tokens / N")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="default: bench/results on a GPU; on the CPU nothing is written unless given")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given, but torch sees no CUDA device; use --device cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    backends = tuple(args.backends.split(",")) if args.backends else (
        GPU_BACKENDS if device.type == "cuda" else CPU_BACKENDS)
    for b in backends:
        if b == "auto" or b not in A.BACKENDS:
            raise SystemExit(f"--backends: unknown backend {b!r}; expected names from "
                             f"{[x for x in A.BACKENDS if x != 'auto']}")
    if args.tokens <= 0:
        raise SystemExit(f"--tokens must be positive, got {args.tokens}")
    out_dir = args.out_dir if args.out_dir is not None else (
        ROOT / "bench" / "results" if device.type == "cuda" else None)
    return run(device, dtype, backends, args.tokens, out_dir, plot=not args.no_plot)


if __name__ == "__main__":
    main()
