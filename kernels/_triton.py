"""Triton, or a stand-in where it is not installed (macOS, Windows, CPU-only installs).

Each kernel file holds its Triton kernels next to its plain-PyTorch reference (``*_ref``),
and the model's reference path needs only the latter. So the kernel modules import Triton
from here: with Triton present this is Triton itself; without it, ``triton.jit`` returns a
placeholder that raises a clear error if a kernel is ever launched, and the pure helpers
the wrappers use (``cdiv``, ``next_power_of_2``) still work. ``vitok_fast.ops`` never routes
to a kernel without Triton (``use_kernels`` then means the reference, with one warning).
"""

from __future__ import annotations

MISSING_MESSAGE = ("the fused kernels need Triton, which is not installed: pip install triton "
                   "(Linux), or use the reference path (use_kernels=False, the *_ref functions)")

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    class _Unlaunchable:
        """What ``@triton.jit`` gives without Triton: launching it raises ImportError."""

        def __init__(self, fn):
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")

        def __getitem__(self, grid):
            raise ImportError(MISSING_MESSAGE)

        def __call__(self, *args, **kwargs):
            raise ImportError(MISSING_MESSAGE)

    class _Triton:
        @staticmethod
        def jit(fn=None, **_):
            return _Unlaunchable(fn) if fn is not None else _Unlaunchable

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()

    triton = _Triton()
    tl = None  # only read inside @triton.jit bodies, which never run without Triton

__all__ = ["HAS_TRITON", "MISSING_MESSAGE", "tl", "triton"]
