"""Peak memory and time of encode+decode vs input size, whole vs tiled.

    python bench/tiling_memory.py                               # S-B/16, CUDA if present
    python bench/tiling_memory.py --model S-B/16 --sizes 256 512 1024 2048 --tile 512

Attention memory grows with the square of the token count when SDPA falls back to the
math kernel, and activations grow linearly with it in any case; tiling caps both at the
tile's size. On CUDA the peak is torch.cuda.max_memory_allocated; on CPU each run is a
fresh subprocess and the peak is its maximum resident set size (includes the interpreter
and the weights, so compare rows, not absolutes). Random weights: memory and time do not
depend on them. Writes bench/results/tiling_memory_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def run_one(model_name: str, size: int, tile: int | None, overlap: int | None, device: str,
            dtype: str) -> dict:
    from vitok_fast import ViTok

    torch.manual_seed(0)
    model = ViTok.from_name(model_name).to(device).eval()
    x = torch.rand(1, 3, size, size, device=device) * 2 - 1
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=dtype == "bf16")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.no_grad(), autocast:
        z = model.encode(x, tile=tile, overlap=overlap).mode()
        model.decode(z, tile=tile, overlap=overlap)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"size": size, "tokens": (size // model.config.patch_size) ** 2, "tile": tile,
            "overlap": overlap, "peak_mib": round(peak, 1),
            "seconds": round(time.perf_counter() - start, 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="S-B/16")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=128)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", nargs=2, type=int, metavar=("SIZE", "TILE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")

    if args.child:  # one measurement in a fresh process (CPU peak RSS)
        size, tile = args.child
        print(json.dumps(run_one(args.model, size, tile or None, args.overlap if tile else None,
                                 args.device, dtype)))
        return
    rows = []
    for size in args.sizes:
        for tile in (None, args.tile):
            if tile is not None and tile >= size:
                continue
            if args.device.startswith("cuda"):
                try:
                    row = run_one(args.model, size, tile, args.overlap if tile else None, args.device, dtype)
                except torch.OutOfMemoryError:
                    row = {"size": size, "tile": tile, "peak_mib": None, "error": "out of memory"}
                torch.cuda.empty_cache()
            else:
                out = subprocess.run([sys.executable, __file__, "--model", args.model, "--device",
                                      args.device, "--dtype", dtype, "--overlap", str(args.overlap),
                                      "--child", str(size), str(tile or 0)],
                                     capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{size:5d}px  tile {str(tile):>5}  peak {row['peak_mib']} MiB  "
                  f"{row.get('seconds', '-')} s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    import triton

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    payload = {"benchmark": "tiling_memory", "model": args.model, "device": device_name,
               "dtype": dtype, "torch": torch.__version__, "triton": triton.__version__,
               "commit": commit, "peak": "cuda max_memory_allocated" if args.device.startswith("cuda")
               else "process max RSS", "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    path = RESULTS / f"tiling_memory_{kind}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
