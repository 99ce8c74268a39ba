"""save_pretrained / from_pretrained: bit-exact round trip, strict checks, clear errors."""

import json

import pytest
import torch

from vitok_fast import ViTok
from vitok_fast.model import CONFIG_FILE, WEIGHTS_FILE


@pytest.fixture
def saved(tmp_path):
    model = ViTok.from_name("T-T/8", use_kernels=False).eval()
    with torch.no_grad():  # make every weight non-trivial, norms included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_round_trip_is_bit_exact(saved):
    model, path = saved
    loaded = ViTok.from_pretrained(path).eval()
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    g = lambda: torch.Generator().manual_seed(3)
    rec_a, _ = model(x, generator=g())
    rec_b, _ = loaded(x, generator=g())
    assert torch.equal(rec_a, rec_b)


def test_overrides_apply_at_load(saved):
    _, path = saved
    assert ViTok.from_pretrained(path, use_kernels=True).config.use_kernels is True


def test_no_temporary_files_left(saved):
    _, path = saved
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def test_missing_checkpoint_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected a ViTok checkpoint file .*config\.json"):
        ViTok.from_pretrained(tmp_path / "nowhere")


def test_missing_weights_file(saved):
    _, path = saved
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*does not exist"):
        ViTok.from_pretrained(path)


def test_truncated_safetensors(saved):
    _, path = saved
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"not a readable safetensors file \(truncated or corrupt\?\)"):
        ViTok.from_pretrained(path)


def test_corrupt_safetensors_header(saved):
    _, path = saved
    (path / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ViTok.from_pretrained(path)


def test_config_weights_shape_mismatch(saved):
    _, path = saved
    config = json.loads((path / CONFIG_FILE).read_text())
    config["channels"] = 8  # the bottleneck in the weights has c = 16
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shape mismatch for encoder\.to_moments\.weight: .*"
                                         r"expects \(16, 64\).*holds \(32, 64\)"):
        ViTok.from_pretrained(path)


def test_config_weights_key_mismatch(saved):
    _, path = saved
    config = json.loads((path / CONFIG_FILE).read_text())
    config["decoder_depth"] = 3  # the weights have 2 decoder blocks
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing keys \['decoder\.transformer\.blocks\.2\."):
        ViTok.from_pretrained(path)


def test_invalid_config_json(saved):
    _, path = saved
    (path / CONFIG_FILE).write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ViTok.from_pretrained(path)


def test_unknown_config_field(saved):
    _, path = saved
    config = json.loads((path / CONFIG_FILE).read_text())
    config["flux_capacitor"] = 1
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['flux_capacitor'\]"):
        ViTok.from_pretrained(path)


def test_saved_files_are_readable_like_plain_files(saved):
    import os
    _, path = saved
    umask = os.umask(0)
    os.umask(umask)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert (path / name).stat().st_mode & 0o777 == 0o666 & ~umask

