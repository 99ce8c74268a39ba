"""Latent shards and statistics: nothing substituted, nothing lost. Every latent equals the
encoding of the file its path names, unreadable files are listed with their reason, labels
follow the class folders, and stats.json equals numpy on the concatenated latents."""

import io
import os
import subprocess
import sys
import json
import tarfile

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vitok_fast import ViTok, decode, encode, evaluate, latent_stats
from vitok_fast.data import UnreadableItem, collate_items, crop_box, make_dataset, to_tensor
from vitok_fast.latent_stats import Moments, merge_all, stats_dict

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins")
R = 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    ViTok.from_name("T-T/8", use_kernels=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return ViTok.from_pretrained(ckpt, use_kernels=False).eval()


def _photo(name, size=(48, 40)):
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size)


def _bad_files(folder):
    buf = io.BytesIO()
    _photo("clock", (64, 64)).save(buf, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "x.png").write_text("this is a text file, not a PNG\n")


@pytest.fixture
def flat(tmp_path):
    """6 good photos, a truncated JPEG and a text file named x.png, all in one folder."""
    root = tmp_path / "flat"
    root.mkdir()
    for k, name in enumerate(PHOTOS):
        _photo(name).save(root / f"{k}_{name}.{'png' if k % 2 else 'jpg'}", quality=95)
    _bad_files(root)
    return root


@pytest.fixture
def classes(tmp_path):
    """The same files as root/<class>/<file>: 3 photos in each of two classes, a bad file in each."""
    root = tmp_path / "classes"
    for k, name in enumerate(PHOTOS):
        folder = root / ("animal" if name in ("astronaut", "chelsea", "coffee") else "thing")
        folder.mkdir(parents=True, exist_ok=True)
        _photo(name).save(folder / f"{name}.png")
    _bad_files(root / "animal")
    (root / "thing" / "x.png").write_text("not a png either\n")
    return root


ARGS = ["--resolution", str(R), "--no-kernels", "--device", "cpu"]


def _encode(ckpt, data, out, *extra):
    return encode.main(["--ckpt", str(ckpt), "--data", str(data), "--out", str(out), *ARGS,
                        "--shard-size", "4", "--batch-size", "3", *extra])


def _shards(out):
    index, paths = encode.load_latents(out)
    tensors = [load_file(p) for p in paths]
    return index, {k: torch.cat([t[k] for t in tensors]) for k in ("mean", "logvar", "label")}


@torch.no_grad()
def _expected_latent(model, path):
    with Image.open(path) as im:
        im = im.convert("RGB")
    x = to_tensor([im], crop_box(*im.size, None), R, flip=False)[:, 0]
    return model.encode(x[None]).mean[0]


@torch.no_grad()
def test_encode_writes_exactly_the_readable_files_each_latent_from_its_path(ckpt, model, flat,
                                                                            tmp_path):
    out = tmp_path / "latents"
    index = _encode(ckpt, flat, out, "--num-workers", "2")
    index, t = _shards(out)
    assert index["num_samples"] == 6 and t["mean"].shape[0] == 6
    assert [s["count"] for s in index["shards"]] == [4, 2]
    paths = [p for s in index["shards"] for p in s["paths"]]
    assert sorted(paths) == sorted(str(p) for p in flat.iterdir()
                                   if p.name not in ("truncated.jpg", "x.png"))
    for i, path in enumerate(paths):  # a substituted item would match another photo
        assert torch.allclose(t["mean"][i], _expected_latent(model, path), atol=1e-5), path
    skipped = {s["path"].rsplit("/", 1)[-1]: s["reason"] for sh in index["shards"]
               for s in sh["skipped"]}
    assert sorted(skipped) == ["truncated.jpg", "x.png"] and index["num_skipped"] == 2
    assert "truncated" in skipped["truncated.jpg"].lower() and "cannot identify" in skipped["x.png"]
    assert index["classes"] == [] and t["label"].tolist() == [-1] * 6
    assert t["label"].dtype == torch.int64


def test_class_folders_give_labels_in_sorted_name_order(ckpt, model, classes, tmp_path):
    out = tmp_path / "latents"
    _encode(ckpt, classes, out, "--num-workers", "0")
    index, t = _shards(out)
    assert index["classes"] == ["animal", "thing"] and index["num_samples"] == 6
    paths = [p for s in index["shards"] for p in s["paths"]]
    want = [index["classes"].index(p.split("/")[-2]) for p in paths]
    assert t["label"].tolist() == want == [0, 0, 0, 1, 1, 1]
    assert index["num_skipped"] == 3
    for i, path in enumerate(paths):
        assert torch.allclose(t["mean"][i], _expected_latent(model, path), atol=1e-5)
    assert [label for _, _, label in encode.iter_latents(out)] == want


def _numpy_stats(z):
    z = z.double().numpy()
    per_channel = np.moveaxis(z, 1, 0).reshape(z.shape[1], -1)
    return per_channel.mean(1), per_channel.std(1), z.mean(), z.std()


def test_stats_json_equals_numpy_on_the_concatenated_latents(ckpt, flat, tmp_path):
    out = tmp_path / "latents"
    _encode(ckpt, flat, out, "--num-workers", "0")
    _, t = _shards(out)  # two shards, merged by Chan's update
    stats = json.loads((out / "stats.json").read_text())
    mean, std, global_mean, global_std = _numpy_stats(t["mean"])
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(stats["std"], std, rtol=1e-12)
    assert stats["shift_factor"] == pytest.approx(global_mean, rel=1e-12)
    assert stats["scaling_factor"] == pytest.approx(1 / global_std, rel=1e-12)
    assert stats["count"] == 6 * 4 * 4 and stats["num_samples"] == 6 and not stats["sample"]
    # latent_stats computes the same numbers without writing shards
    alone = latent_stats.main(["--ckpt", str(ckpt), "--data", str(flat), *ARGS,
                               "--out", str(tmp_path / "s.json"), "--num-workers", "0",
                               "--batch-size", "4"])
    assert json.loads((tmp_path / "s.json").read_text())["shift_factor"] == alone["shift_factor"]
    np.testing.assert_allclose(alone["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(alone["std"], std, rtol=1e-12)
    assert alone["scaling_factor"] == pytest.approx(1 / global_std, rel=1e-12)
    assert sorted(s["path"].rsplit("/", 1)[-1] for s in alone["skipped"]) == ["truncated.jpg", "x.png"]


def test_sampled_stats_are_seeded_per_item_and_agree_between_encode_and_latent_stats(
        ckpt, flat, tmp_path):
    _encode(ckpt, flat, tmp_path / "a", "--sample", "--seed", "3", "--num-workers", "0")
    encoded = json.loads((tmp_path / "a" / "stats.json").read_text())
    alone = latent_stats.main(["--ckpt", str(ckpt), "--data", str(flat), *ARGS, "--sample",
                               "--seed", "3", "--out", str(tmp_path / "s.json"),
                               "--num-workers", "0", "--batch-size", "5"])
    assert encoded["sample"] and encoded["seed"] == 3
    np.testing.assert_allclose(alone["mean"], encoded["mean"], rtol=1e-12)
    np.testing.assert_allclose(alone["std"], encoded["std"], rtol=1e-12)
    _, t = _shards(tmp_path / "a")
    _, mean_std, _, _ = _numpy_stats(t["mean"])
    assert np.all(np.asarray(encoded["std"]) > mean_std)  # the noise adds variance


def test_chan_merge_of_partitions_equals_numpy_on_the_concatenation():
    rng = np.random.default_rng(0)
    # uneven partitions (one empty) with offsets far larger than their spread
    parts = [rng.normal(1e3 * k, 0.5 + k, size=(n, 5, 3, 4)) for k, n in enumerate((7, 0, 1, 30))]
    merged = merge_all((Moments.of(torch.from_numpy(p)) for p in parts), 5)
    z = np.concatenate(parts)
    per_channel = np.moveaxis(z, 1, 0).reshape(5, -1)
    assert merged.count == per_channel.shape[1]
    np.testing.assert_allclose(merged.mean, per_channel.mean(1), rtol=1e-12)
    np.testing.assert_allclose(merged.m2 / merged.count, per_channel.var(1), rtol=1e-12)
    stats = stats_dict(merged, num_samples=len(z), sample=False, seed=0)
    assert stats["shift_factor"] == pytest.approx(z.mean(), rel=1e-12)
    assert stats["scaling_factor"] == pytest.approx(1 / z.std(), rel=1e-12)
    np.testing.assert_allclose(stats["std"], per_channel.std(1), rtol=1e-12)
    # the JSON form round-trips every bit (resume merges what an uninterrupted run merged)
    again = Moments.from_json(json.loads(json.dumps(merged.to_json())))
    assert np.array_equal(again.mean, merged.mean) and np.array_equal(again.m2, merged.m2)


def test_an_encode_killed_mid_run_resumes_to_the_same_shards_index_and_stats(
        ckpt, flat, tmp_path, monkeypatch):
    whole, out = tmp_path / "whole", tmp_path / "latents"
    _encode(ckpt, flat, whole, "--num-workers", "0")
    files = {p.name: p.read_bytes() for p in whole.iterdir()}
    assert sorted(files) == ["index.json", "latents-00000.safetensors",
                             "latents-00001.safetensors", "stats.json"]
    calls, encode_batch = [], ViTok.encode

    def dies_at_the_third_batch(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode_batch(self, *a, **kw)

    monkeypatch.setattr(ViTok, "encode", dies_at_the_third_batch)
    with pytest.raises(KeyboardInterrupt):  # batches of 2: shard 0 (4 items) is written
        _encode(ckpt, flat, out, "--num-workers", "0", "--batch-size", "2")
    state = json.loads((out / "index.json").read_text())
    assert not state["complete"] and [s["count"] for s in state["shards"]] == [4]
    assert "paths" not in state["shards"][0] and (out / encode.meta_name(0)).is_file()
    monkeypatch.setattr(ViTok, "encode", encode_batch)
    _encode(ckpt, flat, out, "--num-workers", "0", "--batch-size", "5")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


def test_evaluate_uses_each_readable_image_once_and_lists_the_skipped(ckpt, model, flat, tmp_path):
    out = tmp_path / "eval.json"
    results = evaluate.main(["--ckpt", str(ckpt), "--data", str(flat), *ARGS, "--metrics",
                             "psnr,ssim", "--num-workers", "2", "--batch-size", "4",
                             "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["num_samples"] == results["num_samples"] == 6 and saved["skipped_files"] == 2
    assert sorted(s["path"].rsplit("/", 1)[-1] for s in saved["skipped"]) == ["truncated.jpg",
                                                                            "x.png"]
    good = tmp_path / "good"
    good.mkdir()
    for p in flat.iterdir():
        if p.name not in ("truncated.jpg", "x.png"):
            (good / p.name).write_bytes(p.read_bytes())
    clean = evaluate.evaluate(model, make_dataset(str(good), R, train=False), metrics=("psnr",),
                              batch_size=4, progress=False)
    assert saved["psnr"] == pytest.approx(clean["psnr"], rel=1e-9)  # the same 6 images, once


def test_evaluation_datasets_never_substitute(flat):
    ds = make_dataset(str(flat), R, train=False)
    names = [p.rsplit("/", 1)[-1] for p in ds.files]
    with pytest.raises(UnreadableItem, match=r"x\.png.*cannot be decoded"):
        ds[names.index("x.png")]
    assert ds.skipped == 1
    items = list(ds)  # exactly the readable ones, in order
    assert len(items) == 6 and ds.skipped == 2
    assert [torch.equal(a, ds[i]) for a, i in zip(items, [i for i, n in enumerate(names)
            if n not in ("truncated.jpg", "x.png")])] == [True] * 6
    meta = make_dataset(str(flat), R, train=False, with_meta=True)
    batches = list(torch.utils.data.DataLoader(meta, batch_size=3, num_workers=2,
                                               collate_fn=collate_items))
    got = torch.cat([b["index"] for b in batches]).tolist()
    bad = [i for b in batches for i, _, _ in b["skipped"]]
    assert sorted(got + bad) == list(range(8)) and sorted(names[i] for i in bad) == [
        "truncated.jpg", "x.png"]
    assert meta.skipped == 2  # flagged in the workers, seen here
    assert batches[-1]["x"] is None  # [truncated.jpg, x.png]: a batch with nothing readable
    for b in batches[:-1]:
        for x, i in zip(b["x"], b["index"].tolist()):
            assert torch.equal(x, ds[i])


def _write_labelled_shards(root):
    root.mkdir()
    names = []
    for s in range(2):
        with tarfile.open(root / f"{s:03d}.tar", "w") as tar:
            for j, photo in enumerate(PHOTOS[3 * s:3 * s + 3]):
                buf = io.BytesIO()
                _photo(photo).save(buf, format="PNG")
                data = buf.getvalue() if (s, j) != (1, 1) else b"not a png"
                # cls before the image in one sample: a sample is its run of members
                entries = [(f"k{s}{j}.png", data), (f"k{s}{j}.cls", str(10 * s + j).encode())]
                for name, payload in (entries[::-1] if j == 2 else entries):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                names.append((f"{root / f'{s:03d}.tar'}/k{s}{j}.png", 10 * s + j))
    return str(root / "{000..001}.tar"), names


def test_webdataset_cls_entries_become_labels(ckpt, model, tmp_path):
    pattern, names = _write_labelled_shards(tmp_path / "shards")
    out = tmp_path / "latents"
    index = _encode(ckpt, pattern, out, "--num-workers", "1")
    _, t = _shards(out)
    paths = [p for s in index["shards"] for p in s["paths"]]
    good = [n for n in names if not n[0].endswith("k11.png")]
    assert paths == [p for p, _ in good] and t["label"].tolist() == [c for _, c in good]
    assert [s["path"] for sh in index["shards"] for s in sh["skipped"]] == [names[4][0]]
    assert index["num_samples"] == 5 and index["classes"] == []


@torch.no_grad()
def test_decode_reads_shards_without_labels(ckpt, flat, tmp_path):
    out = tmp_path / "latents"
    _encode(ckpt, flat, out, "--num-workers", "0")
    for path in encode.load_latents(out)[1]:  # as written before labels were recorded
        tensors = load_file(path)
        del tensors["label"]
        save_file(tensors, path)
    n = decode.main(["--ckpt", str(ckpt), "--latents", str(out), "--out", str(tmp_path / "d"),
                     "--no-kernels", "--device", "cpu"])
    assert n == 6 and len(list((tmp_path / "d").glob("*.png"))) == 6
    assert [label for _, _, label in encode.iter_latents(out)] == [-1] * 6


def test_two_gloo_ranks_give_the_single_process_stats_and_skipped_list(ckpt, flat, tmp_path):
    common = ["-m", "vitok_fast.latent_stats", "--ckpt", str(ckpt), "--data", str(flat), *ARGS,
              "--sample", "--num-workers", "0", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, *common, "--out", str(one)], check=True, env=env,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--standalone", *common, "--out", str(two)], check=True, env=env,
                   capture_output=True)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["num_samples"] == b["num_samples"] == 6 and a["count"] == b["count"]
    np.testing.assert_allclose(b["mean"], a["mean"], rtol=1e-12)  # per-item seeded noise
    np.testing.assert_allclose(b["std"], a["std"], rtol=1e-12)
    assert b["scaling_factor"] == pytest.approx(a["scaling_factor"], rel=1e-12)
    assert sorted(s["path"] for s in b["skipped"]) == sorted(s["path"] for s in a["skipped"])
    assert len(b["skipped"]) == 2


def test_latent_stats_user_errors_are_one_line(ckpt, flat, tmp_path):
    run = subprocess.run([sys.executable, "-m", "vitok_fast.latent_stats", "--ckpt", str(ckpt),
                          "--data", str(flat), "--out", str(tmp_path)], capture_output=True,
                         text=True, env={**os.environ, "VITOK_DEBUG": "0"})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("error: argument --out: expected an output file")
    assert "which is a directory" in run.stderr and run.stderr.count("\n") == 1


def test_evaluation_split_of_tar_shards_over_ranks_loses_and_doubles_nothing(tmp_path):
    pattern, names = _write_labelled_shards(tmp_path / "shards")
    seen = []
    for rank in (0, 1):
        ds = make_dataset(pattern, R, train=False, with_meta=True)
        ds.rank, ds.world = rank, 2  # what construction under torch.distributed sets
        seen += [(item["index"], item["path"]) for item in evaluate._shard(ds, rank, 2, None)]
    assert sorted(seen) == [(i, path) for i, (path, _) in enumerate(names)]  # 6 samples once


def test_video_class_folders_label_clips_and_list_a_too_short_one(tmp_path):
    from test_data import _write_video

    for cls, n_frames in (("ApplyEyeMakeup", 6), ("Archery", 6), ("Archery", 2)):
        (tmp_path / cls).mkdir(exist_ok=True)
        _write_video(tmp_path / cls / f"v_{cls}_{n_frames}.mp4", n_frames)
    ds = make_dataset(str(tmp_path), 16, frames=4, train=False, with_meta=True)
    assert ds.classes == ["ApplyEyeMakeup", "Archery"]
    batch = collate_items([ds[i] for i in range(len(ds))])
    assert batch["x"].shape == (2, 3, 4, 16, 16) and batch["label"].tolist() == [0, 1]
    assert [p.rsplit("/", 1)[-1] for p in batch["path"]] == ["v_ApplyEyeMakeup_6.mp4",
                                                            "v_Archery_6.mp4"]
    [(index, path, reason)] = batch["skipped"]
    assert path.endswith("v_Archery_2.mp4") and "has 2 frames" in reason
