"""Stage 2 of ViTok training: freeze the encoder, fine-tune the decoder with a GAN.

    torchrun --nproc_per_node 8 train/stage2.py --ckpt runs/stage1-S-B_16 --data /data/in/train
    python train/stage2.py --smoke --ckpt runs/stage1-T-T_8        # tiny CPU run

[paper] Section 2.3 (docs/design.md section 2): the encoder is frozen; the decoder trains on
MSE + eta * LPIPS + lambda * GAN with a StyleGAN discriminator (lr 2e-5, 25k-step warm-up);
batch 256 images / 128 videos, 100k steps; EMA of the weights with decay 0.9999, which is
what ``<run>/step_*/ema`` holds and what the held-out PSNR and grids use.
[ours] lambda defaults to 0.05 (the appendix ablation's best; Section 2.3 says 1.0), and the
generator's GAN term ramps in linearly over the discriminator's warm-up.
"""

import argparse
from pathlib import Path

from vitok_fast import cli
from vitok_fast.options import add_common_args, finalize_args

# the library function a test patches here; it imports torch only when first called
save_checkpoint = cli.lazy_function("vitok_fast.checkpoint", "save_checkpoint")


def _init_dir(text: str) -> str:
    """``--ckpt``: an existing stage-1 checkpoint or run directory ('auto' is --resume's)."""
    from vitok_fast.checkpoint import is_complete, latest_checkpoint

    if text == "auto":
        raise argparse.ArgumentTypeError(
            "'auto' is for --resume; --ckpt needs the stage-1 checkpoint directory or the "
            "stage-1 run directory (its latest checkpoint), e.g. runs/stage1-S-B_16")
    cli.existing_dir(text)
    if not is_complete(Path(text)) and latest_checkpoint(text) is None:
        raise argparse.ArgumentTypeError(
            f"expected a stage-1 checkpoint directory (holding config.json, model.safetensors "
            f"and train_state.pt) or a stage-1 run directory with such checkpoints, got {text}, "
            f"which holds neither")
    return text


def _init_config(spec):
    import json

    from vitok_fast import ViTokConfig
    from vitok_fast.checkpoint import resolve_checkpoint
    from vitok_fast.model import CONFIG_FILE

    path = resolve_checkpoint(spec, spec, flag="--ckpt")
    return ViTokConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))


def _init_settings(spec) -> dict:
    """The resolution and frames the stage-1 checkpoint ``spec`` was trained at ({} if it
    records none)."""
    from vitok_fast.checkpoint import resolve_checkpoint, training_settings

    return training_settings(resolve_checkpoint(spec, spec, flag="--ckpt")) or {}


def _said_resolution(args) -> str:
    """Whether stage 2 runs at the size stage 1 was trained at, for its start line."""
    trained = _init_settings(args.init).get("resolution")
    if not trained:
        return ""
    return " (its stage-1 resolution)" if args.resolution == trained else \
        f" (NOT its stage-1 resolution, {trained} px)"


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    g = parser.add_argument_group("stage 2")
    cli.add_ckpt(g, required=True, type=_init_dir, dest="init", deprecated=("--init",),
                 help="stage-1 checkpoint directory (or a stage-1 run directory: its latest); "
                 "the model (--model, --channels) is the one it holds")
    g.add_argument("--gan-weight", type=cli.nonnegative_float, default=0.05,
                   help="lambda [ours: 0.05, see docs/design.md section 2]")
    g.add_argument("--disc-lr", type=cli.positive_float, default=2e-5, help="[paper] 2e-5")
    g.add_argument("--disc-warmup", type=cli.nonnegative_int, default=25_000,
                   help="discriminator lr warm-up steps [paper: 25k]; the generator's GAN "
                   "term ramps in over the same steps")
    g.add_argument("--ema-decay", type=cli.fraction, default=0.9999, help="[paper] 0.9999")
    g.add_argument("--disc-channels", type=cli.positive_int, default=64,
                   help="discriminator channels at full resolution, doubling per halving up to 512")
    args = parser.parse_args(argv)
    # The model is the stage-1 checkpoint's: take its name (and so image/video defaults) there.
    config = _init_config(args.init)
    args.model, args.channels = config.name, config.channels
    # ... and the size it was trained at, unless given: a stage-1 model of 64 px fine-tuned at
    # the 256 px default would be trained on 16x upscaled crops without a word
    trained = _init_settings(args.init)
    for key in ("resolution", "frames"):
        if getattr(args, key) is None and trained.get(key):
            setattr(args, key, int(trained[key]))
    if args.smoke:  # [ours] a faster EMA so that a 30-step run shows it moving
        for key, value in (("disc_warmup", 5), ("disc_channels", 16), ("ema_decay", 0.9)):
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    if args.parallel == "fsdp":
        parser.error("stage 2 supports --parallel ddp only (the EMA keeps a full decoder copy)")
    return finalize_args(args, parser, "stage2")


def main(argv=None) -> dict:
    args = parse_args(argv)  # before torch is imported: --help and option errors need none
    from vitok_fast.training import StopOnSignal

    with StopOnSignal() as stop:  # SIGINT/SIGTERM/SIGUSR1: finish the step, save, exit
        return train(argv, stop, args)


def train(argv, stop: "StopOnSignal", args=None) -> dict:
    args = parse_args(argv) if args is None else args

    import torch

    from vitok_fast import ViTok
    from vitok_fast import distributed as D
    from vitok_fast.checkpoint import resolve_checkpoint
    from vitok_fast.discriminator import Discriminator
    from vitok_fast.losses import (d_hinge_loss, frames_as_images, g_adversarial_loss,
                                   reconstruction_loss)
    from vitok_fast.run import TrainingRun
    from vitok_fast.training import (EMA, build_lpips, build_optimizer, check_resume_model,
                                     clip_grad_norm, cosine_schedule, evaluate, image_data,
                                     model_macs, noise_seed, peak_lr, save_grid, tune_attention)

    run = TrainingRun(args, stop)  # process group, device, dtype, out_dir, accumulation steps
    dist, device, main_rank, dtype = run.dist, run.device, run.main, run.dtype
    out_dir, accum, guard = run.out_dir, run.accum, run.guard

    # -- everything that can fail on user input fails here -----------------------------------
    init = resolve_checkpoint(args.init, args.init, flag="--ckpt")
    torch.manual_seed(args.seed)  # the same random init (model, LPIPS in tests) on every rank
    lpips = build_lpips(args, device)
    train_set, val_batch = image_data(args, device)  # --data's stream, --val-data's batch
    resume_from, state = run.resume()
    if resume_from is not None:  # a run of another stage-1 model names the differing fields
        check_resume_model(resume_from, _init_config(args.init), f"--ckpt {args.init}")

    # -- the stage-1 model with a frozen encoder, a discriminator, the EMA -------------------
    model = ViTok.from_pretrained(resume_from or init, device=device,
                                  use_kernels=not args.no_kernels,
                                  attention_backend=args.attention_backend)
    config = model.config
    model.encoder.requires_grad_(False)
    disc = Discriminator(args.resolution, args.disc_channels).to(device)
    ema = EMA(model, args.ema_decay, track="decoder")
    if state is not None:
        ema.model.load_state_dict(ViTok.from_pretrained(resume_from / "ema").state_dict())
        disc.load_state_dict(state["discriminator"])
    if args.activation_checkpointing:
        model.set_grad_checkpointing(True)
    if args.compile:
        for block in model.decoder.transformer.blocks:
            block.compile()
    tune_attention(model, args, device, dtype, main_rank)  # before DDP wraps the model
    model, disc_ddp = D.wrap_model(model, dist, "ddp"), D.wrap_model(disc, dist, "ddp")
    lr = peak_lr(args)
    opt_g = build_optimizer(model, lr, args.weight_decay, device)  # decoder only: encoder frozen
    opt_d = build_optimizer(disc, args.disc_lr, args.weight_decay, device)
    sched_g = cosine_schedule(opt_g, lr, args.max_steps, args.warmup_frac, args.min_lr)
    sched_d = torch.optim.lr_scheduler.LambdaLR(  # [paper] linear warm-up, then constant
        opt_d, lambda s: min(1.0, (s + 1) / max(1, args.disc_warmup)))
    step = 0
    if state is not None:
        opt_g.load_state_dict(state["optimizer"])
        opt_d.load_state_dict(state["disc_optimizer"])
        sched_g.load_state_dict(state["scheduler"])
        sched_d.load_state_dict(state["disc_scheduler"])
        step = run.restore(state)  # the guard, this rank's RNG
    if run.finished(step):
        return run.result(step, losses=[], val_psnr=[], skipped=0)

    batches = run.batches(train_set, step)  # at the resumed position; signals armed
    noise = torch.Generator(device)
    dec_params = sum(p.numel() for p in D.unwrap(model).decoder.parameters())
    all_params = sum(p.numel() for p in D.unwrap(model).parameters())
    run.begin(step, "stage 2",
              f"{config.name} from {init} at {args.resolution} px"
              + (f" x {args.frames} frames" if args.frames > 1 else "")
              + _said_resolution(args)
              + ": decoder + discriminator "
              f"({sum(p.numel() for p in disc.parameters()) / 1e6:.1f}M) | "
              f"{dist.world} x {args.micro_batch_size} x {accum} = {args.global_batch_size}"
              f" | lr {lr:.2e}, disc lr {args.disc_lr:.1e} | GAN weight {args.gan_weight} | "
              + (f"resumed at step {step}" if state else "fresh start"),
              model_macs(config, args.frames, args.resolution),
              trained_fraction=dec_params / all_params)
    logger, throughput = run.logger, run.throughput
    losses, val_psnr = [], []

    def checkpoint(step):  # every rank calls it
        run.save(step, D.unwrap(model), {
            "optimizer": opt_g.state_dict(), "scheduler": sched_g.state_dict(),
            "discriminator": disc.state_dict(), "disc_optimizer": opt_d.state_dict(),
            "disc_scheduler": sched_d.state_dict(), "init": str(init),
        }, data={"skipped": run.skipped()}, extra_models={"ema": ema.model},
                 write=save_checkpoint)

    def evaluate_heldout(step):
        value, recon = evaluate(ema.model, val_batch, dtype)  # [paper] the EMA is evaluated
        val_psnr.append((step, value))
        if main_rank:
            save_grid(out_dir / "samples" / f"step_{step:08d}.png", val_batch, recon)
            logger.log(step, {"val/psnr_ema": value})
            logger.print(f"step {step}: held-out PSNR (EMA) {value:.2f} dB")
            logger.plot()

    # -- the loop ----------------------------------------------------------------------------
    if val_batch is not None and step == 0:
        evaluate_heldout(0)
    model.train()
    while step < args.max_steps:
        gan_w = args.gan_weight * min(1.0, step / max(1, args.disc_warmup))  # ramp in
        parts_sum = torch.zeros(6, device=device)  # g total, mse, lpips, gan, d loss, d acc
        for micro in range(accum):
            x = next(batches).to(device, non_blocking=True)
            noise.manual_seed(noise_seed(args.seed, step, micro * dist.world + dist.rank))
            last = micro == accum - 1
            # Decoder: reconstruction + GAN, judged by a discriminator that is not updated here.
            disc.requires_grad_(False)
            with D.sync_gradients(model, last):
                with run.autocast():
                    recon, posterior = model(x, generator=noise)
                    rec, parts = reconstruction_loss(x, recon, posterior, lpips,
                                                     lpips_weight=args.lpips_weight, kl_weight=0.0)
                    gan = g_adversarial_loss(disc(frames_as_images(recon)))
                    loss_g = rec + gan_w * gan
                (loss_g / accum).backward()
            disc.requires_grad_(True)
            # Discriminator: hinge loss on real frames and detached reconstructions.
            with D.sync_gradients(disc_ddp, last):
                with run.autocast():
                    logits = disc_ddp(torch.cat([frames_as_images(x),
                                                 frames_as_images(recon.detach())]))
                    real, fake = logits.chunk(2)
                    loss_d = d_hinge_loss(real, fake)
                (loss_d / accum).backward()
            acc = 0.5 * ((real > 0).float().mean() + (fake < 0).float().mean())
            parts_sum += torch.stack([loss_g.detach(), parts["mse"], parts["lpips"],
                                      gan.detach(), loss_d.detach(), acc.detach()])
        grad_norm = clip_grad_norm(model.parameters(), args.grad_clip)
        d_grad_norm = clip_grad_norm(disc.parameters(), args.grad_clip)
        parts_mean = D.all_mean(parts_sum / accum).tolist()
        ok = guard.check(parts_mean[0] + parts_mean[4], float(grad_norm) + float(d_grad_norm), step)
        if ok:
            opt_g.step()
            opt_d.step()
            ema.update(D.unwrap(model))
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        lr_now, dlr_now = sched_g.get_last_lr()[0], sched_d.get_last_lr()[0]
        sched_g.step()
        sched_d.step()
        step += 1
        run.tick(step)  # throughput, the bar, the fault-test hook
        losses.append(parts_mean[0])

        if run.due(step, args.log_every):
            per_s, mfu = throughput.rate()
            logger.log(step, {
                "train/loss_g": parts_mean[0], "train/mse": parts_mean[1],
                "train/lpips": parts_mean[2], "train/gan_g": parts_mean[3],
                "train/loss_d": parts_mean[4], "train/d_accuracy": parts_mean[5],
                "train/gan_weight": gan_w, "train/grad_norm": float(grad_norm),
                "train/d_grad_norm": float(d_grad_norm), "train/lr": lr_now, "train/d_lr": dlr_now,
                "perf/images_per_s": per_s, "perf/mfu": mfu,
                "train/nonfinite_steps": guard.skipped, "data/skipped_files": run.skipped(),
            }, bar={"g": f"{parts_mean[0]:.4f}", "mse": f"{parts_mean[1]:.4f}",
                    "d": f"{parts_mean[4]:.3f}", "d_acc": f"{parts_mean[5]:.2f}",
                    "lr": f"{lr_now:.1e}", "img/s": f"{per_s:.0f}"})
        if val_batch is not None and run.due(step, args.eval_every):
            evaluate_heldout(step)
        if run.due(step, args.save_every):
            checkpoint(step)
        if run.stop_agreed():  # every rank stops after the same step
            break

    # a signal: save, say how to resume, exit; else skipped files, --bench-out, close
    return run.finish(step, checkpoint, __file__, argv, losses=losses, val_psnr=val_psnr)


if __name__ == "__main__":
    cli.run(main)
