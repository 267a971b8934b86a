"""The wavefront BoA (aptq.gptq._boa_rows) against the row-by-row BoA it replaced, kept here as the reference; the
walk that q and k share against one walk each."""

from __future__ import annotations

import pytest
import torch

from aptq.aespa import AespaOptions
from aptq.gptq import _prepare_walk, _quantize_rows, _row_compensation, gptq_rows, gptq_rows_shared
from aptq.hessian import BlockHessians
from aptq.models import get_weight
from aptq.pipeline import QuantizeSettings, _quantize_block, quantize_layer, shared_row_walks
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


@pytest.mark.parametrize("group, act_order", [(16, False), (16, True), (0, False)])
def test_a_shared_walk_gives_each_layer_its_own_walks_result(group, act_order):
    """q (4 heads) and k (2 heads) of one input in one walk: each layer's gptq_rows, loss included."""
    W_q, H, G_q = _problem(60 + group, n_heads=4, head_dim=8, d_in=48, dead=2)
    W_k, _, G_k = _problem(61 + group, n_heads=2, head_dim=8, d_in=48)
    cfg = QuantConfig(3, group)
    shared = gptq_rows_shared([(W_q, G_q), (W_k, G_k)], H, cfg, act_order=act_order)
    for (W, G), result in zip([(W_q, G_q), (W_k, G_k)], shared):
        alone = gptq_rows(W, H, G, cfg, act_order=act_order)
        torch.testing.assert_close(result.weight, alone.weight, rtol=1e-5, atol=1e-5)
        assert result.loss == pytest.approx(alone.loss, rel=1e-5)
    with pytest.raises(ValueError, match="one d_h for every layer"):
        gptq_rows_shared([(W_q, G_q), (W_k[:4], G_k[:, :2, :2])], H, cfg)


@pytest.mark.parametrize("method", ["attention", "aespa"])
def test_the_pipeline_walks_q_and_k_together_with_each_ones_result(tiny_model, method):
    """A block's q and k of one width: the shared walk's results are each layer's own quantization (full-precision
    targets on, so each walk fits its layer's W*); of two widths, each walks alone."""
    model, arch = tiny_model("llama")
    layers = {layer.kind: layer for layer in arch.block_layers(0)}
    d_in, head_dim = get_weight(model, layers["q"]).shape[1], arch.head_dim
    H = 2 * torch.eye(d_in) + torch.ones(d_in, d_in) / d_in
    rows = {kind: _problem(70 + n, n_heads=n, head_dim=head_dim, d_in=d_in)[2]
            for kind, n in (("q", arch.n_heads), ("k", arch.n_kv_heads))}
    hessians = BlockHessians(0, 64, {layers[k].name: H for k in ("q", "k")},
                             row={layers[k].name: rows[k] for k in ("q", "k")})
    mismatch = {layers[k].name: 0.1 * torch.randn(d_in, d_in, generator=torch.Generator().manual_seed(5))
                for k in ("q", "k")}
    settings = QuantizeSettings(method, 16, fp_targets=0.5, aespa=AespaOptions(iterations=20))
    for widths in ((3, 3), (3, 2)):
        todo = [(layers["q"], widths[0]), (layers["k"], widths[1])]
        assert bool(shared_row_walks(model, todo, hessians, settings, mismatch)) == (widths[0] == widths[1])
        together, _ = _quantize_block(model, todo, hessians, settings, mismatch=mismatch)
        for layer, bits in todo:
            alone = quantize_layer(get_weight(model, layer).detach(), layer, hessians, QuantConfig(bits, 16), settings,
                                   mismatch=mismatch[layer.name])[0]
            torch.testing.assert_close(together[layer.name], alone, rtol=1e-5, atol=1e-5)
