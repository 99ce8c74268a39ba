"""``vitok <command> [options]`` (also ``python -m vitok_fast <command>``): one installed entry
point for every tool and training script.

    vitok train-stage1 --data photos/            # = python train/stage1.py --data photos/
    vitok encode --ckpt runs/stage1-S-B_16 --data photos/ --out latents/
    vitok sample --help                          # each command's own options

Each command runs exactly as ``python -m <module>`` would (same options, output and exit
status). Multi-GPU training goes through torchrun as before, by path or by module:
``torchrun --nproc_per_node 8 -m vitok_fast.train.stage1 ...``. This module only dispatches,
by name and at run time: listing the commands imports none of them, nor torch.
"""

from __future__ import annotations

import runpy
import sys

# command -> (module run as __main__, one line for the list)
COMMANDS = {
    "train-stage1": ("vitok_fast.train.stage1", "stage 1: train a ViTok autoencoder (MSE + LPIPS + KL)"),
    "train-stage2": ("vitok_fast.train.stage2", "stage 2: fine-tune its decoder with a GAN"),
    "train-dit": ("vitok_fast.train.dit", "train a class-conditional DiT on encoded latents"),
    "encode": ("vitok_fast.encode", "images / videos -> latent shards (+ index.json, stats.json)"),
    "decode": ("vitok_fast.decode", "latent shards -> images / videos"),
    "latent-stats": ("vitok_fast.latent_stats", "latent shift / scale for a diffusion model"),
    "sample": ("vitok_fast.sample", "sample a trained DiT, decode with its ViTok"),
    "evaluate": ("vitok_fast.evaluate", "rFID / PSNR / SSIM / LPIPS (rFVD), or gFID / IS of samples"),
    "reconstruct": ("vitok_fast.reconstruct", "reconstruct files or folders, side by side with PSNR"),
    "plots": ("vitok_fast.plots", "reconstruction grids, E sweeps, training curves"),
    "selftest": ("vitok_fast.selftest", "check this installation's kernels and backends"),
    "export": ("vitok_fast.export", "torch.export the encoder and decoder for serving"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return ("usage: vitok <command> [options]   (vitok <command> --help for its options)\n\n"
            "commands:\n" + "\n".join(lines))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    name = argv[0].replace("_", "-")
    if name not in COMMANDS:
        print(f"error: expected a command, one of {', '.join(COMMANDS)}; got {argv[0]!r} "
              f"(see vitok --help)", file=sys.stderr)
        sys.exit(2)
    module = COMMANDS[name][0]
    sys.argv = [f"vitok {name}", *argv[1:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
