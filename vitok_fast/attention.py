"""Attention backends: the one call the model's ``Attention`` makes, and a check that a
kernel computes it correctly.

ViTok's attention is plain bidirectional softmax attention (no mask, no dropout, scale
``1/sqrt(D)``) on ``q, k, v`` of shape ``(B, H, N, D)``. Several kernels compute it:

- ``"sdpa"`` (the default): ``F.scaled_dot_product_attention`` with PyTorch's own choice of
  kernel.
- ``"flash"``, ``"cudnn"``, ``"efficient"``, ``"math"``: the same call restricted to one
  SDPA backend with ``torch.nn.attention.sdpa_kernel``. ``"math"`` is the unfused
  reference; ``"flash"`` also runs on the CPU (PyTorch has a CPU flash kernel).
- ``"fa4"``: FlashAttention-4 (``flash_attn.cute.flash_attn_func`` from the
  ``flash-attn-4`` wheel, CuTe DSL kernels for Hopper/Blackwell), when it imports.
- ``"auto"`` (opt-in): on CUDA, the first call at a new (shape, dtype, device, forward-only
  or forward+backward) checks every candidate with :func:`check_backend` (forward and
  backward, full tensors, against fp32 math), skips what cannot run or is wrong, times the
  rest once on the real inputs and caches the fastest; under ``torch.distributed`` rank 0
  chooses and broadcasts. Later calls are a dict lookup. On the CPU (and the meta device)
  ``"auto"`` is plain SDPA, unchecked.

What each backend supports (devices, dtypes, head dims) is one table, :data:`SUPPORT`. A
pinned backend it rules out (FA4 at ViTok-L's head dim 72; a CUDA-only backend on CPU
tensors) is a ValueError naming what it supports, not a silent fallback: a pinned backend is
a request to run (or measure) that kernel. ``"auto"`` skips it and says so once.

torch.compile: checking and timing never run inside a compiled graph. While tracing,
``"auto"`` reads the cache (filled by an eager call at that shape; otherwise plain
``"sdpa"``) and uses the fastest *SDPA* backend measured there, since ``sdpa_kernel`` traces
into the graph while FA4's CuTe kernels would force a graph break. A fixed ``"fa4"`` still
works under compile, as a graph break around the call. A compiled block is traced on its
first call, before any eager call could tune, so :func:`tune` runs one eager forward first.
Design and measured numbers: docs/attention.md.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vitok_fast.defaults import ATTENTION_BACKENDS, DEFAULT_ATTENTION_BACKEND

log = logging.getLogger(__name__)

BACKENDS, DEFAULT_BACKEND = ATTENTION_BACKENDS, DEFAULT_ATTENTION_BACKEND  # (torch-free there)
# What "auto" checks and times on CUDA. "math" is left out: the unfused reference
# materialises the (N, N) scores, tens of GB at 4096 tokens and a full batch. Listed in
# order of preference on an exact tie.
AUTO_CANDIDATES = ("cudnn", "flash", "efficient", "fa4")
_SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
_HALF = (torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class Support:
    """Where a backend can run. ``None`` means "whatever the kernel's own checks accept"
    (PyTorch's SDPA backends check themselves and say why they cannot run)."""
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] | None
    head_dims: tuple[int, ...] | None
    source: str  # where the limits come from
    # device -> the fewest terms the kernel's backward sums before it rounds a partial sum
    # of dq, dk or dv to a half-precision output (absent: it sums in fp32 and rounds once)
    partial_sums: dict[str, int] = dataclasses.field(default_factory=dict)


# One table: what each backend supports, read by the pinned-backend error, by "auto" (which
# skips what cannot run) and by check_backend ("unsupported", not "wrong").
SUPPORT = {
    # PyTorch's CPU flash backward adds each block's gemm into the bf16/fp16 gradient
    # (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp: query blocks of 32 to 256 rows,
    # key blocks of 512); plain "sdpa" runs it on the CPU
    "sdpa": Support(("cpu", "cuda"), None, None, "PyTorch picks a kernel that can run",
                    partial_sums={"cpu": 32}),
    "math": Support(("cpu", "cuda"), None, None, "PyTorch's unfused reference"),
    "flash": Support(("cpu", "cuda"), None, None, "PyTorch's checks (CUDA: fp16/bf16)",
                     partial_sums={"cpu": 32}),
    "efficient": Support(("cuda",), None, None, "PyTorch's checks"),
    "cudnn": Support(("cuda",), _HALF, None, "PyTorch's checks"),
    # flash-attn-4 (flash_attn/cute): its tests run forward and backward with equal q/k and
    # v head dims at d in {64, 96, 128} (tests/cute/test_flash_attn.py; 192 and 256 backward
    # only with dv = 128 or xfail on SM90), and interface.py listed "hdim 64, 96, 128" as
    # supported until April 2026. Its argument check now admits any multiple of 8 from 8 to
    # 256 on SM90, but that is not what is tested: ViTok-L's 72 is not run upstream.
    "fa4": Support(("cuda",), _HALF, (64, 96, 128), "flash-attn-4's tested head dims"),
}


def validate_backend(name) -> str:
    """``name`` if it is a backend this module knows, else a ValueError listing them."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {list(BACKENDS)}")
    return name


def unsupported(name: str, q: torch.Tensor, v: torch.Tensor | None = None) -> str | None:
    """Why ``SUPPORT`` says backend ``name`` cannot run on ``q`` (device, dtype, head dim),
    or None where it may (the kernel's own checks still apply)."""
    spec = SUPPORT[name]
    dims = {q.shape[-1]} | ({v.shape[-1]} if v is not None else set())
    if spec.head_dims is not None and not dims <= set(spec.head_dims):
        return (f"attention backend {name!r} supports head dims {list(spec.head_dims)} "
                f"({spec.source}), got {sorted(dims)[0] if len(dims) == 1 else sorted(dims)}")
    if spec.dtypes is not None and q.dtype not in spec.dtypes:
        return (f"attention backend {name!r} supports dtypes "
                f"{[str(d).replace('torch.', '') for d in spec.dtypes]}, got "
                f"{str(q.dtype).replace('torch.', '')}")
    if q.device.type not in spec.devices:
        return (f"attention backend {name!r} runs on {' or '.join(spec.devices)} tensors, got "
                f"{q.device.type} tensors")
    return None


# -- the kernels ------------------------------------------------------------------------------


def _sdpa(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _restricted(backend: SDPBackend):
    def run(q, k, v, scale=None):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
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


def _fa4(q, k, v, scale=None):
    return _fa4_eager()(q, k, v, scale)


@functools.cache
def _fa4_eager():
    """CuTe DSL kernels: a graph break under torch.compile, not a trace. Applied on first use,
    not at import: ``torch.compiler.disable`` imports torch._dynamo, seconds that every
    ``import vitok_fast.model`` (and each tool's ``--help``) would pay."""
    return torch.compiler.disable(_fa4_call)


def _fa4_call(q, k, v, scale=None):
    fn, why = _fa4_import()
    if fn is None:
        raise ImportError(
            f"attention backend 'fa4' needs the flash-attn-4 package (pip install --pre "
            f"flash-attn-4), which did not import: {why}")
    # FA4 takes (B, N, H, D); the transposes are views (it accepts a unit last stride), and
    # the model's out.transpose(1, 2).reshape(...) after this is then a free view too.
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    out = out[0] if isinstance(out, tuple) else out  # 4.0 betas return (out, lse)
    return out.transpose(1, 2)


_CALLS = {"sdpa": _sdpa, "fa4": _fa4, **{n: _restricted(b) for n, b in _SDPA_BACKENDS.items()}}


# -- the call the model makes -----------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              backend: str = DEFAULT_BACKEND) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` for ``q, k, v`` of shape ``(B, H, N, D)`` (any strides),
    computed by ``backend`` (see the module docstring); returns ``(B, H, N, D)``."""
    if q.device.type == "meta":
        return _sdpa(q, k, v)  # shape-only runs (FLOP counting): any backend counts the same
    if backend == "auto":
        backend = _auto(q, k, v)
    else:
        validate_backend(backend)
        why = unsupported(backend, q, v)
        if why is not None:
            raise ValueError(
                f"{why}; pin a backend that supports this input, e.g. 'sdpa' (PyTorch's own "
                f"choice) or 'auto', which skips what cannot run (ViTok.from_pretrained(dir, "
                f"attention_backend='sdpa') overrides a saved choice)")
    if torch.compiler.is_compiling():
        return _CALLS[backend](q, k, v)
    try:
        return _CALLS[backend](q, k, v)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, AssertionError) as e:  # PyTorch's "no available kernel", FA4's asserts
        raise RuntimeError(
            f"attention backend {backend!r} cannot run q of shape {tuple(q.shape)}, dtype "
            f"{q.dtype} on {q.device}: {e}") from e


# -- check_backend: one backend against fp32 math, forward and backward -----------------------


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the distance from 1 to the next number: the most a rounding moves a value,
    relative (bf16 2^-8, fp16 2^-11, fp32 2^-24, fp64 2^-53)."""
    return torch.finfo(dtype).eps / 2


def error_bounds(dtype: torch.dtype, *, head_dim: int, n_queries: int, n_keys: int,
                 score_scale: float, scores_in_dtype: bool = False,
                 partial_sum_terms: int | None = None) -> dict[str, float]:
    """The most a correct kernel's ``out, dq, dk, dv`` may differ from exact attention on
    the same inputs, elementwise, relative to each element's *term magnitude* (see
    :func:`check_backend`): ``{"out": eps_O, "dq": ..., "dk": ..., "dv": ...}``.

    A correct kernel computes each dot product / sum in at least its accumulation precision
    (unit roundoff ``w``: fp32 for bf16/fp16/fp32 inputs, fp64 for fp64) and rounds each
    tensor it stores (P, dS, the outputs) at most once to the input dtype (``u``). A sum of
    n terms then carries at most ``n w`` times the sum of the terms' magnitudes (recursive
    summation; tree and blocked sums do better), and each elementwise op (scale, exp or
    exp2, max-shift, divide, online-softmax rescale) a few ``w``: 8 covers them, as in the
    kernel tests. With ``alpha = max_ij scale * sum_d |q_id| |k_jd|`` the scores' term
    magnitude, ``D`` the head dim, ``Nk`` keys and ``Nq`` queries:

    - scores ``S = scale q k^T``: ``eps_S = ((D + 8) w + 3 u_S) alpha`` absolute, where
      ``u_S = u`` if the kernel may keep q, k or S in the input dtype (PyTorch's math path
      with ``allow_fp16_bf16_reduction_math_sdp``), else 0;
    - ``P = softmax(S)``: a shift of every logit by at most ``eps_S`` moves each P by at most
      ``2 eps_S`` relative; the exp, the Nk-term row sum and the divide add ``(Nk + 8) w``;
      storing P adds ``u``: ``eps_P = 2 eps_S + (Nk + 8) w + u``;
    - ``out = P v`` and ``dv = P^T dout``: ``eps_P`` plus an Nk (Nq) term sum plus one store:
      ``eps_O = eps_P + (Nk + 8) w + u``, ``eps_dV = eps_P + (Nq + 8) w + u``;
    - ``dS = P (dP - Delta)`` with ``dP = dout v^T`` (D terms) and ``Delta = rowsum(P dP)``
      (or ``rowsum(dout out)``, which uses ``out``'s error): ``eps_dS = 2 eps_P +
      (Nk + D + 16) w + 3 u``;
    - ``dq = scale dS k`` and ``dk = scale dS^T q``: ``eps_dQ = eps_dS + (Nk + 8) w + u +
      2 u_S``, ``eps_dK`` the same with Nq.
    - A kernel that rounds a partial sum of dq, dk or dv to the input dtype after every
      ``partial_sum_terms`` terms (PyTorch's CPU flash backward) adds ``u`` per extra
      rounding: ``(ceil(Nk / b) - 1) u`` to dq, ``(ceil(Nq / b) - 1) u`` to dk and dv.

    First order in the roundoffs (the neglected terms are ``u^2``-small). For bf16 with
    fp32 scores these are about ``2u``, ``2u`` and ``6u``: 0.8% and 2.3% of the terms."""
    u = unit_roundoff(dtype)
    w = unit_roundoff(torch.float64 if dtype == torch.float64 else torch.float32)
    u_s = u if scores_in_dtype else 0.0
    D, nq, nk = head_dim, n_queries, n_keys
    eps_s = ((D + 8) * w + 3 * u_s) * score_scale
    eps_p = 2 * eps_s + (nk + 8) * w + u
    eps_ds = 2 * eps_p + (nk + D + 16) * w + 3 * u
    extra_q = extra_k = 0.0
    if partial_sum_terms is not None and u > w:
        extra_q = (math.ceil(nq / partial_sum_terms) - 1) * u
        extra_k = (math.ceil(nk / partial_sum_terms) - 1) * u
    return {"out": eps_p + (nk + 8) * w + u,
            "dq": eps_ds + (nk + 8) * w + u + 2 * u_s + extra_k,
            "dk": eps_ds + (nq + 8) * w + u + 2 * u_s + extra_q,
            "dv": eps_p + (nq + 8) * w + u + extra_q}


_TENSORS = ("out", "dq", "dk", "dv")


def check_backend(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  grad_out: torch.Tensor | None = None, *, scale: float | None = None) -> dict:
    """Run attention backend ``name`` forward and backward on the full ``q, k, v`` (every
    batch and head, any strides: the model's q, k, v are permuted views of one projection)
    and compare ``out, dq, dk, dv`` with math attention in float64 (CPU) or fp32 (CUDA;
    TF32 off), computed on the same input values.

    Returns ``{"backend", "ok", "supported", "max_rel_err", "bound", "worst", "error",
    "tensors": {"out"|"dq"|"dk"|"dv": {"max_rel_err", "bound"}}}``.

    The error of a tensor X is ``max_e |X_e - ref_e| / M_e``, where ``M`` is the *term
    magnitude* of X: the same computation on absolute values (``M_out = P |v|``,
    ``M_dv = P^T |dout|``, ``M_dq = scale P (|dout||v|^T + R) |k|`` with ``R`` the row sums of
    ``P |dout||v|^T``, ``M_dk`` likewise with ``|q|``). Rounding errors scale with M, not with
    X (which can cancel to near zero), so the bound is a fixed multiple of M; it is
    :func:`error_bounds` for the kernel's dtype plus the same for the reference's own
    rounding, derived from the operations a correct kernel does, not tuned to pass. Each
    tensor is checked against its own bound; ``max_rel_err``, ``bound`` and ``worst`` are
    those of the tensor nearest its bound (the worst of out, dq, dk, dv), so
    ``ok == (max_rel_err <= bound)``.

    ``supported`` is False (and ``ok`` False, ``error`` saying why) when the backend cannot
    run here: ``SUPPORT`` rules it out, the kernel raised (PyTorch's "no available kernel",
    a failed import), or it ran out of memory at this shape. ``supported`` True with ``ok``
    False means it ran and is wrong (or non-finite). ``grad_out`` defaults to a standard
    normal from a private generator (the global RNG does not move)."""
    validate_backend(name)
    if name == "auto":
        raise ValueError("check_backend checks one kernel; 'auto' is a choice among them, "
                         f"give one of {[b for b in BACKENDS if b != 'auto']}")
    result = {"backend": name, "ok": False, "supported": False, "max_rel_err": math.nan,
              "bound": math.nan, "worst": None, "error": None, "tensors": {}}
    why = unsupported(name, q, v)
    if why is not None:
        result["error"] = f"unsupported: {why}"
        return result
    out_shape = (*q.shape[:-1], v.shape[-1])
    if grad_out is None:
        grad_out = _grad_out(out_shape, q.dtype, q.device)
    # The kernel runs on detached aliases (same storage and strides, no copy), in its own
    # dtype whatever autocast region the caller is in, and keeps its own saved tensors
    # whatever saved-tensor hooks (activation checkpointing) the caller has pushed.
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), \
            torch.enable_grad(), torch.autocast(q.device.type, enabled=False), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's "why this kernel cannot run" notes
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        try:
            out = _CALLS[name](*leaves, scale=scale)
            got = (out.detach(), *torch.autograd.grad(out, leaves, grad_out))
        except torch.OutOfMemoryError as e:
            result["error"] = f"unsupported: out of memory at q {tuple(q.shape)}: {e}"[:300]
            result["oom"] = True
            return result
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run here
            result["error"] = f"unsupported: {type(e).__name__}: {e}"[:300]
            return result
        del out, leaves
    try:
        errors, alpha = _compare(got, q, k, v, grad_out, scale)
    except torch.OutOfMemoryError as e:  # the reference's chunks: too big a shape to check here
        result["error"] = f"unsupported: out of memory in the reference at q {tuple(q.shape)}: {e}"[:300]
        result["oom"] = True
        return result
    result["supported"] = True
    D, nq, nk = q.shape[-1], q.shape[-2], k.shape[-2]
    scores_in_dtype = (name in ("math", "sdpa") and q.dtype in _HALF
                       and torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed())
    kernel = error_bounds(q.dtype, head_dim=D, n_queries=nq, n_keys=nk, score_scale=alpha,
                          scores_in_dtype=scores_in_dtype,
                          partial_sum_terms=SUPPORT[name].partial_sums.get(q.device.type))
    ref = error_bounds(_ref_dtype(q.device), head_dim=D, n_queries=nq, n_keys=nk,
                       score_scale=alpha)
    for t in _TENSORS:
        result["tensors"][t] = {"max_rel_err": errors[t], "bound": kernel[t] + ref[t]}
    worst = max(_TENSORS, key=lambda t: errors[t] / result["tensors"][t]["bound"])
    result.update(worst=worst, **result["tensors"][worst])
    result["ok"] = bool(result["max_rel_err"] <= result["bound"])  # False on NaN
    if not result["ok"]:
        result["error"] = (f"wrong: {worst} differs from the {_ref_dtype(q.device)} reference "
                           f"by {result['max_rel_err']:.3g} of its term magnitude, bound "
                           f"{result['bound']:.3g}")
    return result


def _ref_dtype(device: torch.device) -> torch.dtype:
    # float64 where it is cheap (CPUs); fp32 on GPUs, whose float64 rate can be 1/64 of fp32
    return torch.float64 if device.type == "cpu" else torch.float32


def _compare(got, q, k, v, grad_out, scale) -> tuple[dict[str, float], float]:
    """Max error over every (batch, head) of ``got = (out, dq, dk, dv)`` against math
    attention, each relative to its term magnitude; and ``alpha`` (see error_bounds).
    Runs a few heads at a time so the (N, N) matrices stay within ~256 MB."""
    dtype = _ref_dtype(q.device)
    B, H, nq, D = q.shape
    nk = k.shape[-2]
    s = scale if scale is not None else D ** -0.5
    per_head = 6 * nq * nk * torch.finfo(dtype).bits // 8
    step = max(1, min(H, (256 << 20) // per_head))
    errors = dict.fromkeys(_TENSORS, 0.0)
    alpha = 0.0
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the reference in true fp32, not TF32
    try:
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            for b in range(B):
                for h in range(0, H, step):
                    sl = (slice(b, b + 1), slice(h, h + step))
                    qq, kk, vv, gg = (t[sl].to(dtype) for t in (q, k, v, grad_out))
                    mine = [t[sl].to(dtype) for t in got]
                    ref, mag, a = _math_attention(qq, kk, vv, gg, s, torch.finfo(q.dtype).tiny)
                    alpha = max(alpha, a)
                    for t, x, r, m in zip(_TENSORS, mine, ref, mag):
                        errors[t] = max(errors[t], _rel_err(x, r, m))
    finally:
        torch.set_float32_matmul_precision(precision)
    return errors, alpha


def _math_attention(q, k, v, g, s, floor):
    """``(out, dq, dk, dv)`` by the textbook formulas, their term magnitudes (see
    check_backend) and ``alpha``. ``floor`` is the kernel dtype's smallest normal number:
    below it rounding is absolute (half a subnormal step = unit roundoff x floor), so every
    stored quantity's magnitude (P, dS, the outputs) is counted as at least ``floor``."""
    kt = k.transpose(-1, -2)
    p = (s * (q @ kt)).softmax(-1)
    out = p @ v
    dv = p.transpose(-1, -2) @ g
    dp = g @ v.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq, dk = s * (ds @ k), s * (ds.transpose(-1, -2) @ q)
    qa, ka, va, ga = q.abs(), k.abs(), v.abs(), g.abs()
    alpha = (s * (qa @ ka.transpose(-1, -2))).max().item()
    pf = p + floor
    gv = ga @ va.transpose(-1, -2)
    hm = pf * (gv + (pf * gv).sum(-1, keepdim=True)) + floor
    mags = (pf @ va + floor, s * (hm @ ka) + floor, s * (hm.transpose(-1, -2) @ qa) + floor,
            pf.transpose(-1, -2) @ ga + floor)
    return (out, dq, dk, dv), mags, alpha


def _rel_err(x, ref, mag) -> float:
    err = (x - ref).abs()
    if not torch.isfinite(x).all():
        return math.inf
    # where every term is 0 the exact result is 0 and a correct kernel returns exactly 0
    ratio = torch.where(mag > 0, err / mag, torch.where(err > 0, math.inf, 0.0))
    return ratio.max().item() if ratio.numel() else 0.0


# -- "auto": check and time once per shape, cache the fastest --------------------------------

_CHOICES: dict[tuple, dict] = {}
_SAID: set[str] = set()


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
    (forward+backward where parameters require grad). The model's ``.grad`` is not touched
    and the RNG state is restored. Call it on the unwrapped model (before DDP/FSDP wrap it),
    with a real batch, inside the same ``torch.autocast`` as the training step, on every
    rank at once (each new shape is one broadcast from rank 0)."""
    devices = [x.device] if x.is_cuda else []
    with torch.compiler.set_stance("force_eager"), torch.random.fork_rng(devices=devices):
        model(x)
    return autotune_choices()


def autotune_choices() -> dict[str, dict]:
    """What ``"auto"`` chose so far: ``"BxHxNxD dtype device mode" -> {"backend", "compiled",
    "ms": {backend: median ms}, "errors": {backend: why it was skipped}}``."""
    return {f"{'x'.join(map(str, key[0]))} {key[2]} {key[3]} {key[4]}": copy.deepcopy(entry)
            for key, entry in _CHOICES.items()}


def clear_autotune_cache() -> None:
    _CHOICES.clear()


def _say_once(message: str) -> None:
    """A warning the first time this process sees ``message``, then silence."""
    if message not in _SAID:
        _SAID.add(message)
        warnings.warn(message, stacklevel=3)


def autotune(q, k, v, candidates=None) -> dict:
    """Choose the backend for these inputs' (shape, dtype, device, mode), cache it and return
    ``{"backend", "compiled", "ms", "errors"}``.

    Each candidate (default :data:`AUTO_CANDIDATES` on CUDA; any backend that runs on the
    device can be given) is skipped, with the reason in ``errors``, when ``SUPPORT`` rules
    it out (said once per process as a warning), when :func:`check_backend` finds it
    unsupported or wrong here (forward AND backward, on the full tensors, against fp32
    math), or when it runs out of memory: that skips it for this key only, and the next
    shape tries it again. The survivors are timed (forward, plus backward when autograd
    would run one) and the fastest kept. Under ``torch.distributed`` the choice is made on
    rank 0 and broadcast, so every rank runs the same kernel (a kernel's rounding differs
    from another's: ranks running different ones would drift apart)."""
    key = _key(q, k, v)
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        box = [_measure(q, k, v, key, candidates) if torch.distributed.get_rank() == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        entry = box[0]
    else:
        entry = _measure(q, k, v, key, candidates)
    _CHOICES[key] = entry
    log.info("attention %s: %s (%s)", key, entry["backend"],
             ", ".join(f"{n} {t:.3f} ms" for n, t in entry["ms"].items())
             or f"none ran: {entry['errors']}")
    return entry


def _measure(q, k, v, key, candidates) -> dict:
    grad = key[-1] == "fwd+bwd"
    if candidates is None:
        candidates = AUTO_CANDIDATES if q.is_cuda else ("sdpa", "flash", "math")
    times, errors = {}, {}
    for name in candidates:
        why = unsupported(name, q, v)
        if why is not None:
            errors[name] = f"unsupported: {why}"
            _say_once(f"attention 'auto' skips {why}")
            continue
        checked = check_backend(name, q, k, v)
        if not checked["ok"]:
            errors[name] = checked["error"]
            _release(q.device)
            continue
        # Timed on detached aliases of q, k, v (same storage and strides, no copy), with
        # identity saved-tensor hooks (see check_backend): no outer autograd graph is touched.
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), \
                torch.set_grad_enabled(grad), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            leaves = [t.detach().requires_grad_(grad) for t in (q, k, v)]
            out_shape = (*q.shape[:-1], v.shape[-1])
            step = _step(_CALLS[name], leaves, _grad_out(out_shape, q.dtype, q.device) if grad else None)
            try:
                times[name] = 1e3 * _median_seconds(step, q.device)
            except torch.OutOfMemoryError as e:
                errors[name] = f"unsupported: out of memory at q {tuple(q.shape)}: {e}"[:300]
                _release(q.device)
            except Exception as e:  # noqa: BLE001 - passed the check, failed when timed
                errors[name] = f"unsupported: {type(e).__name__}: {e}"[:300]
    if times:
        best = min(times, key=times.get)  # min keeps the first of equal times
        sdpa_times = {n: t for n, t in times.items() if n in _SDPA_BACKENDS}
        compiled = min(sdpa_times, key=sdpa_times.get) if sdpa_times else "sdpa"
    else:
        best = compiled = "sdpa"  # nothing ran: PyTorch's own choice, and its own error
    return {"backend": best, "compiled": compiled, "ms": times, "errors": errors}


def _release(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what a failed candidate left cached, before the next one


def _grad_out(shape, dtype, device):
    # from a private generator: checking must not move the global RNG, or a resumed run would
    # draw different noise from an uninterrupted one
    g = torch.Generator(device=device).manual_seed(0)
    return torch.randn(shape, generator=g, device=device, dtype=dtype)


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
