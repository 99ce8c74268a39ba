"""Kernel benchmarks (pytest-benchmark): ours vs eager vs torch.compile vs libraries.

Run with ``pytest tests/ --benchmark-only``: tiny shapes on the CPU (our kernels in
Triton's interpreter: this checks the code path, the times mean nothing), ViTok's real
shapes on a GPU. Each benchmark's ``extra_info`` holds the bytes the op must move and the
achieved GB/s. Plain ``pytest tests/`` skips them. ``bench/bench_kernels.py`` writes the
same comparison to a JSON file and a plot.
"""

import pytest
import torch

from vitok_fast.benchmarking import cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Describes the cases only: each allocates its inputs when its test runs (case.make()).
CASES = cases(DEVICE, dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32)


@pytest.fixture(autouse=True)
def _only_with_benchmark_flag(request):
    if not request.config.getoption("benchmark_only", default=False):
        pytest.skip("kernel benchmarks run with --benchmark-only")


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.shape}-{c.impl}-{c.mode}" for c in CASES])
def test_bench_kernel(benchmark, case):
    benchmark.group = f"{case.op} {case.shape} {case.mode}"
    benchmark.extra_info.update(op=case.op, impl=case.impl, mode=case.mode, shape=case.shape,
                                dtype=case.dtype, bytes=case.bytes, note=case.note)
    run = fn = case.make()
    if DEVICE == "cuda":
        def run():  # noqa: F811 - named for Nsight, synchronised so the timer sees the GPU
            torch.cuda.nvtx.range_push(case.nvtx)
            fn()
            torch.cuda.nvtx.range_pop()
            torch.cuda.synchronize()
        run()  # warm-up, compile
        benchmark.pedantic(run, rounds=20, iterations=5, warmup_rounds=2)
    else:
        run()  # warm-up, compile
        benchmark.pedantic(run, rounds=3, iterations=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = case.bytes / seconds / 1e9
    assert seconds > 0
