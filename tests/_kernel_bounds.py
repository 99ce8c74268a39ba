"""The kernel tests' bounds (vitok_fast/kernel_bounds.py holds them and their argument, so the
self-test uses the same ones); the one-thread fixture is tests/conftest.py's."""

from __future__ import annotations

from vitok_fast.kernel_bounds import (DTYPES, ELEMENTWISE_U32, OP_U32, STORE_ULP, TINY, U32,  # noqa: F401
                                      Within, assert_within, check_within, dot_bound, exp_rel,
                                      fp32_bound, ops_u32, sigmoid_rel)

