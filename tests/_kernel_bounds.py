"""The kernel tests' bounds (vitok_fast/kernel_bounds.py holds them and their argument, so the
self-test uses the same ones) and the tests' one-thread fixture."""

from __future__ import annotations

import pytest
import torch

from vitok_fast.kernel_bounds import (DTYPES, ELEMENTWISE_U32, OP_U32, STORE_ULP, TINY, U32,  # noqa: F401
                                      Within, assert_within, check_within, dot_bound, exp_rel,
                                      fp32_bound, ops_u32, sigmoid_rel)


@pytest.fixture
def one_thread():
    """Run a test with one torch thread, then restore the setting.

    Interpreted kernels alternate Python/numpy work with tiny torch ops; torch's OpenMP
    pool spin-waits between its parallel regions and, on a 2-core machine, takes the core
    the interpreter needs: measured on the T-T/8 model's forward+backward, 0.39 s with one
    thread against 1.3-1.7 s with two.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
