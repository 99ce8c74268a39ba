"""Export a trained ViTok's encoder and decoder for serving: ``torch.export`` programs with
dynamic batch, height and width (and frames for video models).

    python -m vitok_fast.export --ckpt runs/s1 --out exported/
    python -m vitok_fast.export --ckpt runs/s1 --out exported/ --no-kernels   # ATen ops only

Writes into ``--out``: ``encoder.pt2`` (pixels -> posterior ``(mean, logvar)``),
``decoder.pt2`` (latent -> pixels), both ``torch.export.save`` files; where the device is
CUDA also ``encoder_aoti.pt2`` and ``decoder_aoti.pt2``, AOTInductor packages compiled for
this GPU (``--no-aoti`` skips them); and ``export.json`` (model, config, path, the
``vitok::`` ops the programs call, versions, files). Each program is checked against the
eager model on an input of another size than the one it was traced with before it is
written.

Loading, in a serving process:

    import torch
    import vitok_fast.kernels  # only for kernel-path programs: registers the vitok:: ops
    encode = torch.export.load("exported/encoder.pt2").module()
    mean, logvar = encode(pixels)
    decode = torch._inductor.aoti_load_package("exported/decoder_aoti.pt2")  # CUDA

Programs hold their weights on the device they were exported on (``--device``). A model
whose kernels cannot run on that device (the CPU without ``TRITON_INTERPRET=1``) exports
its reference path, as it would run; export.json says which.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from vitok_fast import cli


def _check_equal(program, eager, example: torch.Tensor, what: str) -> None:
    """The program against the eager module on a bigger input than the traced one."""
    import torch

    bigger = torch.cat([example, example[:1]], dim=0)
    with torch.no_grad():
        got, want = program.module()(bigger), eager(bigger)
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    if not all(torch.equal(a, b) for a, b in zip(got, want)):
        err = max(float((a - b).abs().max()) for a, b in zip(got, want))
        raise RuntimeError(f"the exported {what} differs from the eager model (max |diff| {err:.3e})")


def main(argv=None) -> dict:
    p = cli.ArgumentParser(prog="python -m vitok_fast.export", description=__doc__)
    cli.add_ckpt(p, required=True)
    cli.add_out(p, "output directory for encoder.pt2, decoder.pt2, export.json", required=True)
    cli.add_no_kernels(p, help="export the reference path (ATen ops only; loads without vitok_fast)")
    p.add_argument("--no-aoti", action="store_true",
                   help="skip the AOTInductor packages (written only on CUDA)")
    cli.add_device(p)
    args = p.parse_args(argv)

    import torch

    from vitok_fast import serving
    from vitok_fast.checkpoint import resolve_ckpt
    from vitok_fast.model import ViTok

    overrides = {"attention_backend": "sdpa", **({"use_kernels": False} if args.no_kernels else {})}
    with cli.option("--ckpt", args.ckpt):
        model = ViTok.from_pretrained(resolve_ckpt(args.ckpt), device=args.device, **overrides).eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    cfg = model.config
    pixels = serving.example_pixels(cfg, device)
    with torch.no_grad():
        latent = model.encode(pixels).mean
    record = {"model": cfg.name, "config": json.loads(cfg.to_json()), "device": str(device),
              "torch": torch.__version__, "files": {}}
    for what, export, module, example in (
            ("encoder", serving.export_encoder, serving.EncodeMoments(model), pixels),
            ("decoder", serving.export_decoder, serving.DecodeLatent(model), latent)):
        t0 = time.perf_counter()
        program = export(model, example)
        _check_equal(program, module, example, what)
        path = out / f"{what}.pt2"
        torch.export.save(program, path)
        ops = serving.custom_ops(program)
        record["files"][what] = {"file": path.name, "vitok_ops": len(ops), "ops": sorted(set(ops)),
                                 "path": "kernels" if ops else "reference"}
        print(f"{what}: {path} ({len(ops)} vitok:: ops; {time.perf_counter() - t0:.1f} s)",
              file=sys.stderr)
        if device.type == "cuda" and not args.no_aoti:
            t0 = time.perf_counter()
            package = serving.aoti_package(program, out / f"{what}_aoti.pt2")
            record["files"][what]["aoti"] = Path(package).name
            print(f"{what}: AOTInductor package {package} ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr)
    (out / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    cli.run(main)
