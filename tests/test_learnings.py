"""bench/learnings_digits.py: the sweep's code path on a micro grid, its findings on fixed
points, resuming an interrupted sweep, and the commands it prints for a real data set."""

import contextlib
import io
import json
import re
import shlex

import pytest

from vitok_fast.cli import UserError

from _scripts import load_script

ld = load_script("bench/learnings_digits.py")

# a few steps each: the code path, not the figures
MICRO = ["--grid", "16:1,16:2", "--size-axis", "16:1", "--vitok-steps", "2", "--dit-steps", "2",
         "--per-class", "2", "--sampling-steps", "2", "--no-progress"]


def test_micro_sweep_writes_the_issues_schema_and_a_figure(tmp_path):
    out = tmp_path / "sweep.json"
    record = ld.main(MICRO + ["--json", str(out), "--plot", str(tmp_path / "sweep.png")])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(record))
    assert {"points", "findings", "seed", "device", "versions"} <= set(saved)
    points = saved["points"]
    assert [(q["p"], q["c"], q["encoder"], q["decoder"]) for q in points] == [
        (16, 1, "T", "T"), (16, 2, "T", "T"), (16, 1, "T2", "T"), (16, 1, "T", "T2")]
    for q in points:
        assert set(ld.POINT_KEYS) <= set(q) and q["E"] == 4 * q["c"]
        assert 1 <= q["active_channels"] <= q["c"] and q["kl_per_element"] >= 0
        assert len(q["channel_std"]) == q["c"]
    assert all(0 <= q["accuracy_conditional"] <= 1 and q["fd_samples"] > 0 for q in points[:2])
    assert all(q["accuracy_conditional"] is None for q in points[2:])  # reconstruction only
    # the per-channel-norm DiT at p's largest c, and only there
    assert "per_channel_norm" not in points[0]
    assert set(points[1]["per_channel_norm"]) == {"accuracy_conditional",
                                                  "accuracy_unconditional", "fd_samples"}
    assert set(ld.FINDING_KEYS) <= set(saved["findings"])
    assert saved["findings"]["encoder_gain_db"] == pytest.approx(
        points[2]["psnr_heldout"] - points[0]["psnr_heldout"])
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "sweep.points").iterdir()) == [
        "T-T2_p16_c1.json", "T-T_p16_c1.json", "T-T_p16_c2.json", "T2-T_p16_c1.json"]


def _point(p, c, psnr, fd=None, acc=None, encoder="T", decoder="T"):
    return {"p": p, "c": c, "E": (32 // p) ** 2 * c, "encoder": encoder, "decoder": decoder,
            "psnr_heldout": psnr, "fd_samples": fd, "accuracy_conditional": acc,
            "active_channels": c}


def test_findings_from_fixed_points():
    points = [_point(8, 1, 17.0, 90.0, 0.98), _point(8, 2, 25.0, 30.0, 0.99),
              _point(8, 4, 45.0, 33.0, 0.99), _point(8, 32, 48.0, 700.0, 0.15),
              _point(4, 1, 52.0, 40.0, 0.99),  # E = 64, as p = 8, c = 4
              _point(8, 2, 26.5, encoder="T", decoder="T2"),
              _point(8, 2, 25.5, encoder="T2", decoder="T")]
    found = ld.findings(points)
    # E 16, 32, 64, 512, 64 against PSNR 17, 25, 45, 48, 52: ranks (1, 2, 3.5, 5, 3.5), (1, 2, 3, 4, 5)
    assert found["spearman_psnr_E"] == pytest.approx(8 / 95 ** 0.5)
    assert found["same_E_psnr_spread_db"] == pytest.approx(7.0)
    assert found["best_generation_E"] == 32 and found["generation_peaks_inside"] is True
    assert found["fd_largest_E_over_best"] == pytest.approx(700 / 30)
    assert found["decoder_gain_db"] == pytest.approx(1.5)
    assert found["encoder_gain_db"] == pytest.approx(0.5)
    assert ld.targets(found) == {"spearman_psnr_E >= 0.8": True,
                                 "best conditional FD at an interior E": True,
                                 "FD at the largest E >= 3x the best": True,
                                 "conditional accuracy at the largest E <= 0.3": True}
    # FD rising with E all the way: the best generation sits at the smallest E, not inside
    monotone = [_point(8, c, 20.0 + c, 10.0 * c, 0.9) for c in (1, 2, 4, 16, 32)]
    found = ld.findings(monotone)
    assert found["best_generation_E"] == 16 and found["generation_peaks_inside"] is False
    assert found["spearman_psnr_E"] == pytest.approx(1.0)
    assert found["same_E_psnr_spread_db"] is None and found["decoder_gain_db"] is None
    assert ld.findings(monotone[::-1])["generation_peaks_inside"] is False  # falling all the way


def test_an_interrupted_sweep_resumes_without_redoing_a_point(tmp_path):
    points = ld.build_grid([(16, 1), (16, 2)], None)
    settings = dict(ld.DEFAULTS)
    calls = []

    def fake(point, digits, settings, seed, workdir=None):
        calls.append(point.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stopped during the second point
        return {**_point(point.p, point.c, 20.0 + point.c, 50.0, 0.9), "seconds": 1.0}

    with pytest.raises(KeyboardInterrupt):
        ld.sweep(points, tmp_path, settings, 0, progress=False, run_one=fake)
    first = (tmp_path / "T-T_p16_c1.json").read_text()
    records = ld.sweep(points, tmp_path, settings, 0, progress=False, run_one=fake)
    assert calls == ["T-T_p16_c1", "T-T_p16_c2", "T-T_p16_c2"]
    assert [r["c"] for r in records] == [1, 2]
    assert (tmp_path / "T-T_p16_c1.json").read_text() == first
    assert ld.sweep(points, tmp_path, settings, 0, progress=False, run_one=fake) == records
    assert len(calls) == 3  # all done: nothing runs
    with pytest.raises(UserError, match="run with settings"):  # other steps: not the same point
        ld.sweep(points, tmp_path, {**settings, "dit_steps": 5}, 0, progress=False, run_one=fake)
    with pytest.raises(UserError, match="run with seed"):
        ld.sweep(points, tmp_path, settings, 1, progress=False, run_one=fake)


def _help(main, argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(argv)
    return out.getvalue()


def test_the_scale_commands_use_options_the_tools_have(capsys):
    from vitok_fast import encode, evaluate, sample

    ld.main(["--data", "/data/imagenet/train", "--val-data", "/data/imagenet/val",
             "--lpips-vgg", "vgg.pth"])
    text = capsys.readouterr().out
    commands = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(re.findall(r"^# point \d+:", text, re.M)) == len(ld.DATA_GRID) + 2
    helps = {"train/stage1.py": _help(load_script("train/stage1.py").parse_args, ["--help"]),
             "train/dit.py": _help(load_script("train/dit.py").parse_args, ["--help"]),
             "vitok_fast.encode": _help(encode.main, ["--help"]),
             "vitok_fast.sample": _help(sample.main, ["--help"]),
             "vitok_fast.evaluate": _help(evaluate.parse_args, ["--help"])}
    seen = set()
    for command in commands:
        tool = next(t for t in helps if t in command)
        seen.add(tool)
        for option in re.findall(r"(?<=\s)--[a-z][a-z0-9_-]*", command):
            if option != "--nproc_per_node":  # torchrun's
                assert re.search(re.escape(option) + r"(?![\w-])", helps[tool]), (tool, option)
        if tool.startswith("train/"):
            assert command.startswith("torchrun --nproc_per_node 8 ")
    assert seen == set(helps)
    # the paper's settings: S-B/16 at 256p, DiT-L, CFG 1.5 and 3.0, DDIM 250
    assert "train/stage1.py --model S-B/16 --channels 16 " in text
    assert "--resolution 256" in text and "--model DiT-L/1" in text
    assert "--cfg 1.5 --steps 250" in text and "--cfg 3 --steps 250" in text
    assert text.count("--per-channel-norm") == 3  # the largest c of each p
    assert "--model S-L/16" in text and "--model B-B/16" in text
    assert shlex.split(commands[0])[0] == "torchrun"


def test_scale_point_selects_one_and_bad_options_are_user_errors(capsys):
    ld.main(["--data", "d", "--point", "0", "--grid", "8:4"])
    assert capsys.readouterr().out.count("# point") == 1
    for argv, message in ((["--data", "d", "--point", "99"], "--point must be in"),
                          (["--json", "x.json", "--run"], "--run goes with --data"),
                          (["--json", "x.json", "--grid", "3:4"], "p dividing 32"),
                          (["--grid", "8:4"], "somewhere to keep its points"),
                          (["--data", "d", "--run", "--inception", "/nonexistent.pth"],
                           "--inception /nonexistent.pth does not exist")):
        with pytest.raises(UserError, match=message):
            ld.main(argv)
