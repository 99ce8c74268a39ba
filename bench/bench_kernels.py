"""Benchmark the fused kernels against eager PyTorch, torch.compile and libraries.

On an H100 (or any CUDA GPU):

    python bench/bench_kernels.py                 # bf16, ViTok's real shapes
    # -> bench/results/kernels_<gpu>.json and kernels_<gpu>.png, and a markdown table

Per case it records the median time (CUDA events, L2 flushed: triton.testing.do_bench),
the bytes the op must move at the least, the achieved GB/s, and that as a fraction of the
peak HBM bandwidth *measured in the same run* by a 1 GiB device-to-device copy. The GEMM
ops (tubelet embed / unembed) also get TFLOP/s. Every measured call sits in an NVTX range
named ``op/impl/mode/shape`` for Nsight.

On a CPU it runs tiny shapes with our kernels in Triton's interpreter (TRITON_INTERPRET=1 is
set for you): that exercises the code path only; the times say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from pathlib import Path

from vitok_fast.interpret import interpret_without_cuda

interpret_without_cuda()  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
from tqdm import tqdm  # noqa: E402

from vitok_fast.benchmarking import cases, git_commit, measure_peak_bandwidth, time_call  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, Triton interpreter)"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def run(device: torch.device, dtype: torch.dtype, ops, impls, out_dir: Path, plot: bool = True):
    selected = [c for c in cases(device, dtype, ops=ops) if impls is None or c.impl in impls]
    if not selected:
        raise SystemExit(f"no benchmark cases match ops={ops} impls={impls}")
    peak = measure_peak_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 26))
    results = []
    for case in tqdm(selected, desc="kernels", unit="case"):
        entry = dict(op=case.op, impl=case.impl, mode=case.mode, shape=case.shape,
                     dtype=case.dtype, bytes=case.bytes, note=case.note)
        try:
            if device.type == "cuda":
                torch.cuda.nvtx.range_push(case.nvtx)
            run_case = case.make()  # its inputs exist only while it is measured
            seconds = time_call(run_case, device)
            del run_case
        except Exception as e:  # noqa: BLE001 - a library failing must not end the run
            entry["error"] = f"{type(e).__name__}: {e}"[:300]
        else:
            entry.update(seconds=seconds, gb_per_s=case.bytes / seconds / 1e9,
                         pct_peak_bw=100 * case.bytes / seconds / peak)
            if case.flops:
                entry["tflop_per_s"] = case.flops / seconds / 1e12
        finally:
            if device.type == "cuda":
                torch.cuda.nvtx.range_pop()
        results.append(entry)

    name = _device_name(device)
    report = dict(
        device=name, torch=torch.__version__, triton=triton.__version__,
        cuda=torch.version.cuda, python=sys.version.split()[0], commit=git_commit(),
        dtype=str(dtype).replace("torch.", ""), interpreted=device.type != "cuda",
        peak_bw_gb_per_s=peak / 1e9,
        peak_bw_method="device-to-device copy of 1 GiB (read + write bytes / median time)"
        if device.type == "cuda" else "host copy of 64 MiB (read + write bytes / median time)",
        results=results)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "kernels_" + (_slug(name) if device.type == "cuda" else "cpu_interpreter")
    json_path = out_dir / f"{stem}.json"
    from vitok_fast.fileio import atomic_write
    atomic_write(json_path, lambda p: Path(p).write_text(json.dumps(report, indent=1) + "\n"))
    print(f"wrote {json_path}")
    if plot:
        png = out_dir / f"{stem}.png"
        _plot(report, png)
        print(f"wrote {png}")
    print(markdown_table(report))
    return report


def markdown_table(report) -> str:
    rows = ["| op | shape | mode | impl | time (us) | GB/s | % peak BW |", "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        if "error" in r:
            rows.append(f"| {r['op']} | {r['shape']} | {r['mode']} | {r['impl']} | error | | |")
            continue
        rows.append(f"| {r['op']} | {r['shape']} | {r['mode']} | {r['impl']} | "
                    f"{r['seconds'] * 1e6:.1f} | {r['gb_per_s']:.0f} | {r['pct_peak_bw']:.0f} |")
    return "\n".join(rows)


def _plot(report, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if "error" not in r]
    groups = sorted({(r["op"], r["shape"], r["mode"]) for r in ok},
                    key=lambda g: (g[0], g[2], g[1]))
    impls = sorted({r["impl"] for r in ok}, key=lambda i: (i != "ours", i))
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(groups)), 5))
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for i, g in enumerate(groups):
            match = [r for r in ok if (r["op"], r["shape"], r["mode"]) == g and r["impl"] == impl]
            if match:
                xs.append(i + (j - (len(impls) - 1) / 2) * width)
                ys.append(match[0]["pct_peak_bw"])
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{o}\n{s}\n{m}" for o, s, m in groups], fontsize=6, rotation=90)
    ax.set_ylabel("% of measured peak bandwidth (copy)")
    ax.set_title(f"vitok_fast kernels, {report['dtype']}, {report['device']}\n"
                 f"torch {report['torch']}, triton {report['triton']}, {report['commit'][:12]}",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                    help="default: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--ops", default=None,
                    help="comma list of rms_norm,add_rms_norm,swiglu,rope,tubelet (default: all)")
    ap.add_argument("--impls", default=None,
                    help="comma list of ours,eager,torch.compile,F.rms_norm,liger,quack (default: all)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given, but torch sees no CUDA device; use --device cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("on the CPU our kernels need TRITON_INTERPRET=1 set before Python starts")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    split = lambda s: tuple(s.split(",")) if s else None
    return run(device, dtype, split(args.ops), split(args.impls), args.out_dir, plot=not args.no_plot)


if __name__ == "__main__":
    main()
