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
    # most valuable first: what a short GPU_SH_BUDGET keeps
    assert list(steps) == ["selftest", "compile_paths", "pytest_gpu", "bench_kernels", "bench_e2e",
                           "train_throughput", "roofline", "bench_attention", "profile_step"]
    assert steps["train_throughput"] == "skipped"  # CUDA only, said so in the summary
    failed = [name for name, status in steps.items() if status not in ("ok", "skipped")]
    assert proc.returncode == len(failed), proc.stdout[-3000:]
    for name in ("selftest", "compile_paths", "bench_kernels", "bench_e2e", "profile_step", "roofline"):
        assert steps[name] == "ok", (name, (results / "gpu_logs" / f"{name}.log").read_text()[-2000:])
    selftest = json.loads((results / "selftest_cpu.json").read_text())
    assert selftest["checks"] and not [c for c in selftest["checks"] if c["ok"] is False]
    compiled = json.loads((results / "compile_paths_cpu.json").read_text())["rows"]
    assert [(r["path"], r["status"]) for r in compiled] == [("kernels", "ok")]
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


def test_steps_past_the_budget_are_skipped_for_time_and_the_summary_says_so(tmp_path):
    # a "roofline" that takes 27 s: the budget counts from the first step, so with 45 s it
    # starts and leaves under 20 s, too little to start the next step
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/bash\ncase \"$*\" in *roofline.py*) sleep 27; exit 0;; esac\n"
                    f"exec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    proc = _run(tmp_path, {"PYTHON": str(fake), "GPU_SH_BUDGET": "45",
                           "GPU_SH_ONLY": "roofline,bench_attention"}, timeout=300)
    steps = _steps(tmp_path / "results")
    assert steps == {"roofline": "ok", "bench_attention": "skipped"}, proc.stdout[-2000:]
    summary = (tmp_path / "results" / "gpu_summary.md").read_text()
    assert "Skipped for time (GPU_SH_BUDGET spent): bench_attention." in summary
    assert proc.returncode == 0


def test_unknown_option_is_a_one_line_error():
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--fast"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown option --fast")


def test_summary_puts_the_roofline_beside_measurements_and_merges_training(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "bench" / "gpu_summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    res = tmp_path / "results"
    (res / "gpu_logs").mkdir(parents=True)
    (res / "gpu_logs" / "steps.tsv").write_text("bench_e2e\tok\t300\tgpu_logs/bench_e2e.log\n")
    path = lambda s: {"flops": 1.0, "bytes": 1.0, "predicted_s": s, "ops": []}
    (res / "roofline_S-B_16.json").write_text(json.dumps({
        "model": "S-B/16", "resolution": 256, "anchors": {"peak_tflops": 989.4, "hbm_tbps": 3.35},
        "paths": {"eager": {"encode_decode": path(1 / 2000), "train_step": path(1 / 800)},
                  "fused": {"encode_decode": path(1 / 5000), "train_step": path(1 / 2500)},
                  "sd_vae": {"encode_decode": path(1 / 600)}}}))
    row = lambda model, batch, ips: {"model": model, "input": "256x256", "stage": "encode+decode",
                                     "batch": batch, "status": "ok", "items_per_s": ips, "compile": True}
    (res / "e2e_h100.json").write_text(json.dumps({"rows": [
        row("S-B/16", 64, 3100.0), row("S-B/16", 128, 3300.0), row("SD-VAE", 64, 410.0)]}))
    for variant, ips in (("compile_kernels", 1234.0), ("eager_reference", 456.0)):
        (res / "gpu_logs" / f"train_{variant}.json").write_text(json.dumps(
            {"gpu": "H100", "variants": {variant: {"images_per_s_per_gpu": ips}}}))
    assert summary.main(["--results", str(res), "--gpu", "h100"]) == 0
    text = (res / "gpu_summary.md").read_text()
    assert "| S-B/16 encode+decode | 5000 | 3300 (batch 128, compiled) |" in text
    assert "| SD-VAE encode+decode | 600 | 410 (batch 64, compiled) |" in text
    assert "compile_kernels" in text and "| 2500 | 1234 |" in text and "| 800 | 456 |" in text
    assert "not a measurement" in text
    merged = json.loads((res / "train_h100.json").read_text())
    assert set(merged["variants"]) == {"compile_kernels", "eager_reference"}
