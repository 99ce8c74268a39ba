"""torch.compile of the whole model with its fused kernels on, on any machine.

The fused ops are torch.library custom ops (kernels/*.py): Dynamo records each as one node
of the graph and never traces the Triton launch inside, so the kernel path compiles with
``fullgraph=True`` on a GPU (Triton compiled) and on the CPU (Triton's interpreter, called
by the compiled graph as an opaque op). ``aot_eager`` runs the graph AOTAutograd captured
(forward and backward) with eager kernels: the same ops in the same order as eager, so
outputs and gradients must be bit-for-bit eager's. Inductor, in addition, generates code
for everything between our ops (linears, attention, the bottleneck): a different summation
order, bounded below as test_kernels_model.py bounds the kernel path against the reference.
"""

import pytest
import torch

from vitok_fast.model import ViTok

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(device, use_kernels=True):
    torch.manual_seed(0)
    return ViTok.from_name("T-T/8", use_kernels=use_kernels, attention_backend="math").to(device)


def _pixels(device, b, h, w):
    return torch.rand(b, 3, h, w, device=device) * 2 - 1


def _step(model, x):
    """One training step's forward and backward: the reconstruction, the latent mean and
    every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    recon, posterior = model(x, sample=False)
    (recon.float().square().mean() + posterior.kl()).backward()
    return [recon.detach(), posterior.mean.detach()] + [p.grad.clone() for p in model.parameters()]


def _compiled_entries(fn) -> int:
    """How many compiled graphs Dynamo holds for ``fn``'s code: 1 means no recompilation."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(fn.__code__))


def test_kernel_path_encode_decode_compiles_whole_and_equals_eager(device):
    model = _model(device)
    x = _pixels(device, 2, 32, 40)
    with torch.no_grad():
        eager = model.decode(model.encode(x).mode())
        compiled = torch.compile(lambda t: model.decode(model.encode(t).mode()), fullgraph=True,
                                 backend="aot_eager")(x)
    assert torch.equal(compiled, eager)


def test_kernel_path_training_step_compiles_whole_and_equals_eager(device):
    model = _model(device)
    x = _pixels(device, 2, 32, 32)
    eager = _step(model, x)
    compiled = _step(torch.compile(model, fullgraph=True, backend="aot_eager"), x)
    assert len(compiled) == len(eager)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


def test_kernel_path_compiles_once_for_two_input_sizes_with_dynamic_shapes(device):
    torch._dynamo.reset()
    model = _model(device)

    def encode_decode(t):
        return model.decode(model.encode(t).mode())

    compiled = torch.compile(encode_decode, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch.no_grad():
        for shape in ((2, 32, 40), (3, 48, 24)):
            x = _pixels(device, *shape)
            assert torch.equal(compiled(x), encode_decode(x))
    assert _compiled_entries(encode_decode) == 1


@pytest.mark.slow(reason="Inductor generates and compiles C++ (or Triton) for the model, forward "
                         "and backward: 1-3 min on 2 shared CPU cores")
def test_kernel_path_training_step_under_inductor_matches_eager(device):
    model = _model(device)
    x = _pixels(device, 2, 32, 32)
    eager = _step(model, x)
    compiled = _step(torch.compile(model, fullgraph=True), x)
    # fp32 throughout; Inductor reorders the sums of the ops between ours (the linears'
    # epilogues, the softmax, the KL mean), a few u32 * log2(width) each, which adds up over
    # the ~20 ops of the forward and backward chain to ~2e-5 relative; 1e-4 as in
    # test_kernels_model.py, 100x below a wrong result's error.
    for a, b in zip(compiled, eager):
        a, b = a.double(), b.double()
        assert ((a - b).norm() / b.norm().clamp_min(1e-300)).item() < 1e-4
