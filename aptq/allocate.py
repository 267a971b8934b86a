"""Bit budget → mixed-precision plan, from the cached sensitivity tables alone (docs/algorithms.md §10).

Reads `layers[layer, block, kind, fused, n_params, score (, d_in, trace_lm, trace_lm_se, trace_attention,
trace_layerwise, residual_ms, kl_rate, kl_rate_se)]` and `errors[layer, bits, err_layerwise, err_attention (,
group_size, err_gptq_*, err_aware_*)]` as written by aptq.sensitivity (kl_rate: aptq.calibrate.with_unit); never
touches the model, so a plan takes milliseconds.

Error source (`AllocationRequest.quantizer`): the solvers use the predicted errors of the quantizer that will run —
round-to-nearest (err_layerwise, err_attention), GPTQ (err_gptq_*) or the attention-aware GPTQ (err_aware_*); each
source has a layer-wise and an attention-aware measure of its ΔW (see aptq.sensitivity). `error_source_for` picks
the source for the quantizer a sweep runs: its own, or RTN's with a sentence when the analysis lacks it.

Predicted errors in one unit (our choice; the papers sum raw errors): each Hessian measures a layer's error where
that Hessian lives — the value projection's before the out projection, q/k's in the attention scores, gate/up's in
their own outputs — and blocks further down work on a residual stream hundreds of times larger than the first ones,
so raw errors of different layers cannot be summed. With the "heuristic" unit every error is multiplied by

    tr(H_LM) / tr(H_metric) / residual_ms

the layer's APTQ trace (taken at the attention or MLP output) over the trace of the Hessian the error used, which
moves the error to the module output (o and down: factor 1 up to Hutchinson's noise), divided by the median per-token
‖h‖² of the residual stream that output is added to: pre-norm blocks read the stream through a normalization, so a
later block sees an error relative to the stream's size. Measured on the embedded model (bench/results/sweep.md): at
3.0 bits with RTN the raw sum gave perplexity 722, the module-output sum 3393, this relative sum 113 (uniform 3-bit:
124). With the "calibrated" unit the factor is measured instead: kl_rate / tr(H_metric), the KL per unit of the
layer's error (aptq.calibrate), so that the converted sum predicts the KL itself. The knapsacks minimize and the
summaries report these converted sums, with a standard error: the factors' standard errors (Hutchinson's trace_lm_se
for the heuristic unit, kl_rate_se for the calibrated one) propagated as a sum of per-layer variances. A layers table
without the trace and residual columns (synthetic tables), or with them empty (analyses stored before they
existed), is used as given; a factor missing for some layers only is refused (never a silent mix of units).

Width multiples (our choice; issue 17's measurement, bench/results/allocation_*.md): each layer's error is
predicted alone on full-precision inputs, but GPTQ-family quantizers run true-sequentially, so a narrow layer also
spoils the inputs every later layer is fitted on, and the KL grows faster than the summed squared errors once errors
are large. The measured KL of a uniform plan over its predicted total is therefore not one constant but grows toward
2 bits. `AllocationRequest.width_multiples` multiplies every layer's predicted error at width b by m_b, with m_b the
measured/predicted ratio of uniform b-bit on held-out calibration segments (`measured_width_multiples`); a width
without a measured ratio takes its nearest measured width's (the wider one on a tie). Only ratios between widths
change a plan; the predicted totals are then in units of the measured KL. The width multiples belong to the
request's own group size; with (bits, group size) candidates `AllocationRequest.grid_multiples` gives other grids
their own (group size → bits → multiple, measured the same way on uniform plans of that grid): the predictions err
differently per grid (Gemma 3: per-channel plans measured 8–11 % above their prediction, groups of 64 13 % below,
bench/results/allocation_attention_pairs_gemma-3-270m-q4_k_m.md), and pairs compare grids. (our choice) A grid
without its own multiples takes the request's group size's.

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

Candidates are widths (at `group_size`) or (bits, group size) pairs, e.g. (3, 64) against (4, 0): with any pair, a
layer's option costs its effective bits (scale/zero overhead included, see summarize) and the budget is read in
effective bits per weight; pairs are for the knapsack methods, and every pair's group size must divide every layer's
d_in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from numbers import Real

import numpy as np
import pandas as pd

from aptq.choices import ALLOCATORS, ERROR_SOLVERS, METHOD_LABELS
from aptq.errors import UserError
from aptq.widths import FULL_PRECISION, QUANT_WIDTHS, SCALE_ZERO_BITS

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
MAX_TABLE_CELLS = 1 << 24  # (our choice) DP back-pointer table cap: 16 MiB of int8
LAYER_COLUMNS = ("layer", "block", "kind", "fused", "n_params")
# A plan's predicted total error under each metric: its key in summaries and its column in the runs table.
PREDICTED_ERROR_ATTENTION = "predicted_error_attention"
PREDICTED_ERROR_LAYERWISE = "predicted_error_layerwise"
PREDICTED_ERRORS = {PREDICTED_ERROR_ATTENTION: "err_attention", PREDICTED_ERROR_LAYERWISE: "err_layerwise"}
# quantizer that will run → its predicted-error columns (layer-wise measure, attention-aware measure)
ERROR_SOURCES = {"rtn": ("err_layerwise", "err_attention"), "gptq": ("err_gptq_layerwise", "err_gptq_attention"),
                 "attention": ("err_aware_layerwise", "err_aware_attention")}
# The quantizer that runs → the error source that predicts it. (our choice) aespa: the attention-aware quantizer's,
# whose result aespa starts from and keeps unless its own attention-wise loss drops (aptq.aespa), so it bounds aespa's.
SOURCE_OF_QUANTIZER = {"rtn": "rtn", "gptq": "gptq", "attention": "attention", "aespa": "attention"}
QUANTIZER_ERRORS_FIX = "rerun the analysis with quantizer errors on (aptq analyze --quantizer-errors)"
METRIC_TRACES = {column: trace for columns in ERROR_SOURCES.values()  # each error column's own Hessian trace
                 for column, trace in zip(columns, ("trace_layerwise", "trace_attention"))}
UNIT_COLUMNS = {"heuristic": ("trace_lm", "trace_lm_se", "residual_ms"), "calibrated": ("kl_rate", "kl_rate_se")}
Candidate = int | tuple[int, int]  # a width at the request's group size, or (bits, group size)


def pair_candidates(widths: Iterable[int], groups: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Every (bits, group size) of the widths and groups, each group once, in the order given."""
    return tuple((int(bits), int(group)) for bits in widths for group in dict.fromkeys(groups))


def equal_bytes_pairs(layers: pd.DataFrame, budget: float, request: AllocationRequest,
                      groups: Iterable[int]) -> AllocationRequest:
    """`request` (its widths at its group size) turned into the knapsack over (bits, group size) pairs of its
    widths and `groups` (the request's group among them) at the effective bits of a `budget`-bit plan in the
    request's groups: the pairs plan stores as many bytes as that plan, so the two compare at one size."""
    effective = weight_size(layers, np.full(len(layers), budget), request.group_size)["effective_bits"]
    widths = tuple(int(c) for c in request.candidates)
    return replace(request, budget=effective, method="knapsack",
                   candidates=pair_candidates(widths, (request.group_size, *groups)))


class AllocationError(UserError, ValueError):
    """A request that cannot be turned into a plan; the message is one sentence that names the fix."""


@dataclass(frozen=True)
class AllocationRequest:
    budget: float  # average bits per weight over all layers of the layers table
    method: str = "knapsack"
    candidates: tuple[Candidate, ...] = (2, 3, 4, 8)
    pins: Mapping[str, int] = field(default_factory=dict)  # layer → bits (2–8, or 16 = full precision)
    min_bits: Mapping[str, int] = field(default_factory=dict)  # kind → lowest allowed width
    max_bits: Mapping[str, int] = field(default_factory=dict)  # kind → highest allowed width
    low_high: tuple[int, int] = (2, 4)  # the aptq rule's two widths
    seed: int = 0  # for method "random"
    group_size: int = 128  # columns per scale/zero group (0 = per output channel): selects errors, effective bits
    quantizer: str = "rtn"  # whose predicted errors the solvers use (ERROR_SOURCES): the quantizer that will run
    unit: str = "heuristic"  # how errors of different layers are made comparable (UNIT_COLUMNS; module docstring)
    width_multiples: Mapping[int, float] = field(default_factory=dict)  # bits → multiple of every layer's predicted
    # error at that width (measured_width_multiples); empty: 1 at every width (module docstring, "Width multiples")
    grid_multiples: Mapping[int, Mapping[int, float]] = field(default_factory=dict)  # group size → bits → multiple,
    # for pair candidates on grids other than group_size (which width_multiples covers); needs width_multiples


@dataclass(frozen=True)
class Plan:
    bits: dict[str, int]  # every layer of the layers table → its width
    request: AllocationRequest
    notes: tuple[str, ...] = ()  # what the solver did, e.g. the uniform width used or the knapsack resolution
    group_sizes: dict[str, int] = field(default_factory=dict)  # per layer, when the candidates were (bits, group)
    # pairs; empty: every layer at request.group_size

    def group_size_of(self, layers: pd.DataFrame) -> np.ndarray:
        """The group size of each layer of `layers` in this plan."""
        return layers["layer"].map(self.group_sizes).fillna(self.request.group_size).to_numpy(dtype=np.int64)

    def layer_groups(self) -> tuple[tuple[str, int], ...]:
        """(layer, group size) of the layers whose group is not the request's, sorted: what the pipeline quantizes
        them with (aptq.pipeline.QuantizeSettings.layer_groups)."""
        return tuple(sorted((name, group) for name, group in self.group_sizes.items()
                            if group != self.request.group_size))


@dataclass(frozen=True)
class _Problem:
    """The request in solver form: one row per fused set, one column per option."""

    widths: np.ndarray  # (m,) bits of each option, sorted: the candidates plus any pinned quantized width
    groups: np.ndarray  # (m,) group size of each option
    n: np.ndarray  # (S,) int64 parameters per free set
    cost: np.ndarray  # (S, m) int64 bit·params of each set at each option (effective bits with pair candidates)
    allowed: np.ndarray  # (S, m) bool: candidate within the set's kind bounds
    err: np.ndarray  # (S, m) summed predicted error of the set at each width (metric of the method)
    score: np.ndarray  # (S,) parameter-weighted mean score (aptq only)
    capacity: int  # bit·params left for the free sets once pins are charged
    pinned_cost: int  # bit·params of the pinned sets
    total_params: int


@dataclass(frozen=True)
class ErrorSourceChoice:
    """The error source plans for a quantizer use, and why, when it is not the quantizer's own."""

    source: str  # a key of ERROR_SOURCES
    note: str | None = None


def available_error_sources(errors: pd.DataFrame) -> list[str]:
    """The error sources (ERROR_SOURCES order, RTN first) whose two columns the errors table fills in every row."""
    return [source for source, columns in ERROR_SOURCES.items()
            if set(columns) <= set(errors.columns) and errors[list(columns)].notna().all().all()]


def error_source_for(errors: pd.DataFrame, quantizer: str) -> ErrorSourceChoice:
    """The error source of plans that `quantizer` (a QUANTIZERS name) will quantize: its own predicted errors when
    the analysis has them, else RTN's (the Bit budget page's default) with the sentence that says so."""
    if quantizer not in SOURCE_OF_QUANTIZER:
        raise AllocationError(f"Unknown quantizer {quantizer!r}; use one of {', '.join(SOURCE_OF_QUANTIZER)}.")
    own = SOURCE_OF_QUANTIZER[quantizer]
    if own == "rtn" or own in available_error_sources(errors):
        return ErrorSourceChoice(own)
    label = METHOD_LABELS[own]
    return ErrorSourceChoice("rtn", f"The analysis has no predicted errors of {label}, so the plans use RTN's; "
                                    f"{QUANTIZER_ERRORS_FIX} to plan with {label}'s.")


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
    sizes = np.full(len(pinned), request.group_size)
    sizes[free] = problem.groups[choice]
    chosen_sizes = {name: int(g) for name, g in zip(names, sizes[set_of_layer])} if _has_pairs(request) else {}
    return Plan({name: int(b) for name, b in zip(names, set_bits[set_of_layer])}, request, tuple(notes), chosen_sizes)


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
    size = weight_size(layers, bits, plan.group_size_of(layers))
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
        "error_source": plan.request.quantizer,
        "error_unit": error_unit(plan.request),
        "width_multiples": {int(b): float(m) for b, m in plan.request.width_multiples.items()},
        "grid_multiples": {int(g): {int(b): float(m) for b, m in by_width.items()}
                           for g, by_width in plan.request.grid_multiples.items()},
        **_predicted_errors(plan, layers, errors),
        "bits_by_kind": {str(k): float(row.nb / row.n) for k, row in by_kind.iterrows()},
        "layers_by_bits": {int(w): int(c) for w, c in zip(widths, counts)},
        "notes": list(plan.notes),
    }


def weight_size(layers: pd.DataFrame, bits: np.ndarray, group_size: int | np.ndarray) -> dict[str, float]:
    """avg_bits, effective_bits (with scale/zero overhead) and size_mb of the layers' weights at `bits` each
    (16 = kept in fp16, no overhead) and `group_size` (one for all, or one per layer); see summarize."""
    n = layers["n_params"].to_numpy(dtype=np.int64)
    stored = bits + _overhead_bits(layers, group_size) * (bits < FULL_PRECISION)
    return {"avg_bits": float((n * bits).sum() / n.sum()), "effective_bits": float((n * stored).sum() / n.sum()),
            "size_mb": float((n * stored).sum()) / 8e6}


def plan_frame(plan: Plan, layers: pd.DataFrame) -> pd.DataFrame:
    """One row per layer (block, kind, layer, bits, group): the input of the plan heatmap."""
    frame = layers[["block", "kind", "layer"]].reset_index(drop=True)
    return frame.assign(bits=frame["layer"].map(plan.bits).astype(int), group=plan.group_size_of(frame))


# ---- validation ---------------------------------------------------------------------------------------------------

def _fmt(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")


def _fmt_up(value: float) -> str:
    """Rounded up to 3 decimals, so that 'raise the budget to X' really suffices."""
    return _fmt(math.ceil(round(value * 1000, 6)) / 1000)


def _fmt_down(value: float) -> str:
    return _fmt(math.floor(round(value * 1000, 6)) / 1000)


def _has_pairs(request: AllocationRequest) -> bool:
    return any(not isinstance(c, int | np.integer) for c in request.candidates)


def _options(request: AllocationRequest) -> list[tuple[int, int]]:
    """The candidates as (bits, group size) pairs, plain widths at the request's group size."""
    options = []
    for candidate in request.candidates:
        pair = (candidate, request.group_size) if isinstance(candidate, int | np.integer) else tuple(candidate)
        if len(pair) != 2 or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in pair) \
                or pair[1] < 0:
            raise AllocationError(f"The candidate {candidate!r} is neither a width nor a (bits, group size) pair of "
                                  f"integers with a group size of 0 (per channel) or more; write e.g. 3 or (3, 64).")
        options.append((int(pair[0]), int(pair[1])))
    return options


def _check_request(request: AllocationRequest) -> None:
    if request.method not in ALLOCATORS:
        raise AllocationError(f"Unknown method {request.method!r}; use one of {', '.join(ALLOCATORS)}.")
    if request.quantizer not in ERROR_SOURCES:
        raise AllocationError(f"Unknown error source {request.quantizer!r}; use the quantizer that will run, one of "
                              f"{', '.join(ERROR_SOURCES)}.")
    if request.unit not in UNIT_COLUMNS:
        raise AllocationError(f"Unknown unit {request.unit!r}; use one of {', '.join(UNIT_COLUMNS)}.")
    if not request.candidates:
        raise AllocationError("The candidate set is empty; pick at least one width between 2 and 8 bits.")
    if _has_pairs(request) and request.method not in ERROR_SOLVERS:
        raise AllocationError(f"Candidates with group sizes are for the knapsack methods; give {request.method} "
                              f"plain widths and set group_size.")
    widths = [bits for bits, _ in _options(request)]
    outside = sorted(set(widths) - set(QUANT_WIDTHS))
    if outside:
        raise AllocationError(f"Candidate widths must be between 2 and 8 bits; remove {outside}.")
    if not math.isfinite(request.budget) or request.budget < min(widths):
        raise AllocationError(f"The budget {_fmt(request.budget)} bits per weight is below the smallest candidate "
                              f"width ({min(widths)} bits); raise it to at least {min(widths)} "
                              f"or add a narrower candidate.")
    bad = {bits: m for multiples in (request.width_multiples, *request.grid_multiples.values())
           for bits, m in multiples.items()
           if bits not in QUANT_WIDTHS or not (isinstance(m, Real) and math.isfinite(m) and m > 0)}
    if bad:
        raise AllocationError(f"Width multiples must map widths of 2–8 bits to positive numbers; fix {bad}.")
    if request.grid_multiples and not request.width_multiples:
        raise AllocationError(f"Grid multiples need the width multiples of the plans' own group size "
                              f"({request.group_size}) beside them; measure those too or drop the grid multiples.")
    for bounds, label in ((request.min_bits, "min_bits"), (request.max_bits, "max_bits")):
        unknown = sorted(set(bounds) - set(KINDS))
        if unknown:
            raise AllocationError(f"{label} names unknown layer kinds {unknown}; use any of {', '.join(KINDS)}.")
    if request.method == "aptq":
        low, high = request.low_high
        if not low < high or {low, high} - set(widths):
            raise AllocationError(f"The aptq widths {tuple(request.low_high)} must be two candidate widths, low below "
                                  f"high; pick them from {tuple(sorted(widths))}.")


def check_group_sizes(layers: pd.DataFrame, groups: Iterable[int]) -> None:
    """Every group size of a pair candidate (`groups`; 0 = per channel) splits every layer's input columns (`layers`:
    layer, d_in) into whole groups; the analysis checks its extra group sizes with it too (aptq.sensitivity)."""
    if "d_in" not in layers.columns:
        raise AllocationError("Candidates with group sizes need the layers' d_in column; pass the sensitivity "
                              "analysis's layers table.")
    d_in = layers["d_in"].to_numpy(dtype=np.int64)
    for group in sorted({g for g in groups if g > 0}):
        bad = np.flatnonzero(d_in % group)
        if len(bad):
            common = int(np.gcd.reduce(d_in))
            raise AllocationError(f"The group size {group} does not divide the {d_in[bad[0]]} input columns of "
                                  f"{layers['layer'].iloc[bad[0]]}; use a divisor of {common} (every layer's d_in "
                                  f"is a multiple of it) or 0 (per channel).")


def _fused_sets(layers: pd.DataFrame) -> pd.Series:
    """The `fused` column, with a layer's own name where it is empty (not fused)."""
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
    candidates = _options(request)
    effective = _has_pairs(request)
    if effective:
        check_group_sizes(layers, (group for _, group in candidates))
    pin_options = {(int(w), request.group_size) for w in pinned if 0 < w < FULL_PRECISION}
    options = sorted(set(candidates) | pin_options)
    widths = np.array([bits for bits, _ in options], dtype=np.int64)
    groups = np.array([group for _, group in options], dtype=np.int64)
    n_layer = layers["n_params"].to_numpy(dtype=np.int64)
    n_set = np.bincount(set_of_layer, weights=n_layer, minlength=n_sets).round().astype(np.int64)
    layer_allowed = _kind_allowed(layers, options, set(candidates), request)
    # A set may use a width only if every member may (members of a fused set can differ in kind).
    set_allowed = np.stack([np.bincount(set_of_layer, weights=~layer_allowed[:, j], minlength=n_sets) == 0
                              for j in range(len(widths))], axis=1)
    free = pinned == 0
    _check_bounds(set_allowed, free, layers, set_of_layer)
    metric = error_column(request)
    layer_err = _error_matrix(layers, errors, names, options, metric, request.unit) * \
        option_multiples(request, widths, groups)
    _check_coverage(layer_err, set_allowed[set_of_layer] & free[set_of_layer, None], pinned[set_of_layer], names,
                    options, request.group_size)
    set_err = np.stack([np.bincount(set_of_layer, weights=np.nan_to_num(layer_err[:, j]), minlength=n_sets)
                          for j in range(len(widths))], axis=1)
    layer_cost = _layer_costs(layers, widths, groups, effective)
    group_cost = np.stack([np.bincount(set_of_layer, weights=layer_cost[:, j], minlength=n_sets)
                           for j in range(len(widths))], axis=1).round().astype(np.int64)
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
    layer_pins = pinned[set_of_layer]
    pinned_cost = int(_layer_costs(layers, layer_pins[:, None], np.full(1, request.group_size), effective)[
        layer_pins > 0].sum())
    capacity = math.floor(Fraction(request.budget) * total) - pinned_cost  # exact: no float rounding at the budget
    problem = _Problem(widths, groups, n_set[free], group_cost[free], set_allowed[free], set_err[free],
                       score[free], capacity, pinned_cost, total)
    _check_feasible(problem, request)
    return problem, free


def error_unit(request: AllocationRequest) -> str:
    """The unit of the request's predicted totals: its unit, and whether they carry width multiples (totals with
    multiples are in another scale, so that the trust table ranks them apart)."""
    if not request.width_multiples:
        return request.unit
    return f"{request.unit} × width multiples" + (" per grid" if request.grid_multiples else "")


def error_column(request: AllocationRequest) -> str:
    """The predicted-error column the request's method minimizes, from its quantizer's source."""
    layerwise, attention = ERROR_SOURCES[request.quantizer]
    return layerwise if request.method == "knapsack-layerwise" else attention


def width_multiple(multiples: Mapping[int, float], widths: np.ndarray) -> np.ndarray:
    """The multiple of each of `widths` (module docstring, "Width multiples"): its own, else its nearest measured
    width's (the wider one on a tie); 1 for all when `multiples` is empty."""
    widths = np.asarray(widths, dtype=np.int64)
    if not multiples:
        return np.ones(widths.shape)
    measured = np.array(sorted(multiples), dtype=np.int64)
    distance = np.abs(widths[..., None] - measured) - measured / 1000  # the tie-break favours the wider width
    return np.array([multiples[int(w)] for w in measured])[distance.argmin(axis=-1)]


def option_multiples(request: AllocationRequest, widths: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """The multiple of each option (widths[i] bits in groups of groups[i]): its grid's (module docstring, "Width
    multiples"), the request's own group size's for a grid without any."""
    widths, groups = np.asarray(widths, dtype=np.int64), np.asarray(groups, dtype=np.int64)
    multiples = width_multiple(request.width_multiples, widths)
    for group, by_width in request.grid_multiples.items():
        if int(group) != request.group_size:
            on_grid = groups == int(group)
            multiples[on_grid] = width_multiple(by_width, widths[on_grid])
    return multiples


def measured_width_multiples(uniform: Mapping[int, tuple[float, float]]) -> dict[int, float]:
    """Width multiples from uniform plans: bits → (measured KL, predicted total in the plan's unit), each measured on
    held-out calibration segments, never on the evaluation split (module docstring, "Width multiples")."""
    multiples = {}
    for bits, (measured, predicted) in sorted(uniform.items()):
        if not (math.isfinite(measured) and math.isfinite(predicted) and measured > 0 and predicted > 0):
            raise AllocationError(f"The uniform {bits}-bit plan has a measured KL of {measured:.4g} and a predicted "
                                  f"total of {predicted:.4g}; both must be positive numbers to give a width multiple.")
        multiples[int(bits)] = measured / predicted
    return multiples


def _layer_costs(layers: pd.DataFrame, widths: np.ndarray, groups: np.ndarray, effective: bool) -> np.ndarray:
    """(L, m) bit·params of each layer at each option: n·b, plus with `effective` the fp16 scale and zero of every
    group of every row (none at 16 bits, kept in fp16)."""
    n = layers["n_params"].to_numpy(dtype=np.int64)[:, None]
    nominal = n * widths
    if not effective:
        return nominal
    d_in = layers["d_in"].to_numpy(dtype=np.int64)[:, None]
    groups_per_row = np.where(groups > 0, -(-d_in // np.maximum(groups, 1)), 1)
    return nominal + (widths < FULL_PRECISION) * (n // d_in) * SCALE_ZERO_BITS * groups_per_row


def _kind_allowed(layers: pd.DataFrame, options: list[tuple[int, int]], candidates: set[tuple[int, int]],
                  request: AllocationRequest) -> np.ndarray:
    """(L, m): the option is a candidate and its width within the layer kind's bounds."""
    kinds = layers["kind"].astype(str)
    low = kinds.map(request.min_bits).fillna(0).to_numpy(dtype=float)
    high = kinds.map(request.max_bits).fillna(FULL_PRECISION).to_numpy(dtype=float)
    widths = np.array([bits for bits, _ in options])
    candidate = np.array([option in candidates for option in options])
    return candidate & (widths >= low[:, None]) & (widths <= high[:, None])


def _check_bounds(set_allowed: np.ndarray, free: np.ndarray, layers: pd.DataFrame, set_of_layer: np.ndarray) -> None:
    empty = np.flatnonzero(free & ~set_allowed.any(axis=1))
    if len(empty):
        member = np.flatnonzero(set_of_layer == empty[0])[0]
        raise AllocationError(f"No candidate width fits the per-kind bounds of {layers['layer'].iloc[member]} "
                              f"(kind {layers['kind'].iloc[member]}); widen min_bits/max_bits or add a candidate.")


def _error_matrix(layers: pd.DataFrame, errors: pd.DataFrame, names: np.ndarray, options: list[tuple[int, int]],
                  metric: str, unit: str) -> np.ndarray:
    """(L, m) predicted error of each layer at each option, in one unit; NaN where the table has no row."""
    missing = sorted({"layer", "bits", metric} - set(errors.columns))
    if missing or errors[metric].isna().all():
        source = next(q for q, columns in ERROR_SOURCES.items() if metric in columns)
        fix = QUANTIZER_ERRORS_FIX if source != "rtn" else "pass the sensitivity analysis's table"
        raise AllocationError(f"The errors table has no {metric} values (the predicted errors of {source}); {fix}, or "
                              f"choose another error source.")
    matrix = np.full((len(names), len(options)), np.nan)
    for group in sorted({g for _, g in options}):
        table = comparable_errors(layers, _errors_for_group(errors, group), metric, unit)
        if table.duplicated(["layer", "bits"]).any():
            raise AllocationError("The errors table has several rows for one (layer, bits); keep one group size.")
        columns = [j for j, (_, option_group) in enumerate(options) if option_group == group]
        matrix[:, columns] = _error_lookup(names, table, metric, np.array([options[j][0] for j in columns]))
    return matrix


def _error_lookup(names: np.ndarray, table: pd.DataFrame, metric: str, widths: np.ndarray) -> np.ndarray:
    """(len(names), len(widths)) `metric` of each named layer at each width from `table`'s (layer, bits) rows; NaN
    where it has none. Positions are matched once, in numpy: this runs on every budget slider move."""
    row = pd.Index(names).get_indexer(table["layer"])
    column = pd.Index(widths).get_indexer(table["bits"])
    known = (row >= 0) & (column >= 0)
    lookup = np.full((len(names), len(widths)), np.nan)
    lookup[row[known], column[known]] = table[metric].to_numpy(dtype=float)[known]
    return lookup


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


def unit_factors(layers: pd.DataFrame, metric: str, unit: str = "heuristic") -> tuple[np.ndarray, np.ndarray] | None:
    """Per layer of `layers`: the factor that puts `metric` into the unit, and its standard error; None when the
    table has no such columns (synthetic tables, or an analysis stored before them: used as given).

    heuristic: tr(H_LM) / tr(H_metric) / residual_ms, error from trace_lm_se; calibrated: kl_rate / tr(H_metric),
    error from kl_rate_se. A layer with tr(H_metric) = 0 (inputs all zero) has zero error and factor 1.
    """
    trace = METRIC_TRACES[metric]
    value, spread, *divisors = UNIT_COLUMNS[unit]
    needed = {value, trace, *divisors}
    if not needed <= set(layers.columns) or layers[[value, *divisors]].isna().all().any():
        if unit == "calibrated":
            raise AllocationError("The calibrated unit needs the layers' measured kl_rate; run the unit calibration "
                                  "(aptq.calibrate) first or choose the heuristic unit.")
        return None
    own = layers[trace].to_numpy(dtype=float)
    scale = layers[divisors].to_numpy(dtype=float).prod(axis=1) if divisors else np.ones(len(layers))
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = layers[value].to_numpy(dtype=float) / own / scale
        se = (layers[spread].to_numpy(dtype=float) if spread in layers.columns else np.nan) / own / scale
    broken = np.flatnonzero(~np.isfinite(factor) & ~(own <= 0))
    if len(broken):
        raise AllocationError(f"The {unit} unit has no factor for {layers['layer'].iloc[broken[0]]} ({len(broken)} "
                              f"layer(s); {', '.join(sorted(needed))} must be numbers): rerun the analysis"
                              f"{' and the unit calibration' if unit == 'calibrated' else ''} rather than mix units.")
    zero = own <= 0
    return np.where(zero, 1.0, factor), np.where(zero, 0.0, se)


def comparable_errors(layers: pd.DataFrame, errors: pd.DataFrame, metric: str,
                      unit: str = "heuristic") -> pd.DataFrame:
    """`errors` with `metric` × the layer's unit factor (unit_factors): the unit in which the solvers sum them (see
    the module docstring)."""
    factors = unit_factors(layers, metric, unit)
    if factors is None:
        return errors
    factor = np.append(factors[0], 1.0)  # last: layers not in the table
    row = pd.Index(layers["layer"]).get_indexer(errors["layer"])  # −1 → the appended 1.0
    return errors.assign(**{metric: errors[metric].to_numpy(dtype=float) * factor[row]})


def _check_coverage(layer_err: np.ndarray, needed: np.ndarray, layer_pins: np.ndarray, names: np.ndarray,
                    options: list[tuple[int, int]], group_size: int) -> None:
    """Every option a layer may get (its candidates, or its pin below 16) needs a predicted error."""
    needed = needed | np.array([[option == (pin, group_size) for option in options] for pin in layer_pins])
    gaps = np.argwhere(needed & ~np.isfinite(layer_err))
    if len(gaps):
        layer, col = gaps[0]
        bits, group = options[col]
        raise AllocationError(f"The errors table has no predicted error for {names[layer]} at {bits} bits"
                              f"{f' (group size {group})' if group != group_size else ''}; rerun the analysis with "
                              f"that width or remove it from the candidates and pins.")


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
    widest = int(problem.widths.max())
    limit = max(widest, most)
    if request.budget > limit:
        raise AllocationError(f"The budget {_fmt(request.budget)} bits per weight is above the largest candidate width "
                              f"({widest} bits); lower it to at most {_fmt_down(limit)} or add a "
                              f"wider candidate.")


def _smallest_allowed(problem: _Problem) -> np.ndarray:
    """Per set: its cheapest allowed option (with plain widths, the narrowest)."""
    return np.where(problem.allowed, problem.cost, np.iinfo(np.int64).max).argmin(axis=1)


def _largest_allowed(problem: _Problem) -> np.ndarray:
    """Per set: its dearest allowed option (the last of equals, as the column order is by width)."""
    dearest = np.where(problem.allowed, problem.cost, -1)[:, ::-1]
    return problem.allowed.shape[1] - 1 - dearest.argmax(axis=1)


# ---- solvers: each returns one option column per free fused set ---------------------------------------------

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
    return int(problem.cost[np.arange(len(choice)), choice].sum())


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
        cost -= int(problem.cost[item, choice[item]] - problem.cost[item, lower])
        choice[item] = lower
    return choice


def _knapsack(problem: _Problem) -> tuple[np.ndarray, list[str]]:
    """Multiple-choice knapsack: min Σ err subject to Σ n·b ≤ capacity, by DP over the spare budget.

    Each set starts at its narrowest allowed width; the DP spends the spare bit·params on widening. Costs are
    integers in units of gcd(n_params) (real models share a large gcd, e.g. 110592 for SmolLM2-135M), which makes the
    DP exact. When that table would exceed MAX_TABLE_CELLS, the unit grows and each cost is rounded *up* to whole
    units: the plan then never exceeds the budget and is optimal up to that resolution (it may leave less than one
    unit per group of the budget unused).
    """
    err = np.where(problem.allowed, problem.err, np.inf)
    base = _smallest_allowed(problem)
    extra = problem.cost - problem.cost[np.arange(len(base)), base][:, None]
    spare = problem.capacity - _cost(problem, base)
    if spare >= int(np.where(problem.allowed, extra, 0).max(axis=1).sum()):
        return err.argmin(axis=1), ["knapsack: the budget covers every group's least-error width"]
    unit = int(np.gcd.reduce(np.append(problem.n, extra[problem.allowed])))  # = gcd(n) with plain widths
    groups = len(problem.n)
    if groups * (spare // unit + 1) > MAX_TABLE_CELLS:
        unit = -(-spare // (MAX_TABLE_CELLS // groups - 1))  # the smallest unit whose table fits
        slack = groups * unit / problem.total_params  # rounding adds under one unit per group
        note = (f"knapsack: costs rounded up to units of {unit} weights: never over the budget, and at least as good "
                f"as the exact optimum at {slack:.2g} bits per weight less")
    else:
        note = f"knapsack: exact (costs in units of {unit} weights, the gcd of the sizes and costs)"
    costs = np.where(problem.allowed, -(-extra // unit), -1)
    return _knapsack_dp(costs, err, spare // unit), [note]


def _knapsack_dp(costs: np.ndarray, err: np.ndarray, capacity: int) -> np.ndarray:
    """best[k] = least error of the groups so far within k units; back-pointers keep each group's choice per k.

    Each group's cheapest allowed option costs 0; dearer ones replace it where they do better (running element-wise
    minima keep every pass contiguous). Only a window of k is live for group g: below K − (what the later groups can
    still spend) nothing is ever read again, and above what the groups so far can spend at most, best is flat.
    """
    groups = costs.shape[0]
    widest = costs.max(axis=1)
    capacity = min(capacity, int(widest.sum()))
    high = np.minimum(np.cumsum(widest), capacity)
    low = np.maximum(0, capacity - (widest.sum() - np.cumsum(widest)))
    best = np.zeros(capacity + 1)
    picks = np.empty((groups, capacity + 1), dtype=np.int8)
    previous_high = 0
    for g in range(groups):
        lo, hi = int(low[g]), int(high[g])
        best[previous_high + 1:hi + 1] = best[previous_high]  # flat beyond what the earlier groups can spend
        options = np.flatnonzero(costs[g] >= 0)
        options = options[np.argsort(costs[g, options], kind="stable")]  # the cheapest (cost 0) first
        new = best[lo:hi + 1] + err[g, options[0]]
        picks[g, lo:hi + 1] = options[0]
        for j in options[1:]:
            c = int(costs[g, j])
            start = max(lo, c)
            if start > hi:
                continue
            candidate = best[start - c:hi + 1 - c] + err[g, j]
            better = candidate < new[start - lo:]
            np.copyto(new[start - lo:], candidate, where=better)
            np.copyto(picks[g, start:hi + 1], j, where=better)
        best[lo:hi + 1] = new
        previous_high = hi
    choice = np.empty(groups, dtype=np.int64)
    k = capacity
    for g in range(groups - 1, -1, -1):
        k = min(k, int(high[g]))  # above `high` the table is flat: the same choice is optimal
        choice[g] = picks[g, k]
        k -= costs[g, choice[g]]
    return choice


# ---- summary helpers ----------------------------------------------------------------------------------------------

def _overhead_bits(layers: pd.DataFrame, group_size: int | np.ndarray) -> np.ndarray:
    """Scale/zero bits per weight of each layer when quantized at its group size (see summarize)."""
    group = np.broadcast_to(np.asarray(group_size, dtype=float), (len(layers),))
    grouped = group > 0
    size = np.where(grouped, group, 1.0)
    if "d_in" not in layers.columns:
        per_channel = SCALE_ZERO_BITS / np.sqrt(layers["n_params"].to_numpy(dtype=float))
        return np.where(grouped, SCALE_ZERO_BITS / size, per_channel)
    d_in = layers["d_in"].to_numpy(dtype=float)
    return SCALE_ZERO_BITS * np.where(grouped, np.ceil(d_in / size), 1.0) / d_in


def _chosen_errors(layers: pd.DataFrame, bits: np.ndarray, groups: np.ndarray, errors: pd.DataFrame,
                   metric: str) -> np.ndarray:
    """Per layer of `layers`: the raw `metric` at its width and group size (NaN for layers kept in full precision
    or missing from `errors`)."""
    names = layers["layer"].to_numpy()
    values = np.full(len(layers), np.nan)
    quantized = bits < FULL_PRECISION
    for group in np.unique(groups[quantized]):
        rows = np.flatnonzero(quantized & (groups == group))
        widths = np.unique(bits[rows])
        lookup = _error_lookup(names, _errors_for_group(errors, int(group)), metric, widths)
        values[rows] = lookup[rows, np.searchsorted(widths, bits[rows])]
    return values


def layer_predictions(plan: Plan, layers: pd.DataFrame, errors: pd.DataFrame,
                      metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per layer of `layers`: the predicted error that `_predicted_errors` sums (the raw `metric` at the plan's width
    and group size, in the request's unit, times its width and grid multiples) and its standard error from the unit
    factor's; 0 for layers kept in full precision, NaN where an error is missing (the standard error also for tables
    used as given)."""
    bits = layers["layer"].map(plan.bits).to_numpy(dtype=np.int64)
    groups = plan.group_size_of(layers)
    quantized = bits < FULL_PRECISION
    factors = unit_factors(layers, metric, plan.request.unit)
    factor, factor_se = factors if factors is not None else (np.ones(len(layers)), np.full(len(layers), np.nan))
    values = np.zeros(len(layers))
    values[quantized] = _chosen_errors(layers, bits, groups, errors, metric)[quantized] * \
        option_multiples(plan.request, bits[quantized], groups[quantized])
    return values * factor, np.where(quantized, values * factor_se, 0.0)


def _predicted_errors(plan: Plan, layers: pd.DataFrame, errors: pd.DataFrame) -> dict[str, float]:
    """The PREDICTED_ERRORS and their _se: Σ over quantized layers of `layer_predictions`; the standard error a sum of
    per-layer variances. NaN where an error is missing, and the standard error NaN for tables used as given."""
    totals = {}
    names = (PREDICTED_ERROR_LAYERWISE, PREDICTED_ERROR_ATTENTION)
    for name, metric in zip(names, ERROR_SOURCES[plan.request.quantizer]):
        total = se = math.nan
        if metric in errors.columns:
            values, spread = layer_predictions(plan, layers, errors, metric)
            if not np.isnan(values).any():
                total = float(values.sum())
                se = float(np.sqrt((spread ** 2).sum()))
        totals |= {name: total, f"{name}_se": se}
    return {key: totals[key] for key in (PREDICTED_ERROR_ATTENTION, PREDICTED_ERROR_LAYERWISE,
                                         f"{PREDICTED_ERROR_ATTENTION}_se", f"{PREDICTED_ERROR_LAYERWISE}_se")}
