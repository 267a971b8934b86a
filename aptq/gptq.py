"""GPTQ and its attention-aware variants (docs/algorithms.md, sections 7–9).

One column walk (`_walk_columns`) quantizes a batch of rows left to right (or in act-order), spreading each column's
error over the columns not yet quantized with the upper Cholesky factor U of the damped `H⁻¹`, in blocks with lazy
updates. Three entry points use it:

- `gptq`: all rows of a layer under one Hessian H;
- `gptq_per_head`: the value projection, each KV head's rows under its own Hessian `H_V,g`, and with row factors (the
  out projection's `R_g`) BoA's row compensation within the head, as `gptq_rows` does;
- `gptq_rows`: the query/key projections (BoA): row i of every head at once under the shared H, then the row's error is
  compensated in the later rows of its head with the upper Cholesky factor of the damped `G_h⁻¹`.

Group grids are computed when the walk reaches a group's first column, on the weights as updated so far. With
act-order (our choice, GPTQ's "static groups"): the groups stay those of the original column order and their grids are
computed before the walk starts, so that every group keeps a single grid however the walk visits its columns.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from aptq.quantizer import (
    GridParams,
    QuantConfig,
    grid_params,
    group_spans,
    group_width,
    layer_error,
    quantize_dequantize,
    rtn,
)

# (our choice) when the damped Hessian does not factorize, retry with the damping ×10, ×100 and ×1000.
DAMP_RETRIES = 4


@dataclass(frozen=True)
class GPTQResult:
    """Dequantized weights (in the dtype of W), their loss on the undamped Hessian, and why GPTQ fell back if it did."""

    weight: Tensor
    loss: float
    fallback: str | None = None


@dataclass(frozen=True)
class _Walk:
    """What a column walk needs from one Hessian: prepared once, reused for every batch of rows."""

    hessian: Tensor  # damped, dead columns fixed, original column order, float32: (our choice) it weights the
    # clipping search, as it is the Hessian the walk minimizes
    upper: Tensor  # upper Cholesky factor of the damped H⁻¹, in walk order, float32
    order: Tensor | None  # walk order of the columns (act-order), None for left to right
    dead: Tensor  # columns whose input is always zero


@dataclass(frozen=True)
class _HeadWalks:
    """BoA's column walks: one shared by every head (q/k: one H) or one per head (v: H_V,g)."""

    walks: list[_Walk]
    dead: Tensor  # (1 or n_heads) × d_in, walk order: broadcasts over the heads

    @staticmethod
    def of(walks: list[_Walk]) -> _HeadWalks:
        return _HeadWalks(walks, torch.stack([walk.dead if walk.order is None else walk.dead[walk.order]
                                              for walk in walks]))

    @property
    def act_order(self) -> bool:
        return self.walks[0].order is not None

    def by_walk(self) -> list[tuple[slice, _Walk]]:
        """The heads each walk serves, as a slice of the head axis."""
        if len(self.walks) == 1:
            return [(slice(None), self.walks[0])]
        return [(slice(h, h + 1), walk) for h, walk in enumerate(self.walks)]

    def diagonal_block(self, start: int, end: int) -> Tensor:
        """(1 or n_heads) × width × width: the walks' upper factors on these columns."""
        return torch.stack([walk.upper[start:end, start:end] for walk in self.walks])


# ---------------------------------------------------------------------------------------------------------------
# Hessian preparation


def _with_dead_fixed(H: Tensor) -> tuple[Tensor, Tensor]:
    """H in float64 (one new copy), with a 1 on the diagonal of dead columns (diag = 0), and the mask of them."""
    fixed = H.detach().to(torch.float64, copy=True)
    dead = fixed.diagonal() == 0
    fixed.diagonal()[dead] = 1
    return fixed, dead


def _damped_inverse_factor(H: Tensor, damp: float) -> tuple[Tensor, Tensor] | None:
    """Upper Cholesky factor of `(H + λ mean(diag H) I)⁻¹` (dtype of H) and the damped H (float32), raising λ until
    it factorizes.

    Besides H, one matrix of its dtype is alive: the damped H is factored, inverted and factored again in place (a
    6912-wide float64 H is 0.36 GiB per copy)."""
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for attempt in range(DAMP_RETRIES):
        work = H.clone()
        work.diagonal().add_(damp * 10 ** attempt * H.diagonal().mean())
        damped = work.float()
        torch.linalg.cholesky_ex(work, out=(work, info))  # the lower factor
        if info.item() != 0 or not torch.isfinite(work).all():
            continue
        torch.cholesky_inverse(work, out=work)
        torch.linalg.cholesky_ex(work, upper=True, out=(work, info))
        if info.item() == 0 and torch.isfinite(work).all():
            return work, damped
    return None


def _prepare_walk(H: Tensor, act_order: bool, damp: float) -> _Walk | None:
    """Dead columns, damping, walk order and the inverse factor for one Hessian; None when it cannot be factored."""
    fixed, dead = _with_dead_fixed(H)
    order = torch.argsort(fixed.diagonal(), descending=True) if act_order else None
    if order is not None:
        fixed = fixed[order.unsqueeze(1), order]  # one gather: no intermediate copy
    factored = _damped_inverse_factor(fixed, damp)
    del fixed  # freed before the float32 copies are made: the float64 copies make the peak of a big layer
    if factored is None:
        return None
    upper, damped = factored
    if order is not None:
        inverse = torch.argsort(order)
        damped = damped[inverse.unsqueeze(1), inverse]
    return _Walk(damped, upper.float(), order, dead)


def _fall_back(rows: Tensor, cfg: QuantConfig, label: str, damp: float, stacklevel: int) -> tuple[Tensor, str]:
    """Round-to-nearest for rows whose Hessian cannot be factored, said in a warning (pointing at the entry point's
    caller, `stacklevel` frames up) and returned as a message."""
    message = (f"GPTQ fell back to round-to-nearest for {label}: its Hessian could not be factored even with damping "
               f"{damp * 10 ** (DAMP_RETRIES - 1):g}.")
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
    return rtn(rows, cfg), message  # (our choice) plain squared-error clipping: this H is not usable


# ---------------------------------------------------------------------------------------------------------------
# The column walk


def _static_params(rows: Tensor, walk: _Walk, cfg: QuantConfig) -> GridParams:
    """Grids of the groups of the original column order, one column each, rearranged into walk order."""
    scales, zeros = [], []
    for start, end in group_spans(rows.shape[1], cfg):
        params = grid_params(rows[:, start:end], cfg, walk.hessian[start:end, start:end])
        scales.append(params.scale.expand(-1, end - start))
        zeros.append(params.zero.expand(-1, end - start))
    return GridParams(torch.cat(scales, dim=1)[:, walk.order], torch.cat(zeros, dim=1)[:, walk.order])


def _current_columns(W: Tensor, block: Tensor, errors: Tensor, upper: Tensor, start: int, i: int,
                     end: int) -> Tensor:
    """Columns j = start + i … end − 1 as updated so far: those past the block still owe its lazy update."""
    block_end = start + block.shape[1]
    inside = block[:, i:min(end, block_end) - start]
    if end <= block_end:
        return inside
    pending = errors[:, :i] @ upper[start:start + i, block_end:end]
    return torch.cat([inside, W[:, block_end:end] - pending], dim=1)


def _walk_columns(rows: Tensor, walk: _Walk, cfg: QuantConfig, block_size: int) -> Tensor:
    """GPTQ over the columns of a batch of rows (float32, original column order): their dequantized values."""
    n_cols = rows.shape[1]
    static = None if walk.order is None else _static_params(rows, walk, cfg)
    W = rows.clone() if walk.order is None else rows[:, walk.order]
    width = group_width(n_cols, cfg)
    quantized = torch.empty_like(W)
    params = None
    for start in range(0, n_cols, block_size):
        stop = min(start + block_size, n_cols)
        block = W[:, start:stop].clone()
        errors = torch.empty_like(block)  # (w − q) / U_jj: what the later columns compensate
        for i in range(stop - start):
            j = start + i
            if static is not None:
                params = GridParams(static.scale[:, j:j + 1], static.zero[:, j:j + 1])
            elif j % width == 0:
                end = min(j + width, n_cols)
                current = _current_columns(W, block, errors, walk.upper, start, i, end)
                params = grid_params(current, cfg, walk.hessian[j:end, j:end])
            column = block[:, i:i + 1]
            q = quantize_dequantize(column, params, cfg)
            quantized[:, j:j + 1] = q
            error = (column - q) / walk.upper[j, j]
            block[:, i:] -= error * walk.upper[j, j:stop]
            errors[:, i:i + 1] = error
        W[:, stop:] -= errors @ walk.upper[start:stop, stop:]
    return quantized if walk.order is None else quantized[:, torch.argsort(walk.order)]


def _quantize_rows(rows: Tensor, walk: _Walk, cfg: QuantConfig, block_size: int) -> Tensor:
    """The walk on rows whose dead columns are zeroed first, and kept at zero in the result.

    (our choice) the result's dead columns are set to 0 whatever the grid (an asymmetric grid need not hold 0 exactly):
    an input that is always zero makes these weights irrelevant to the loss.
    """
    live = rows.clone()
    live[:, walk.dead] = 0
    quantized = _walk_columns(live, walk, cfg, block_size)
    quantized[:, walk.dead] = 0
    return quantized


def _gptq_or_rtn(rows: Tensor, H: Tensor, cfg: QuantConfig, block_size: int, act_order: bool, damp: float,
                 label: str, G_heads: Tensor | None = None) -> tuple[Tensor, str | None]:
    """GPTQ of float32 rows under H, with BoA's row compensation through `G_heads` if given (`_boa_rows`);
    round-to-nearest (and a warning) when H cannot be factored."""
    walk = _prepare_walk(H.to(rows.device), act_order, damp)
    if walk is None:
        return _fall_back(rows, cfg, label, damp, stacklevel=4)
    if G_heads is None:
        return _quantize_rows(rows, walk, cfg, block_size), None
    return _boa_rows(rows, [walk], G_heads.to(rows.device), cfg, damp, label)


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def _check_inputs(W: Tensor, H: Tensor, block_size: int) -> None:
    if W.dim() != 2:
        raise ValueError(f"W must be a matrix (d_out × d_in), got shape {tuple(W.shape)}.")
    if H.shape[-2:] != (W.shape[1], W.shape[1]):
        raise ValueError(f"The Hessian must be {W.shape[1]} × {W.shape[1]} for W of shape {tuple(W.shape)}, "
                         f"got {tuple(H.shape)}.")
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}.")


def gptq(W: Tensor, H: Tensor, cfg: QuantConfig, block_size: int = 128, act_order: bool = False, damp: float = 0.01,
         name: str = "this layer") -> GPTQResult:
    """GPTQ of W (d_out × d_in) under H (d_in × d_in); loss `tr(ΔW H ΔWᵀ)` on the undamped H."""
    _check_inputs(W, H, block_size)
    quantized, fallback = _gptq_or_rtn(W.float(), H, cfg, block_size, act_order, damp, name)
    weight = quantized.to(W.dtype)
    return GPTQResult(weight, layer_error(W, weight, H.to(W.device)), fallback)


def gptq_rows_shared(layers: list[tuple[Tensor, Tensor]], H: Tensor, cfg: QuantConfig, block_size: int = 128,
                     act_order: bool = False, damp: float = 0.01, name: str = "these layers") -> list[GPTQResult]:
    """`gptq_rows` of several layers that read the same input (one H; q and k), their heads side by side in one walk.

    Each head's rows depend on its own G and on the column walk alone, so this is each layer's `gptq_rows` (to float
    rounding); the walk's cost is its steps (`d_h` rows of columns), not its heads, so the layers together take about
    the time of one. `layers`: (W, G_heads) per layer, every G with the same `d_h`."""
    for W, G_heads in layers:
        _check_inputs(W, H, block_size)
        if G_heads.dim() != 3 or G_heads.shape[1] != G_heads.shape[2] or \
                G_heads.shape[0] * G_heads.shape[1] != W.shape[0]:
            raise ValueError(f"G_heads must be (n_heads, d_h, d_h) with n_heads · d_h = d_out = {W.shape[0]}, "
                             f"got {tuple(G_heads.shape)}.")
        if G_heads.shape[1] != layers[0][1].shape[1]:
            raise ValueError(f"Layers that walk together need one d_h for every layer, got {G_heads.shape[1]} and "
                             f"{layers[0][1].shape[1]}.")
    # one layer (gptq_rows): its own tensors, no copy
    rows = torch.cat([W.float() for W, _ in layers]) if len(layers) > 1 else layers[0][0].float()
    row_factors = torch.cat([G for _, G in layers]) if len(layers) > 1 else layers[0][1]
    quantized, message = _gptq_or_rtn(rows, H, cfg, block_size, act_order, damp, name, row_factors)
    results, start = [], 0
    for W, G_heads in layers:
        weight = quantized[start:start + W.shape[0]].to(W.dtype)
        results.append(GPTQResult(weight, layer_error(W, weight, H.to(W.device), G_heads.to(W.device)), message))
        start += W.shape[0]
    return results


def gptq_per_head(W: Tensor, H_heads: Tensor, cfg: QuantConfig, block_size: int = 128, act_order: bool = False,
                  damp: float = 0.01, name: str = "this layer", row_factors: Tensor | None = None) -> GPTQResult:
    """Value projection: the rows of KV head g (rows ordered head by head) under its own Hessian H_heads[g].

    With `row_factors` R (n_kv_heads, d_h, d_h), each head's rows also get BoA's row compensation through R_g, as
    `gptq_rows` does with G (for v, R_g is the out projection's `Σ_{h∈g} W_O,hᵀ W_O,h`: aptq.aespa.out_row_factor);
    the heads run as one batch, each with its own column walk. Loss `Σ_g tr(R_g ΔW_g H_g ΔW_gᵀ)` (R_g = I without
    row factors) on the undamped H and R; a head whose Hessian cannot be factored falls back to round-to-nearest alone.
    """
    _check_inputs(W, H_heads, block_size)
    if H_heads.dim() != 3 or W.shape[0] % H_heads.shape[0]:
        raise ValueError(f"H_heads must be (n_kv_heads, d_in, d_in) with n_kv_heads dividing d_out = {W.shape[0]}, "
                         f"got {tuple(H_heads.shape)}.")
    n_heads = H_heads.shape[0]
    head_dim = W.shape[0] // n_heads
    if row_factors is not None and row_factors.shape != (n_heads, head_dim, head_dim):
        raise ValueError(f"row_factors must be ({n_heads}, {head_dim}, {head_dim}), one d_h × d_h factor per KV head, "
                         f"got {tuple(row_factors.shape)}.")
    if row_factors is None:  # §7 on each head, one at a time (one Hessian's copies alive at once)
        heads, messages = [], []
        for g, rows in enumerate(_head_rows(n_heads, head_dim)):
            quantized, message = _gptq_or_rtn(W[rows].float(), H_heads[g], cfg, block_size, act_order, damp,
                                              f"{name} (head {g})")
            heads.append(quantized)
            messages += [message] if message else []
        quantized = torch.cat(heads)
    else:
        quantized, messages = _per_head_boa(W, H_heads, row_factors.to(W.device), cfg, act_order, damp, name)
    weight = quantized.to(W.dtype)
    loss = sum(layer_error(W[rows], weight[rows], H_heads[g].to(W.device),
                           None if row_factors is None else row_factors[g:g + 1].to(W.device))
               for g, rows in enumerate(_head_rows(n_heads, head_dim)))
    return GPTQResult(weight, float(loss), " ".join(messages) or None)


def _head_rows(n_heads: int, head_dim: int) -> list[slice]:
    return [slice(g * head_dim, (g + 1) * head_dim) for g in range(n_heads)]


def _per_head_boa(W: Tensor, H_heads: Tensor, row_factors: Tensor, cfg: QuantConfig, act_order: bool, damp: float,
                  name: str) -> tuple[Tensor, list[str]]:
    """BoA on every head whose Hessian factors, as one batch with a walk per head; the others round to nearest.

    (our choice) every head's walk is alive at once (two d_in × d_in float32 matrices each) so that the heads share
    the wavefront's steps: n_kv times the memory of one walk, for about 1/n_kv of the time."""
    n_heads, head_dim = row_factors.shape[:2]
    quantized = torch.empty(W.shape, dtype=torch.float32, device=W.device)
    walks, messages = [], []
    for g, rows in enumerate(_head_rows(n_heads, head_dim)):
        walks.append(_prepare_walk(H_heads[g].to(W.device), act_order, damp))
        if walks[-1] is None:
            quantized[rows], message = _fall_back(W[rows].float(), cfg, f"{name} (head {g})", damp, stacklevel=4)
            messages.append(message)
    factored = [g for g, walk in enumerate(walks) if walk is not None]
    if factored:
        heads = W.float().view(n_heads, head_dim, -1)[factored].reshape(-1, W.shape[1])
        result, message = _boa_rows(heads, [walks[g] for g in factored], row_factors[factored], cfg, damp, name)
        quantized.view(n_heads, head_dim, -1)[factored] = result.view(len(factored), head_dim, -1)
        messages += [message] if message else []
    return quantized, messages


def _row_compensation(G_heads: Tensor, damp: float, name: str) -> tuple[Tensor, str | None]:
    """Per head, `U_G[r, s] / U_G[r, r]` (s > r) from the upper Cholesky factor U_G of the damped `G_h⁻¹`.

    (our choice) a head whose G cannot be factored gets no row compensation (plain GPTQ for its rows), with a warning.
    """
    n_heads, head_dim, _ = G_heads.shape
    coefficients = torch.zeros(n_heads, head_dim, head_dim, dtype=torch.float32, device=G_heads.device)
    failed = []
    for h in range(n_heads):
        factored = _damped_inverse_factor(_with_dead_fixed(G_heads[h])[0], damp)
        if factored is None:
            failed.append(h)
            continue
        upper = factored[0]
        coefficients[h] = torch.triu(upper / upper.diagonal().unsqueeze(1), diagonal=1).float()
    if not failed:
        return coefficients, None
    message = (f"BoA row compensation skipped for {name}, heads {failed}: their row Hessians could not be factored "
               f"even with damping {damp * 10 ** (DAMP_RETRIES - 1):g}.")
    warnings.warn(message, RuntimeWarning, stacklevel=5)  # _boa_rows, _gptq_or_rtn, the entry point, its caller
    return coefficients, message


def _tile_params(inputs: Tensor, current: Tensor, heads: _HeadWalks, cfg: QuantConfig,
                 span: tuple[int, int]) -> GridParams:
    """Per-column grids (n_heads × width) of one tile: act-order's static grids from the whole row as it enters its
    walk, else the group's grid from the tile's current columns (what the column walk computes at the group's
    first column); each head's from its own walk's Hessian."""
    start, end = span
    scales, zeros = [], []
    for rows, walk in heads.by_walk():
        if walk.order is not None:  # one tile spans the row: the static grids need the row in the original order
            params = _static_params(inputs[rows][:, torch.argsort(walk.order)], walk, cfg)
            scales.append(params.scale[:, start:end])
            zeros.append(params.zero[:, start:end])
        else:
            params = grid_params(current[rows], cfg, walk.hessian[start:end, start:end])
            scales.append(params.scale.expand(-1, end - start))
            zeros.append(params.zero.expand(-1, end - start))
    return GridParams(torch.cat(scales), torch.cat(zeros))


def _boa_rows(W: Tensor, walks: list[_Walk], G_heads: Tensor, cfg: QuantConfig, damp: float,
              name: str) -> tuple[Tensor, str | None]:
    """Row r of every head by the column walk, its error compensated in rows r+1… of its head; run as a wavefront.

    `walks`: one column walk shared by every head (q/k), or one per head (v). Tile (r, g) is row r of every head over
    column group g. It needs the tile on its left (the column walk of row r reaches group g with the lazy update of
    groups < g) and the one above (row r−1's error on these columns, compensated in row r, which also decides group
    g's grid), so the tiles of one anti-diagonal r + g = t are independent and run as one batch: d_h + n_groups − 1
    steps of a group's width instead of d_h walks over all columns. The same arithmetic as row after row, up to float
    rounding order. With act-order (static grids from the whole row) or one group per row, a row is one tile and the
    rows go one after another. No block size: the lazy updates come in groups."""
    coefficients, message = _row_compensation(G_heads, damp, name)
    n_heads, head_dim, n_cols = G_heads.shape[0], G_heads.shape[1], W.shape[1]
    heads = _HeadWalks.of(walks)
    by_head = W.reshape(n_heads, head_dim, n_cols)
    pending = torch.empty_like(by_head)  # rows as compensated so far, in walk order
    for rows, walk in heads.by_walk():
        pending[rows] = by_head[rows] if walk.order is None else by_head[rows][..., walk.order]
    spans = [(0, n_cols)] if heads.act_order else group_spans(n_cols, cfg)
    quantized = torch.empty_like(pending)
    scaled_errors = torch.empty_like(pending)  # (w − q) / U_jj of the column walks: what later columns compensate
    for t in range(head_dim + len(spans) - 1):
        tiles = [(t - g, spans[g]) for g in range(len(spans)) if 0 <= t - g < head_dim]
        for width in sorted({end - start for _, (start, end) in tiles}):  # the last group may be narrower
            _walk_tiles([tile for tile in tiles if tile[1][1] - tile[1][0] == width], pending, quantized,
                        scaled_errors, heads, cfg)
        for r, (start, end) in tiles:  # row compensation: rows r+1… of each head, these columns
            row_error = pending[:, r, start:end] - quantized[:, r, start:end]
            pending[:, r + 1:, start:end] -= coefficients[:, r, r + 1:].unsqueeze(-1) * row_error.unsqueeze(1)
    for rows, walk in heads.by_walk():  # back to the original column order
        if walk.order is not None:
            quantized[rows] = quantized[rows][..., torch.argsort(walk.order)]
    return quantized.reshape(W.shape), message


def _walk_tiles(tiles: list[tuple[int, tuple[int, int]]], pending: Tensor, quantized: Tensor,
                scaled_errors: Tensor, heads: _HeadWalks, cfg: QuantConfig) -> None:
    """The column walk over tiles of equal width at once (see `_boa_rows`), writing their quantized values and
    scaled errors. Dead columns enter as 0 and leave as 0, as in `_quantize_rows`."""
    currents, scales, zeros, diagonal_blocks = [], [], [], []
    for r, (start, end) in tiles:
        inputs = pending[:, r].masked_fill(heads.dead, 0)
        current = torch.empty_like(inputs[:, start:end])
        for rows, walk in heads.by_walk():  # the lazy update of the groups on the left
            current[rows] = inputs[rows, start:end] - scaled_errors[rows, r, :start] @ walk.upper[:start, start:end]
        params = _tile_params(inputs, current, heads, cfg, (start, end))
        currents.append(current)
        scales.append(params.scale)
        zeros.append(params.zero)
        diagonal_blocks.append(heads.diagonal_block(start, end))
    # column-major (width × tiles × heads, the factors width × width × tiles × (1 or heads)): each step of the walk
    # reads and writes contiguous memory, through views taken once; the operations are quantize_dequantize's and the
    # column walk's, in their order (the same values to the last bit), in place: this loop is the BoA walk's cost
    current, scale, zero = (torch.stack(parts).permute(2, 0, 1).contiguous() for parts in (currents, scales, zeros))
    upper = torch.stack(diagonal_blocks).permute(2, 3, 0, 1).contiguous()
    values, errors = torch.empty_like(current), torch.empty_like(current)
    diagonal = upper.diagonal(dim1=0, dim2=1).permute(2, 0, 1).unbind()
    for i, (column, q, error, step, zero_point, pivot) in enumerate(zip(current, values, errors, scale, zero,
                                                                         diagonal)):
        torch.div(column, step, out=q).add_(zero_point).round_().clamp_(0, cfg.max_level).sub_(zero_point).mul_(step)
        torch.sub(column, q, out=error).div_(pivot)
        current[i + 1:].sub_(error * upper[i, i + 1:])
    values, errors = values.permute(1, 2, 0), errors.permute(1, 2, 0)  # tiles × heads × width
    for index, (r, (start, end)) in enumerate(tiles):
        quantized[:, r, start:end] = values[index].masked_fill(heads.dead[:, start:end], 0)
        scaled_errors[:, r, start:end] = errors[index]


def gptq_rows(W: Tensor, H: Tensor, G_heads: Tensor, cfg: QuantConfig, block_size: int = 128,
              act_order: bool = False, damp: float = 0.01, name: str = "this layer") -> GPTQResult:
    """Query/key projection (BoA): GPTQ over columns with the shared H, row by row with compensation through G.

    Rows of W are ordered head by head (row r of head h is W[h · d_h + r]); G_heads is (n_heads, d_h, d_h).
    Row r of all heads is quantized at once, then its error E_r compensates rows r+1… of each head:
    `W_h[r+1:] −= (U_G[r, r+1:]ᵀ / U_G[r, r]) · E_r`. Loss `tr(G ΔW H ΔWᵀ)` on the undamped H and G.
    """
    return gptq_rows_shared([(W, G_heads)], H, cfg, block_size, act_order, damp, name)[0]
