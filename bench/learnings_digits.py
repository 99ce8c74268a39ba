"""The paper's learnings on a CPU: a sweep of the bottleneck (p, c) and of the tokenizer's
encoder and decoder sizes, each point a ViTok + class-conditional DiT on the digits.

    python bench/learnings_digits.py --quick --json bench/results/learnings_digits_quick_cpu.json \\
        --plot bench/results/learnings_digits_quick_cpu.png      # 5 grid points, p = 8
    python bench/learnings_digits.py --json bench/results/learnings_digits_cpu.json \\
        --plot bench/results/learnings_digits_cpu.png            # the full grid, 14 points
    python bench/learnings_digits.py --data /data/imagenet/train  # the same sweep at scale:
                                                                  # prints its commands (--run runs them)

The paper's findings ("Learnings from Scaling Visual Tokenizers", arXiv 2501.09755):
(1) reconstruction is governed mainly by E = (H/p)(W/p)c, the floats in the latent (its
Figure 2); (2) generation is not: a DiT on the latents does best at an intermediate E and
large c hurts it (Figure 5); (3) scaling the decoder helps reconstruction more than scaling
the encoder (Figures 3, 4).

Every point runs bench/generation_digits.py's pipeline (the fixed 80/20 split of
scikit-learn's digits at 32x32; a T-T/p ViTok with c channels, MSE + 1e-3 KL; the latents
written as labelled shards + stats.json and read back; a DiT-T/2 trained by the DiT's
diffusion loss; 50 samples per class by DDIM + CFG; an SVM and a Frechet distance in PCA(16)
space score them) at that script's default steps. Beyond its figures each point records
the bottleneck's use: ``active_channels`` (channels whose posterior-mean std is above 10%
of the largest channel's), ``kl_per_element`` (KL to N(0, 1) per latent float, training
digits) and each channel's std. At the largest c of each p a second DiT is trained on
per-channel-normalised latents (``per_channel_norm``): does the collapse at large c come
from the bottleneck or from one global latent scale?

The size axis [ours]: at one (p, c) (``--size-axis``, default 8:2, where reconstruction is
not saturated) the encoder or the decoder is widened from T (width 64) to T2 (width 128,
4 heads, same depth), trained for the same steps; only reconstruction is measured there.

Points run one at a time; each is written (atomically, one JSON file) to ``--points-dir``
the moment it finishes and skipped when it is there, so an interrupted sweep resumes where
it stopped. The findings are computed from the points, never set by hand.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import time
from typing import NamedTuple
from pathlib import Path

import torch

from vitok_fast.cli import UserError, run
from vitok_fast.fileio import atomic_write

HERE = Path(__file__).resolve().parent
SIDE = 32  # the digits' side in pixels (bench/generation_digits.py)

# (p, c): E = (32/p)^2 c from 16 to 512 for p = 4 and 8, and 16 to 256 for p = 16
FULL_GRID = ((4, 1), (4, 2), (4, 4), (4, 8),
             (8, 1), (8, 2), (8, 4), (8, 8), (8, 16), (8, 32),
             (16, 4), (16, 16), (16, 32), (16, 64))
QUICK_GRID = ((8, 1), (8, 2), (8, 4), (8, 16), (8, 32))
# [ours] T2: the tiny size T (width 64, depth 2, 2 heads) twice as wide; head dim 32 as T's,
# SwiGLU hidden 8d/3 rounded up to a multiple of 8 as the library's sizes
T2 = dict(width=128, heads=4, mlp_hidden=344)
DEFAULTS = dict(vitok_steps=600, dit_steps=3000, per_class=50, cfg=1.5, sampling_steps=50)
POINT_KEYS = ("p", "c", "E", "encoder", "decoder", "psnr_heldout", "accuracy_conditional",
              "accuracy_unconditional", "fd_samples", "fd_real", "seconds")
FINDING_KEYS = ("spearman_psnr_E", "same_E_psnr_spread_db", "best_generation_E",
                "generation_peaks_inside", "decoder_gain_db", "encoder_gain_db")


def _generation_digits():
    """bench/generation_digits.py as a module, loaded from its file (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location("vitok_bench_generation_digits",
                                                  HERE / "generation_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gd = _generation_digits()


class Point(NamedTuple):
    """One sweep point: a ``encoder``-``decoder``/``p`` ViTok with ``c`` channels, then (if
    ``generation``) a DiT on its latents, and (if ``per_channel_norm``) a second DiT on
    per-channel-normalised latents."""

    p: int
    c: int
    encoder: str = "T"
    decoder: str = "T"
    generation: bool = True
    per_channel_norm: bool = False

    @property
    def E(self) -> int:
        return (SIDE // self.p) ** 2 * self.c

    @property
    def name(self) -> str:
        return f"{self.encoder}-{self.decoder}_p{self.p}_c{self.c}"

    def vitok_config(self) -> dict:
        """ViTokConfig fields beyond ``T-T/p``: the T2 side(s), if any."""
        return {f"{side}_{k}": v for side, size in (("encoder", self.encoder),
                                                     ("decoder", self.decoder))
                if size == "T2" for k, v in T2.items()}


def build_grid(pcs, size_axis: tuple[int, int] | None, base=("T", "T"),
               wider=(("T2", "T"), ("T", "T2"))) -> list[Point]:
    """The points of a sweep: one per (p, c) with the ``base`` (encoder, decoder), a
    per-channel-norm DiT at each p's largest c, and at ``size_axis`` = (p, c) the ``wider``
    tokenizers, reconstruction only (their base is a grid point)."""
    largest = {}
    for p, c in pcs:
        largest[p] = max(largest.get(p, 0), c)
    points = [Point(p, c, *base, per_channel_norm=c == largest[p]) for p, c in pcs]
    if size_axis is not None:
        p, c = size_axis
        if (p, c) not in set(pcs):
            points.append(Point(p, c, *base, generation=False))
        points += [Point(p, c, e, d, generation=False) for e, d in wider]
    return points


class Digits:
    """The split, its images and scorers, made once per sweep."""

    def __init__(self):
        self.X_train, self.X_held, self.y_train, self.y_held = gd.digits_split()
        self.x_train, self.x_held = gd.to_images(self.X_train), gd.to_images(self.X_held)
        self.judges = gd.fit_judges(self.X_train, self.y_train)
        pca = self.judges[1]
        self.fd_real = gd.frechet(pca.transform(self.X_train), pca.transform(self.X_held))


def run_point(point: Point, digits: Digits, settings: dict, seed: int, workdir=None) -> dict:
    """Train and score one point; returns its record (POINT_KEYS and the bottleneck's use)."""
    from vitok_fast.dit import LatentNorm
    from vitok_fast.losses import psnr

    start = time.perf_counter()
    vitok = gd.train_vitok(digits.x_train, settings["vitok_steps"], seed, channels=point.c,
                           name=f"T-T/{point.p}", **point.vitok_config())
    with torch.no_grad():
        psnr_heldout = float(psnr(digits.x_held, vitok(digits.x_held, sample=False)[0]).mean())
        posterior = vitok.encode(digits.x_train)
    latents = gd.latents_through_shards(
        posterior, digits.y_train, workdir=workdir,
        meta={"model": f"{point.encoder}-{point.decoder}/{point.p}", "resolution": SIDE, "frames": 1})
    stats = latents["stats"]
    std = torch.tensor(stats["std"])
    record = {"p": point.p, "c": point.c, "E": point.E, "encoder": point.encoder,
              "decoder": point.decoder, "psnr_heldout": psnr_heldout,
              "accuracy_conditional": None, "accuracy_unconditional": None,
              "fd_samples": None, "fd_real": digits.fd_real, "seconds": None,
              "active_channels": int((std > 0.1 * std.max()).sum()),
              "kl_per_element": float(posterior.kl()),
              "channel_std": [round(float(s), 5) for s in std],
              "global_scale": stats["scaling_factor"]}
    variants = ((False, True) if point.per_channel_norm else (False,)) if point.generation else ()
    for per_channel in variants:
        norm = LatentNorm(stats, per_channel)
        z = norm.normalize(latents["mean"])
        dit, diffusion = gd.train_dit(z, latents["label"], len(latents["index"]["classes"]),
                                      settings["dit_steps"], seed)
        scores, _ = gd.sample_and_score(vitok, dit, diffusion, norm, z.shape[1:], digits.judges,
                                        digits.X_held, per_class=settings["per_class"],
                                        cfg=settings["cfg"],
                                        sampling_steps=settings["sampling_steps"], seed=seed)
        if per_channel:
            record["per_channel_norm"] = scores
        else:
            record.update(scores)
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def _point_file(points_dir: Path, point: Point) -> Path:
    return points_dir / f"{point.name}.json"


def load_point(path: Path, point: Point, settings: dict, seed: int) -> dict | None:
    """The finished point at ``path``, or None; an error if it was run with other settings."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    wanted = {"settings": settings, "seed": seed, "point": point._asdict()}
    for key, value in wanted.items():
        if saved.get(key) != value:
            raise UserError(f"{path} holds a point run with {key} {saved.get(key)}, not {value}: "
                            f"pass another --points-dir, or delete the file to rerun it")
    return saved["record"]


def sweep(points: list[Point], points_dir, settings: dict, seed: int, *, progress: bool = True,
          run_one=run_point, only: set[str] | None = None) -> list[dict | None]:
    """Every point's record, in order: finished ones read back from ``points_dir``, the others
    run one at a time and written the moment each finishes. With ``only`` (point names) just
    those run; another's record is None until some run finishes it."""
    from tqdm import tqdm

    points_dir = Path(points_dir)
    points_dir.mkdir(parents=True, exist_ok=True)
    records = [load_point(_point_file(points_dir, q), q, settings, seed) for q in points]
    todo = [i for i, r in enumerate(records) if r is None and (only is None or points[i].name in only)]
    digits = Digits() if todo else None
    bar = tqdm(todo, desc="points", disable=not progress, unit="point")
    for i in bar:
        q = points[i]
        records[i] = load_point(_point_file(points_dir, q), q, settings, seed)
        if records[i] is not None:  # another process sharing points_dir finished it meanwhile
            continue
        bar.set_postfix_str(q.name)
        records[i] = run_one(q, digits, settings, seed, workdir=points_dir)
        text = json.dumps({"point": q._asdict(), "seed": seed, "settings": settings,
                           "record": records[i]}, indent=2) + "\n"
        atomic_write(_point_file(points_dir, q), lambda tmp: Path(tmp).write_text(text))
        if progress:
            r = records[i]
            tqdm.write(f"{q.name}: E {q.E}, PSNR {r['psnr_heldout']:.1f} dB, accuracy "
                       f"{r['accuracy_conditional']}, FD {r['fd_samples']}, {r['seconds']:.0f} s")
    return records


# -- findings ----------------------------------------------------------------------------


def _spearman(x, y) -> float | None:
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def findings(points: list[dict]) -> dict:
    """The issue's findings (FINDING_KEYS) and the figures behind them, from the points."""
    grid = [q for q in points if q["encoder"] == q["decoder"] == "T"]
    generated = [q for q in grid if q["fd_samples"] is not None]
    out = {"spearman_psnr_E": _spearman([q["E"] for q in grid], [q["psnr_heldout"] for q in grid])}
    by_p = {}
    for q in grid:
        by_p.setdefault(q["p"], []).append(q)
    out["spearman_psnr_E_per_p"] = {
        str(p): _spearman([q["E"] for q in qs], [q["psnr_heldout"] for q in qs])
        for p, qs in sorted(by_p.items())}
    by_E = {}
    for q in grid:
        by_E.setdefault(q["E"], {})[q["p"]] = q["psnr_heldout"]
    spreads = {str(E): max(v.values()) - min(v.values())
               for E, v in sorted(by_E.items()) if len(v) > 1}
    out["same_E_psnr_spread_db"] = max(spreads.values()) if spreads else None
    out["same_E_psnr_spread_db_per_E"] = spreads
    if generated:
        best = min(generated, key=lambda q: q["fd_samples"])
        Es = sorted({q["E"] for q in generated})
        top = [q for q in generated if q["E"] == Es[-1]]
        out.update({
            "best_generation_E": best["E"], "best_generation_point": {"p": best["p"], "c": best["c"]},
            "generation_peaks_inside": bool(Es[0] < best["E"] < Es[-1]),
            "best_fd_samples": best["fd_samples"],
            # at the largest E, the most favourable of its points (lowest FD, highest accuracy)
            "fd_largest_E_over_best": min(q["fd_samples"] for q in top) / best["fd_samples"],
            "accuracy_conditional_largest_E": max(q["accuracy_conditional"] for q in top)})
        out["generation_peaks_inside_per_p"] = {}
        for p, qs in sorted(by_p.items()):
            qs = [q for q in qs if q["fd_samples"] is not None]
            if len(qs) >= 3:
                best_p = min(qs, key=lambda q: q["fd_samples"])["E"]
                out["generation_peaks_inside_per_p"][str(p)] = bool(
                    min(q["E"] for q in qs) < best_p < max(q["E"] for q in qs))
    else:
        out.update({"best_generation_E": None, "generation_peaks_inside": None})
    base = {(q["p"], q["c"]): q["psnr_heldout"] for q in grid}
    for side, key in (("decoder", "decoder_gain_db"), ("encoder", "encoder_gain_db")):
        wider = [q for q in points if q[side] == "T2" and q["encoder" if side == "decoder" else "decoder"] == "T"]
        gains = [q["psnr_heldout"] - base[q["p"], q["c"]] for q in wider if (q["p"], q["c"]) in base]
        out[key] = gains[0] if gains else None
    out["per_channel_norm"] = [
        {"p": q["p"], "c": q["c"], "E": q["E"], "active_channels": q["active_channels"],
         "global": {k: q[k] for k in ("accuracy_conditional", "fd_samples")},
         "per_channel": {k: q["per_channel_norm"][k] for k in ("accuracy_conditional", "fd_samples")}}
        for q in grid if q.get("per_channel_norm")]
    return out


def targets(found: dict) -> dict:
    """The issue's targets for --quick (benchmark figures, reported, never tuned to)."""
    def check(value, test):
        return None if value is None else bool(test(value))

    return {
        "spearman_psnr_E >= 0.8": check(found["spearman_psnr_E"], lambda v: v >= 0.8),
        "best conditional FD at an interior E": found["generation_peaks_inside"],
        "FD at the largest E >= 3x the best": check(found.get("fd_largest_E_over_best"),
                                                    lambda v: v >= 3.0),
        "conditional accuracy at the largest E <= 0.3": check(
            found.get("accuracy_conditional_largest_E"), lambda v: v <= 0.3)}


# -- the figure --------------------------------------------------------------------------


def plot(record: dict, path) -> Path:
    """The paper's panels from a sweep's record: PSNR, accuracy and FD against E (log), one
    colour per p, per-channel-norm DiTs as open markers; the bottleneck's use; the encoder
    vs decoder bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = record["points"]
    grid = [q for q in points if q["encoder"] == q["decoder"] == "T"]
    ps = sorted({q["p"] for q in grid})
    colours = dict(zip(ps, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    panels = [(axes[0, 0], "psnr_heldout", "held-out PSNR (dB)", False),
              (axes[0, 1], "accuracy_conditional", f"conditional accuracy (CFG {record['settings']['cfg']})", False),
              (axes[0, 2], "fd_samples", "FD of samples, PCA(16) space", True),
              (axes[1, 0], "active_fraction", "active channels / c", False),
              (axes[1, 1], "kl_per_element", "KL per latent float", False)]
    for ax, key, label, logy in panels:
        for p in ps:
            qs = sorted((q for q in grid if q["p"] == p), key=lambda q: q["E"])
            values = [q["active_channels"] / q["c"] if key == "active_fraction" else q[key] for q in qs]
            keep = [(q["E"], v) for q, v in zip(qs, values) if v is not None]
            if keep:
                ax.plot(*zip(*keep), "o-", color=colours[p], label=f"p = {p}")
            pcn = [(q["E"], q["per_channel_norm"][key]) for q in qs
                   if q.get("per_channel_norm") and key in q["per_channel_norm"]]
            if pcn:
                ax.plot(*zip(*pcn), "*", color=colours[p], markersize=13, markerfacecolor="none",
                        label=f"p = {p}, per-channel norm")
        if key == "fd_samples":
            ax.axhline(points[0]["fd_real"], color="grey", ls="--", lw=1, label="real training digits")
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("E = (32/p)^2 c")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[1, 2]
    sizes = [q for q in points if q["encoder"] != q["decoder"]]
    if sizes:
        p, c = sizes[0]["p"], sizes[0]["c"]
        bars = [(f"{q['encoder']}-{q['decoder']}", q["psnr_heldout"]) for q in points
                if (q["p"], q["c"]) == (p, c)]
        bars.sort(key=lambda b: ("T-T", "T2-T", "T-T2").index(b[0]))
        ax.bar([b[0] for b in bars], [b[1] for b in bars], color=["grey", "tab:blue", "tab:orange"][:len(bars)])
        for i, (_, v) in enumerate(bars):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom")
        ax.set_title(f"encoder (T2-T) vs decoder (T-T2) width, p = {p}, c = {c}", fontsize=10)
        ax.set_ylabel("held-out PSNR (dB)")
    else:
        ax.axis("off")
    fig.suptitle(f"ViTok + DiT on 32x32 digits, seed {record['seed']}: reconstruction vs "
                 f"generation against the bottleneck E")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


# -- the same sweep at scale ---------------------------------------------------------------

# [ours] p x c at 256p: E = (256/p)^2 c from 256 to 65536, with points of equal E on the
# diagonals (Figure 2's comparison); the size axis at S-B/16, c = 16 compares the paper's
# S-B, S-L (decoder scaled) and B-B (encoder scaled) tokenizers (its Figures 3 and 4).
DATA_GRID = ((8, 4), (8, 16), (8, 64), (16, 4), (16, 16), (16, 64), (32, 4), (32, 16), (32, 64))
DATA_BASE, DATA_WIDER = ("S", "B"), (("S", "L"), ("B", "B"))  # (encoder, decoder)


def scale_commands(point: Point, args) -> list[tuple[str, str, str | None]]:
    """``(what, shell command, file that exists once it is done)`` for one point, in order:
    stage 1 -> reconstruction scores -> encode -> train/dit.py -> sample -> gFID at each CFG."""
    q = shlex.quote
    root = Path(args.out) / point.name
    tok, torchrun = root / "tokenizer", f"torchrun --nproc_per_node {args.nproc}"
    stage1 = (f"{torchrun} train/stage1.py --model {point.encoder}-{point.decoder}/{point.p} "
              f"--channels {point.c} --data {q(args.data)} --resolution {args.resolution} "
              f"--out-dir {q(str(tok))}")
    if args.lpips_vgg:
        stage1 += f" --lpips-vgg {q(args.lpips_vgg)}"
    steps = [("stage 1", stage1, None)]
    if args.val_data:
        recon = root / "reconstruction.json"
        steps.append(("reconstruction (Figure 2)",
                      f"{torchrun} -m vitok_fast.evaluate --ckpt {q(str(tok))} "
                      f"--data {q(args.val_data)} --resolution {args.resolution} "
                      f"--inception {q(args.inception)}"
                      + (f" --lpips-vgg {q(args.lpips_vgg)}" if args.lpips_vgg else "")
                      + f" --out {q(str(recon))}", str(recon)))
    if not point.generation:
        return steps
    latents = root / "latents"
    steps.append(("encode", f"python -m vitok_fast.encode --ckpt {q(str(tok))} --data "
                  f"{q(args.data)} --resolution {args.resolution} --out {q(str(latents))}",
                  str(latents / "stats.json")))
    side = args.resolution // point.p  # [ours] a DiT patch that keeps at most 16x16 tokens
    dit_name = f"DiT-{args.dit}/{max(1, side // 16)}"
    for norm in ("global", "per-channel") if point.per_channel_norm else ("global",):
        dit = root / ("dit" if norm == "global" else "dit_per_channel_norm")
        steps.append((f"train/dit.py ({norm} latent normalisation)",
                      f"{torchrun} train/dit.py --latents {q(str(latents))} --vitok {q(str(tok))} "
                      f"--model {dit_name} --out-dir {q(str(dit))}"
                      + (" --per-channel-norm" if norm == "per-channel" else ""), None))
        for cfg in args.cfg:
            samples = dit.parent / f"{dit.name}_samples_cfg{cfg:g}"
            steps.append((f"sample (CFG {cfg:g})",
                          f"python -m vitok_fast.sample --dit {q(str(dit))} --vitok {q(str(tok))} "
                          f"--classes $(seq -s, 0 {args.num_classes - 1}) --per-class "
                          f"{args.scale_per_class} --cfg {cfg:g} --steps {args.scale_sampling_steps} "
                          f"--out {q(str(samples))}", str(samples / "samples.npz")))
            score = dit.parent / f"{dit.name}_gfid_cfg{cfg:g}.json"
            steps.append((f"gFID (CFG {cfg:g}, Figure 5)",
                          f"python -m vitok_fast.evaluate --generated {q(str(samples))} "
                          f"--ref-stats {q(args.ref_stats)} --inception {q(args.inception)} "
                          f"--out {q(str(score))}", str(score)))
    return steps


def scale_main(args) -> list[Point]:
    """``--data``: print (or, with ``--run``, run) every point's commands."""
    points = build_grid(args.pcs, args.size_axis, DATA_BASE, DATA_WIDER)
    if args.point is not None:
        if not 0 <= args.point < len(points):
            raise UserError(f"--point must be in [0, {len(points) - 1}] (the grid has "
                            f"{len(points)} points), got {args.point}")
        points = [points[args.point]]
    if args.run:
        needed = [("--inception", args.inception)]
        if any(q.generation for q in points):
            needed.append(("--ref-stats", args.ref_stats))
        for option, path in needed + ([("--lpips-vgg", args.lpips_vgg)] if args.lpips_vgg else []):
            if not Path(path).exists():
                raise UserError(f"{option} {path} does not exist: pass the file (it is not "
                                f"downloaded at run time)")
    for i, point in enumerate(points):
        print(f"# point {args.point if args.point is not None else i}: {point.name}, "
              f"E = {(args.resolution // point.p) ** 2 * point.c}")
        for what, command, done in scale_commands(point, args):
            print(f"# {what}\n{command}", flush=True)
            if not args.run:
                continue
            if done is not None and Path(done).exists():
                print(f"# done already: {done}", flush=True)
                continue
            # stage 1 and train/dit.py resume from their own checkpoints (--resume auto)
            subprocess.run(command, shell=True, executable="/bin/bash", check=True)
    return points


# -- the command -------------------------------------------------------------------------


def _parse_pcs(text: str, side: int = SIDE) -> list[tuple[int, int]]:
    pcs = []
    for item in text.split(","):
        p, _, c = item.strip().partition(":")
        if not (p.isdigit() and c.isdigit()) or int(p) < 1 or int(c) < 1 or side % int(p):
            raise UserError(f"expected P:C pairs such as 8:4 with p dividing {side} and c >= 1, "
                            f"got {item.strip()!r}")
        pcs.append((int(p), int(c)))
    if len(set(pcs)) != len(pcs):
        raise UserError(f"expected distinct P:C pairs, got {text!r}")
    return pcs


def _size_axis(text: str | None, default: tuple[int, int], side: int):
    if text == "none":
        return None
    return default if text is None else _parse_pcs(text, side)[0]


def environment(threads: int) -> dict:
    import sklearn

    from vitok_fast.benchmarking import git_commit

    return {"device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                      f"{threads} torch thread(s)",
            "versions": {"torch": torch.__version__, "sklearn": sklearn.__version__,
                         "python": platform.python_version(), "commit": git_commit()}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the digits sweep")
    g.add_argument("--quick", action="store_true",
                   help=f"the 5-point grid p = 8, c in {{1, 2, 4, 16, 32}} (default: the full "
                        f"{len(FULL_GRID)}-point grid)")
    g.add_argument("--grid", help="P:C[,P:C...]: these points instead of a preset grid")
    g.add_argument("--size-axis", help="P:C where the wider-encoder and wider-decoder "
                   "tokenizers are trained (digits: T2-T and T-T2, default 8:2; --data: B-B and "
                   "S-L, default 16:16), or 'none'")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--points-dir", help="where each finished point is written and found on a "
                   "rerun (default: beside --json, <name>.points/)")
    g.add_argument("--json", help="write the sweep's record (points, findings, device) here")
    g.add_argument("--plot", help="write the paper-style figure (PNG) here")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads (see "
                   "bench/generation_digits.py: 1 is fastest on a shared machine)")
    for key, value in DEFAULTS.items():
        g.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value,
                       help="as bench/generation_digits.py")
    g.add_argument("--only", type=lambda text: set(text.split(",")), help="NAME[,NAME...]: run "
                   "only these points (as their files are named, e.g. T-T_p8_c32), e.g. to split "
                   "a sweep over processes sharing --points-dir; the record holds the finished "
                   "points and lists the missing ones")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("the same sweep at scale (--data)")
    g.add_argument("--data", help="a data set train/stage1.py and python -m vitok_fast.encode "
                   "read (a class-folder tree or tar shards): print the sweep's commands for it")
    g.add_argument("--run", action="store_true", help="with --data: run them, one after another, "
                   "skipping steps whose output exists")
    g.add_argument("--point", type=int, help="with --data: only this grid point (0-based; a "
                   "SLURM array's $SLURM_ARRAY_TASK_ID)")
    g.add_argument("--val-data", help="held-out images for the reconstruction scores (Figure 2)")
    g.add_argument("--out", default="runs/learnings", help="where every point's runs go")
    g.add_argument("--resolution", type=int, default=256, help="[paper: 256]")
    g.add_argument("--dit", default="L", help="DiT size [paper: DiT-L for Figure 5]")
    g.add_argument("--scale-cfg", dest="scale_cfg", default="1.5,3.0",
                   help="guidance scales [paper: 1.5 and 3.0]")
    g.add_argument("--scale-sampling-steps", type=int, default=250, help="DDIM steps [paper: 250]")
    g.add_argument("--num-classes", type=int, default=1000, help="classes to sample (ImageNet: 1000)")
    g.add_argument("--scale-per-class", type=int, default=50,
                   help="samples per class (50 x 1000 = the 50k of gFID)")
    g.add_argument("--nproc", type=int, default=8, help="GPUs per torchrun")
    g.add_argument("--ref-stats", default="VIRTUAL_imagenet256_labeled.npz",
                   help="gFID reference statistics (ADM's ImageNet 256 batch)")
    g.add_argument("--inception", default="weights-inception-2015-12-05-6726825d.pth",
                   help="FID Inception weights")
    g.add_argument("--lpips-vgg", help="VGG16 weights for stage 1's LPIPS and the reconstruction "
                   "scores")
    args = p.parse_args(argv)
    if args.data is not None:
        return _scale_args(args)
    for option in ("run", "point", "val_data"):
        if getattr(args, option) not in (None, False):
            raise UserError(f"--{option.replace('_', '-')} goes with --data DIR_OR_SHARDS (the "
                            f"sweep at scale); the digits sweep takes no such option")
    for key in ("vitok_steps", "dit_steps", "per_class", "sampling_steps", "threads"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.per_class < 2:
        raise UserError(f"--per-class must be at least 2 (the Frechet distance needs 20 samples "
                        f"in 16 dimensions), got {args.per_class}")
    if args.quick and args.grid:
        raise UserError("--quick and --grid both choose the points: pass one of them")
    if not (args.json or args.points_dir):
        raise UserError("a sweep needs somewhere to keep its points: pass --json PATH "
                        "(points beside it) or --points-dir DIR")
    args.pcs = _parse_pcs(args.grid) if args.grid else list(QUICK_GRID if args.quick else FULL_GRID)
    args.size_axis = _size_axis(args.size_axis, (8, 2), SIDE)
    if args.points_dir is None:
        args.points_dir = str(Path(args.json).with_suffix(".points"))
    return args


def _scale_args(args):
    for key in ("resolution", "scale_sampling_steps", "num_classes", "scale_per_class", "nproc"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    try:
        args.cfg = [float(v) for v in args.scale_cfg.split(",")]
    except ValueError:
        raise UserError(f"--scale-cfg expects comma-separated numbers such as 1.5,3.0, "
                        f"got {args.scale_cfg!r}") from None
    if args.quick:
        raise UserError("--quick picks the digits grid; with --data pass --grid P:C,... instead")
    args.pcs = _parse_pcs(args.grid, args.resolution) if args.grid else list(DATA_GRID)
    args.size_axis = _size_axis(args.size_axis, (16, 16), args.resolution)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.data is not None:
        return scale_main(args)
    torch.set_num_threads(args.threads)
    settings = {key: getattr(args, key) for key in DEFAULTS}
    start = time.perf_counter()
    points = build_grid(args.pcs, args.size_axis)
    if args.only is not None and not args.only <= {q.name for q in points}:
        raise UserError(f"--only names points of the sweep ({', '.join(q.name for q in points)}), "
                        f"got {', '.join(sorted(args.only - {q.name for q in points}))}")
    records = sweep(points, args.points_dir, settings, args.seed, progress=not args.no_progress,
                    only=args.only)
    missing = [q.name for q, r in zip(points, records) if r is None]
    records = [r for r in records if r is not None]
    found = findings(records)
    record = {"points": records, "findings": found, "targets": targets(found), "seed": args.seed,
              "settings": settings, **environment(args.threads), "missing_points": missing,
              "seconds_total": round(sum(r["seconds"] for r in records), 1),
              "seconds_this_run": round(time.perf_counter() - start, 1)}
    print(json.dumps({k: record[k] for k in ("findings", "targets", "seconds_total")}, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(args.json),
                     lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    if args.plot:
        plot(record, args.plot)
    return record


if __name__ == "__main__":
    run(main)
