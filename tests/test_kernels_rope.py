"""3D RoPE kernel against a float64 reference, on q/k as the attention layer produces them."""

import pytest
import torch

from vitok_fast.kernels import rope_3d, rope_3d_qk, rope_3d_qk_ref, rope_cos_sin, rope_split
from _kernel_bounds import DTYPES, STORE_ULP, assert_within, fp32_bound

pytestmark = pytest.mark.usefixtures("one_thread")

# (batch, heads, head size, token grid): head sizes 64 (12/10/10 pairs), 72 (12/12/12), 20
# (4/3/3); token counts 1, 7 and 130
CASES = [(1, 1, 64, (1, 1, 1)), (2, 3, 72, (1, 1, 7)), (1, 2, 20, (2, 5, 13))]


def _rope64(x, cos, sin):
    P = x.shape[-1] // 2
    x1, x2 = x[..., :P], x[..., P:]
    c, s = cos.double(), sin.double()
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _scale(x):
    """|x1| + |x2| for both halves: the magnitude of the two terms of each output."""
    P = x.shape[-1] // 2
    mag = x[..., :P].abs() + x[..., P:].abs()
    return torch.cat((mag, mag), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_rope_qk_on_packed_qkv_views_matches_float64_reference(case, dtype, device):
    B, H, D, grid = case
    N = grid[0] * grid[1] * grid[2]
    qkv = torch.randn(B, N, 3, H, D, device=device).to(dtype).requires_grad_()
    q, k, _ = qkv.permute(2, 0, 3, 1, 4)  # (B, H, N, D) views, as in model.Attention
    assert not q.is_contiguous() or B * H * N == 1
    cos, sin = rope_cos_sin(grid, D, device=device)
    qo, ko = rope_3d_qk(q, k, cos, sin)
    assert qo.is_contiguous() and ko.is_contiguous() and qo.dtype == dtype
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    (dqkv,) = torch.autograd.grad((qo, ko), (qkv,), (dq, dk))
    store = STORE_ULP[dtype]
    for name, out, x in (("q", qo, q), ("k", ko, k)):
        x64 = x.detach().double()
        assert_within(out, _rope64(x64, cos, sin), rel=store,
                      abs_=fp32_bound(2, 1) * _scale(x64), what=f"rope {name}")
    # backward: the inverse rotation of the incoming gradient (rotation by -angle)
    dq_in, dk_in, dv_in = dqkv.permute(2, 0, 3, 1, 4)
    for name, out, g in (("dq", dq_in, dq), ("dk", dk_in, dk)):
        g64 = g.double()
        assert_within(out, _rope64(g64, cos, -sin), rel=store,
                      abs_=fp32_bound(2, 1) * _scale(g64), what=f"rope {name}")
    assert torch.count_nonzero(dv_in) == 0


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_rope_single_tensor_any_leading_shape(dtype, device):
    grid, D = (2, 3, 4), 64
    x = torch.randn(5, 24, D, device=device).to(dtype).requires_grad_()  # (heads, N, D), 3-d
    cos, sin = rope_cos_sin(grid, D, device=device)
    y = rope_3d(x, cos, sin)
    (dx,) = torch.autograd.grad(y, (x,), y.detach())
    x64 = x.detach().double()
    store = STORE_ULP[dtype]
    assert_within(y, _rope64(x64, cos, sin), rel=store, abs_=fp32_bound(2, 1) * _scale(x64),
                  what="rope_3d")
    # rotating back by the same angles recovers x up to the two stores' rounding
    assert_within(dx, x64, rel=3 * store, abs_=3 * store * _scale(x64), what="inverse rotation")


def test_rope_kernel_equals_reference_path_in_fp32(device):
    q, k = torch.randn(2, 2, 16, 32, device=device), torch.randn(2, 2, 16, 32, device=device)
    cos, sin = rope_cos_sin((1, 4, 4), 32, device=device)
    for out, ref, x in zip(rope_3d_qk(q, k, cos, sin), rope_3d_qk_ref(q, k, cos, sin), (q, k)):
        assert_within(out, ref, rel=2 * fp32_bound(2, 1), abs_=2 * fp32_bound(2, 1) * _scale(x.double()),
                      what="vs rope_3d_qk_ref")


def test_rope_split_follows_spec():
    # docs/design.md (3D RoPE): t gets P - 2(P//3) pairs, h and w P//3 each
    assert rope_split(64) == (12, 10, 10)
    assert rope_split(72) == (12, 12, 12)


def test_rope_rejects_mismatched_tables(device):
    cos, sin = rope_cos_sin((1, 2, 2), 32, device=device)
    with pytest.raises(ValueError, match=r"cos of shape \(N, D/2\)"):
        rope_3d(torch.randn(1, 5, 32, device=device), cos, sin)
    with pytest.raises(ValueError, match="fp32"):
        rope_3d(torch.randn(1, 4, 32, device=device), cos.double(), sin.double())
