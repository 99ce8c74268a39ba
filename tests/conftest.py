"""Test set-up. Kernels run compiled on a CUDA GPU and through Triton's interpreter on a
CPU-only machine: ``interpret_without_cuda`` makes that choice before anything imports
triton, which is why it sits at the very top.

Fixtures and markers: ``one_thread`` runs a module's tests with one torch thread; ``device`` is where kernel and model-kernel tests run (CUDA when
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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark =
    pytest.mark.usefixtures("one_thread")``), the setting restored after its last test.

    Tiny ops and interpreted kernels alternate Python/numpy work with small torch ops;
    torch's OpenMP pool spin-waits between its parallel regions and, on a shared 2-core
    machine, takes the core the test needs: the T-T/8 model's forward+backward took 0.39 s
    with one thread against 1.3-1.7 s with two, and training steps up to 25x longer
    (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
