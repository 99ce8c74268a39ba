"""bench/bench_e2e.py runs its tiny CPU configuration end to end and writes a JSON whose
ratios are computed from its own rows; its batch-sweep bookkeeping (OOM, resume) holds."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_tiny_run_writes_rows_ratios_and_plot(tmp_path):
    e2e = _load("bench_e2e")
    argv = ["--device", "cpu", "--tiny", "--batches", "2", "--write-cpu", "--out-dir", str(tmp_path)]
    e2e.main(argv)
    path = tmp_path / "e2e_cpu_tiny.json"
    report = json.loads(path.read_text())
    for key in ("device", "torch", "triton", "commit", "dtype", "settings", "macs_per_item",
                "rows", "ratios", "best", "target"):
        assert key in report, key
    assert report["tiny"] is True and report["target"]["met"] is None  # no verdict off a GPU
    assert (tmp_path / "e2e_cpu_tiny.png").stat().st_size > 10_000

    rows = report["rows"]
    inputs = {"T-T/8": "32x32", "T-T/2x8": "4x16x16"}
    expected = {(m, i, s) for m, i in inputs.items() for s in e2e.STAGES}
    expected |= {("SD-VAE", i, s) for i in inputs.values() for s in e2e.STAGES}
    assert {(r["model"], r["input"], r["stage"]) for r in rows} == expected
    for r in rows:
        assert r["status"] == "ok", r
        assert r["batch"] == (2 if r["frames"] == 1 else 1)
        assert r["calls"] >= 3 and 0 < r["seconds_min"] <= r["seconds"] <= r["seconds_max"]
        assert r["items_per_s"] == pytest.approx(r["batch"] / r["seconds"], rel=1e-12)
        macs = report["macs_per_item"][f"{r['model']}|{r['input']}"]
        assert r["macs_per_item"] == macs[r["stage"]] > 0
        assert macs["encode+decode"] == macs["encode"] + macs["decode"]
        assert r["achieved_tflop_per_s"] == pytest.approx(
            2 * r["macs_per_item"] * r["items_per_s"] / 1e12, rel=1e-12)

    # every ViTok row has its ratio, computed from the two rows of the same input, stage, batch
    by_key = {(r["model"], r["input"], r["stage"], r["batch"]): r for r in rows}
    assert len(report["ratios"]) == len(expected) // 2
    for q in report["ratios"]:
        mine = by_key[(q["model"], q["input"], q["stage"], q["batch"])]
        sd = by_key[("SD-VAE", q["input"], q["stage"], q["batch"])]
        assert q["speed_ratio"] == pytest.approx(mine["items_per_s"] / sd["items_per_s"], rel=1e-12)
        assert q["macs_ratio"] == pytest.approx(sd["macs_per_item"] / mine["macs_per_item"], rel=1e-12)
        assert q["macs_ratio"] > 1  # the small VAE still costs more than a T-T ViTok per pixel
    assert {(b["model"], b["input"], b["stage"]) for b in report["best"]} == \
        {k for k in expected if k[0] != "SD-VAE"}

    # the same command again continues the file: nothing is measured twice
    again = e2e.main(argv)
    assert [r["seconds"] for r in again["rows"]] == [r["seconds"] for r in rows]


def test_batch_sweep_records_oom_skips_larger_batches_and_resumes(tmp_path, monkeypatch):
    e2e = _load("bench_e2e")
    calls = []

    def fake_measure(coder, work, stage, batch, *rest):
        calls.append(batch)
        if batch >= 2:
            return {"status": "oom"}
        return {"status": "ok", "seconds": 0.5, "seconds_min": 0.5, "seconds_max": 0.5,
                "calls": 3, "items_per_s": batch / 0.5}

    monkeypatch.setattr(e2e, "measure", fake_measure)
    argv = ["--device", "cpu", "--tiny", "--models", "T-T/8", "--no-sd-vae",
            "--batches", "1,2,4", "--stages", "decode", "--out-dir", str(tmp_path)]
    report = e2e.main(argv)
    status = {r["batch"]: r["status"] for r in report["rows"]}
    assert status == {1: "ok", 2: "oom", 4: "skipped"} and calls == [1, 2]
    assert report["rows"][2]["note"] == "out of memory at batch 2"
    assert report["ratios"] == [] and not list(tmp_path.iterdir())  # CPU: nothing written unasked

    calls.clear()
    e2e.main(argv + ["--write-cpu", "--no-plot"])
    assert calls == [1, 2]
    calls.clear()
    again = e2e.main(argv + ["--write-cpu", "--no-plot"])  # continues the file: nothing to redo
    assert calls == [] and {r["batch"]: r["status"] for r in again["rows"]} == status
    assert len(again["runs"]) == 2
    calls.clear()
    e2e.main(argv + ["--write-cpu", "--no-plot", "--fresh"])
    assert calls == [1, 2]


@pytest.mark.parametrize("argv, message", [
    (["--stages", "encode,train"], "--stages"),
    (["--batches", "0"], "positive"),
    (["--models", "S-X/16"], "--models"),
])
def test_bad_options_are_refused_with_the_option_named(argv, message, capsys):
    e2e = _load("bench_e2e")
    with pytest.raises(SystemExit):
        e2e.parse_args(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("gcc") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_vitok_blocks_run(tmp_path):
    # The compiled path (every block compiled in place). Plain-PyTorch ops: Triton's CPU
    # interpreter cannot be traced by dynamo, while on a GPU the kernels compile as they are.
    e2e = _load("bench_e2e")
    report = e2e.main(["--device", "cpu", "--tiny", "--compile", "on", "--no-kernels",
                       "--models", "T-T/8", "--no-sd-vae", "--batches", "2", "--stages", "decode"])
    (row,) = report["rows"]
    assert row["status"] == "ok", row
    assert row["compile"] is True and row["compile_scope"] == "blocks" and row["kernels"] is False
    assert row["items_per_s"] > 0
