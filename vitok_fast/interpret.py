"""Where Triton runs: compiled on CUDA, or through its interpreter on a CPU-only machine.

Triton reads ``TRITON_INTERPRET`` once, when it is first imported, so the choice must be
made before anything imports triton (vitok_fast.kernels included). Scripts, tests and the
self-test call :func:`interpret_without_cuda` first thing; it never overrides a value the
user set, and never turns the interpreter on where CUDA is available.
"""

from __future__ import annotations

import os


def interpret_without_cuda() -> bool:
    """Set ``TRITON_INTERPRET=1`` when CUDA is unavailable and the user has not chosen.

    Returns True when kernels will run under the interpreter. Must run before triton is
    imported; importing torch first is fine.
    """
    if "TRITON_INTERPRET" not in os.environ:
        try:
            import torch
            cuda = torch.cuda.is_available()
        except ImportError:  # no torch: nothing will run kernels anyway
            cuda = False
        if not cuda:
            os.environ["TRITON_INTERPRET"] = "1"
    return os.environ.get("TRITON_INTERPRET") == "1"
