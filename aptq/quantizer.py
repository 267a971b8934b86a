"""Quantization grid, round-to-nearest, layer error and storage size (docs/algorithms.md#6-the-quantization-grid).

Weights are `d_out × d_in` (nn.Linear layout). A grid is uniform over the integers `0 … 2^b − 1`, with one scale and
one zero point per output row and group of input columns:

- asymmetric (default): the range `[min(w, 0), max(w, 0)]` of the row-group maps onto `0 … 2^b − 1`; the zero
  point is an integer, so 0 is exactly representable (the range includes 0, as in GPTQ);
- symmetric: the step `2 max|w| / (2^b − 1)` and the zero point `2^(b−1)`, as GPTQ's reference and every packed
  format that says `sym` (GPTQ, compressed-tensors) define it: one more negative level than positive ones, and 0 is
  exactly representable.

Scales are float16 values, rounded up from the exact step (our choice: packed checkpoints store fp16 scales, so the
grid we round onto is the one they hold, and a deployed checkpoint reproduces our dequantized weights bit for bit;
rounding up keeps the whole range on the grid). `recover_codes` reads the integer codes back from dequantized weights.

The clipping search shrinks the range by the factors in `CLIP_FACTORS` and keeps, row by row, the one with the least
error: `Δw H_gg Δwᵀ` when a Hessian is given (its block on the group's columns), the squared error otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from aptq.widths import FP16_BITS

# (our choice) 1.00, 0.99, …, 0.21: the range GPTQ's reference search covers. A floor of 0.80 is not enough: on
# Gaussian rows the best factor is about 0.6 at 2 bits in groups of 128 and about 0.45 per channel over 4096 columns.
CLIP_FACTORS = tuple(round(1.0 - 0.01 * k, 2) for k in range(80))
# (our choice) smallest scale, the smallest positive float16: a row-group that is all zeros keeps a usable grid that
# maps 0 to 0, and the scale stays a float16 value.
MIN_SCALE = 2.0 ** -24
MAX_SCALE = 65504.0  # the largest float16
# float16 scales next to the nearest one that `recover_codes` tries, by the dtype the weights were rounded to: none
# for float32 (not rounded); a bfloat16 value is within 2^-8 of the exact one (relative), four to eight float16
# steps at a scale's precision, float16 within one or two (our choice: a step more either way).
SCALE_NEIGHBOURS = {torch.float32: 0, torch.bfloat16: 9, torch.float16: 2}
# (our choice) elements of one (factors × rows × columns) chunk of candidates in the clipping search. On a CPU, 2^18
# (1 MiB in float32 per buffer, the size of a core's L2 cache here) keeps the nine passes over a chunk in cache: 12 %
# less CPU time than 2^20 with the same grids (bench/results/analysis_speed.md); on an accelerator the chunk is
# large (few kernel launches). bench/results/quantizer.md has the earlier measurements.
CLIP_SEARCH_ELEMENTS = 2 ** 18
CLIP_SEARCH_ELEMENTS_ACCELERATOR = 2 ** 25


@dataclass(frozen=True)
class QuantConfig:
    """How one layer is quantized: bits per weight, group size (0 = one group per output row), grid kind, clipping."""

    bits: int
    group_size: int = 0
    symmetric: bool = False
    clip_search: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer from 2 to 8, got {self.bits!r}.")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise ValueError(f"group_size must be 0 (per output channel) or a positive number of input columns, "
                             f"got {self.group_size!r}.")

    @property
    def max_level(self) -> int:
        """The largest integer on the grid, 2^b − 1."""
        return 2 ** self.bits - 1

    @property
    def symmetric_zero(self) -> int:
        """The zero point of the symmetric grid, 2^(b−1)."""
        return 2 ** (self.bits - 1)


class GridParams(NamedTuple):
    """Scale and zero point of each row of a block of columns, shaped (rows, 1) to broadcast over the columns."""

    scale: Tensor
    zero: Tensor


def group_width(d_in: int, cfg: QuantConfig) -> int:
    """Columns per group; the last group is shorter when the width does not divide d_in."""
    return d_in if cfg.group_size == 0 else min(cfg.group_size, d_in)


def group_spans(d_in: int, cfg: QuantConfig) -> list[tuple[int, int]]:
    """The [start, end) column ranges of the groups, left to right."""
    width = group_width(d_in, cfg)
    return [(start, min(start + width, d_in)) for start in range(0, d_in, width)]


def quantize_dequantize(W: Tensor, params: GridParams, cfg: QuantConfig) -> Tensor:
    """Round W onto the grid and map it back: `s · (clamp(round(w / s + z), 0, 2^b − 1) − z)`."""
    levels = torch.clamp(torch.round(W / params.scale + params.zero), 0, cfg.max_level)
    return params.scale * (levels - params.zero)


def _params_for_range(low: Tensor, high: Tensor, cfg: QuantConfig) -> GridParams:
    """Grid parameters for ranges [low, high] (low ≤ 0 ≤ high), elementwise over any shape."""
    if cfg.symmetric:
        scale = fp16_ceil(2 * torch.maximum(-low, high) / cfg.max_level)
        return GridParams(scale, torch.full_like(scale, cfg.symmetric_zero))
    scale = fp16_ceil((high - low) / cfg.max_level)
    return GridParams(scale, torch.round(-low / scale))


def fp16_ceil(step: Tensor) -> Tensor:
    """The smallest float16 value ≥ step (clamped to [MIN_SCALE, MAX_SCALE]), in the dtype of step."""
    step = torch.clamp(step, MIN_SCALE, MAX_SCALE)
    half = step.half()
    up = torch.nextafter(half, torch.full_like(half, math.inf))
    return torch.where(half.to(step.dtype) < step, up, half).to(step.dtype)


def _search_chunk(device: torch.device) -> int:
    """Candidate elements per chunk of the clipping search on this device."""
    return CLIP_SEARCH_ELEMENTS if device.type == "cpu" else CLIP_SEARCH_ELEMENTS_ACCELERATOR


def _candidate_errors(block: Tensor, scale: Tensor, zero: Tensor, cfg: QuantConfig, H: Tensor | None,
                      buffers: list[Tensor]) -> Tensor:
    """Per candidate grid and row: `δ H δᵀ`, or `‖δ‖²` without a Hessian, with `δ = quantize_dequantize(block) − block`.

    block: rows × cols; scale, zero: candidates × rows. δ is computed with the operations of `quantize_dequantize`, in
    the same order (so it is the same to the last bit), but in place in buffers reused from one chunk to the next: no
    temporaries, and on a CPU a chunk small enough to stay in cache. Float32 throughout, like the weights.
    """
    n_candidates, rows = scale.shape
    cols = block.shape[1]
    size = n_candidates * rows * cols
    if not buffers or buffers[0].numel() < size:
        buffers[:] = [block.new_empty(size), block.new_empty(0 if H is None else size)]
    delta = buffers[0][:size].view(n_candidates, rows, cols)
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    torch.div(block, scale, out=delta)
    delta.add_(zero).round_().clamp_(0, cfg.max_level).sub_(zero).mul_(scale).sub_(block)
    flat = delta.view(-1, cols)
    if H is None:
        return flat.square_().sum(dim=-1).view(n_candidates, rows)
    weighted = torch.mm(flat, H, out=buffers[1][:size].view(-1, cols))  # one matmul for all candidates and rows
    return weighted.mul_(flat).sum(dim=-1).view(n_candidates, rows)


@torch.no_grad()
def _best_clipped(block: Tensor, low: Tensor, high: Tensor, cfg: QuantConfig, H: Tensor | None) -> GridParams:
    """Per row, the grid of the shrink factor with the least error (the first, i.e. widest, on ties).

    Exhaustive over `CLIP_FACTORS`. The candidates (factors × rows × columns) are evaluated in chunks of at most
    `_search_chunk` elements, cut over rows and then over factors.
    """
    factors = torch.tensor(CLIP_FACTORS, dtype=block.dtype, device=block.device).unsqueeze(1)
    block = block.contiguous()
    rows, cols = block.shape
    n_factors = len(CLIP_FACTORS)
    chunk = _search_chunk(block.device)
    row_chunk = max(1, min(rows, chunk // cols))
    factor_chunk = max(1, min(n_factors, chunk // (row_chunk * cols)))
    buffers: list[Tensor] = []
    scales, zeros = [], []
    for start in range(0, rows, row_chunk):
        part = slice(start, start + row_chunk)
        candidates = _params_for_range(factors * low[part], factors * high[part], cfg)  # (factors, rows)
        errors = torch.cat([_candidate_errors(block[part], candidates.scale[f:f + factor_chunk],
                                              candidates.zero[f:f + factor_chunk], cfg, H, buffers)
                            for f in range(0, n_factors, factor_chunk)])
        best = errors.argmin(dim=0, keepdim=True)
        scales.append(candidates.scale.gather(0, best).squeeze(0))
        zeros.append(candidates.zero.gather(0, best).squeeze(0))
    return GridParams(torch.cat(scales), torch.cat(zeros))


def grid_params(block: Tensor, cfg: QuantConfig, H: Tensor | None = None) -> GridParams:
    """Grid of each row of a block of columns (rows × cols, float); H (cols × cols) weights the clipping search."""
    low = torch.clamp(block.min(dim=1).values, max=0)
    high = torch.clamp(block.max(dim=1).values, min=0)
    if cfg.clip_search:
        params = _best_clipped(block, low, high, cfg, None if H is None else H.to(block))
    else:
        params = _params_for_range(low, high, cfg)
    return GridParams(params.scale.unsqueeze(1), params.zero.unsqueeze(1))


def rtn(W: Tensor, cfg: QuantConfig, H: Tensor | None = None) -> Tensor:
    """Round-to-nearest: W (d_out × d_in) dequantized from its grid, same shape and dtype; H guides the clipping."""
    weights = W.float()
    result = torch.empty_like(weights)
    for start, end in group_spans(W.shape[1], cfg):
        block = weights[:, start:end]
        hessian = None if H is None else H[start:end, start:end]
        result[:, start:end] = quantize_dequantize(block, grid_params(block, cfg, hessian), cfg)
    return result.to(W.dtype)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise (half precision is too coarse for traces)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _row_hessian_product(G: Tensor, delta: Tensor) -> Tensor:
    """`G ΔW` for a full G (d_out × d_out) or one block per head (n_heads × d_h × d_h, rows ordered by head)."""
    d_out = delta.shape[0]
    if G.dim() == 2:
        if G.shape != (d_out, d_out):
            raise ValueError(f"A full row Hessian must be {d_out} × {d_out}, got {tuple(G.shape)}.")
        return G @ delta
    if G.dim() != 3 or G.shape[1] != G.shape[2] or G.shape[0] * G.shape[1] != d_out:
        raise ValueError(f"Row Hessians per head must be (n_heads, d_h, d_h) with n_heads · d_h = {d_out}, "
                         f"got {tuple(G.shape)}.")
    n_heads, head_dim, _ = G.shape
    return (G @ delta.reshape(n_heads, head_dim, -1)).reshape(d_out, -1)


def layer_error(W: Tensor, Wq: Tensor, H: Tensor, G: Tensor | None = None) -> float:
    """`tr(ΔW H ΔWᵀ)`, or `tr(G ΔW H ΔWᵀ)` with a row Hessian G (full, or per head as (n_heads, d_h, d_h))."""
    if W.shape != Wq.shape:
        raise ValueError(f"W and Wq differ in shape: {tuple(W.shape)} and {tuple(Wq.shape)}.")
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"H must be {W.shape[1]} × {W.shape[1]} for W of shape {tuple(W.shape)}, "
                         f"got {tuple(H.shape)}.")
    dtype = _compute_dtype(W, Wq, H, *([] if G is None else [G]))
    delta = Wq.to(dtype) - W.to(dtype)
    weighted = delta if G is None else _row_hessian_product(G.to(delta), delta)
    return float(((weighted @ H.to(delta)) * delta).sum())


def packed_bits(d_out: int, d_in: int, cfg: QuantConfig) -> float:
    """Storage of a d_out × d_in layer in bits: the codes plus an fp16 scale and an fp16 zero per row and group.

    (our choice) the zero is counted for symmetric grids too, as docs/algorithms.md §6 counts `2·16/g` bits per weight.
    """
    n_groups = math.ceil(d_in / group_width(d_in, cfg))
    return float(d_out * d_in * cfg.bits + d_out * n_groups * 2 * FP16_BITS)


@dataclass(frozen=True)
class GridCodes:
    """A layer's weights as a packed format stores them: integer codes `0 … 2^b − 1` (d_out × d_in), and per output row
    and group a float16 scale and an integer zero point (d_out × n_groups); weight = scale · (code − zero)."""

    codes: Tensor  # uint8
    scales: Tensor  # float16
    zeros: Tensor  # uint8
    cfg: QuantConfig

    def group_index(self) -> Tensor:
        """The group of each input column (GPTQ's g_idx), int32."""
        width = group_width(self.codes.shape[1], self.cfg)
        return torch.arange(self.codes.shape[1], dtype=torch.int32) // width

    def dequantize(self) -> Tensor:
        """The weights in float32 (exact: a float16 scale times a small integer is a float32 value)."""
        index = self.group_index().long()
        levels = self.codes.float() - self.zeros.float()[:, index]
        return self.scales.float()[:, index] * levels


def _codes_of_block(block: Tensor, cfg: QuantConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Scale, zero and codes of each row of one group (rows × cols, in the weights' dtype) whose values `s · (q − z)`,
    computed in float32 and cast to that dtype, are the block's values exactly.

    A row's smallest nonzero |value| is `s · k` for an integer 1 ≤ k ≤ 2^b − 1, rounded to the dtype, so s is among
    the float16 values next to `fp16(that / k)` (SCALE_NEIGHBOURS of them on each side; float32 weights are not
    rounded, so there it is that value): the smallest k, then the nearest candidate, whose grid holds every value
    within the code range wins. An all-zero row gets the grid the quantizer gives it (MIN_SCALE). Rows that no
    candidate fits are not on such a grid: ValueError.
    """
    rows = block.shape[0]
    exact = block.double()  # every float32, bfloat16 or float16 value, exactly
    magnitude = torch.where(exact == 0, torch.inf, exact.abs())
    smallest = magnitude.min(dim=1).values
    scale = torch.full((rows,), MIN_SCALE, dtype=torch.float64)
    zero = torch.full((rows,), cfg.symmetric_zero if cfg.symmetric else 0, dtype=torch.float64)
    pending = torch.isfinite(smallest)
    reach = SCALE_NEIGHBOURS[block.dtype]
    offsets = sorted(range(-reach, reach + 1), key=abs)  # the nearest float16 first
    steps = (0, -1, 1) if reach else (0,)
    for k in range(1, cfg.max_level + 1):
        if not pending.any():
            break
        tried = pending.clone()
        estimate = smallest / k
        if reach:  # rounded values: where k can be the smallest value's level, a scale fitted to all of the row's
            tried[pending] = _plausible_levels(exact[pending], estimate[pending])
            estimate[tried] = _fitted_scale(exact[tried], estimate[tried])
        for offset in offsets:
            active = tried & pending
            if not active.any():
                break
            nearest = estimate[active].half()
            candidate = (nearest.view(torch.int16) + offset).view(torch.float16).double()  # positive: bits are ordered
            levels, matches = _levels_on(candidate, exact[active], block[active], steps)
            low, high = levels.min(dim=1).values, levels.max(dim=1).values
            if cfg.symmetric:
                row_zero = torch.full_like(low, cfg.symmetric_zero)
            else:
                row_zero = torch.clamp(-low, min=0)  # the least code is 0 unless every value is positive
            fits = matches & (low + row_zero >= 0) & (high + row_zero <= cfg.max_level) & (candidate > 0) \
                & torch.isfinite(candidate)
            index = active.nonzero().squeeze(1)[fits]
            scale[index], zero[index] = candidate[fits], row_zero[fits]
            pending[index] = False
    if pending.any():
        raise ValueError(f"{int(pending.sum())} row(s) are not on a {cfg.bits}-bit grid with float16 scales.")
    levels, _ = _levels_on(scale, exact, block, steps)
    return scale, zero, levels + zero.unsqueeze(1)


def _plausible_levels(exact: Tensor, scale: Tensor) -> Tensor:
    """Per row, whether the values up to 16 steps of `scale` are each within 2^-6 of their quotient from an integer
    number of steps (twice what a bfloat16 value and a scale one rounding off can move it): a cheap test that rules
    out most wrong levels of the smallest value before the candidate scales are tried."""
    quotient = exact / scale.unsqueeze(1)
    near = quotient.abs() <= 16
    off = (quotient - torch.round(quotient)).abs() <= quotient.abs() * 2.0 ** -6
    return (off | ~near).all(dim=1)


def _fitted_scale(exact: Tensor, scale: Tensor) -> Tensor:
    """The least-squares scale `Σ v ℓ / Σ ℓ²` of each row on the levels that `scale` gives its values: the rounding
    errors of many values average out, so the float16 scale that rounded to them is mostly the nearest one or next to
    it (one value alone leaves it where `scale` was)."""
    levels = torch.round(exact / scale.unsqueeze(1))
    return (exact * levels).sum(dim=1) / (levels * levels).sum(dim=1).clamp(min=1)


def _levels_on(scale: Tensor, exact: Tensor, values: Tensor, steps: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Each value's integer level on its row's `scale` (float64, rows), and whether every value of a row has one.

    A level is the rounded quotient, or with `steps` a neighbour of it: a bfloat16 value is up to 2^-8 off the exact
    `s · ℓ` (relative), so from |ℓ| = 128 on two levels can round to the same value and the quotient can miss ℓ by
    one. Of the levels whose product rounds to the value, the one nearest 0 is taken (it keeps the row's levels in the
    narrowest range of codes)."""
    quotient = torch.round(exact / scale.unsqueeze(1))
    levels = torch.full_like(exact, torch.inf)
    for step in steps:
        level = quotient + step
        holds = (level * scale.unsqueeze(1)).float().to(values.dtype) == values  # the product is exact in float32
        levels = torch.where(holds & (level.abs() < levels.abs()), level, levels)
    return levels, torch.isfinite(levels).all(dim=1)


def recover_codes(weight: Tensor, cfg: QuantConfig) -> GridCodes:
    """The codes, scales and zero points of dequantized weights: `GridCodes.dequantize()` gives back exactly the float32
    weights (which need not be the grid the quantizer chose when several hold the same values, e.g. a GPTQ group whose
    least code ended above 0: the same values, codes shifted). The weights of a bfloat16 or float16 model were rounded
    to that dtype after quantization (`s · (q − z)` computed in float32, then cast): for them the dequantized values
    round to the weights exactly, on the first float16 scale next to the rounded one that does so. ValueError when a
    row-group is not on any such grid of `cfg` (weights that were not quantized with it, or were changed since)."""
    values = weight.detach().cpu()
    values = values.float() if values.dtype == torch.float64 else values  # its float32 values, as a model holds them
    if values.dtype not in SCALE_NEIGHBOURS:
        raise ValueError(f"Weights in {values.dtype} cannot be read as a grid; give them in float32, bfloat16 or "
                         f"float16.")
    spans = group_spans(values.shape[1], cfg)
    scales, zeros, codes = [], [], []
    for start, end in spans:
        scale, zero, block_codes = _codes_of_block(values[:, start:end], cfg)
        scales.append(scale)
        zeros.append(zero)
        codes.append(block_codes)
    return GridCodes(torch.cat(codes, dim=1).to(torch.uint8), torch.stack(scales, dim=1).half(),
                     torch.stack(zeros, dim=1).to(torch.uint8), cfg)
