"""Relative position bias tables resized for another patch grid: the official BEiT cubic recipe, and timm's
linear resize as the fallback without scipy.

The reference below is the official loader's code (BEiT ``run_class_finetuning.py``, FD ``utils.py``) written
out line by line, with ``RectBivariateSpline(kx=3, ky=3, s=0)`` in place of the removed
``interp2d(kind='cubic')``, which computed the same spline on a grid.
"""
from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
from timm.layers import resize_rel_pos_bias_table

from fdfast.interop.conversion import resize_rel_pos_table

HEADS = 3


def smooth_table(window: int) -> torch.Tensor:
    """A (2W-1)^2 + 3 row table sampled from a smooth function of the (dy, dx) offset, per head."""
    offsets = torch.arange(-(window - 1), window, dtype=torch.float64)
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    heads = [torch.sin(0.35 * dy + 0.5 * h) * torch.cos(0.2 * dx) + 0.05 * dx * h for h in range(HEADS)]
    spatial = torch.stack([h.reshape(-1) for h in heads], dim=1)
    cls_rows = torch.tensor([[0.7, -0.3, 0.1], [0.2, 0.9, -0.5], [-1.0, 0.4, 0.6]], dtype=torch.float64)
    return torch.cat([spatial, cls_rows]).float()


def official_resize(rel_pos_bias: torch.Tensor, src_size: int, dst_size: int, num_extra_tokens: int = 3):
    from scipy.interpolate import RectBivariateSpline

    extra_tokens = rel_pos_bias[-num_extra_tokens:, :]
    rel_pos_bias = rel_pos_bias[:-num_extra_tokens, :]

    def geometric_progression(a, r, n):
        return a * (1.0 - r ** n) / (1.0 - r)

    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        gp = geometric_progression(1, q, src_size // 2)
        if gp > dst_size // 2:
            right = q
        else:
            left = q
    dis = []
    cur = 1
    for i in range(src_size // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    r_ids = [-_ for _ in reversed(dis)]
    x = r_ids + [0] + dis
    y = r_ids + [0] + dis
    t = dst_size // 2.0
    dx = np.arange(-t, t + 0.1, 1.0)
    dy = np.arange(-t, t + 0.1, 1.0)
    all_rel_pos_bias = []
    for i in range(rel_pos_bias.shape[1]):
        z = rel_pos_bias[:, i].view(src_size, src_size).float().numpy()
        f = RectBivariateSpline(y, x, z, kx=3, ky=3, s=0)  # interp2d(x, y, z, kind='cubic')
        all_rel_pos_bias.append(torch.Tensor(f(dy, dx)).contiguous().view(-1, 1))
    return torch.cat((torch.cat(all_rel_pos_bias, dim=-1), extra_tokens), dim=0)


@pytest.mark.parametrize("src_window, dst_window", [(4, 6), (7, 12), (14, 16)])  # the last: 224 -> 256 at /14
def test_cubic_resize_is_the_official_recipe(src_window, dst_window):
    pytest.importorskip("scipy", reason="scipy (the 'test' extra) computes the official cubic interpolation")
    table = smooth_table(src_window)
    dst_rows = (2 * dst_window - 1) ** 2 + 3
    got = resize_rel_pos_table(table, (dst_window, dst_window), (dst_rows, HEADS))
    want = official_resize(table, 2 * src_window - 1, 2 * dst_window - 1)
    assert got.shape == want.shape == (dst_rows, HEADS) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert torch.equal(got[-3:], table[-3:])  # CLS rows carried over
    linear = resize_rel_pos_bias_table(table, new_window_size=(dst_window, dst_window),
                                       new_bias_shape=(dst_rows, HEADS))
    assert (got - linear).abs().max() > 1e-3  # not vacuous: cubic and linear differ on this table


def test_without_scipy_the_linear_fallback_is_used_and_said(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "scipy.interpolate", None)  # the import fails as if scipy were absent
    table = smooth_table(4)
    with caplog.at_level(logging.WARNING, logger="fdfast.interop.conversion"):
        got = resize_rel_pos_table(table, (6, 6), (124, HEADS))
    want = resize_rel_pos_bias_table(table, new_window_size=(6, 6), new_bias_shape=(124, HEADS))
    assert torch.equal(got, want)
    assert any("scipy is not installed" in r.getMessage() and "linear" in r.getMessage() for r in caplog.records)


def test_same_grid_and_bad_tables():
    table = smooth_table(4)
    assert resize_rel_pos_table(table, (4, 4), table.shape) is table
    with pytest.raises(ValueError, match="not a square grid"):
        resize_rel_pos_table(table[:-1], (6, 6), (124, HEADS))
