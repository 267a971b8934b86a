"""The wavefront BoA (aptq.gptq._boa_rows) against the row-by-row BoA it replaced, kept here as the reference."""

from __future__ import annotations

import pytest
import torch

from aptq.gptq import _prepare_walk, _quantize_rows, _row_compensation, gptq_rows
from aptq.quantizer import QuantConfig


def reference_boa(W, H, G_heads, cfg, block_size=128, act_order=False, damp=0.01):
    """Row r of every head by the column walk, then its error compensated in rows r+1… (the previous code)."""
    walk = _prepare_walk(H, act_order, damp)
    coefficients, _ = _row_compensation(G_heads, damp, "reference")
    n_heads, head_dim, _ = G_heads.shape
    by_head = W.float().reshape(n_heads, head_dim, -1).clone()
    quantized = torch.empty_like(by_head)
    for r in range(head_dim):
        quantized[:, r] = _quantize_rows(by_head[:, r], walk, cfg, block_size)
        row_error = by_head[:, r] - quantized[:, r]
        by_head[:, r + 1:] -= coefficients[:, r, r + 1:].unsqueeze(-1) * row_error.unsqueeze(1)
    return quantized.reshape(W.shape)


def _problem(seed: int, n_heads: int, head_dim: int, d_in: int, dead: int = 0):
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(n_heads * head_dim, d_in, generator=generator)
    X = torch.randn(4 * d_in, d_in, generator=generator) * torch.linspace(0.2, 2, d_in)
    X[:, :dead] = 0  # dead input columns
    H = 2 * X.T @ X / X.shape[0]
    A = torch.randn(n_heads, head_dim, 3 * head_dim, generator=generator)
    G = A @ A.transpose(1, 2) / A.shape[-1]
    return W, H, G


@pytest.mark.parametrize("group, act_order, symmetric, d_in, dead", [
    (16, False, False, 48, 0),   # three full groups: a real wavefront
    (16, False, True, 50, 3),    # a narrower last group, dead columns, symmetric grid
    (0, False, False, 40, 0),    # per channel: one tile per row
    (16, True, False, 48, 2),    # act-order, static groups
])
def test_wavefront_boa_equals_row_by_row_boa(group, act_order, symmetric, d_in, dead):
    W, H, G = _problem(group + d_in, n_heads=3, head_dim=8, d_in=d_in, dead=dead)
    cfg = QuantConfig(3, group, symmetric=symmetric)
    expected = reference_boa(W, H, G, cfg, block_size=32, act_order=act_order)
    result = gptq_rows(W, H, G, cfg, block_size=32, act_order=act_order)
    torch.testing.assert_close(result.weight, expected, rtol=1e-5, atol=1e-5)
