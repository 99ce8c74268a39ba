"""bench/peers.py and ``bench/flops.py --against``: today's tokenizers, built on the meta device."""

import importlib.util
import json
import math
import sys

import pytest

from _scripts import load_script

peers = load_script("bench/peers.py")

pytest.importorskip("diffusers")


def _buildable():
    return [p for p in peers.PEERS if peers.unavailable(p) is None]


def test_every_peer_builds_on_meta_with_a_cited_config():
    import diffusers

    built = 0
    for p in peers.PEERS:
        assert p.source and p.name == p.name.lower() and " " not in p.name
        why = peers.unavailable(p)
        if why is not None:  # only RAE may lack its optional package, and it says so
            assert p.requires and why.startswith(f"{p.name}: ") and "\n" not in why
            continue
        model = peers.build(p)
        assert type(model) is getattr(diffusers, p.cls)
        assert all(t.is_meta for t in model.parameters())
        assert sum(t.numel() for t in model.parameters()) > 1e6
        built += 1
    assert built >= len(peers.PEERS) - 1


# [published] totals, where the tokenizer's authors give one (cited in bench/peers.py).
PUBLISHED = [(p.name, p.published_params) for p in peers.PEERS if p.published_params]


@pytest.mark.parametrize("name,published", PUBLISHED)
def test_parameters_within_one_percent_of_published(name, published):
    model = peers.build(peers.BY_NAME[name])
    counted = sum(t.numel() for t in model.parameters())
    assert abs(counted - published) / published < 0.01


def test_published_totals_cover_sd_vae_and_wan():
    assert {"sd-vae", "wan2.1-vae"} <= {n for n, _ in PUBLISHED}


# Counts held stable (this file's first run, diffusers 0.42.1): a change in diffusers or in
# our counting shows up here. (name, resolution) -> (params, params_encoder, latent, MACs enc, dec)
STABLE = {
    ("taesd", 256): (2445063, 1222532, [4, 32, 32], 15290597376, 17668767744),
    ("sd-vae", 256): (83653863, 34163664, [4, 32, 32], 136361082880, 311093641216),
    ("cosmos-cv8x8x8", 128): (105653696, 42914864, [16, 3, 16, 16], 47173738072, 86251339776),
    ("ltx-video-0.9.0-vae", 128): (419193649, 180404353, [128, 3, 4, 4], 118941687808, 127660982272),
    # One pass over the clip: diffusers' default overlapping 17-frame windows would add 32%.
    ("hunyuanvideo-vae", 128): (246478803, 100342464, [16, 5, 16, 16], 1291005984768, 2437276827648),
}


@pytest.mark.parametrize("name,resolution", list(STABLE))
def test_counts_are_stable(name, resolution):
    c = peers.count(peers.BY_NAME[name], resolution)
    assert (c["params"], c["params_encoder"], c["latent_shape"], c["macs_encode"],
            c["macs_decode"]) == STABLE[(name, resolution)]
    assert c["params_decoder"] == c["params"] - c["params_encoder"]


def test_sd_vae_peer_is_the_flops_sd_vae():
    from vitok_fast.flops import count_sd_vae

    ours = peers.count(peers.BY_NAME["sd-vae"], 256)
    theirs = count_sd_vae(256)
    assert ours["macs_encode"] + ours["macs_decode"] == theirs["total"]["macs"]
    assert ours["params_encoder"] == theirs["encoder"]["params"]


def test_clip_lengths_nearest_sixteen_frames():
    assert peers.frames_for(peers.BY_NAME["wan2.1-vae"]) == 17  # 1 + 4k
    assert peers.frames_for(peers.BY_NAME["cosmos-cv8x8x8"]) == 17  # 1 + 8k
    assert peers.frames_for(peers.BY_NAME["mochi-vae"]) == 19  # 1 + 6k: 13 would be fewer than 16
    assert peers.frames_for(peers.BY_NAME["taesd"]) == 1


def test_vidtok_pads_like_its_own_forward():
    # 17 frames in, 3 copies of the first in front: 5 latent frames and 17 frames out.
    c = peers.count(peers.BY_NAME["vidtok-kl-causal-488-4chn"], 128)
    assert c["latent_shape"] == [4, 5, 16, 16] and c["output_shape"] == [3, 17, 128, 128]


def test_matched_compression_widens_c_or_takes_a_larger_paper_tubelet():
    def m(kind, target):
        config = peers.matched_vitok(kind, target)
        return config.name, config.channels

    assert m("image", 12.0) == ("S-B/16", 64)  # FLUX.1: more channels
    assert m("image", 1.0) == ("S-B/16", 768)  # RAE
    assert m("image", 96.0) == ("S-B/32", 32)  # DC-AE f32c32: c >= 16, so a larger patch
    assert m("video", 40.8) == ("S-B/4x8", 19)  # Wan 2.1: the paper's tubelet within 5%
    assert m("video", 136.0) == ("S-B/4x16", 23)  # LTX-Video: 133.6, as the issue expects
    assert m("video", 68.0) == ("S-B/4x16", 45)  # Cosmos


def test_select_groups_and_unknown_names():
    assert [p.name for p in peers.select("taesd,images")][:2] == ["taesd", "sd-vae"]
    assert len(peers.select("all")) == len(peers.PEERS)
    assert all(p.kind == "video" for p in peers.select("videos"))
    with pytest.raises(ValueError, match="unknown tokenizer 'sdvae'.*sd-vae, flux1-vae"):
        peers.select("sdvae")


def test_rae_without_transformers_is_skipped_with_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    why = peers.unavailable(peers.BY_NAME["rae-dinov2-b"])
    assert why == ("rae-dinov2-b: AutoencoderRAE needs the optional package 'transformers'; "
                   "pip install 'vitok_fast[peers]'")
    result = peers.compare([peers.BY_NAME["rae-dinov2-b"]], (256,), ())
    assert result["rows"] == [] and result["skipped"] == [why]


def _flops(capsys, monkeypatch, *args):
    """Run bench/flops.py in this process as its __main__ does: (exit status, stdout, stderr)."""
    monkeypatch.setitem(sys.modules, "peers", peers)  # its `import peers`: bench/ is its sys.path[0]
    flops = load_script("bench/flops.py")
    try:
        rc = flops.run(flops.main, list(args))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_json_rows_in_the_issue_schema(tmp_path, capsys, monkeypatch):
    rc, out, err = _flops(capsys, monkeypatch, "--against", "taesd,cosmos-cv8x8x8",
                          "--resolution", "128", "--json", str(tmp_path / "p.json"))
    assert rc == 0, err
    assert "x matched ViTok" in out and "taesd" in out
    payload = json.loads((tmp_path / "p.json").read_text())
    keys = {"name", "kind", "resolution", "frames", "params", "params_encoder", "params_decoder",
            "latent_shape", "pixels_per_float", "macs_encode", "macs_decode", "macs_total",
            "macs_per_frame", "ratio_to_vitok", "vitok_reference", "config_source"}
    rows = {(r["name"], r["resolution"]): r for r in payload["rows"]}
    assert all(set(r) == keys for r in payload["rows"])
    cosmos, ref = rows[("cosmos-cv8x8x8", 128)], rows[("S-B/4x8", 128)]
    assert cosmos["kind"] == "video" and cosmos["frames"] == 17 and ref["frames"] == 16
    assert cosmos["pixels_per_float"] == 17 * 128 * 128 * 3 / (16 * 3 * 16 * 16)  # 68
    assert cosmos["macs_per_frame"] == cosmos["macs_total"] / 17
    assert cosmos["ratio_to_vitok"] == pytest.approx(cosmos["macs_per_frame"] / ref["macs_per_frame"])
    assert cosmos["vitok_reference"] == "S-B/4x8" and ref["ratio_to_vitok"] is None
    taesd = rows[("taesd", 128)]
    assert taesd["vitok_reference"] == "S-B/16" and taesd["pixels_per_float"] == 48
    assert isinstance(taesd["params"], int) and isinstance(taesd["macs_total"], int)
    twin = {m["name"]: m for m in payload["matched"]}["cosmos-cv8x8x8"]
    assert twin["vitok_matched"] == "S-B/4x16 c=45" and ("S-B/4x16 c=45", 128) in rows
    matched = rows[("S-B/4x16 c=45", 128)]
    assert twin["ratio_to_vitok_matched"] == pytest.approx(cosmos["macs_per_frame"] / matched["macs_per_frame"])


def test_cli_unknown_tokenizer_is_one_error_line_listing_the_known_ones(capsys, monkeypatch):
    rc, out, err = _flops(capsys, monkeypatch, "--against", "flux1-vae,sdxl-vae")
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: argument --against: unknown tokenizer 'sdxl-vae'")
    assert all(p.name in lines[0] for p in peers.PEERS)


def test_cli_against_rejects_options_it_would_ignore(capsys, monkeypatch):
    rc, _, err = _flops(capsys, monkeypatch, "--against", "taesd", "--frames", "8")
    assert rc == 2 and err.startswith("error: --against counts each peer on its own clip length")
    rc, _, err = _flops(capsys, monkeypatch, "--against", "taesd", "--resolution", "96")
    assert rc == 2 and "positive multiple of 64" in err and "got 96" in err


def test_cli_list_names_every_peer(capsys, monkeypatch):
    rc, out, _ = _flops(capsys, monkeypatch, "--list")
    assert rc == 0
    assert [line.split()[0] for line in out.splitlines()[1:]] == [p.name for p in peers.PEERS]


@pytest.mark.slow(reason="builds ViTok S-B/16 with random weights and times real calls on the CPU")
def test_e2e_against_times_both_sides_in_turns_and_records_ratios(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peers", peers)  # its `import peers`: bench/ is its sys.path[0]
    e2e = load_script("bench/bench_e2e.py")
    calls = []
    real = e2e.time_calls
    monkeypatch.setattr(e2e, "time_calls", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    report = e2e.main(["--device", "cpu", "--against", "taesd,rae-dinov2-b", "--against-resolution", "64",
                       "--batches", "1,2", "--reps", "2", "--warmup", "0", "--write-cpu",
                       "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "peers_cpu.json").read_text())
    assert saved["rows"] == report["rows"] and "shared_machine" in saved
    # RAE is skipped, with its one-line reason: without transformers (not in .[dev]) that it
    # needs the package, with it that it is released for 256x256 only
    reason = ("released for 256x256 only, not 64" if importlib.util.find_spec("transformers")
              else "AutoencoderRAE needs the optional package 'transformers'")
    assert len(saved["skipped"]) == 1 and saved["skipped"][0].startswith(f"rae-dinov2-b: {reason}")
    assert [r["batch"] for r in report["rows"]] == [1, 2]
    for r in report["rows"]:
        assert r["status"] == "ok" and r["calls"] == 2
        assert r["speed_ratio"] == pytest.approx(r["vitok_frames_per_s"] / r["peer_frames_per_s"])
        assert r["vitok_frames_per_s"] == pytest.approx(r["batch"] / r["vitok_seconds"])
        assert r["macs_ratio"] == pytest.approx(r["macs_per_frame_peer"] / r["macs_per_frame_vitok"])
    # In turns: ViTok, peer, ViTok, peer for each batch (2 reps x 2 sides x 2 batches).
    assert len(calls) == 8 and calls[0] is not calls[1] and calls[0] is calls[2]
    best = report["best"][0]
    assert best["peer"] == "taesd" and best["vitok"] == "S-B/16"
    assert best["speed_ratio"] == pytest.approx(best["vitok_frames_per_s"] / best["peer_frames_per_s"])


def test_roofline_against_is_a_labelled_model_per_frame(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peers", peers)  # its `import peers`: bench/ is its sys.path[0]
    roofline = load_script("bench/roofline.py")
    result = roofline.against(peers.select("taesd,cosmos-cv8x8x8"), 64, 2, *roofline.GPUS["h200"],
                              progress=False)
    assert "MODEL" in result["note"] and result["anchors"] == {"peak_tflops": 989.4, "hbm_tbps": 4.8}
    taesd, cosmos = result["rows"]
    for row, macs in ((taesd, peers.count(peers.BY_NAME["taesd"], 64)),
                      (cosmos, peers.count(peers.BY_NAME["cosmos-cv8x8x8"], 64))):
        # Its FLOPs are the counter's: 2 x MACs per input frame, batch-independent.
        assert row["flops"] == pytest.approx(2 * (macs["macs_encode"] + macs["macs_decode"]) / row["frames"])
        assert row["predicted_speed_ratio_vitok_over_peer"] == pytest.approx(
            row["predicted_s"] / row["vitok_predicted_s"])
    assert (taesd["vitok"], cosmos["vitok"], cosmos["frames"]) == ("S-B/16", "S-B/4x8", 17)
    assert "Roofline MODEL (predicted, not measured)" in roofline.format_against(result)
