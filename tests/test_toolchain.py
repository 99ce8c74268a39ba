"""The tools as one chain (issue 16): each takes the size a checkpoint was trained at and says
so, run directories stand for their latest checkpoint everywhere, a checkpoint of the wrong
kind is named, class folders keep their names, and evaluate --generated reads folders as
every other tool reads data. tests/test_toolchain_walk.py chains them all on tiny data."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from vitok_fast import ViTok, evaluate, metrics as M, reconstruct
from vitok_fast.checkpoint import TRAINING_FILE, save_checkpoint, training_settings
from vitok_fast.cli import UserError
from vitok_fast.dit import DiT

CPU = ["--no-kernels", "--device", "cpu"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run directory whose one checkpoint was trained at 16 px."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = ViTok.from_name("T-T/8", use_kernels=False)
    save_checkpoint(run, 7, model, {"step": 7, "args": {"resolution": 16, "frames": 1,
                                                        "data": "photos"}})
    return run


def photos(root, sizes=((40, 40), (48, 64), (64, 48)), classes=("astronaut", "coffee")):
    """Class folders of small random photos, the same file names in each class."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    return root


def truncated_jpeg(path):
    buffer = path.with_suffix(".tmp.jpg")
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(buffer, quality=95)
    path.write_bytes(buffer.read_bytes()[:200])
    buffer.unlink()
    return path


def test_checkpoints_record_their_training_size(run_dir):
    ckpt = run_dir / "step_00000007"
    assert json.loads((ckpt / TRAINING_FILE).read_text())["resolution"] == 16
    assert training_settings(ckpt) == {"resolution": 16, "frames": 1, "step": 7, "data": "photos"}
    # a checkpoint written before training.json: its train state answers
    (ckpt / TRAINING_FILE).unlink()
    assert training_settings(ckpt)["resolution"] == 16
    save_checkpoint(run_dir, 7, ViTok.from_pretrained(ckpt),
                    {"step": 7, "args": {"resolution": 16, "frames": 1, "data": "photos"}})


def test_tools_default_to_the_training_resolution_and_say_so(run_dir, tmp_path, capsys):
    from vitok_fast import encode

    index = encode.main(["--ckpt", str(run_dir), "--data", "embedded:val", "--out",
                         str(tmp_path / "lat"), "--num-workers", "0", *CPU])
    first = capsys.readouterr().err.splitlines()[0]
    assert first == (f"encode: ViTok T-T/8 from {run_dir / 'step_00000007'} (the latest "
                     f"checkpoint of the run {run_dir}) at 16 px (its training resolution)")
    assert index["resolution"] == 16 and index["size_source"] == "checkpoint"
    from safetensors.torch import load_file
    assert load_file(tmp_path / "lat" / "latents-00000.safetensors")["mean"].shape[-2:] == (2, 2)

    # another resolution is allowed, and named as not the training one
    results = evaluate.main(["--ckpt", str(run_dir), "--data", "embedded:val", "--resolution",
                             "32", "--metrics", "psnr", "--num-workers", "0", *CPU])
    first = capsys.readouterr().err.splitlines()[0]
    assert first.endswith("at 32 px (given; NOT the training resolution 16 px)")
    assert (results["resolution"], results["trained_resolution"]) == (32, 16)
    assert results["size_source"] == "given"


def test_a_bare_model_folder_falls_back_to_the_default_with_a_note(tmp_path, capsys):
    from vitok_fast import latent_stats

    folder = tmp_path / "model"
    ViTok.from_name("T-T/8", use_kernels=False).save_pretrained(folder)
    stats = latent_stats.main(["--ckpt", str(folder), "--data", "embedded:val", "--max-samples",
                               "1", "--num-workers", "0", "--out", str(tmp_path / "s.json"), *CPU])
    assert stats["resolution"] == 256 and stats["size_source"] == "default"
    assert "checkpoint records no training resolution" in capsys.readouterr().err.splitlines()[0]


def test_from_pretrained_takes_a_run_directory_and_says_which_checkpoint(run_dir, capsys):
    model = ViTok.from_pretrained(run_dir)
    assert f"using the latest checkpoint of the run {run_dir}: {run_dir / 'step_00000007'}" \
        in capsys.readouterr().err
    same = ViTok.from_pretrained(run_dir / "step_00000007")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  same.state_dict().values()))


def test_a_checkpoint_of_the_wrong_kind_says_what_it_is(run_dir, tmp_path):
    dit = tmp_path / "dit"
    DiT.from_name("DiT-T/1", channels=16, num_classes=2).save_pretrained(dit)
    photo = tmp_path / "p.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(photo)
    with pytest.raises(ValueError, match="is a DiT checkpoint, not a ViTok"):
        reconstruct.main([str(photo), "--ckpt", str(dit), "--out", str(tmp_path / "o"), *CPU])
    with pytest.raises(ValueError, match="is a ViTok checkpoint, not a DiT"):
        DiT.from_pretrained(run_dir)


def test_reconstruct_walks_class_folders_and_names_outputs_after_their_source(run_dir, tmp_path,
                                                                              capsys):
    data = photos(tmp_path / "photos")
    out = tmp_path / "out"
    scores = reconstruct.main([str(data), "--ckpt", str(run_dir), "--out", str(out), *CPU])
    assert len(scores) == 6
    for c in ("astronaut", "coffee"):
        for i in range(3):
            recon = np.asarray(Image.open(out / c / f"{i}_recon.png"))
            assert recon.shape == (16, 16, 3)  # the training resolution
    record = json.loads((out / "reconstruct.json").read_text())
    assert record["resolution"] == 16 and record["size_source"] == "checkpoint"
    assert [f["output"] for f in record["files"]][:2] == ["astronaut/0", "astronaut/1"]
    assert "at 16 px (its training resolution)" in capsys.readouterr().err.splitlines()[0]
    native = reconstruct.main([str(data / "coffee" / "1.jpg"), "--ckpt", str(run_dir), "--out",
                               str(tmp_path / "native"), "--native", *CPU])
    assert len(native) == 1
    assert np.asarray(Image.open(tmp_path / "native" / "1_recon.png")).shape == (48, 64, 3)


def test_evaluate_generated_reads_class_folders_skips_bad_files_and_writes_its_json(tmp_path,
                                                                                   capsys):
    weights = M.save_random_inception(tmp_path / M.INCEPTION_FILE)
    generated = photos(tmp_path / "gen", sizes=((32, 32),))
    real = photos(tmp_path / "real", sizes=((40, 40), (48, 64)))  # two sizes, class folders
    bad = truncated_jpeg(real / "coffee" / "broken.jpg")
    result = evaluate.main(["--generated", str(generated), "--ref-stats", str(real),
                            "--inception", str(weights), "--device", "cpu", "--batch-size", "4"])
    assert result["num_samples"] == 2 and result["resolution"] == 32
    assert np.isfinite(result["gfid"]) and result["gfid"] > 0
    assert [s["path"] for s in result["ref_skipped"]] == [str(bad)]
    assert f"skipped unreadable --ref-stats file {bad}" in capsys.readouterr().err
    written = json.loads((generated / "eval_generated.json").read_text())  # the default --out
    assert written["gfid"] == result["gfid"]
    only_is = evaluate.main(["--generated", str(generated), "--stats-out", str(tmp_path / "s.npz"),
                             "--metrics", "gis", "--inception", str(weights), "--device", "cpu",
                             "--out", str(tmp_path / "is.json")])
    assert "gis" in only_is and "gfid" not in only_is


def test_evaluate_generated_options_give_a_way_out(tmp_path):
    generated = photos(tmp_path / "gen", sizes=((32, 32),))
    with pytest.raises(UserError, match=r"--metrics psnr: with --generated expected a subset of "
                                        r"gfid,gis"):
        evaluate.main(["--generated", str(generated), "--stats-out", str(tmp_path / "s.npz"),
                       "--metrics", "psnr"])
    with pytest.raises(FileNotFoundError) as error:
        evaluate.main(["--generated", str(generated), "--stats-out", str(tmp_path / "s.npz")])
    message = str(error.value)
    assert "pass --inception PATH" in message and "--metrics cannot leave it out" in message
    assert not re.search(r"leave the metric out with --metrics", message)


def test_evaluate_checks_metric_names_before_the_model_loads(monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --metrics was checked")

    monkeypatch.setattr(ViTok, "from_pretrained", no_loading)
    with pytest.raises(UserError, match="--metrics psnr,gfid: unknown gfid; expected a subset"):
        evaluate.main(["--ckpt", "nowhere", "--data", "embedded:val", "--metrics", "psnr,gfid",
                       *CPU])
