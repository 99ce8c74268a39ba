"""bench/bench_kernels.py runs on the CPU (interpreted kernels, tiny shapes) and writes a
JSON whose numbers are consistent with each other."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_script_writes_consistent_json(tmp_path):
    script = _load_script()
    script.main(["--device", "cpu", "--ops", "rms_norm,swiglu", "--impls", "ours,eager",
                 "--out-dir", str(tmp_path), "--no-plot"])
    report = json.loads((tmp_path / "kernels_cpu_interpreter.json").read_text())
    for key in ("device", "torch", "triton", "commit", "peak_bw_gb_per_s", "results"):
        assert key in report
    assert report["interpreted"] is True and report["peak_bw_gb_per_s"] > 0
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
    # rms_norm on 32 x 72 fp32: fwd moves x and y (2 * 32 * 72 * 4 bytes), fwd+bwd adds
    # dy, x, dx
    fwd = next(r for r in results if r["op"] == "rms_norm" and r["mode"] == "fwd")
    both = next(r for r in results if r["op"] == "rms_norm" and r["mode"] == "fwd+bwd")
    assert fwd["bytes"] == 2 * 32 * 72 * 4 and both["bytes"] == 5 * 32 * 72 * 4
