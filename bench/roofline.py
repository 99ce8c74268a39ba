"""A roofline MODEL of ViTok and SD-VAE on an H100: predicted, never measured.

    python bench/roofline.py --model S-B/16                 # 256p images, batch 64, table
    python bench/roofline.py --model S-L/16 --resolution 512 --json roofline.json
    python bench/roofline.py --model S-B/4x8                # 16x128x128 clips
    python bench/roofline.py --peak-tflops 1979 --hbm-tbps 4.8   # other anchors (e.g. a B200)

One encode+decode and one stage-1 training step (forward, MSE + KL loss, backward) are
traced op by op on the meta device (no memory, no arithmetic) with a TorchDispatchMode, for
three paths:

* ``eager``: the model's reference path (``use_kernels=False``), every aten op on its own;
* ``fused``: the kernel path (``use_kernels=True``), where each of our fused ops is the one
  ``torch.ops.vitok.*`` custom op it is (kernels/*.py); on the meta device it runs its fake
  implementation, so the trace sees it, forward and each backward op, as one op with its real
  inputs and outputs: whatever ``vitok::`` ops the model calls, no list kept here;
* ``sd_vae``: diffusers' AutoencoderKL with the Stable Diffusion VAE configuration
  (vitok_fast.flops.SD_VAE_CONFIG, random weights), eager, frame by frame for clips.

Attention (``F.scaled_dot_product_attention``) is one fused op in every path, as PyTorch's
flash / cuDNN kernels run it. Per op: FLOPs (matmul-like ops, counted by the formulas of
torch.utils.flop_counter, the ``vitok::`` ops' own registered ones included, so the totals
are bench/flops.py's), bytes read + written (the minimum: every input read once, every
output written once; views move nothing), and the predicted time ``max(FLOPs / peak, bytes / bandwidth)``. Everything is bf16, batch
``--batch``, and reported per input (one image, or one clip).

The anchors (defaults, change them with the flags):

* ``--peak-tflops 989.4``: H100 SXM5 dense BF16 tensor-core peak, 989.4 TFLOP/s (NVIDIA
  H100 Tensor Core GPU datasheet; 1979 is the figure with 2:4 sparsity);
* ``--hbm-tbps 3.35``: H100 SXM5 HBM3 bandwidth, 3.35 TB/s (same datasheet).

A real kernel reaches neither peak, launches cost time, and an op may fit in L2: the
predictions are a lower bound on time under these assumptions, for comparing paths and
finding what should be memory-bound, not a result. bench/gpu.sh prints them beside the
measured numbers when a GPU run exists.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import vitok_fast.kernels  # noqa: F401  registers the vitok:: ops and their FLOP formulas
from vitok_fast.cli import UserError, run

ROOT = Path(__file__).resolve().parents[1]

ANCHORS = {
    "peak_tflops": (989.4, "H100 SXM5 dense BF16 tensor-core peak (NVIDIA H100 Tensor Core GPU "
                           "datasheet; 1979 with 2:4 sparsity)"),
    "hbm_tbps": (3.35, "H100 SXM5 HBM3 bandwidth (NVIDIA H100 Tensor Core GPU datasheet)"),
}
# Dense BF16 tensor-core peak (TFLOP/s) and HBM bandwidth (TB/s), from NVIDIA's datasheets
# (H100 SXM5: 989.4, 3.35; H200 SXM: the same compute, HBM3e 4.8).
GPUS = {"h100": (989.4, 3.35), "h200": (989.4, 4.8)}
_FLOPS = FlopCounterMode(display=False).flop_registry  # a copy, made after vitok_fast.kernels registered
# ops that move no data (allocation, views that are not flagged as views)
_NO_DATA = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
            torch.ops.aten.detach.default, torch.ops.aten.lift_fresh.default,
            torch.ops.aten._unsafe_view.default, torch.ops.aten.alias.default}


def _tensors(tree):
    out = []
    for x in tree if isinstance(tree, (list, tuple)) else [tree]:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            out += _tensors(x)
    return out


def _nbytes(t: torch.Tensor) -> int:
    """What reading (or writing) ``t`` once costs at the least: its elements, or its storage
    when it is a broadcast (expanded) view of something smaller."""
    dense = t.numel() * t.element_size()
    try:
        return min(dense, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return dense


def _shape(ts) -> str:
    return " ".join("x".join(map(str, t.shape)) or "()" for t in ts)


class Trace(TorchDispatchMode):
    """Records every aten op, and every ``vitok::`` custom op (a fused kernel, whose fake
    implementation runs on meta unseen), as ``(name, flops, bytes)``; inside :meth:`region` the ops add
    their FLOPs to one op that stands for a fused kernel, whose bytes are the region's own
    inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.ops: list[dict] = []
        self._region: dict | None = None
        self._mute = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._mute or func in _NO_DATA or getattr(func, "is_view", False):
            return out
        packet = func.overloadpacket
        flops = int(_FLOPS[packet](*args, **kwargs, out_val=out)) if packet in _FLOPS else 0
        if self._region is not None:
            self._region["flops"] += flops
            return out
        ins, outs = _tensors(list(args) + list(kwargs.values())), _tensors(out)
        self.ops.append({"op": str(packet), "shape": _shape(ins),
                         "flops": flops, "bytes": sum(map(_nbytes, ins)) + sum(map(_nbytes, outs))})
        return out

    @contextlib.contextmanager
    def muted(self):
        """Ops here are not counted at all (a fused op's recomputation on the meta device)."""
        self._mute += 1
        try:
            yield
        finally:
            self._mute -= 1

    @contextlib.contextmanager
    def region(self, name, inputs):
        """Everything inside is one op: FLOPs summed, bytes = ``inputs`` + what it returns
        (the caller adds the outputs with :meth:`close`)."""
        if self._region is not None:  # nested (attention inside a fused op): the outer wins
            yield None
            return
        self._region = {"op": name, "shape": _shape(inputs), "flops": 0,
                        "bytes": sum(map(_nbytes, inputs))}
        try:
            yield self._region
        finally:
            region, self._region = self._region, None
            self.ops.append(region)

    @staticmethod
    def close(region, outputs):
        if region is not None:
            region["bytes"] += sum(map(_nbytes, _tensors(outputs)))


def _fused_function(trace: Trace, name: str, ref):
    """``ref`` as one op named ``name``, forward and backward (an autograd Function on meta
    tensors; the backward's recomputation of the forward is not counted)."""

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            ctx.args = args
            ctx.save_for_backward(*tensors)
            with trace.region(name, tensors) as region, torch.no_grad():
                out = ref(*args)
                trace.close(region, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            args = list(ctx.args)
            saved = iter(ctx.saved_tensors)
            leaves = []
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor):
                    args[i] = next(saved).detach().requires_grad_(a.requires_grad)
                    leaves.append(args[i])
            with trace.muted(), torch.enable_grad():  # the recomputation is not the kernel's
                out = ref(*args)
            outs = [o for o in _tensors(out)]
            wanted = [t for t in leaves if t.requires_grad]
            used = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            with trace.region(f"{name}.backward", [g for _, g in used] + leaves) as region:
                got = torch.autograd.grad([o for o, _ in used], wanted, [g for _, g in used],
                                          allow_unused=True)
                trace.close(region, [g for g in got if g is not None])
            got = iter(got)
            result = []
            for a in args:
                if isinstance(a, torch.Tensor):
                    result.append(next(got) if a.requires_grad else None)
                else:
                    result.append(None)
            return tuple(result)

    return lambda *args: Fused.apply(*args)


@contextlib.contextmanager
def _patched(trace: Trace, any_attention: bool = False):
    """Attention as one op in every path. ``any_attention``: masked and causal calls too (the
    peers' attention, flash-style)."""
    sdpa = F.scaled_dot_product_attention
    fused_sdpa = _fused_function(trace, "attention", lambda q, k, v, scale: sdpa(q, k, v, scale=scale))
    masked_sdpa = _fused_function(trace, "attention", lambda q, k, v, mask, causal, scale: sdpa(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale))

    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if any_attention and not dropout_p and not kw:
            return masked_sdpa(q, k, v, attn_mask, is_causal, scale)
        if attn_mask is not None or dropout_p or is_causal or kw:  # not ViTok's or SD-VAE's call
            raise NotImplementedError("roofline models unmasked attention without dropout")
        return fused_sdpa(q, k, v, scale)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def _input(config, batch, resolution, frames):
    shape = (batch, 3, resolution, resolution) if frames == 1 else (batch, 3, frames, resolution, resolution)
    return torch.empty(shape, device="meta", dtype=torch.bfloat16)


def trace_vitok(config, batch, resolution, frames, fused: bool, train: bool) -> list[dict]:
    from vitok_fast.model import ViTok

    with torch.device("meta"):  # fused: the kernel path, its vitok:: ops' fake impls on meta
        model = ViTok(dataclasses.replace(config, use_kernels=fused)).to(torch.bfloat16)
    x = _input(config, batch, resolution, frames)
    trace = Trace()
    with _patched(trace), trace:
        if train:
            x.requires_grad_(False)
            recon, posterior = model(x, sample=True)
            loss = F.mse_loss(recon.float(), x.float()) + 1e-3 * posterior.kl()
            loss.backward()
        else:
            with torch.no_grad():
                model.decode(model.encode(x).mode())
    return trace.ops


def trace_sd_vae(batch, resolution, frames) -> list[dict]:
    from diffusers import AutoencoderKL

    from vitok_fast.flops import SD_VAE_CONFIG

    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE_CONFIG).to(torch.bfloat16)
    x = torch.empty(batch * frames, 3, resolution, resolution, device="meta", dtype=torch.bfloat16)
    trace = Trace()
    with _patched(trace), trace, torch.no_grad():
        vae.decode(vae.encode(x).latent_dist.mode()).sample
    return trace.ops


def trace_peer(peers, peer, batch, resolution, frames) -> list[dict]:
    """One encode + decode of a bench/peers.py tokenizer, eager, bf16, its attention fused."""
    model = peers.build(peer, dtype=torch.bfloat16)
    x = peers.make_input(peer, resolution, frames, batch, dtype=torch.bfloat16)
    trace = Trace()
    with _patched(trace, any_attention=True), trace, torch.no_grad(), torch.device("meta"):
        peers.decode(peer, model, peers.encode(peer, model, x))
    return trace.ops


def against(selected, resolution, batch, peak_tflops, hbm_tbps, progress=True) -> dict:
    """Each peer's modelled encode+decode time per input frame beside ViTok's fused path
    (S-B/16 for images, S-B/4x8 on 16 frames for videos): a MODEL, not a measurement."""
    import peers  # bench/peers.py: this script's folder is on sys.path when it runs
    from vitok_fast.config import ViTokConfig

    peak, bw = peak_tflops * 1e12, hbm_tbps * 1e12
    rows, skipped, vitok = [], [], {}
    try:
        from tqdm import tqdm
        it = tqdm(selected, desc="tracing", disable=not progress, file=sys.stderr)
    except ImportError:
        it = selected
    for peer in it:
        why = peers.unavailable(peer) or peers.check_resolution(peer, resolution)
        if why:
            skipped.append(why)
            continue
        name = peers.VITOK_REFERENCE[peer.kind]
        vframes = peers.VITOK_FRAMES if peer.kind == "video" else 1
        if name not in vitok:
            vitok[name] = {}
            for path, fused in (("eager", False), ("fused", True)):
                ops = trace_vitok(ViTokConfig.from_name(name), batch, resolution, vframes, fused, False)
                vitok[name][path] = {k: v / vframes for k, v in summarize(ops, batch, peak, bw).items()
                                     if k != "ops"}
        frames = peers.frames_for(peer)
        try:
            ops = trace_peer(peers, peer, batch, resolution, frames)
        except RuntimeError as e:  # e.g. CogVideoX splits a conv's input over time above 2 GiB,
            # and at large batches the pieces get shorter than its kernel
            skipped.append(f"{peer.name}: fails at batch {batch} ({str(e).splitlines()[0][:120]}); "
                           f"try a smaller --batch")
            continue
        s = summarize(ops, batch, peak, bw)
        per = {k: s[k] / frames for k in ("flops", "bytes", "predicted_s")}
        v = vitok[name]
        rows.append({"name": peer.name, "kind": peer.kind, "resolution": resolution, "frames": frames,
                     "vitok": name, "vitok_frames": vframes, "per": "input frame",
                     "flops": per["flops"], "bytes": per["bytes"], "predicted_s": per["predicted_s"],
                     "vitok_eager_predicted_s": v["eager"]["predicted_s"],
                     "vitok_predicted_s": v["fused"]["predicted_s"],
                     # Like for like: both eager (every op its own kernel, attention fused).
                     "predicted_speed_ratio_eager": per["predicted_s"] / v["eager"]["predicted_s"],
                     "predicted_speed_ratio_vitok_over_peer": per["predicted_s"] / v["fused"]["predicted_s"],
                     "mac_ratio_peer_over_vitok": per["flops"] / v["eager"]["flops"],
                     "top_ops": s["ops"][:3]})
    return {"note": "a roofline MODEL (max(FLOPs/peak, bytes/bandwidth) per op), not a measurement",
            "batch": batch, "dtype": "bfloat16", "resolution": resolution,
            "anchors": {"peak_tflops": peak_tflops, "hbm_tbps": hbm_tbps},
            "rows": rows, "skipped": skipped}


def format_against(r: dict) -> str:
    lines = [f"Roofline MODEL (predicted, not measured), {r['resolution']}x{r['resolution']}, bf16, "
             f"batch {r['batch']}, anchors {r['anchors']['peak_tflops']} TFLOP/s and "
             f"{r['anchors']['hbm_tbps']} TB/s; per input frame:", "",
             "| peer | frames | peer eager us/frame | ViTok | eager / fused us/frame | "
             "predicted ViTok speed / peer, eager / fused | MACs peer / ViTok |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['name']} | {row['frames']} | {1e6 * row['predicted_s']:.1f} | {row['vitok']} | "
                     f"{1e6 * row['vitok_eager_predicted_s']:.1f} / {1e6 * row['vitok_predicted_s']:.1f} | "
                     f"{row['predicted_speed_ratio_eager']:.2f}x / {row['predicted_speed_ratio_vitok_over_peer']:.2f}x"
                     f" | {row['mac_ratio_peer_over_vitok']:.2f}x |")
    lines += ["", "Peers are traced eager (each aten op its own kernel; attention one fused op); a "
              "compiled peer would fuse its norms and activations, so the fused ViTok column "
              "flatters ViTok: the eager column compares like with like."]
    lines += [f"skipped {why}" for why in r["skipped"]]
    return "\n".join(lines)


def summarize(ops: list[dict], batch: int, peak_flops: float, bandwidth: float) -> dict:
    """Per input: totals and the ops grouped by (op, input shapes), slowest first."""
    groups: "OrderedDict[tuple, dict]" = OrderedDict()
    for op in ops:
        key = (op["op"], op["shape"])
        g = groups.setdefault(key, {"op": op["op"], "shape": op["shape"], "calls": 0,
                                    "flops": 0, "bytes": 0, "predicted_s": 0.0})
        g["calls"] += 1
        g["flops"] += op["flops"]
        g["bytes"] += op["bytes"]
        g["predicted_s"] += max(op["flops"] / peak_flops, op["bytes"] / bandwidth)
    rows = []
    for g in groups.values():
        compute, memory = g["flops"] / peak_flops, g["bytes"] / bandwidth
        rows.append({**g, "flops": g["flops"] / batch, "bytes": g["bytes"] / batch,
                     "predicted_s": g["predicted_s"] / batch,
                     "bound": "compute" if compute >= memory else "memory"})
    rows.sort(key=lambda r: -r["predicted_s"])
    return {"flops": sum(r["flops"] for r in rows), "bytes": sum(r["bytes"] for r in rows),
            "predicted_s": sum(r["predicted_s"] for r in rows), "ops": rows}


def roofline(config, resolution, frames, batch, peak_tflops, hbm_tbps, progress=True) -> dict:
    peak, bw = peak_tflops * 1e12, hbm_tbps * 1e12
    steps = [("eager", "encode_decode", lambda: trace_vitok(config, batch, resolution, frames, False, False)),
             ("eager", "train_step", lambda: trace_vitok(config, batch, resolution, frames, False, True)),
             ("fused", "encode_decode", lambda: trace_vitok(config, batch, resolution, frames, True, False)),
             ("fused", "train_step", lambda: trace_vitok(config, batch, resolution, frames, True, True)),
             ("sd_vae", "encode_decode", lambda: trace_sd_vae(batch, resolution, frames))]
    paths: dict = {"eager": {}, "fused": {}, "sd_vae": {}}
    try:
        from tqdm import tqdm
        it = tqdm(steps, desc="tracing", disable=not progress, file=sys.stderr)
    except ImportError:
        it = steps
    for path, what, fn in it:
        paths[path][what] = summarize(fn(), batch, peak, bw)
    ed = {p: paths[p]["encode_decode"] for p in paths}
    totals = {
        "hbm_bytes_saved_by_fusion": {
            w: paths["eager"][w]["bytes"] - paths["fused"][w]["bytes"] for w in ("encode_decode", "train_step")},
        "predicted_inputs_per_s": {
            "eager": {w: 1 / paths["eager"][w]["predicted_s"] for w in ("encode_decode", "train_step")},
            "fused": {w: 1 / paths["fused"][w]["predicted_s"] for w in ("encode_decode", "train_step")},
            "sd_vae": {"encode_decode": 1 / ed["sd_vae"]["predicted_s"]}},
        "predicted_speed_ratio_vitok_fused_over_sd_vae": ed["sd_vae"]["predicted_s"] / ed["fused"]["predicted_s"],
        "mac_ratio_sd_vae_over_vitok": ed["sd_vae"]["flops"] / ed["eager"]["flops"],
    }
    return {
        "model": config.name, "resolution": resolution, "frames": frames, "batch": batch,
        "dtype": "bfloat16", "per": "clip" if frames > 1 else "image",
        "note": "a roofline MODEL (max(FLOPs/peak, bytes/bandwidth) per op), not a measurement",
        "anchors": {"peak_tflops": peak_tflops, "hbm_tbps": hbm_tbps,
                    "peak_source": ANCHORS["peak_tflops"][1] if peak_tflops == ANCHORS["peak_tflops"][0] else "--peak-tflops",
                    "hbm_source": ANCHORS["hbm_tbps"][1] if hbm_tbps == ANCHORS["hbm_tbps"][0] else "--hbm-tbps"},
        "paths": paths, "totals": totals,
    }


def format_report(r: dict, top: int = 8) -> str:
    per = r["per"]
    lines = [f"Roofline MODEL (predicted, not measured): {r['model']}, "
             f"{r['frames']}x{r['resolution']}x{r['resolution']}" if r["frames"] > 1 else
             f"Roofline MODEL (predicted, not measured): {r['model']}, {r['resolution']}p",
             f"anchors: {r['anchors']['peak_tflops']} TFLOP/s ({r['anchors']['peak_source']}); "
             f"{r['anchors']['hbm_tbps']} TB/s ({r['anchors']['hbm_source']}); bf16, batch {r['batch']}, per {per}",
             "",
             f"| path | what | GFLOPs | HBM MB | predicted ms | predicted {per}s/s |",
             "|---|---|---:|---:|---:|---:|"]
    for path, whats in r["paths"].items():
        for what, s in whats.items():
            lines.append(f"| {path} | {what} | {s['flops'] / 1e9:.1f} | {s['bytes'] / 1e6:.1f} | "
                         f"{1e3 * s['predicted_s']:.3f} | {1 / s['predicted_s']:.0f} |")
    t = r["totals"]
    lines += ["", "HBM traffic saved by fusion: " + ", ".join(
        f"{w} {v / 1e6:.1f} MB/{per} ({100 * v / r['paths']['eager'][w]['bytes']:.0f}%)"
        for w, v in t["hbm_bytes_saved_by_fusion"].items()),
        f"predicted ViTok (fused) : SD-VAE speed = {t['predicted_speed_ratio_vitok_fused_over_sd_vae']:.2f}x"
        f"   beside   SD-VAE : ViTok MACs = {t['mac_ratio_sd_vae_over_vitok']:.2f}x", ""]
    for path in ("eager", "fused"):
        ops = r["paths"][path]["train_step"]["ops"][:top]
        lines += [f"{path} train_step, top {top} ops by predicted time:",
                  "| op | calls | shapes | GFLOPs | MB | predicted us | bound |", "|---|---:|---|---:|---:|---:|---|"]
        lines += [f"| {o['op']} | {o['calls']} | {o['shape'][:40]} | {o['flops'] / 1e9:.2f} | "
                  f"{o['bytes'] / 1e6:.2f} | {1e6 * o['predicted_s']:.1f} | {o['bound']} |" for o in ops]
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="S-B/16", help="paper-style name (default S-B/16)")
    ap.add_argument("--resolution", type=int, default=None,
                    help="pixels per side (default 256 for images, 128 for video models)")
    ap.add_argument("--frames", type=int, default=None, help="frames per clip for video models (default 16)")
    ap.add_argument("--batch", type=int, default=64, help="inputs per call; results are per input (default 64)")
    ap.add_argument("--peak-tflops", type=float, default=ANCHORS["peak_tflops"][0],
                    help=f"dense bf16 matmul peak, TFLOP/s (default {ANCHORS['peak_tflops'][0]}: "
                         f"{ANCHORS['peak_tflops'][1]})")
    ap.add_argument("--hbm-tbps", type=float, default=ANCHORS["hbm_tbps"][0],
                    help=f"HBM bandwidth, TB/s (default {ANCHORS['hbm_tbps'][0]}: {ANCHORS['hbm_tbps'][1]})")
    ap.add_argument("--top", type=int, default=8, help="ops listed per path (default 8)")
    ap.add_argument("--json", metavar="PATH", default=None, help="also write the model as JSON ('-': stdout)")
    ap.add_argument("--against", default=None, metavar="NAME[,NAME...]",
                    help="instead: each of today's tokenizers (bench/peers.py ids, or images, videos, "
                    "all) beside ViTok, per input frame, at --resolution (default 256)")
    ap.add_argument("--gpu", choices=sorted(GPUS), default=None,
                    help="anchors of a named GPU instead of --peak-tflops / --hbm-tbps")
    args = ap.parse_args(argv)
    if args.gpu:
        args.peak_tflops, args.hbm_tbps = GPUS[args.gpu]
    return args


def main(argv=None) -> int:
    from vitok_fast.config import ViTokConfig

    args = parse_args(argv)
    if args.against is not None:
        import peers  # bench/peers.py: this script's folder is on sys.path when it runs
        selected = peers.select(args.against)  # ValueError -> one-line error listing the ids
        resolution = args.resolution or 256
        if resolution <= 0 or resolution % 64 or args.batch <= 0:
            raise UserError(f"--resolution must be a positive multiple of 64 and --batch positive "
                            f"with --against, given {resolution} and {args.batch}")
        result = against(selected, resolution, args.batch, args.peak_tflops, args.hbm_tbps,
                         progress=args.json != "-")
        if args.json != "-":
            print(format_against(result))
        if args.json:
            text = json.dumps(result, indent=1)
            print(text) if args.json == "-" else Path(args.json).write_text(text + "\n")
        return 0
    config = ViTokConfig.from_name(args.model)  # ValueError -> one-line error
    frames = args.frames if args.frames is not None else (16 if config.is_video else 1)
    resolution = args.resolution if args.resolution is not None else (128 if config.is_video else 256)
    for flag, value in (("--batch", args.batch), ("--frames", frames), ("--resolution", resolution)):
        if value <= 0:
            raise UserError(f"{flag} must be a positive integer, given {value}")
    for flag, value in (("--peak-tflops", args.peak_tflops), ("--hbm-tbps", args.hbm_tbps)):
        if not value > 0:
            raise UserError(f"{flag} must be a positive number, given {value}")
    if resolution % config.patch_size or (frames > 1 and frames % config.tubelet_size):
        raise UserError(f"--resolution must be a multiple of {config.patch_size} and --frames of "
                        f"{config.tubelet_size} for {config.name}, given {resolution} and {frames}")
    if frames > 1 and not config.is_video:
        raise UserError(f"{config.name} is an image model: --frames must be 1, given {frames}")
    if args.json not in (None, "-") and not Path(args.json).resolve().parent.is_dir():
        raise UserError(f"--json: the directory of {args.json} does not exist")
    start = time.perf_counter()
    result = roofline(config, resolution, frames, args.batch, args.peak_tflops, args.hbm_tbps,
                      progress=args.json != "-")
    if args.json != "-":
        print(format_report(result, args.top))
        print(f"traced on the meta device in {time.perf_counter() - start:.1f} s")
    if args.json:
        text = json.dumps(result, indent=1)
        if args.json == "-":
            print(text)
        else:
            from vitok_fast.fileio import atomic_write
            atomic_write(Path(args.json), lambda p: Path(p).write_text(text + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
