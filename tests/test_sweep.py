"""Sweeps on a tiny model: every point quantized once, reused on a rerun, predictions ranked against measurements."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import aptq.pipeline as pipeline
from aptq.allocate import PREDICTED_ERROR_ATTENTION
from aptq.calibrate import with_unit, with_width_multiples
from aptq.cli import main
from aptq.data import Sampling
from aptq.errors import UserError
from aptq.history import plan_key, stored_plans, stored_runs, trust
from aptq.models import load_model, model_fingerprint
from aptq.pipeline import EvalSettings, QuantizeSettings
from aptq.sensitivity import AnalysisSettings, analyze
from aptq.store import Store
from aptq.sweep import plan_points, run_sweep, sweep_points
from aptq.validate import parse_budgets

SAMPLING = Sampling(6, 32, seed=0)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "RUN_CACHE", tmp_path / "runs")
    monkeypatch.setattr(pipeline, "REFERENCE_CACHE", tmp_path / "reference")


def test_budget_ranges_and_lists():
    assert parse_budgets("2.5:4.5:0.25") == [2.5, 2.75, 3.0, 3.25, 3.5, 3.75, 4.0, 4.25, 4.5]
    assert parse_budgets("3,3.5") == [3.0, 3.5]
    with pytest.raises(UserError, match="start:stop:step"):
        parse_budgets("4:3:0.5")


@pytest.mark.integration
def test_sweep_quantizes_each_plan_once_and_resumes(tiny_model_dir, text_corpus, tmp_path):
    store = Store(tmp_path / "sweep.duckdb")
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    layers, errors = analyze(loaded, text_corpus, SAMPLING, AnalysisSettings(group_size=32, bits=(2, 3, 4)),
                             store=store)
    points = sweep_points(["uniform", "knapsack", "random"], [2.5, 3.0, 3.5, 6.0], seeds=(0, 1))
    args = (loaded, text_corpus, SAMPLING, layers, errors, points, (2, 3, 4), QuantizeSettings("rtn", 32),
            EvalSettings(32, 256), store)
    first = run_sweep(*args)
    assert len(first) == 4 * 4
    skipped = first[first["budget"] == 6.0]
    assert skipped["skipped"].str.contains("4").all()  # above the widest candidate: the message names the limit
    measured = first.dropna(subset=["key"])
    assert (measured["avg_bits"] <= measured["budget"] + 1e-9).all()
    uniform = measured[measured["allocation"] == "uniform"]
    assert uniform["key"].nunique() == 2  # 2.5 → 2 bits, 3.0 and 3.5 → the same 3-bit plan, quantized once
    knapsack = measured[measured["allocation"] == "knapsack"].sort_values("budget")
    assert knapsack[PREDICTED_ERROR_ATTENTION].is_monotonic_decreasing
    runs = stored_runs(store, model_fingerprint(loaded.path))
    assert len(runs) == measured["key"].nunique()
    assert len(stored_plans(store)) == measured["key"].nunique()  # a plan is stored once, under its latest name
    again = run_sweep(*args)
    assert again.dropna(subset=["key"])["cached"].all()
    # A new prediction of the same plans (here: every error doubled) reaches the stored runs without model work.
    doubled = errors.assign(err_attention=2 * errors["err_attention"])
    redo = run_sweep(*args[:4], doubled, *args[5:]).dropna(subset=["key"])
    assert redo["cached"].all()
    runs = stored_runs(store, model_fingerprint(loaded.path)).set_index("key")
    for key, predicted in zip(redo["key"], redo[PREDICTED_ERROR_ATTENTION]):
        assert runs.loc[key, PREDICTED_ERROR_ATTENTION] == pytest.approx(predicted)
        assert predicted == pytest.approx(2 * first.set_index("key").loc[[key], PREDICTED_ERROR_ATTENTION].iloc[0])
    runs = runs.reset_index()
    table = trust(runs)
    assert list(table["quantizer"]) == ["rtn"] and table["runs"].iloc[0] == len(runs)
    assert -1 <= table["spearman_attention_kl"].iloc[0] <= 1


def test_cli_sweep_rejects_unknown_methods(capsys):
    assert main(["sweep", "--methods", "uniform,greedy"]) == 2
    assert "Unknown allocation method greedy" in capsys.readouterr().err


def two_source_analysis() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Four equal layers whose RTN errors make l0 the sensitive one and whose GPTQ and attention-aware errors make it
    l3 (the attention-aware ones at half GPTQ's)."""
    names = ["l0", "l1", "l2", "l3"]
    layers = pd.DataFrame({"layer": names, "block": 0, "kind": ["q", "k", "v", "down"], "fused": names,
                           "n_params": 4096, "score": 1.0})
    rtn_weight, gptq_weight = np.array([8.0, 1, 1, 1]), np.array([1.0, 1, 1, 8])
    rows = []
    for i, name in enumerate(names):
        for bits in (2, 3, 4):
            rtn, gptq = rtn_weight[i] * 4.0 ** -bits, gptq_weight[i] * 4.0 ** -bits
            rows.append({"layer": name, "bits": bits, "err_layerwise": rtn, "err_attention": rtn,
                         "err_gptq_layerwise": gptq, "err_gptq_attention": gptq,
                         "err_aware_layerwise": gptq / 2, "err_aware_attention": gptq / 2})
    return layers, pd.DataFrame(rows)


def test_sweep_plans_use_the_errors_of_the_quantizer_that_runs(tmp_path):
    """The sweep's plans (sequential, Ray and the Trade-offs page all plan through plan_points) minimize the
    predicted errors of the quantizer that will run; without them, RTN's (the Bit budget page's fallback)."""
    layers, errors = two_source_analysis()
    store = Store(tmp_path / "plans.duckdb")
    points = sweep_points(["knapsack"], [3.0], (0,))
    expected = {"rtn": ("rtn", "l0"), "gptq": ("gptq", "l3"), "attention": ("attention", "l3"),
                "aespa": ("attention", "l3")}
    for method, (source, widest) in expected.items():
        (planned,) = plan_points(layers, errors, points, (2, 3, 4), QuantizeSettings(method, 64), "model", store)
        assert planned.meta["error_source"] == source
        assert max(planned.bits, key=planned.bits.get) == widest and planned.bits[widest] == 4
    summary = json.loads(stored_plans(store).set_index("key").loc[plan_key("model", planned.bits, 64), "summary"])
    assert summary["error_source"] == "attention"
    assert planned.meta[PREDICTED_ERROR_ATTENTION] == pytest.approx(summary[PREDICTED_ERROR_ATTENTION])
    rtn_only = errors.drop(columns=[c for c in errors if c.startswith(("err_gptq", "err_aware"))])
    (fallback,) = plan_points(layers, rtn_only, points, (2, 3, 4), QuantizeSettings("gptq", 64), "model", store)
    assert fallback.meta["error_source"] == "rtn" and fallback.bits["l0"] == 4


def test_sweep_plans_in_the_unit_the_layers_table_carries(tmp_path):
    """After aptq.calibrate.with_unit the plans sum errors × kl_rate / trace: a layer measured to move the KL most
    gets the widest width, and the prediction is in KL."""
    layers, errors = two_source_analysis()
    layers = layers.assign(trace_layerwise=1.0, trace_attention=1.0, trace_lm=1.0, trace_lm_se=0.0, residual_ms=1.0)
    rates = pd.DataFrame({"layer": layers["layer"], "kl_rate": [1.0, 100.0, 1.0, 1.0], "kl_rate_se": 0.1})
    measured = with_unit(layers, rates)
    points = sweep_points(["knapsack"], [3.0], (0,))
    store = Store(tmp_path / "plans.duckdb")
    (heuristic,) = plan_points(layers, errors, points, (2, 3, 4), QuantizeSettings("rtn", 64), "model", store)
    (calibrated,) = plan_points(measured, errors, points, (2, 3, 4), QuantizeSettings("rtn", 64), "model", store)
    assert heuristic.bits["l0"] == 4 and calibrated.bits["l1"] == 4
    rtn = errors.set_index(["layer", "bits"])["err_attention"]
    expected = sum(rate * rtn[(name, calibrated.bits[name])] for name, rate in zip(rates["layer"], rates["kl_rate"]))
    assert calibrated.meta[PREDICTED_ERROR_ATTENTION] == pytest.approx(expected)


def test_sweep_plans_charge_the_width_multiples_the_layers_table_carries(tmp_path):
    """After aptq.calibrate.with_width_multiples a width measured to cost more than predicted is avoided, the
    prediction is the multiplied sum, and the plan says which unit its total is in."""
    layers, errors = two_source_analysis()
    points = sweep_points(["knapsack"], [3.0], (0,))
    store = Store(tmp_path / "plans.duckdb")
    (plain,) = plan_points(layers, errors, points, (2, 3, 4), QuantizeSettings("rtn", 64), "model", store)
    multiples = pd.DataFrame({"bits": [2, 3, 4], "group_size": 64, "multiple": [100.0, 1.0, 1.0]})
    charged = with_width_multiples(layers, multiples, 64)
    (multiplied,) = plan_points(charged, errors, points, (2, 3, 4), QuantizeSettings("rtn", 64), "model", store)
    assert 2 in plain.bits.values() and set(multiplied.bits.values()) == {3}
    rtn = errors.set_index(["layer", "bits"])["err_attention"]
    assert multiplied.meta[PREDICTED_ERROR_ATTENTION] == pytest.approx(sum(rtn[(name, 3)] for name in layers["layer"]))
    assert multiplied.meta["error_unit"] == "heuristic × width multiples" and plain.meta["error_unit"] == "heuristic"
    assert multiplied.meta["width_multiples"] == {2: 100.0, 3: 1.0, 4: 1.0} and multiplied.meta["grid_multiples"] == {}
