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
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
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


@dataclass(frozen=True)
class Point:
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


def build_grid(pcs, size_axis: tuple[int, int] | None) -> list[Point]:
    """The points of a sweep: one per (p, c), a per-channel-norm DiT at each p's largest c,
    and at ``size_axis`` = (p, c) the T2-T and T-T2 tokenizers (their T-T is a grid point)."""
    largest = {}
    for p, c in pcs:
        largest[p] = max(largest.get(p, 0), c)
    points = [Point(p, c, per_channel_norm=c == largest[p]) for p, c in pcs]
    if size_axis is not None:
        p, c = size_axis
        if (p, c) not in set(pcs):
            points.append(Point(p, c, generation=False))
        points += [Point(p, c, "T2", "T", generation=False), Point(p, c, "T", "T2", generation=False)]
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
    wanted = {"settings": settings, "seed": seed, "point": asdict(point)}
    for key, value in wanted.items():
        if saved.get(key) != value:
            raise UserError(f"{path} holds a point run with {key} {saved.get(key)}, not {value}: "
                            f"pass another --points-dir, or delete the file to rerun it")
    return saved["record"]


def sweep(points: list[Point], points_dir, settings: dict, seed: int, *, progress: bool = True,
          run_one=run_point) -> list[dict]:
    """Every point's record, in order: finished ones read back from ``points_dir``, the others
    run one at a time and written the moment each finishes."""
    from tqdm import tqdm

    points_dir = Path(points_dir)
    points_dir.mkdir(parents=True, exist_ok=True)
    records = [load_point(_point_file(points_dir, q), q, settings, seed) for q in points]
    todo = [i for i, r in enumerate(records) if r is None]
    digits = Digits() if todo else None
    bar = tqdm(todo, desc="points", disable=not progress, unit="point")
    for i in bar:
        q = points[i]
        bar.set_postfix_str(q.name)
        records[i] = run_one(q, digits, settings, seed, workdir=points_dir)
        text = json.dumps({"point": asdict(q), "seed": seed, "settings": settings,
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


# -- the command -------------------------------------------------------------------------


def _parse_pcs(text: str) -> list[tuple[int, int]]:
    pcs = []
    for item in text.split(","):
        p, _, c = item.strip().partition(":")
        if not (p.isdigit() and c.isdigit()) or int(p) < 1 or int(c) < 1 or SIDE % int(p):
            raise UserError(f"expected P:C pairs such as 8:4 with p dividing {SIDE} and c >= 1, "
                            f"got {item.strip()!r}")
        pcs.append((int(p), int(c)))
    if len(set(pcs)) != len(pcs):
        raise UserError(f"expected distinct P:C pairs, got {text!r}")
    return pcs


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
    g.add_argument("--size-axis", default="8:2",
                   help="P:C where the T2-T and T-T2 tokenizers are trained, or 'none'")
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
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
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
    args.size_axis = None if args.size_axis == "none" else _parse_pcs(args.size_axis)[0]
    if args.points_dir is None:
        args.points_dir = str(Path(args.json).with_suffix(".points"))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {key: getattr(args, key) for key in DEFAULTS}
    start = time.perf_counter()
    points = build_grid(args.pcs, args.size_axis)
    records = sweep(points, args.points_dir, settings, args.seed, progress=not args.no_progress)
    found = findings(records)
    record = {"points": records, "findings": found, "targets": targets(found), "seed": args.seed,
              "settings": settings, **environment(args.threads),
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
