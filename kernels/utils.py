"""Launch helpers shared by the kernels: block sizes for the GPU and for Triton's CPU interpreter.

Under ``TRITON_INTERPRET=1`` every program instance is a Python call running numpy on whole
blocks, so the cost is the number of programs, not the number of elements: there we use
few, large blocks. On a GPU the blocks are sized for registers and occupancy instead.
"""

from __future__ import annotations

import functools
import os

import torch

from ._triton import HAS_TRITON, MISSING_MESSAGE, triton


def interpreted(t: torch.Tensor) -> bool:
    """True when kernels on ``t`` run in Triton's CPU interpreter."""
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def check_device(*tensors: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError(MISSING_MESSAGE)
    for t in tensors:
        if not (t.is_cuda or interpreted(t) or t.is_meta):  # meta: the fake impls, shapes only
            raise RuntimeError(
                f"the Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; "
                f"got a tensor on {t.device} (use the *_ref functions, or use_kernels=False)")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs(t: torch.Tensor, work_items: int) -> int:
    """How many persistent programs a reduction over ``work_items`` row blocks uses.

    Fixed by the device and the shape (never by timing), so reductions over the partial
    results are run-to-run deterministic.
    """
    cap = 4 if interpreted(t) else 2 * _sm_count(t.device.index or 0)
    return max(1, min(work_items, cap))


def rows_per_program(t: torch.Tensor, block_n: int, gpu_elems: int = 4096) -> int:
    """Rows in one program's tile of ``rows x block_n`` elements (a power of two)."""
    budget = 1 << 16 if interpreted(t) else gpu_elems
    return triton.next_power_of_2(max(1, budget // block_n))


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D ``(rows, last dim)`` tensor with unit stride along the last dim.

    A view whenever the leading dims flatten to one stride (contiguous tensors and the
    chunks of a packed last dim, e.g. ``w13(x).chunk(2, -1)``); otherwise ``reshape``
    copies, deliberately, so the kernel never reads a layout it does not handle.
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def autocast_inputs(*tensors):
    """Cast floating tensors to the autocast dtype when autocast is on for their device.

    Custom ops bypass autocast; the GEMM kernels (tubelet embed / unembed)
    call this so that under ``torch.autocast`` they compute in bf16 like the ``F.linear``
    of the reference path, instead of silently in fp32.
    """
    device = next(t.device.type for t in tensors if t is not None)
    if device == "meta" or not torch.is_autocast_enabled(device):  # meta has no autocast
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
