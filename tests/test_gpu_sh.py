"""bench/gpu.sh end to end in its CPU tiny mode: every step runs (or says why not), results
and the summary land in the results folder, and a failing step neither stops the others nor
goes unreported in the exit status."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, env_extra, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(GPU_SH_TINY="1", GPU_SH_OUT=str(tmp_path / "results"),
               PYTHON=env_extra.pop("PYTHON", sys.executable), **env_extra)
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _steps(results):
    rows = (results / "gpu_logs" / "steps.tsv").read_text().splitlines()
    return {r.split("\t")[0]: r.split("\t")[1] for r in rows}


def test_tiny_mode_runs_every_step_and_writes_results_and_summary(tmp_path):
    proc = _run(tmp_path, {}, timeout=1200)
    results = tmp_path / "results"
    steps = _steps(results)
    assert list(steps) == ["selftest", "pytest_gpu", "bench_kernels", "bench_attention",
                           "bench_e2e", "train_throughput", "profile_step", "roofline"]
    assert steps["train_throughput"] == "skipped"  # CUDA only, said so in the summary
    failed = [name for name, status in steps.items() if status not in ("ok", "skipped")]
    assert proc.returncode == len(failed), proc.stdout[-3000:]
    for name in ("selftest", "bench_kernels", "bench_e2e", "profile_step", "roofline"):
        assert steps[name] == "ok", (name, (results / "gpu_logs" / f"{name}.log").read_text()[-2000:])
    selftest = json.loads((results / "selftest_cpu.json").read_text())
    assert selftest["checks"] and not [c for c in selftest["checks"] if c["ok"] is False]
    assert (results / "e2e_cpu_tiny.json").exists() and (results / "e2e_cpu_tiny.png").exists()
    assert json.loads((results / "roofline_S-B_16.json").read_text())["model"] == "S-B/16"
    summary = (results / "gpu_summary.md").read_text()
    assert "| selftest | ok |" in summary and "needs CUDA" in summary
    assert "0 FAIL" in summary


def test_a_failing_step_is_counted_and_the_next_one_still_runs(tmp_path):
    # a python that fails for the roofline and works for everything else
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/bash\ncase \"$*\" in *roofline*) echo broken >&2; exit 3;; esac\n"
                    f"exec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    proc = _run(tmp_path, {"PYTHON": str(fake), "GPU_SH_ONLY": "roofline,train_throughput"}, timeout=300)
    steps = _steps(tmp_path / "results")
    assert steps == {"train_throughput": "skipped", "roofline": "FAIL (exit 3)"}
    assert proc.returncode == 1
    assert "| roofline | FAIL (exit 3) |" in (tmp_path / "results" / "gpu_summary.md").read_text()


def test_unknown_option_is_a_one_line_error():
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--fast"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown option --fast")
