"""End to end: ViTok against the Stable Diffusion VAE, images/s and peak memory.

On an H100 (or any CUDA GPU), one command:

    python bench/bench_e2e.py
    # -> bench/results/e2e_<gpu>.json and e2e_<gpu>.png, and markdown tables on stdout

It measures encode, decode and encode+decode for ViTok S-B/16 and S-L/16 on 256p and 512p
images and for S-B/4x8, S-B/8x8 and S-B/4x16 on 16x128x128 clips, each against diffusers'
SD-VAE (AutoencoderKL, the SD configuration of vitok_fast.flops.SD_VAE_CONFIG, random
weights) on the same pixels (clips frame by frame), over a batch sweep. Both run in bf16 at
their best: torch.compile (ViTok: its Llama blocks, as train/stage1.py does, with the fused
kernels on; SD-VAE: the whole encoder and decoder, channels_last). Each ViTok row sits next
to the SD-VAE row of the same input, stage and batch: the measured speed ratio
ViTok / SD-VAE beside the ratio of multiply-accumulates SD-VAE / ViTok counted in the same
run by vitok_fast.flops (if both ran at the same fraction of peak, the two would be equal).

Timing: warm-up calls first (compilation, autotuning) and never timed; then each call is
timed with CUDA events and the median is kept, over at least --reps calls (3) and
--min-seconds (1 s) of them. Peak memory is torch.cuda.max_memory_allocated over the timed calls (reset
per case; it includes the weights). A batch that runs out of memory is recorded as "oom" and
the larger batches of that model, input and stage as "skipped".

Results are merged into the JSON after every case, so a run cut short (or split with
--models / --resolutions / --batches / --stages) continues where it stopped when the same
command runs again; --fresh starts over.

    python bench/bench_e2e.py --models S-B/16 --resolutions 256 --batches 64,128
    python bench/bench_e2e.py --compile both        # eager and compiled side by side
    python bench/bench_e2e.py --no-video            # images only

On a CPU it runs a tiny configuration (T-T models, a small VAE, 32px, eager) that exercises
the code path only; it writes nothing unless --write-cpu is given (then e2e_cpu_tiny.json).
Its times say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

from vitok_fast.interpret import interpret_without_cuda

interpret_without_cuda()  # our kernels on the CPU: before triton loads

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
import triton  # noqa: E402
from tqdm import tqdm  # noqa: E402

from vitok_fast.config import ViTokConfig  # noqa: E402
from vitok_fast.fileio import atomic_write  # noqa: E402
from vitok_fast.flops import SD_VAE_CONFIG, count_sd_vae, count_vitok  # noqa: E402
from vitok_fast.model import ViTok  # noqa: E402
from vitok_fast.benchmarking import git_commit  # noqa: E402

STAGES = ("encode", "decode", "encode+decode")
SD_VAE = "SD-VAE"


@dataclasses.dataclass(frozen=True)
class Preset:
    image_models: tuple
    video_models: tuple
    resolutions: tuple
    batches: tuple
    video_batches: tuple  # clips per batch
    frames: int
    video_resolution: int
    vae_config: dict = dataclasses.field(default_factory=lambda: SD_VAE_CONFIG, hash=False)


# [issue 7] the paper's models and inputs; batch 1..256 images, clips up to 64 (64 clips of
# 16 frames are 1024 SD-VAE frames of 128x128: as many pixels as 256 images at 256p).
GPU = Preset(image_models=("S-B/16", "S-L/16"), video_models=("S-B/4x8", "S-B/8x8", "S-B/4x16"),
             resolutions=(256, 512), batches=(1, 8, 32, 64, 128, 256),
             video_batches=(1, 4, 16, 32, 64), frames=16, video_resolution=128)
# [ours] CPU: exercises every code path in seconds. A 3-level VAE (downsampling 4x) of the
# SD-VAE's block types; its FLOPs are counted with the same counter.
TINY_VAE_CONFIG = dict(SD_VAE_CONFIG, down_block_types=["DownEncoderBlock2D"] * 2,
                       up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32],
                       layers_per_block=1, norm_num_groups=8, sample_size=32)
TINY = Preset(image_models=("T-T/8",), video_models=("T-T/2x8",), resolutions=(32,),
              batches=(1, 2), video_batches=(1,), frames=4, video_resolution=16,
              vae_config=TINY_VAE_CONFIG)


# -- the two models, as encode / decode callables ------------------------------------------


@dataclasses.dataclass
class Coder:
    """One model ready to time: ``encode(pixels) -> latent`` and ``decode(latent) -> pixels``."""
    name: str
    module: torch.nn.Module
    encode: object
    decode: object
    compile_scope: str  # "none", "blocks" or "model"


def _mode(posterior):
    return posterior.mode()


def build_vitok(name: str, device, dtype, compiled: bool, scope: str, kernels: bool,
                compile_mode: str | None, dynamic: bool | None = None) -> Coder:
    model = ViTok.from_name(name, use_kernels=kernels).to(device=device, dtype=dtype).eval()
    encode = lambda x: model.encode(x).mode()  # noqa: E731 - inference uses the posterior mean
    decode = model.decode
    if compiled and scope == "blocks":
        # As train/stage1.py: every Llama block compiled in place. Blocks of one width share
        # one compiled graph (parameters are graph inputs), so a batch sweep over five models
        # costs a few small compilations instead of one big one per model and shape.
        for transformer in (model.encoder.transformer, model.decoder.transformer):
            for block in transformer.blocks:
                block.compile(mode=compile_mode, dynamic=dynamic)
    elif compiled:
        encode = torch.compile(encode, mode=compile_mode, dynamic=dynamic)
        decode = torch.compile(decode, mode=compile_mode, dynamic=dynamic)
    return Coder(name, model, encode, decode, ("blocks" if scope == "blocks" else "model")
                 if compiled else "none")


def build_sd_vae(config: dict, device, dtype, compiled: bool, compile_mode: str | None,
                 dynamic: bool | None = None) -> Coder:
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its warning about casting with .to() is for hub weights
    vae = AutoencoderKL(**config).to(device=device, dtype=dtype).eval()
    vae = vae.to(memory_format=torch.channels_last)  # cuDNN's fast layout for convolutions
    encode = lambda x: vae.encode(x).latent_dist.mode()  # noqa: E731
    decode = lambda z: vae.decode(z).sample  # noqa: E731
    if compiled:
        encode = torch.compile(encode, mode=compile_mode, dynamic=dynamic)
        decode = torch.compile(decode, mode=compile_mode, dynamic=dynamic)
    return Coder(SD_VAE, vae, encode, decode, "model" if compiled else "none")


@dataclasses.dataclass(frozen=True)
class Workload:
    """An input: images (frames == 1) or clips, and how many pixels-per-item each model sees."""
    resolution: int
    frames: int

    @property
    def label(self) -> str:
        r = f"{self.resolution}x{self.resolution}"
        return r if self.frames == 1 else f"{self.frames}x{r}"

    @property
    def unit(self) -> str:
        return "images/s" if self.frames == 1 else "videos/s"


def make_inputs(coder: Coder, work: Workload, batch: int, device, dtype, vae_down: int):
    """Pixels and a latent of the right shape for ``coder``. SD-VAE sees a clip as its frames."""
    R, T = work.resolution, work.frames
    gen = torch.Generator(device).manual_seed(0)
    if coder.name == SD_VAE:
        n = batch * T
        x = torch.rand(n, 3, R, R, generator=gen, device=device, dtype=dtype) * 2 - 1
        latent_channels = coder.module.config.latent_channels
        z = torch.randn(n, latent_channels, R // vae_down, R // vae_down, generator=gen,
                        device=device, dtype=dtype)
        to_cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
        return to_cl(x), to_cl(z)
    cfg = coder.module.config
    shape = (batch, 3, R, R) if T == 1 else (batch, 3, T, R, R)
    x = torch.rand(*shape, generator=gen, device=device, dtype=dtype) * 2 - 1
    grid = cfg.grid(T, R, R)
    zshape = (batch, cfg.channels, grid[1], grid[2]) if T == 1 else (batch, cfg.channels, *grid)
    z = torch.randn(*zshape, generator=gen, device=device, dtype=dtype)
    return x, z


# -- timing ---------------------------------------------------------------------------------


def time_calls(fn, device: torch.device, warmup: int, reps: int, min_seconds: float,
               max_reps: int = 1000) -> list[float]:
    """Seconds per call: ``warmup`` untimed calls (compilation, autotuning, allocator), then
    calls timed one by one (CUDA events on a GPU, perf_counter on the CPU) until at least
    ``reps`` calls and ``min_seconds`` of them (a 1 ms call about 1000 times, a 2 s call
    ``reps`` times), at most ``max_reps``."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    samples: list[float] = []
    while len(samples) < reps or (sum(samples) < min_seconds and len(samples) < max_reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e-3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return samples


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return "out of memory" in str(e).lower()  # compile / autotune wrappers re-raise it


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(coder: Coder, work: Workload, stage: str, batch: int, device, dtype, vae_down,
            args) -> dict:
    """One row: median seconds per call, items/s, peak memory; or status oom / error."""
    row = {"status": "ok"}
    if device.type == "cuda":
        row["mem_before_bytes"] = torch.cuda.memory_allocated(device)  # weights (and any leak)
    try:
        x, z = make_inputs(coder, work, batch, device, dtype, vae_down)
        fn = {"encode": lambda: coder.encode(x), "decode": lambda: coder.decode(z),
              "encode+decode": lambda: coder.decode(coder.encode(x))}[stage]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with torch.no_grad():
            for _ in range(args.warmup):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            samples = time_calls(fn, device, 0, args.reps, args.min_seconds)
        seconds = statistics.median(samples)
        row.update(seconds=seconds, seconds_min=min(samples), seconds_max=max(samples),
                   calls=len(samples), items_per_s=batch / seconds)
        if device.type == "cuda":
            row["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
    except Exception as e:  # noqa: BLE001 - one failing case must not end a long run
        if _is_oom(e):
            row = {"status": "oom"}
        else:
            row = {"status": "error", "error": f"{type(e).__name__}: {e}"[:400]}
    finally:
        x = z = fn = None  # noqa: F841
        _free(device)
    return row


# -- counts, ratios, summary ----------------------------------------------------------------


def count_macs(pairs, vae_config) -> dict:
    """MACs per item (image or clip) and stage for each (model, input), from vitok_fast.flops'
    one counter, keyed "model|input"."""
    out = {}
    for name, work in pairs:
        counts = (count_sd_vae(work.resolution, work.frames, config=vae_config) if name == SD_VAE
                  else count_vitok(ViTokConfig.from_name(name), work.resolution, work.frames))
        out[f"{name}|{work.label}"] = {"encode": counts["encoder"]["macs"],
                                       "decode": counts["decoder"]["macs"],
                                       "encode+decode": counts["total"]["macs"],
                                       "params": counts["total"]["params"],
                                       "latent_shape": counts["latent_shape"]}
    return out


def _setting(row) -> tuple:
    """What both sides of a ratio must share besides input, stage and batch."""
    return (row["compile"], row.get("compile_mode"), row.get("static_shapes"), row["dtype"])


def _key(row) -> tuple:
    return (row["model"], row["input"], row["stage"], row["batch"], *_setting(row),
            row["kernels"], row.get("compile_scope"))


def ratios(rows: list[dict]) -> list[dict]:
    """Every ViTok row next to SD-VAE's on the same input, stage, batch and compile setting."""
    sd = {(r["input"], r["stage"], r["batch"], *_setting(r)): r
          for r in rows if r["model"] == SD_VAE and r["status"] == "ok"}
    out = []
    for r in rows:
        other = sd.get((r["input"], r["stage"], r["batch"], *_setting(r)))
        if r["model"] == SD_VAE or r["status"] != "ok" or other is None:
            continue
        out.append({"model": r["model"], "input": r["input"], "stage": r["stage"],
                    "batch": r["batch"], "compile": r["compile"], "dtype": r["dtype"],
                    "compile_mode": r.get("compile_mode"), "static_shapes": r.get("static_shapes"),
                    "unit": r["unit"], "vitok_items_per_s": r["items_per_s"],
                    "sd_vae_items_per_s": other["items_per_s"],
                    "speed_ratio": r["items_per_s"] / other["items_per_s"],
                    "macs_ratio": other["macs_per_item"] / r["macs_per_item"]})
    return out


def summary(rows: list[dict]) -> list[dict]:
    """Each side at its best batch: the throughput a user gets, and the ratio of those."""
    best = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        k = (r["model"], r["input"], r["stage"], *_setting(r))
        if k not in best or r["items_per_s"] > best[k]["items_per_s"]:
            best[k] = r
    out = []
    for (model, inp, stage, *setting), r in best.items():
        sd = best.get((SD_VAE, inp, stage, *setting))
        comp, dt = r["compile"], r["dtype"]
        if model == SD_VAE or sd is None:
            continue
        out.append({"model": model, "input": inp, "stage": stage, "compile": comp, "dtype": dt,
                    "unit": r["unit"], "vitok_best_items_per_s": r["items_per_s"],
                    "vitok_best_batch": r["batch"], "vitok_peak_mem_bytes": r.get("peak_mem_bytes"),
                    "sd_vae_best_items_per_s": sd["items_per_s"], "sd_vae_best_batch": sd["batch"],
                    "sd_vae_peak_mem_bytes": sd.get("peak_mem_bytes"),
                    "speed_ratio": r["items_per_s"] / sd["items_per_s"],
                    "macs_ratio": sd["macs_per_item"] / r["macs_per_item"]})
    return out


# [issue 7] ViTok S-B/16 encode+decode >= 10x SD-VAE's images/s (256p, both at their best).
TARGET = {"model": "S-B/16", "input": "256x256", "stage": "encode+decode", "speed_ratio": 10.0}


def target_check(best: list[dict], gpu: bool) -> dict:
    hits = [b for b in best if all(b[k] == TARGET[k] for k in ("model", "input", "stage"))
            and b["compile"]]
    out = dict(TARGET, compared="best batch of each, compiled")
    if not gpu:
        out["met"] = None
        out["note"] = "not a GPU run: no verdict"
    elif not hits:
        out["met"] = None
        out["note"] = "not measured in this file"
    else:
        out["measured"] = hits[0]["speed_ratio"]
        out["met"] = hits[0]["speed_ratio"] >= TARGET["speed_ratio"]
    return out


# -- report ---------------------------------------------------------------------------------


def _mib(b):
    return "" if b is None else f"{b / 2**20:.0f}"


def markdown(report: dict) -> str:
    lines = ["| model | input | stage | compile | batch | items/s | peak MiB | ViTok/SD-VAE speed | "
             "SD-VAE/ViTok MACs |", "|---|---|---|---|---|---|---|---|---|"]
    rat = {(r["model"], r["input"], r["stage"], r["batch"], *_setting(r)): r
           for r in report["ratios"]}
    for r in report["rows"]:
        comp = "yes" if r["compile"] else "no"
        if r["status"] != "ok":
            why = r.get("error", r.get("note", ""))[:80].replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['model']} | {r['input']} | {r['stage']} | {comp} | {r['batch']} | "
                         f"{r['status']}{': ' + why if why else ''} | | | |")
            continue
        q = rat.get((r["model"], r["input"], r["stage"], r["batch"], *_setting(r)))
        lines.append(f"| {r['model']} | {r['input']} | {r['stage']} | {comp} | {r['batch']} | "
                     f"{r['items_per_s']:.1f} {r['unit']} | {_mib(r.get('peak_mem_bytes'))} | "
                     + (f"{q['speed_ratio']:.2f}x | {q['macs_ratio']:.2f}x |" if q else "| |"))
    lines += ["", "Best batch of each side:", "",
              "| model | input | stage | compile | ViTok | SD-VAE | speed ratio | MACs ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for b in report["best"]:
        lines.append(f"| {b['model']} | {b['input']} | {b['stage']} | {'yes' if b['compile'] else 'no'}"
                     f" | {b['vitok_best_items_per_s']:.1f} (batch {b['vitok_best_batch']}) | "
                     f"{b['sd_vae_best_items_per_s']:.1f} (batch {b['sd_vae_best_batch']}) | "
                     f"{b['speed_ratio']:.2f}x | {b['macs_ratio']:.2f}x |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["rows"] if r["status"] == "ok"]
    inputs = sorted({r["input"] for r in ok}, key=lambda s: (s.count("x"), len(s), s))
    if not inputs:
        return
    fig, axes = plt.subplots(len(inputs), len(STAGES), figsize=(4.2 * len(STAGES), 3.4 * len(inputs)),
                             squeeze=False)
    models = sorted({r["model"] for r in ok}, key=lambda m: (m == SD_VAE, m))
    colors = {m: f"C{i}" for i, m in enumerate(models)}
    for i, inp in enumerate(inputs):
        for j, stage in enumerate(STAGES):
            ax = axes[i, j]
            for model in models:
                for comp in (True, False):
                    pts = sorted((r["batch"], r["items_per_s"]) for r in ok if r["model"] == model
                                 and r["input"] == inp and r["stage"] == stage and r["compile"] == comp)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", ms=3, color=colors[model],
                                linestyle="-" if comp else "--",
                                label=f"{model}{'' if comp else ' (eager)'}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{inp} {stage}", fontsize=9)
            ax.set_xlabel("batch", fontsize=8)
            unit = "images/s" if inp.count("x") == 1 else "videos/s"
            ax.set_ylabel(unit, fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    fig.suptitle(f"ViTok vs SD-VAE, {report['dtype']}, {report['device']}; torch {report['torch']}, "
                 f"commit {str(report['commit'])[:12]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


# -- --against: today's tokenizers side by side (bench/peers.py) ---------------------------

# [issue 19] a short sweep: the best batch of each side is what a user gets.
AGAINST_BATCHES = {"cuda": {"image": (1, 8, 32), "video": (1, 4)}, "cpu": {"image": (1, 2), "video": (1,)}}
AGAINST_RESOLUTION = {"cuda": 256, "cpu": 128}


def build_peer(peers, peer, device, dtype, compiled: bool, compile_mode: str | None) -> Coder:
    """A peer with random weights; on a GPU compiled whole (encode and decode), channels_last
    where it is an image model (cuDNN's fast layout for 2D convolutions)."""
    model = peers.build(peer, device=device, dtype=dtype)
    if device.type == "cuda" and peer.kind == "image":
        model = model.to(memory_format=torch.channels_last)
    encode = lambda x: peers.encode(peer, model, x)  # noqa: E731
    decode = lambda z: peers.decode(peer, model, z)  # noqa: E731
    if compiled:
        encode = torch.compile(encode, mode=compile_mode)
        decode = torch.compile(decode, mode=compile_mode)
    return Coder(peer.name, model, encode, decode, "model" if compiled else "none")


def _median_interleaved(fns, device, warmup: int, reps: int, min_seconds: float) -> list[list[float]]:
    """Seconds per call of each of ``fns``, timed in turns (a, b, a, b, ...) so that a machine
    shared with other work slows both sides alike; warm-up calls first, never timed."""
    with torch.no_grad():
        for fn in fns:
            for _ in range(warmup):
                fn()
        samples = [[] for _ in fns]
        while len(samples[0]) < reps or sum(map(sum, samples)) < min_seconds:
            for fn, out in zip(fns, samples):
                out += time_calls(fn, device, 0, 1, 0.0, max_reps=1)
    return samples


def run_against(args) -> dict:
    """Encode + decode of ViTok and each peer on the same pixels, timed in turns, over a
    short batch sweep; speed ratios beside the MAC ratios of the same run."""
    import peers  # bench/peers.py: this script's folder is on sys.path when it runs

    device, dtype, cuda = args.device, args.dtype, args.device.type == "cuda"
    compiled = args.compile != "off"
    # Off a GPU our Triton kernels only run in the interpreter, a correctness tool: time
    # ViTok's plain-PyTorch path there.
    kernels = cuda and not args.no_kernels
    kind_of_device = "cuda" if cuda else "cpu"
    resolution = args.against_resolution or AGAINST_RESOLUTION[kind_of_device]
    batches = {k: (args.batches_given or v) if k == "image" else (args.video_batches_given or v)
               for k, v in AGAINST_BATCHES[kind_of_device].items()}
    todo, skipped = [], []
    for peer in args.against:
        why = peers.unavailable(peer) or peers.check_resolution(peer, resolution)
        (skipped.append(why) if why else todo.append(peer))
    for why in skipped:
        print(f"skipped {why}")
    load = os.getloadavg()
    report = dict(device=device_name(device), torch=torch.__version__, commit=git_commit(),
                  dtype=str(dtype).replace("torch.", ""), compile=compiled, vitok_kernels=kernels,
                  threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                  started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                  load_average_at_start=list(load), argv=sys.argv[1:],
                  timing=("interleaved: each timed call of ViTok is followed by one of the peer, "
                          "median of each; warm-up calls untimed"),
                  note=("random weights (speed does not depend on them); encode = the latent a "
                        "generator sees (posterior mean), decode = pixels"), rows=[], best=[],
                  skipped=skipped)
    if not cuda:
        report["shared_machine"] = (f"{os.cpu_count()} CPU cores shared with other work (load "
                                    f"average {load[0]:.1f} at start): absolute times are "
                                    "pessimistic; ratios, timed in turns, are the figures to read")
    import diffusers
    report["diffusers"] = diffusers.__version__
    cases = [(p, b) for p in todo for b in batches[p.kind]]
    bar = tqdm(total=len(cases), desc="against", unit="case")
    vitoks: dict = {}
    for peer in todo:
        frames = peers.frames_for(peer)
        name = peers.VITOK_REFERENCE[peer.kind]
        vitok_frames = peers.VITOK_FRAMES if peer.kind == "video" else 1
        if name not in vitoks:
            vitoks[name] = build_vitok(name, device, dtype, compiled, args.vitok_compile_scope,
                                       kernels, args.compile_mode)
        vitok = vitoks[name]
        peer_coder = build_peer(peers, peer, device, dtype, compiled, args.compile_mode)
        counts = peers.count(peer, resolution, frames)
        vitok_counts = count_vitok(ViTokConfig.from_name(name), resolution, vitok_frames)
        peer_macs = (counts["macs_encode"] + counts["macs_decode"]) / frames
        vitok_macs = vitok_counts["total"]["macs"] / vitok_frames
        for batch in batches[peer.kind]:
            bar.set_postfix_str(f"{peer.name} b{batch}")
            row = dict(peer=peer.name, vitok=name, resolution=resolution, peer_frames=frames,
                       vitok_frames=vitok_frames, batch=batch, kind=peer.kind,
                       macs_per_frame_peer=peer_macs, macs_per_frame_vitok=vitok_macs,
                       macs_ratio=peer_macs / vitok_macs)
            try:
                x = peers.make_input(peer, resolution, frames, batch, device, dtype)
                shape = (batch, 3, resolution, resolution) if vitok_frames == 1 else \
                    (batch, 3, vitok_frames, resolution, resolution)
                y = torch.rand(*shape, device=device, dtype=dtype) * 2 - 1
                fns = [lambda: vitok.decode(vitok.encode(y)),
                       lambda: peer_coder.decode(peer_coder.encode(x))]
                (tv, tp) = _median_interleaved(fns, device, args.warmup, args.reps, args.min_seconds)
                v, p = statistics.median(tv), statistics.median(tp)
                # Per input frame: the clips differ in length (16 frames for ViTok, 17 or 19).
                row.update(status="ok", vitok_seconds=v, peer_seconds=p, calls=len(tv),
                           vitok_frames_per_s=batch * vitok_frames / v,
                           peer_frames_per_s=batch * frames / p)
                row["speed_ratio"] = row["vitok_frames_per_s"] / row["peer_frames_per_s"]
            except Exception as e:  # noqa: BLE001 - one failing peer must not end the run
                row.update(status="oom" if _is_oom(e) else "error",
                           error=f"{type(e).__name__}: {e}"[:300])
            finally:
                x = y = fns = None  # noqa: F841
                _free(device)
            report["rows"].append(row)
            bar.update()
        del peer_coder
        _free(device)
    bar.close()
    report["load_average_at_end"] = list(os.getloadavg())
    for peer in todo:
        ok = [r for r in report["rows"] if r["peer"] == peer.name and r["status"] == "ok"]
        if ok:
            bv = max(ok, key=lambda r: r["vitok_frames_per_s"])
            bp = max(ok, key=lambda r: r["peer_frames_per_s"])
            report["best"].append(dict(
                peer=peer.name, vitok=bv["vitok"], kind=peer.kind, resolution=resolution,
                vitok_best_batch=bv["batch"], vitok_frames_per_s=bv["vitok_frames_per_s"],
                peer_best_batch=bp["batch"], peer_frames_per_s=bp["peer_frames_per_s"],
                speed_ratio=bv["vitok_frames_per_s"] / bp["peer_frames_per_s"],
                macs_ratio=bv["macs_ratio"]))
    print(markdown_against(report))
    if cuda or args.write_cpu:
        stem = "peers_cpu" if not cuda else f"peers_{_slug(report['device'])}"
        path = args.out_dir / f"{stem}.json"
        args.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: Path(p).write_text(json.dumps(report, indent=1) + "\n"))
        print(f"wrote {path}")
    return report


def markdown_against(report: dict) -> str:
    lines = [f"{report['device']}, {report['dtype']}, compile {'on' if report['compile'] else 'off'}; "
             "encode + decode, per input frame, best batch of each side:", "",
             "| peer | input | ViTok | ViTok frames/s (batch) | peer frames/s (batch) | "
             "ViTok speed / peer | peer MACs / ViTok |", "|---|---|---|---|---|---|---|"]
    for b in report["best"]:
        lines.append(f"| {b['peer']} | {b['resolution']}p {b['kind']} | {b['vitok']} | "
                     f"{b['vitok_frames_per_s']:.2f} ({b['vitok_best_batch']}) | "
                     f"{b['peer_frames_per_s']:.2f} ({b['peer_best_batch']}) | "
                     f"{b['speed_ratio']:.2f}x | {b['macs_ratio']:.2f}x |")
    failed = [r for r in report["rows"] if r["status"] != "ok"]
    lines += [f"{r['peer']} batch {r['batch']}: {r['status']} {r.get('error', '')}" for r in failed]
    return "\n".join(lines)


# -- the run --------------------------------------------------------------------------------


def _ints(s):
    return tuple(int(v) for v in s.split(",")) if s else None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None,
                    help="T-T models, a small VAE, 32px (default: on without a GPU)")
    ap.add_argument("--models", default=None,
                    help="comma list of ViTok names to run (default: S-B/16,S-L/16 and the video "
                    "models; SD-VAE always runs as the baseline unless --no-sd-vae)")
    ap.add_argument("--resolutions", default=None, help="image sides, comma list (default 256,512)")
    ap.add_argument("--batches", default=None, help="image batches (default 1,8,32,64,128,256)")
    ap.add_argument("--video-batches", default=None, help="clips per batch (default 1,4,16,32,64)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma list of encode,decode,encode+decode")
    ap.add_argument("--no-video", action="store_true", help="skip the video models")
    ap.add_argument("--no-sd-vae", action="store_true", help="skip the SD-VAE baseline")
    ap.add_argument("--compile", choices=("on", "off", "both"), default=None,
                    help="torch.compile (default: on with a GPU, off on the CPU); both = eager and "
                    "compiled side by side")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode, e.g. max-autotune-no-cudagraphs (default: default)")
    ap.add_argument("--vitok-compile-scope", choices=("blocks", "model"), default="blocks",
                    help="compile ViTok's Llama blocks (fast to compile, as training does) or its "
                    "whole encode and decode (one graph per model, input and batch)")
    ap.add_argument("--static-shapes", action="store_true",
                    help="torch.compile(dynamic=False): one graph per batch size (longer to "
                    "compile); default: dynamo's automatic dynamic batch after the second size")
    ap.add_argument("--no-kernels", action="store_true", help="ViTok with plain-PyTorch ops")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                    help="default: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed calls per case (default 2; CPU 1; use 3 with reduce-overhead)")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per case, at least (default 3)")
    ap.add_argument("--min-seconds", type=float, default=None,
                    help="keep timing a case until this much time is measured (default 1.0; CPU 0)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--write-cpu", action="store_true",
                    help="on the CPU, write e2e_cpu_tiny.json / .png (not written otherwise)")
    ap.add_argument("--fresh", action="store_true",
                    help="ignore the rows of an existing JSON instead of continuing it")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--against", default=None, metavar="NAME[,NAME...]",
                    help="instead: ViTok against today's tokenizers (bench/peers.py ids, or images, "
                    "videos, all), encode+decode timed in turns; writes peers_<device>.json "
                    "(on the CPU with --write-cpu)")
    ap.add_argument("--against-resolution", type=int, default=None,
                    help="input side for --against (default 256 on a GPU, 128 on the CPU)")
    args = ap.parse_args(argv)
    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda given, but torch sees no CUDA device; use --device cpu")
    args.tiny = (not cuda) if args.tiny is None else args.tiny
    args.compile = args.compile or ("on" if cuda else "off")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    args.min_seconds = args.min_seconds if args.min_seconds is not None else (1.0 if cuda else 0.0)
    args.stages = tuple(args.stages.split(","))
    bad = [s for s in args.stages if s not in STAGES]
    if bad:
        ap.error(f"--stages takes {','.join(STAGES)}, got {','.join(bad)}")
    for name in ("warmup", "reps"):
        if getattr(args, name) < (1 if name == "reps" else 0):
            ap.error(f"--{name} must be {'positive' if name == 'reps' else '>= 0'}, got {getattr(args, name)}")
    preset = TINY if args.tiny else GPU
    try:
        args.batches_given, args.video_batches_given = _ints(args.batches), _ints(args.video_batches)
        args.resolutions = _ints(args.resolutions) or preset.resolutions
        args.batches = _ints(args.batches) or preset.batches
        args.video_batches = _ints(args.video_batches) or preset.video_batches
    except ValueError as e:
        ap.error(f"--resolutions / --batches / --video-batches take comma lists of integers: {e}")
    if min(args.batches + args.video_batches + args.resolutions) <= 0:
        ap.error("batches and resolutions must be positive")
    models = args.models.split(",") if args.models else list(preset.image_models + preset.video_models)
    args.image_models, args.video_models = [], []
    for m in models:
        try:
            cfg = ViTokConfig.from_name(m)
        except ValueError as e:
            ap.error(f"--models: {e}")
        (args.video_models if cfg.is_video else args.image_models).append(m)
    if args.no_video:
        args.video_models = []
    args.preset = preset
    if args.against is not None:
        import peers  # bench/peers.py: this script's folder is on sys.path when it runs
        try:
            args.against = peers.select(args.against)
        except ValueError as e:
            ap.error(f"--against: {e}")
        if args.against_resolution is not None and (args.against_resolution <= 0 or args.against_resolution % 64):
            ap.error(f"--against-resolution must be a positive multiple of 64, got {args.against_resolution}")
    return args


def plan(args) -> list[tuple[str, Workload, tuple]]:
    """(model, input, batches) in run order: each model built once for all its inputs."""
    p = args.preset
    images = [Workload(r, 1) for r in args.resolutions]
    video = Workload(p.video_resolution, p.frames)
    out = [(m, w, args.batches) for m in args.image_models for w in images]
    out += [(m, video, args.video_batches) for m in args.video_models]
    if not args.no_sd_vae:
        out += [(SD_VAE, w, args.batches) for w in images]
        if args.video_models:
            out += [(SD_VAE, video, args.video_batches)]
    return out


def _vae_downsampling(config: dict) -> int:
    return 2 ** (len(config["block_out_channels"]) - 1)


def run(args, argv=None) -> dict:
    device, dtype, cuda = args.device, args.dtype, args.device.type == "cuda"
    name = device_name(device)
    stem = f"e2e_{_slug(name)}" if cuda else "e2e_cpu_tiny" if args.tiny else "e2e_cpu"
    json_path = args.out_dir / f"{stem}.json"
    write = cuda or args.write_cpu
    import torch._dynamo.config as dynamo_config
    # Blocks of every model share Block.forward's cache; one entry per (shape, width) and a
    # batch sweep needs more than the default 8 before dynamo would silently fall back to eager.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, 256)
    torch.backends.cudnn.benchmark = True  # the VAE's convolutions pick their fastest algorithm

    todo = plan(args)
    compile_settings = {"on": (True,), "off": (False,), "both": (False, True)}[args.compile]
    macs = count_macs([(m, w) for m, w, _ in todo], args.preset.vae_config)
    kernels = not args.no_kernels
    dynamic = False if args.static_shapes else None
    dname = str(dtype).replace("torch.", "")
    old = {}
    if write and json_path.exists() and not args.fresh:
        old = json.loads(json_path.read_text())
    macs = {**old.get("macs_per_item", {}), **macs}
    this_run = dict(commit=git_commit(), started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                    argv=sys.argv[1:] if argv is None else list(argv))
    old_runs, old = old.get("runs", []), old.get("rows", [])
    done = {_key(r): r for r in old if r["status"] in ("ok", "oom")}
    rows = {_key(r): r for r in old}

    report = dict(device=name, torch=torch.__version__, triton=triton.__version__,
                  cuda=torch.version.cuda, python=sys.version.split()[0], commit=git_commit(),
                  dtype=dname, tiny=args.tiny, interpreted_kernels=not cuda and kernels,
                  settings=dict(
                      compile=args.compile, compile_mode=args.compile_mode or "default",
                      vitok_compile_scope=args.vitok_compile_scope, sd_vae_compile_scope="model",
                      compile_shapes="static (dynamic=False)" if args.static_shapes else
                      "dynamo default: batch made dynamic after the second batch size",
                      vitok_kernels=kernels, sd_vae_channels_last=True,
                      sd_vae_config=args.preset.vae_config, warmup_calls=args.warmup,
                      min_timed_calls=args.reps, min_timed_seconds=args.min_seconds,
                      timing="median of per-call CUDA-event times after warm-up" if cuda
                      else "median of per-call perf_counter times after warm-up",
                      peak_memory="torch.cuda.max_memory_allocated over the timed calls, reset per "
                      "case; includes the weights", latents="posterior mean (mode)",
                      sd_vae_video="frame by frame: a batch of B clips is B*T frames in one call"),
                  runs=old_runs + [this_run], macs_per_item=macs, target=None, rows=[],
                  ratios=[], best=[])

    def save():
        report["rows"] = sorted(rows.values(), key=lambda r: (r["model"] == SD_VAE, r["model"],
                                r["input"], STAGES.index(r["stage"]), r["compile"], r["batch"]))
        report["ratios"] = ratios(report["rows"])
        report["best"] = summary(report["rows"])
        report["target"] = target_check(report["best"], cuda)
        if write:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(json_path, lambda p: Path(p).write_text(json.dumps(report, indent=1) + "\n"))

    total = sum(len(b) * len(args.stages) * len(compile_settings) for _, _, b in todo)
    bar = tqdm(total=total, desc="e2e", unit="case")
    for model_name in dict.fromkeys(m for m, _, _ in todo):
        for compiled in compile_settings:
            if model_name == SD_VAE:
                coder = build_sd_vae(args.preset.vae_config, device, dtype, compiled,
                                     args.compile_mode, dynamic)
            else:
                coder = build_vitok(model_name, device, dtype, compiled, args.vitok_compile_scope,
                                    kernels, args.compile_mode, dynamic)
            for _, work, batches in [t for t in todo if t[0] == model_name]:
                for stage in args.stages:
                    oom_at = None
                    for batch in sorted(batches):
                        row = dict(model=model_name, input=work.label, resolution=work.resolution,
                                   frames=work.frames, stage=stage, batch=batch, compile=compiled,
                                   compile_scope=coder.compile_scope, dtype=dname,
                                   compile_mode=(args.compile_mode or "default") if compiled else None,
                                   static_shapes=args.static_shapes if compiled else None,
                                   kernels=kernels if model_name != SD_VAE else None,
                                   unit=work.unit,
                                   macs_per_item=macs[f"{model_name}|{work.label}"][stage])
                        bar.set_postfix_str(f"{model_name} {work.label} {stage} b{batch}"
                                            f"{' compiled' if compiled else ''}")
                        if _key(row) in done:
                            if done[_key(row)]["status"] == "oom":
                                oom_at = batch
                            bar.update()
                            continue
                        if oom_at is not None:
                            row.update(status="skipped", note=f"out of memory at batch {oom_at}")
                        else:
                            row.update(measure(coder, work, stage, batch, device, dtype,
                                               _vae_downsampling(args.preset.vae_config), args),
                                       commit=report["commit"])
                            if row["status"] == "oom":
                                oom_at = batch
                            elif row["status"] == "ok":
                                row["achieved_tflop_per_s"] = (2 * row["macs_per_item"] *
                                                               row["items_per_s"] / 1e12)
                        rows[_key(row)] = row
                        save()
                        bar.update()
            del coder
            _free(device)
            if compiled:
                torch._dynamo.reset()  # the next model's graphs start from a clean cache
    bar.close()
    save()
    print(markdown(report))
    failed = [r for r in report["rows"] if r["status"] == "error"]
    if failed:
        print(f"\n{len(failed)} case(s) failed; the first: {failed[0]['model']} {failed[0]['input']} "
              f"{failed[0]['stage']} batch {failed[0]['batch']}: {failed[0]['error']}\n"
              "(a ViTok failure only when compiled: try --vitok-compile-scope model, "
              "--static-shapes, or --no-kernels, and report it)")
    t = report["target"]
    print(f"\ntarget: {t['model']} {t['input']} {t['stage']} >= {t['speed_ratio']:.0f}x SD-VAE: "
          + (t.get("note") or f"measured {t['measured']:.2f}x -> {'met' if t['met'] else 'MISSED'}"))
    if write:
        print(f"wrote {json_path}")
        if not args.no_plot:
            png = json_path.with_suffix(".png")
            plot(report, png)
            print(f"wrote {png}")
    elif not cuda:
        print("(CPU run: nothing written; --write-cpu writes e2e_cpu_tiny.json; these times say "
              "nothing about a GPU)")
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    return run_against(args) if args.against is not None else run(args, argv)


if __name__ == "__main__":
    main()
