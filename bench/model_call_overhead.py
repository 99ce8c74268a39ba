"""ViTok's encode and decode timed against an earlier version of vitok_fast/model.py, in one run.

    python bench/model_call_overhead.py --before dd7d990          # the rev whose model.py to compare
    python bench/model_call_overhead.py --before main --model S-B/16 --size 128 --batch 1

Guards ViTok's own speed against changes made for other callers (issue 18 calls the tubelet
embed and head as modules so that diffusers' hooks see them). ``--before``'s model.py is
loaded next to the current one (both use the current ops, kernels and config), both models
get the same weights, and the two are timed interleaved, round after round, alternating which
goes first, so that a shared, noisy machine slows both alike. A third model, a second instance
of the current code, is timed with them as a control: ``control / after`` shows the noise
floor of the run (two identical models), against which ``after / before`` is read (1.0: no
change). Per variant and call the median over rounds is kept. Checks first that the models
give bit-identical outputs. CPU, one thread, the plain-PyTorch path (the CPU has no
compiled Triton), eval mode, no grad. Writes bench/results/model_call_overhead_<device>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def load_model_module(rev: str):
    """vitok_fast/model.py as of git ``rev``, imported under another name."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:vitok_fast/model.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "vitok_model_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("vitok_model_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def timed(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="main", help="git rev of the model.py to compare with")
    parser.add_argument("--model", default="T-T/8")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=20, help="calls per timing")
    parser.add_argument("--out", type=Path, default=RESULTS / "model_call_overhead_cpu.json")
    args = parser.parse_args(argv)

    from vitok_fast import ViTok
    from vitok_fast.benchmarking import git_commit

    torch.set_num_threads(1)
    torch.manual_seed(0)
    after = ViTok.from_name(args.model, use_kernels=False).eval()
    before = load_model_module(args.before).ViTok(after.config).eval()
    before.load_state_dict(after.state_dict())
    control = ViTok(after.config).eval()
    control.load_state_dict(after.state_dict())
    x = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1
    with torch.no_grad():
        z = after.encode(x).mean
        assert torch.equal(z, before.encode(x).mean), "encode differs from --before's"
        assert torch.equal(after.decode(z), before.decode(z)), "decode differs from --before's"
        assert torch.equal(control.decode(z), before.decode(z))
        models = (("before", before), ("after", after), ("control", control))
        calls = {name: {"encode": lambda m=m: m.encode(x), "decode": lambda m=m: m.decode(z)}
                 for name, m in models}
        for fns in calls.values():  # warm-up
            for fn in fns.values():
                timed(fn, 3)
        times = {name: {op: [] for op in ("encode", "decode")} for name in calls}
        names = [name for name, _ in models]
        for r in range(args.rounds):
            order = names[r % 3:] + names[:r % 3]  # each goes first, second and last in turn
            for op in ("encode", "decode"):
                for name in order:
                    times[name][op].append(timed(calls[name][op], args.calls))
        # the cost this file was written to watch, in isolation: the tubelet embed called as
        # a module (the current model) against its op called directly (the older model)
        from vitok_fast import ops
        embed, cfg, video = after.encoder.embed, after.config, x.unsqueeze(2)
        q, p = cfg.tubelet_size, cfg.patch_size
        embed_calls = {"module": lambda: embed(video, q, p, False),
                       "direct": lambda: ops.tubelet_embed(video, embed.weight, embed.bias, q, p, False)}
        embed_times = {name: [] for name in embed_calls}
        for r in range(args.rounds):
            for name in (("module", "direct") if r % 2 == 0 else ("direct", "module")):
                embed_times[name].append(timed(embed_calls[name], 10 * args.calls))
    embed_us = {name: statistics.median(t) * 1e6 for name, t in embed_times.items()}
    print(f"tubelet embed: as a module {embed_us['module']:.2f} us, the op directly "
          f"{embed_us['direct']:.2f} us")
    rows = []
    for op in ("encode", "decode"):
        b, a, c = (statistics.median(times[n][op]) for n in names)
        rows.append({"op": op, "before_ms": round(b * 1e3, 4), "after_ms": round(a * 1e3, 4),
                     "control_ms": round(c * 1e3, 4), "after_over_before": round(a / b, 4),
                     "control_over_after": round(c / a, 4)})
        print(f"{op}: before {b * 1e3:.3f} ms, after {a * 1e3:.3f} ms, after/before {a / b:.3f} "
              f"(control/after {c / a:.3f})")
    record = {"benchmark": "model_call_overhead", "model": args.model,
              "input": [args.batch, 3, args.size, args.size], "device": "cpu", "threads": 1,
              "path": "plain PyTorch (use_kernels=False), eval, no grad",
              "rounds": args.rounds, "calls_per_timing": args.calls, "statistic": "median over rounds",
              "before": args.before, "commit": git_commit(), "torch": torch.__version__,
              "python": platform.python_version(), "rows": rows,
              "embed_call_us": {name: round(us, 3) for name, us in embed_us.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
