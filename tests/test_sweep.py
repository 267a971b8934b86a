"""Sweeps on a tiny model: every point quantized once, reused on a rerun, predictions ranked against measurements."""

from __future__ import annotations

import pytest

import aptq.pipeline as pipeline
from aptq.allocate import PREDICTED_ERROR_ATTENTION
from aptq.cli import main
from aptq.data import Sampling
from aptq.errors import UserError
from aptq.history import stored_plans, stored_runs, trust
from aptq.models import load_model, model_fingerprint
from aptq.pipeline import EvalSettings, QuantizeSettings
from aptq.sensitivity import AnalysisSettings, analyze
from aptq.store import Store
from aptq.sweep import run_sweep, sweep_points
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
    assert list(table["method"]) == ["rtn"] and table["runs"].iloc[0] == len(runs)
    assert -1 <= table["spearman_attention_kl"].iloc[0] <= 1


def test_cli_sweep_rejects_unknown_methods(capsys):
    assert main(["sweep", "--methods", "uniform,greedy"]) == 2
    assert "Unknown allocation method greedy" in capsys.readouterr().err
