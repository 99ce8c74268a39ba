"""Test set-up. Triton kernels run on the CPU through its interpreter: the variable must be
set before triton is first imported, which is why it sits at the very top."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
