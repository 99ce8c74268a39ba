"""`python -m vitok_fast.selftest`: passes on a healthy install, fails on a broken kernel,
writes the JSON the issue specifies, and reports usage errors in one line."""

import json

import pytest
import torch

from vitok_fast import cli, kernels, selftest

CHECK_KEYS = {"name", "ok", "max_rel_err", "bound", "ms", "ms_eager"}


def _load(path):
    data = json.loads(path.read_text())
    assert set(data) == {"device", "versions", "checks"}
    for check in data["checks"]:
        assert set(check) == CHECK_KEYS, check
    return data


def test_quick_selftest_passes_and_writes_the_json_schema(tmp_path, capsys):
    path = tmp_path / "selftest.json"
    assert selftest.main(["--quick", "--out", str(path)]) == 0
    data = _load(path)
    assert data["device"] == "cpu" and data["versions"]["torch"] == torch.__version__
    checks = {c["name"]: c for c in data["checks"]}
    ops = ("rms_norm", "add_rms_norm", "swiglu", "rope_3d", "tubelet_embed", "tubelet_unembed")
    # every op at every distinct shape of the three models, in both dtypes (quick: 2 heads of
    # the real head size, so S-L/16's S encoder and S-B/4x8's blocks repeat S-B/16's shapes)
    expected = [f"{op} {tag} {dt}" for dt in ("fp32", "bf16") for op, tag in
                [(op, m) for op in ops for m in ("S-B/16",)]
                + [(op, "S-L/16 d=144") for op in ops[:4]]
                + [("tubelet_unembed", "S-L/16"), ("tubelet_embed", "S-B/4x8"),
                   ("tubelet_unembed", "S-B/4x8")]]
    assert sorted(n for n in checks if n.split()[0] in ops) == sorted(expected)
    # the compile check runs on the CPU too: Inductor calls the interpreted kernels as ops
    assert [c["name"] for c in data["checks"] if c["name"].startswith("torch.compile")] == [
        "torch.compile model, kernels on T-T/8 fp32"]
    for check in data["checks"]:
        assert check["ok"] is True, check
        assert 0 <= check["max_rel_err"] <= check["bound"], check
    op_rows = [c for c in data["checks"] if c["name"].split()[0] in ops]
    assert len(op_rows) >= 2 * 13 and all(c["ms"] > 0 and c["ms_eager"] > 0 for c in op_rows)
    assert sum(c["name"].startswith("attention ") for c in data["checks"]) >= 3 * 2 * 2
    assert sum(c["name"].startswith("model kernel path") for c in data["checks"]) == 4
    out = capsys.readouterr().out
    assert "first call with compilation" in out and " 0 FAIL" in out and " 0 skipped" in out


def _small(monkeypatch):
    """One model's shapes, one attention backend, one whole model: enough to see a failure."""
    monkeypatch.setattr(selftest, "OP_MODELS", ("S-B/16",))
    monkeypatch.setattr(selftest, "MODEL_CASES", {True: (("T-T/8", (1, 1, 16, 16)),)})
    monkeypatch.setattr(selftest, "attention_backends", lambda dev: ["sdpa"])


def test_sabotaged_kernel_makes_the_selftest_fail(tmp_path, monkeypatch, capsys):
    _small(monkeypatch)
    path = tmp_path / "ok.json"
    assert selftest.main(["--quick", "--out", str(path)]) == 0
    honest = {c["name"]: c for c in _load(path)["checks"]}

    original = kernels.rms_norm
    monkeypatch.setattr(kernels, "rms_norm", lambda x, w, eps=1e-6: original(x, w, eps) + 1e-2)
    path = tmp_path / "sabotaged.json"
    assert selftest.main(["--quick", "--out", str(path)]) == 1
    checks = {c["name"]: c for c in _load(path)["checks"]}
    for dtype in ("fp32", "bf16"):
        bad = checks[f"rms_norm S-B/16 {dtype}"]
        assert bad["ok"] is False and bad["max_rel_err"] > bad["bound"]
        assert honest[f"rms_norm S-B/16 {dtype}"]["ok"] is True
        # the whole model runs the same kernel in its final norms: caught there too
        assert checks[f"model kernel path vs reference T-T/8 {dtype}"]["ok"] is False
    # the other ops are untouched by the sabotage and still pass
    assert checks["swiglu S-B/16 fp32"]["ok"] is True
    assert "FAIL  rms_norm S-B/16 fp32" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--device", "tpu"], "expected a device such as cpu, cuda or cuda:1, got 'tpu'"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "cuda:99"],
     "no CUDA device is available" if not torch.cuda.is_available() else "CUDA device(s)"),
    (["--out", "/nonexistent-dir/x.json"], "does not exist"),
])
def test_usage_errors_are_one_line_before_any_work(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(selftest, "op_checks", lambda *a: pytest.fail("ran checks"))
    with pytest.raises(SystemExit) as exit_:
        cli.run(selftest.main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_restarts_under_the_interpreter_when_triton_was_imported_without_it():
    # Triton reads TRITON_INTERPRET when first imported: a CPU selftest in a process that
    # imported it without the variable must rerun itself with it set (here: the rerun is
    # recorded instead of made)
    import os
    import subprocess
    import sys

    code = (
        "import sys, torch, vitok_fast.kernels\n"
        "from vitok_fast import selftest\n"
        "selftest.subprocess.call = lambda cmd, env: print('RERUN', env['TRITON_INTERPRET'], "
        "' '.join(cmd[1:])) or 7\n"
        "sys.exit(selftest.main(['--quick', '--device', 'cpu']))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 7, proc.stderr[-2000:]
    assert "RERUN 1 -m vitok_fast.selftest --quick --device cpu" in proc.stdout
