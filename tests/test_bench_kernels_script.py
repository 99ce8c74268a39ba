"""bench/bench_kernels.py runs on the test device (compiled kernels at ViTok's shapes on a
GPU; interpreted, tiny shapes on the CPU) and writes a JSON whose numbers are consistent
with each other."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_script_writes_consistent_json(tmp_path, device):
    script = _load_script()
    script.main(["--device", device.type, "--ops", "rms_norm,swiglu", "--impls", "ours,eager",
                 "--out-dir", str(tmp_path), "--no-plot"])
    (path,) = tmp_path.glob("kernels_*.json")
    report = json.loads(path.read_text())
    for key in ("device", "torch", "triton", "commit", "peak_bw_gb_per_s", "results"):
        assert key in report
    assert report["interpreted"] is (device.type == "cpu") and report["peak_bw_gb_per_s"] > 0
    results = report["results"]
    assert {(r["op"], r["impl"], r["mode"]) for r in results} == {
        (op, impl, mode) for op in ("rms_norm", "swiglu") for impl in ("ours", "eager")
        for mode in ("fwd", "fwd+bwd")}
    for r in results:
        assert "error" not in r, r
        assert r["seconds"] > 0
        assert abs(r["gb_per_s"] - r["bytes"] / r["seconds"] / 1e9) <= 1e-9 * r["gb_per_s"]
        assert abs(r["pct_peak_bw"] - 100 * r["gb_per_s"] / report["peak_bw_gb_per_s"]) \
            <= 1e-6 * r["pct_peak_bw"]
    # rms_norm on M x d: fwd moves x and y (2 M d elements), fwd+bwd adds dy, x, dx. The
    # first shape is 32 x 72 fp32 on the CPU, 32 * 256 x 768 bf16 on a GPU.
    fwd = next(r for r in results if r["op"] == "rms_norm" and r["mode"] == "fwd")
    both = next(r for r in results if r["op"] == "rms_norm" and r["mode"] == "fwd+bwd")
    elems = 32 * 72 * 4 if device.type == "cpu" else 32 * 256 * 768 * 2
    assert fwd["bytes"] == 2 * elems and both["bytes"] == 5 * elems


def test_listing_kernel_cases_allocates_nothing(monkeypatch):
    # pytest collects tests/test_bench_kernels.py's cases at import: listing them must not
    # allocate (on a GPU that would hold every case's inputs at once). Listing the GPU cases
    # here, where no CUDA exists, would raise on any CUDA allocation.
    import torch

    from vitok_fast.benchmarking import cases

    calls = []
    real = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: calls.append(a) or real(*a, **k))
    gpu_cases = cases(torch.device("cuda"), torch.bfloat16)
    assert len(gpu_cases) >= 80 and calls == []
    cpu_cases = cases("cpu", torch.float32)
    assert calls == []
    run = cpu_cases[0].make()  # the inputs exist from here on
    assert len(calls) >= 2
    run()
