"""Page logic moved into the backend: coverage of plans and runs, which runs may be compared, the best runs, the
estimate of an unmeasured plan, predictions before quantizing, and layer rank shifts."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from aptq import charts, coverage, history, ranking, tradeoffs
from aptq.allocate import PREDICTED_ERROR_ATTENTION, AllocationRequest, allocate, summarize
from aptq.choices import PAIRS_SOLVER
from aptq.data import Sampling, load_corpus
from aptq.models import load_model
from aptq.pipeline import EvalSettings, QuantizeSettings, layer_table, run_plan
from aptq.store import Store
from tests.test_allocate import pair_tables, smol_tables, unit_layers


def test_coverage_names_whole_blocks_and_tells_other_sets_apart(tiny_model):
    _, arch = tiny_model("llama", num_hidden_layers=4)
    names = [layer.name for layer in arch.layers]
    block = {b: [layer.name for layer in arch.block_layers(b)] for b in range(4)}
    assert coverage.coverage_of(arch, names) == coverage.Coverage("all 4 blocks", frozenset(names), True)
    assert coverage.coverage_of(arch, block[0] + block[1]).label == "blocks 0–1 of 4"
    assert coverage.coverage_of(arch, block[2]).label == "block 2 of 4"
    gap = coverage.coverage_of(arch, block[0] + block[2]).label
    one_less = coverage.coverage_of(arch, block[0][1:]).label
    assert gap.startswith(f"{2 * len(block[0])} of {len(names)} layers (") and one_less.startswith(
        f"{len(block[0]) - 1} of {len(names)} layers (") and gap != one_less


def test_a_partial_plan_run_records_its_coverage_and_bits_over_it(tmp_path, tiny_model_dir):
    """A 3-bit plan over block 0 of 2: 3.000 bits over the covered layers, far more over the whole model."""
    loaded, corpus = load_model(str(tiny_model_dir("llama")), device="cpu"), load_corpus("brown")
    plan = {layer.name: 3 for layer in loaded.arch.block_layers(0)}
    row = run_plan(loaded, corpus, Sampling(2, 32), plan, QuantizeSettings(method="rtn", group_size=0),
                   EvalSettings(seqlen=32, max_tokens=64), store=Store(tmp_path / "s.duckdb"))
    assert row.coverage == "block 0 of 2"
    assert row.covered_avg_bits == pytest.approx(3.0)
    # two evaluation windows: each measure stored with its standard error over them (the quality chart's bands)
    stored = history.stored_runs(Store(tmp_path / "s.duckdb")).iloc[0]
    assert all(stored[name] == getattr(row, name) and getattr(row, name) > 0 for name in ("nll_se", "kl_se"))
    assert row.avg_bits == pytest.approx((3 + 16) / 2)  # two blocks of equal size, the second kept in FP16
    # A row stored before coverage was recorded gets the same answer from its plan.
    old = pd.DataFrame([replace(row, coverage=None, covered_avg_bits=None, covered_effective_bits=None).row()])
    filled = coverage.fill_coverage(old, loaded.arch, layer_table(loaded)).iloc[0]
    assert filled["coverage"] == "block 0 of 2" and filled["covered_avg_bits"] == pytest.approx(3.0)
    assert filled["covered_effective_bits"] == pytest.approx(row.covered_effective_bits)


def test_a_uniform_plan_under_an_analysis_covers_exactly_the_analysed_layers():
    layers, errors = smol_tables(blocks=3)
    bits, summary = coverage.uniform_over(layers, errors, 3, 64)
    assert set(bits) == set(layers["layer"]) and set(bits.values()) == {3}
    assert summary["avg_bits"] == 3.0 and summary[PREDICTED_ERROR_ATTENTION] > 0
    assert coverage.prediction_applies(bits, layers)
    assert not coverage.prediction_applies(bits | {"model.layers.9.q": 3}, layers)


def runs_frame(rows: list[dict]) -> pd.DataFrame:
    base = {"coverage": "all 2 blocks", "corpus": "brown", "eval_seqlen": 64, "eval_tokens": 256, "method": "rtn",
            "analysis": "a1", "created": pd.Timestamp("2026-01-01")}
    return pd.DataFrame([base | row for row in rows])


def test_runs_of_different_coverage_or_protocol_fall_into_different_sets():
    runs = runs_frame([{}, {}, {"coverage": "block 0 of 2"}, {"eval_tokens": 512}])
    sets = tradeoffs.run_sets(runs)
    assert [s.count for s in sets] == [2, 1, 1]
    assert sets[0].label == "all 2 blocks · brown evaluation split, window 64, 256 tokens (2 runs)"
    assert all(len(tradeoffs.select(runs, s)) == s.count for s in sets)


def test_only_the_newest_analysis_predictions_are_ranked_together():
    runs = runs_frame([{"analysis": "old", PREDICTED_ERROR_ATTENTION: 1.0, "created": pd.Timestamp("2026-01-01")},
                       {"analysis": "new", PREDICTED_ERROR_ATTENTION: 2.0, "created": pd.Timestamp("2026-01-03")},
                       {"analysis": "new", PREDICTED_ERROR_ATTENTION: 3.0, "created": pd.Timestamp("2026-01-02")},
                       {"analysis": "new", PREDICTED_ERROR_ATTENTION: None}])
    chosen = tradeoffs.newest_analysis(runs)
    assert chosen.analysis == "new" and chosen.left_out == 1
    assert sorted(chosen.runs[PREDICTED_ERROR_ATTENTION]) == [2.0, 3.0]


def test_the_estimate_follows_an_exact_power_law_and_needs_enough_runs():
    predicted = np.array([1.0, 2.0, 4.0, 8.0])
    runs = runs_frame([{PREDICTED_ERROR_ATTENTION: p, "kl": 0.5 * p ** 0.7} for p in predicted])
    found = tradeoffs.estimate(runs, 16.0, "a1", "kl")
    assert found.value == pytest.approx(0.5 * 16 ** 0.7) and found.quantizer == "rtn" and found.runs == 4
    assert found.low == pytest.approx(found.value) == pytest.approx(found.high)  # no scatter around the line
    assert tradeoffs.estimate(runs, 16.0, "another analysis", "kl") is None
    assert tradeoffs.estimate(runs.head(2), 16.0, "a1", "kl") is None
    # runs of one method with and without the block refinement are two quantizers: never fitted together
    refined = json.dumps({"block": {"iterations": 100, "learning_rate": None}})
    mixed = runs_frame([{PREDICTED_ERROR_ATTENTION: p, "kl": 0.5 * p ** 0.7, "method": "gptq", "settings": "{}"}
                        for p in predicted] +
                       [{PREDICTED_ERROR_ATTENTION: p, "kl": 0.2 * p, "method": "gptq", "settings": refined}
                        for p in [*predicted, 3.0]])
    found = tradeoffs.estimate(mixed, 16.0, "a1", "kl")
    assert found.quantizer == "gptq + 100 refinement steps" and found.runs == 5
    assert found.value == pytest.approx(0.2 * 16) == pytest.approx(found.high)


def test_the_pareto_frontier_matches_brute_force():
    rng = np.random.default_rng(0)
    runs = pd.DataFrame({"avg_bits": rng.choice([2.5, 3.0, 3.5, 4.0], 30), "perplexity": rng.uniform(10, 50, 30),
                         "top1": rng.uniform(0.5, 1, 30)})
    for measure, better in (("perplexity", lambda a, b: a < b), ("top1", lambda a, b: a > b)):
        front = tradeoffs.pareto_frontier(runs, "avg_bits", measure)
        dominated = {i for i, j in itertools.permutations(runs.index, 2)
                     if runs.at[j, "avg_bits"] <= runs.at[i, "avg_bits"]
                     and (better(runs.at[j, measure], runs.at[i, measure])
                          or (runs.at[j, measure] == runs.at[i, measure] and runs.at[j, "avg_bits"]
                              < runs.at[i, "avg_bits"]))}
        assert set(front.index) == set(runs.index) - dominated, measure
        assert front["avg_bits"].is_monotonic_increasing


def test_predicted_curves_give_every_solver_a_point_per_budget():
    layers, errors = smol_tables(blocks=2)
    curves = tradeoffs.predicted_curves(layers, errors, ("knapsack", "uniform", "aptq"), [2.5, 3.0, 4.0],
                                        (2, 3, 4, 8), 64)
    assert len(curves) == 9 and (curves["avg_bits"] <= curves["budget"] + 1e-9).all()
    at = curves.set_index(["solver", "budget"])[PREDICTED_ERROR_ATTENTION]
    assert all(at["knapsack", b] <= min(at["uniform", b], at["aptq", b]) for b in (2.5, 3.0, 4.0))
    assert math.isclose(curves.query("solver == 'uniform' and budget == 2.5")["avg_bits"].item(), 2.0)


def test_runs_of_a_plan_match_the_completed_plan(tiny_model):
    _, arch = tiny_model("llama")
    partial = {layer.name: 3 for layer in arch.block_layers(0)}
    complete = {layer.name: partial.get(layer.name, 16) for layer in arch.layers}
    runs = pd.DataFrame({"plan": [json.dumps(complete, sort_keys=True), json.dumps({"x": 3})]})
    assert list(tradeoffs.runs_of_plan(runs, partial, arch).index) == [0]


def test_rank_shifts_and_spearman():
    layers = pd.DataFrame({"layer": list("abcd"), "x": [4.0, 3.0, 2.0, 1.0], "y": [1.0, 3.0, 2.0, 4.0]})
    assert ranking.spearman(layers, "x", "x") == pytest.approx(1.0)
    assert ranking.spearman(layers, "x", "y") == pytest.approx(pd.Series([1, 2, 3, 4]).corr(pd.Series([4, 2, 3, 1])))
    moved = ranking.rank_shifts(layers, "x", "y", n=2)
    assert list(moved["layer"]) == ["a", "d"] and list(moved["shift"]) == [-3.0, 3.0]


def test_a_shared_view_survives_the_url_and_bad_values_are_dropped():
    from aptq.share import SharedView, pins_from_text, pins_to_text

    layers, _ = smol_tables(blocks=3)
    pins = {"model.layers.2.down": 16, "model.layers.0.q": 8}
    view = SharedView("embedded", "brown", 64, 512, 64, 4, "knapsack", 3.25, pins_to_text(pins, layers))
    params = view.to_params()
    assert params["pins"] == "0.q=8,2.down=16" and params["budget"] == "3.25"
    back = SharedView.from_params(params)
    assert back == view and pins_from_text(back.pins, layers) == pins
    edited = SharedView.from_params({"budget": "three", "blocks": "4", "pins": "0.q=8,9.q=4,1.up=99,x,1.k=2"})
    assert edited == SharedView(blocks=4, pins="0.q=8,9.q=4,1.up=99,x,1.k=2")
    assert pins_from_text(edited.pins, layers) == {"model.layers.0.q": 8, "model.layers.1.k": 2}


def test_a_shared_view_carries_the_analysis_options_error_source_unit_and_width_multiples():
    from aptq.share import SharedView, groups_from_text, groups_to_text

    multiples = "measured with gptq: 2 bits ×1.95, 3 bits ×1.35, 4 bits ×1.36"
    view = SharedView("embedded", "brown", 64, 512, 64, None, "knapsack", 3.0, None, True, groups_to_text((0, 32)),
                      False, "attention", "calibrated", multiples)
    params = view.to_params()
    assert params["quantizer_errors"] == "1" and params["calibrate"] == "0" and params["extra_groups"] == "0,32"
    assert params["errors"] == "attention" and params["unit"] == "calibrated" and params["multiples"] == multiples
    assert SharedView.from_params(params) == view and groups_from_text(params["extra_groups"]) == (0, 32)
    assert groups_to_text(()) is None and "extra_groups" not in SharedView(extra_groups=groups_to_text(())).to_params()
    edited = SharedView.from_params({"quantizer_errors": "yes", "calibrate": "1", "extra_groups": "32,-8,x,,128"})
    assert edited.quantizer_errors is None and edited.calibrate is True
    assert groups_from_text(edited.extra_groups) == (32, 128)


def test_whole_model_bits_count_unnamed_layers_in_fp16(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    table = layer_table(loaded)
    half = {layer.name: 4 for layer in loaded.arch.block_layers(1)}
    assert coverage.whole_model_size(table, half, 0)["avg_bits"] == pytest.approx((4 + 16) / 2)
    assert coverage.covered_size(table, half, half, 0)["covered_avg_bits"] == pytest.approx(4.0)


def test_run_time_scales_the_measured_rates_of_the_same_method_and_device():
    from aptq.timing import expected_run_time

    def run(method, layers, seconds, device="cpu", samples=4, seqlen=64, block=None):
        plan = json.dumps({f"l{i}": (3 if i < layers else 16) for i in range(10)})
        settings = {"samples": samples, "seqlen": seqlen} | ({"block": {"iterations": block}} if block else {})
        return {"method": method, "device": device, "plan": plan, "quant_seconds": seconds, "eval_seconds": 2.0,
                "eval_tokens": 200, "settings": json.dumps(settings)}

    runs = pd.DataFrame([run("gptq", 4, 8.0), run("gptq", 2, 4.0), run("rtn", 5, 1.0), run("gptq", 4, 99.0, "cuda"),
                         run("gptq", 4, 40.0, block=50)])
    # gptq on cpu: 2 s per layer at 4 × 64 tokens → 8 layers at 8 × 64 tokens take 32 s; eval 0.01 s per token.
    found = expected_run_time(runs, "gptq", "cpu", {f"l{i}": 4 for i in range(8)}, 8, 64, 1000)
    assert found.quant_seconds == pytest.approx(32.0) and found.eval_seconds == pytest.approx(10.0)
    assert found.runs == 2 and found.total == pytest.approx(42.0)
    assert expected_run_time(runs, "attention", "cpu", {"l0": 4}, 8, 64, 10) is None
    # block refinement: only the runs with as many steps
    refined = expected_run_time(runs, "gptq", "cpu", {f"l{i}": 4 for i in range(8)}, 8, 64, 1000, refinement_steps=50)
    assert refined.quant_seconds == pytest.approx(160.0) and refined.runs == 1
    assert expected_run_time(runs, "gptq", "cpu", {"l0": 4}, 8, 64, 10, refinement_steps=100) is None


def test_the_quality_chart_spans_its_runs_and_baseline_on_its_log_axis():
    """With the current plan unmeasured (a vertical line), the log axis still spans the data, not up to 1e28."""
    runs = pd.DataFrame({"allocation": ["uniform"] * 3, "method": ["rtn"] * 3, "plan_name": ["u2", "u3", "u4"],
                         "covered_avg_bits": [2.0, 3.0, 4.0], "perplexity": [29015.5, 83.06, 38.29]})
    figure = charts.tradeoff_curves(runs, "perplexity", x="covered_avg_bits", baseline=29.0,
                                    current={"x": 3.0, "y": None, "label": "current plan: not measured yet"})
    low, high = figure.layout.yaxis.range
    assert 29.0 / 2 < 10 ** low <= 29.0 and 29015.5 <= 10 ** high < 29015.5 * 2


def test_every_quantizer_has_its_own_line_style_and_marker_in_the_quality_chart():
    from aptq.choices import QUANTIZERS

    runs = pd.DataFrame({"allocation": "uniform", "method": list(QUANTIZERS), "plan_name": "u3",
                         "covered_avg_bits": 3.0, "perplexity": 50.0})
    traces = charts.tradeoff_curves(runs).data
    assert len({trace.line.dash for trace in traces}) == len({trace.marker.symbol for trace in traces}) == \
        len(traces) == len(QUANTIZERS)


def test_runs_with_block_refinement_have_lines_of_their_own_in_the_quality_chart():
    refined = json.dumps({"block": {"iterations": 100, "learning_rate": None}})
    runs = pd.DataFrame({"allocation": "uniform", "method": "aespa", "plan_name": ["u2", "u3", "u2", "u3"],
                         "covered_avg_bits": [2.0, 3.0, 2.0, 3.0], "perplexity": [140.0, 56.0, 108.0, 54.0],
                         "settings": ["{}", "{}", refined, refined]})
    traces = charts.tradeoff_curves(runs).data
    assert {trace.name: list(trace.y) for trace in traces} == {"uniform · aespa": [140.0, 56.0],
                                                               "uniform · aespa + 100 refinement steps": [108.0, 54.0]}


def test_expected_analysis_time_is_the_median_rate_times_blocks_and_tokens():
    from aptq.timing import expected_analysis_time

    found = expected_analysis_time([1e-4, 3e-4, 2e-3], blocks=5, samples=8, seqlen=64)
    assert found.seconds == pytest.approx(3e-4 * 5 * 8 * 64) and found.blocks_measured == 3
    assert expected_analysis_time([], blocks=5, samples=8, seqlen=64) is None


def test_predicted_curves_add_the_pairs_knapsack_at_the_bytes_of_each_budget():
    layers, errors = pair_tables([32, 48, 16, 32], [128, 192, 64, 128], ["q", "k", "v", "o"],
                                 ["l0", "l1", "l2", "l3"], seed=3)
    budgets = [2.5, 3.0, 3.5]
    curves = tradeoffs.predicted_curves(layers, errors, ("knapsack", "uniform"), budgets, (2, 3, 4), 64)
    at = curves.set_index(["solver", "budget"])
    assert len(curves) == 9 and set(curves["solver"]) == {"knapsack", "uniform", PAIRS_SOLVER}
    for budget in budgets:
        # the widths in groups of 64 are among the pairs at the same bytes: the pairs can only do as well or better
        assert at.loc[(PAIRS_SOLVER, budget), "avg_bits"] <= budget + 1e-9
        assert (at.loc[(PAIRS_SOLVER, budget), PREDICTED_ERROR_ATTENTION]
                <= at.loc[("knapsack", budget), PREDICTED_ERROR_ATTENTION] * (1 + 1e-9))
    without = tradeoffs.predicted_curves(layers, errors[errors["group_size"] == 64], ("knapsack",), budgets, (2, 3, 4),
                                         64)
    assert set(without["solver"]) == {"knapsack"}  # one group size analysed: no pairs to choose from


def test_the_quality_chart_draws_each_line_in_its_band_of_two_standard_errors():
    runs = pd.DataFrame({"allocation": ["uniform"] * 2 + ["knapsack"] * 2, "method": "gptq",
                         "plan_name": ["u3", "u4", "k3", "k4"], "covered_avg_bits": [3.0, 4.0, 3.0, 4.0],
                         "perplexity": [60.0, 48.0, 55.0, 47.0], "nll_se": [0.01, 0.02, 0.01, np.nan],
                         "kl": [0.3, 0.1, 0.25, 0.09], "kl_se": [0.01, 0.005, 0.2, 0.004]})
    traces = charts.tradeoff_curves(runs, "perplexity").data
    bands = [trace for trace in traces if trace.fill == "toself"]
    # one band: the knapsack line has a run stored without a standard error, so it gets none
    assert len(bands) == 1 and bands[0].legendgroup == "uniform · gptq"
    # along the bits: the high ends, then the low ends back
    assert list(bands[0].x) == [3.0, 4.0, 4.0, 3.0]
    assert list(bands[0].y) == pytest.approx([60.0 * math.exp(0.02), 48.0 * math.exp(0.04), 48.0 * math.exp(-0.04),
                                              60.0 * math.exp(-0.02)])
    kl_bands = [trace for trace in charts.tradeoff_curves(runs, "kl").data if trace.fill == "toself"]
    # the knapsack's 3-bit band would reach below 0 on the log axis: left out, not cut
    assert [band.legendgroup for band in kl_bands] == ["uniform · gptq"]
    assert list(kl_bands[0].y) == pytest.approx([0.32, 0.11, 0.09, 0.28])
    assert not [t for t in charts.tradeoff_curves(runs.drop(columns=["nll_se"])).data if t.fill == "toself"]


def test_predicted_curves_carry_the_standard_error_of_each_plans_predicted_total():
    layers, errors = unit_layers()
    curves = tradeoffs.predicted_curves(layers, errors, ("knapsack", "uniform"), [2.0, 3.0, 4.0], (2, 4), 0)
    for row in curves.itertuples():
        plan = allocate(layers, errors, AllocationRequest(row.budget, row.solver, (2, 4), group_size=0))
        expected = summarize(plan, layers, errors)
        assert row.predicted_error_attention_se == pytest.approx(expected["predicted_error_attention_se"])
    assert (curves["predicted_error_attention_se"] > 0).all()
    bands = [trace for trace in charts.predicted_curves(curves).data if trace.fill == "toself"]
    assert sorted(band.legendgroup for band in bands) == ["knapsack", "uniform"]
