"""Benchmark helpers: the kernel benchmark suite, timing, and the commit a record names.

Shared by ``tests/test_bench_kernels.py`` (pytest-benchmark), the ``bench/`` scripts and the
self-test. Nothing on the model or training path imports this module (training writes its
own ``--bench-out`` record): it lives in the package only so that tests and the installed
self-test can import it from anywhere.

For every fused op the suite describes the inputs at ViTok's real shapes on a GPU (tiny shapes on the
CPU, where our kernels run in Triton's interpreter and only the code path is exercised),
and the competing implementations side by side: ours, eager PyTorch (the ``*_ref``
functions), ``torch.compile`` of the same reference, and the best library where installed
(Liger-Kernel, Quack, ``F.rms_norm``). Each case's ``make()`` allocates its inputs (only then:
listing the cases allocates nothing, so pytest can collect them on a GPU) and returns a
zero-argument callable running one forward, or one forward plus backward; a case also holds
the bytes that op must move at the least
(read every input once, write every output once), so ``bytes / time`` is the achieved
bandwidth and ``/ peak`` the fraction of the device's HBM bandwidth.

Copies: our kernels read the model's layouts in place (q/k as permuted views of qkv, gate
and up as halves of the packed ``w13`` output, pixels through their strides), so they make
no ``.contiguous()`` copies at these shapes; a competitor that needs one pays for it inside
its timed call, and ``Case.note`` says so.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import subprocess
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from vitok_fast import kernels as K

# ViTok's real shapes (docs/design.md): tokens = batch x 256 (256p, p=16) or batch x 1024
# (512p, p=16, and 16x128x128 video with 4x8 tubelets); widths 768 (S, B) and 1152 (L) with
# MLP hidden 2048 / 3072 and 12 / 16 heads (head size 64 / 72).
GPU_BATCH = 32
WIDTHS = ((768, 2048, 12), (1152, 3072, 16))  # (width, mlp hidden, heads)
GPU_TOKENS = (256, 1024)
CPU_TOKENS = (16,)
CPU_WIDTHS = ((72, 176, 2),)
CPU_BATCH = 2


@dataclasses.dataclass
class Case:
    op: str
    impl: str
    mode: str  # "fwd" or "fwd+bwd"
    shape: str
    dtype: str
    bytes: int
    make: Callable[[], Callable[[], object]]  # allocates the inputs, returns the timed call
    nvtx: str = ""
    note: str = ""
    flops: int = 0  # for the GEMM ops


def _dtype_bytes(dtype):
    return torch.empty((), dtype=dtype).element_size()


def _optional_libraries():
    libs = {}
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        libs["liger_rms_norm"] = LigerRMSNormFunction
        libs["liger_swiglu"] = LigerSiLUMulFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        libs["liger_rope"] = LigerRopeFunction
    except Exception:  # noqa: BLE001 - not installed, or an API this version lacks
        pass
    try:
        import quack  # quack-kernels, CUDA-only (CuTe DSL)
        fn = getattr(quack, "rmsnorm", None)
        fn = getattr(fn, "rmsnorm", fn)  # the function, whether exported or in its module
        if callable(fn):
            libs["quack_rms_norm"] = fn
    except Exception:  # noqa: BLE001
        pass
    return libs


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _fwd_bwd(forward, inputs, grads):
    """A callable running forward then backward w.r.t. ``inputs`` with fixed output grads."""
    def run():
        outs = forward()
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, inputs, grads[:len(outs)])
    return run


def _build(fn, mode, make_inputs, call, make_grads):
    """The timed callable of one case: allocates its inputs (and output gradients) now."""
    inputs = make_inputs(mode == "fwd+bwd")
    forward = functools.partial(call, fn, *inputs)
    if mode == "fwd":
        return forward
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return _fwd_bwd(forward, leaves, make_grads())


def _impls(device, libs, ours, ref, extra=()):
    """(name, function) pairs: ours, eager, compiled, and library ones that apply."""
    out = [("ours", ours), ("eager", ref), ("torch.compile", _compiled(ref))]
    out += [e for e in extra if e[1] is not None]
    return out


def cases(device: str | torch.device = "cuda", dtype=torch.bfloat16, tiny: bool | None = None,
          ops: tuple[str, ...] | None = None) -> list[Case]:
    """Every benchmark case for ``device``; ``tiny`` (default: on CPU) picks the CPU shapes.
    Allocates nothing: each case's ``make()`` does, when it is run."""
    device = torch.device(device)
    tiny = device.type != "cuda" if tiny is None else tiny
    libs = _optional_libraries() if device.type == "cuda" else {}
    batch, tokens, widths = (CPU_BATCH, CPU_TOKENS, CPU_WIDTHS) if tiny else (GPU_BATCH, GPU_TOKENS, WIDTHS)
    es = _dtype_bytes(dtype)
    dname = str(dtype).replace("torch.", "")
    made: list[Case] = []

    def add(op, shape, nbytes_fwd, nbytes_bwd, impls, make_inputs, call, out_grads, note=None,
            flops=(0, 0)):
        for impl, fn in impls:
            for mode in ("fwd", "fwd+bwd"):
                made.append(Case(
                    op=op, impl=impl, mode=mode, shape=shape, dtype=dname,
                    bytes=nbytes_fwd + (nbytes_bwd if mode == "fwd+bwd" else 0),
                    make=functools.partial(_build, fn, mode, make_inputs, call, out_grads),
                    nvtx=f"{op}/{impl}/{mode}/{shape}", note=(note or {}).get(impl, ""),
                    flops=flops[0] + (flops[1] if mode == "fwd+bwd" else 0)))

    def rnd(*shape, grad=False, scale=1.0):
        return (scale * torch.randn(*shape, device=device)).to(dtype).requires_grad_(grad)

    for width, hidden, heads in widths:
        for n in tokens:
            M = batch * n
            # RMSNorm: fwd reads x, writes y; bwd reads dy, x, writes dx (+ rstd, w: tiny)
            if ops is None or "rms_norm" in ops:
                extra = [("F.rms_norm", lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6))]
                if "liger_rms_norm" in libs:
                    extra.append(("liger", lambda x, w: libs["liger_rms_norm"].apply(x, w, 1e-6)))
                if "quack_rms_norm" in libs:
                    extra.append(("quack", lambda x, w: libs["quack_rms_norm"](x, w, eps=1e-6)))
                add("rms_norm", f"{M}x{width}", 2 * M * width * es, 3 * M * width * es,
                    _impls(device, libs, K.rms_norm, K.rms_norm_ref, extra),
                    lambda g, M=M, width=width: (rnd(M, width, grad=g), rnd(width, grad=g)),
                    lambda fn, x, w: fn(x, w), lambda M=M, width=width: (rnd(M, width),))
            # add+RMSNorm: fwd reads x, r, writes y, x+r; bwd reads dy, d(x+r), x+r, writes
            # one gradient (x's and r's are the same tensor)
            if ops is None or "add_rms_norm" in ops:
                add("add_rms_norm", f"{M}x{width}", 4 * M * width * es, 4 * M * width * es,
                    _impls(device, libs, K.add_rms_norm, K.add_rms_norm_ref),
                    lambda g, M=M, width=width: (
                        rnd(M, width, grad=g), rnd(M, width, grad=g), rnd(width, grad=g)),
                    lambda fn, x, r, w: fn(x, r, w),
                    lambda M=M, width=width: (rnd(M, width), rnd(M, width)))
            # SwiGLU on the packed w13 output: fwd reads 2h, writes h; bwd reads dy and 2h,
            # writes 2h
            if ops is None or "swiglu" in ops:
                extra = []
                if "liger_swiglu" in libs:
                    # Liger's kernel assumes contiguous gate and up: give it the copies (timed)
                    extra.append(("liger", lambda gu: libs["liger_swiglu"].apply(
                        *(t.contiguous() for t in gu.chunk(2, -1)))))
                add("swiglu", f"{M}x{hidden}", 3 * M * hidden * es, 5 * M * hidden * es,
                    _impls(device, libs, K.swiglu_packed, K.swiglu_packed_ref, extra),
                    lambda g, M=M, hidden=hidden: (rnd(M, 2 * hidden, grad=g, scale=2.0),),
                    lambda fn, gu: fn(gu), lambda M=M, hidden=hidden: (rnd(M, hidden),),
                    note={"liger": "includes copying the gate/up chunks to contiguous (Liger needs it)"})
            # 3D RoPE on q and k as the attention layer has them: views of qkv (B, N, 3, H, D)
            if ops is None or "rope" in ops:
                D = width // heads
                grid = (1, 4, n // 4) if tiny else (1, int(n ** 0.5), int(n ** 0.5))
                qk_numel = 2 * batch * heads * n * D
                extra = []
                if "liger_rope" in libs:
                    tables = {}  # Liger takes (1, N, D) tables: built once per case, untimed

                    def liger_rope(q, k, c, s, tables=tables):
                        if tables.get("for") is not c:
                            full = lambda t: torch.cat((t, t), -1)[None].to(dtype)
                            tables.update({"for": c, "cos": full(c), "sin": full(s)})
                        return libs["liger_rope"].apply(q, k, tables["cos"], tables["sin"])
                    extra.append(("liger", liger_rope))

                def qk_inputs(g, grid=grid, D=D, n=n, heads=heads):
                    qkv = rnd(batch, n, 3, heads, D, grad=g)
                    return (qkv, *K.rope_cos_sin(grid, D, device=device))

                def call_rope(fn, qkv, c, s):
                    q, k, _ = qkv.permute(2, 0, 3, 1, 4)
                    return fn(q, k, c, s)

                add("rope", f"{batch}x{heads}x{n}x{D}", 2 * qk_numel * es, 2 * qk_numel * es,
                    _impls(device, libs, K.rope_3d_qk, K.rope_3d_qk_ref, extra),
                    qk_inputs, call_rope,
                    lambda D=D, n=n, heads=heads: (rnd(batch, heads, n, D), rnd(batch, heads, n, D)),
                    note={"liger": "Liger's rope transposes q, k to contiguous inside its call"})
        # tubelet embed / unembed: the first shape is 256p images (p=16) / 512p, then video
        if ops is None or "tubelet" in ops:
            if tiny:
                pix = [((batch, 3, 32, 32), 1, 8), ((1, 3, 4, 16, 16), 2, 8)]
            else:
                pix = [((batch, 3, 256, 256), 1, 16), ((batch // 4, 3, 512, 512), 1, 16),
                       ((batch // 4, 3, 16, 128, 128), 4, 8)]
            for shape, q, p in pix:
                T, H, W = (1, *shape[2:]) if len(shape) == 4 else shape[2:]
                Kdim = q * p * p * 3
                M = shape[0] * (T // q) * (H // p) * (W // p)
                npix = math.prod(shape)
                label = "x".join(map(str, shape)) + f"/{q}x{p}"
                gemm = 2 * M * Kdim * width
                # embed: fwd reads pixels and W, writes (M, d); bwd (dW, db; pixels need no
                # grad) reads dy and pixels, writes dW
                add("tubelet_embed", f"{label}->{width}",
                    (npix + Kdim * width + M * width) * es, (M * width + npix + Kdim * width) * es,
                    _impls(device, libs, K.tubelet_embed, K.tubelet_embed_ref),
                    lambda g, shape=shape, Kdim=Kdim, width=width, q=q, p=p: (
                        rnd(*shape).clamp(-1, 1), rnd(width, Kdim, grad=g, scale=0.02),
                        rnd(width, grad=g), q, p),
                    lambda fn, x, w, b, q, p: fn(x, w, b, q, p),
                    lambda shape=shape, M=M, width=width: (rnd(shape[0], M // shape[0], width),),
                    flops=(gemm, gemm))
                # unembed: fwd reads h and W, writes pixels; bwd (dh, dW, db) reads dy, h, W,
                # writes dh and dW
                add("tubelet_unembed", f"{width}->{label}",
                    (M * width + Kdim * width + npix) * es,
                    (npix + M * width + Kdim * width + M * width + Kdim * width) * es,
                    _impls(device, libs, K.tubelet_unembed, K.tubelet_unembed_ref),
                    lambda g, shape=shape, Kdim=Kdim, M=M, width=width, q=q, p=p, T=T, H=H, W=W: (
                        rnd(shape[0], M // shape[0], width, grad=g), rnd(Kdim, width, grad=g, scale=0.02),
                        rnd(Kdim, grad=g), q, p, T, H, W),
                    lambda fn, h, w, b, *geom: fn(h, w, b, *geom),
                    lambda shape=shape, T=T, H=H, W=W: (rnd(shape[0], 3, T, H, W),),
                    flops=(gemm, 2 * gemm))
            if tiny:
                break  # one width is enough to exercise the code path on CPU
    return made


def measure_peak_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Achieved bytes/s of a device-to-device copy (read + write), the run's 100% mark."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), torch.device(device))
    return 2 * src.numel() * 4 / seconds


def time_call(fn, device, reps: int = 5) -> float:
    """Median seconds per call: CUDA events via triton.testing.do_bench on a GPU (L2
    flushed between calls), a perf_counter loop on the CPU."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    import statistics
    import time
    fn()  # warm-up (and compile, for torch.compile)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def git_commit() -> str | None:
    """The checkout's commit for benchmark records, ``-dirty`` when tracked files changed."""
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True,
                                    cwd=Path(__file__).parent, timeout=5).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if dirty else "")) if commit else None
