"""torch.export of the encoder and the decoder (vitok_fast/serving.py) and the command that
writes them (``python -m vitok_fast.export``): dynamic batch, height, width (and frames),
outputs equal to eager's at sizes other than the traced one, on both paths."""

import json
import subprocess
import sys

import pytest
import torch

from vitok_fast import cli, serving
from vitok_fast.model import ViTok

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(name, use_kernels, device="cpu"):
    torch.manual_seed(0)
    return ViTok.from_name(name, use_kernels=use_kernels).to(device).eval()


def _equal(a, b):
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "reference"])
def test_image_encoder_and_decoder_export_with_dynamic_sizes_equal_eager(use_kernels, device):
    model = _model("T-T/8", use_kernels, device)
    encoder, decoder = serving.export_encoder(model), serving.export_decoder(model)
    # the kernel path keeps the fused ops as vitok:: nodes; the reference path has none
    ops = set(serving.custom_ops(encoder) + serving.custom_ops(decoder))
    assert ops == ({"vitok.tubelet_embed.default", "vitok.tubelet_unembed.default",
                    "vitok.rms_norm.default", "vitok.add_rms_norm.default",
                    "vitok.rope_3d_qk.default", "vitok.swiglu_packed.default"} if use_kernels else set())
    with torch.no_grad():
        for shape in ((1, 3, 16, 40), (3, 3, 32, 16)):  # other batch, H and W than traced
            x = torch.rand(shape, device=device) * 2 - 1
            moments = encoder.module()(x)
            assert _equal(moments, serving.EncodeMoments(model)(x))
            assert _equal(decoder.module()(moments[0]), model.decode(moments[0]))


def test_video_encoder_and_decoder_export_with_dynamic_frames(device):
    model = _model("T-T/2x8", True, device)
    encoder, decoder = serving.export_encoder(model), serving.export_decoder(model)
    with torch.no_grad():
        x = torch.rand(1, 3, 6, 16, 24, device=device) * 2 - 1  # 3 tubelets; traced with 2
        mean, logvar = encoder.module()(x)
        assert mean.shape == (1, 16, 3, 2, 3)
        assert _equal((mean, logvar), serving.EncodeMoments(model)(x))
        assert _equal(decoder.module()(mean), model.decode(mean))


def test_export_refuses_a_pinned_attention_backend():
    model = ViTok.from_name("T-T/8", attention_backend="math")
    with pytest.raises(ValueError, match="attention_backend='sdpa'"):
        serving.export_encoder(model)


LOAD_WITHOUT_VITOK = """
import sys, torch
program = torch.export.load(sys.argv[1]).module()
x = torch.load(sys.argv[2])
torch.save(program(x), sys.argv[3])
assert not any(m.startswith("vitok_fast") for m in sys.modules), "imported vitok_fast"
"""


def test_export_command_writes_programs_that_load_and_match(tmp_path):
    model = _model("T-T/8", True)
    model.save_pretrained(tmp_path / "ckpt")
    record = cli.run(serving_main := __import__("vitok_fast.export", fromlist=["main"]).main,
                     ["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "kern")])
    assert record["files"]["encoder"]["path"] == "kernels" and record["files"]["decoder"]["vitok_ops"] > 0
    assert json.loads((tmp_path / "kern" / "export.json").read_text())["model"] == "T-T/8"
    x = torch.rand(2, 3, 24, 16) * 2 - 1
    encode = torch.export.load(tmp_path / "kern" / "encoder.pt2").module()
    with torch.no_grad():
        assert _equal(encode(x), serving.EncodeMoments(model)(x))

    # the reference path's programs hold only ATen ops: a process that never imports
    # vitok_fast loads and runs them
    record = serving_main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ref"),
                           "--no-kernels"])
    assert record["files"]["decoder"] == {"file": "decoder.pt2", "vitok_ops": 0, "ops": [],
                                          "path": "reference"}
    z = torch.randn(2, 16, 3, 2)
    torch.save(z, tmp_path / "z.pt")
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_VITOK, str(tmp_path / "ref" / "decoder.pt2"),
                           str(tmp_path / "z.pt"), str(tmp_path / "out.pt")], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reference = _model("T-T/8", False)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt"), reference.decode(z))


def test_export_command_user_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vitok_fast.export", "--ckpt", str(tmp_path / "none"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "--ckpt" in proc.stderr and "not a directory" in proc.stderr
