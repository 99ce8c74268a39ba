"""Attention backends: the one call the model's ``Attention`` makes, with the kernel chosen
per shape.

ViTok's attention is plain bidirectional softmax attention (no mask, no dropout, scale
``1/sqrt(D)``) on ``q, k, v`` of shape ``(B, H, N, D)``. Several kernels compute it, and
which one is fastest depends on the GPU, the head size (64 for S/B, 72 for L), the token
count and the dtype, so it is measured rather than guessed:

- ``"sdpa"``: ``F.scaled_dot_product_attention`` with PyTorch's own choice of kernel.
- ``"flash"``, ``"cudnn"``, ``"efficient"``, ``"math"``: the same call restricted to one
  SDPA backend with ``torch.nn.attention.sdpa_kernel``. ``"math"`` is the unfused
  reference; ``"flash"`` also runs on the CPU (PyTorch has a CPU flash kernel).
- ``"fa4"``: FlashAttention-4 (``flash_attn.cute.flash_attn_func`` from the
  ``flash-attn-4`` wheel, CuTe DSL kernels for Hopper/Blackwell), when it imports.
- ``"auto"`` (the default): on CUDA, the first call at a new (shape, dtype, device,
  forward-only or forward+backward) times every CUDA candidate once on the real inputs,
  drops any that fail or disagree with an fp32 reference, and caches the fastest; later
  calls are a dict lookup. :func:`autotune_choices` reports what was chosen and the
  times behind it. On the CPU (and the meta device) ``"auto"`` is plain SDPA, untimed.

torch.compile: the timing never runs inside a compiled graph. While tracing, ``"auto"``
reads the cache (filled by an eager call at that shape; otherwise plain ``"sdpa"``) and
uses the fastest *SDPA* backend measured there, since ``sdpa_kernel`` traces into the graph
while FA4's CuTe kernels would force a graph break. A fixed ``"fa4"`` still works under
compile, as a graph break around the call. A compiled block is traced on its first call,
before any eager call could tune, so :func:`tune` runs one eager forward first.

A CUDA-only backend (``"cudnn"``, ``"efficient"``, ``"fa4"``) asked for on a CPU tensor is
an error, not a silent fallback: a pinned backend is a request to run (or measure) that
kernel, and quietly running another would make a benchmark lie. Load a checkpoint saved
with a pinned backend on the CPU with ``ViTok.from_pretrained(dir, attention_backend="auto")``.
"""

from __future__ import annotations

import copy
import functools
import logging
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "flash", "cudnn", "efficient", "math", "fa4")
CUDA_ONLY = ("cudnn", "efficient", "fa4")
# What "auto" times on CUDA. "math" is left out: the unfused reference materialises the
# (N, N) scores, tens of GB at 4096 tokens and a full batch. Listed in order of preference
# on an exact tie.
AUTO_CANDIDATES = ("cudnn", "flash", "efficient", "fa4")
_SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def check_backend(name) -> str:
    """``name`` if it is a backend this module knows, else a ValueError listing them."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {list(BACKENDS)}")
    return name


# -- the kernels ------------------------------------------------------------------------------


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def _restricted(backend: SDPBackend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


@functools.lru_cache(maxsize=None)
def _fa4_import():
    """(flash_attn_func, None) if flash-attn-4 imports, else (None, why not)."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:  # noqa: BLE001 - missing, or its CUDA/CuTe stack failed to load
        return None, f"{type(e).__name__}: {e}"
    return flash_attn_func, None


def fa4_available() -> bool:
    return _fa4_import()[0] is not None


@torch.compiler.disable  # CuTe DSL kernels: a graph break under torch.compile, not a trace
def _fa4(q, k, v):
    fn, why = _fa4_import()
    if fn is None:
        raise ImportError(
            f"attention backend 'fa4' needs the flash-attn-4 package (pip install --pre "
            f"flash-attn-4), which did not import: {why}")
    # FA4 takes (B, N, H, D); the transposes are views (it accepts a unit last stride), and
    # the model's out.transpose(1, 2).reshape(...) after this is then a free view too.
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out = out[0] if isinstance(out, tuple) else out  # 4.0 betas return (out, lse)
    return out.transpose(1, 2)


_CALLS = {"sdpa": _sdpa, "fa4": _fa4, **{n: _restricted(b) for n, b in _SDPA_BACKENDS.items()}}


# -- the call the model makes -----------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` for ``q, k, v`` of shape ``(B, H, N, D)`` (any strides),
    computed by ``backend`` (see the module docstring); returns ``(B, H, N, D)``."""
    if q.device.type == "meta":
        return _sdpa(q, k, v)  # shape-only runs (FLOP counting): any backend counts the same
    if backend == "auto":
        backend = _auto(q, k, v)
    else:
        check_backend(backend)
        if backend in CUDA_ONLY and not q.is_cuda:
            raise ValueError(
                f"attention backend {backend!r} runs only on CUDA tensors, got {q.device.type} "
                f"tensors; on this device use one of {[b for b in BACKENDS if b not in CUDA_ONLY]} "
                f"(e.g. ViTok.from_pretrained(dir, attention_backend='auto'))")
    if torch.compiler.is_compiling():
        return _CALLS[backend](q, k, v)
    try:
        return _CALLS[backend](q, k, v)
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, AssertionError) as e:  # PyTorch's "no available kernel", FA4's asserts
        raise RuntimeError(
            f"attention backend {backend!r} cannot run q of shape {tuple(q.shape)}, dtype "
            f"{q.dtype} on {q.device}: {e}") from e


# -- "auto": time once per shape, cache the fastest -------------------------------------------

_CHOICES: dict[tuple, dict] = {}


def _key(q, k, v) -> tuple:
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return (tuple(q.shape), tuple(k.shape), str(q.dtype).replace("torch.", ""), str(q.device),
            "fwd+bwd" if grad else "fwd")


def _auto(q, k, v) -> str:
    if not q.is_cuda:
        return "sdpa"
    return _cached_or_tuned(q, k, v)


def _cached_or_tuned(q, k, v) -> str:
    """The cached choice; tunes on a miss, except where timing cannot run (while torch.compile
    traces, or while a CUDA graph is captured): there the choice is plain SDPA."""
    if torch.compiler.is_compiling():
        entry = _CHOICES.get(_key(q, k, v))
        return entry["compiled"] if entry is not None else "sdpa"
    entry = _CHOICES.get(_key(q, k, v))
    if entry is not None:
        return entry["backend"]
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        return "sdpa"
    return autotune(q, k, v)["backend"]


def tune(model: torch.nn.Module, x: torch.Tensor) -> dict[str, dict]:
    """Fill ``"auto"``'s cache for every attention shape of ``model(x)`` before compiled code
    needs it, and return :func:`autotune_choices`.

    A block compiled with ``torch.compile`` is traced on its first call, before any eager
    call could time the kernels, so it would use plain SDPA. This runs one forward eagerly
    (``torch.compiler.set_stance("force_eager")``: compiled blocks run uncompiled, nothing is
    traced), under the caller's grad mode and autocast, so the keys are the training step's
    (forward+backward where parameters require grad). No backward runs, no ``.grad`` is
    touched, and the RNG state is restored. Call it on the unwrapped model (before DDP/FSDP
    wrap it), with a real batch, inside the same ``torch.autocast`` as the training step."""
    devices = [x.device] if x.is_cuda else []
    with torch.compiler.set_stance("force_eager"), torch.random.fork_rng(devices=devices):
        model(x)
    return autotune_choices()


def autotune_choices() -> dict[str, dict]:
    """What ``"auto"`` chose so far: ``"BxHxNxD dtype device mode" -> {"backend", "compiled",
    "ms": {backend: median ms}, "errors": {backend: why it was dropped}}``."""
    return {f"{'x'.join(map(str, key[0]))} {key[2]} {key[3]} {key[4]}": copy.deepcopy(entry)
            for key, entry in _CHOICES.items()}


def clear_autotune_cache() -> None:
    _CHOICES.clear()


def autotune(q, k, v, candidates=None) -> dict:
    """Time each candidate backend on these inputs (forward, plus backward when autograd would
    run one), drop those that fail or disagree with an fp32 reference, cache and return the
    entry for this (shape, dtype, device, mode). ``candidates`` defaults to
    :data:`AUTO_CANDIDATES` on CUDA; any backend that runs on the device can be given."""
    key = _key(q, k, v)
    grad = key[-1] == "fwd+bwd"
    if candidates is None:
        candidates = AUTO_CANDIDATES if q.is_cuda else ("sdpa", "flash", "math")
    times, errors = {}, {}
    # A backward timed inside the model's forward must keep its own saved tensors, whatever
    # saved-tensor hooks (activation checkpointing) the caller has pushed: the innermost
    # hooks win, so push identity ones. No outer autograd graph is touched: the timed
    # calls run on detached aliases of q, k, v (same storage and strides, no copy).
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), \
            torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's "why this kernel cannot run" notes
        leaves = [t.detach().requires_grad_(grad) for t in (q, k, v)]
        for name in candidates:
            if name in CUDA_ONLY and not q.is_cuda:
                errors[name] = "CUDA only"
                continue
            try:
                out = _CALLS[name](*leaves)
                err, tol = reference_error(out, q, k, v)
                if not err <= tol:  # also catches NaN
                    errors[name] = f"output differs from the fp32 reference by {err:.3g} > {tol:.3g}"
                    continue
                step = _step(_CALLS[name], leaves, _grad_out(out) if grad else None)
                times[name] = 1e3 * _median_seconds(step, q.device)
            except torch.cuda.OutOfMemoryError as e:
                errors[name] = f"out of memory: {e}"[:200]
            except Exception as e:  # noqa: BLE001 - a kernel that cannot run is dropped
                errors[name] = f"{type(e).__name__}: {e}"[:200]
            finally:
                out = None
    if times:
        best = min(times, key=times.get)  # min keeps the first of equal times
        sdpa_times = {n: t for n, t in times.items() if n in _SDPA_BACKENDS}
        compiled = min(sdpa_times, key=sdpa_times.get) if sdpa_times else "sdpa"
    else:
        best = compiled = "sdpa"  # nothing ran: PyTorch's own choice, and its own error
    entry = {"backend": best, "compiled": compiled, "ms": times, "errors": errors}
    _CHOICES[key] = entry
    log.info("attention %s: %s (%s)", key, best,
             ", ".join(f"{n} {t:.3f} ms" for n, t in times.items()) or f"none ran: {errors}")
    return entry


def reference_error(out, q, k, v) -> tuple[float, float]:
    """``(error, tolerance)``: max |out - fp32 unfused attention| over batch 0, head 0 (enough
    to catch a kernel that computes the wrong thing, at N x N floats of memory rather than
    B x H times that), and the most a correct kernel may be off. A broken kernel is off by
    the order of max|v|; a correct one by a few rounding steps of its dtype (bf16: eps 2^-7,
    so 4 eps = 3% of max|v|), with a floor of 1e-4 for fp32's long reductions."""
    q0, k0, v0 = (t[:1, :1].detach().float() for t in (q, k, v))
    # fp32 even inside the caller's autocast region (it would run these matmuls in bf16)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        ref = ((q0 @ k0.transpose(-1, -2)) * q0.shape[-1] ** -0.5).softmax(-1) @ v0
        err = (out[:1, :1].detach().float() - ref).abs().max().item()
    tol = max(4 * torch.finfo(out.dtype).eps, 1e-4) * v0.abs().max().item()
    return err, tol


def _grad_out(out):
    # from a private generator: tuning must not move the global RNG, or a resumed run would
    # draw different noise from an uninterrupted one
    g = torch.Generator(device=out.device).manual_seed(0)
    return torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype)


def _step(call, leaves, grad_out):
    def run():
        out = call(*leaves)
        if grad_out is not None:
            torch.autograd.grad(out, leaves, grad_out)
    return run


def _median_seconds(fn, device, warmup: int = 2, reps: int = 7) -> float:
    """Median seconds of ``fn``: CUDA events on a GPU (the first warm-up call also JIT-compiles
    FA4's kernel), ``perf_counter`` on the CPU."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e-3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)
