"""A video whose decoder fails mid-stream with its own exception (not a user error such as a
missing file) is skipped and named by ``reconstruct`` and ``encode``; the other files of the
batch are written."""

import json

import av
import numpy as np
import pytest
import torch

from vitok_fast import ViTok, encode, reconstruct
from vitok_fast.cli import UserError
from vitok_fast.media import read_video, write_video

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Three 4-frame 32x32 clips: a.mp4, b.mp4 (its codec will fail) and c.mp4."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for name in "abc":
        write_video(root / f"{name}.mp4", (rng.random((4, 32, 32, 3)) * 255).astype(np.uint8))
    return root


@pytest.fixture
def codec_fails_on_b(monkeypatch):
    """PyAV raises RuntimeError at b.mp4's second frame, as a codec that trips over damaged
    data deep in a stream does (its exception is not one of ours, nor an FFmpegError)."""
    real_open = av.open

    class Failing:
        def __init__(self, container):
            self.container = container

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.container.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.container, name)

        def decode(self, *args, **kwargs):
            for i, frame in enumerate(self.container.decode(*args, **kwargs)):
                if i == 1:
                    raise RuntimeError("error while decoding MB 3 1, bytestream -7")
                yield frame

    def open_(file, *args, **kwargs):
        container = real_open(file, *args, **kwargs)
        return Failing(container) if str(file).endswith("b.mp4") else container

    monkeypatch.setattr(av, "open", open_)


def test_read_video_names_the_file_when_the_codec_fails(videos, codec_fails_on_b):
    with pytest.raises(ValueError, match=r"cannot read .*b\.mp4 as a video \(RuntimeError: "
                                         r"error while decoding"):
        read_video(videos / "b.mp4")
    assert read_video(videos / "a.mp4")[0].shape == (4, 32, 32, 3)


def test_reconstruct_skips_and_names_a_video_whose_codec_fails(videos, codec_fails_on_b,
                                                               tmp_path, capsys):
    torch.manual_seed(0)
    ViTok.from_name("T-T/8", use_kernels=False).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"1 of 3 inputs failed \(.*b\.mp4"):
        reconstruct.main([str(videos), "--ckpt", str(tmp_path / "ckpt"), "--out", str(out),
                          "--no-kernels", "--device", "cpu"])
    assert "failed: " in capsys.readouterr().err
    done = json.loads((out / "psnr.json").read_text())
    assert sorted(p.rsplit("/", 1)[1] for p in done) == ["a.mp4", "c.mp4"]  # the rest written
    assert all(np.isfinite(v) for v in done.values())
    assert (out / "c_recon.mp4").is_file() and not (out / "b_recon.mp4").exists()


def test_encode_skips_and_names_a_video_whose_codec_fails(videos, codec_fails_on_b, tmp_path):
    torch.manual_seed(0)
    ViTok.from_name("T-T/2x8", use_kernels=False).save_pretrained(tmp_path / "ckpt")
    encode.main(["--ckpt", str(tmp_path / "ckpt"), "--data", str(videos), "--out",
                 str(tmp_path / "latents"), "--resolution", "32", "--frames", "4",
                 "--no-kernels", "--device", "cpu", "--batch-size", "3"])
    index = json.loads((tmp_path / "latents" / "index.json").read_text())
    assert index["num_samples"] == 2 and index["num_skipped"] == 1
    (shard,) = index["shards"]
    assert [p.rsplit("/", 1)[1] for p in shard["paths"]] == ["a.mp4", "c.mp4"]
    (skipped,) = shard["skipped"]
    assert skipped["path"].endswith("b.mp4") and "error while decoding" in skipped["reason"]
