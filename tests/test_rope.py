"""3D RoPE properties (docs/design.md section 4)."""

import pytest
import torch

from vitok_fast.kernels import rope_3d_ref, rope_angles, rope_cos_sin, rope_split


@pytest.mark.parametrize("head_dim,split", [(64, (12, 10, 10)), (72, (12, 12, 12)), (32, (6, 5, 5))])
def test_pairs_split_over_t_h_w(head_dim, split):
    assert rope_split(head_dim) == split


def test_frequencies_and_positions():
    grid, D = (3, 4, 5), 64
    angles = rope_angles(grid, D, dtype=torch.float64)
    nt, nh, nw = rope_split(D)
    index = lambda t, h, w: (t * grid[1] + h) * grid[2] + w
    for axis, (n, start) in enumerate(((nt, 0), (nh, nt), (nw, nt + nh))):
        pos = [0, 0, 0]
        pos[axis] = 2
        freq = 10000.0 ** (-torch.arange(n, dtype=torch.float64) / n)
        row = angles[index(*pos)]
        torch.testing.assert_close(row[start:start + n], 2 * freq, rtol=1e-14, atol=0)
        others = torch.cat([row[:start], row[start + n:]])
        assert torch.count_nonzero(others) == 0  # the other axes are at position 0


def test_rotate_half_layout():
    x = torch.randn(1, 1, 60, 64, dtype=torch.float64)
    cos, sin = rope_cos_sin((3, 4, 5), 64)
    out = rope_3d_ref(x, cos.double(), sin.double())
    P = 32
    j = 7
    torch.testing.assert_close(out[..., j], x[..., j] * cos[:, j] - x[..., j + P] * sin[:, j])
    torch.testing.assert_close(out[..., j + P], x[..., j + P] * cos[:, j] + x[..., j] * sin[:, j])


def test_rotation_preserves_norms():
    x = torch.randn(2, 3, 4 * 6 * 7, 72, dtype=torch.float64)
    angles = rope_angles((4, 6, 7), 72, dtype=torch.float64)
    out = rope_3d_ref(x, angles.cos(), angles.sin())
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    assert not torch.allclose(out, x)  # it did rotate
    # The model's fp32 tables: cos^2 + sin^2 = 1 up to a few fp32 ulps (2^-23 ~ 1.2e-7).
    cos, sin = rope_cos_sin((4, 6, 7), 72)
    out = rope_3d_ref(x, cos.double(), sin.double())
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=3e-7, atol=0)


def test_position_zero_is_identity():
    x = torch.randn(1, 2, 2 * 3 * 3, 64, dtype=torch.float64)
    cos, sin = rope_cos_sin((2, 3, 3), 64)
    out = rope_3d_ref(x, cos.double(), sin.double())
    assert torch.equal(out[:, :, 0], x[:, :, 0])


def test_score_depends_only_on_position_difference():
    grid, D = (6, 6, 6), 64
    cos, sin = rope_cos_sin(grid, D, dtype=torch.float64)
    index = lambda t, h, w: (t * grid[1] + h) * grid[2] + w
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)

    def score(pq, pk):
        rq = rope_3d_ref(q[None], cos[index(*pq)][None], sin[index(*pq)][None])[0]
        rk = rope_3d_ref(k[None], cos[index(*pk)][None], sin[index(*pk)][None])[0]
        return (rq @ rk).item()

    base = score((1, 2, 0), (0, 1, 3))
    for shift in ((1, 0, 0), (2, 1, 0), (0, 2, 2), (3, 3, 1)):
        moved = score(tuple(a + s for a, s in zip((1, 2, 0), shift)),
                      tuple(a + s for a, s in zip((0, 1, 3), shift)))
        assert abs(moved - base) < 1e-10
    # ...and it does depend on the difference along each axis.
    for other in ((2, 2, 0), (1, 3, 0), (1, 2, 1)):
        assert abs(score(other, (0, 1, 3)) - base) > 1e-6


def test_images_use_only_t_zero():
    nt = rope_split(64)[0]
    angles = rope_angles((1, 8, 8), 64)
    assert torch.count_nonzero(angles[:, :nt]) == 0
    assert torch.count_nonzero(angles[:, nt:]) > 0


def test_model_builds_image_rope_grid_with_one_frame(monkeypatch):
    from vitok_fast import ViTok, model as model_module
    seen = []
    real = model_module.rope_cos_sin
    monkeypatch.setattr(model_module, "rope_cos_sin",
                        lambda grid, *a, **k: seen.append(tuple(grid)) or real(grid, *a, **k))
    ViTok.from_name("T-T/8", use_kernels=False)(torch.rand(1, 3, 16, 24) * 2 - 1)
    assert seen == [(1, 2, 3), (1, 2, 3)]  # encoder and decoder, t = 0 only
