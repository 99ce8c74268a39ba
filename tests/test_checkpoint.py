"""vitok_fast.checkpoint: atomic, prunable, loadable by ViTok.from_pretrained."""

import hashlib

import pytest
import torch

from vitok_fast import ViTok
from vitok_fast.checkpoint import (STATE_FILE, latest_checkpoint, list_checkpoints, load_state,
                                   resolve_checkpoint, save_checkpoint)


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def model():
    return ViTok.from_name("T-T/8", use_kernels=False)


def test_checkpoint_holds_a_loadable_model_and_state_and_keeps_the_last_k(tmp_path, model):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, {"step": step, "x": torch.arange(3)}, keep=2,
                        extra_models={"ema": model})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_00000003"
    loaded = ViTok.from_pretrained(latest)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    ViTok.from_pretrained(latest / "ema")
    assert load_state(latest)["step"] == 3
    assert resolve_checkpoint("auto", tmp_path) == latest
    assert resolve_checkpoint(str(tmp_path), tmp_path / "elsewhere") == latest
    assert resolve_checkpoint("", tmp_path) is None
    assert resolve_checkpoint("auto", tmp_path / "fresh") is None
    with pytest.raises(FileNotFoundError, match="expected a checkpoint directory"):
        resolve_checkpoint(str(tmp_path / "nope"), tmp_path)


def test_checkpoint_interrupted_mid_write_never_replaces_the_last_good_one(tmp_path, model,
                                                                           monkeypatch):
    good = save_checkpoint(tmp_path, 1, model, {"step": 1})
    before = _digest(good)
    real_save = torch.save

    def crash_halfway(obj, path, *a, **kw):  # write part of the file, then die
        real_save(obj, path, *a, **kw)
        with open(path, "r+b") as f:
            f.truncate(10)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash_halfway)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, {"step": 2})  # a newer step
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 1, model, {"step": 1})  # the same step, overwritten
    monkeypatch.setattr(torch, "save", real_save)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert _digest(good) == before  # byte for byte the last good checkpoint
    assert load_state(good)["step"] == 1
    assert not list(tmp_path.glob(".*"))  # the failed attempt cleaned up after itself


def test_leftovers_of_a_killed_writer_are_ignored_and_cleaned(tmp_path, model):
    save_checkpoint(tmp_path, 1, model, {"step": 1})
    stale = tmp_path / ".step_00000002.abc.tmp"  # a kill -9 during the write of step 2
    stale.mkdir()
    (stale / STATE_FILE).write_bytes(b"partial")
    incomplete = tmp_path / "step_00000003"  # a directory without its state file
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    save_checkpoint(tmp_path, 4, model, {"step": 4})
    assert not stale.exists()
    assert latest_checkpoint(tmp_path).name == "step_00000004"
