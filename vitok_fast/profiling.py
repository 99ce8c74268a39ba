"""NVTX and profiler ranges that cost nothing unless profiling is switched on.

``enable_ranges()`` (or ``VITOK_NVTX=1`` in the environment) makes every ``span(name)`` in
the model push an NVTX range (visible to Nsight / ncu ``--nvtx``) and a
``torch.profiler.record_function`` range (visible in torch.profiler traces). Off, ``span``
returns one shared null context: no allocation, no call into CUDA.
"""

from __future__ import annotations

import contextlib
import os

import torch

_ENABLED = os.environ.get("VITOK_NVTX") == "1"
_NULL = contextlib.nullcontext()


def enable_ranges(enabled: bool = True) -> None:
    global _ENABLED
    _ENABLED = enabled


def ranges_enabled() -> bool:
    return _ENABLED


@contextlib.contextmanager
def _range(name: str):
    use_nvtx = torch.cuda.is_available()
    if use_nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if use_nvtx:
            torch.cuda.nvtx.range_pop()


def span(name: str):
    """Context manager naming a region of the model for profilers; a no-op when disabled."""
    return _range(name) if _ENABLED else _NULL
