"""Test set-up. Kernels run compiled on a CUDA GPU and through Triton's interpreter on a
CPU-only machine: ``interpret_without_cuda`` makes that choice before anything imports
triton, which is why it sits at the very top.

Fixtures and markers: ``device`` is where kernel and model-kernel tests run (CUDA when
present, else the CPU under the interpreter); tests marked ``gpu`` need CUDA and are skipped
without it (``pytest -m gpu`` runs only them). Nothing here allocates on the GPU at
collection time.
"""

from vitok_fast.interpret import interpret_without_cuda

interpret_without_cuda()

import os  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def _cuda() -> bool:
    # A user who forces TRITON_INTERPRET=1 on a GPU machine tests the interpreter, on the CPU.
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def pytest_collection_modifyitems(config, items):
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernel tests run: CUDA when present, else the CPU (kernels interpreted)."""
    return torch.device("cuda" if _cuda() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
