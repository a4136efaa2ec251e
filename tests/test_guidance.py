"""Dual classifier-free guidance: the formula and the branch layout of the UNet batch."""

import pytest
import torch

from dreampose.guidance import branch_batch, combine_guidance


def test_combine_formula_on_known_branch_values():
    f = 2
    e00, eip, ei0 = 1.0, 7.0, 3.0  # branch values: null/null, image+pose, image/null pose
    out = torch.cat([torch.full((f, 4, 3, 5), v) for v in (e00, eip, ei0)])
    eps = combine_guidance(out, f, s_image=2.5, s_pose=1.5)
    expected = e00 + 2.5 * (ei0 - e00) + 1.5 * (eip - ei0)
    assert eps.shape == (f, 4, 3, 5)
    assert torch.all(eps == expected)


def test_combine_with_one_scale_pair_per_frame():
    out = torch.cat([torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2) * 2, torch.ones(3, 1, 2, 2)])
    eps = combine_guidance(out, 3, torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 0.0, 3.0]))
    # e00 = 0, eip = 2, ei0 = 1 -> s_i * 1 + s_p * 1
    assert eps[:, 0, 0, 0].tolist() == [1.0, 1.0, 5.0]
    with pytest.raises(ValueError, match="s_image"):
        combine_guidance(out, 3, torch.ones(2), 1.0)
    with pytest.raises(ValueError, match="expected 3 x 2 frames"):
        combine_guidance(out, 2, 1.0, 1.0)


def test_scales_of_one_and_zero_select_branches():
    out = torch.randn(3 * 4, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    e = out.unflatten(0, (3, 4))
    # a + (b - a) is b up to one rounding of the larger operand (fp32)
    torch.testing.assert_close(combine_guidance(out, 4, 0.0, 0.0), e[0], rtol=0, atol=0)
    torch.testing.assert_close(combine_guidance(out, 4, 1.0, 0.0), e[2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(combine_guidance(out, 4, 1.0, 1.0), e[1], rtol=1e-6, atol=1e-6)


def test_branch_batch_layout():
    f = 2
    lat = torch.randn(f, 4, 8, 6)
    pose = torch.rand(f, 10, 8, 6) + 0.5
    cond, null = torch.ones(1, 5, 7), -torch.ones(1, 5, 7)
    x, p, ehs = branch_batch(lat, pose, cond, null)
    assert x.shape == (3 * f, 4, 8, 6) and p.shape == (3 * f, 10, 8, 6) and ehs.shape == (3 * f, 5, 7)
    for b in range(3):
        assert torch.equal(x[b * f:(b + 1) * f], lat)
    assert torch.count_nonzero(p[:f]) == 0 and torch.equal(p[f:2 * f], pose) and torch.count_nonzero(p[2 * f:]) == 0
    assert torch.all(ehs[:f] == -1) and torch.all(ehs[f:] == 1)
