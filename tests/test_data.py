"""vitok_fast.data: the make_dataset contract, skip-and-count of bad files, shards, videos,
and the deterministic, resumable sample stream."""

import io
import itertools
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from vitok_fast.data import (EMBEDDED_TRAIN, EMBEDDED_VAL, StreamSampler, make_dataset,
                             make_loader)


def _photo(seed, size=(48, 40)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _folder_with_bad_files(root):
    (root / "sub" / "deeper").mkdir(parents=True)
    _photo(0).save(root / "a.jpg")
    _photo(1).save(root / "sub" / "b.png")
    _photo(2).save(root / "sub" / "deeper" / "c.webp")
    _photo(3).save(root / "d.jpeg")
    buf = io.BytesIO()
    _photo(4, (64, 64)).save(buf, format="JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "sub" / "not_an_image.png").write_text("this is a text file, not a PNG\n")
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root


def _write_video(path, n_frames, size=(64, 48), fps=8):
    """Frame i is a flat grey of level 10 * i + 20, so decoded frames reveal their index."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(n_frames):
            array = np.full((size[1], size[0], 3), 10 * i + 20, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_embedded_items_follow_the_contract():
    train = make_dataset("embedded", 32, seed=0)
    val = make_dataset("embedded:val", 32, train=False)
    assert len(train) == len(EMBEDDED_TRAIN) == 15 and len(val) == len(EMBEDDED_VAL) == 3
    assert not set(EMBEDDED_TRAIN) & set(EMBEDDED_VAL)  # held-out photos are never trained on
    x = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) < -0.5 and 0.5 < float(x.max()) <= 1.0
    # Train crops depend on the per-sample seed; evaluation is deterministic.
    assert not torch.equal(train[(0, 1)], train[(0, 2)])
    assert torch.equal(train[(0, 1)], train[(0, 1)])
    assert torch.equal(val[1], make_dataset("embedded:val", 32, train=False)[1])


def test_eval_crop_is_shorter_side_resize_then_centre_crop():
    import skimage.data

    val = make_dataset("embedded:val", 64, train=False)  # coffee: 600 x 400
    im = Image.fromarray(skimage.data.coffee())
    resized = im.resize((96, 64), Image.Resampling.BICUBIC)
    expected = np.asarray(resized.crop((16, 0, 80, 64)), dtype=np.float32) / 127.5 - 1
    got = val[0].permute(1, 2, 0).numpy()
    # Same mapping, resampled once instead of twice: agree to a few grey levels.
    assert np.abs(got - expected).mean() < 4 / 127.5


def test_embedded_video_clips_are_panning_crops_labelled_synthetic():
    ds = make_dataset("embedded-video", 32, frames=8, frame_stride=2)
    clip = ds[0]
    assert clip.shape == (3, 8, 32, 32)
    assert "synthetic" in ds.description
    assert (clip[:, 1:] - clip[:, :-1]).abs().mean() > 0.01  # the camera moves
    val = make_dataset("embedded-video:val", 32, frames=4, train=False)
    assert torch.equal(val[0], val[0]) and val[0].shape == (3, 4, 32, 32)


def test_folder_with_corrupt_files_skips_and_counts_them_across_workers(tmp_path):
    root = _folder_with_bad_files(tmp_path / "data")
    ds = make_dataset(str(root), 32)
    assert len(ds) == 6  # recursive; jpg, jpeg, png, webp; .txt ignored
    loader = make_loader(ds, 2, seed=0, num_workers=2)
    batches = list(itertools.islice(iter(loader), 3))  # one epoch: every file asked for once
    assert all(b.shape == (2, 3, 32, 32) and torch.isfinite(b).all() for b in batches)
    assert ds.skipped == 2
    assert sorted(p.rsplit("/", 1)[-1] for p in ds.skipped_files) == ["not_an_image.png",
                                                                      "truncated.jpg"]


def test_bad_sources_fail_at_construction(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        make_dataset(str(tmp_path / "empty"), 32)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        make_dataset(str(tmp_path / "shards" / "{000..009}.tar"), 32)
    with pytest.raises(FileNotFoundError, match="neither a directory"):
        make_dataset(str(tmp_path / "missing"), 32)
    with pytest.raises(ValueError, match="resolution must be a positive integer, got 0"):
        make_dataset("embedded", 0)
    with pytest.raises(ValueError, match="embedded-video"):
        make_dataset("embedded", 32, frames=4)
    (tmp_path / "imgs").mkdir()
    _photo(0).save(tmp_path / "imgs" / "a.png")
    with pytest.raises(FileNotFoundError, match="no videos"):
        make_dataset(str(tmp_path / "imgs"), 32, frames=4)


def test_video_clips_respect_frames_and_stride(tmp_path):
    _write_video(tmp_path / "clip.mp4", 12)
    _write_video(tmp_path / "short.mp4", 3)  # too short for a clip: skipped, not a crash
    ds = make_dataset(str(tmp_path / "clip.mp4"), 32, frames=4, frame_stride=2, train=False)
    clip = ds[0]
    assert clip.shape == (3, 4, 32, 32)
    levels = (clip.mean(dim=(0, 2, 3)) + 1) * 127.5  # evaluation: frames 0, 2, 4, 6
    assert np.allclose(levels.numpy(), [20, 40, 60, 80], atol=4), levels
    folder = make_dataset(str(tmp_path), 32, frames=4, frame_stride=3, seed=1)
    for i in range(len(folder)):
        steps = ((folder[(i, 5)].mean(dim=(0, 2, 3)) + 1) * 127.5).diff()
        assert np.allclose(steps.numpy(), 30, atol=5), steps  # stride 3 -> +30 per frame
    assert folder.skipped == 1 and folder.skipped_files[0].endswith("short.mp4")
    images = make_dataset(str(tmp_path), 32)  # frames=1 from a video folder: single frames
    assert images[0].shape == (3, 32, 32)


def _write_shards(root, n_shards=4, per_shard=3, bad=(1, 1)):
    root.mkdir()
    for s in range(n_shards):
        with tarfile.open(root / f"{s:03d}.tar", "w") as tar:
            for j in range(per_shard):
                buf = io.BytesIO()
                _photo(100 * s + j).save(buf, format="PNG")
                data = buf.getvalue() if (s, j) != bad else b"not a png"
                for name, payload in ((f"s{s}_{j}.png", data), (f"s{s}_{j}.cls", b"0")):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(root / ("{000..%03d}.tar" % (n_shards - 1)))


def test_webdataset_shards_split_by_rank_and_skip_bad_samples(tmp_path):
    pattern = _write_shards(tmp_path / "shards")
    ds = make_dataset(pattern, 32, train=False)
    items = list(ds)
    assert len(items) == 11 and items[0].shape == (3, 32, 32)  # 12 samples, 1 corrupt
    assert ds.skipped == 1
    halves = []
    for rank in (0, 1):
        part = make_dataset(pattern, 32, train=False)
        part.rank, part.world = rank, 2
        halves.append(torch.stack(list(part)))
    both = torch.cat(halves)
    assert len(both) == 11
    key = lambda batch: sorted(round(float(x.sum()), 3) for x in batch)
    assert key(both) == key(items)  # a partition of the samples: none lost, none twice


def test_shard_stream_resumes_exactly(tmp_path):
    pattern = _write_shards(tmp_path / "shards", bad=(-1, -1))
    full = make_loader(make_dataset(pattern, 16, seed=3), 2, seed=3, num_workers=2)
    first = list(itertools.islice(iter(full), 7))
    resumed = make_loader(make_dataset(pattern, 16, seed=3), 2, seed=3, num_workers=2,
                          start_batches=4)
    for a, b in zip(first[4:], itertools.islice(iter(resumed), 3)):
        assert torch.equal(a, b)


def test_too_few_shards_for_the_workers_is_a_clear_error(tmp_path):
    pattern = _write_shards(tmp_path / "shards", n_shards=2)
    with pytest.raises(ValueError, match="2 shards cannot feed 2 ranks x 2 workers"):
        make_loader(make_dataset(pattern, 16), 2, seed=0, rank=0, world=2, num_workers=2)


def test_stream_sampler_deals_chunks_to_ranks_and_resumes():
    take = lambda s, n: list(itertools.islice(iter(s), n))
    one = take(StreamSampler(10, seed=0, chunk=2), 24)
    r0 = take(StreamSampler(10, seed=0, chunk=2, rank=0, world=2), 12)
    r1 = take(StreamSampler(10, seed=0, chunk=2, rank=1, world=2), 12)
    # One process's micro-batches k, k+1 == two ranks' micro-batch k/2: the same samples.
    assert [one[i:i + 2] for i in range(0, 24, 4)] == [r0[i:i + 2] for i in range(0, 12, 2)]
    assert [one[i + 2:i + 4] for i in range(0, 24, 4)] == [r1[i:i + 2] for i in range(0, 12, 2)]
    assert sorted(i for i, _ in one[:10]) == list(range(10))  # each epoch a permutation
    assert [i for i, _ in one[:10]] != [i for i, _ in one[10:20]]  # reshuffled per epoch
    assert take(StreamSampler(10, seed=0, chunk=2, start=7), 5) == one[7:12]
