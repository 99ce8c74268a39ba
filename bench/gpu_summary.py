"""The summary bench/gpu.sh writes at the end: ``<results>/gpu_summary.md``.

    python bench/gpu_summary.py --results bench/results --gpu nvidia_h100_80gb_hbm3

A table of the steps gpu.sh ran (status, seconds, log), the selftest's failures if any, and,
where the run measured them, the roofline MODEL's predictions (bench/roofline.py) beside the
measured figures: predicted images/s never stand alone as a result. Also merges the
one-variant training records (``gpu_logs/train_<variant>.json``) into ``train_<gpu>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def steps_table(results: Path) -> list[str]:
    lines = ["| step | status | seconds | log or reason |", "|---|---|---:|---|"]
    tsv = results / "gpu_logs" / "steps.tsv"
    for_time = []
    for row in tsv.read_text().splitlines() if tsv.exists() else []:
        name, status, secs, where = (row.split("\t") + ["", "", ""])[:4]
        lines.append(f"| {name} | {status} | {secs} | {where} |")
        if status == "skipped" and "for time" in where:
            for_time.append(name)
    if for_time:
        lines += ["", f"Skipped for time (GPU_SH_BUDGET spent): {', '.join(for_time)}."]
    return lines


def merge_train(results: Path, gpu: str) -> dict | None:
    """gpu.sh runs bench/train_throughput.py one variant at a time; one file holds them all."""
    parts = sorted((results / "gpu_logs").glob("train_*.json"))
    records = [r for r in map(_read, parts) if r]
    if not records:
        return None
    merged = {k: v for k, v in records[0].items() if k != "variants"}
    merged["variants"] = {}
    for r in records:
        merged["variants"].update(r.get("variants", {}))
    from vitok_fast.fileio import atomic_write

    out = results / f"train_{gpu}.json"
    atomic_write(out, lambda p: Path(p).write_text(json.dumps(merged, indent=2) + "\n"))
    return merged


def predicted_vs_measured(results: Path, gpu: str, train: dict | None) -> list[str]:
    model = _read(results / "roofline_S-B_16.json")
    if model is None:
        return []
    paths = model["paths"]
    rows = []
    e2e = _read(results / f"e2e_{gpu}.json")
    if e2e:
        ok = [r for r in e2e.get("rows", []) if r.get("status") == "ok"
              and r.get("input") == f"{model['resolution']}x{model['resolution']}"
              and r.get("stage") == "encode+decode"]
        for name, path in (("S-B/16", "fused"), ("SD-VAE", "sd_vae")):
            measured = [r for r in ok if r["model"] == name or (name == "SD-VAE" and "SD" in r["model"])]
            if measured:
                best = max(measured, key=lambda r: r["items_per_s"])
                rows.append(f"| {name} encode+decode | {1 / paths[path]['encode_decode']['predicted_s']:.0f} "
                            f"| {best['items_per_s']:.0f} (batch {best['batch']}, "
                            f"{'compiled' if best.get('compile') else 'eager'}) |")
    if train:
        for variant, path in (("compile_kernels", "fused"), ("eager_kernels", "fused"),
                              ("eager_reference", "eager"), ("compile_reference", "eager")):
            r = train["variants"].get(variant)
            if r and "images_per_s_per_gpu" in r:
                rows.append(f"| stage-1 step, {variant} (measured with LPIPS and AdamW, which the "
                            f"model leaves out) | {1 / paths[path]['train_step']['predicted_s']:.0f} "
                            f"| {r['images_per_s_per_gpu']:.0f} |")
    if not rows:
        return []
    a = model["anchors"]
    return ["", f"## Roofline MODEL beside the measurements ({model['model']}, {model['resolution']}p, "
                f"per image)", "",
            f"Predicted = bench/roofline.py, max(FLOPs / {a['peak_tflops']} TFLOP/s, bytes / "
            f"{a['hbm_tbps']} TB/s) per op: a model under datasheet anchors, not a measurement.", "",
            "| what | predicted images/s (model) | measured images/s |", "|---|---:|---:|", *rows]


def selftest_failures(results: Path) -> list[str]:
    lines = []
    for path in sorted(results.glob("selftest_*.json")):
        data = _read(path) or {}
        checks = data.get("checks", [])
        bad = [c["name"] for c in checks if c.get("ok") is False]
        skipped = sum(c.get("ok") is None for c in checks)
        lines += ["", f"selftest ({path.name}): {len(checks) - len(bad) - skipped} ok, {len(bad)} FAIL, "
                      f"{skipped} skipped" + (": " + ", ".join(bad[:12]) if bad else "")]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--gpu", required=True, help="the device slug in the result file names")
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--elapsed", type=int, default=None)
    args = ap.parse_args(argv)
    train = merge_train(args.results, args.gpu)
    head = [f"# GPU session summary: {args.gpu}", ""]
    if args.elapsed is not None:
        head += [f"{args.elapsed} s of a {args.budget} s budget.", ""]
    lines = head + steps_table(args.results) + selftest_failures(args.results) \
        + predicted_vs_measured(args.results, args.gpu, train)
    text = "\n".join(lines) + "\n"
    from vitok_fast.fileio import atomic_write

    atomic_write(args.results / "gpu_summary.md", lambda p: Path(p).write_text(text))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
