"""Eager against torch.compile in one run: a training step's forward and backward for each
model, on the reference path and on the kernel path (the fused ops as custom ops; on the CPU
under Triton's interpreter, called by Inductor's graph as opaque ops).

    python bench/compile_paths.py --json bench/results/compile_cpu.json
    python bench/compile_paths.py --device cuda --models S-B/16 --resolution 256 --batch 16 \
        --reps 10 --json bench/results/compile_paths_<gpu>.json      # bench/gpu.sh's step

For each (model, path): the first compiled call's seconds (tracing + Inductor's C++ build;
with a warm Inductor cache less), then the median seconds of ``--reps`` steps, eager and
compiled, and their ratio. Both paths' figures come from one process, one after the other,
so they are comparable as ratios; a CPU may be shared with other jobs (the record holds the
load average before and after). CPU kernel-path times measure Triton's interpreter, which
says nothing about a GPU; on CUDA each step is timed between device synchronisations.
"""

from __future__ import annotations

from vitok_fast.interpret import interpret_without_cuda

interpret_without_cuda()  # before anything imports triton

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from vitok_fast import cli  # noqa: E402


def train_step(model, x):
    model.zero_grad(set_to_none=True)
    recon, posterior = model(x, sample=False)
    loss = recon.float().square().mean() + posterior.kl()
    loss.backward()
    return loss.detach()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn, reps, device):
    samples = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure(name: str, use_kernels: bool, batch: int, resolution: int, reps: int, backend: str,
            device=torch.device("cpu")):
    from vitok_fast.model import ViTok

    torch.manual_seed(0)
    model = ViTok.from_name(name, use_kernels=use_kernels).to(device)
    x = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    row = {"model": name, "path": "kernels" if use_kernels else "reference", "batch": batch,
           "resolution": resolution}
    try:
        eager_loss = train_step(model, x)  # warm-up
        row["eager_s"] = _seconds(lambda: train_step(model, x), reps, device)
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        t0 = time.perf_counter()
        compiled_loss = train_step(compiled, x)
        _sync(device)
        row["first_compiled_call_s"] = time.perf_counter() - t0
        row["compiled_s"] = _seconds(lambda: train_step(compiled, x), reps, device)
        row["speedup"] = row["eager_s"] / row["compiled_s"]
        row["loss_rel_diff"] = float((compiled_loss - eager_loss).abs() / eager_loss.abs())
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - a path that cannot compile is a result too
        row["status"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> dict:
    p = cli.ArgumentParser(prog="bench/compile_paths.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="T-T/8,S-B/16", help="comma-separated model names")
    p.add_argument("--paths", default="reference,kernels", help="reference, kernels or both")
    p.add_argument("--batch", type=cli.positive_int, default=2)
    p.add_argument("--resolution", type=cli.positive_int, default=128)
    p.add_argument("--reps", type=cli.positive_int, default=3)
    p.add_argument("--threads", type=cli.positive_int, default=1,
                   help="torch threads (1: the interpreter's Python and torch's pool would "
                        "otherwise fight over the cores)")
    p.add_argument("--backend", default="inductor",
                   help="torch.compile backend (aot_eager: the graphs without Inductor's codegen)")
    p.add_argument("--device", type=cli.device, default="cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    paths = [s.strip() for s in args.paths.split(",")]
    if not set(paths) <= {"reference", "kernels"}:
        raise cli.UserError(f"--paths: expected reference and/or kernels, given {args.paths!r}")
    from vitok_fast.benchmarking import git_commit
    from vitok_fast.config import ViTokConfig

    models = [m.strip() for m in args.models.split(",")]
    for m in models:
        with cli.option("--models", m):
            ViTokConfig.from_name(m)
            cli.check_sizes(ViTokConfig.from_name(m), resolution=args.resolution)
    torch.set_num_threads(args.threads)
    commit = git_commit()  # the code this run imports, read before it runs
    load_before = os.getloadavg()
    started = time.time()
    device = torch.device(args.device)
    rows = [measure(m, path == "kernels", args.batch, args.resolution, args.reps, args.backend, device)
            for m in models for path in paths]
    import triton

    record = {
        "what": "training step (forward + loss + backward), eager vs torch.compile(fullgraph=True)",
        "backend": args.backend, "rows": rows,
        "environment": {
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else
                       f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"{args.threads} torch thread(s)"),
            "shared_machine": "the CPU is shared with other jobs: load average (1, 5, 15 min) "
                              f"{[round(v, 2) for v in load_before]} before, "
                              f"{[round(v, 2) for v in os.getloadavg()]} after",
            "triton_interpret": os.environ.get("TRITON_INTERPRET"),
            "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "commit": commit,
            "wall_s": round(time.time() - started, 1)},
    }
    if args.json:
        from vitok_fast.fileio import atomic_write

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
        print(f"wrote {args.json}")
    return record


if __name__ == "__main__":
    cli.run(main)
