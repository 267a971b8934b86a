"""The quantization grid, round-to-nearest with clipping, the layer error and the storage size (aptq/quantizer.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aptq.quantizer as quantizer
from aptq.quantizer import (
    CLIP_FACTORS,
    GridParams,
    QuantConfig,
    grid_params,
    group_spans,
    layer_error,
    packed_bits,
    quantize_dequantize,
    recover_codes,
    rtn,
)

GRID_CASES = settings(max_examples=40, deadline=None)


def random_weight(seed: int, d_out: int, d_in: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, d_in, generator=generator)


def spd(seed: int, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    root = torch.randn(size, size, generator=generator, dtype=torch.float64)
    return root @ root.T / size + 0.1 * torch.eye(size, dtype=torch.float64)


def grid_step(group: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Step of each row's unclipped grid, written from the definition: the range including 0 over 2^b − 1, rounded up
    to a float16 value (at most 2^-10 relative)."""
    low, high = group.min(dim=1).values.clamp(max=0), group.max(dim=1).values.clamp(min=0)
    span = 2 * torch.maximum(-low, high) if cfg.symmetric else high - low
    return span / cfg.max_level * (1 + 2 ** -10)


configs = st.builds(QuantConfig, bits=st.integers(2, 8), group_size=st.sampled_from([0, 1, 5, 8, 16, 64]),
                    symmetric=st.booleans(), clip_search=st.booleans())


# ---------------------------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("bits", [1, 9, 0, -3])
def test_bits_outside_2_to_8_are_refused(bits):
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        QuantConfig(bits)


def test_a_negative_group_size_is_refused():
    with pytest.raises(ValueError, match="group_size must be 0"):
        QuantConfig(4, -8)


def test_the_config_is_frozen_with_asymmetric_clipped_per_channel_defaults():
    cfg = QuantConfig(3)
    assert (cfg.group_size, cfg.symmetric, cfg.clip_search, cfg.max_level) == (0, False, True, 7)
    with pytest.raises(AttributeError):
        cfg.bits = 4


# ---------------------------------------------------------------------------------------------------------------
# Grid invariants


@GRID_CASES
@given(cfg=configs, seed=st.integers(0, 2 ** 16), d_out=st.integers(1, 6), d_in=st.integers(1, 40))
def test_each_row_group_uses_at_most_2_to_the_b_levels(cfg, seed, d_out, d_in):
    quantized = rtn(random_weight(seed, d_out, d_in), cfg)
    for start, end in group_spans(d_in, cfg):
        for row in quantized[:, start:end]:
            assert row.unique().numel() <= 2 ** cfg.bits


@GRID_CASES
@given(bits=st.integers(2, 8), group_size=st.sampled_from([0, 3, 7, 16]), symmetric=st.booleans(),
       seed=st.integers(0, 2 ** 16), d_in=st.integers(1, 40))
def test_unclipped_rounding_is_within_half_a_step(bits, group_size, symmetric, seed, d_in):
    cfg = QuantConfig(bits, group_size, symmetric=symmetric, clip_search=False)
    weight = random_weight(seed, 5, d_in)
    error = (rtn(weight, cfg) - weight).abs()
    for start, end in group_spans(d_in, cfg):
        half_step = grid_step(weight[:, start:end], cfg).unsqueeze(1) / 2
        assert (error[:, start:end] <= half_step * (1 + 1e-5) + 1e-7).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_symmetric_grid_has_gptqs_zero_point_and_holds_zero(bits):
    cfg = QuantConfig(bits, symmetric=True, clip_search=False)
    lopsided = torch.tensor([[-0.3, 0.2, 1.0]])  # its grid is set by max |w| alone
    params = grid_params(lopsided, cfg)
    assert params.zero.item() == 2 ** (bits - 1)
    dense = torch.linspace(-1.1, 1.1, 20001).unsqueeze(0)
    levels = quantize_dequantize(dense, params, cfg).unique()
    step = params.scale.item()
    expected = step * torch.arange(-2 ** (bits - 1), 2 ** (bits - 1), dtype=torch.float32)
    assert torch.equal(levels, expected)  # one more level below zero than above, 0 among them
    assert step >= 2 * 1.0 / cfg.max_level and torch.tensor(step).half().item() == step


@pytest.mark.parametrize("group_size", [0, 8])
def test_symmetric_rounding_is_odd_except_at_the_extra_negative_level(group_size):
    cfg = QuantConfig(3, group_size, symmetric=True, clip_search=False)  # w and −w then share each grid
    weight = random_weight(1, 6, 24)
    positive, negative = rtn(weight, cfg), rtn(-weight, cfg)
    # −w rounds to −(w's level) except at −4 s, whose mirror +4 s is not on the grid (it clamps to +3 s)
    lowest = (positive == positive.min(dim=1, keepdim=True).values) | (negative == negative.min(dim=1,
                                                                                               keepdim=True).values)
    assert torch.equal(negative[~lowest], -positive[~lowest])
    assert lowest.any()


def old_asymmetric_params(low: torch.Tensor, high: torch.Tensor, cfg: QuantConfig) -> GridParams:
    """The asymmetric grid as it was before float16 scales (PIPELINE_VERSION 1), scale then rounded up to float16:
    the only change the asymmetric grid was given."""
    scale = torch.clamp((high - low) / cfg.max_level, min=quantizer.MIN_SCALE)
    half = scale.half()
    up = torch.nextafter(half, torch.full_like(half, math.inf))
    scale = torch.where(half.float() < scale, up, half).float()
    return GridParams(scale, torch.round(-low / scale))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_asymmetric_grid_is_unchanged_but_for_its_float16_scale(bits):
    weight = random_weight(bits, 32, 48) * 0.05
    cfg = QuantConfig(bits, 16)
    for factor in (1.0, 0.83):
        low, high = factor * weight.min(dim=1).values.clamp(max=0), factor * weight.max(dim=1).values.clamp(min=0)
        params, expected = quantizer._params_for_range(low, high, cfg), old_asymmetric_params(low, high, cfg)
        assert torch.equal(params.scale, expected.scale) and torch.equal(params.zero, expected.zero)
        assert torch.equal(params.scale.half().float(), params.scale)
        assert (params.scale >= (high - low) / cfg.max_level).all()  # rounded up: the range stays on the grid


@GRID_CASES
@given(cfg=configs, seed=st.integers(0, 2 ** 16), d_out=st.integers(1, 6), d_in=st.integers(1, 40))
def test_codes_recovered_from_dequantized_weights_give_them_back_exactly(cfg, seed, d_out, d_in):
    weight = random_weight(seed, d_out, d_in)
    weight[:, ::7] = 0
    quantized = rtn(weight, cfg)
    codes = recover_codes(quantized, cfg)
    assert torch.equal(codes.dequantize(), quantized)
    assert int(codes.codes.max()) <= cfg.max_level and codes.scales.dtype == torch.float16
    if cfg.symmetric:
        assert (codes.zeros == cfg.symmetric_zero).all()


@GRID_CASES
@given(cfg=configs, seed=st.integers(0, 2 ** 16), d_out=st.integers(1, 6), d_in=st.integers(1, 40),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_codes_of_weights_rounded_to_a_half_dtype_round_to_them_exactly(cfg, seed, d_out, d_in, dtype):
    """A bfloat16 or float16 model holds `s · (q − z)` rounded to its dtype (the GPU default): the recovered grid's
    values round to those weights exactly (on the quantizer's grid or another that rounds to the same values)."""
    weight = random_weight(seed, d_out, d_in) * 0.05
    weight[:, ::7] = 0
    exact = rtn(weight, cfg)
    rounded = exact.to(dtype)
    codes = recover_codes(rounded, cfg)
    assert torch.equal(codes.dequantize().to(dtype), rounded)
    assert int(codes.codes.max()) <= cfg.max_level and codes.scales.dtype == torch.float16
    if cfg.symmetric:
        assert (codes.zeros == cfg.symmetric_zero).all()


def test_half_dtype_weights_off_their_grid_have_no_codes():
    cfg = QuantConfig(4, 16)
    exact = rtn(random_weight(6, 4, 32), cfg)
    step = recover_codes(exact, cfg).scales[0, 0].float()
    for dtype in (torch.bfloat16, torch.float16):
        moved = exact.clone()
        moved[0, 3] += 0.37 * step  # between two levels, far more than the dtype's rounding
        with pytest.raises(ValueError, match="not on a 4-bit grid"):
            recover_codes(moved.to(dtype), cfg)


def test_weights_off_every_grid_have_no_codes():
    cfg = QuantConfig(3, 8)
    quantized = rtn(random_weight(5, 4, 16), cfg)
    with pytest.raises(ValueError, match="not on a 3-bit grid"):
        recover_codes(quantized + 1e-3, cfg)


def test_a_group_size_that_does_not_divide_d_in_leaves_a_shorter_last_group():
    cfg = QuantConfig(3, 16)
    weight = random_weight(2, 4, 50)
    weight[:, 48:] *= 1e-3  # the last group (2 columns) must get its own, much finer grid
    assert group_spans(50, cfg) == [(0, 16), (16, 32), (32, 48), (48, 50)]
    quantized = rtn(weight, cfg)
    torch.testing.assert_close(quantized[:, 48:], rtn(weight[:, 48:], cfg))
    torch.testing.assert_close(quantized[:, :16], rtn(weight[:, :16], cfg))
    assert (quantized[:, 48:] - weight[:, 48:]).abs().max() < 1e-3


def test_an_all_zero_row_stays_zero():
    weight = random_weight(3, 3, 12)
    weight[1] = 0
    for symmetric in (False, True):
        quantized = rtn(weight, QuantConfig(4, symmetric=symmetric))
        assert quantized[1].abs().max() < 1e-9


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_rtn_keeps_shape_and_dtype(dtype):
    weight = random_weight(4, 5, 20).to(dtype)
    quantized = rtn(weight, QuantConfig(4, 8))
    assert quantized.shape == weight.shape and quantized.dtype == dtype


# ---------------------------------------------------------------------------------------------------------------
# Clipping search


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [0, 16])
def test_clipping_never_increases_a_rows_squared_error(bits, group_size):
    weight = random_weight(5, 16, 64)
    clipped = ((rtn(weight, QuantConfig(bits, group_size)) - weight) ** 2).sum(dim=1)
    unclipped = ((rtn(weight, QuantConfig(bits, group_size, clip_search=False)) - weight) ** 2).sum(dim=1)
    assert (clipped <= unclipped * (1 + 1e-6)).all()
    if bits == 2:
        assert clipped.sum() < 0.9 * unclipped.sum()


def row_errors(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    delta = (quantized - weight).double()
    return ((delta @ hessian) * delta).sum(dim=1)


@pytest.mark.parametrize("bits", [2, 3])
def test_clipping_with_a_hessian_minimizes_each_rows_weighted_error(bits):
    weight = random_weight(6, 16, 32)
    hessian = spd(7, 32)
    cfg = QuantConfig(bits)
    with_h = row_errors(weight, rtn(weight, cfg, hessian), hessian)
    squared_only = row_errors(weight, rtn(weight, cfg), hessian)
    unclipped = row_errors(weight, rtn(weight, QuantConfig(bits, clip_search=False)), hessian)
    assert (with_h <= squared_only * (1 + 1e-5)).all()
    assert (with_h <= unclipped * (1 + 1e-5)).all()
    assert with_h.sum() < squared_only.sum()


def correlated(seed: int, d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights with correlated columns and a few large ones, and H = 2 X Xᵀ / N from correlated inputs with outlier
    channels (as in real activations), one dead."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(d_in) + 0.3 * torch.randn(d_in, d_in, generator=generator) / d_in ** 0.5
    weight = torch.randn(d_out, d_in, generator=generator) @ mixing
    weight[:, :2] *= 4
    inputs = mixing @ torch.randn(d_in, 4 * d_in, generator=generator)
    inputs[d_in // 3] *= 20
    inputs[d_in // 2] = 0
    return weight, 2 * inputs @ inputs.T / inputs.shape[1]


def brute_force_grid(block: torch.Tensor, cfg: QuantConfig, hessian: torch.Tensor | None) -> tuple[GridParams,
                                                                                                  torch.Tensor]:
    """The clipping search written from its definition: one factor at a time, the grid of each row's least error
    (float64; the first factor on ties), and every candidate's error (factors × rows)."""
    low, high = block.min(dim=1).values.clamp(max=0), block.max(dim=1).values.clamp(min=0)
    candidates, errors = [], []
    for factor in CLIP_FACTORS:
        shrink = torch.tensor(factor, dtype=block.dtype)
        params = quantizer._params_for_range(shrink * low, shrink * high, cfg)
        grid = GridParams(params.scale.unsqueeze(1), params.zero.unsqueeze(1))
        delta = (quantize_dequantize(block, grid, cfg) - block).double()
        weighted = delta if hessian is None else delta @ hessian.double()
        candidates.append(grid)
        errors.append((weighted * delta).sum(dim=1))
    errors = torch.stack(errors)
    best = errors.argmin(dim=0)
    rows = torch.arange(block.shape[0])
    scale = torch.stack([grid.scale[:, 0] for grid in candidates])[best, rows]
    zero = torch.stack([grid.zero[:, 0] for grid in candidates])[best, rows]
    return GridParams(scale.unsqueeze(1), zero.unsqueeze(1)), errors


@pytest.mark.parametrize("chunk", [None, 3000])  # None: the default chunks; 3000: chunks cut over rows and factors
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("use_hessian", [True, False])
def test_the_clipping_search_picks_the_brute_force_grid(bits, symmetric, chunk, use_hessian, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(quantizer, "CLIP_SEARCH_ELEMENTS", chunk)
    weight, hessian = correlated(bits + 10 * symmetric, 40, 48)
    cfg = QuantConfig(bits, 16, symmetric=symmetric)
    for start, end in group_spans(48, cfg):
        block, block_h = weight[:, start:end], hessian[start:end, start:end] if use_hessian else None
        fast = grid_params(block, cfg, block_h)
        expected, errors = brute_force_grid(block, cfg, block_h)
        # The fast search sums in float32 and in another order: only a near tie (within float noise) may go the
        # other way, and then the error of its grid must be the least one up to that noise.
        ordered = errors.sort(dim=0).values
        clear = ordered[1] > ordered[0] * (1 + 1e-5)
        assert clear.float().mean() > 0.9
        torch.testing.assert_close(fast.scale[clear], expected.scale[clear], rtol=0, atol=0)
        torch.testing.assert_close(fast.zero[clear], expected.zero[clear], rtol=0, atol=0)
        delta = (quantize_dequantize(block, fast, cfg) - block).double()
        fast_errors = ((delta if block_h is None else delta @ block_h.double()) * delta).sum(dim=1)
        assert (fast_errors <= ordered[0] * (1 + 1e-5) + 1e-12).all()


def test_the_per_channel_search_over_many_columns_picks_the_brute_force_grid(monkeypatch):
    monkeypatch.setattr(quantizer, "CLIP_SEARCH_ELEMENTS", 2 ** 14)  # a few rows per chunk, a few factors per chunk
    weight, hessian = correlated(99, 24, 200)
    for bits in (2, 4):
        cfg = QuantConfig(bits)
        fast = grid_params(weight, cfg, hessian)
        expected, errors = brute_force_grid(weight, cfg, hessian)
        ordered = errors.sort(dim=0).values
        clear = ordered[1] > ordered[0] * (1 + 1e-5)
        assert clear.all()
        assert torch.equal(fast.scale, expected.scale) and torch.equal(fast.zero, expected.zero)


def test_the_clipping_search_does_not_track_gradients():
    weight = random_weight(15, 6, 16).requires_grad_()
    params = grid_params(weight, QuantConfig(3, 8), spd(16, 16).float())
    assert params.scale.shape == (6, 1) and torch.isfinite(params.scale).all()
    assert not params.scale.requires_grad and not params.zero.requires_grad  # no graph kept over the candidates
    assert params.scale.grad_fn is None and params.zero.grad_fn is None


# ---------------------------------------------------------------------------------------------------------------
# Layer error


def column_major_vec(matrix: torch.Tensor) -> torch.Tensor:
    """vec(M): the columns of M stacked, so that (H ⊗ G) vec(M) = vec(G M Hᵀ)."""
    return matrix.T.reshape(-1)


def test_layer_error_is_the_trace_of_delta_h_delta_transposed():
    weight, quantized = random_weight(8, 5, 7).double(), random_weight(9, 5, 7).double()
    hessian = spd(10, 7)
    delta = quantized - weight
    assert layer_error(weight, quantized, hessian) == pytest.approx(torch.trace(delta @ hessian @ delta.T).item())


def test_the_kronecker_form_matches_the_explicit_kronecker_product():
    n_heads, head_dim, d_in = 3, 2, 4
    weight, quantized = random_weight(11, n_heads * head_dim, d_in).double(), random_weight(12, 6, d_in).double()
    hessian = spd(13, d_in)
    heads = torch.stack([spd(20 + h, head_dim) for h in range(n_heads)])
    full = torch.block_diag(*heads)
    vec = column_major_vec(quantized - weight)
    brute_force = (vec @ torch.kron(hessian, full) @ vec).item()
    assert layer_error(weight, quantized, hessian, heads) == pytest.approx(brute_force, rel=1e-12)
    assert layer_error(weight, quantized, hessian, full) == pytest.approx(brute_force, rel=1e-12)


def test_a_row_hessian_of_the_wrong_shape_is_refused():
    weight = random_weight(14, 6, 4)
    with pytest.raises(ValueError, match="n_heads · d_h = 6"):
        layer_error(weight, weight, torch.eye(4), torch.eye(4).expand(2, 4, 4))


# ---------------------------------------------------------------------------------------------------------------
# Storage


@pytest.mark.parametrize("group_size, groups_per_row", [(0, 1), (128, 1), (64, 2), (48, 3), (4096, 1)])
def test_packed_bits_count_codes_plus_fp16_scale_and_zero_per_group(group_size, groups_per_row):
    assert packed_bits(10, 128, QuantConfig(3, group_size)) == 10 * 128 * 3 + 10 * groups_per_row * 32


def test_packed_bits_per_weight_approach_the_budget_formula():
    per_weight = packed_bits(4096, 4096, QuantConfig(4, 128)) / (4096 * 4096)
    assert math.isclose(per_weight, 4 + 2 * 16 / 128)
