"""GPTQ and its attention-aware variants (aptq/gptq.py), against RTN, a textbook GPTQ and each other."""

from __future__ import annotations

import warnings

import pytest
import torch

from aptq import quantizer
from aptq.aespa import out_row_factor
from aptq.errors import UserError
from aptq.gptq import gptq, gptq_per_head, gptq_rows
from aptq.hessian import BlockHessians
from aptq.models import LinearLayer, get_weight
from aptq.pipeline import QuantizeSettings, quantize_layer, shrunk_row_hessians, shrunk_value_hessians
from aptq.quantizer import GridParams, QuantConfig, layer_error, recover_codes, rtn

D_OUT, D_IN, N_TOKENS = 24, 64, 512


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated_hessian(seed: int, d_in: int = D_IN, n_tokens: int = N_TOKENS) -> torch.Tensor:
    """`H = 2/N X Xᵀ` for inputs X = mixing @ noise, with uneven column scales so that the inputs are correlated."""
    g = generator(seed)
    mixing = torch.randn(d_in, d_in, generator=g) * torch.rand(d_in, generator=g) * 2
    inputs = mixing @ torch.randn(d_in, n_tokens, generator=g)
    return 2 / n_tokens * inputs @ inputs.T


def random_weight(seed: int, d_out: int = D_OUT, d_in: int = D_IN) -> torch.Tensor:
    return torch.randn(d_out, d_in, generator=generator(seed))


def random_spd(seed: int, size: int) -> torch.Tensor:
    """A well-conditioned but strongly correlated SPD matrix."""
    root = torch.randn(size, size, generator=generator(seed)) + 2 * torch.ones(size, size)
    return root @ root.T / size + 0.05 * torch.eye(size)


def indefinite_hessian(d_in: int) -> torch.Tensor:
    """Symmetric, finite, with eigenvalues −99 that no damping of up to 10 · mean(diag H) can lift."""
    pair = torch.tensor([[1.0, 100.0], [100.0, 1.0]])
    return torch.block_diag(*[pair] * (d_in // 2))


# ---------------------------------------------------------------------------------------------------------------
# A textbook GPTQ: no blocks, no lazy updates, the inverse Hessian updated explicitly after every column


def textbook_gptq(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, act_order: bool = False,
                  damp: float = 0.01) -> torch.Tensor:
    """Column by column in float64: quantize, spread `(w_j − q_j) / [H⁻¹]_jj · [H⁻¹]_j,:` over the later columns,
    then remove column j from the inverse (OBQ's rank-one update). Grids as documented in aptq/gptq.py: per group at
    its first column on the updated weights; with act-order per static group, up front."""
    H = H.double() + damp * H.diagonal().mean().double() * torch.eye(H.shape[0], dtype=torch.float64)
    n_cols = W.shape[1]
    order = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(n_cols)
    static = _static_grids(W.double(), cfg) if act_order else None
    weights = W.double()[:, order].clone()
    inverse = torch.linalg.inv(H[order][:, order])
    quantized = torch.empty_like(weights)
    width = quantizer.group_width(n_cols, cfg)
    for j in range(n_cols):
        if static is not None:
            params = static[order[j].item()]
        elif j % width == 0:
            params = quantizer.grid_params(weights[:, j:j + width], cfg)
        quantized[:, j:j + 1] = quantizer.quantize_dequantize(weights[:, j:j + 1], params, cfg)
        error = (weights[:, j] - quantized[:, j]) / inverse[j, j]
        weights[:, j + 1:] -= torch.outer(error, inverse[j, j + 1:])
        inverse = inverse - torch.outer(inverse[:, j], inverse[j, :]) / inverse[j, j]
    return quantized[:, torch.argsort(order)]


def _static_grids(W: torch.Tensor, cfg: QuantConfig) -> dict[int, GridParams]:
    grids = {}
    for start, end in quantizer.group_spans(W.shape[1], cfg):
        params = quantizer.grid_params(W[:, start:end], cfg)
        grids.update({column: params for column in range(start, end)})
    return grids


# ---------------------------------------------------------------------------------------------------------------
# Plain GPTQ


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [0, 16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_round_to_nearest(bits, group_size, act_order):
    weight, hessian = random_weight(0), correlated_hessian(1)
    cfg = QuantConfig(bits, group_size)
    result = gptq(weight, hessian, cfg, block_size=32, act_order=act_order)
    rtn_loss = layer_error(weight, rtn(weight, cfg, hessian), hessian)
    assert result.fallback is None
    assert result.loss == pytest.approx(layer_error(weight, result.weight, hessian))
    assert result.loss < 0.9 * rtn_loss


@pytest.mark.parametrize("bits, group_size, symmetric, act_order", [
    (3, 0, False, False),
    (2, 24, False, False),  # groups straddle the blocks of 16 columns
    (4, 20, True, False),  # the last group is shorter
    (3, 0, False, True),
    (4, 16, False, True),
])
def test_blocked_gptq_matches_the_textbook_algorithm(bits, group_size, symmetric, act_order):
    weight, hessian = random_weight(2), correlated_hessian(3)
    cfg = QuantConfig(bits, group_size, symmetric=symmetric, clip_search=False)
    result = gptq(weight, hessian, cfg, block_size=16, act_order=act_order)
    reference = layer_error(weight, textbook_gptq(weight, hessian, cfg, act_order), hessian)
    assert result.loss == pytest.approx(reference, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gptq_returns_the_dtype_of_w_and_scores_what_it_returns(dtype):
    weight, hessian = random_weight(4).to(dtype), correlated_hessian(5)
    result = gptq(weight, hessian, QuantConfig(4, 16))
    assert result.weight.dtype == dtype and result.weight.shape == weight.shape
    assert result.loss == pytest.approx(layer_error(weight, result.weight, hessian))


@pytest.mark.parametrize("with_rows", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_dead_columns_are_zeroed(symmetric, act_order, with_rows):
    """Plain GPTQ, and BoA on v's heads (each head's walk with its own dead columns)."""
    g = generator(6)
    inputs = torch.randn(D_IN, N_TOKENS, generator=g)
    dead = [3, 10, 40]
    inputs[dead] = 0
    hessian = 2 / N_TOKENS * inputs @ inputs.T
    weight = random_weight(7)
    cfg = QuantConfig(3, 16, symmetric=symmetric)
    heads = torch.stack([hessian * (1 + h) for h in range(N_HEADS)])
    rows = row_hessians(8) if with_rows else torch.eye(HEAD_DIM).expand(N_HEADS, HEAD_DIM, HEAD_DIM)
    if with_rows:
        result = gptq_per_head(weight, heads, cfg, act_order=act_order, row_factors=rows)
    else:
        result = gptq(weight, hessian, cfg, act_order=act_order)
    assert result.fallback is None and torch.isfinite(result.weight).all()
    assert (result.weight[:, dead] == 0).all()
    assert result.loss < per_head_loss(weight, rtn(weight, cfg, hessian), heads if with_rows else
                                       hessian.expand(N_HEADS, D_IN, D_IN), rows)


def test_a_hessian_that_needs_more_damping_is_damped_more_without_falling_back():
    g = generator(8)
    inputs = torch.randn(D_IN, D_IN // 2, generator=g)  # rank D_IN / 2: H has a null space
    hessian = inputs @ inputs.T
    null_direction = torch.linalg.svd(inputs).U[:, -1]
    hessian -= 0.05 * hessian.diagonal().mean() * torch.outer(null_direction, null_direction)  # eigenvalue −5 % of mean
    weight = random_weight(9)
    cfg = QuantConfig(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = gptq(weight, hessian, cfg)
    assert result.fallback is None
    assert result.loss < layer_error(weight, rtn(weight, cfg, hessian), hessian)


def test_a_hessian_that_cannot_be_factored_falls_back_to_round_to_nearest():
    weight, cfg = random_weight(10), QuantConfig(3, 16)
    with pytest.warns(RuntimeWarning, match="round-to-nearest for block 3 q_proj"):
        result = gptq(weight, indefinite_hessian(D_IN), cfg, name="block 3 q_proj")
    assert "block 3 q_proj" in result.fallback
    torch.testing.assert_close(result.weight, rtn(weight, cfg))


def test_inputs_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="Hessian must be 64 × 64"):
        gptq(random_weight(11), torch.eye(32), QuantConfig(4))
    with pytest.raises(ValueError, match="n_heads · d_h = d_out = 24"):
        gptq_rows(random_weight(11), torch.eye(D_IN), torch.eye(5).expand(4, 5, 5), QuantConfig(4))
    with pytest.raises(ValueError, match="n_kv_heads dividing d_out = 24"):
        gptq_per_head(random_weight(11), torch.eye(D_IN).expand(5, D_IN, D_IN), QuantConfig(4))


# ---------------------------------------------------------------------------------------------------------------
# Attention-aware variants

N_HEADS, HEAD_DIM = 4, 6  # D_OUT = 24 rows, ordered head by head


def head_hessians(seed: int) -> torch.Tensor:
    return torch.stack([correlated_hessian(seed + h) for h in range(N_HEADS)])


def row_hessians(seed: int) -> torch.Tensor:
    return torch.stack([random_spd(seed + h, HEAD_DIM) for h in range(N_HEADS)])


def per_head_loss(W: torch.Tensor, Wq: torch.Tensor, H_heads: torch.Tensor, rows: torch.Tensor | None = None,
                  head_dim: int = HEAD_DIM) -> float:
    """`Σ_h tr(R_h ΔW_h H_h ΔW_hᵀ)` (R_h = I without `rows`)."""
    return sum(layer_error(W[h * head_dim:(h + 1) * head_dim], Wq[h * head_dim:(h + 1) * head_dim], H_heads[h],
                           None if rows is None else rows[h]) for h in range(H_heads.shape[0]))


@pytest.mark.parametrize("kind", ["q/k", "v"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits, group_size", [(2, 0), (3, 16), (4, 0)])
def test_row_compensation_lowers_the_kronecker_objective(bits, group_size, act_order, kind):
    """Against the column-only GPTQ on the same inputs: q/k share one H (G per head); v has H_V and R per KV head."""
    weight, rows = random_weight(12), row_hessians(14)
    cfg, options = QuantConfig(bits, group_size), dict(block_size=32, act_order=act_order)
    if kind == "q/k":
        columns = correlated_hessian(13).expand(N_HEADS, D_IN, D_IN)
        boa = gptq_rows(weight, columns[0], rows, cfg, **options)
        plain = gptq(weight, columns[0], cfg, **options)
    else:
        columns = head_hessians(13)
        boa = gptq_per_head(weight, columns, cfg, row_factors=rows, **options)
        plain = gptq_per_head(weight, columns, cfg, **options)
    assert boa.fallback is None
    assert boa.loss == pytest.approx(per_head_loss(weight, boa.weight, columns, rows))
    assert boa.loss < 0.95 * per_head_loss(weight, plain.weight, columns, rows)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("kind", ["q/k", "v"])
def test_act_order_with_row_compensation_stays_on_one_grid_per_row_group(kind, symmetric):
    """Static groups: however the walk visits the columns and rows are compensated, every row-group of the result is
    one grid of the configuration (its codes read back and dequantized give the weights exactly)."""
    weight, rows, cfg = random_weight(30), row_hessians(31), QuantConfig(3, 16, symmetric=symmetric)
    if kind == "q/k":
        result = gptq_rows(weight, correlated_hessian(32), rows, cfg, act_order=True)
    else:
        result = gptq_per_head(weight, head_hessians(32), cfg, act_order=True, row_factors=rows)
    torch.testing.assert_close(recover_codes(result.weight, cfg).dequantize(), result.weight, rtol=0, atol=0)


def test_row_compensation_with_identity_row_hessians_is_plain_gptq():
    weight, hessian = random_weight(15), correlated_hessian(16)
    cfg = QuantConfig(3, 16)
    identity = torch.eye(HEAD_DIM).expand(N_HEADS, HEAD_DIM, HEAD_DIM)
    boa = gptq_rows(weight, hessian, identity, cfg, block_size=32)
    plain = gptq(weight, hessian, cfg, block_size=32)
    torch.testing.assert_close(boa.weight, plain.weight)
    assert boa.loss == pytest.approx(plain.loss, rel=1e-5)


def test_row_compensation_falls_back_when_h_cannot_be_factored():
    weight, cfg = random_weight(17), QuantConfig(4)
    with pytest.warns(RuntimeWarning, match="round-to-nearest for block 0 k_proj"):
        result = gptq_rows(weight, indefinite_hessian(D_IN), row_hessians(18), cfg, name="block 0 k_proj")
    torch.testing.assert_close(result.weight, rtn(weight, cfg))


def test_a_head_whose_row_hessian_cannot_be_factored_gets_no_row_compensation():
    weight, hessian, cfg = random_weight(19), correlated_hessian(20), QuantConfig(3)
    rows = row_hessians(21)
    rows[2] = indefinite_hessian(HEAD_DIM)
    with pytest.warns(RuntimeWarning, match=r"heads \[2\]"):
        result = gptq_rows(weight, hessian, rows, cfg, block_size=32)
    plain = gptq(weight, hessian, cfg, block_size=32)
    torch.testing.assert_close(result.weight[2 * HEAD_DIM:3 * HEAD_DIM], plain.weight[2 * HEAD_DIM:3 * HEAD_DIM])
    assert "heads [2]" in result.fallback


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits, group_size", [(2, 0), (3, 16), (4, 0)])
def test_head_hessians_lower_the_value_objective(bits, group_size, act_order):
    weight, heads = random_weight(22), head_hessians(23)
    cfg = QuantConfig(bits, group_size)
    per_head = gptq_per_head(weight, heads, cfg, block_size=32, act_order=act_order)
    averaged = gptq(weight, heads.mean(dim=0), cfg, block_size=32, act_order=act_order)
    assert per_head.fallback is None
    assert per_head.loss == pytest.approx(per_head_loss(weight, per_head.weight, heads))
    assert per_head.loss < 0.95 * per_head_loss(weight, averaged.weight, heads)


def test_equal_head_hessians_give_plain_gptq():
    weight, hessian = random_weight(24), correlated_hessian(25)
    cfg = QuantConfig(3, 16)
    per_head = gptq_per_head(weight, hessian.expand(N_HEADS, D_IN, D_IN), cfg, block_size=32)
    torch.testing.assert_close(per_head.weight, gptq(weight, hessian, cfg, block_size=32).weight)


@pytest.mark.parametrize("with_rows", [False, True])
def test_only_the_head_whose_hessian_cannot_be_factored_falls_back(with_rows):
    weight, cfg = random_weight(26), QuantConfig(3)
    heads, rows = head_hessians(27), row_hessians(28) if with_rows else None
    heads[1] = indefinite_hessian(D_IN)
    with pytest.warns(RuntimeWarning, match=r"round-to-nearest for v_proj \(head 1\)"):
        result = gptq_per_head(weight, heads, cfg, name="v_proj", row_factors=rows)
    second = slice(HEAD_DIM, 2 * HEAD_DIM)
    torch.testing.assert_close(result.weight[second], rtn(weight[second], cfg))
    assert "head 1" in result.fallback and "head 0" not in result.fallback
    head_0 = gptq_per_head(weight[:HEAD_DIM], heads[:1], cfg, row_factors=None if rows is None else rows[:1])
    torch.testing.assert_close(result.weight[:HEAD_DIM], head_0.weight)


def kronecker_obs(W: torch.Tensor, H: torch.Tensor, G_heads: torch.Tensor, cfg: QuantConfig, damp: float = 0.01,
                  act_order: bool = False) -> torch.Tensor:
    """Element-wise OBS on the full Hessian `K` of `Σ_h tr(G_h ΔW_h H_h ΔW_hᵀ)` (block-diagonal over heads, each block
    `G_h ⊗ H_h`; H one matrix shared by all heads or one per head), in float64: weights one at a time in BoA's order
    (row r of every head, its columns left to right, or by decreasing diag H_h with act-order), each error spread over
    all weights not yet quantized with the inverse of K restricted to them,
    `w_R −= (w_p − q_p) / [K_R⁻¹]_pp · [K_R⁻¹]_:p`. Grids per row and group as aptq/gptq.py: at the group's first
    column in the walk, on the weights as updated so far; with act-order (static groups) every group of the original
    column order at the row's first weight."""
    def damped(M: torch.Tensor) -> torch.Tensor:
        M = M.double()
        return M + damp * M.diagonal().mean() * torch.eye(M.shape[0], dtype=torch.float64)

    n_heads, head_dim, _ = G_heads.shape
    d_in = W.shape[1]
    column_hessians = H.expand(n_heads, d_in, d_in)
    damped_h = [damped(H_h).float() for H_h in column_hessians]  # the clipping search's weights, in float32
    kronecker = torch.block_diag(*[torch.kron(damped(G), damped(H_h)) for G, H_h in zip(G_heads, column_hessians)])
    orders = [torch.argsort(H_h.diagonal(), descending=True).tolist() if act_order else list(range(d_in))
              for H_h in column_hessians]
    weights = W.double().reshape(-1).clone()
    order = [(h * head_dim + r) * d_in + j for r in range(head_dim) for h in range(n_heads) for j in orders[h]]
    quantized = torch.empty_like(weights)
    width = quantizer.group_width(d_in, cfg)
    grids = {}
    for step, index in enumerate(order):
        row, column = divmod(index, d_in)
        head = row // head_dim
        spans = quantizer.group_spans(d_in, cfg) if act_order and column == orders[head][0] else (
            [(column, min(column + width, d_in))] if not act_order and column % width == 0 else [])
        for start, end in spans:
            found = quantizer.grid_params(weights.view(-1, d_in)[row:row + 1, start:end].float(), cfg,
                                          damped_h[head][start:end, start:end])
            grids[row, start // width] = GridParams(found.scale.double(), found.zero.double())
        quantized[index] = quantizer.quantize_dequantize(weights[index].view(1, 1), grids[row, column // width], cfg)
        remaining = order[step:]  # this weight first
        inverse = torch.linalg.inv(kronecker[remaining][:, remaining])
        weights[remaining] -= (weights[index] - quantized[index]) / inverse[0, 0] * inverse[:, 0]
    return quantized.view(W.shape)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("clip_search", [False, True])
@pytest.mark.parametrize("bits, group_size", [(2, 0), (3, 8), (4, 0)])
def test_row_compensation_is_element_wise_obs_on_the_kronecker_hessian(bits, group_size, clip_search, act_order):
    n_heads, head_dim, d_in = 2, 3, 16
    weight = random_weight(22, n_heads * head_dim, d_in)
    hessian = correlated_hessian(23, d_in, 64)
    rows = torch.stack([random_spd(24 + h, head_dim) for h in range(n_heads)])
    cfg = QuantConfig(bits, group_size, clip_search=clip_search)
    boa = gptq_rows(weight, hessian, rows, cfg, block_size=4, act_order=act_order)  # blocks, lazy updates: same algebra
    expected = kronecker_obs(weight, hessian, rows, cfg, act_order=act_order)
    torch.testing.assert_close(boa.weight.double(), expected, rtol=0, atol=1e-5)
    plain = gptq(weight, hessian, cfg, block_size=4, act_order=act_order)
    assert not torch.equal(boa.weight, plain.weight)  # G does change the result


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits, group_size", [(2, 0), (3, 8)])
def test_value_row_compensation_is_element_wise_obs_on_each_heads_kronecker_hessian(bits, group_size, act_order):
    """v: KV head g under `R_g ⊗ H_V,g`, each head with its own column Hessian (and its own act-order)."""
    n_heads, head_dim, d_in = 2, 3, 16
    weight = random_weight(25, n_heads * head_dim, d_in)
    heads = torch.stack([correlated_hessian(26 + h, d_in, 64) for h in range(n_heads)])
    rows = torch.stack([random_spd(28 + h, head_dim) for h in range(n_heads)])
    cfg = QuantConfig(bits, group_size)
    boa = gptq_per_head(weight, heads, cfg, block_size=4, act_order=act_order, row_factors=rows)
    expected = kronecker_obs(weight, heads, rows, cfg, act_order=act_order)
    torch.testing.assert_close(boa.weight.double(), expected, rtol=0, atol=1e-5)
    assert boa.loss == pytest.approx(per_head_loss(weight, boa.weight, heads, rows, head_dim))


def test_value_row_factors_of_a_gqa_layer_are_the_hessian_of_its_attention_output_through_o_proj():
    """GQA (2 KV heads of 2 query heads each; a group's heads attend alike, where the Kronecker form is exact): the
    explicit objective `(2/N) Σ_h ‖W_O,h ΔW_g(h) X A_gᵀ‖²` (query head h reads KV head g(h) = h // 2 and is read by
    its own columns of o_proj) has, by autograd, the Hessian `2 · blockdiag_g(R_g ⊗ H_V,g)` with R from
    `out_row_factor`; and BoA-v's reported loss is that objective at its result."""
    n_kv, repeats, head_dim, d_in, tokens, d_model = 2, 2, 3, 8, 12, 10
    g = generator(33)
    X = torch.randn(d_in, tokens, generator=g, dtype=torch.float64)
    attention = torch.softmax(torch.randn(n_kv, tokens, tokens, generator=g, dtype=torch.float64), dim=-1)
    W_O = torch.randn(d_model, n_kv * repeats * head_dim, generator=g, dtype=torch.float64)
    weight = torch.randn(n_kv * head_dim, d_in, generator=g)

    def explicit(delta: torch.Tensor) -> torch.Tensor:
        heads = delta.view(n_kv, head_dim, d_in)
        return 2 / tokens * sum((W_O[:, h * head_dim:(h + 1) * head_dim] @ heads[h // repeats] @ X
                                 @ attention[h // repeats].T).square().sum() for h in range(n_kv * repeats))

    hessian = torch.autograd.functional.hessian(explicit, torch.zeros(weight.numel(), dtype=torch.float64))
    H_V = torch.stack([2 / tokens * X @ attention[k].T @ attention[k] @ X.T for k in range(n_kv)])
    rows = out_row_factor(W_O, n_kv, head_dim)
    torch.testing.assert_close(hessian, 2 * torch.block_diag(*[torch.kron(rows[k], H_V[k]) for k in range(n_kv)]))
    result = gptq_per_head(weight, H_V.float(), QuantConfig(2), row_factors=rows.float())
    assert result.loss == pytest.approx(explicit((result.weight - weight).double().reshape(-1)).item(), rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# The pipeline's choice for the value projection


def test_the_attention_method_quantizes_v_with_the_out_projections_row_factors(tiny_model):
    model, arch = tiny_model("llama")
    layers = {layer.kind: layer for layer in arch.block_layers(0)}
    weight, out_weight = (get_weight(model, layers[kind]).detach() for kind in ("v", "o"))
    n_kv, head_dim = arch.n_kv_heads, weight.shape[0] // arch.n_kv_heads
    value = torch.stack([correlated_hessian(34 + g, weight.shape[1]) for g in range(n_kv)])
    hessians = BlockHessians(0, N_TOKENS, {layers["v"].name: value.mean(dim=0)}, {layers["v"].name: value})
    cfg = QuantConfig(3, 16)
    settings = QuantizeSettings("attention", value_rows=True)
    with_rows = quantize_layer(weight, layers["v"], hessians, cfg, settings, out_weight)[0]
    ordered = settings.act_order(cfg.bits)  # by default from 3 bits
    expected = gptq_per_head(weight, value, cfg, act_order=ordered,
                             row_factors=out_row_factor(out_weight, n_kv, head_dim)).weight
    torch.testing.assert_close(with_rows, expected, rtol=0, atol=0)
    per_head = quantize_layer(weight, layers["v"], hessians, cfg, QuantizeSettings("attention"))[0]  # the default
    torch.testing.assert_close(per_head, gptq_per_head(weight, value, cfg, act_order=ordered).weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs the out projection's weight"):
        quantize_layer(weight, layers["v"], hessians, cfg, settings)


@pytest.mark.parametrize("setting, off, value", [("value_rows", False, True), ("mlp_rows", False, True),
                                                ("shrink", 0.0, 0.5), ("row_weights", "uniform", "attention")])
def test_a_row_setting_enters_only_the_attention_aware_run_keys_and_only_when_on(setting, off, value):
    """Off, every key is what it was before the setting existed; on, the attention-aware methods' runs are not taken
    for those stored without it; the methods it does not touch ignore it."""
    for method in ("rtn", "gptq", "attention", "aespa"):
        assert setting not in QuantizeSettings(method, **{setting: off}).key_fields()
    for method in ("attention", "aespa"):
        assert QuantizeSettings(method, **{setting: value}).key_fields()[setting] == value
    for method in ("rtn", "gptq"):
        assert QuantizeSettings(method, **{setting: value}).key_fields() == QuantizeSettings(method).key_fields()


# ---------------------------------------------------------------------------------------------------------------
# Shrinking the attention-aware Hessians toward GPTQ's


def test_shrinking_keeps_each_heads_trace_and_ends_at_gptqs_objective():
    value, layerwise = torch.stack([correlated_hessian(40 + g) for g in range(3)]), correlated_hessian(43)
    row = torch.stack([random_spd(44 + h, 8) for h in range(2)])
    assert shrunk_value_hessians(value, layerwise, 0.0) is value and shrunk_row_hessians(row, 0.0) is row
    full_value, full_row = shrunk_value_hessians(value, layerwise, 1.0), shrunk_row_hessians(row, 1.0)
    for g in range(3):
        torch.testing.assert_close(full_value[g] / full_value[g].trace(), layerwise / layerwise.trace())
    torch.testing.assert_close(full_row, row.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(8))
    for shrunk, original, full in ((shrunk_value_hessians(value, layerwise, 0.3), value, full_value),
                                   (shrunk_row_hessians(row, 0.3), row, full_row)):
        torch.testing.assert_close(shrunk, 0.7 * original + 0.3 * full)
        torch.testing.assert_close(shrunk.diagonal(dim1=1, dim2=2).sum(-1), original.diagonal(dim1=1, dim2=2).sum(-1))


def test_at_full_shrinkage_the_attention_method_quantizes_q_k_and_v_as_gptq_does(tiny_model):
    model, arch = tiny_model("llama")
    layers = {layer.kind: layer for layer in arch.block_layers(0)}
    weights = {kind: get_weight(model, layers[kind]).detach() for kind in ("q", "k", "v")}
    d_in, head_dim = weights["q"].shape[1], arch.head_dim
    h = correlated_hessian(45, d_in)
    hessians = BlockHessians(
        0, N_TOKENS, {layers[kind].name: h for kind in ("q", "k", "v")},
        value={layers["v"].name: torch.stack([correlated_hessian(46 + g, d_in) for g in range(arch.n_kv_heads)])},
        row={layers[kind].name: torch.stack([random_spd(50 + i, head_dim) for i in range(weights[kind].shape[0]
                                                                                         // head_dim)])
             for kind in ("q", "k")})
    cfg = QuantConfig(3, 16)
    for kind in ("q", "k", "v"):
        shrunk = quantize_layer(weights[kind], layers[kind], hessians, cfg, QuantizeSettings("attention", shrink=1.0))
        plain = quantize_layer(weights[kind], layers[kind], hessians, cfg, QuantizeSettings("gptq"))
        assert not torch.equal(quantize_layer(weights[kind], layers[kind], hessians, cfg,
                                              QuantizeSettings("attention"))[0], plain[0])
        torch.testing.assert_close(shrunk[0], plain[0])


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan")])
def test_a_shrinkage_outside_zero_to_one_is_refused(share):
    with pytest.raises(UserError, match="must be from 0 to 1"):
        QuantizeSettings("attention", shrink=share)


def test_unknown_row_weights_are_refused():
    with pytest.raises(UserError, match="Unknown row weights 'softmax'; choose from uniform, attention"):
        QuantizeSettings("attention", row_weights="softmax")


@pytest.mark.parametrize("method", ["gptq", "attention"])
def test_act_order_from_3_bits_walks_only_the_layers_of_3_bits_and_more(method):
    """The width rule: a 2-bit layer is quantized as without act-order, a 3- and a 4-bit one as with it."""
    layer = LinearLayer("mlp.up_proj", 0, "up", "mlp.up_proj")
    weight, H = random_weight(60), correlated_hessian(61)
    hessians = BlockHessians(0, N_TOKENS, {layer.name: H})
    rule = QuantizeSettings(method, act_order_from=3)
    for bits in (2, 3, 4):
        cfg = QuantConfig(bits, 16)
        walked = quantize_layer(weight, layer, hessians, cfg, rule)[0]
        expected = gptq(weight, H, cfg, act_order=bits >= 3).weight
        torch.testing.assert_close(walked, expected, rtol=0, atol=0)
        assert not torch.equal(walked, gptq(weight, H, cfg, act_order=bits < 3).weight)


def test_act_order_keys_keep_the_runs_stored_before_the_width_rule():
    """Every layer or none is the boolean the stored runs carry; a first width of 3 or more is a key of its own."""
    assert QuantizeSettings("gptq", act_order_from=None).key_fields()["act_order"] is False
    assert QuantizeSettings("gptq", act_order_from=2).key_fields()["act_order"] is True
    assert QuantizeSettings("attention", act_order_from=3).key_fields()["act_order"] == 3
    assert "act_order_from" not in QuantizeSettings("attention").key_fields()


@pytest.mark.parametrize("first", [1, 9])
def test_act_order_from_a_width_outside_two_to_eight_is_refused(first):
    with pytest.raises(UserError, match="Act-order applies from a width of 2–8 bits"):
        QuantizeSettings("attention", act_order_from=first)
