"""Plots (matplotlib, PNG): reconstruction grids, bottleneck sweeps, training curves.

    python -m vitok_fast.plots grid --ckpt runs/stage1-S-B_16 --data embedded:val --out grid.png
    python -m vitok_fast.plots sweep eval_c4.json eval_c8.json eval_c16.json --out sweep.png
    python -m vitok_fast.plots curves runs/stage1-S-B_16/metrics.jsonl --out curves.png

The sweep plot is the paper's Figure 2 (metric vs bottleneck size E) from the JSON files
``vitok_fast.evaluate`` writes. Training logs are JSON lines (one object per step with a
``step`` key) or CSV with a ``step`` column; every other numeric column becomes a panel.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

from vitok_fast import cli


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (never a window), imported when a plot is
    drawn rather than with the module, so that ``--help`` does not pay for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


SWEEP_METRICS = ("rfid", "rfvd", "psnr", "ssim", "lpips")
_LOWER_IS_BETTER = {"rfid", "rfvd", "lpips"}


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path,
                        titles=("input", "reconstruction"), caption: str | None = None) -> Path:
    """Rows of (input, reconstruction) pairs from (B, 3, H, W) pixels in [-1, 1], each
    reconstruction titled with its PSNR; ``caption`` (e.g. the model and resolution) on top."""
    from vitok_fast.metrics import psnr, quantize

    if originals.shape != reconstructions.shape or originals.ndim != 4:
        raise ValueError(f"expected two (B, 3, H, W) batches of one shape, got "
                         f"{tuple(originals.shape)} and {tuple(reconstructions.shape)}")
    real, fake = quantize(originals.cpu()), quantize(reconstructions.cpu())
    scores = psnr(real, fake)
    B = real.shape[0]
    fig, axes = _pyplot().subplots(B, 2, figsize=(6, 3 * B), squeeze=False)
    for i in range(B):
        for j, (img, title) in enumerate(((real[i], titles[0]), (fake[i], titles[1]))):
            ax = axes[i, j]
            ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if j == 1:
                ax.set_title(f"{title}  {scores[i]:.2f} dB", fontsize=9)
            elif i == 0:
                ax.set_title(title, fontsize=9)
    if caption:
        fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def bottleneck_sweep(json_paths, path, metrics=None) -> Path:
    """Metric vs E (log scale), one line per model name, from evaluate's JSON files."""
    runs = []
    for p in json_paths:
        data = json.loads(Path(p).read_text())
        if "E" not in data:
            raise ValueError(f"{p} has no 'E' field: expected a JSON written by vitok_fast.evaluate")
        runs.append(data)
    if not runs:
        raise ValueError("bottleneck_sweep needs at least one evaluation JSON")
    metrics = [m for m in (metrics or SWEEP_METRICS) if any(m in r for r in runs)]
    if not metrics:
        raise ValueError(f"none of the JSONs holds any of the metrics {list(SWEEP_METRICS)}")
    fig, axes = _pyplot().subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5), squeeze=False)
    groups = defaultdict(list)
    for r in runs:
        groups[f"{r.get('model', '?')} {r.get('resolution', '?')}p"].append(r)
    for ax, m in zip(axes[0], metrics):
        for label, rs in sorted(groups.items()):
            rs = sorted((r for r in rs if m in r), key=lambda r: r["E"])
            if not rs:
                continue
            E = [r["E"] for r in rs]
            ax.plot(E, [r[m] for r in rs], "o-", label=label)
            for r in rs:
                ax.annotate(f"c={r.get('channels', '?')}", (r["E"], r[m]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("E (floats in the bottleneck)")
        ax.set_ylabel(m.upper() + (" (lower is better)" if m in _LOWER_IS_BETTER else ""))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Reconstruction vs bottleneck size E (cf. paper Figure 2)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def read_log(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (steps, values)} from a JSON-lines or CSV training log with a 'step' field."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training log {path} does not exist")
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n} is not a JSON line ({e})") from None
    series = defaultdict(list)
    for row in rows:
        if "step" not in row:
            continue
        for key, value in row.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if key != "step" and math.isfinite(v):
                series[key].append((float(row["step"]), v))
    if not series:
        raise ValueError(f"{path} holds no rows with a 'step' and numeric values")
    return {k: (np.array([s for s, _ in v]), np.array([x for _, x in v])) for k, v in series.items()}


def training_curves(log_path, path, keys=None) -> Path:
    series = read_log(log_path)
    keys = [k for k in (keys or sorted(series)) if k in series]
    if not keys:
        raise ValueError(f"none of the keys {keys} is in {log_path}; it has {sorted(series)}")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = _pyplot().subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        steps, values = series[key]
        ax.plot(steps, values, lw=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        if "loss" in key and values.min() > 0 and values.max() / values.min() > 30:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def main(argv=None) -> Path:
    p = cli.ArgumentParser(prog="python -m vitok_fast.plots", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grid", help="inputs next to reconstructions")
    cli.add_ckpt(g, required=True)
    g.add_argument("--data", required=True, help="any source vitok_fast.data.make_dataset reads")
    g.add_argument("--resolution", type=cli.positive_int,
                   help="centre-crop size (default: the checkpoint's training resolution, else 256)")
    g.add_argument("--n", type=cli.positive_int, default=4, help="number of images")
    cli.add_no_kernels(g)
    cli.add_device(g)
    s = sub.add_parser("sweep", help="metric vs bottleneck size E")
    s.add_argument("jsons", nargs="+", type=cli.existing_file,
                   help="result files of python -m vitok_fast.evaluate")
    s.add_argument("--metrics", help="comma-separated, default all present")
    c = sub.add_parser("curves", help="training curves from a run's log")
    c.add_argument("log", type=cli.existing_file, help="a run's metrics.jsonl (or a CSV log)")
    c.add_argument("--keys", help="comma-separated, default all numeric columns")
    for q in (g, s, c):
        cli.add_out(q, "PNG file to write", type=cli.output_file, required=True)
    args = p.parse_args(argv)

    if args.command == "sweep":
        return bottleneck_sweep(args.jsons, args.out, args.metrics and args.metrics.split(","))
    if args.command == "curves":
        return training_curves(args.log, args.out, args.keys and args.keys.split(","))
    import torch

    from vitok_fast.data import make_dataset
    from vitok_fast.media import reconstruct_pixels

    model, folder, size = cli.load_vitok(args.ckpt, "plots grid", device=args.device,
                                         no_kernels=args.no_kernels, resolution=args.resolution)
    model.eval()
    if model.config.is_video:
        raise ValueError(f"the grid plot shows images; {model.config.name} is a video model")
    with cli.option("--data", args.data):
        dataset = make_dataset(args.data, size["resolution"], 1, train=False)
    items = []
    for x in dataset:
        items.append(x)
        if len(items) == args.n:
            break
    x = torch.stack(items).to(args.device)
    caption = f"{model.config.name} at {cli.describe_size(size)}"
    return reconstruction_grid(x, reconstruct_pixels(model, x), args.out, caption=caption)


if __name__ == "__main__":
    print(cli.run(main))
