"""Guidance formulas against hand-computed values."""

import torch

from engine.guidance import cfg, dual_cfg


def test_cfg_hand_computed():
    u, c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    # u + 2.5 * (c - u) = [1 + 5, -2 + 5]
    assert torch.equal(cfg(u, c, 2.5), torch.tensor([6.0, 3.0]))
    assert torch.equal(cfg(u, c, 1.0), c)
    assert torch.equal(cfg(u, c, 0.0), u)


def test_dual_cfg_hand_computed():
    e00, e0i, eti = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([5.0])
    # 1 + 1.5 * (2 - 1) + 7.5 * (5 - 2) = 1 + 1.5 + 22.5 = 25
    out = dual_cfg(e00, e0i, eti, text_scale=7.5, image_scale=1.5)
    assert torch.equal(out, torch.tensor([25.0]))


def test_dual_cfg_scales_one_is_fully_conditioned():
    g = torch.Generator().manual_seed(0)
    e00, e0i, eti = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    out = dual_cfg(e00, e0i, eti, text_scale=1.0, image_scale=1.0)
    torch.testing.assert_close(out, eti)


def test_dual_cfg_zero_text_scale_ignores_text():
    g = torch.Generator().manual_seed(1)
    e00, e0i, eti = (torch.randn(3, generator=g) for _ in range(3))
    torch.testing.assert_close(dual_cfg(e00, e0i, eti, text_scale=0.0, image_scale=1.0), e0i)


def test_dual_cfg_per_item_scales_broadcast():
    e00 = torch.zeros(2, 1, 1, 1)
    e0i = torch.ones(2, 1, 1, 1)
    eti = 3 * torch.ones(2, 1, 1, 1)
    s_txt = torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1)
    out = dual_cfg(e00, e0i, eti, text_scale=s_txt, image_scale=1.0)
    assert out.flatten().tolist() == [3.0, 5.0]
