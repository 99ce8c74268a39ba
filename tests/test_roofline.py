"""bench/roofline.py: a model whose FLOPs are bench/flops.py's, whose fused path counts our
kernels (the vitok:: ops the model calls) as single ops, and whose predictions follow from its anchors."""

import importlib.util
import json
from pathlib import Path

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vitok_fast.config import ViTokConfig
from vitok_fast.flops import count_sd_vae, count_vitok
from vitok_fast.model import ViTok

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("roofline", ROOT / "bench" / "roofline.py")
roofline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(roofline)


@pytest.fixture(scope="module")
def sb16():
    return roofline.roofline(ViTokConfig.from_name("S-B/16"), 256, 1, 4, 989.4, 3.35, progress=False)


def test_flops_agree_with_bench_flops_within_one_percent(sb16):
    vitok = 2 * count_vitok(ViTokConfig.from_name("S-B/16"), 256)["total"]["macs"]
    sd = 2 * count_sd_vae(256)["total"]["macs"]
    for path in ("eager", "fused"):
        assert abs(sb16["paths"][path]["encode_decode"]["flops"] / vitok - 1) < 0.01, path
    assert abs(sb16["paths"]["sd_vae"]["encode_decode"]["flops"] / sd - 1) < 0.01
    # fusion moves bytes, not FLOPs; backward is about twice the forward's matmuls
    assert sb16["paths"]["fused"]["train_step"]["flops"] == sb16["paths"]["eager"]["train_step"]["flops"]
    assert 2.9 < sb16["paths"]["eager"]["train_step"]["flops"] / vitok < 3.2


def test_fused_path_counts_each_kernel_as_one_op_and_moves_fewer_bytes(sb16):
    fused_ops = {o["op"] for o in sb16["paths"]["fused"]["train_step"]["ops"]}
    eager_ops = {o["op"] for o in sb16["paths"]["eager"]["train_step"]["ops"]}
    for name in ("rms_norm", "add_rms_norm", "swiglu_packed", "rope_3d_qk", "tubelet_embed",
                 "tubelet_unembed", "rms_norm_backward", "swiglu_packed_backward"):
        assert f"vitok.{name}" in fused_ops, name
    assert not any(op.startswith("vitok.") for op in eager_ops)
    # S-B/16: 18 blocks, each with two add_rms_norm calls but the first block's first norm
    # (plain rms_norm), plus the two final norms: 35 add_rms_norm and 1 + 2 rms_norm
    calls = lambda n: sum(o["calls"] for o in sb16["paths"]["fused"]["train_step"]["ops"] if o["op"] == n)
    assert calls("vitok.add_rms_norm") == 2 * 18 - 2 + 2 and calls("vitok.rms_norm") == 2
    assert calls("vitok.rms_norm_backward") == 38  # every norm's backward is one kernel
    assert calls("vitok.swiglu_packed") == 18 and calls("attention") == 18
    for what in ("encode_decode", "train_step"):
        eager, fused = sb16["paths"]["eager"][what]["bytes"], sb16["paths"]["fused"][what]["bytes"]
        assert fused < 0.7 * eager, what
        assert sb16["totals"]["hbm_bytes_saved_by_fusion"][what] == pytest.approx(eager - fused)


class _VitokCalls(TorchDispatchMode):
    """The vitok:: ops a run calls, counted independently of the roofline's Trace."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "vitok":
            self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def probe_op():
    """A test-only ``vitok::`` op (fake implementation only), removed again after the test so
    that no other test sees it (tests/test_kernels_opcheck.py lists every vitok op)."""
    lib = torch.library.Library("vitok", "FRAGMENT")
    lib.define("roofline_test_swiglu(Tensor gate_up) -> Tensor")
    lib.impl("roofline_test_swiglu",
             lambda gu: gu.new_empty((*gu.shape[:-1], gu.shape[-1] // 2)), "Meta")
    yield torch.ops.vitok.roofline_test_swiglu
    lib._destroy()


def test_fused_trace_takes_its_ops_from_the_model(monkeypatch, probe_op):
    config = ViTokConfig.from_name("S-B/16")
    with torch.device("meta"):
        model = ViTok(config).to(torch.bfloat16)
    seen = _VitokCalls()
    with seen:
        model.decode(model.encode(torch.empty(2, 3, 64, 64, device="meta", dtype=torch.bfloat16)).mode())
    traced = Counter()
    for op in roofline.trace_vitok(config, 2, 64, 1, fused=True, train=False):
        if op["op"].startswith("vitok."):
            traced[op["op"]] += 1
    assert traced == seen.calls and len(traced) >= 5
    # a new fused op is one op of the trace, bytes its inputs + outputs, with no list to edit
    from vitok_fast import ops
    monkeypatch.setattr(ops, "swiglu_packed", lambda gu, use: probe_op(gu))
    trace = roofline.trace_vitok(config, 2, 64, 1, fused=True, train=False)
    probes = [op for op in trace if op["op"] == "vitok.roofline_test_swiglu"]
    assert len(probes) == 18 and not any(op["op"] == "vitok.swiglu_packed" for op in trace)
    # 2 images x 16 tokens, reading (.., 2h) and writing (.., h) in bf16 (h = 2048 both sides)
    assert config.encoder_mlp_hidden == config.decoder_mlp_hidden == 2048
    assert all(op["bytes"] == 2 * 16 * 3 * 2048 * 2 and op["flops"] == 0 for op in probes)


def test_prediction_is_the_roofline_of_each_op(sb16):
    peak, bw = 989.4e12, 3.35e12
    for path in sb16["paths"].values():
        for summary in path.values():
            assert summary["predicted_s"] == pytest.approx(sum(o["predicted_s"] for o in summary["ops"]))
            for op in summary["ops"][:20]:
                # each call's max(); ops group equal calls, so the group's is calls x one call's
                one = max(op["flops"] / peak, op["bytes"] / bw)
                assert op["predicted_s"] == pytest.approx(one, rel=1e-9)
    t = sb16["totals"]
    assert t["predicted_speed_ratio_vitok_fused_over_sd_vae"] == pytest.approx(
        sb16["paths"]["sd_vae"]["encode_decode"]["predicted_s"]
        / sb16["paths"]["fused"]["encode_decode"]["predicted_s"])


def test_cli_json_schema_and_anchor_flags(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert roofline.main(["--model", "S-B/16", "--batch", "2", "--json", str(out)]) == 0
    base = json.loads(out.read_text())
    assert {"model", "resolution", "anchors", "paths"} <= set(base)
    assert set(base["paths"]) == {"eager", "fused", "sd_vae"}
    assert set(base["paths"]["sd_vae"]) == {"encode_decode"}
    for path in ("eager", "fused"):
        assert set(base["paths"][path]) == {"encode_decode", "train_step"}
        for summary in base["paths"][path].values():
            assert {"flops", "bytes", "predicted_s", "ops"} <= set(summary)
    assert "H100" in base["anchors"]["peak_source"] and "H100" in base["anchors"]["hbm_source"]
    text = capsys.readouterr().out
    assert "MODEL (predicted, not measured)" in text
    # twice the peak and twice the bandwidth: every prediction halves exactly
    assert roofline.main(["--model", "S-B/16", "--batch", "2", "--json", str(out),
                          "--peak-tflops", str(2 * 989.4), "--hbm-tbps", str(2 * 3.35)]) == 0
    fast = json.loads(out.read_text())
    assert fast["anchors"]["peak_source"] == "--peak-tflops"
    for path in ("eager", "fused", "sd_vae"):
        assert fast["paths"][path]["encode_decode"]["predicted_s"] == pytest.approx(
            base["paths"][path]["encode_decode"]["predicted_s"] / 2)


@pytest.mark.parametrize("argv,message", [
    (["--model", "X-B/16"], "unknown model name"),
    (["--batch", "0"], "--batch must be a positive integer"),
    (["--hbm-tbps", "-1"], "--hbm-tbps must be a positive number"),
    (["--model", "S-B/16", "--resolution", "250"], "multiple of 16"),
])
def test_bad_options_are_one_line_errors(argv, message, capsys):
    from vitok_fast import cli
    with pytest.raises(SystemExit) as e:
        cli.run(roofline.main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
