"""bench/profile_step.py profiles a real tiny training step and an encode+decode on the CPU:
the Chrome traces hold the model's named ranges, and the top-10 table is ranked."""

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("profile_step", ROOT / "bench" / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _trace_names(path: Path) -> set:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return {e.get("name") for e in json.load(f)["traceEvents"]}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_tiny_profiles_have_named_ranges_and_a_top_10(tmp_path):
    prof = _load()
    report = prof.main(["--device", "cpu", "--tiny", "--out-dir", str(tmp_path)])
    for part, outer in (("train_step", "train_step"), ("encode_decode", "encode_decode")):
        names = _trace_names(Path(report[part]["trace"]))
        assert set(prof.MODEL_RANGES) | {outer} <= names, names
        top = report[part]["top"]["rows"]
        assert len(top) == 10
        times = [r["self_us"] for r in top]
        assert times == sorted(times, reverse=True) and times[-1] > 0
        assert not {r["name"] for r in top} & (set(prof.MODEL_RANGES) | set(prof.STEP_RANGES))
        assert 0 < sum(r["pct"] for r in top) <= 100 + 1e-6
        ranges = report[part]["ranges"]
        # 2 encoder + 2 decoder blocks in T-T/8: one attention and one mlp range each
        assert ranges["attention"]["calls"] == ranges["mlp"]["calls"] == 4
        assert ranges["embed"]["calls"] == ranges["head"]["calls"] == 1
    # the training trace is the whole step: backward ops and the optimizer step are in it
    names = _trace_names(Path(report["train_step"]["trace"]))
    assert any("Backward" in n for n in names if n)
    assert any(n.startswith("Optimizer.step") for n in names if n)
    md = (tmp_path / "profile_cpu_tiny.md").read_text()
    assert md.count("### ") == 2 and "top 10 by self CPU time" in md
    saved = json.loads((tmp_path / "profile_cpu_tiny.json").read_text())
    assert saved["settings"]["lpips"] == "random VGG16 backbone"


def test_profiling_leaves_the_ranges_switch_as_it_found_it(tmp_path):
    from vitok_fast import profiling

    prof = _load()
    assert not profiling.ranges_enabled()
    prof.main(["--device", "cpu", "--tiny", "--batch", "1", "--lpips-weight", "0",
               "--warmup", "0", "--out-dir", str(tmp_path)])
    assert not profiling.ranges_enabled()
    saved = json.loads((tmp_path / "profile_cpu_tiny.json").read_text())
    assert saved["settings"]["lpips"] == "off" and saved["settings"]["batch"] == 1
