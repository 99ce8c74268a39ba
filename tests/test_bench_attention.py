"""Attention benchmarks (pytest-benchmark): every backend at ViTok's shapes on a GPU (tiny
shapes on the CPU, where only the code path is checked), forward and forward+backward.

Run with ``pytest tests/ --benchmark-only``; plain ``pytest tests/`` skips them. Each
benchmark's ``extra_info`` holds the FLOPs (bench/bench_attention.py's convention) and the
achieved TFLOP/s; ``bench/bench_attention.py`` writes the same comparison to JSON + a plot.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from vitok_fast import attention as A

_spec = importlib.util.spec_from_file_location(
    "bench_attention", Path(__file__).resolve().parents[1] / "bench" / "bench_attention.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
BACKENDS = bench.GPU_BACKENDS if DEVICE.type == "cuda" else bench.CPU_BACKENDS
CASES = [(s, mode, b) for s in bench.shapes(DEVICE, bench.GPU_TOKENS_PER_BATCH)
         for mode in ("fwd", "fwd+bwd") for b in BACKENDS]


@pytest.fixture(autouse=True)
def _only_with_benchmark_flag(request):
    if not request.config.getoption("benchmark_only", default=False):
        pytest.skip("attention benchmarks run with --benchmark-only")


@pytest.mark.parametrize("shape,mode,backend", CASES,
                         ids=[f"{'x'.join(map(str, s))}-{m}-{b}" for s, m, b in CASES])
def test_bench_attention(benchmark, shape, mode, backend):
    if backend == "fa4" and not A.fa4_available():
        pytest.skip("flash-attn-4 is not importable here")
    B, H, N, D = shape
    grad = mode == "fwd+bwd"
    q, k, v = bench.make_inputs(B, H, N, D, DEVICE, DTYPE, grad)
    if A.unsupported(backend, q, v):  # e.g. FA4 at the L decoder's head dim 72
        pytest.skip(A.unsupported(backend, q, v))
    grad_out = torch.randn(B, H, N, D, device=DEVICE, dtype=DTYPE) if grad else None
    fn = bench._case_fn(backend, q, k, v, grad_out)
    run = fn
    if DEVICE.type == "cuda":
        def run():  # noqa: F811 - synchronised so the timer sees the GPU
            fn()
            torch.cuda.synchronize()
    run()  # warm-up (FA4 compiles its kernel here)
    benchmark.group = f"attention {B}x{H}x{N}x{D} {mode}"
    if DEVICE.type == "cuda":
        benchmark.pedantic(run, rounds=20, iterations=5, warmup_rounds=2)
    else:
        benchmark.pedantic(run, rounds=3, iterations=1)
    flops = bench.attention_flops(B, H, N, D, mode)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(backend=backend, mode=mode, shape=f"{B}x{H}x{N}x{D}",
                                dtype=str(DTYPE), flops=flops, tflop_per_s=flops / seconds / 1e12)
    assert seconds > 0
