"""The bit-budget solvers on synthetic sensitivity tables: properties (hypothesis), exhaustive search, messages."""

from __future__ import annotations

import itertools
import re
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aptq.allocate as allocate_module
from aptq.allocate import (
    ALLOCATORS,
    PREDICTED_ERROR_ATTENTION,
    PREDICTED_ERROR_LAYERWISE,
    AllocationError,
    AllocationRequest,
    ErrorSourceChoice,
    Plan,
    allocate,
    available_error_sources,
    equal_bytes_pairs,
    error_source_for,
    layer_predictions,
    pair_candidates,
    plan_frame,
    summarize,
)
from aptq.errors import UserError

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
SMOL_SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "gate": (1536, 576),
               "up": (1536, 576), "down": (576, 1536)}
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tables(sizes: list[int], kinds: list[str], fused: list[str], err: np.ndarray, widths: tuple[int, ...],
           scores: list[float] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Layers `l0, l1, …`; err_attention of layer i at widths[j] is err[i, j], err_layerwise is 2·err[i, m-1-j]."""
    names = [f"l{i}" for i in range(len(sizes))]
    layers = pd.DataFrame({"layer": names, "block": range(len(sizes)), "kind": kinds, "fused": fused,
                           "n_params": sizes, "score": scores if scores is not None else [1.0] * len(sizes)})
    errors = pd.DataFrame([{"layer": name, "bits": w, "err_attention": float(err[i, j]),
                            "err_layerwise": 2.0 * float(err[i, len(widths) - 1 - j])}
                           for i, name in enumerate(names) for j, w in enumerate(widths)])
    return layers, errors


def smol_tables(seed: int = 0, blocks: int = 30) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    layers, errors = [], []
    for block in range(blocks):
        for kind, (d_out, d_in) in SMOL_SHAPES.items():
            name = f"model.layers.{block}.{kind}"
            layers.append({"layer": name, "block": block, "kind": kind, "fused": name, "n_params": d_out * d_in,
                           "d_in": d_in, "score": rng.lognormal()})
            scale = rng.lognormal() * d_out * d_in
            errors += [{"layer": name, "bits": b, "err_attention": scale * 4.0 ** -b * rng.uniform(0.5, 2),
                        "err_layerwise": scale * 4.0 ** -b} for b in (2, 3, 4, 8)]
    return pd.DataFrame(layers), pd.DataFrame(errors)


@st.composite
def instances(draw, max_layers: int = 7):
    """A small random problem: sizes, kinds, fused sets, errors, candidates (≤ 3 widths), pins, budget."""
    count = draw(st.integers(1, max_layers))
    widths = tuple(sorted(draw(st.sets(st.sampled_from([2, 3, 4, 8]), min_size=1, max_size=3))))
    sizes = [64 * s for s in draw(st.lists(st.sampled_from([1, 2, 3, 5, 9, 24]), min_size=count, max_size=count))]
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=count, max_size=count))
    partner = draw(st.lists(st.integers(0, count - 1), min_size=count, max_size=count))
    fused = [f"l{min(i, partner[i])}" if draw(st.booleans()) else f"l{i}" for i in range(count)]
    err = np.array(draw(st.lists(st.integers(0, 1000), min_size=count * len(widths), max_size=count * len(widths))),
                   dtype=float).reshape(count, len(widths)) / 8
    drawn = draw(st.dictionaries(st.sampled_from([f"l{i}" for i in range(count)]), st.sampled_from(widths), max_size=2))
    first_pin_of_group = {fused[int(name[1:])]: name for name in reversed(list(drawn))}  # no conflicting fused pins
    pins = {name: drawn[name] for name in first_pin_of_group.values()}
    budget = draw(st.floats(min(widths), max(widths)))
    min_bits = draw(st.sampled_from([{}, {"q": widths[-1]}, {"down": widths[len(widths) // 2]}]))
    layers, errors = tables(sizes, kinds, fused, err, widths, scores=draw(
        st.lists(st.floats(0, 10), min_size=count, max_size=count)))
    return layers, errors, widths, pins, budget, min_bits


def fused_keys(layers: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(layers["fused"]))


def exhaustive_best(layers: pd.DataFrame, errors: pd.DataFrame, request: AllocationRequest,
                    metric: str = "err_attention") -> float | None:
    """Least total error over every assignment of widths to fused sets, or None when none fits the budget."""
    keys = fused_keys(layers)
    err = errors.set_index(["layer", "bits"])[metric]
    pinned = {layers.set_index("layer").at[name, "fused"]: width for name, width in request.pins.items()}
    options = []
    for key in keys:
        members = layers[layers["fused"] == key]
        if key in pinned:
            options.append([pinned[key]])
            continue
        allowed = [w for w in request.candidates if all(
            request.min_bits.get(k, 0) <= w <= request.max_bits.get(k, 16) for k in members["kind"])]
        options.append(allowed)
    capacity = Fraction(request.budget) * int(layers["n_params"].sum())
    best = None
    for combo in itertools.product(*options):
        width_of = dict(zip(keys, combo))
        bits = layers["fused"].map(width_of)
        if int((bits * layers["n_params"]).sum()) > capacity:
            continue
        total = sum(err[(name, b)] for name, b in zip(layers["layer"], bits))
        best = total if best is None else min(best, total)
    return best


def plan_cost(plan: Plan, layers: pd.DataFrame) -> int:
    return int((layers["layer"].map(plan.bits) * layers["n_params"]).sum())


def plan_error(plan: Plan, errors: pd.DataFrame, metric: str = "err_attention") -> float:
    err = errors.set_index(["layer", "bits"])[metric]
    return float(sum(err[(name, b)] for name, b in plan.bits.items()))


def within_budget(plan: Plan, layers: pd.DataFrame) -> bool:
    return plan_cost(plan, layers) <= Fraction(plan.request.budget) * int(layers["n_params"].sum())


# ---- properties ---------------------------------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("solver, metric", [("knapsack", "err_attention"), ("knapsack-layerwise", "err_layerwise")])
@PROPERTY_SETTINGS
@given(instance=instances())
def test_knapsack_equals_exhaustive_search(solver, metric, instance):
    layers, errors, widths, pins, budget, min_bits = instance
    request = AllocationRequest(budget, solver, widths, pins=pins, min_bits=min_bits)
    best = exhaustive_best(layers, errors, request, metric)
    if best is None:
        with pytest.raises(AllocationError):
            allocate(layers, errors, request)
        return
    plan = allocate(layers, errors, request)
    assert within_budget(plan, layers)
    assert plan_error(plan, errors, metric) == pytest.approx(best, rel=1e-9, abs=1e-9)


@pytest.mark.integration
@PROPERTY_SETTINGS
@given(instances(), st.sampled_from(ALLOCATORS), st.integers(0, 3))
def test_every_method_keeps_the_budget_pins_bounds_and_fused_sets(instance, method, seed):
    layers, errors, widths, pins, budget, min_bits = instance
    request = AllocationRequest(budget, method, widths, pins=pins, min_bits=min_bits, seed=seed,
                                low_high=(widths[0], widths[-1]))
    if method == "aptq" and len(widths) < 2:
        return
    try:
        plan = allocate(layers, errors, request)
    except AllocationError:
        assert exhaustive_best(layers, errors, AllocationRequest(budget, "knapsack", widths, pins=pins,
                                                                 min_bits=min_bits)) is None
        return
    assert set(plan.bits) == set(layers["layer"])
    assert within_budget(plan, layers)
    fused_of = layers.set_index("layer")["fused"]
    for name, width in pins.items():
        assert all(plan.bits[member] == width for member in layers.loc[layers["fused"] == fused_of[name], "layer"])
    for key in fused_keys(layers):
        assert len({plan.bits[m] for m in layers.loc[layers["fused"] == key, "layer"]}) == 1
    pinned_groups = {fused_of[name] for name in pins}
    for row in layers.itertuples():
        assert plan.bits[row.layer] in widths
        if row.fused not in pinned_groups:
            assert plan.bits[row.layer] >= min_bits.get(row.kind, 0)


@pytest.mark.integration
@PROPERTY_SETTINGS
@given(instances(), st.floats(0, 1))
def test_a_larger_budget_never_raises_the_optimal_error(instance, step):
    layers, errors, widths, pins, budget, min_bits = instance
    larger = budget + step * (max(widths) - budget)
    try:
        tight = allocate(layers, errors, AllocationRequest(budget, "knapsack", widths, pins=pins, min_bits=min_bits))
    except AllocationError:
        return
    loose = allocate(layers, errors, AllocationRequest(larger, "knapsack", widths, pins=pins, min_bits=min_bits))
    assert plan_error(loose, errors) <= plan_error(tight, errors) + 1e-9


@pytest.mark.integration  # a property test; the unit set runs aptq in the SmolLM2-shaped comparison below
@PROPERTY_SETTINGS
@given(st.lists(st.floats(0, 100), min_size=2, max_size=12),
       st.lists(st.sampled_from([1, 2, 3, 8]), min_size=12, max_size=12), st.floats(2, 4))
def test_aptq_gives_the_low_width_to_the_lowest_scores(scores, size_units, budget):
    count = len(scores)
    sizes = [64 * s for s in size_units[:count]]
    names = [f"l{i}" for i in range(count)]
    layers, errors = tables(sizes, ["q"] * count, names, np.ones((count, 2)), (2, 4), scores=scores)
    plan = allocate(layers, errors, AllocationRequest(budget, "aptq", (2, 4), low_high=(2, 4)))
    assert within_budget(plan, layers)
    low = [s for s, name in zip(scores, names) if plan.bits[name] == 2]
    high = [s for s, name in zip(scores, names) if plan.bits[name] == 4]
    assert not low or not high or max(low) <= min(high)
    if low:  # the rule stops as soon as the budget holds: the last layer sent low was needed
        last = names[max((i for i in range(count) if plan.bits[names[i]] == 2), key=lambda i: (scores[i], i))]
        assert not within_budget(Plan({**plan.bits, last: 4}, plan.request), layers)


# ---- the SmolLM2-shaped table -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol():
    return smol_tables()


def test_knapsack_is_exact_in_gcd_units_and_beats_every_other_method(smol):
    layers, errors = smol
    plans = {m: allocate(layers, errors, AllocationRequest(3.0, m, group_size=64)) for m in ALLOCATORS}
    best = plans["knapsack"]
    assert "110592" in best.notes[0] and "exact" in best.notes[0]
    for method, plan in plans.items():
        assert within_budget(plan, layers), method
        assert plan_error(best, errors) <= plan_error(plan, errors) + 1e-9, method
    assert plan_error(plans["knapsack-layerwise"], errors, "err_layerwise") <= min(
        plan_error(p, errors, "err_layerwise") for p in plans.values()) + 1e-9


def test_discretized_knapsack_rounds_costs_up_and_is_optimal_up_to_its_resolution(smol, monkeypatch):
    layers, errors = smol
    request = AllocationRequest(3.1, "knapsack", group_size=64)
    exact = allocate(layers, errors, request)
    monkeypatch.setattr(allocate_module, "MAX_TABLE_CELLS", 210 * 300)
    coarse = allocate(layers, errors, request)
    assert "rounded up" in coarse.notes[0]
    assert within_budget(coarse, layers)
    # Rounding adds less than one unit per layer, so every plan cheaper by 210 units was open to the coarse DP.
    unit = int(re.search(r"units of (\d+) weights", coarse.notes[0]).group(1))
    monkeypatch.setattr(allocate_module, "MAX_TABLE_CELLS", 1 << 24)
    margin = 210 * unit / layers["n_params"].sum()
    reference = allocate(layers, errors, AllocationRequest(3.1 - margin, "knapsack", group_size=64))
    assert plan_error(exact, errors) <= plan_error(coarse, errors) <= plan_error(reference, errors) + 1e-9


def test_uniform_says_which_width_fits_once_pins_are_charged(smol):
    layers, errors = smol
    pins = {name: 8 for name in layers["layer"][layers["kind"] == "down"]}
    plan = allocate(layers, errors, AllocationRequest(4.5, "uniform", pins=pins))  # 2 + 0.75·w ≤ 4.5
    free = [plan.bits[n] for n in layers["layer"] if n not in pins]
    assert set(free) == {3} and plan.notes == ("uniform width 3 bits",)
    assert within_budget(plan, layers)


def test_per_kind_bounds_restrict_the_widths(smol):
    layers, errors = smol
    plan = allocate(layers, errors, AllocationRequest(3.0, "knapsack", min_bits={"down": 4}, max_bits={"q": 3}))
    frame = plan_frame(plan, layers)
    assert frame.loc[frame["kind"] == "down", "bits"].min() >= 4
    assert frame.loc[frame["kind"] == "q", "bits"].max() <= 3


def test_random_is_seeded(smol):
    layers, errors = smol
    first, again, other = (allocate(layers, errors, AllocationRequest(3.5, "random", seed=s)) for s in (1, 1, 2))
    assert first.bits == again.bits and first.bits != other.bits
    assert within_budget(other, layers)


def test_full_precision_pins_cost_16_bits_and_no_error(smol):
    layers, errors = smol
    name = layers["layer"].iloc[0]
    plan = allocate(layers, errors, AllocationRequest(3.0, "knapsack", pins={name: 16}, group_size=64))
    assert plan.bits[name] == 16 and within_budget(plan, layers)
    summary = summarize(plan, layers, errors)
    assert summary[PREDICTED_ERROR_ATTENTION] == pytest.approx(
        plan_error(Plan({k: b for k, b in plan.bits.items() if b < 16}, plan.request), errors))


# ---- summary ------------------------------------------------------------------------------------------------------

def test_summary_numbers():
    layers, errors = tables([64 * 64, 100 * 64, 64 * 64], ["q", "down", "q"], ["l0", "l1", "l2"],
                            np.array([[8.0, 1.0], [4.0, 2.0], [6.0, 3.0]]), (2, 4))
    layers["d_in"] = [64, 100, 64]
    plan = Plan({"l0": 2, "l1": 4, "l2": 16}, AllocationRequest(3.0, group_size=64))
    summary = summarize(plan, layers, errors)
    n = np.array([4096, 6400, 4096])
    assert summary["avg_bits"] == pytest.approx((2 * 4096 + 4 * 6400 + 16 * 4096) / n.sum())
    # l0: one group of 64 → 32/64; l1: ⌈100/64⌉ = 2 groups per row → 64/100; fp16 layer: no overhead
    effective = (4096 * 2.5 + 6400 * 4.64 + 4096 * 16) / n.sum()
    assert summary["effective_bits"] == pytest.approx(effective)
    assert summary["size_mb"] == pytest.approx(effective * n.sum() / 8e6)
    assert summary["compression"] == pytest.approx(16 / effective)
    assert summary[PREDICTED_ERROR_ATTENTION] == pytest.approx(8.0 + 2.0)
    assert summary[PREDICTED_ERROR_LAYERWISE] == pytest.approx(2 * 1.0 + 2 * 4.0)
    assert summary["bits_by_kind"] == pytest.approx({"q": 9.0, "down": 4.0})
    assert summary["layers_by_bits"] == {2: 1, 4: 1, 16: 1}


def test_errors_are_moved_to_the_module_output_and_made_relative_to_the_residual_stream():
    # Equal raw errors; the factors tr(H_LM) / tr(H_metric) / residual_ms are 10/2/1 = 5 for l0 and 4/1/8 = 0.5 for l1.
    layers, errors = tables([4096, 4096], ["v", "down"], ["l0", "l1"], np.array([[8.0, 1.0], [8.0, 1.0]]), (2, 4))
    layers = layers.assign(trace_lm=[10.0, 4.0], trace_attention=[2.0, 1.0], trace_layerwise=[5.0, 4.0],
                           residual_ms=[1.0, 8.0])
    plan = allocate(layers, errors, AllocationRequest(3.0, "knapsack", (2, 4)))
    assert plan.bits == {"l0": 4, "l1": 2}
    summary = summarize(plan, layers, errors)
    assert summary[PREDICTED_ERROR_ATTENTION] == pytest.approx(5 * 1.0 + 0.5 * 8.0)
    # err_layerwise is 2·err reversed: l0 at 4 bits 16, l1 at 2 bits 2; factors 10/5/1 = 2 and 4/4/8.
    assert summary[PREDICTED_ERROR_LAYERWISE] == pytest.approx(2 * 16.0 + 0.125 * 2.0)
    as_given = allocate(layers.drop(columns="residual_ms"), errors, AllocationRequest(3.0, "knapsack", (2, 4)))
    assert summarize(as_given, layers.drop(columns="residual_ms"), errors)[PREDICTED_ERROR_ATTENTION] == 9.0


def test_summary_per_channel_and_without_d_in():
    layers, errors = tables([128 * 64], ["q"], ["l0"], np.array([[1.0]]), (4,))
    plan = Plan({"l0": 4}, AllocationRequest(4.0, candidates=(4,), group_size=0))
    assert summarize(plan, layers, errors)["effective_bits"] == pytest.approx(4 + 32 / np.sqrt(128 * 64))
    layers["d_in"] = 64
    assert summarize(plan, layers, errors)["effective_bits"] == pytest.approx(4 + 32 / 64)
    grouped = Plan({"l0": 4}, AllocationRequest(4.0, candidates=(4,), group_size=128))
    assert summarize(grouped, layers.drop(columns="d_in"), errors)["effective_bits"] == pytest.approx(4.25)


def test_plan_frame_has_one_row_per_layer(smol):
    layers, errors = smol
    frame = plan_frame(allocate(layers, errors, AllocationRequest(3.0)), layers)
    assert list(frame.columns) == ["block", "kind", "layer", "bits", "group"] and len(frame) == len(layers)
    assert (frame["group"] == 128).all()  # one group size: the request's


def test_errors_table_with_several_group_sizes_is_filtered():
    layers, errors = tables([4096, 4096], ["q", "k"], ["l0", "l1"], np.array([[4.0, 1.0], [8.0, 1.0]]), (2, 4))
    other = errors.assign(group_size=128, err_attention=errors["err_attention"][::-1].to_numpy())
    both = pd.concat([errors.assign(group_size=64), other])
    plan = allocate(layers, both, AllocationRequest(3.0, "knapsack", (2, 4), group_size=64))
    assert plan.bits == {"l0": 2, "l1": 4}


# ---- messages -----------------------------------------------------------------------------------------------------

def small_tables():
    return tables([4096] * 5, ["q", "k", "v", "o", "down"], [f"l{i}" for i in range(5)], np.ones((5, 3)), (2, 3, 4))


@pytest.mark.parametrize("request_kwargs, expected", [
    ({"budget": 1.5}, ["1.5", "below the smallest candidate", "at least 2"]),
    ({"budget": 4.5}, ["4.5", "above the largest candidate", "at most 4"]),
    ({"budget": 3.0, "candidates": ()}, ["candidate set is empty"]),
    ({"budget": 3.0, "candidates": (2, 9)}, ["remove [9]"]),
    ({"budget": 3.0, "method": "greedy"}, ["'greedy'", "knapsack"]),
    ({"budget": 3.0, "pins": {"x1": 2, "x2": 2, "x3": 2, "x4": 2}}, ["4 unknown", "x1, x2, x3 and 1 more"]),
    ({"budget": 3.0, "pins": {"l0": 9}}, ["l0 is pinned to 9", "2–8 or 16"]),
    ({"budget": 3.0, "pins": {"l0": 4, "l1": 4, "l2": 4}}, ["at least 3.2", "2.4 of it from the pins", "budget is 3"]),
    ({"budget": 2.5, "min_bits": {"q": 4, "k": 4}}, ["per-kind minimums", "at least 2.8", "budget is 2.5"]),
    ({"budget": 3.0, "min_bits": {"attn": 3}}, ["unknown layer kinds ['attn']"]),
    ({"budget": 3.0, "min_bits": {"q": 4}, "max_bits": {"q": 3}}, ["l0", "widen min_bits/max_bits"]),
    ({"budget": 3.0, "method": "aptq", "low_high": (2, 8)}, ["(2, 8)", "(2, 3, 4)"]),
    ({"budget": 3.0, "group_size": 128, "errors_group": 64}, ["[64]", "not 128"]),
])
def test_error_messages_name_the_numbers_and_the_fix(request_kwargs, expected):
    layers, errors = small_tables()
    kwargs = {"candidates": (2, 3, 4), **request_kwargs}
    if "errors_group" in kwargs:
        errors = errors.assign(group_size=kwargs.pop("errors_group"))
    with pytest.raises(AllocationError) as caught:
        allocate(layers, errors, AllocationRequest(**kwargs))
    for text in expected:
        assert text in str(caught.value)


def test_missing_error_row_names_layer_and_width():
    layers, errors = small_tables()
    errors = errors[~((errors["layer"] == "l3") & (errors["bits"] == 4))]
    with pytest.raises(AllocationError, match="no predicted error for l3 at 4 bits"):
        allocate(layers, errors, AllocationRequest(3.0, candidates=(2, 3, 4)))


def test_conflicting_pins_in_a_fused_group():
    layers, errors = tables([4096] * 2, ["q", "k"], ["qk", "qk"], np.ones((2, 2)), (2, 4))
    with pytest.raises(AllocationError, match="pinned to 2 and 4 bits"):
        allocate(layers, errors, AllocationRequest(3.0, candidates=(2, 4), pins={"l0": 2, "l1": 4}))


def test_allocation_error_is_a_user_error_and_a_value_error():
    assert issubclass(AllocationError, UserError) and issubclass(AllocationError, ValueError)


# ---- error sources, units, uncertainty (issue 17) -----------------------------------------------------------------

def with_sources(layers: pd.DataFrame, errors: pd.DataFrame) -> pd.DataFrame:
    """The errors table with GPTQ and attention-aware columns that rank the widths differently from RTN's."""
    reversed_err = errors.groupby("layer")["err_attention"].transform(lambda v: v.to_numpy()[::-1])
    return errors.assign(err_gptq_attention=reversed_err, err_gptq_layerwise=reversed_err,
                         err_aware_attention=errors["err_attention"] * 0.5, err_aware_layerwise=errors["err_layerwise"])


@pytest.mark.parametrize("quantizer, column", [("rtn", "err_attention"), ("gptq", "err_gptq_attention"),
                                               ("attention", "err_aware_attention")])
def test_the_knapsack_minimizes_the_errors_of_the_quantizer_that_will_run(quantizer, column):
    rng = np.random.default_rng(3)
    layers, errors = tables([64 * s for s in (1, 2, 3, 5)], ["q", "k", "v", "down"], ["l0", "l1", "l2", "l3"],
                            rng.uniform(1, 9, (4, 3)), (2, 3, 4))
    errors = with_sources(layers, errors)
    request = AllocationRequest(3.0, "knapsack", (2, 3, 4), quantizer=quantizer)
    plan = allocate(layers, errors, request)
    assert plan_error(plan, errors, column) == pytest.approx(exhaustive_best(layers, errors, request, column))
    summary = summarize(plan, layers, errors)
    assert summary["error_source"] == quantizer and summary["predicted_error_attention"] == pytest.approx(
        plan_error(plan, errors, column))


def test_a_source_the_analysis_did_not_compute_is_refused_with_the_fix():
    layers, errors = small_tables()
    with pytest.raises(AllocationError, match=r"^The errors table has no err_gptq_attention values \(the predicted "
                                              r"errors of gptq\); rerun the analysis with quantizer errors on"):
        allocate(layers, errors.assign(err_gptq_attention=np.nan), AllocationRequest(3.0, quantizer="gptq",
                                                                                      candidates=(2, 3, 4)))
    with pytest.raises(AllocationError, match="Unknown error source 'awq'"):
        allocate(layers, errors, AllocationRequest(3.0, quantizer="awq", candidates=(2, 3, 4)))


def test_plans_for_a_quantizer_use_its_errors_or_say_why_they_use_rtns():
    """The sweeps' source for each quantizer (aespa: the attention-aware quantizer's, its start); an analysis without
    quantizer errors gives RTN's and the sentence that names the fix, as the Bit budget page offers RTN's alone."""
    layers, errors = small_tables()
    full = with_sources(layers, errors)
    assert available_error_sources(full) == ["rtn", "gptq", "attention"]
    assert [error_source_for(full, q) for q in ("rtn", "gptq", "attention", "aespa")] == [
        ErrorSourceChoice("rtn"), ErrorSourceChoice("gptq"), ErrorSourceChoice("attention"),
        ErrorSourceChoice("attention")]
    partial = full.assign(err_gptq_attention=np.where(full["layer"] == "l2", np.nan, full["err_gptq_attention"]))
    assert available_error_sources(partial) == ["rtn", "attention"] and available_error_sources(errors) == ["rtn"]
    fallback = error_source_for(partial, "gptq")
    assert fallback.source == "rtn"
    assert fallback.note == ("The analysis has no predicted errors of GPTQ, so the plans use RTN's; rerun the analysis "
                             "with quantizer errors on (aptq analyze --quantizer-errors) to plan with GPTQ's.")
    assert error_source_for(errors, "aespa").note.startswith("The analysis has no predicted errors of attention-aware")
    with pytest.raises(AllocationError, match="^Unknown quantizer 'awq'; use one of rtn, gptq, attention, aespa."):
        error_source_for(errors, "awq")


def unit_layers() -> tuple[pd.DataFrame, pd.DataFrame]:
    layers, errors = tables([4096, 4096, 4096], ["v", "o", "down"], ["l0", "l1", "l2"],
                            np.array([[8.0, 1.0], [8.0, 1.0], [4.0, 2.0]]), (2, 4))
    return layers.assign(trace_lm=[10.0, 4.0, 6.0], trace_lm_se=[1.0, 0.5, 0.0], trace_attention=[2.0, 1.0, 3.0],
                         trace_layerwise=[5.0, 4.0, 3.0], residual_ms=[1.0, 8.0, 2.0],
                         kl_rate=[0.2, 0.1, 0.6], kl_rate_se=[0.02, 0.0, 0.06]), errors


def test_predicted_totals_carry_the_propagated_standard_error():
    layers, errors = unit_layers()
    plan = Plan({"l0": 4, "l1": 2, "l2": 2}, AllocationRequest(3.0, candidates=(2, 4)))
    summary = summarize(plan, layers, errors)
    # heuristic factors 10/2/1 = 5, 4/1/8 = 0.5, 6/3/2 = 1, their errors 1/2 = 0.5, 0.5/8, 0; raw errors 1, 8, 4
    assert summary["predicted_error_attention"] == pytest.approx(5 * 1 + 0.5 * 8 + 1 * 4)
    assert summary["predicted_error_attention_se"] == pytest.approx(np.hypot(0.5 * 1, 0.0625 * 8))
    in_kl = Plan(plan.bits, AllocationRequest(3.0, candidates=(2, 4), unit="calibrated"))
    calibrated = summarize(in_kl, layers, errors)
    # calibrated factors kl_rate / trace_attention: 0.1, 0.1, 0.2 (errors 0.01, 0, 0.02)
    assert calibrated["predicted_error_attention"] == pytest.approx(0.1 * 1 + 0.1 * 8 + 0.2 * 4)
    assert calibrated["predicted_error_attention_se"] == pytest.approx(np.hypot(0.01 * 1, 0.02 * 4))
    assert np.isnan(summarize(plan, layers[["layer", "block", "kind", "fused", "n_params"]], errors)[
        "predicted_error_attention_se"])  # a table used as given has no known uncertainty


def test_layer_predictions_are_the_terms_of_the_predicted_total():
    """The per-layer terms that bench/allocation_checks.py splits by grid: with the width multiples, zero for a layer
    kept in full precision."""
    layers, errors = unit_layers()
    plan = Plan({"l0": 4, "l1": 2, "l2": 16}, AllocationRequest(3.0, candidates=(2, 4), width_multiples={2: 2.0,
                                                                                                        4: 1.5}))
    values, spread = layer_predictions(plan, layers, errors, "err_attention")
    # heuristic factors 5, 0.5, 1 (test_predicted_totals_carry_the_propagated_standard_error) × raw errors × multiples
    assert values == pytest.approx([5 * 1 * 1.5, 0.5 * 8 * 2.0, 0.0])
    assert spread == pytest.approx([0.5 * 1 * 1.5, 0.0625 * 8 * 2.0, 0.0])
    summary = summarize(plan, layers, errors)
    assert summary["predicted_error_attention"] == pytest.approx(values.sum())
    assert summary["predicted_error_attention_se"] == pytest.approx(np.sqrt((spread ** 2).sum()))


def test_the_calibrated_unit_changes_the_plan_and_needs_its_measurement():
    layers, errors = unit_layers()
    errors = errors[errors["layer"] != "l2"]
    layers = layers[layers["layer"] != "l2"]
    heuristic = allocate(layers, errors, AllocationRequest(3.0, "knapsack", (2, 4)))
    calibrated = allocate(layers.assign(kl_rate=[0.1, 0.4]), errors, AllocationRequest(3.0, "knapsack", (2, 4),
                                                                                      unit="calibrated"))
    assert heuristic.bits == {"l0": 4, "l1": 2} and calibrated.bits == {"l0": 2, "l1": 4}
    with pytest.raises(AllocationError, match="calibrated unit needs the layers' measured kl_rate"):
        allocate(layers.drop(columns=["kl_rate", "kl_rate_se"]), errors, AllocationRequest(3.0, candidates=(2, 4),
                                                                                          unit="calibrated"))


def test_width_multiples_scale_each_width_and_fall_back_to_the_nearest_measured_width():
    layers, errors = unit_layers()
    plan = Plan({"l0": 4, "l1": 2, "l2": 2}, AllocationRequest(3.0, candidates=(2, 4), width_multiples={2: 3.0}))
    summary = summarize(plan, layers, errors)
    # the heuristic terms of test_predicted_totals_carry_the_propagated_standard_error, 4-bit taking 2-bit's multiple
    assert summary["predicted_error_attention"] == pytest.approx(3.0 * (5 * 1 + 0.5 * 8 + 1 * 4))
    multiples = {2: 2.0, 4: 1.25}
    assert list(allocate_module.width_multiple(multiples, np.array([2, 3, 4, 8]))) == [2.0, 1.25, 1.25, 1.25]
    assert list(allocate_module.width_multiple({}, np.array([2, 8]))) == [1.0, 1.0]


def test_width_multiples_make_the_knapsack_minimize_the_multiplied_errors_exactly():
    rng = np.random.default_rng(3)
    layers, errors = tables([64 * s for s in (1, 2, 3, 5, 9)], ["q", "k", "v", "o", "down"],
                            [f"l{i}" for i in range(5)], rng.uniform(0, 10, (5, 3)), (2, 3, 4))
    multiples = {2: 2.5, 3: 1.25, 4: 1.0}
    scaled = errors.assign(err_attention=errors["err_attention"] * errors["bits"].map(multiples))
    for budget in (2.4, 3.0, 3.6):
        plan = allocate(layers, errors, AllocationRequest(budget, "knapsack", (2, 3, 4), width_multiples=multiples))
        best = exhaustive_best(layers, scaled, AllocationRequest(budget, "knapsack", (2, 3, 4)))
        assert plan_error(plan, scaled) == pytest.approx(best)
        assert summarize(plan, layers, errors)["predicted_error_attention"] == pytest.approx(best)


def test_width_multiples_are_the_uniform_plans_measured_over_predicted_and_bad_ones_are_refused():
    assert allocate_module.measured_width_multiples({2: (0.4, 0.2), 3: (0.06, 0.05)}) == pytest.approx(
        {2: 2.0, 3: 1.2})
    with pytest.raises(AllocationError, match="uniform 3-bit plan has a measured KL of nan"):
        allocate_module.measured_width_multiples({3: (float("nan"), 0.05)})
    layers, errors = small_tables()
    for bad in ({2: 0.0}, {9: 1.0}, {3: float("inf")}):
        with pytest.raises(AllocationError, match="Width multiples must map widths of 2–8 bits to positive numbers"):
            allocate(layers, errors, AllocationRequest(3.0, candidates=(2, 3, 4), width_multiples=bad))


@pytest.mark.parametrize("column, unit", [("residual_ms", "heuristic"), ("trace_lm", "heuristic"),
                                          ("kl_rate", "calibrated")])
def test_a_missing_factor_is_refused_instead_of_leaving_a_layer_in_raw_units(column, unit):
    layers, errors = unit_layers()
    broken = layers.assign(**{column: [layers[column].iloc[0], np.nan, layers[column].iloc[2]]})
    with pytest.raises(AllocationError, match=rf"^The {unit} unit has no factor for l1 \(1 layer\(s\);"):
        allocate(broken, errors, AllocationRequest(3.0, candidates=(2, 4), unit=unit))
    if unit == "heuristic":  # a column empty for every layer (an older analysis): the table is used as given
        as_given = allocate(layers.assign(**{column: np.nan}), errors, AllocationRequest(3.0, candidates=(2, 4)))
        assert as_given.bits == allocate(layers[["layer", "block", "kind", "fused", "n_params"]], errors,
                                         AllocationRequest(3.0, candidates=(2, 4))).bits


# ---- (bits, group size) candidates ---------------------------------------------------------------------------------

PAIR_GROUPS = (0, 32, 64)


def pair_tables(d_outs: list[int], d_ins: list[int], kinds: list[str], fused: list[str], seed: int):
    """Layers with d_in; errors at every (bits, group) of (2, 3, 4) × PAIR_GROUPS, smaller groups less error."""
    rng = np.random.default_rng(seed)
    names = [f"l{i}" for i in range(len(d_outs))]
    layers = pd.DataFrame({"layer": names, "block": range(len(names)), "kind": kinds, "fused": fused,
                           "n_params": [o * i for o, i in zip(d_outs, d_ins)], "d_in": d_ins, "score": 1.0})
    rows = []
    for name in names:
        scale = rng.uniform(0.5, 4)
        for bits in (2, 3, 4):
            for group in PAIR_GROUPS:
                error = scale * 4.0 ** -bits * (1 + (group or 128) / 64) * rng.uniform(0.8, 1.2)
                rows.append({"layer": name, "bits": bits, "group_size": group, "err_attention": error,
                             "err_layerwise": error})
    return layers, pd.DataFrame(rows)


def exhaustive_pairs(layers: pd.DataFrame, errors: pd.DataFrame, candidates,
                     budget: float) -> tuple[float | None, float]:
    """Least error over every (bits, group) per fused group whose effective bits fit the budget (brute force), and
    the largest effective average any choice reaches."""
    err = errors.set_index(["layer", "bits", "group_size"])["err_attention"]
    keys = fused_keys(layers)
    best, dearest = None, 0.0
    for combo in itertools.product(candidates, repeat=len(keys)):
        choice = dict(zip(keys, combo))
        cost = 0
        total = 0.0
        for row in layers.itertuples():
            bits, group = choice[row.fused]
            groups_per_row = -(-row.d_in // group) if group else 1
            cost += row.n_params * bits + (row.n_params // row.d_in) * 32 * groups_per_row
            total += err[(row.layer, bits, group)]
        dearest = max(dearest, cost / int(layers["n_params"].sum()))
        if cost <= Fraction(budget) * int(layers["n_params"].sum()):
            best = total if best is None else min(best, total)
    return best, dearest


@pytest.mark.parametrize("seed", range(12))
def test_pair_candidates_charged_by_effective_bits_agree_with_exhaustive_search(seed):
    rng = np.random.default_rng(seed)
    count = int(rng.integers(2, 5))
    d_ins = [int(d) for d in rng.choice([64, 128, 192], count)]
    d_outs = [int(d) for d in rng.choice([16, 32, 48], count)]
    fused = [f"l{i}" for i in range(count)]
    if count > 2 and rng.random() < 0.5:
        fused[1] = "l0"  # a fused pair shares one option
    layers, errors = pair_tables(d_outs, d_ins, ["q"] * count, fused, seed)
    candidates = tuple((int(b), int(g)) for b, g in rng.permutation(
        [(b, g) for b in (2, 3, 4) for g in PAIR_GROUPS])[:4])
    budget = float(rng.uniform(min(b for b, _ in candidates) + 0.5, 5.0))
    best, dearest = exhaustive_pairs(layers, errors, candidates, budget)
    if best is None or budget > max(dearest, max(b for b, _ in candidates)):  # refused: below or above every plan
        with pytest.raises(AllocationError):
            allocate(layers, errors, AllocationRequest(budget, "knapsack", candidates))
        return
    plan = allocate(layers, errors, AllocationRequest(budget, "knapsack", candidates))
    err = errors.set_index(["layer", "bits", "group_size"])["err_attention"]
    assert sum(err[(n, plan.bits[n], plan.group_sizes[n])] for n in plan.bits) == pytest.approx(best, rel=1e-9)
    summary = summarize(plan, layers, errors)
    assert summary["effective_bits"] <= budget + 1e-12
    assert summary["predicted_error_attention"] == pytest.approx(best, rel=1e-9)
    # what the pipeline quantizes apart: every layer off the request's group size, and only those, sorted
    assert plan.layer_groups() == tuple(sorted((n, g) for n, g in plan.group_sizes.items()
                                               if g != plan.request.group_size))
    frame = plan_frame(plan, layers)  # what the heatmap writes in each cell
    assert dict(zip(frame["layer"], frame["group"])) == plan.group_sizes


def test_equal_bytes_pairs_spend_what_the_budget_plan_stores_in_its_groups():
    layers, errors = pair_tables([32, 48, 16], [128, 192, 64], ["q", "k", "v"], ["l0", "l1", "l2"], seed=1)
    request = AllocationRequest(3.0, "knapsack-layerwise", (2, 3, 4), group_size=64, max_bits={"v": 3})
    pairs = equal_bytes_pairs(layers, 3.0, request, (0, 32))
    uniform = summarize(allocate(layers, errors, AllocationRequest(3.0, "uniform", (3,), group_size=64)), layers,
                        errors)
    assert pairs.budget == pytest.approx(uniform["effective_bits"]) and pairs.method == "knapsack"
    assert pairs.candidates == tuple((b, g) for b in (2, 3, 4) for g in (64, 0, 32))  # the request's group first
    assert (pairs.group_size, pairs.max_bits) == (64, {"v": 3})  # everything else kept
    plan = allocate(layers, errors, pairs)
    assert summarize(plan, layers, errors)["effective_bits"] <= uniform["effective_bits"] + 1e-12


def test_a_group_size_that_does_not_divide_a_layer_is_refused():
    layers, errors = pair_tables([16, 16], [64, 96], ["q", "k"], ["l0", "l1"], 0)
    with pytest.raises(AllocationError, match=r"^The group size 64 does not divide the 96 input columns of l1; use a "
                                              r"divisor of 32 \(every layer's d_in is a multiple of it\) or 0"):
        allocate(layers, errors, AllocationRequest(3.0, "knapsack", ((3, 64), (4, 0))))
    with pytest.raises(AllocationError, match="Candidates with group sizes are for the knapsack methods"):
        allocate(layers, errors, AllocationRequest(3.0, "uniform", ((3, 32), (4, 0))))


@pytest.mark.parametrize("seed", range(4))
def test_grid_multiples_price_each_grid_and_the_pairs_knapsack_minimizes_them_exactly(seed):
    """Each (bits, group) option is charged its grid's multiple; a grid without any takes the request's own group's
    (here groups of 32), and the knapsack's choice is the brute-force best of the multiplied errors."""
    layers, errors = pair_tables([32, 48, 16], [128, 192, 64], ["q", "k", "v"], ["l0", "l1", "l2"], seed)
    widths, grids = {2: 2.0, 3: 1.5, 4: 1.0}, {0: {2: 4.0, 3: 3.0}}  # per channel: 4 bits takes 3 bits' multiple
    charged = {(b, g): (grids[0] if g == 0 else widths)[min(b, 3) if g == 0 else b]
               for b in (2, 3, 4) for g in PAIR_GROUPS}
    scaled = errors.assign(err_attention=[e * charged[(b, g)] for e, b, g in
                                          zip(errors["err_attention"], errors["bits"], errors["group_size"])])
    candidates = pair_candidates((2, 3, 4), PAIR_GROUPS)
    for budget in (2.8, 3.4):
        request = AllocationRequest(budget, "knapsack", candidates, group_size=32, width_multiples=widths,
                                    grid_multiples=grids)
        plan = allocate(layers, errors, request)
        best, _ = exhaustive_pairs(layers, scaled, candidates, budget)
        err = scaled.set_index(["layer", "bits", "group_size"])["err_attention"]
        assert sum(err[(n, plan.bits[n], plan.group_sizes[n])] for n in plan.bits) == pytest.approx(best, rel=1e-9)
        summary = summarize(plan, layers, errors)
        assert summary["predicted_error_attention"] == pytest.approx(best, rel=1e-9)
        assert summary["error_unit"] == "heuristic × width multiples per grid"
        assert summary["grid_multiples"] == {0: {2: 4.0, 3: 3.0}}


def test_grid_multiples_without_the_own_grids_width_multiples_are_refused():
    layers, errors = pair_tables([32, 48], [128, 64], ["q", "k"], ["l0", "l1"], seed=0)
    request = AllocationRequest(3.0, "knapsack", pair_candidates((2, 3, 4), (0, 32)), group_size=32,
                                grid_multiples={0: {3: 1.2}})
    with pytest.raises(AllocationError, match=r"^Grid multiples need the width multiples of the plans' own group size "
                                              r"\(32\) beside them"):
        allocate(layers, errors, request)
    with pytest.raises(AllocationError, match="Width multiples must map widths of 2–8 bits to positive numbers"):
        allocate(layers, errors, replace(request, width_multiples={3: 1.0}, grid_multiples={0: {3: -1.0}}))
