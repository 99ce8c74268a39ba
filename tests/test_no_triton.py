"""vitok_fast works where Triton is not installed (macOS, Windows, CPU-only installs): the
package imports, the model runs its reference path (``use_kernels=True`` then means the
reference, with exactly one warning), and save_pretrained / from_pretrained round-trip.
Checked in a fresh interpreter where ``import triton`` fails."""

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import json, sys, tempfile, warnings

    # As if Triton were not installed: `import triton` raises ImportError and
    # importlib.util.find_spec("triton") (which torch consults) returns None.
    sys.modules["triton"] = None
    warnings.simplefilter("always")  # every warning counted, none deduplicated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        import vitok_fast
        from vitok_fast import ViTok, kernels
        from vitok_fast.kernel_bounds import fp32_bound  # noqa: F401 (the self-test's bounds)

        torch.manual_seed(0)
        model = ViTok.from_name("T-T/8")  # use_kernels=True by default
        reference = ViTok.from_name("T-T/8", use_kernels=False)
        reference.load_state_dict(model.state_dict())
        x = torch.rand(2, 3, 16, 16) * 2 - 1
        with torch.no_grad():
            recon, posterior = model(x, sample=False)
            recon_ref, _ = reference(x, sample=False)
        model.zero_grad()
        out, post = model(x, sample=False)
        (out.square().mean() + post.kl()).backward()
        grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            loaded = ViTok.from_pretrained(tmp)
            with torch.no_grad():
                recon_loaded, _ = loaded(x, sample=False)
        try:
            kernels.rms_norm(torch.randn(2, 8), torch.ones(8))
            fused_error = ""
        except RuntimeError as e:
            fused_error = str(e)
    print(json.dumps({
        "triton_imported": sys.modules.get("triton") is not None,
        "has_triton": kernels.HAS_TRITON,
        "version": vitok_fast.__version__,
        "same_as_reference": bool(torch.equal(recon, recon_ref)),
        "round_trip_equal": bool(torch.equal(recon, recon_loaded)),
        "grads_finite": grads_finite,
        "fused_error": fused_error,
        "warnings": [str(w.message) for w in caught],
    }))
''')


def test_import_forward_and_pretrained_round_trip_without_triton(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["triton_imported"] is False and result["has_triton"] is False
    assert result["same_as_reference"] and result["round_trip_equal"] and result["grads_finite"]
    assert "Triton" in result["fused_error"] and "use_kernels=False" in result["fused_error"]
    triton_warnings = [w for w in result["warnings"] if "Triton is not installed" in w]
    assert len(triton_warnings) == 1, result["warnings"]
