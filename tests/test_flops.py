"""bench/flops.py: counts against the paper's tables, one counter for ViTok and SD-VAE."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitok_fast import ViTokConfig
from vitok_fast.flops import count_sd_vae, count_vitok

ROOT = Path(__file__).resolve().parents[1]

# [paper] Tables 1, 3 and 5: (model, resolution, frames) -> (params M or None, GMACs).
TARGETS = [
    ("S-B/16", 256, 1, 129.0, 34.8),
    ("S-B/16", 512, 1, None, 160.8),
    ("S-L/16", 256, 1, 426.8, 113.4),
    ("S-B/4x8", 128, 16, None, 160.8),
    ("S-B/8x8", 128, 16, None, 73.2),
]


@pytest.mark.parametrize("name,res,frames,params_m,gmacs", TARGETS)
def test_counts_within_one_percent_of_paper(name, res, frames, params_m, gmacs):
    row = count_vitok(ViTokConfig.from_name(name), res, frames)
    assert abs(row["total"]["macs"] / 1e9 - gmacs) / gmacs < 0.01
    if params_m is not None:
        assert abs(row["total"]["params"] / 1e6 - params_m) / params_m < 0.01


def test_s_b_4x16_miss_is_the_larger_tubelet_embed_and_head():
    # The paper gives S-B/4x16 the same 34.8 GMACs as S-B/16 at 256p (both 256 tokens), which
    # leaves out that its embed and head map 4*16*16*3 = 3072 values per tubelet instead of 768.
    video = count_vitok(ViTokConfig.from_name("S-B/4x16"), 128, 16)["total"]["macs"]
    image = count_vitok(ViTokConfig.from_name("S-B/16"), 256, 1)["total"]["macs"]
    assert video - image == 256 * 2 * (3072 - 768) * 768
    assert abs(image / 1e9 - 34.8) / 34.8 < 0.01


def test_linear_and_attention_macs_by_hand():
    # S-B/16 at 256p: every Linear costs tokens x in x out; attention 2 N^2 d per block.
    cfg = ViTokConfig.from_name("S-B/16")
    row = count_vitok(cfg, 256)
    N, d, h = 256, 768, 2048
    block = 4 * d * d + 3 * d * h
    enc = N * (768 * d + cfg.encoder_depth * block + d * 32) + cfg.encoder_depth * 2 * N * N * d
    dec = N * (16 * d + cfg.decoder_depth * block + d * 768) + cfg.decoder_depth * 2 * N * N * d
    assert row["encoder"]["macs"] == enc and row["decoder"]["macs"] == dec
    assert row["latent_shape"] == [16, 16, 16] and row["E"] == 4096


def test_sd_vae_counts_and_frame_by_frame_video():
    image = count_sd_vae(256)
    assert round(image["total"]["params"] / 1e6, 1) == 83.7  # docs/design.md section 3: about 83.7M as shipped
    assert 440e9 < image["total"]["macs"] < 450e9  # docs/design.md section 3: about 445 G multiply-adds
    assert image["latent_shape"] == [4, 32, 32] and image["E"] == 4096
    video = count_sd_vae(128, frames=16)
    assert video["total"]["macs"] == 16 * count_sd_vae(128)["total"]["macs"]
    assert video["latent_shape"] == [16, 4, 16, 16]


def test_cli_json_all_rows_and_ratio():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "flops.py"), "--all", "--json", "-"],
                         capture_output=True, text=True, timeout=300, check=True)
    payload = json.loads(out.stdout)
    rows = {(r["model"], r["resolution"], r["frames"]): r for r in payload["rows"]}
    assert ("S-B/16", 512, 1) in rows and ("S-B/4x16", 128, 16) in rows and len(rows) == 9
    row = rows[("S-B/16", 256, 1)]
    for part in ("encoder", "decoder", "total"):
        assert set(row[part]) == {"params", "macs"}
        assert set(row["sd_vae"][part]) == {"params", "macs"}
    assert row["total"]["macs"] == row["encoder"]["macs"] + row["decoder"]["macs"]
    ratio = row["sd_vae"]["total"]["macs"] / row["total"]["macs"]
    assert row["macs_ratio_sd_vae_over_vitok"] == pytest.approx(ratio)
    assert 12 < ratio < 14
    assert row["paper"]["total"] == {"params_m": 129.0, "gmacs": 34.8}


def test_cli_table_and_json_file(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "flops.py"), "--model", "S-B/16",
                          "--resolution", "512", "--json", str(tmp_path / "c.json")],
                         capture_output=True, text=True, timeout=300, check=True)
    assert "ViTok S-B/16" in out.stdout and "SD-VAE" in out.stdout and "GMACs" in out.stdout
    row = json.loads((tmp_path / "c.json").read_text())["rows"][0]
    assert row["resolution"] == 512 and row["latent_shape"] == [16, 32, 32]


def test_cli_unknown_model_is_a_clear_error():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "flops.py"), "--model", "S-Q/16"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "unknown model name 'S-Q/16'" in out.stderr


def test_cli_size_not_divisible_by_patch_is_a_clear_error():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "flops.py"), "--model", "S-B/16",
                          "--resolution", "250"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "H must be a positive multiple of the patch size 16 for S-B/16, got H = 250" in out.stderr
