"""Check this installation on this machine: ``python -m vitok_fast.selftest``.

    python -m vitok_fast.selftest                  # the current device (CUDA if present), real shapes
    python -m vitok_fast.selftest --quick          # tiny shapes: what a CPU runs under Triton's interpreter
    python -m vitok_fast.selftest --device cuda:1 --out selftest.json

It prints the environment (torch, Triton, CUDA, the GPU and its compute capability, which
optional backends import), then runs, on the chosen device, and prints ok / FAIL / skip with
the error and its bound for each:

* every fused op, forward and backward (rms_norm, add_rms_norm, swiglu, rope_3d,
  tubelet_embed, tubelet_unembed), at the shapes of S-B/16, S-L/16 and S-B/4x8 in fp32 and
  bf16, against the op's reference in float64 on the same (exactly upcast) inputs, with the
  rounding-error bounds of vitok_fast/kernel_bounds.py, and timed against the eager
  reference (``ms`` / ``ms_eager``: one forward + backward, median);
* the whole model's kernel path against its reference path: each is compared with the same
  model in float64, and the kernel path's error may be at most twice the reference path's
  plus one unit roundoff of the dtype (one rounding more or less on any tensor);
* ``torch.compile(fullgraph=True)`` of the model with the kernels on (Inductor; on the CPU it
  calls the interpreted kernels as opaque custom ops), forward and backward, by the same rule;
* every attention backend that can run here, forward and backward, on the model's real
  (non-contiguous) q, k, v views of the packed qkv projection, against math attention in
  float64 (CPU) or fp32 (CUDA), by vitok_fast.attention.check_backend; a backend that cannot
  run a shape (FA4 at head dim 72, flash on fp32 CUDA tensors) is a skip, with the reason.

A number next to a check is the error at the element closest to its bound and that bound,
both relative to the largest reference magnitude of the tensor: ``ok`` means no element
exceeds its bound. The exit status is 1 if any check fails, 2 on a usage error.
``--out PATH`` writes ``{"device", "versions", "checks": [{"name", "ok", "max_rel_err",
"bound", "ms", "ms_eager"}]}`` (``ok`` is null for a skipped check).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vitok_fast import cli
from vitok_fast.cli import UserError, run
from vitok_fast.interpret import interpret_without_cuda

# The models whose shapes the fused ops are checked at, and the inputs: (batch, frames,
# height, width). Full: 256p images, batch 8 (2048 tokens); 16x128x128 clips, batch 2
# (2048 tokens). Quick: one 2 x 3 grid of tubelets and 2 heads of the real head size (64 or
# 72) with the real patch sizes, so Triton's interpreter finishes in about a minute.
OP_MODELS = ("S-B/16", "S-L/16", "S-B/4x8")
# the whole-model checks: the real models on a GPU, the tiny T models under the interpreter
MODEL_CASES = {False: (("S-B/16", (2, 1, 256, 256)), ("S-L/16", (1, 1, 256, 256)),
                       ("S-B/4x8", (1, 16, 128, 128))),
               True: (("T-T/8", (2, 1, 32, 32)), ("T-T/2x8", (1, 4, 16, 16)))}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # -> torch.<dtype> (_dtypes)
EPS = 1e-6


def _dtypes() -> dict:
    import torch

    return {name: getattr(torch, dtype) for name, dtype in DTYPES.items()}


@dataclasses.dataclass
class Check:
    name: str
    ok: bool | None  # None: skipped
    max_rel_err: float | None = None
    bound: float | None = None
    ms: float | None = None
    ms_eager: float | None = None
    why: str = ""  # a skip's reason or a failure's error (printed, not in the JSON)

    def line(self) -> str:
        status = "skip" if self.ok is None else ("ok" if self.ok else "FAIL")
        parts = [f"{status:<4}  {self.name:<44}"]
        if self.max_rel_err is not None:
            parts.append(f"err {self.max_rel_err:.2e} <= bound {self.bound:.2e}" if self.ok
                         else f"err {self.max_rel_err:.2e}  bound {self.bound:.2e}")
        if self.ms is not None:
            eager = f" (eager {self.ms_eager:.3f} ms)" if self.ms_eager is not None else ""
            parts.append(f"{self.ms:.3f} ms{eager}")
        if self.why:
            parts.append(self.why)
        return "  ".join(parts)

    def record(self) -> dict:
        return {"name": self.name, "ok": self.ok, "max_rel_err": self.max_rel_err,
                "bound": self.bound, "ms": self.ms, "ms_eager": self.ms_eager}


# -- comparing with a bound -------------------------------------------------------------------


class Compare:
    """Collects (output, reference, elementwise bound) triples and reports the worst one:
    the element with the largest error / bound ratio, in units of its tensor's largest
    reference magnitude."""

    def __init__(self):
        self.ratio, self.err, self.bound, self.what = -1.0, 0.0, 0.0, ""  # ratio: error / bound

    def add(self, what, out, ref, rel=0.0, abs_=0.0):
        """Elementwise ``|out - ref| <= abs_ + rel |ref|`` (kernel_bounds.check_within)."""
        from vitok_fast.kernel_bounds import check_within

        w = check_within(out, ref, rel=rel, abs_=abs_)
        used = w.used if w.ok or w.used > 1 else float("inf")  # non-finite output
        if not used <= self.ratio:
            scale = max(float(ref.detach().abs().max()), 1e-300) if ref.numel() else 1.0
            self.ratio, self.what = used, what
            # the element nearest its bound: its error and its bound, both / max |ref|
            self.bound = w.bound / scale
            self.err = used * self.bound if used != float("inf") else float("inf")

    def add_norm(self, what, err, bound):
        """A normwise check: ``err <= bound`` (both already relative)."""
        r = err / bound if bound > 0 else (0.0 if err == 0 else float("inf"))
        if not r <= self.ratio:  # also takes NaN
            self.ratio, self.err, self.bound, self.what = r, err, bound, what

    @property
    def ok(self) -> bool:
        return 0 <= self.ratio <= 1

    def check(self, name, **kw) -> Check:
        return Check(name, self.ok, self.err, self.bound,
                     why="" if self.ok else f"worst: {self.what}", **kw)


# -- timing -----------------------------------------------------------------------------------


def _median_ms(fn, device, reps) -> float:
    import torch

    if device.type == "cuda":
        fn()  # warm-up: compiles the kernels
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(samples)


# -- the fused ops ----------------------------------------------------------------------------


@dataclasses.dataclass
class OpShape:
    """The shapes one model gives the fused ops."""
    model: str
    batch: int
    video: tuple[int, int, int]  # pixels (T, H, W)
    q: int
    p: int
    grid: tuple[int, int, int]
    sides: tuple[tuple[int, int, int], ...]  # distinct (width, heads, mlp hidden)
    enc_width: int
    dec_width: int

    @property
    def tokens(self) -> int:
        return self.batch * self.grid[0] * self.grid[1] * self.grid[2]


def op_shape(name: str, quick: bool) -> OpShape:
    from vitok_fast.config import ViTokConfig

    cfg = ViTokConfig.from_name(name)
    q, p = cfg.tubelet_size, cfg.patch_size
    if quick:
        batch, video = 1, (q, 2 * p, 3 * p)
    elif cfg.is_video:
        batch, video = 2, (16, 128, 128)
    else:
        batch, video = 8, (1, 256, 256)
    sides = []
    for side in ("encoder", "decoder"):
        width, heads, hidden = (getattr(cfg, f"{side}_{f}") for f in ("width", "heads", "mlp_hidden"))
        if quick:  # 2 heads of the real size; SwiGLU hidden 8d/3 rounded up to 8, as for T
            width, heads = 2 * (width // heads), 2
            hidden = -(-8 * width // 3 // 8) * 8
        if (width, heads, hidden) not in sides:
            sides.append((width, heads, hidden))
    return OpShape(name, batch, video, q, p, cfg.grid(*video), tuple(sides),
                   sides[0][0], sides[-1][0])


def _leaf(t, dtype):
    return t.to(dtype).requires_grad_()


def _grads(outs, leaves, dys):
    import torch

    return torch.autograd.grad(outs, leaves, dys)


def _rms_norm_check(cmp, M, d, dtype, dev, fused: bool):
    """rms_norm, or add_rms_norm when ``fused``: forward and backward against float64."""
    import torch

    from vitok_fast import ops
    from vitok_fast.kernel_bounds import STORE_ULP, U32, ops_u32

    x = _leaf(torch.randn(M, d, device=dev), dtype)
    w = _leaf(1 + 0.5 * torch.randn(d, device=dev), dtype)
    dy = torch.randn(M, d, device=dev).to(dtype)
    store = STORE_ULP[dtype]
    if fused:
        r = _leaf(torch.randn(M, d, device=dev), dtype)
        ds = torch.randn(M, d, device=dev).to(dtype)
        y, s = ops.add_rms_norm(x, r, w, EPS, True)
        dx, dr, dw = _grads((y, s), (x, r, w), (dy, ds))
        cmp.add("x + residual", s, x.double() + r.double(), rel=store + U32)
        cmp.add("dresidual == dx", dr, dx)
        xin = s.detach()  # the norm is of the stream as stored, as in the unfused path
    else:
        y = ops.rms_norm(x, w, EPS, True)
        dx, dw = _grads(y, (x, w), dy)
        xin, ds = x.detach(), None
    x64, w64 = xin.double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = ops.rms_norm(x64, w64, EPS, False)  # float64: the reference maths
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    with torch.no_grad():
        rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
        xh, g = x64 * rstd, w64 * dy.double()
        scale = rstd * (g.abs() + xh.abs() * (xh * g).abs().mean(-1, keepdim=True))
        dw_terms = (dy.double() * xh).abs().sum(0)
    # The derivation is tests/test_kernels_rms_norm.py's: 1/rms = 1/sqrt(sum(x^2)/d + eps)
    # from a d-term sum of squares, /d, +eps, halved by sqrt.approx, then a division
    eps_r = ((d + ops_u32(div=1, add=1)) / 2 + ops_u32(sqrt=1, div=1)) * U32
    # dx = rstd (g - xh mean(xh g)): rstd's error three times, the d-term mean and six ops
    dx_abs = (3 * eps_r + (d + 12) * U32) * scale
    if ds is not None:  # add_rms_norm adds the stream's gradient: one more add
        dx64 = dx64 + ds.double()
        dx_abs = dx_abs + U32 * (scale + ds.double().abs())
    cmp.add("y", y, y64, rel=store + eps_r + ops_u32(mul=2) * U32)
    cmp.add("dx", dx, dx64, rel=store, abs_=dx_abs)
    # dw: an M-term sum of dy * xh, each carrying xh's error
    cmp.add("dw", dw, dw64, rel=store, abs_=(eps_r + (M + 2) * U32) * dw_terms)
    inputs = (x, r, w) if fused else (x, w)
    outs_dy = (dy, ds) if fused else (dy,)

    def timed(use_kernels):
        def step():
            out = (ops.add_rms_norm(x, r, w, EPS, use_kernels) if fused
                   else (ops.rms_norm(x, w, EPS, use_kernels),))
            torch.autograd.grad(out, inputs, outs_dy)
        return step
    return x, timed


def _swiglu_check(cmp, M, h, dtype, dev):
    import torch
    import torch.nn.functional as F

    from vitok_fast import ops
    from vitok_fast.kernel_bounds import STORE_ULP, U32, ops_u32, sigmoid_rel

    packed = _leaf(2 * torch.randn(M, 2 * h, device=dev), dtype)  # the w13 output, gate | up
    dy = torch.randn(M, h, device=dev).to(dtype)
    y = ops.swiglu_packed(packed, True)
    (dpacked,) = _grads(y, (packed,), dy)
    g64, u64 = (t.detach().double().requires_grad_() for t in packed.chunk(2, dim=-1))
    y64 = F.silu(g64) * u64
    dg64, du64 = torch.autograd.grad(y64, (g64, u64), dy.double())
    dg, du = dpacked.chunk(2, dim=-1)
    store = STORE_ULP[dtype]
    with torch.no_grad():  # tests/test_kernels_swiglu.py's derivation
        g0 = g64.detach()
        s = torch.sigmoid(g0)
        s_rel = sigmoid_rel(g0)  # 1 / (1 + exp(-g)): grows with |g| on sm_90 (ex2.approx)
        prod_rel = s_rel + ops_u32(mul=2) * U32
        # dg = dy u s (1 + g (1 - s)) cancels near g = -1.28: bounded by its terms
        dg_abs = (dy.double() * u64.detach() * s).abs() * (
            (1 + g0.abs()) * s_rel + 6 * U32 * (1 + g0.abs() * (1 - s)))
    cmp.add("y", y, y64, rel=store + prod_rel)
    cmp.add("dup", du, du64, rel=store + prod_rel)
    cmp.add("dgate", dg, dg64, rel=store, abs_=dg_abs)

    def timed(use_kernels):
        return lambda: torch.autograd.grad(ops.swiglu_packed(packed, use_kernels), (packed,), dy)
    return packed, timed


def _rope64(x, cos, sin):
    import torch

    P = x.shape[-1] // 2
    x1, x2 = x[..., :P], x[..., P:]
    c, s = cos.double(), sin.double()
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _pair_scale(x):
    import torch

    P = x.shape[-1] // 2
    mag = x[..., :P].abs() + x[..., P:].abs()
    return torch.cat((mag, mag), dim=-1)


def _rope_check(cmp, B, grid, heads, D, dtype, dev):
    import torch

    from vitok_fast import ops
    from vitok_fast.kernel_bounds import STORE_ULP, fp32_bound
    from vitok_fast.kernels import rope_cos_sin

    N = grid[0] * grid[1] * grid[2]
    qkv = _leaf(torch.randn(B, N, 3, heads, D, device=dev), dtype)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4)  # (B, H, N, D) views, as model.Attention makes them
    cos, sin = rope_cos_sin(grid, D, device=dev)
    qo, ko = ops.rope_3d_qk(q, k, cos, sin, True)
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    (dqkv,) = _grads((qo, ko), (qkv,), (dq, dk))
    store = STORE_ULP[dtype]
    for name, out, x in (("q", qo, q), ("k", ko, k)):
        x64 = x.detach().double()
        cmp.add(name, out, _rope64(x64, cos, sin), rel=store, abs_=fp32_bound(2, 1) * _pair_scale(x64))
    dq_in, dk_in, dv_in = dqkv.permute(2, 0, 3, 1, 4)
    for name, out, g in (("dq", dq_in, dq), ("dk", dk_in, dk)):  # the inverse rotation
        g64 = g.double()
        cmp.add(name, out, _rope64(g64, cos, -sin), rel=store, abs_=fp32_bound(2, 1) * _pair_scale(g64))
    cmp.add("dv (untouched)", dv_in, torch.zeros_like(dv_in))

    def timed(use_kernels):
        return lambda: torch.autograd.grad(ops.rope_3d_qk(q, k, cos, sin, use_kernels), (qkv,), (dq, dk))
    return qkv, timed


def _tubelet_check(cmp, s: OpShape, dtype, dev, unembed: bool):
    import torch
    import torch.nn.functional as F

    from vitok_fast import ops
    from vitok_fast.kernel_bounds import STORE_ULP, dot_bound, fp32_bound
    from vitok_fast.kernels import patchify, unpatchify

    q, p, (T, H, W) = s.q, s.p, s.video
    K = q * p * p * 3
    N = s.grid[0] * s.grid[1] * s.grid[2]
    M = s.batch * N
    store = STORE_ULP[dtype]
    if not unembed:
        d = s.enc_width
        x = _leaf(2 * torch.rand(s.batch, 3, T, H, W, device=dev) - 1, dtype)
        if q == 1:
            x = _leaf(x.detach()[:, :, 0], dtype)  # images: (B, 3, H, W)
        w = _leaf(0.05 * torch.randn(d, K, device=dev), dtype)
        b = _leaf(0.1 * torch.randn(d, device=dev), dtype)
        call = lambda use_kernels: ops.tubelet_embed(x, w, b, q, p, use_kernels)
        y = call(True)
        dy = torch.randn(y.shape, device=dev).to(dtype)
        dx, dw, db = _grads(y, (x, w, b), dy)
        x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
        y64 = F.linear(patchify(x64, q, p), w64, b64)
        dx64, dw64, db64 = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
        with torch.no_grad():  # magnitudes of the summed terms
            pa, wa, dya = patchify(x64, q, p).abs(), w64.abs(), dy.double().abs()
            y_terms = F.linear(pa, wa, b64.abs())
            dx_terms = unpatchify(dya @ wa, q, p, T, H, W).reshape(x.shape)
            dw_terms = dya.reshape(M, d).t() @ pa.reshape(M, K)
            db_terms = dya.reshape(M, d).sum(0)
        # K, d and M-term dot products; half-precision operands accumulate on tensor cores
        cmp.add("y", y, y64, rel=store, abs_=dot_bound(K + 1, y_terms, dtype))
        cmp.add("dx", dx, dx64, rel=store, abs_=dot_bound(d, dx_terms, dtype))
        cmp.add("dW", dw, dw64, rel=store, abs_=dot_bound(M, dw_terms, dtype))
        cmp.add("db", db, db64, rel=store, abs_=fp32_bound(M, 1) * db_terms)
        leaves = (x, w, b)
    else:
        d = s.dec_width
        h = _leaf(torch.randn(s.batch, N, d, device=dev), dtype)
        w = _leaf(0.05 * torch.randn(K, d, device=dev), dtype)
        b = _leaf(0.1 * torch.randn(K, device=dev), dtype)
        call = lambda use_kernels: ops.tubelet_unembed(h, w, b, q, p, T, H, W, use_kernels)
        y = call(True)
        dy = torch.randn(y.shape, device=dev).to(dtype)
        dh, dw, db = _grads(y, (h, w, b), dy)
        h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
        y64 = unpatchify(F.linear(h64, w64, b64), q, p, T, H, W)
        dh64, dw64, db64 = torch.autograd.grad(y64, (h64, w64, b64), dy.double())
        with torch.no_grad():
            ha, wa = h64.abs(), w64.abs()
            dpa = patchify(dy.double().abs(), q, p)
            y_terms = unpatchify(F.linear(ha, wa, b64.abs()), q, p, T, H, W)
            dh_terms = dpa @ wa
            dw_terms = dpa.reshape(M, K).t() @ ha.reshape(M, d)
            db_terms = dpa.reshape(M, K).sum(0)
        cmp.add("y", y, y64, rel=store, abs_=dot_bound(d + 1, y_terms, dtype))
        cmp.add("dh", dh, dh64, rel=store, abs_=dot_bound(K, dh_terms, dtype))
        cmp.add("dW", dw, dw64, rel=store, abs_=dot_bound(M, dw_terms, dtype))
        cmp.add("db", db, db64, rel=store, abs_=fp32_bound(M, 1) * db_terms)
        leaves = (h, w, b)

    def timed(use_kernels):
        return lambda: torch.autograd.grad(call(use_kernels), leaves, dy)
    return leaves[0], timed


def op_checks(dev: torch.device, quick: bool, reps: int):
    """Yields one Check per (op, model, side, dtype); a case whose shapes an earlier model
    already had (S-L/16's S encoder) is not repeated."""
    import torch

    from vitok_fast import ops

    seen = set()
    for model in OP_MODELS:
        s = op_shape(model, quick)
        cases = []
        for width, heads, hidden in s.sides:
            tag = f"{model} d={width}" if len(s.sides) > 1 else model
            key = (s.tokens, s.batch, s.grid, width, heads, hidden)
            if key in seen:
                continue
            seen.add(key)
            cases += [("rms_norm", tag, lambda c, dt, w=width: _rms_norm_check(c, s.tokens, w, dt, dev, False)),
                      ("add_rms_norm", tag, lambda c, dt, w=width: _rms_norm_check(c, s.tokens, w, dt, dev, True)),
                      ("swiglu", tag, lambda c, dt, h=hidden: _swiglu_check(c, s.tokens, h, dt, dev)),
                      ("rope_3d", tag, lambda c, dt, w=width, n=heads: _rope_check(c, s.batch, s.grid, n, w // n, dt, dev))]
        for op, width, unembed in (("tubelet_embed", s.enc_width, False),
                                   ("tubelet_unembed", s.dec_width, True)):
            key = (op, s.batch, s.video, s.q, s.p, width)
            if key not in seen:
                seen.add(key)
                cases.append((op, model, lambda c, dt, u=unembed: _tubelet_check(c, s, dt, dev, u)))
        for op, tag, build in cases:
            for dname, dtype in _dtypes().items():
                name = f"{op} {tag} {dname}"
                if not ops.triton_can_run(torch.empty(0, device=dev)):
                    yield Check(name, None, why=_no_triton_reason(dev))
                    continue
                torch.manual_seed(0)
                cmp = Compare()
                try:
                    probe, timed = build(cmp, dtype)
                    ms = _median_ms(timed(True), dev, reps)
                    ms_eager = _median_ms(timed(False), dev, reps)
                except Exception as e:  # noqa: BLE001 - a kernel that cannot run is a failure
                    yield Check(name, False, why=f"{type(e).__name__}: {e}"[:300])
                    continue
                yield cmp.check(name, ms=ms, ms_eager=ms_eager)


def _no_triton_reason(dev) -> str:
    from vitok_fast import ops

    if not ops._has_triton():
        return "Triton is not installed: the kernels cannot run (the reference path runs instead)"
    return (f"Triton kernels run on CUDA, or on the CPU only with TRITON_INTERPRET=1 "
            f"(set to {os.environ.get('TRITON_INTERPRET')!r}); device {dev}")


# -- the whole model --------------------------------------------------------------------------


def _model_run(model, x):
    model.zero_grad(set_to_none=True)
    recon, posterior = model(x, sample=False)
    loss = recon.float().square().mean() + posterior.kl()
    loss.backward()
    out = {"reconstruction": recon.detach(), "posterior mean": posterior.mean.detach()}
    # a compiled module names its parameters "_orig_mod.<name>"
    out.update({f"grad {n.removeprefix('_orig_mod.')}": p.grad.detach().clone()
                for n, p in model.named_parameters()})
    return out


def _norm_rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "bfloat16": 2.0 ** -8}  # by torch dtype name


def _as_accurate(cmp, test: dict, ref: dict, exact: dict, dtype):
    """``test``'s error against ``exact`` (float64) is at most twice ``ref``'s plus one unit
    roundoff of ``dtype``: both paths round every op's output, at different places (the
    kernels once per fused op, eager after every primitive), so they cannot agree bit for
    bit; a path that computes the wrong thing is off by O(1)."""
    for key in exact:
        err_t, err_r = _norm_rel(test[key], exact[key]), _norm_rel(ref[key], exact[key])
        cmp.add_norm(key, err_t, 2 * err_r + UNIT_ROUNDOFF[str(dtype).removeprefix("torch.")])


def _model_triple(name, shape, dtype, dev):
    import torch

    from vitok_fast.model import ViTok

    torch.manual_seed(0)
    fused = ViTok.from_name(name, use_kernels=True, attention_backend="math")
    plain = ViTok.from_name(name, use_kernels=False, attention_backend="math")
    plain.load_state_dict(fused.state_dict())
    exact = ViTok.from_name(name, use_kernels=False, attention_backend="math")
    exact.load_state_dict(fused.state_dict())
    B, T, H, W = shape
    x = torch.rand((B, 3, H, W) if T == 1 else (B, 3, T, H, W), device=dev) * 2 - 1
    return fused.to(dev, dtype), plain.to(dev, dtype), exact.to(dev, torch.float64), x


def model_checks(dev, quick):
    import torch

    from vitok_fast import ops

    for name, shape in MODEL_CASES[quick]:
        for dname, dtype in _dtypes().items():
            check = f"model kernel path vs reference {name} {dname}"
            if not ops.triton_can_run(torch.empty(0, device=dev)):
                yield Check(check, None, why=_no_triton_reason(dev))
                continue
            try:
                fused, plain, exact, x = _model_triple(name, shape, dtype, dev)
                ref64 = _model_run(exact, x.double())
                t0 = time.perf_counter()
                out_r = _model_run(plain, x.to(dtype))
                ms_eager = 1e3 * (time.perf_counter() - t0)
                t0 = time.perf_counter()
                out_k = _model_run(fused, x.to(dtype))
                ms = 1e3 * (time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001
                yield Check(check, False, why=f"{type(e).__name__}: {e}"[:300])
                continue
            cmp = Compare()
            _as_accurate(cmp, out_k, out_r, ref64, dtype)
            yield cmp.check(check, ms=ms, ms_eager=ms_eager)


def compile_check(dev, quick):
    """torch.compile of the kernel-path model (fullgraph: the fused ops are custom ops, so no
    graph break), forward and backward, by Inductor, against float64. On the CPU, Inductor's
    graph calls the interpreted kernels as opaque ops (tests/test_compile.py)."""
    import torch

    from vitok_fast import ops

    name, shape = MODEL_CASES[quick][0]
    check = f"torch.compile model, kernels on {name} fp32"
    if not ops.triton_can_run(torch.empty(0, device=dev)):
        return Check(check, None, why=_no_triton_reason(dev))
    fused, plain, exact, x = _model_triple(name, shape, torch.float32, dev)
    ref64 = _model_run(exact, x.double())
    out_r = _model_run(plain, x)
    compiled = torch.compile(fused, fullgraph=True)
    t0 = time.perf_counter()
    try:
        out_c = _model_run(compiled, x)
    except Exception as e:  # noqa: BLE001
        lines = str(e).strip().splitlines()
        return Check(check, False, why=f"{type(e).__name__}: {lines[0] if lines else ''}"[:200])
    compile_ms = 1e3 * (time.perf_counter() - t0)
    ms = _median_ms(lambda: _model_run(compiled, x), dev, 1 if quick else 3)
    cmp = Compare()
    _as_accurate(cmp, out_c, out_r, ref64, torch.float32)
    result = cmp.check(check, ms=ms)
    result.why = (result.why + f" (first call with compilation {compile_ms / 1e3:.1f} s)").strip()
    return result


# -- attention --------------------------------------------------------------------------------


def attention_backends(dev) -> list[str]:
    from vitok_fast import attention as A

    names = [b for b in A.BACKENDS if b != "auto" and dev.type in A.SUPPORT[b].devices]
    if "fa4" in names and not A.fa4_available():
        names.remove("fa4")
    return names


def attention_checks(dev, quick, reps):
    """Each backend, forward and backward, by vitok_fast.attention.check_backend: the error
    of out, dq, dk and dv relative to their term magnitudes, against bounds derived from the
    operations a correct kernel does (see that function)."""
    import torch

    from vitok_fast.attention import check_backend

    cases, seen = [], set()
    for name in OP_MODELS:
        s = op_shape(name, quick)
        for width, heads, _ in s.sides:
            if (s.tokens, s.batch, width, heads) not in seen:
                seen.add((s.tokens, s.batch, width, heads))
                cases.append((f"{name} {heads}x{width // heads}", s, width, heads))
    for backend in attention_backends(dev):
        for tag, s, width, heads in cases:
            for dname, dtype in _dtypes().items():
                check = f"attention {backend} {tag} {dname}"
                torch.manual_seed(0)
                B, N = s.batch, s.tokens // s.batch
                # the model's layout: q, k, v are permuted views of one packed projection
                qkv = torch.randn(B, N, 3 * width, device=dev).to(dtype)
                q, k, v = qkv.view(B, N, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
                grad_out = torch.randn(B, heads, N, width // heads, device=dev).to(dtype)
                result = check_backend(backend, q, k, v, grad_out)
                if not result["supported"]:  # cannot run here: not a wrong answer
                    yield Check(check, None, why=result["error"][:240])
                    continue
                ms = _time_attention(backend, q, k, v, grad_out, dev, reps)
                ms_eager = _time_attention("math", q, k, v, grad_out, dev, reps)
                yield Check(check, bool(result["ok"]), result["max_rel_err"], result["bound"], ms,
                            ms_eager, why="" if result["ok"] else result["error"])


def _time_attention(backend, q, k, v, grad_out, dev, reps):
    import torch

    from vitok_fast.attention import attention

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    try:
        return _median_ms(lambda: torch.autograd.grad(attention(*leaves, backend), leaves, grad_out),
                          dev, reps)
    except Exception:  # noqa: BLE001 - timing is informative only
        return None


# -- environment ------------------------------------------------------------------------------


def _version(module: str):
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - missing, or broken
        return None
    return getattr(mod, "__version__", "installed")


def environment(dev: torch.device) -> dict:
    import torch

    import vitok_fast
    from vitok_fast import attention

    versions = {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "triton": _version("triton"), "vitok_fast": vitok_fast.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": None, "compute_capability": None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "flash_attn_4": "importable" if attention.fa4_available() else None,
        "liger_kernel": _version("liger_kernel"), "quack": _version("quack"),
        "diffusers": _version("diffusers"),
    }
    if dev.type == "cuda":
        versions["gpu"] = torch.cuda.get_device_name(dev)
        versions["compute_capability"] = "%d.%d" % torch.cuda.get_device_capability(dev)
    return versions


# -- the command ------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = cli.ArgumentParser(prog="python -m vitok_fast.selftest",
                            description=__doc__.split("\n\n")[0])
    cli.add_device(ap, later=True)
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes (what a CPU runs under Triton's interpreter in about a minute)")
    cli.add_out(ap, "also write the results as JSON to this file", type=Path, dest="json",
                deprecated=("--json",))
    return ap.parse_args(argv)


def _device(arg) -> torch.device:
    import torch

    if arg is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(arg)
    except RuntimeError:
        raise UserError(f"--device: expected cpu, cuda or cuda:N, given {arg!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device: expected cpu, cuda or cuda:N, given {arg!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {arg}: CUDA is not available on this machine "
                            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                            f"use --device cpu")
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {arg}: this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s), numbered from 0")
        dev = torch.device("cuda", index)
    return dev


def _check_json_path(path: Path | None):
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"--out: expected a file path, given the directory {path}")
    if not path.parent.is_dir():
        raise UserError(f"--out: the directory {path.parent} does not exist; create it first")


def _needs_interpreter_restart(dev) -> bool:
    """True when kernels must run under Triton's interpreter here but triton was already
    imported without it (``import vitok_fast`` may import triton first): the variable is
    read at import, so only a fresh process can turn it on."""
    import torch

    return (dev.type == "cpu" and "TRITON_INTERPRET" not in os.environ
            and not torch.cuda.is_available() and "triton" in sys.modules)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)

    import torch

    dev = _device(args.device)
    _check_json_path(args.json)
    if _needs_interpreter_restart(dev):
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.call([sys.executable, "-m", "vitok_fast.selftest", *argv], env=env)
    interpret_without_cuda()

    versions = environment(dev)
    print(f"vitok_fast selftest on {dev}{' (quick)' if args.quick else ''}")
    for key, value in versions.items():
        print(f"  {key:<20} {value if value is not None else '-'}")
    print()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    reps = 1 if args.quick else 20
    checks: list[Check] = []
    threads = torch.get_num_threads()
    if os.environ.get("TRITON_INTERPRET") == "1":
        # the interpreter alternates Python with tiny torch ops; torch's thread pool spinning
        # between them takes the core it needs (measured: 3-4x slower with 2 threads on 2 cores)
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        for section in (lambda: op_checks(dev, args.quick, reps),
                        lambda: model_checks(dev, args.quick),
                        lambda: [compile_check(dev, args.quick)],
                        lambda: attention_checks(dev, args.quick, reps)):
            for check in section():
                print(check.line(), flush=True)
                checks.append(check)
    finally:
        torch.set_num_threads(threads)
    failed = [c for c in checks if c.ok is False]
    skipped = [c for c in checks if c.ok is None]
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("\n(kernel times above are Triton's CPU interpreter: they say nothing about a GPU)")
    print(f"\n{len(checks) - len(failed) - len(skipped)} ok, {len(failed)} FAIL, {len(skipped)} "
          f"skipped in {time.perf_counter() - t0:.0f} s")
    if args.json is not None:
        from vitok_fast.fileio import atomic_write

        payload = {"device": str(dev), "versions": versions, "checks": [c.record() for c in checks]}
        atomic_write(args.json, lambda p: Path(p).write_text(json.dumps(payload, indent=2) + "\n"))
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run(main))
