"""Start-up time of every command's ``--help`` (issue 16: under 2 s), beside ``import torch``.

    python bench/startup.py                 # best of 3 -> bench/results/startup_cpu.json
    python bench/startup.py --repeats 5

Each command runs as its own process, as a user starts it (``python -m vitok_fast.<tool>``,
``python train/<script>.py`` and ``python -m vitok_fast.train.<script>``), ``--help`` only.
Per command: wall time and CPU time (user + system, of the child process), the best of
``--repeats`` runs (the machine may be shared: CPU time is the steadier figure), and its
ratio to a process that only does ``import torch``, which every command imported before
parsing until issue 16 and now imports after.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TOOLS = ("encode", "decode", "evaluate", "reconstruct", "latent_stats", "sample", "plots",
         "selftest", "export")
SCRIPTS = ("stage1", "stage2", "dit")


def commands() -> dict[str, list[str]]:
    found = {"import torch (reference)": ["-c", "import torch"]}
    found.update({f"-m vitok_fast.{t} --help": ["-m", f"vitok_fast.{t}", "--help"] for t in TOOLS})
    found.update({f"train/{s}.py --help": [f"train/{s}.py", "--help"] for s in SCRIPTS})
    found.update({f"-m vitok_fast.train.{s} --help": ["-m", f"vitok_fast.train.{s}", "--help"]
                  for s in SCRIPTS})
    return found


def best_of(argv: list[str], repeats: int) -> dict:
    """The run with the least CPU time: {cpu_s, wall_s}."""
    runs = []
    for _ in range(repeats):
        before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, capture_output=True)
        wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        runs.append({"cpu_s": round(cpu, 3), "wall_s": round(wall, 3)})
    return min(runs, key=lambda r: r["cpu_s"])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="runs per command (the best is kept)")
    p.add_argument("--out", type=Path, default=RESULTS / "startup_cpu.json", help="JSON to write")
    args = p.parse_args(argv)
    results = {name: best_of(cmd, args.repeats) for name, cmd in commands().items()}
    reference = results["import torch (reference)"]["cpu_s"]
    print(f"{'command':<40} {'cpu s':>6} {'wall s':>7} {'cpu / import torch':>19}")
    for name, r in results.items():
        r["cpu_vs_import_torch"] = round(r["cpu_s"] / reference, 3)
        print(f"{name:<40} {r['cpu_s']:>6.2f} {r['wall_s']:>7.2f} {r['cpu_vs_import_torch']:>19.2f}")
    from vitok_fast.benchmarking import git_commit  # after the runs: it imports torch

    record = {"device": "cpu", "machine": platform.processor() or platform.machine(),
              "python": platform.python_version(), "torch": importlib.metadata.version("torch"),
              "commit": git_commit(), "repeats": args.repeats, "target_s": 2.0,
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
