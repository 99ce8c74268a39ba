"""The walk of issue 16, replayed on tiny data: class folders of small photos (one truncated
JPEG among them) through stage 1 -> encode -> latent_stats -> train/dit.py -> sample ->
evaluate --generated -> reconstruct -> diffusers, every tool given only what a user would
type (relative paths, run directories, no --resolution after training), each output checked
for its resolution, its name and its label. About 30 s on 2 shared cores."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vitok_fast import ViTok, metrics as M
from vitok_fast import encode, evaluate, latent_stats, reconstruct, sample
from vitok_fast.cli import UserError

from _scripts import load_script

CLASSES = ("astronaut", "coffee", "rocket")
TRAINED = 16  # stage 1's resolution: every later tool must use it without being told
CPU = ["--no-kernels", "--device", "cpu"]


def make_photos(root):
    rng = np.random.default_rng(0)
    for k, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for i, (h, w) in enumerate(((24, 24), (24, 32), (32, 24), (28, 28))):
            base = np.full((h, w, 3), 60 + 60 * k, np.uint8)
            noise = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
            Image.fromarray(base + noise).save(root / c / f"{i}.jpg", quality=95)
    good = (root / "coffee" / "0.jpg").read_bytes()
    (root / "coffee" / "9.jpg").write_bytes(good[: len(good) // 3])  # truncated
    return root / "coffee" / "9.jpg"


def test_the_tool_chain_walk(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    broken = make_photos(tmp_path / "photos").relative_to(tmp_path)

    # -- stage 1 on a folder without --val-data: a held-out slice, grids with PSNR, loss plot
    stage1 = load_script("train/stage1.py")
    result = stage1.main(["--smoke", "--data", "photos", "--resolution", str(TRAINED),
                          "--max-steps", "4", "--save-every", "2", "--eval-every", "2",
                          "--out-dir", "runs/s1", "--no-kernels"])
    captured = capsys.readouterr()
    assert "no --val-data: holding out 4 of the 13 files of photos" in captured.err
    assert "final checkpoint: runs/s1/step_00000004" in captured.out + captured.err
    assert result["final_checkpoint"] == "runs/s1/step_00000004"
    grid = np.asarray(Image.open("runs/s1/samples/step_00000004.png"))
    # the 4 held-out files hold the truncated one: 3 rows of input | reconstruction, PSNR strips
    assert grid.shape[1] == 2 * TRAINED and grid.shape[0] == 3 * (TRAINED + 12)
    assert (tmp_path / "runs/s1/loss.png").is_file()

    # -- encode the run directory: the training resolution, labels, the bad file named
    index = encode.main(["--ckpt", "runs/s1", "--data", "photos", "--out", "latents",
                         "--num-workers", "0", "--batch-size", "4", *CPU])
    first = capsys.readouterr().err.splitlines()[0]
    assert first.endswith(f"at {TRAINED} px (its training resolution)")
    assert index["resolution"] == TRAINED and index["classes"] == list(CLASSES)
    assert index["num_samples"] == 12 and index["num_skipped"] == 1
    assert [s["path"] for shard in index["shards"] for s in shard["skipped"]] == [str(broken)]
    shard = load_file("latents/latents-00000.safetensors")
    assert shard["mean"].shape[1:] == (16, TRAINED // 8, TRAINED // 8)
    assert sorted(set(shard["label"].tolist())) == [0, 1, 2]

    stats = latent_stats.main(["--ckpt", "runs/s1", "--data", "photos", "--out", "stats.json",
                               "--num-workers", "0", *CPU])
    assert stats["resolution"] == TRAINED and stats["num_samples"] == 12

    # -- the DiT on those latents; then sample from another directory
    train_dit = load_script("train/dit.py")
    train_dit.main(["--latents", "latents", "--vitok", "runs/s1", "--model", "DiT-T/1",
                    "--max-steps", "2", "--global-batch-size", "4", "--micro-batch-size", "4",
                    "--save-every", "2", "--sample-every", "2", "--sample-steps", "2",
                    "--out-dir", "runs/dit", "--no-kernels", "--device", "cpu"])
    assert "final checkpoint: runs/dit/step_00000002 (EMA weights in" in \
        "".join(capsys.readouterr())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    made = sample.main(["--dit", "../runs/dit", "--classes", "astronaut,2", "--per-class", "2",
                        "--steps", "2", "--out", "../samples", *CPU])
    monkeypatch.chdir(tmp_path)
    assert made["classes"] == ["astronaut", "rocket"] and made["resolution"] == TRAINED
    for name in ("astronaut/0000.png", "astronaut/0001.png", "rocket/0000.png", "rocket/0001.png"):
        assert np.asarray(Image.open(tmp_path / "samples" / name)).shape == (TRAINED, TRAINED, 3)
    assert (tmp_path / "samples" / "grid.png").is_file()

    # -- gFID of the samples against the class folders, the truncated JPEG skipped and named
    weights = M.save_random_inception(tmp_path / M.INCEPTION_FILE)
    scores = evaluate.main(["--generated", "samples", "--ref-stats", "photos", "--inception",
                            str(weights), "--device", "cpu"])
    assert scores["resolution"] == TRAINED and np.isfinite(scores["gfid"])
    assert [s["path"] for s in scores["ref_skipped"]] == [str(broken)]
    assert json.loads((tmp_path / "samples" / "eval_generated.json").read_text())["gis"] == scores["gis"]

    # -- reconstruct the class folders: <class>/<name>, the training size, the bad file named
    with pytest.raises(UserError, match=r"1 of 13 inputs failed \(photos/coffee/9.jpg"):
        reconstruct.main(["photos", "--ckpt", "runs/s1", "--out", "recon", *CPU])
    done = json.loads((tmp_path / "recon" / "reconstruct.json").read_text())
    assert done["resolution"] == TRAINED and len(done["files"]) == 12
    for c in CLASSES:
        assert np.asarray(Image.open(f"recon/{c}/0_recon.png")).shape == (TRAINED, TRAINED, 3)

    # -- diffusers: the run directory loads, the latents match encode's
    from vitok_fast.diffusers import AutoencoderViTok

    vae = AutoencoderViTok.from_vitok(ViTok.from_pretrained("runs/s1", use_kernels=False),
                                      stats="latents/stats.json")
    assert vae.config.scaling_factor == pytest.approx(
        json.loads((tmp_path / "latents" / "stats.json").read_text())["scaling_factor"])
    x = torch.zeros(1, 3, TRAINED, TRAINED)
    assert vae.encode(x).latent_dist.mean.shape == (1, 16, TRAINED // 8, TRAINED // 8)
