"""Stage 1 of ViTok training: the autoencoder with MSE + eta * LPIPS + beta * KL.

    torchrun --nproc_per_node 8 train/stage1.py --data /data/imagenet/train   # paper: S-B/16, 256p
    python train/stage1.py --smoke                              # tiny CPU run, ~1 minute
    torchrun --nproc_per_node 8 train/stage1.py --data "shards/{000..099}.tar" --compile

[paper] Section 2.3 (docs/design.md section 2): beta = 1e-3, eta = 1, AdamW (0.9, 0.95), weight
decay 1e-4, peak lr 1e-4 * batch * frames / 256, cosine with 3% warm-up to 1e-5, gradient
clipping 1.0, bf16, batch 1024 images / 256 videos, 100k steps. No EMA in stage 1.
The model knows nothing of DDP, compile or checkpoints: they are applied here, from outside.
"""


from vitok_fast import cli
from vitok_fast.options import add_common_args, finalize_args

# the library functions a test patches here; each imports torch only when first called
save_checkpoint = cli.lazy_function("vitok_fast.checkpoint", "save_checkpoint")
reconstruction_loss = cli.lazy_function("vitok_fast.losses", "reconstruction_loss")


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--kl-weight", type=cli.nonnegative_float, default=1e-3,
                        help="beta [paper: 1e-3]")
    return finalize_args(parser.parse_args(argv), parser, "stage1")


def main(argv=None) -> dict:
    args = parse_args(argv)  # before torch is imported: --help and option errors need none
    from vitok_fast.training import StopOnSignal

    with StopOnSignal() as stop:  # SIGINT/SIGTERM/SIGUSR1: finish the step, save, exit
        return train(argv, stop, args)


def train(argv, stop: "StopOnSignal", args=None) -> dict:
    args = parse_args(argv) if args is None else args

    import torch

    from vitok_fast import ViTok, ViTokConfig
    from vitok_fast import distributed as D
    from vitok_fast.run import TrainingRun
    from vitok_fast.training import (build_lpips, build_optimizer, check_resume_model,
                                     clip_grad_norm, cosine_schedule, evaluate, image_data,
                                     model_macs, noise_seed, peak_lr, save_grid, tune_attention)

    run = TrainingRun(args, stop)  # process group, device, dtype, out_dir, accumulation steps
    dist, device, main_rank, dtype = run.dist, run.device, run.main, run.dtype
    out_dir, accum, guard = run.out_dir, run.accum, run.guard

    # -- everything that can fail on user input fails here, before training starts ----------
    torch.manual_seed(args.seed)  # the same random init (model, LPIPS in tests) on every rank
    lpips = build_lpips(args, device)
    train_set, val_batch = image_data(args, device)  # --data's stream, --val-data's batch
    config = ViTokConfig.from_name(args.model, channels=args.channels,
                                   use_kernels=not args.no_kernels,
                                   attention_backend=args.attention_backend)
    resume_from, state = run.resume()
    if resume_from is not None:  # another model's run names the differing fields
        check_resume_model(resume_from, config, f"--model {args.model} --channels {args.channels}")

    # -- model, optimizer, schedule; a resumed run reloads all of them -----------------------
    model = ViTok(config).to(device)
    if state is not None:
        model.load_state_dict(ViTok.from_pretrained(resume_from).state_dict())
    if args.activation_checkpointing:
        model.set_grad_checkpointing(True)
    if args.compile:  # per block, in place: state-dict keys are unchanged
        for transformer in (model.encoder.transformer, model.decoder.transformer):
            for block in transformer.blocks:
                block.compile()
    tune_attention(model, args, device, dtype, main_rank)  # before DDP wraps the model
    model = D.wrap_model(model, dist, args.parallel)
    lr = peak_lr(args)
    optimizer = build_optimizer(model, lr, args.weight_decay, device)
    scheduler = cosine_schedule(optimizer, lr, args.max_steps, args.warmup_frac, args.min_lr)
    step = 0
    if state is not None:
        D.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = run.restore(state)  # the guard, this rank's RNG
    if run.finished(step):
        return run.result(step, losses=[], val_psnr=[], skipped=0)

    batches = run.batches(train_set, step)  # at the resumed position; signals armed
    noise = torch.Generator(device)
    run.begin(step, "stage 1",
              f"{config.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
              f"params | {dist.world} rank(s) x {args.micro_batch_size} x {accum} accum = "
              f"{args.global_batch_size} per step | peak lr {lr:.2e} | data {args.data} "
              f"({len(train_set) if hasattr(train_set, '__len__') else 'stream'}) | "
              + (f"resumed from {resume_from} at step {step}" if state else "fresh start"),
              model_macs(config, args.frames, args.resolution))
    logger, throughput = run.logger, run.throughput
    losses, val_psnr = [], []

    def checkpoint(step):  # every rank calls it (FSDP gathers the model and optimizer)
        plain = D.full_model(model, lambda: ViTok(config))
        opt_state = D.optimizer_state(model, optimizer)
        run.save(step, plain, {"optimizer": opt_state, "scheduler": scheduler.state_dict()},
                 data={"micro_batch": args.micro_batch_size, "world": dist.world,
                       "skipped": run.skipped()}, write=save_checkpoint)

    def evaluate_heldout(step):
        value, recon = evaluate(D.unwrap(model), val_batch, dtype)  # all ranks (FSDP gathers)
        val_psnr.append((step, value))
        if main_rank:
            save_grid(out_dir / "samples" / f"step_{step:08d}.png", val_batch, recon)
            logger.log(step, {"val/psnr": value})
            logger.print(f"step {step}: held-out PSNR {value:.2f} dB "
                         f"({len(val_batch)} samples of {args.heldout})")
            logger.plot()

    # -- the loop ----------------------------------------------------------------------------
    if val_batch is not None and step == 0:
        evaluate_heldout(0)  # the baseline the run improves on
    model.train()
    while step < args.max_steps:
        parts_sum = torch.zeros(4, device=device)  # total, mse, lpips, kl
        for micro in range(accum):
            x = next(batches).to(device, non_blocking=True)
            noise.manual_seed(noise_seed(args.seed, step, micro * dist.world + dist.rank))
            with D.sync_gradients(model, micro == accum - 1):
                with run.autocast():
                    recon, posterior = model(x, generator=noise)
                    loss, parts = reconstruction_loss(x, recon, posterior, lpips,
                                                      lpips_weight=args.lpips_weight,
                                                      kl_weight=args.kl_weight)
                (loss / accum).backward()
            parts_sum += torch.stack([loss.detach(), parts["mse"], parts["lpips"], parts["kl"]])
        grad_norm = clip_grad_norm(model.parameters(), args.grad_clip)  # after backward
        parts_mean = D.all_mean(parts_sum / accum).tolist()
        if guard.check(parts_mean[0], float(grad_norm), step):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_now = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        run.tick(step)  # throughput, the bar, the fault-test hook
        losses.append(parts_mean[0])

        if run.due(step, args.log_every):
            per_s, mfu = throughput.rate()
            n_skipped = run.skipped()
            logger.log(step, {
                "train/loss": parts_mean[0], "train/mse": parts_mean[1],
                "train/lpips": parts_mean[2], "train/kl": parts_mean[3],
                "train/grad_norm": float(grad_norm), "train/lr": lr_now,
                "perf/images_per_s": per_s, "perf/mfu": mfu,
                "train/nonfinite_steps": guard.skipped, "data/skipped_files": n_skipped,
            }, bar={"loss": f"{parts_mean[0]:.4f}", "mse": f"{parts_mean[1]:.4f}",
                    "lpips": f"{parts_mean[2]:.3f}", "kl": f"{parts_mean[3]:.2f}",
                    "lr": f"{lr_now:.1e}", "img/s": f"{per_s:.0f}",
                    **({"mfu": f"{mfu:.1%}"} if mfu is not None else {})})
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
