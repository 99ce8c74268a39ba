"""evaluate(): its numbers equal the reference packages', for images and videos, on one
process and across two gloo ranks; plots read evaluate's JSON."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vitok_fast import ViTok, metrics as M
from vitok_fast.data import make_dataset
from vitok_fast.evaluate import evaluate, format_table
from vitok_fast.perceptual import load_lpips


def _hwc(u8):
    return u8.permute(1, 2, 0).numpy()


@torch.no_grad()
def test_evaluate_equals_scikit_image_and_lpips_package():
    import lpips

    model = ViTok.from_name("T-T/8", use_kernels=False).eval()
    dataset = make_dataset("embedded:val", 32, train=False)
    ours = load_lpips(pretrained_backbone=False)
    results = evaluate(model, dataset, metrics=("psnr", "ssim", "lpips"), batch_size=2,
                       lpips_model=ours, progress=False)  # an odd count gives a ragged last batch

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        reference = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    reference.load_state_dict(ours.state_dict())  # same random backbone, the package's code
    p, s, l = [], [], []
    items = list(torch.utils.data.DataLoader(dataset, batch_size=None))  # contract only
    for x in items:
        x = x[None]
        real, fake = M.quantize(x)[0], M.quantize(model(x, sample=False)[0])[0]
        p.append(peak_signal_noise_ratio(_hwc(real), _hwc(fake), data_range=255))
        s.append(structural_similarity(_hwc(real), _hwc(fake), gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=255, channel_axis=-1))
        l.append(reference(M.dequantize(real)[None], M.dequantize(fake)[None]).item())
    assert results["num_samples"] == len(items)
    assert abs(results["psnr"] - np.mean(p)) < 1e-4
    assert abs(results["ssim"] - np.mean(s)) < 1e-3
    assert abs(results["lpips"] - np.mean(l)) < 1e-5
    assert "PSNR" in format_table(results)


def test_evaluate_streams_and_max_samples_give_the_map_style_numbers():
    model = ViTok.from_name("T-T/8", use_kernels=False).eval()
    images = [torch.rand(3, 16, 16) * 2 - 1 for _ in range(5)]

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(images)

    kw = dict(metrics=("psnr", "ssim"), batch_size=3, progress=False)
    first4 = evaluate(model, images[:4], **kw)
    streamed = evaluate(model, Stream(), max_samples=4, num_workers=2, **kw)
    assert streamed["num_samples"] == 4
    assert abs(streamed["psnr"] - first4["psnr"]) < 1e-9
    assert abs(streamed["ssim"] - first4["ssim"]) < 1e-9
    assert evaluate(model, images, **kw)["psnr"] != first4["psnr"]


@torch.no_grad()
def test_evaluate_videos_per_frame_metrics_and_rfvd():
    torch.manual_seed(0)
    model = ViTok.from_name("T-T/2x8", use_kernels=False).eval()
    clips = [torch.rand(3, 16, 16, 16) * 2 - 1 for _ in range(2)]
    results = evaluate(model, clips, batch_size=2, lpips_model=load_lpips(pretrained_backbone=False),
                       i3d=M.I3D().eval(), progress=False)
    assert set(results) == {"num_samples", "psnr", "ssim", "lpips", "rfvd"}
    x = torch.stack(clips)
    real, fake = M.quantize(x), M.quantize(model(x, sample=False)[0])
    per_frame = M.psnr(real.transpose(1, 2).flatten(0, 1), fake.transpose(1, 2).flatten(0, 1))
    assert abs(results["psnr"] - per_frame.mean().item()) < 1e-6
    assert np.isfinite(results["rfvd"]) and results["rfvd"] > 0


def test_evaluate_rejects_wrong_items_and_unknown_metrics():
    model = ViTok.from_name("T-T/2x8", use_kernels=False).eval()
    with pytest.raises(ValueError, match=r"\(3, T, H, W\) clips"):
        evaluate(model, [torch.zeros(3, 16, 16)], metrics=("psnr",), progress=False)
    with pytest.raises(ValueError, match="unknown metrics \\['fid'\\]"):
        evaluate(model, [], metrics=("fid",), progress=False)
    with pytest.raises(ValueError, match="no network"):
        evaluate(model, [], metrics=("fvd",), progress=False)


def test_two_gloo_ranks_give_the_single_process_numbers(tmp_path):
    ckpt = tmp_path / "ckpt"
    ViTok.from_name("T-T/8", use_kernels=False).save_pretrained(ckpt)
    common = ["--ckpt", str(ckpt), "--data", "embedded:val", "--resolution", "32",
              "--metrics", "psnr,ssim", "--no-kernels", "--num-workers", "0", "--batch-size", "1",
              "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, "-m", "vitok_fast.evaluate", *common, "--out", str(one)],
                   check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--standalone", "-m", "vitok_fast.evaluate", *common, "--out", str(two)],
                   check=True, env=env, capture_output=True)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["num_samples"] == b["num_samples"] >= 2
    assert abs(a["psnr"] - b["psnr"]) < 1e-9 and abs(a["ssim"] - b["ssim"]) < 1e-9


def test_plots_write_pngs(tmp_path):
    from PIL import Image

    from vitok_fast import plots

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    grid = plots.reconstruction_grid(x, (x + 0.1).clamp(-1, 1), tmp_path / "grid.png")
    assert Image.open(grid).size[0] > 100
    runs = []
    for c, (fid, psnr) in zip((4, 16, 64), ((3.0, 22.0), (1.5, 25.0), (0.8, 28.0))):
        path = tmp_path / f"eval_c{c}.json"
        path.write_text(json.dumps({"model": "S-B/16", "resolution": 256, "channels": c,
                                    "E": 256 * c, "rfid": fid, "psnr": psnr}))
        runs.append(path)
    sweep = plots.bottleneck_sweep(runs, tmp_path / "sweep.png")
    assert Image.open(sweep).size[0] >= 2 * Image.open(sweep).size[1]  # two panels side by side
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "loss": 1 / (s + 1), "lr": 1e-4, "note": "x"})
                             for s in range(20)))
    assert set(plots.read_log(log)) == {"loss", "lr"}
    assert plots.read_log(log)["loss"][1][-1] == pytest.approx(1 / 20)
    assert Image.open(plots.training_curves(log, tmp_path / "curves.png")).size[0] > 100
    csv_log = tmp_path / "log.csv"
    csv_log.write_text("step,loss\n0,1.0\n1,0.5\n")
    assert plots.read_log(csv_log)["loss"][1].tolist() == [1.0, 0.5]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="no 'E' field"):
        plots.bottleneck_sweep([bad], tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plots.read_log(tmp_path / "missing.jsonl")
