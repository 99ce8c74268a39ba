"""The tubelet ops' registered FLOP formulas: FlopCounterMode over the fused path counts the
MACs the reference path counts."""

import os

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("name,shape", [("T-T/8", (1, 3, 16, 24)), ("T-T/2x8", (1, 3, 4, 16, 16))])
@pytest.mark.parametrize("pixel_grad", [False, True], ids=["train", "pixel-grad"])
def test_flop_counter_counts_the_fused_path_as_the_reference_path(name, shape, pixel_grad):
    # FlopCounterMode counts matmuls; the tubelet ops' registered formulas make the fused
    # path's forward and backward (dx only when the pixels need it) count the same MACs as
    # the reference path's F.linear and its backward matmuls
    from torch.utils.flop_counter import FlopCounterMode

    from vitok_fast.model import ViTok

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels on the CPU: needs TRITON_INTERPRET=1")
    totals, per_op = {}, {}
    for use_kernels in (True, False):
        torch.manual_seed(0)
        model = ViTok.from_name(name, use_kernels=use_kernels)
        x = (torch.rand(shape) * 2 - 1).requires_grad_(pixel_grad)
        with FlopCounterMode(display=False) as counter:
            recon, posterior = model(x, sample=False)
            (recon.square().mean() + posterior.kl()).backward()
        totals[use_kernels] = counter.get_total_flops()
        per_op[use_kernels] = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert totals[True] == totals[False] > 0
    vitok_ops = {op for op in per_op[True] if op.startswith("vitok.")}
    assert vitok_ops == {"vitok.tubelet_embed", "vitok.tubelet_embed_dweight", "vitok.tubelet_unembed",
                         "vitok.tubelet_unembed_dh", "vitok.tubelet_unembed_dweight"} | (
        {"vitok.tubelet_embed_dx"} if pixel_grad else set())
