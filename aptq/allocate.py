"""Bit budget → mixed-precision plan, from the cached sensitivity tables alone (docs/algorithms.md §10).

Reads `layers[layer, block, kind, fused, n_params, score (, d_in, trace_lm, trace_attention, trace_layerwise,
residual_ms)]` and `errors[layer, bits, err_layerwise, err_attention (, group_size)]` as written by aptq.sensitivity;
never touches the model, so a plan takes milliseconds.

Predicted errors in one unit (our choice; the papers sum raw errors): each Hessian measures a layer's error where
that Hessian lives — the value projection's before the out projection, q/k's in the attention scores, gate/up's in
their own outputs — and blocks further down work on a residual stream hundreds of times larger than the first ones,
so raw errors of different layers cannot be summed. Every error is multiplied by

    tr(H_LM) / tr(H_metric) / residual_ms

the layer's APTQ trace (taken at the attention or MLP output) over the trace of the Hessian the error used, which
moves the error to the module output (o and down: factor 1 up to Hutchinson's noise), divided by the median per-token
‖h‖² of the residual stream that output is added to: pre-norm blocks read the stream through a normalization, so a
later block sees an error relative to the stream's size. Measured on the embedded model (bench/results/sweep.md): at
3.0 bits with RTN the raw sum gave perplexity 722, the module-output sum 3393, this relative sum 113 (uniform 3-bit:
124). The knapsacks minimize and the summaries report these converted sums. A layers table without the trace and
residual columns (synthetic tables) is used as given.

Methods:
  uniform             every free layer at the widest candidate that fits the budget once pins are charged
  aptq                the APTQ paper's rule: sorted by score, the least sensitive layers take the low width until the
                      parameter-weighted average meets the budget
  knapsack            min Σ err_attention(l, b_l) (converted, see above) s.t. Σ n_l b_l ≤ budget · Σ n_l:
                      multiple-choice knapsack by DP
  knapsack-layerwise  the same with err_layerwise (converted the same way)
  random              seeded random widths, then lowered at random until the budget holds (for teaching)

Constraints for every method: pins are kept and charged to the budget; per-kind bounds narrow the candidates of a
layer; layers stored fused share one width, so each fused set is one item (summed n_params and errors, a pin on any
member pins the set). The budget counts all layers of the `layers` table; a layer pinned to full precision (16)
counts at 16 bits (our choice: keeping a layer in fp16 costs memory like any other width).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import pandas as pd

from aptq.choices import ALLOCATORS
from aptq.errors import UserError
from aptq.widths import FULL_PRECISION, QUANT_WIDTHS, SCALE_ZERO_BITS

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
MAX_TABLE_CELLS = 1 << 24  # (our choice) DP back-pointer table cap: 16 MiB of int8
LAYER_COLUMNS = ("layer", "block", "kind", "fused", "n_params")
ERROR_COLUMNS = ("layer", "bits", "err_layerwise", "err_attention")
METRIC_TRACES = {"err_attention": "trace_attention", "err_layerwise": "trace_layerwise"}  # the metric's own Hessian
# A plan's predicted total error under each metric: its key in summaries and its column in the runs table.
PREDICTED_ERROR_ATTENTION = "predicted_error_attention"
PREDICTED_ERROR_LAYERWISE = "predicted_error_layerwise"
PREDICTED_ERRORS = {PREDICTED_ERROR_ATTENTION: "err_attention", PREDICTED_ERROR_LAYERWISE: "err_layerwise"}


class AllocationError(UserError, ValueError):
    """A request that cannot be turned into a plan; the message is one sentence that names the fix."""


@dataclass(frozen=True)
class AllocationRequest:
    budget: float  # average bits per weight over all layers of the layers table
    method: str = "knapsack"
    candidates: tuple[int, ...] = (2, 3, 4, 8)
    pins: Mapping[str, int] = field(default_factory=dict)  # layer → bits (2–8, or 16 = full precision)
    min_bits: Mapping[str, int] = field(default_factory=dict)  # kind → lowest allowed width
    max_bits: Mapping[str, int] = field(default_factory=dict)  # kind → highest allowed width
    low_high: tuple[int, int] = (2, 4)  # the aptq rule's two widths
    seed: int = 0  # for method "random"
    group_size: int = 128  # columns per scale/zero group (0 = per output channel): selects errors, effective bits


@dataclass(frozen=True)
class Plan:
    bits: dict[str, int]  # every layer of the layers table → its width
    request: AllocationRequest
    notes: tuple[str, ...] = ()  # what the solver did, e.g. the uniform width used or the knapsack resolution


@dataclass(frozen=True)
class _Problem:
    """The request in solver form: one row per fused set, one column per width."""

    widths: np.ndarray  # (m,) sorted: the candidates plus any pinned quantized width
    n: np.ndarray  # (S,) int64 parameters per free set
    allowed: np.ndarray  # (S, m) bool: candidate within the set's kind bounds
    err: np.ndarray  # (S, m) summed predicted error of the set at each width (metric of the method)
    score: np.ndarray  # (S,) parameter-weighted mean score (aptq only)
    capacity: int  # bit·params left for the free sets once pins are charged
    pinned_cost: int  # bit·params of the pinned sets
    total_params: int


def allocate(layers: pd.DataFrame, errors: pd.DataFrame, request: AllocationRequest) -> Plan:
    """Turn `request.budget` into one width per layer with `request.method` (see the module docstring)."""
    _check_request(request)
    names = layers["layer"].astype(str).to_numpy()
    set_of_layer, set_names = pd.factorize(_fused_sets(layers), sort=False)
    pinned = _fused_set_pins(request.pins, names, set_of_layer, len(set_names))
    problem, free = _build_problem(layers, errors, request, names, set_of_layer, pinned)
    choice, notes = _solve(problem, request)
    set_bits = pinned.copy()
    set_bits[free] = problem.widths[choice]
    return Plan({name: int(b) for name, b in zip(names, set_bits[set_of_layer])}, request, tuple(notes))


def summarize(plan: Plan, layers: pd.DataFrame, errors: pd.DataFrame) -> dict:
    """Headline numbers of a plan: bits, effective bits with scale/zero overhead, size, predicted errors, per kind.

    Effective bits add 2·16 bits (fp16 scale and zero) per group of `group_size` columns of each quantized row: with
    the `d_in` column that is 32·⌈d_in/g⌉/d_in (the last group may be shorter), per channel (g = 0) 32/d_in. Without
    `d_in` a group of g counts as 32/g, and per channel takes d_in ≈ √n_params (our choice: exact for square layers).
    Sizes are of the quantizable linear weights only, in MB of 10⁶ bytes.
    """
    bits = layers["layer"].map(plan.bits).to_numpy(dtype=np.int64)
    n = layers["n_params"].to_numpy(dtype=np.int64)
    total = int(n.sum())
    size = weight_size(layers, bits, plan.request.group_size)
    per_kind = pd.DataFrame({"kind": layers["kind"].to_numpy(), "nb": n * bits, "n": n})
    by_kind = per_kind.groupby("kind", sort=False).sum()
    widths, counts = np.unique(bits, return_counts=True)
    return {
        "method": plan.request.method,
        "budget": float(plan.request.budget),
        "group_size": int(plan.request.group_size),
        "n_layers": len(layers),
        "n_params": total,
        **size,
        "fp16_size_mb": total * FULL_PRECISION / 8e6,
        "compression": total * FULL_PRECISION / 8e6 / size["size_mb"],
        **{name: _predicted_error(plan, layers, errors, metric) for name, metric in PREDICTED_ERRORS.items()},
        "bits_by_kind": {str(k): float(row.nb / row.n) for k, row in by_kind.iterrows()},
        "layers_by_bits": {int(w): int(c) for w, c in zip(widths, counts)},
        "notes": list(plan.notes),
    }


def weight_size(layers: pd.DataFrame, bits: np.ndarray, group_size: int) -> dict[str, float]:
    """avg_bits, effective_bits (with scale/zero overhead) and size_mb of the layers' weights at `bits` each
    (16 = kept in fp16, no overhead); see summarize."""
    n = layers["n_params"].to_numpy(dtype=np.int64)
    stored = bits + _overhead_bits(layers, group_size) * (bits < FULL_PRECISION)
    return {"avg_bits": float((n * bits).sum() / n.sum()), "effective_bits": float((n * stored).sum() / n.sum()),
            "size_mb": float((n * stored).sum()) / 8e6}


def plan_frame(plan: Plan, layers: pd.DataFrame) -> pd.DataFrame:
    """One row per layer (block, kind, layer, bits): the input of the plan heatmap."""
    frame = layers[["block", "kind", "layer"]].reset_index(drop=True)
    return frame.assign(bits=frame["layer"].map(plan.bits).astype(int))


# ---- validation ---------------------------------------------------------------------------------------------------

def _fmt(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")


def _fmt_up(value: float) -> str:
    """Rounded up to 3 decimals, so that 'raise the budget to X' really suffices."""
    return _fmt(math.ceil(round(value * 1000, 6)) / 1000)


def _fmt_down(value: float) -> str:
    return _fmt(math.floor(round(value * 1000, 6)) / 1000)


def _check_request(request: AllocationRequest) -> None:
    if request.method not in ALLOCATORS:
        raise AllocationError(f"Unknown method {request.method!r}; use one of {', '.join(ALLOCATORS)}.")
    if not request.candidates:
        raise AllocationError("The candidate set is empty; pick at least one width between 2 and 8 bits.")
    outside = sorted({int(c) for c in request.candidates} - set(QUANT_WIDTHS))
    if outside:
        raise AllocationError(f"Candidate widths must be between 2 and 8 bits; remove {outside}.")
    if not math.isfinite(request.budget) or request.budget < min(request.candidates):
        raise AllocationError(f"The budget {_fmt(request.budget)} bits per weight is below the smallest candidate "
                              f"width ({min(request.candidates)} bits); raise it to at least {min(request.candidates)} "
                              f"or add a narrower candidate.")
    for bounds, label in ((request.min_bits, "min_bits"), (request.max_bits, "max_bits")):
        unknown = sorted(set(bounds) - set(KINDS))
        if unknown:
            raise AllocationError(f"{label} names unknown layer kinds {unknown}; use any of {', '.join(KINDS)}.")
    if request.method == "aptq":
        low, high = request.low_high
        if not low < high or {low, high} - set(request.candidates):
            raise AllocationError(f"The aptq widths {tuple(request.low_high)} must be two candidate widths, low below "
                                  f"high; pick them from {tuple(sorted(request.candidates))}.")


def _fused_sets(layers: pd.DataFrame) -> pd.Series:
    """Each layer's fused set (the layers sharing one width): the `fused` column, or the layer's own name where it is
    empty (not fused)."""
    missing = sorted(set(LAYER_COLUMNS) - set(layers.columns))
    if missing:
        raise AllocationError(f"The layers table lacks columns {missing}; pass the sensitivity analysis's table.")
    if layers.empty:
        raise AllocationError("The layers table is empty; run the sensitivity analysis first.")
    if layers["layer"].duplicated().any():
        raise AllocationError(f"The layers table lists {layers['layer'][layers['layer'].duplicated()].iloc[0]} twice; "
                              f"keep one row per layer.")
    fused = layers["fused"]
    return fused.where(fused.notna() & (fused.astype(str) != ""), layers["layer"]).astype(str)


def _fused_set_pins(pins: Mapping[str, int], names: np.ndarray, set_of_layer: np.ndarray, n_sets: int) -> np.ndarray:
    """Pinned width per fused set, 0 where free; a pin on one member applies to the whole set."""
    position = {name: i for i, name in enumerate(names)}
    unknown = [name for name in pins if name not in position]
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise AllocationError(f"Pins name {len(unknown)} unknown layer(s) ({shown}); pin layers of the layers table.")
    pinned = np.zeros(n_sets, dtype=np.int64)
    pinned_by: dict[int, str] = {}
    for name, width in pins.items():
        if int(width) not in (*QUANT_WIDTHS, FULL_PRECISION) or int(width) != width:
            raise AllocationError(f"{name} is pinned to {width} bits; pin widths must be 2–8 or 16 (full precision).")
        fused_set = set_of_layer[position[name]]
        if pinned[fused_set] and pinned[fused_set] != width:
            raise AllocationError(f"{pinned_by[fused_set]} and {name} are stored fused and share one width, but are "
                                  f"pinned to {pinned[fused_set]} and {width} bits; pin them to the same width.")
        pinned[fused_set], pinned_by[fused_set] = int(width), name
    return pinned


# ---- problem construction -----------------------------------------------------------------------------------------

def _build_problem(layers: pd.DataFrame, errors: pd.DataFrame, request: AllocationRequest, names: np.ndarray,
                   set_of_layer: np.ndarray, pinned: np.ndarray) -> tuple[_Problem, np.ndarray]:
    n_sets = len(pinned)
    pin_widths = {int(w) for w in pinned if 0 < w < FULL_PRECISION}
    widths = np.array(sorted(set(int(c) for c in request.candidates) | pin_widths), dtype=np.int64)
    n_layer = layers["n_params"].to_numpy(dtype=np.int64)
    n_set = np.bincount(set_of_layer, weights=n_layer, minlength=n_sets).round().astype(np.int64)
    layer_allowed = _kind_allowed(layers, widths, request)
    # A set may use a width only if every member may (members of a fused set can differ in kind).
    set_allowed = np.stack([np.bincount(set_of_layer, weights=~layer_allowed[:, j], minlength=n_sets) == 0
                              for j in range(len(widths))], axis=1)
    free = pinned == 0
    _check_bounds(set_allowed, free, layers, set_of_layer)
    metric = "err_layerwise" if request.method == "knapsack-layerwise" else "err_attention"
    layer_err = _error_matrix(layers, errors, names, widths, metric, request.group_size)
    _check_coverage(layer_err, set_allowed[set_of_layer] & free[set_of_layer, None], pinned[set_of_layer], names,
                    widths)
    set_err = np.stack([np.bincount(set_of_layer, weights=np.nan_to_num(layer_err[:, j]), minlength=n_sets)
                          for j in range(len(widths))], axis=1)
    score = np.zeros(n_sets)
    if request.method == "aptq":
        if "score" not in layers.columns:
            raise AllocationError("The layers table has no score column; the aptq rule needs the sensitivity scores.")
        layer_score = layers["score"].to_numpy(dtype=float)
        score = np.bincount(set_of_layer, weights=layer_score * n_layer, minlength=n_sets) / n_set
        # Unfused layers keep their score exactly: rounding in the weighted mean must not reorder equal scores.
        single = np.bincount(set_of_layer, minlength=n_sets)[set_of_layer] == 1
        score[set_of_layer[single]] = layer_score[single]
    total = int(n_layer.sum())
    pinned_cost = int((n_set * pinned).sum())
    capacity = math.floor(Fraction(request.budget) * total) - pinned_cost  # exact: no float rounding at the budget
    problem = _Problem(widths, n_set[free], set_allowed[free], set_err[free], score[free], capacity, pinned_cost,
                       total)
    _check_feasible(problem, request)
    return problem, free


def _kind_allowed(layers: pd.DataFrame, widths: np.ndarray, request: AllocationRequest) -> np.ndarray:
    """(L, m): the width is a candidate and within the layer kind's bounds."""
    kinds = layers["kind"].astype(str)
    low = kinds.map(request.min_bits).fillna(0).to_numpy(dtype=float)
    high = kinds.map(request.max_bits).fillna(FULL_PRECISION).to_numpy(dtype=float)
    candidate = np.isin(widths, np.array(request.candidates))
    return candidate & (widths >= low[:, None]) & (widths <= high[:, None])


def _check_bounds(set_allowed: np.ndarray, free: np.ndarray, layers: pd.DataFrame, set_of_layer: np.ndarray) -> None:
    empty = np.flatnonzero(free & ~set_allowed.any(axis=1))
    if len(empty):
        member = np.flatnonzero(set_of_layer == empty[0])[0]
        raise AllocationError(f"No candidate width fits the per-kind bounds of {layers['layer'].iloc[member]} "
                              f"(kind {layers['kind'].iloc[member]}); widen min_bits/max_bits or add a candidate.")


def _error_matrix(layers: pd.DataFrame, errors: pd.DataFrame, names: np.ndarray, widths: np.ndarray,
                  metric: str, group_size: int) -> np.ndarray:
    """(L, m) predicted error of each layer at each width, in one unit; NaN where the table has no row."""
    missing = sorted(set(ERROR_COLUMNS) - set(errors.columns))
    if missing:
        raise AllocationError(f"The errors table lacks columns {missing}; pass the sensitivity analysis's table.")
    errors = comparable_errors(layers, _errors_for_group(errors, group_size), metric)
    row = pd.Index(names).get_indexer(errors["layer"])
    bits = errors["bits"].to_numpy(dtype=np.int64)
    col = np.minimum(np.searchsorted(widths, bits), len(widths) - 1)
    keep = (row >= 0) & (widths[col] == bits)
    row, col = row[keep], col[keep]
    if len(np.unique(row * len(widths) + col)) < len(row):
        raise AllocationError("The errors table has several rows for one (layer, bits); keep one group size.")
    matrix = np.full((len(names), len(widths)), np.nan)
    matrix[row, col] = errors[metric].to_numpy(dtype=float)[keep]
    return matrix


def _errors_for_group(errors: pd.DataFrame, group_size: int) -> pd.DataFrame:
    """The rows for the request's group size, when the table says which group size each row used."""
    if "group_size" not in errors.columns:
        return errors
    sizes = errors["group_size"].unique()
    if len(sizes) == 1 and sizes[0] == group_size:
        return errors
    if group_size not in sizes:
        raise AllocationError(f"The predicted errors were computed for group size(s) {sorted(int(s) for s in sizes)}, "
                              f"not {group_size}; set group_size to one of them or rerun the analysis.")
    return errors[errors["group_size"] == group_size]


def comparable_errors(layers: pd.DataFrame, errors: pd.DataFrame, metric: str) -> pd.DataFrame:
    """`errors` with `metric` × tr(H_LM) / tr(H_metric) / residual_ms per layer: the unit in which the solvers sum
    them (see the module docstring)."""
    trace = METRIC_TRACES[metric]
    if not {"trace_lm", trace, "residual_ms"} <= set(layers.columns):
        return errors
    # A zero trace (inputs all zero) means zero error anyway; a missing value leaves the error as it is.
    own = layers[trace].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = layers["trace_lm"].to_numpy(dtype=float) / own / layers["residual_ms"].to_numpy(dtype=float)
    factor = np.append(np.where((own > 0) & np.isfinite(factor), factor, 1.0), 1.0)  # last: layers not in the table
    row = pd.Index(layers["layer"]).get_indexer(errors["layer"])  # −1 → the appended 1.0
    return errors.assign(**{metric: errors[metric].to_numpy(dtype=float) * factor[row]})


def _check_coverage(layer_err: np.ndarray, needed: np.ndarray, layer_pins: np.ndarray, names: np.ndarray,
                    widths: np.ndarray) -> None:
    """Every width a layer may get (its candidates, or its pin below 16) needs a predicted error."""
    needed = needed | (widths[None, :] == layer_pins[:, None])
    gaps = np.argwhere(needed & ~np.isfinite(layer_err))
    if len(gaps):
        layer, col = gaps[0]
        raise AllocationError(f"The errors table has no predicted error for {names[layer]} at {widths[col]} bits; "
                              f"rerun the analysis with that width or remove it from the candidates and pins.")


def _check_feasible(problem: _Problem, request: AllocationRequest) -> None:
    """The budget lies between the least and the most that the pins and bounds allow."""
    total = problem.total_params
    least_cost = problem.pinned_cost + _cost(problem, _smallest_allowed(problem))
    if least_cost > problem.pinned_cost + problem.capacity:
        sources = (("the pins", request.pins), ("the per-kind minimums", request.min_bits))
        causes = " and ".join(name for name, present in sources if present) or "the candidates"
        least = least_cost / total
        pins_part = f" ({_fmt(problem.pinned_cost / total)} of it from the pins)" if request.pins else ""
        raise AllocationError(f"With {causes}, the plan needs at least {_fmt_up(least)} bits per weight on average "
                              f"over the quantized weights{pins_part}; the budget is {_fmt(request.budget)} — lower "
                              f"the pins or bounds, or raise the budget to at least {_fmt_up(least)}.")
    most = (problem.pinned_cost + _cost(problem, _largest_allowed(problem))) / total
    limit = max(max(request.candidates), most)
    if request.budget > limit:
        raise AllocationError(f"The budget {_fmt(request.budget)} bits per weight is above the largest candidate width "
                              f"({max(request.candidates)} bits); lower it to at most {_fmt_down(limit)} or add a "
                              f"wider candidate.")


def _smallest_allowed(problem: _Problem) -> np.ndarray:
    return problem.allowed.argmax(axis=1)


def _largest_allowed(problem: _Problem) -> np.ndarray:
    return problem.allowed.shape[1] - 1 - problem.allowed[:, ::-1].argmax(axis=1)


# ---- solvers: each returns one width column per free fused set -------------------------------------------------

def _solve(problem: _Problem, request: AllocationRequest) -> tuple[np.ndarray, list[str]]:
    if not len(problem.n):
        return np.zeros(0, dtype=np.int64), ["every layer is pinned"]
    if request.method == "uniform":
        return _uniform(problem)
    if request.method == "aptq":
        return _aptq(problem, request)
    if request.method == "random":
        return _random(problem, request.seed), [f"random widths (seed {request.seed}), lowered to the budget"]
    return _knapsack(problem)


def _cost(problem: _Problem, choice: np.ndarray) -> int:
    return int((problem.n * problem.widths[choice]).sum())


def _nearest_allowed_below(problem: _Problem, width: int) -> np.ndarray:
    """Per set: the widest allowed width ≤ `width`, else its narrowest allowed width."""
    below = problem.allowed & (problem.widths <= width)
    widest_below = below.shape[1] - 1 - below[:, ::-1].argmax(axis=1)
    return np.where(below.any(axis=1), widest_below, _smallest_allowed(problem))


def _nearest_allowed_above(problem: _Problem, width: int) -> np.ndarray:
    """Per set: the narrowest allowed width ≥ `width`, else its widest allowed width."""
    above = problem.allowed & (problem.widths >= width)
    return np.where(above.any(axis=1), above.argmax(axis=1), _largest_allowed(problem))


def _uniform(problem: _Problem) -> tuple[np.ndarray, list[str]]:
    """The widest candidate that fits; sets whose bounds exclude it take their nearest allowed width below."""
    candidate_widths = problem.widths[problem.allowed.any(axis=0)]
    for width in sorted(candidate_widths, reverse=True):
        choice = _nearest_allowed_below(problem, width)
        if _cost(problem, choice) <= problem.capacity:
            clamped = int((problem.widths[choice] != width).sum())
            note = f"uniform width {width} bits" + (f" ({clamped} fused set(s) held by per-kind bounds)"
                                                    if clamped else "")
            return choice, [note]
    raise AssertionError("unreachable: _check_feasible guarantees the narrowest widths fit")


def _aptq(problem: _Problem, request: AllocationRequest) -> tuple[np.ndarray, list[str]]:
    """Least sensitive sets (lowest score) take the low width, in order, until the budget holds (APTQ §3).

    Groups whose bounds exclude a width take the nearest allowed one (our choice).
    """
    low_pick = _nearest_allowed_above(problem, request.low_high[0])
    high_pick = _nearest_allowed_below(problem, request.low_high[1])
    low_pick, high_pick = np.minimum(low_pick, high_pick), np.maximum(low_pick, high_pick)
    order = np.argsort(problem.score, kind="stable")
    savings = np.cumsum((problem.n * (problem.widths[high_pick] - problem.widths[low_pick]))[order])
    excess = _cost(problem, high_pick) - problem.capacity
    n_low = 0 if excess <= 0 else int(np.searchsorted(savings, excess)) + 1
    if n_low > len(order):
        floor_avg = (problem.pinned_cost + _cost(problem, low_pick)) / problem.total_params
        raise AllocationError(f"The aptq rule needs at least {_fmt_up(floor_avg)} bits on average with every free "
                              f"layer at its low width; the budget is {_fmt(request.budget)} — raise the budget or "
                              f"choose a lower low width.")
    choice = high_pick.copy()
    choice[order[:n_low]] = low_pick[order[:n_low]]
    return choice, [f"aptq: {n_low} of {len(order)} fused set(s) at the low width"]


def _random(problem: _Problem, seed: int) -> np.ndarray:
    """Uniformly random allowed widths, then random sets step down one allowed width until the budget holds."""
    rng = np.random.default_rng(seed)
    choice = np.where(problem.allowed, rng.random(problem.allowed.shape), -1.0).argmax(axis=1)
    cost = _cost(problem, choice)
    while cost > problem.capacity:
        lowerable = np.flatnonzero(choice > _smallest_allowed(problem))
        item = rng.choice(lowerable)
        lower = np.flatnonzero(problem.allowed[item, :choice[item]])[-1]
        cost -= int(problem.n[item] * (problem.widths[choice[item]] - problem.widths[lower]))
        choice[item] = lower
    return choice


def _knapsack(problem: _Problem) -> tuple[np.ndarray, list[str]]:
    """Multiple-choice knapsack: min Σ err subject to Σ n·b ≤ capacity, by DP over the spare budget.

    Each set starts at its narrowest allowed width; the DP spends the spare bit·params on widening. Costs are
    integers in units of gcd(n_params) (real models share a large gcd, e.g. 110592 for SmolLM2-135M), which makes the
    DP exact. When that table would exceed MAX_TABLE_CELLS, the unit grows and each cost is rounded *up* to whole
    units: the plan then never exceeds the budget and is optimal up to that resolution (it may leave less than one
    unit per set of the budget unused).
    """
    err = np.where(problem.allowed, problem.err, np.inf)
    base = _smallest_allowed(problem)
    extra = problem.n[:, None] * (problem.widths[None, :] - problem.widths[base][:, None])
    spare = problem.capacity - _cost(problem, base)
    if spare >= int(np.where(problem.allowed, extra, 0).max(axis=1).sum()):
        return err.argmin(axis=1), ["knapsack: the budget covers every set's least-error width"]
    unit = int(np.gcd.reduce(problem.n))
    n_sets = len(problem.n)
    if n_sets * (spare // unit + 1) > MAX_TABLE_CELLS:
        unit = -(-spare // (MAX_TABLE_CELLS // n_sets - 1))  # the smallest unit whose table fits
        slack = n_sets * unit / problem.total_params  # rounding adds under one unit per set
        note = (f"knapsack: costs rounded up to units of {unit} weights: never over the budget, and at least as good "
                f"as the exact optimum at {slack:.2g} bits per weight less")
    else:
        note = f"knapsack: exact (costs in units of gcd(n_params) = {unit} weights)"
    costs = np.where(problem.allowed, -(-extra // unit), -1)
    return _knapsack_dp(costs, err, spare // unit), [note]


def _knapsack_dp(costs: np.ndarray, err: np.ndarray, capacity: int) -> np.ndarray:
    """best[k] = least error of the sets so far within k units; back-pointers keep each set's choice per k.

    Each set's narrowest allowed width costs 0; wider widths replace it where they do better (running element-wise
    minima keep every pass contiguous). Only a window of k is live for set i: below K − (what the later sets can
    still spend) nothing is ever read again, and above what the sets so far can spend at most, best is flat.
    """
    n_sets = costs.shape[0]
    widest = costs.max(axis=1)
    capacity = min(capacity, int(widest.sum()))
    high = np.minimum(np.cumsum(widest), capacity)
    low = np.maximum(0, capacity - (widest.sum() - np.cumsum(widest)))
    best = np.zeros(capacity + 1)
    picks = np.empty((n_sets, capacity + 1), dtype=np.int8)
    previous_high = 0
    for i in range(n_sets):
        lo, hi = int(low[i]), int(high[i])
        best[previous_high + 1:hi + 1] = best[previous_high]  # flat beyond what the earlier sets can spend
        options = np.flatnonzero(costs[i] >= 0)
        new = best[lo:hi + 1] + err[i, options[0]]
        picks[i, lo:hi + 1] = options[0]
        for j in options[1:]:
            c = int(costs[i, j])
            start = max(lo, c)
            if start > hi:
                continue
            candidate = best[start - c:hi + 1 - c] + err[i, j]
            better = candidate < new[start - lo:]
            np.copyto(new[start - lo:], candidate, where=better)
            np.copyto(picks[i, start:hi + 1], j, where=better)
        best[lo:hi + 1] = new
        previous_high = hi
    choice = np.empty(n_sets, dtype=np.int64)
    k = capacity
    for i in range(n_sets - 1, -1, -1):
        k = min(k, int(high[i]))  # above `high` the table is flat: the same choice is optimal
        choice[i] = picks[i, k]
        k -= costs[i, choice[i]]
    return choice


# ---- summary helpers ----------------------------------------------------------------------------------------------

def _overhead_bits(layers: pd.DataFrame, group_size: int) -> np.ndarray:
    """Scale/zero bits per weight of each layer when quantized (see summarize)."""
    if "d_in" in layers.columns:
        d_in = layers["d_in"].to_numpy(dtype=float)
    else:
        d_in = np.sqrt(layers["n_params"].to_numpy(dtype=float))
        if group_size > 0:
            return np.full(len(layers), SCALE_ZERO_BITS / group_size)
    groups_per_row = np.ceil(d_in / group_size) if group_size > 0 else np.ones_like(d_in)
    return SCALE_ZERO_BITS * groups_per_row / d_in


def _predicted_error(plan: Plan, layers: pd.DataFrame, errors: pd.DataFrame, metric: str) -> float:
    """Σ over layers of the predicted error (in one unit) at the plan's width; full-precision layers add 0; NaN if any
    is missing."""
    chosen = pd.DataFrame({"layer": list(plan.bits), "bits": list(plan.bits.values())})
    quantized = chosen[chosen["bits"] < FULL_PRECISION]
    table = comparable_errors(layers, _errors_for_group(errors, plan.request.group_size), metric)
    table = table[["layer", "bits", metric]]
    merged = quantized.merge(table, on=["layer", "bits"], how="left")
    return float(merged[metric].sum()) if merged[metric].notna().all() else math.nan
