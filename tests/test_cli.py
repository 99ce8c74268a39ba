"""The command-line tools end to end on a tiny checkpoint: evaluate, reconstruct, encode and
decode round-trip files, and every bad input gets an error that names what was expected."""

import json
from pathlib import Path
import re

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from vitok_fast import ViTok, metrics as M
from vitok_fast import decode, encode, evaluate, reconstruct
from vitok_fast.cli import UserError
from vitok_fast.data import make_dataset


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    ViTok.from_name("T-T/8", use_kernels=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def video_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("video_ckpt")
    ViTok.from_name("T-T/2x8", use_kernels=False).save_pretrained(path)
    return path


def _val_items(resolution=32):
    """The held-out photos through the data contract only (map-style or stream alike)."""
    dataset = make_dataset("embedded:val", resolution, train=False)
    return list(torch.utils.data.DataLoader(dataset, batch_size=None))


EVAL = ["--data", "embedded:val", "--resolution", "32", "--no-kernels", "--num-workers", "0",
        "--device", "cpu"]


def test_evaluate_cli_prints_a_table_and_writes_json(ckpt, tmp_path, capsys):
    inception = M.save_random_inception(tmp_path / M.INCEPTION_FILE)
    out = tmp_path / "eval.json"
    main_results = evaluate.main(["--ckpt", str(ckpt), *EVAL, "--metrics", "psnr,ssim,fid",
                                  "--inception", str(inception), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["num_samples"] == len(_val_items()) and saved["E"] == 4 * 4 * 16
    assert saved["rfid"] == pytest.approx(main_results["rfid"]) and saved["rfid"] > 0
    assert 0 < saved["psnr"] < 60 and -1 < saved["ssim"] < 1
    assert "RFID" in capsys.readouterr().out


def test_evaluate_cli_names_missing_weights_and_checkpoints(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match=M.INCEPTION_FILE):
        evaluate.main(["--ckpt", str(ckpt), *EVAL, "--metrics", "fid"])
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af.pth.*--lpips-vgg PATH, or leave "
                                                r"LPIPS out with --metrics"):
        evaluate.main(["--ckpt", str(ckpt), *EVAL, "--metrics", "lpips",
                       "--lpips-vgg", str(tmp_path / "vgg.pth")])
    with pytest.raises(FileNotFoundError, match="not a directory"):
        evaluate.main(["--ckpt", str(tmp_path / "nope"), *EVAL])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        evaluate.main(["--ckpt", str(tmp_path / "empty"), *EVAL])


def test_reconstruct_round_trips_images_and_videos(ckpt, video_ckpt, tmp_path):
    photo = tmp_path / "chelsea.png"
    Image.fromarray(skimage.data.chelsea()[:50, :70]).save(photo)  # cropped to 48x64
    clip = tmp_path / "clip.mp4"
    frames = np.stack([np.roll(skimage.data.astronaut()[:32, :40], 2 * t, axis=1) for t in range(5)])
    reconstruct.write_video(clip, frames, fps=8)
    out = tmp_path / "out"
    scores = reconstruct.main(["--ckpt", str(ckpt), str(photo), str(clip), "--out", str(out),
                               "--no-kernels", "--device", "cpu"])
    recon = np.array(Image.open(out / "chelsea_recon.png"))
    assert recon.shape == (48, 64, 3)
    assert np.asarray(Image.open(out / "chelsea_compare.png")).shape == (48, 128, 3)
    real = torch.from_numpy(skimage.data.chelsea()[1:49, 3:67]).permute(2, 0, 1)[None]
    expected = M.psnr(real, torch.from_numpy(recon).permute(2, 0, 1)[None]).item()
    assert scores[str(photo)] == pytest.approx(expected, abs=1e-6)
    assert json.loads((out / "psnr.json").read_text()) == scores
    tiled = reconstruct.main(["--ckpt", str(ckpt), str(photo), "--out", str(tmp_path / "tiled"),
                              "--tile", "32", "--overlap", "8", "--no-kernels", "--device", "cpu"])
    assert np.array(Image.open(tmp_path / "tiled" / "chelsea_recon.png")).shape == (48, 64, 3)
    assert tiled[str(photo)] != scores[str(photo)]  # tiles change what attention sees
    video, _ = reconstruct.read_video(out / "clip_compare.mp4")
    assert video.shape == (5, 32, 80, 3)  # an image model reconstructs frame by frame
    # a video model cuts the clip to whole tubelets (4 of 5 frames)
    vout = tmp_path / "vout"
    reconstruct.main(["--ckpt", str(video_ckpt), str(clip), "--out", str(vout), "--no-kernels",
                      "--device", "cpu"])
    assert reconstruct.read_video(vout / "clip_recon.mp4")[0].shape == (4, 32, 40, 3)


def test_reconstruct_bad_inputs_give_clear_errors(ckpt, video_ckpt, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["--ckpt", str(ckpt), "--out", str(out), "--no-kernels", "--device", "cpu"]
    with pytest.raises(UserError, match="these do not exist: .*missing.png"):
        reconstruct.main([str(tmp_path / "missing.png"), *args])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((4, 20, 3), np.uint8)).save(tiny)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    photo = tmp_path / "p.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(photo)
    capsys.readouterr()
    # every bad file is reported and skipped; the good one is done and in psnr.json
    with pytest.raises(UserError, match=r"3 of 4 inputs failed .*psnr.json holds the 1 done"):
        reconstruct.main([str(garbage), str(tiny), str(photo), str(text), *args])
    err = capsys.readouterr().err
    assert re.search(r"failed: .*garbage.png: cannot read .*garbage.png as an image", err)
    assert re.search(r"failed: .*tiny.png: .*smaller than one 8x8 patch", err)
    assert re.search(r"failed: .*notes.txt: unsupported input", err)
    assert list(json.loads((out / "psnr.json").read_text())) == [str(photo)]
    assert (out / "p_recon.png").is_file() and not (out / "tiny_recon.png").exists()
    with pytest.raises(UserError, match="1 of 1 inputs failed"):
        reconstruct.main([str(photo), "--ckpt", str(video_ckpt), "--out", str(out)])
    assert "video model" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((ckpt / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        reconstruct.main([str(photo), "--ckpt", str(broken), "--out", str(out)])


@torch.no_grad()
def test_encode_then_decode_round_trips_and_resumes(ckpt, tmp_path):
    latents, decoded = tmp_path / "latents", tmp_path / "decoded"
    items = _val_items()
    n = len(items)
    assert n >= 2, "the contract's embedded:val should hold a few photos"
    shard = str((n + 1) // 2)  # two shards, the last one possibly short
    common = ["--ckpt", str(ckpt), "--no-kernels", "--device", "cpu"]
    index = encode.main([*common, "--data", "embedded:val", "--resolution", "32", "--out",
                         str(latents), "--shard-size", shard, "--batch-size", "3", "--num-workers", "0"])
    assert [s["count"] for s in index["shards"]] == [(n + 1) // 2, n // 2] and index["complete"]
    assert decode.main([*common, "--latents", str(latents), "--out", str(decoded)]) == n

    model = ViTok.from_pretrained(ckpt, use_kernels=False).eval()
    # each output is named after its source (decode.json pairs them), in item order
    written = json.loads((decoded / "decode.json").read_text())["items"]
    sources = [p for s in json.loads((latents / "index.json").read_text())["shards"]
               for p in s["paths"]]
    assert [w["source"] for w in written] == sources and len(set(sources)) == n
    for i, x in enumerate(items):
        expected = M.quantize(model.decode(model.encode(x[None]).mean))[0]
        assert written[i]["output"] == Path(sources[i]).name + ".png"  # skimage.data.<name>
        got = torch.from_numpy(np.array(Image.open(decoded / written[i]["output"]))).permute(2, 0, 1)
        assert (expected.int() - got.int()).abs().max() <= 1  # fp32 stored latents

    # an interrupted run (last shard lost, index not complete) resumes to the same files
    first = (latents / encode.shard_name(1)).read_bytes()
    state = json.loads((latents / "index.json").read_text())
    state.update(complete=False, shards=state["shards"][:1], num_samples=(n + 1) // 2)
    (latents / "index.json").write_text(json.dumps(state))
    (latents / encode.shard_name(1)).unlink()
    index = encode.main([*common, "--data", "embedded:val", "--resolution", "32", "--out",
                         str(latents), "--shard-size", shard, "--num-workers", "0"])
    assert index["num_samples"] == n and (latents / encode.shard_name(1)).read_bytes() == first

    with pytest.raises(ValueError, match="another run"):
        encode.main([*common, "--data", "embedded:val", "--resolution", "64", "--out", str(latents)])
    other = tmp_path / "c8"
    ViTok.from_name("T-T/8", channels=8, use_kernels=False).save_pretrained(other)
    with pytest.raises(ValueError, match="c=16.*c=8"):
        decode.main(["--ckpt", str(other), "--latents", str(latents), "--out", str(decoded),
                     "--device", "cpu"])
    with pytest.raises(FileNotFoundError, match="index.json"):
        decode.main([*common, "--latents", str(tmp_path), "--out", str(decoded)])


def test_training_checkpoint_folders_resolve_to_their_model(ckpt, tmp_path):
    import shutil

    from vitok_fast.evaluate import resolve_ckpt

    run = tmp_path / "step_000100"
    shutil.copytree(ckpt, run / "model")
    (run / "optimizer.pt").write_bytes(b"")
    assert resolve_ckpt(run) == run / "model"
    out = tmp_path / "grid.png"
    from vitok_fast import plots

    plots.main(["grid", "--ckpt", str(run), "--data", "embedded:val", "--resolution", "32", "--n",
                "2", "--no-kernels", "--device", "cpu", "--out", str(out)])
    assert Image.open(out).size[0] > 100
    shutil.copytree(ckpt, run / "ema")
    with pytest.raises(ValueError, match="several model checkpoints.*ema.*model"):
        resolve_ckpt(run)


def test_ckpt_may_be_a_training_run_directory(tmp_path, capsys):
    from vitok_fast.checkpoint import STATE_FILE
    from vitok_fast.evaluate import resolve_ckpt

    model = ViTok.from_name("T-T/8", use_kernels=False)
    for step in (10, 20):
        model.save_pretrained(tmp_path / f"step_{step:08d}")
        (tmp_path / f"step_{step:08d}" / STATE_FILE).write_bytes(b"")
    assert resolve_ckpt(tmp_path) == tmp_path / "step_00000020"
    model.save_pretrained(tmp_path / "step_00000020" / "ema")  # stage 2 keeps its EMA here
    assert resolve_ckpt(tmp_path) == tmp_path / "step_00000020" / "ema"
    assert "using the latest checkpoint of the run" in capsys.readouterr().err
