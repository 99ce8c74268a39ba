"""The run skeleton the three training scripts share (train/stage1.py, train/stage2.py,
train/dit.py): process group and device, resume, the finished-run exit, the loader at the
resumed position, logging and throughput, periodic and signal-time checkpoints, the stop
tail. Each script keeps its model, losses, optimizers and the step; the loop stays in the
script, where a reader sees it:

    run = TrainingRun(args, stop)                     # process group, device, dtype, accum
    resume_from, state = run.resume()
    ...model, optimizers; on resume load them and step = run.restore(state)...
    if run.finished(step):
        return run.result(step, losses=[])
    batches = run.batches(dataset, step)              # signals armed from here
    run.begin(step, "stage 1", "<the start line>", macs_per_sample)

    def checkpoint(step):                             # every rank calls it
        run.save(step, model, {"optimizer": ...}, data={...}, write=save_checkpoint)

    while step < args.max_steps:
        ...one step...
        step += 1
        run.tick(step)
        if run.due(step, args.log_every): ...
        if run.due(step, args.save_every):
            checkpoint(step)
        if run.stop_agreed():
            break
    return run.finish(step, checkpoint, __file__, argv, losses=losses)
"""

from __future__ import annotations

from pathlib import Path

import torch

from vitok_fast import distributed as D
from vitok_fast.checkpoint import load_resume, save_checkpoint, step_dir_name
from vitok_fast.data import make_loader
from vitok_fast.faults import kill_point
from vitok_fast.training import (NonFiniteGuard, RunLogger, StopOnSignal, Throughput,
                                 accumulation_steps, already_finished, autocast_dtype,
                                 restore_run_state, rng_state, write_bench)


class TrainingRun:
    """One training run's frame. Owns the process group (``dist``, ``device``, ``main``),
    the autocast ``dtype``, ``out_dir``, the accumulation steps ``accum``, the non-finite
    ``guard``, and, once :meth:`begin` has run, the ``logger`` and ``throughput``.
    ``saved_at`` is the step of the last checkpoint this process wrote or resumed."""

    def __init__(self, args, stop: StopOnSignal):
        self.args, self.stop = args, stop
        self.dist = D.setup(args.device, args.dist_timeout)
        self.device, self.main = self.dist.device, self.dist.is_main
        self.dtype = autocast_dtype(args, self.device)
        self.out_dir = Path(args.out_dir)
        # everything that can fail on user input fails before training starts
        self.accum = accumulation_steps(args.global_batch_size, args.micro_batch_size,
                                        self.dist.world)
        self.guard = NonFiniteGuard(args.max_nonfinite)
        self.dataset = self.logger = self.throughput = None
        self.saved_at = 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype,
                              enabled=self.dtype != torch.float32)

    # -- resume --------------------------------------------------------------------------

    def resume(self):
        """``(checkpoint, train_state)`` of ``--resume`` (``(None, None)`` for a fresh start);
        every file is opened here, before any model is built."""
        return load_resume(self.args.resume, self.out_dir, verbose=self.main)

    def restore(self, state: dict) -> int:
        """Restore the guard and this rank's RNG from ``state``; returns its step."""
        self.saved_at = restore_run_state(state, self.args, self.guard, self.dist.rank,
                                          self.main)
        return self.saved_at

    def finished(self, step: int) -> bool:
        """A resumed run with no step left says so and releases the process group."""
        return already_finished(step, self.args.max_steps, self.out_dir, self.main)

    def result(self, step: int, **extra) -> dict:
        """The dict ``main`` returns: the step, the script's ``extra``, the guard's count of
        skipped steps and the run directory."""
        return {"step": step, **extra, "nonfinite_steps": self.guard.skipped,
                "out_dir": str(self.out_dir)}

    # -- data, logging -------------------------------------------------------------------

    def batches(self, dataset, step: int):
        """An iterator over this rank's micro-batches from the position of ``step``; from
        here a signal stops the run after the current step (loader workers inherit that)."""
        self.dataset = dataset
        loader = make_loader(dataset, self.args.micro_batch_size, seed=self.args.seed,
                             rank=self.dist.rank, world=self.dist.world,
                             start_batches=step * self.accum, num_workers=self.args.num_workers,
                             pin_memory=self.device.type == "cuda")
        self.stop.arm()
        self.stop.step = step  # from here a lost peer is named with its step
        return iter(loader)

    def begin(self, step: int, desc: str, message: str, macs_per_sample: int,
              trained_fraction: float = 1.0) -> None:
        """Open the logger (rank 0 prints ``message``) and start the throughput clock."""
        self.logger = RunLogger(self.out_dir, self.main, step, self.args.max_steps, desc=desc)
        self.logger.print(message)
        self.throughput = Throughput(macs_per_sample, self.device, self.dist.world,
                                     trained_fraction=trained_fraction)

    def skipped(self) -> int:
        """Unreadable files skipped so far on any rank (a collective: every rank calls it)."""
        return int(D.all_max(self.dataset.skip_counts().to(self.device)).sum())

    # -- the end of each step ------------------------------------------------------------

    def tick(self, step: int) -> None:
        """Count the finished ``step`` (the fault-test hook, throughput, the bar)."""
        kill_point("step", step, self.out_dir)  # test hook: a rank lost mid-run
        self.stop.step = step
        self.throughput.tick(self.args.global_batch_size)
        self.logger.step()

    def due(self, step: int, every: int) -> bool:
        """Every ``every`` steps and at the last one."""
        return step % every == 0 or step == self.args.max_steps

    def stop_agreed(self) -> bool:
        """Every rank stops after the same step once any rank got a signal (a collective)."""
        return self.stop.agreed(self.device)

    # -- checkpoints ---------------------------------------------------------------------

    def save(self, step: int, model, state: dict, data: dict | None = None,
             extra_models: dict | None = None, write=save_checkpoint) -> None:
        """Write ``step_<step>`` with ``write`` (:func:`checkpoint.save_checkpoint`; a
        script passes its own name for it, which tests replace): ``model`` (plain,
        unwrapped), ``extra_models`` (e.g. the EMA) and a train state of the script's
        ``state`` plus what every run holds: the step, the guard, every rank's RNG, the
        arguments and the data position (``batches_per_rank`` and ``data``). Every rank
        calls it; rank 0 writes."""
        rngs = D.gather_objects(rng_state())
        if self.main:
            write(self.out_dir, step, model, {
                "step": step, **state, "guard": self.guard.state_dict(), "rng": rngs,
                "args": vars(self.args),
                "data": {"batches_per_rank": step * self.accum, **(data or {})},
            }, extra_models=extra_models, keep=self.args.keep)
        D.barrier()
        self.saved_at = step

    # -- the stop tail -------------------------------------------------------------------

    def finish(self, step: int, checkpoint, script, argv, **extra) -> dict:
        """After the loop. A run stopped by a signal saves (``checkpoint``, unless this step
        is saved), says how to resume and exits; otherwise name the skipped files, write
        ``--bench-out``, close the logs and the process group, and return :meth:`result`
        (with ``skipped`` for datasets that count unreadable files)."""
        args, logger = self.args, self.logger
        self.stop.exit_if_stopped(step, args.max_steps, self.saved_at, checkpoint, logger,
                                  self.out_dir, script, argv, self.main)
        if hasattr(self.dataset, "skip_counts"):
            extra["skipped"] = n_skipped = self.skipped()
            if self.main and n_skipped:
                logger.print(f"skipped {n_skipped} unreadable file(s): "
                             f"{self.dataset.skipped_files[:10]}")
        if self.main and getattr(args, "bench_out", None):
            record = write_bench(args.bench_out, args, self.throughput, self.device,
                                 self.dist.world)
            logger.print(f"throughput: {record['images_per_s_per_gpu']:.1f} images/s per GPU, "
                         f"MFU {record['mfu']} -> {args.bench_out}")
        final = self.out_dir / step_dir_name(step)
        if self.main and final.is_dir():  # the loop saves the last step
            logger.print(f"final checkpoint: {final}" + (
                f" (EMA weights in {final / 'ema'})" if (final / "ema").is_dir() else "")
                + f"; the tools take it, or the run directory {self.out_dir}, as --ckpt")
        logger.close()
        D.cleanup()
        return self.result(step, **extra, final_checkpoint=str(final))
