"""Class-conditional DiT on ViTok latents (the paper's generation experiments, Section 3.3).

    python -m vitok_fast.encode --ckpt runs/stage2-S-B_16 --data /data/imagenet/train --out latents/in256
    torchrun --nproc_per_node 8 train/dit.py --latents latents/in256 --ckpt runs/stage2-S-B_16 --compile
    python train/dit.py --smoke                                 # tiny CPU run, ~1 minute

[DiT, paper] DDPM epsilon-prediction with 1000 linear-beta steps, AdamW lr 1e-4 constant, no
weight decay, batch 256, EMA 0.9999 (what ``<run>/step_*/ema`` holds, what sample grids and
python -m vitok_fast.sample use), class dropout 0.1 for classifier-free guidance. Latents are
read from labelled shards (index.json, stats.json) and normalised as
``(z - shift_factor) * scaling_factor`` (``--per-channel-norm``: each channel's mean and
std); ``--posterior sample`` draws z = mean + std * eps afresh each step, as LDM and DiT do
with their VAE. Unlabelled items (label -1) train the null class only. Everything around the
loop (DDP, bf16, exact resume, checkpoints, logging, signals) is the run skeleton the three
scripts share (vitok_fast/run.py).
"""

import json
from pathlib import Path

from vitok_fast import cli
from vitok_fast.cli import UserError
from vitok_fast.options import add_dist_timeout, add_run_args


# [ours] a CPU-sized run on latents of the embedded photos under a random T-T/8 ViTok
SMOKE = dict(model="DiT-T/1", global_batch_size=8, micro_batch_size=4, max_steps=20, lr=1e-3,
             save_every=10, sample_every=10, log_every=5, ema_decay=0.9, sample_steps=10)


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="DiT-XL/1", help="DiT-S/B/L/XL (or T, tiny) / patch size "
                   "over the latent grid [paper: DiT-XL, patch 1 on ViTok /16 latents]")
    g.add_argument("--latents", type=cli.existing_dir, default=None, help="labelled latent shards + stats.json "
                   "(python -m vitok_fast.encode)")
    cli.add_ckpt(g, type=cli.existing_dir, default=None, dest="vitok", deprecated=("--vitok",),
                 help="the ViTok that encoded them: decodes sample grids")
    g.add_argument("--posterior", choices=["sample", "mean"], default="sample",
                   help="train on posterior samples (fresh each step) or the mean")
    g.add_argument("--per-channel-norm", action="store_true",
                   help="normalise each channel by its own mean/std instead of one shift/scale")
    g.add_argument("--class-dropout", type=cli.fraction, default=0.1, help="[DiT] 0.1")
    g.add_argument("--num-workers", type=cli.nonnegative_int, default=0, help="the latents are in memory")
    g = p.add_argument_group("optimisation")
    g.add_argument("--global-batch-size", type=cli.positive_int, default=256, help="[DiT] 256")
    g.add_argument("--micro-batch-size", type=cli.positive_int, default=32,
                   help="per rank and forward pass; the rest is gradient accumulation")
    g.add_argument("--max-steps", type=cli.positive_int, default=400_000, help="[DiT] 400k for its Table 4")
    g.add_argument("--lr", type=cli.positive_float, default=1e-4, help="[DiT] 1e-4")
    g.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="[DiT] constant; cosine decays to --min-lr after --warmup-frac")
    g.add_argument("--warmup-frac", type=cli.fraction, default=0.0,
                   help="fraction of --max-steps with a linear lr warm-up")
    g.add_argument("--min-lr", type=cli.nonnegative_float, default=1e-5,
                   help="lr at the end of --schedule cosine")
    g.add_argument("--weight-decay", type=cli.nonnegative_float, default=0.0, help="[DiT] 0")
    g.add_argument("--grad-clip", type=cli.positive_float, default=1.0,
                   help="clip the gradient's global norm to this")
    g.add_argument("--ema-decay", type=cli.fraction, default=0.9999, help="[DiT] 0.9999")
    g.add_argument("--max-nonfinite", type=cli.positive_int, default=10,
                   help="stop after this many non-finite steps in a row")
    g.add_argument("--seed", type=cli.nonnegative_int, default=0,
                   help="seed of the weights, the data order and the noise")
    g = p.add_argument_group("speed")
    g.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile each DiT block")
    cli.add_no_kernels(g)
    cli.add_device(g, later=True)
    add_dist_timeout(g)
    g = add_run_args(p, "dit-<model>", save_every=5000)
    g.add_argument("--sample-every", type=cli.positive_int, default=5000, help="sample grid from the EMA")
    g.add_argument("--sample-steps", type=cli.positive_int, default=50, help="DDIM steps of the grids")
    g.add_argument("--cfg", type=cli.nonnegative_float, default=1.5, help="guidance scale of the grids")
    g.add_argument("--smoke", action="store_true", help="a CPU-sized run on latents of the "
                   "embedded photos under a random T-T/8 ViTok (written to <out>/smoke)")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    if args.out_dir is None:
        args.out_dir = str(Path("runs") / f"dit-{args.model.replace('/', '_')}")
    if args.latents is None and not args.smoke:
        raise UserError("--latents is required: a directory written by python -m vitok_fast.encode "
                        "(or pass --smoke for a tiny run on made-up latents)")
    check_model_fits(args.model, args.latents, p)
    return args


def check_model_fits(name: str, latents, parser) -> None:
    """``--model`` names a DiT whose patch tiles the latent grid of ``--latents`` (read from
    its index.json, before any latent or model loads)."""
    from vitok_fast.dit import DiTConfig

    try:
        DiTConfig.from_name(name)
    except ValueError as e:
        parser.error(f"argument --model: {e}")
    index_path = Path(latents) / "index.json" if latents else None
    if index_path is None or not index_path.is_file():
        return  # --smoke makes its own; load_latent_set names a missing index
    index = json.loads(index_path.read_text())
    if not index.get("shards"):
        return
    from safetensors import safe_open

    try:  # the shard's header holds the shape: no latent is read
        with safe_open(str(Path(latents) / index["shards"][0]["file"]), framework="pt") as f:
            grid = f.get_slice("mean").get_shape()[-1]
    except Exception:  # noqa: BLE001 -- a bad shard: load_latent_set names it
        return
    patch = DiTConfig.from_name(name).patch_size
    if grid % patch:
        fits = [k for k in range(1, grid + 1) if grid % k == 0]
        raise UserError(f"--model {name} has patch size {patch}, which does not tile the "
                        f"{grid}x{grid} latent grid of --latents {latents}; use a patch size "
                        f"among {fits}, e.g. "
                        f"{name.rpartition('/')[0]}/{max(k for k in fits if k < patch)}")


def smoke_latents(out: Path, seed: int) -> tuple[Path, Path]:
    """Encode the embedded photos (32 px, 2 classes by parity) with a random T-T/8 ViTok."""
    import torch

    from vitok_fast.data import make_dataset
    from vitok_fast.latents import write_latent_set
    from vitok_fast.model import ViTok

    vitok_dir, latent_dir = out / "smoke" / "vitok", out / "smoke" / "latents"
    if not (latent_dir / "stats.json").is_file():
        torch.manual_seed(seed)
        vitok = ViTok.from_name("T-T/8", use_kernels=False).eval()
        data = make_dataset("embedded", 32, train=False)
        x = torch.stack([data[i] for i in range(len(data))])
        with torch.no_grad():
            posterior = vitok.encode(x)
        write_latent_set(latent_dir, posterior.mean, posterior.logvar,
                         torch.arange(len(x)) % 2, ["even", "odd"],
                         [f"embedded/{i}" for i in range(len(x))],
                         meta={"model": "T-T/8", "resolution": 32, "frames": 1})
        vitok.save_pretrained(vitok_dir)
    return latent_dir, vitok_dir


def main(argv=None) -> dict:
    args = parse_args(argv)  # before torch is imported: --help and option errors need none
    from vitok_fast.training import StopOnSignal

    with StopOnSignal() as stop:  # SIGINT/SIGTERM/SIGUSR1: finish the step, save, exit
        return train(argv, stop, args)


def train(argv, stop: "StopOnSignal", args=None) -> dict:
    args = parse_args(argv) if args is None else args

    import torch

    from vitok_fast import distributed as D
    from vitok_fast.checkpoint import save_checkpoint
    from vitok_fast.dit import LATENT_FILE, DiT, DiTConfig, Diffusion, LatentNorm  # <run>/latents.json
    from vitok_fast.fileio import atomic_write
    from vitok_fast.latents import LatentItems, load_latent_set
    from vitok_fast.run import TrainingRun
    from vitok_fast.training import EMA, build_optimizer, clip_grad_norm, cosine_schedule, noise_seed

    run = TrainingRun(args, stop)  # process group, device, dtype, out_dir, accumulation steps
    dist, device, main_rank = run.dist, run.device, run.main
    out_dir, accum, guard = run.out_dir, run.accum, run.guard

    # -- everything that can fail on user input fails here, before training starts ----------
    if args.smoke and args.latents is None:
        if main_rank:
            args.latents, args.vitok = map(str, smoke_latents(out_dir, args.seed))
        D.barrier()
        args.latents, args.vitok = str(out_dir / "smoke" / "latents"), str(out_dir / "smoke" / "vitok")
    latents = load_latent_set(args.latents)
    norm = LatentNorm(latents["stats"], args.per_channel_norm)
    classes = latents["index"].get("classes") or []
    num_classes = max(1, len(classes))
    latent_shape = tuple(latents["mean"].shape[1:])
    vitok = None
    if args.vitok:
        from vitok_fast.checkpoint import resolve_ckpt
        from vitok_fast.model import ViTok

        vitok = ViTok.from_pretrained(resolve_ckpt(args.vitok), device=device,
                                      **({"use_kernels": False} if args.no_kernels else {})).eval()
    config = DiTConfig.from_name(args.model, channels=latent_shape[0], num_classes=num_classes,
                                 class_dropout=args.class_dropout, use_kernels=not args.no_kernels)
    resume_from, state = run.resume()
    if main_rank:
        out_dir.mkdir(parents=True, exist_ok=True)
        # absolute paths: python -m vitok_fast.sample finds them from any directory
        info = {"latents": str(Path(args.latents).resolve()),
                "vitok": str(Path(args.vitok).resolve()) if args.vitok else None,
                "resolution": latents["index"].get("resolution"),
                "frames": latents["index"].get("frames"), "stats": latents["stats"],
                "per_channel_norm": args.per_channel_norm, "latent_shape": list(latent_shape),
                "classes": classes}
        atomic_write(out_dir / LATENT_FILE,
                     lambda p: Path(p).write_text(json.dumps(info, indent=2) + "\n"))

    # -- model, EMA, optimizer, schedule; a resumed run reloads all of them ------------------
    torch.manual_seed(args.seed)  # the same random init on every rank
    model = DiT(config).to(device)
    ema = EMA(model, args.ema_decay, track="")
    if state is not None:
        model.load_state_dict(DiT.from_pretrained(resume_from).state_dict())
        ema.model.load_state_dict(DiT.from_pretrained(resume_from / "ema").state_dict())
    if args.compile:  # per block, in place: state-dict keys are unchanged
        for block in model.blocks:
            block.compile()
    model = D.wrap_model(model, dist, "ddp")
    optimizer = build_optimizer(model, args.lr, args.weight_decay, device, betas=(0.9, 0.999))
    if args.schedule == "cosine":
        scheduler = cosine_schedule(optimizer, args.lr, args.max_steps, args.warmup_frac, args.min_lr)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    diffusion = Diffusion()
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = run.restore(state)  # the guard, this rank's RNG
    if run.finished(step):
        return run.result(step, losses=[])

    batches = run.batches(LatentItems(latents), step)  # at the resumed position; signals armed
    noise = torch.Generator(device)
    n_params = sum(p.numel() for p in model.parameters())
    # 6 x params x tokens per sample, the usual transformer estimate (adaLN counted in full)
    tokens = latent_shape[-1] * latent_shape[-2] * (latent_shape[1] if len(latent_shape) == 4 else 1)
    run.begin(step, "DiT",
              f"{config.name}: {n_params / 1e6:.1f}M params on latents {latent_shape} of "
              f"{latents['index'].get('resolution', '?')} px images "
              f"({len(latents['mean'])} items, {num_classes} classes) | {dist.world} "
              f"rank(s) x {args.micro_batch_size} x {accum} accum = "
              f"{args.global_batch_size} per step | "
              + (f"resumed from {resume_from} at step {step}" if state else "fresh start"),
              n_params * tokens // config.patch_size**2)
    logger, throughput = run.logger, run.throughput
    losses = []

    def checkpoint(step):  # every rank calls it
        run.save(step, D.unwrap(model),
                 {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                 data={"micro_batch": args.micro_batch_size, "world": dist.world},
                 extra_models={"ema": ema.model}, write=save_checkpoint)

    def sample_grid(step):
        """One row per class (at most 8 classes, 8 samples each) from the EMA, fixed noise."""
        from vitok_fast.dit import decode_samples
        from vitok_fast.media import save_sample_grid

        rows = min(num_classes, 8)
        y = torch.arange(rows, device=device).repeat_interleave(8)
        if not classes:
            y = torch.zeros_like(y)
        gen = torch.Generator(device).manual_seed(args.seed)
        with run.autocast():
            z = diffusion.ddim_sample(ema.model, (len(y), *latent_shape), y,
                                      steps=args.sample_steps, cfg=args.cfg if classes else 1.0,
                                      generator=gen, device=device)
        pixels = decode_samples(vitok, norm.denormalize(z.float()))
        save_sample_grid(out_dir / "samples" / f"step_{step:08d}.png", pixels, rows,
                         labels=classes[:rows] if classes else ["unlabelled"])

    # -- the loop ----------------------------------------------------------------------------
    model.train()
    while step < args.max_steps:
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            mean, logvar, y = (t.to(device, non_blocking=True) for t in next(batches))
            noise.manual_seed(noise_seed(args.seed, step, micro * dist.world + dist.rank))
            z = mean
            if args.posterior == "sample":
                z = mean + torch.exp(0.5 * logvar) * torch.randn(
                    mean.shape, device=device, generator=noise)
            z = norm.normalize(z)
            # [DiT] class dropout; unlabelled items (-1) always train the null class
            drop = (torch.rand(y.shape, device=device, generator=noise) < args.class_dropout) | (y < 0)
            y = y.clamp_min(0)
            with D.sync_gradients(model, micro == accum - 1):
                with run.autocast():
                    loss = diffusion.loss(model, z, y, generator=noise, drop_labels=drop)
                (loss / accum).backward()
            loss_sum += loss.detach()
        grad_norm = clip_grad_norm(model.parameters(), args.grad_clip)
        loss_mean = float(D.all_mean(loss_sum / accum))
        if guard.check(loss_mean, float(grad_norm), step):
            optimizer.step()
            ema.update(D.unwrap(model))
        optimizer.zero_grad(set_to_none=True)
        lr_now = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        run.tick(step)  # throughput, the bar, the fault-test hook
        losses.append(loss_mean)

        if run.due(step, args.log_every):
            per_s, mfu = throughput.rate()
            logger.log(step, {"train/loss": loss_mean, "train/grad_norm": float(grad_norm),
                              "train/lr": lr_now, "perf/latents_per_s": per_s, "perf/mfu": mfu,
                              "train/nonfinite_steps": guard.skipped},
                       bar={"loss": f"{loss_mean:.4f}", "lr": f"{lr_now:.1e}",
                            "lat/s": f"{per_s:.0f}"})
        if main_rank and vitok is not None and run.due(step, args.sample_every):
            sample_grid(step)
            logger.plot()
        if run.due(step, args.save_every):
            checkpoint(step)
        if run.stop_agreed():  # every rank stops after the same step
            break

    # a signal: save, say how to resume, exit; else close the logs and the process group
    return run.finish(step, checkpoint, __file__, argv, losses=losses)


if __name__ == "__main__":
    cli.run(main)
