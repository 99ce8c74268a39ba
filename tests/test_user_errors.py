"""Every user error of every command-line tool is one line: ``error: <message>`` on stderr,
exit status 2, no traceback, and the message names the flag or file at fault.

Most cases call a tool's ``main`` in-process under ``cli.run`` (as its ``__main__`` does);
one bad command line per tool runs as a real subprocess, which also proves that the tool's
``__main__`` goes through ``cli.run``. docs/reliability.md lists these cases.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitok_fast import ViTok, cli
from vitok_fast import decode, encode, evaluate, plots, reconstruct
from vitok_fast.checkpoint import save_checkpoint

from _scripts import ROOT, load_script


stage1, stage2, dit = (load_script(f"train/{name}.py") for name in ("stage1", "stage2", "dit"))
TOOLS = {"stage1": stage1.main, "stage2": stage2.main, "dit": dit.main, "evaluate": evaluate.main,
         "encode": encode.main, "decode": decode.main, "reconstruct": reconstruct.main,
         "plots": plots.main}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One folder with everything the bad command lines point at."""
    root = tmp_path_factory.mktemp("user_errors")
    model = ViTok.from_name("T-T/8", use_kernels=False)
    model.save_pretrained(root / "ckpt")
    rng = np.random.default_rng(0)
    (root / "photos").mkdir()
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "photos" / name)
    (root / "photos" / "notes.txt").write_text("not an input")
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(root / "tiny.png")
    (root / "corrupt.pth").write_bytes(b"garbage, not a torch file")
    (root / "truncated").mkdir()
    (root / "truncated" / "config.json").write_text((root / "ckpt" / "config.json").read_text())
    (root / "truncated" / "model.safetensors").write_bytes(
        (root / "ckpt" / "model.safetensors").read_bytes()[:1000])
    (root / "a_file").write_text("a file, not a directory")
    (root / "latents").mkdir()  # an encode folder made with 8 channels at 32px
    other = ViTok.from_name("T-T/8", channels=8, use_kernels=False).config
    (root / "latents" / "index.json").write_text(json.dumps({
        "model": "T-T/8", "config": json.loads(other.to_json()), "resolution": 32, "frames": 1,
        "dtype": "float32", "shard_size": 1024, "shards": [], "num_samples": 0,
        "complete": False}))
    # training runs: a stage-1 run of T-T/8 c=16, and runs of other models to resume into
    save_checkpoint(root / "s1", 10, model, {"step": 10})
    save_checkpoint(root / "run_c8", 10, ViTok.from_name("T-T/8", channels=8), {"step": 10})
    save_checkpoint(root / "run_p16", 10, ViTok.from_name("T-T/16"), {"step": 10})
    c8 = ViTok.from_name("T-T/8", channels=8)
    save_checkpoint(root / "s2_c8", 10, c8, {"step": 10}, extra_models={"ema": c8})
    return root


def _train(out, *extra):
    return ["--smoke", "--no-kernels", "--num-workers", "0", "--out", str(out), *extra]


def _ckpt(f):
    return ["--ckpt", str(f / "ckpt"), "--no-kernels", "--device", "cpu"]


# (id, tool, argv from the files folder, words the message must contain)
CASES = [
    # -- the cases of issue 12 ---------------------------------------------------------------
    ("stage2-init-auto", "stage2", lambda f: _train(f / "o", "--ckpt", "auto"), ["--ckpt", "'auto'"]),
    ("eval-every-0", "stage1", lambda f: _train(f / "o", "--eval-every", "0"), ["--eval-every", "0"]),
    ("save-every-0", "stage1", lambda f: _train(f / "o", "--save-every", "0"), ["--save-every", "0"]),
    ("val-images-0", "stage1", lambda f: _train(f / "o", "--val-images", "0"), ["--val-images", "0"]),
    ("keep-0", "stage1", lambda f: _train(f / "o", "--keep", "0"), ["--keep", "0"]),
    ("reconstruct-resolution-0", "reconstruct",
     lambda f: [str(f / "photos" / "a.png"), "--out", str(f / "o"), "--resolution", "0", *_ckpt(f)],
     ["--resolution", "0"]),
    ("resume-other-channels", "stage1", lambda f: _train(f / "run_c8"),
     ["run_c8", "channels: 8 -> 16", "--resume ''"]),
    ("resume-other-model-size", "stage1", lambda f: _train(f / "run_p16"),
     ["run_p16", "T-T/16", "patch_size: 16 -> 8"]),
    ("stage2-resume-other-channels", "stage2",
     lambda f: _train(f / "s2_c8", "--ckpt", str(f / "s1")), ["s2_c8", "channels: 8 -> 16"]),
    ("inception-corrupt", "evaluate",
     lambda f: [*_ckpt(f), "--data", str(f / "photos"), "--metrics", "fid",
                "--inception", str(f / "corrupt.pth")], ["--inception", "corrupt.pth"]),
    ("lpips-vgg-corrupt", "evaluate",
     lambda f: [*_ckpt(f), "--data", str(f / "photos"), "--metrics", "lpips",
                "--lpips-vgg", str(f / "corrupt.pth")], ["--lpips-vgg", "corrupt.pth"]),
    ("encode-folder-other-settings", "encode",
     lambda f: [*_ckpt(f), "--data", str(f / "photos"), "--resolution", "32",
                "--out", str(f / "latents")], ["latents", "config.channels: 8 -> 16"]),
    ("training-without-data", "stage1", lambda f: ["--out", str(f / "o"), "--no-kernels"],
     ["--data", "embedded"]),
    ("dit-without-latents", "dit", lambda f: ["--out", str(f / "o")], ["--latents"]),
    ("dit-latents-missing", "dit", lambda f: ["--latents", str(f / "nope"), "--out",
                                              str(f / "o")], ["--latents", "nope"]),
    ("dit-save-every-0", "dit", lambda f: ["--smoke", "--save-every", "0", "--out",
                                           str(f / "o")], ["--save-every", "0"]),
    ("dit-class-dropout-2", "dit", lambda f: ["--smoke", "--class-dropout", "2", "--out",
                                              str(f / "o")], ["--class-dropout", "2"]),
    # -- counts: negative, zero, not an integer; numbers out of range ------------------------
    ("micro-batch-negative", "stage1", lambda f: _train(f / "o", "--micro-batch-size", "-4"),
     ["--micro-batch-size", "-4"]),
    ("max-steps-not-integer", "stage1", lambda f: _train(f / "o", "--max-steps", "2.5"),
     ["--max-steps", "2.5"]),
    ("lr-negative", "stage1", lambda f: _train(f / "o", "--lr", "-0.001"), ["--lr", "-0.001"]),
    ("warmup-frac-above-1", "stage1", lambda f: _train(f / "o", "--warmup-frac", "3"),
     ["--warmup-frac", "between 0 and 1"]),
    ("ema-decay-nan", "stage2", lambda f: _train(f / "o", "--ckpt", str(f / "s1"), "--ema-decay",
                                                 "nan"), ["--ema-decay", "nan"]),
    ("evaluate-batch-size-0", "evaluate",
     lambda f: [*_ckpt(f), "--data", str(f / "photos"), "--batch-size", "0"], ["--batch-size", "0"]),
    ("decode-max-samples-not-integer", "decode",
     lambda f: [*_ckpt(f), "--latents", str(f / "latents"), "--out", str(f / "o"),
                "--max-samples", "2.5"], ["--max-samples", "2.5"]),
    ("encode-shard-size-negative", "encode",
     lambda f: [*_ckpt(f), "--data", str(f / "photos"), "--out", str(f / "o"),
                "--shard-size", "-1"], ["--shard-size", "-1"]),
    ("plots-n-0", "plots", lambda f: ["grid", *_ckpt(f), "--data", str(f / "photos"), "--n", "0",
                                      "--out", str(f / "g.png")], ["--n", "0"]),
    # -- sizes that do not fit the model --------------------------------------------------------
    ("training-resolution-not-patch-multiple", "stage1",
     lambda f: _train(f / "o", "--resolution", "30"), ["--resolution", "patch size 8", "30"]),
    ("training-frames-not-tubelet-multiple", "stage1",
     lambda f: _train(f / "o", "--model", "T-T/2x8", "--frames", "3"), ["--frames", "tubelet size 2"]),
    ("evaluate-resolution-not-patch-multiple", "evaluate",
     lambda f: [*_ckpt(f), "--data", str(f / "photos"), "--resolution", "20"], ["--resolution", "20"]),
    ("encode-frames-for-image-model", "encode",
     lambda f: [*_ckpt(f), "--data", str(f / "photos"), "--out", str(f / "o"), "--frames", "4"],
     ["--frames 4", "image model"]),
    ("reconstruct-tile-100", "reconstruct",
     lambda f: [str(f / "photos"), "--out", str(f / "o"), "--tile", "100", *_ckpt(f)],
     ["--tile", "100", "patch size 8"]),
    ("reconstruct-overlap-without-tile", "reconstruct",
     lambda f: [str(f / "photos"), "--out", str(f / "o"), "--overlap", "8", *_ckpt(f)],
     ["--overlap", "--tile"]),
    ("decode-overlap-not-below-tile", "decode",
     lambda f: [*_ckpt(f), "--latents", str(f / "latents"), "--out", str(f / "o"), "--tile", "16",
                "--overlap", "16"], ["--overlap", "16"]),
    # -- unknown choices -------------------------------------------------------------------------
    ("unknown-model", "stage1", lambda f: _train(f / "o", "--model", "S-X/16"), ["--model", "S-X/16"]),
    ("unknown-dtype", "evaluate", lambda f: [*_ckpt(f), "--data", "x", "--dtype", "fp16"],
     ["--dtype", "fp16"]),
    ("unknown-metric", "evaluate",
     lambda f: [*_ckpt(f), "--data", str(f / "photos"), "--metrics", "psnr,fvd"],
     ["--metrics", "fvd", "psnr,ssim,lpips,fid"]),
    ("unknown-device", "reconstruct",
     lambda f: [str(f / "tiny.png"), "--out", str(f / "o"), "--ckpt", str(f / "ckpt"),
                "--device", "tpu"], ["--device", "tpu"]),
    ("unknown-parallel", "stage1", lambda f: _train(f / "o", "--parallel", "zero3"),
     ["--parallel", "zero3"]),
    # -- missing files, directories where files are expected and the reverse -----------------
    ("missing-checkpoint", "reconstruct",
     lambda f: [str(f / "tiny.png"), "--out", str(f / "o"), "--ckpt", str(f / "nope")],
     ["--ckpt", "nope"]),
    ("truncated-safetensors", "evaluate",
     lambda f: ["--ckpt", str(f / "truncated"), "--data", str(f / "photos")],
     ["truncated", "model.safetensors"]),
    ("missing-input", "reconstruct",
     lambda f: [str(f / "missing.png"), "--out", str(f / "o"), *_ckpt(f)], ["missing.png"]),
    ("missing-data", "encode", lambda f: [*_ckpt(f), "--data", str(f / "nope"), "--out", str(f / "o")],
     ["--data", "nope"]),
    ("training-missing-data", "stage1", lambda f: _train(f / "o", "--data", str(f / "nope")),
     ["--data", "nope"]),
    ("training-val-data-without-images", "stage1",
     lambda f: _train(f / "o", "--val-data", str(f / "latents")), ["--val-data", "latents"]),
    ("missing-init", "stage2", lambda f: _train(f / "o", "--ckpt", str(f / "nope")), ["--ckpt", "nope"]),
    ("init-without-checkpoints", "stage2", lambda f: _train(f / "o", "--ckpt", str(f / "photos")),
     ["--ckpt", "photos", "stage-1"]),
    ("missing-log", "plots", lambda f: ["curves", str(f / "nope.jsonl"), "--out", str(f / "c.png")],
     ["nope.jsonl"]),
    ("latents-is-a-file", "decode",
     lambda f: [*_ckpt(f), "--latents", str(f / "a_file"), "--out", str(f / "o")],
     ["--latents", "a_file", "is a file"]),
    ("out-dir-is-a-file", "reconstruct",
     lambda f: [str(f / "tiny.png"), "--out", str(f / "a_file"), *_ckpt(f)], ["--out", "a_file"]),
    ("training-out-dir-is-a-file", "stage1", lambda f: _train(f / "a_file"), ["--out", "a_file"]),
    ("evaluate-out-is-a-directory", "evaluate",
     lambda f: [*_ckpt(f), "--data", str(f / "photos"), "--out", str(f / "photos")],
     ["--out", "photos", "is a directory"]),
    ("plots-sweep-json-is-a-directory", "plots",
     lambda f: ["sweep", str(f / "photos"), "--out", str(f / "s.png")], ["photos", "is a directory"]),
]


def _fails(main, argv, capsys):
    """Run ``main(argv)`` as its ``__main__`` does; return (exit status, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("tool,argv,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_line_naming_the_flag_or_file(files, tool, argv, words, capsys,
                                                        monkeypatch):
    monkeypatch.delenv("VITOK_DEBUG", raising=False)
    monkeypatch.chdir(files)  # a default run directory lands here, never in the checkout
    code, err = _fails(TOOLS[tool], argv(files), capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2, err
    assert "Traceback" not in err
    assert last.startswith("error: "), err
    for word in words:
        assert word in last, f"{word!r} not in {last!r}"


def test_reconstruct_takes_a_folder_and_goes_on_past_bad_files(files, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _fails(reconstruct.main, [str(files / "photos"), str(files / "tiny.png"),
                                          "--out", str(out), *_ckpt(files)], capsys)
    # the folder's two images are done; the 5x5 image is reported, skipped, and fails the run
    assert code == 2 and "Traceback" not in err
    assert "failed: " in err and "tiny.png" in err and "smaller than one 8x8 patch" in err
    assert err.strip().splitlines()[-1].startswith("error: 1 of 3 inputs failed")
    scores = json.loads((out / "psnr.json").read_text())
    assert sorted(Path(k).name for k in scores) == ["a.png", "b.jpg"]
    assert all(0 < v < 60 for v in scores.values())
    assert (out / "a_recon.png").is_file() and (out / "b_recon.png").is_file()


def test_debug_shows_the_traceback(files, monkeypatch):
    monkeypatch.setenv("VITOK_DEBUG", "1")
    with pytest.raises(cli.UserError, match="--keep"):
        cli.run(stage1.main, _train(files / "o", "--keep", "0"))


def test_video_models_train_at_the_papers_128p_and_images_at_256p():
    video = stage1.parse_args(["--model", "T-T/2x8", "--data", "embedded-video"])
    image = stage1.parse_args(["--model", "T-T/8", "--data", "embedded"])
    assert (video.resolution, video.frames) == (128, 16)
    assert (image.resolution, image.frames) == (256, 1)
    assert stage1.parse_args(["--smoke"]).data == "embedded"  # --smoke keeps its photos


# One bad command line per tool as a real process: its __main__ must go through cli.run.
PROCESS_CASES = [
    ("stage1", lambda f: [str(ROOT / "train" / "stage1.py"), "--smoke", "--max-steps", "0"],
     "--max-steps"),
    ("stage2", lambda f: [str(ROOT / "train" / "stage2.py"), "--smoke", "--ckpt", "auto"], "--ckpt"),
    ("dit", lambda f: [str(ROOT / "train" / "dit.py"), "--smoke", "--keep", "0"], "--keep"),
    ("evaluate", lambda f: ["-m", "vitok_fast.evaluate", "--ckpt", str(f / "truncated"),
                            "--data", str(f / "photos")], "model.safetensors"),
    ("encode", lambda f: ["-m", "vitok_fast.encode", "--ckpt", str(f / "ckpt"), "--data",
                          str(f / "photos"), "--out", str(f / "o"), "--tile", "100"], "--tile"),
    ("decode", lambda f: ["-m", "vitok_fast.decode", "--ckpt", str(f / "nope"), "--latents",
                          str(f / "latents"), "--out", str(f / "o")], "nope"),
    ("reconstruct", lambda f: ["-m", "vitok_fast.reconstruct", "--ckpt", str(f / "nope"),
                               str(f / "tiny.png"), "--out", str(f / "o")], "nope"),
    ("plots", lambda f: ["-m", "vitok_fast.plots", "curves", str(f / "nope.jsonl"), "--out",
                         str(f / "c.png")], "nope.jsonl"),
]


@pytest.mark.parametrize("argv,word", [c[1:] for c in PROCESS_CASES],
                         ids=[c[0] for c in PROCESS_CASES])
def test_command_line_prints_one_error_line_and_exits_2(files, argv, word):
    env = {k: v for k, v in os.environ.items() if k != "VITOK_DEBUG"}
    proc = subprocess.run([sys.executable, *argv(files)], capture_output=True, text=True,
                          cwd=files, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert word in proc.stderr


# -- the model's own edge: dtypes, and what NaN / inf inputs do -----------------------------


@pytest.fixture(scope="module")
def model():
    return ViTok.from_name("T-T/8", use_kernels=False).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_pixels_of_another_dtype_are_refused_naming_both_dtypes(model, dtype):
    x = torch.zeros(1, 3, 16, 16, dtype=dtype)
    with pytest.raises(TypeError, match=rf"model's dtype torch.float32 .* got dtype {dtype}"):
        model.encode(x)
    with pytest.raises(TypeError, match=rf"model's dtype torch.float32 .* got dtype {dtype}"):
        model.encode(x, tile=8)
    with pytest.raises(TypeError, match=rf"model's dtype torch.float32 .* got dtype {dtype}"):
        model.decode(torch.zeros(1, 16, 2, 2, dtype=dtype))


@torch.no_grad()
def test_half_precision_pixels_work_under_autocast_and_float64_does_not(model):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.encode(x.bfloat16()).mean
        with pytest.raises(TypeError, match="got dtype torch.float64"):
            model.encode(x.double())
    reference = model.encode(x).mean
    assert z.shape == reference.shape
    assert (z.float() - reference).abs().max().item() < 0.1  # bf16 rounding, not garbage
    exact = ViTok.from_name("T-T/8", use_kernels=False).double().eval()  # reference maths:
    exact.load_state_dict(model.state_dict())                         # float64 in and out
    assert (exact.encode(x.double()).mean - reference).abs().max().item() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nonfinite_pixel_makes_its_own_sample_nan_and_no_other(model, value):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x[0, 0, 0, 0] = value
    z = model.encode(x).mean
    assert z[0].isnan().float().mean().item() == 1.0  # attention spreads it to every token
    assert torch.isfinite(z[1]).all()
    recon = model.decode(z)
    assert recon[0].isnan().float().mean().item() == 1.0 and torch.isfinite(recon[1]).all()
