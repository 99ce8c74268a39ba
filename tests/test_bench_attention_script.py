"""bench/bench_attention.py runs on the CPU (tiny shapes) and writes a JSON whose numbers are
consistent with each other: FLOPs by the stated convention, TFLOP/s = FLOPs / time, the
winner the fastest backend measured, every output checked against fp32."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "bench" / "bench_attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_bench_attention_writes_consistent_json(tmp_path):
    script = _load_script()
    script.main(["--device", "cpu", "--backends", "sdpa,flash,math,cudnn", "--out-dir", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention_cpu.json", "attention_cpu.png"]
    report = json.loads((tmp_path / "attention_cpu.json").read_text())
    for key in ("device", "torch", "triton", "commit", "dtype", "flop_convention", "results", "winners"):
        assert key in report
    assert report["device"].startswith("cpu") and report["dtype"] == "float32"
    results = report["results"]
    # 2 head sizes (64, 72) x 2 token counts x 2 modes x 4 backends
    assert len(results) == 2 * 2 * 2 * 4
    assert {(r["head_dim"], r["tokens"]) for r in results} == {(64, 16), (64, 64), (72, 16), (72, 64)}
    for r in results:
        if r["backend"] == "cudnn":
            assert r["error"] == ("unsupported: attention backend 'cudnn' supports dtypes "
                                  "['bfloat16', 'float16'], got float32") and "seconds" not in r
            continue
        assert "error" not in r, r
        B, H, N, D = r["batch"], r["heads"], r["tokens"], r["head_dim"]
        assert r["shape"] == f"{B}x{H}x{N}x{D}"
        forward = 4 * B * H * N * N * D
        assert r["flops"] == (forward if r["mode"] == "fwd" else 3.5 * forward)
        assert r["seconds"] > 0
        assert abs(r["tflop_per_s"] - r["flops"] / r["seconds"] / 1e12) <= 1e-9 * r["tflop_per_s"]
        assert 0 < r["max_rel_err"] <= r["bound"] < 1e-3 and r["worst"] in ("out", "dq", "dk", "dv")
    assert len(report["winners"]) == 8
    for w in report["winners"]:
        timed = [r for r in results if (r["shape"], r["mode"]) == (w["shape"], w["mode"]) and "seconds" in r]
        assert w["winner"] == min(timed, key=lambda r: r["seconds"])["backend"]
        assert w["auto_choice"] == "sdpa"  # the model's rule on the CPU


def test_bench_attention_writes_nothing_on_cpu_unless_asked(tmp_path, monkeypatch, capsys):
    script = _load_script()
    monkeypatch.setattr(script, "ROOT", tmp_path)  # where bench/results would go
    monkeypatch.setattr(script, "CPU_TOKENS", (8,))
    script.main(["--device", "cpu", "--backends", "sdpa", "--no-plot"])
    assert list(tmp_path.iterdir()) == []
    assert "| 2x2x8x64 | fwd | sdpa |" in capsys.readouterr().out


def test_bench_attention_rejects_unknown_backend():
    script = _load_script()
    with pytest.raises(SystemExit, match=r"unknown backend 'flash2'"):
        script.main(["--device", "cpu", "--backends", "sdpa,flash2"])
