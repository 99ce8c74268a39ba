"""bench/model_call_overhead.py: two versions of model.py timed side by side, one record."""

import json

import torch

from _scripts import load_script


def test_bench_times_the_current_model_against_a_git_rev(tmp_path):
    bench = load_script("bench/model_call_overhead.py")
    out = tmp_path / "overhead.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--before", "HEAD", "--rounds", "2", "--calls", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    record = json.loads(out.read_text())
    assert record["before"] == "HEAD" and record["model"] == "T-T/8" and record["commit"]
    assert [row["op"] for row in record["rows"]] == ["encode", "decode"]
    assert set(record["embed_call_us"]) == {"module", "direct"}
    for row in record["rows"]:
        assert row["before_ms"] > 0 and row["after_ms"] > 0
        assert row["control_ms"] > 0
        assert abs(row["after_over_before"] - row["after_ms"] / row["before_ms"]) < 1e-2
        assert abs(row["control_over_after"] - row["control_ms"] / row["after_ms"]) < 1e-2
