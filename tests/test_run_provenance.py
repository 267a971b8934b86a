"""The runs table records which predicted errors and which unit made a run's plan: a knapsack plan made with the
attention-aware quantizer's errors says so, a uniform plan says nothing, and a store from before these columns opens
with its rows."""

from __future__ import annotations

import duckdb
import pandas as pd
import pytest

import aptq.pipeline as pipeline
from aptq import history
from aptq.data import Sampling
from aptq.models import load_model
from aptq.pipeline import EvalSettings, QuantizeSettings
from aptq.sensitivity import AnalysisSettings, analyze
from aptq.store import Store
from aptq.sweep import run_sweep, sweep_points
from tests.test_history_runs import a_run

NEW_COLUMNS = ("error_source", "error_unit")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "RUN_CACHE", tmp_path / "runs")
    monkeypatch.setattr(pipeline, "REFERENCE_CACHE", tmp_path / "reference")


def test_a_knapsack_run_records_its_error_source_and_unit_and_a_uniform_run_none(tiny_model_dir, text_corpus,
                                                                                  tmp_path):
    store = Store(tmp_path / "store.duckdb")
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    sampling = Sampling(4, 32, seed=0)
    layers, errors = analyze(loaded, text_corpus, sampling, AnalysisSettings(group_size=32, bits=(2, 4), max_blocks=1,
                                                                             quantizer_errors=True), store=store)
    table = run_sweep(loaded, text_corpus, sampling, layers, errors, sweep_points(["knapsack", "uniform"], [3.0], (0,)),
                      (2, 4), QuantizeSettings("attention", 32), EvalSettings(32, 64), store)
    assert table["key"].notna().all()
    runs = history.stored_runs(store).set_index("allocation")
    assert runs.loc["knapsack", "error_source"] == "attention" and runs.loc["knapsack", "error_unit"] == "heuristic"
    assert runs.loc["uniform", list(NEW_COLUMNS)].isna().all()
    made = history.trust(runs.reset_index())["made_with"].item()
    assert made == "attention errors, heuristic unit: 1; other solvers: 1"


def test_set_prediction_gives_a_stored_run_the_new_plans_source_and_unit(tmp_path):
    store = Store(tmp_path / "store.duckdb")
    history.record_run(store, a_run("r"))
    meta = {"allocation": "knapsack-layerwise", "analysis": "a", "error_source": "gptq", "error_unit": "calibrated"}
    assert (history.set_prediction(store, "r", meta).error_source, history.find_run(store, "r").error_unit) == \
        ("gptq", "calibrated")
    again = history.set_prediction(store, "r", meta | {"allocation": "aptq"})  # the same plan, now the APTQ rule's
    assert (again.error_source, again.error_unit) == (None, None)


def test_a_store_from_before_the_columns_opens_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.duckdb"
    old_schema = "\n".join(line for line in history.SCHEMA.splitlines()
                           if not any(f"EXISTS {column} " in line for column in NEW_COLUMNS))
    old_row = {name: value for name, value in a_run("old").row().items() if name not in NEW_COLUMNS}
    with duckdb.connect(str(path)) as con:
        con.execute(old_schema)
        con.register("row", pd.DataFrame([old_row]))
        con.execute("INSERT INTO runs BY NAME SELECT * FROM row")
        assert not set(NEW_COLUMNS) & {c[0] for c in con.execute("DESCRIBE runs").fetchall()}
    runs = history.stored_runs(Store(path))
    assert list(runs["key"]) == ["old"] and runs.loc[0, "perplexity"] == 12.0
    assert runs.loc[0, list(NEW_COLUMNS)].isna().all()
    history.record_run(Store(path), a_run("new", allocation="knapsack", error_source="rtn", error_unit="heuristic"))
    assert history.find_run(Store(path), "new").error_source == "rtn" and history.find_run(Store(path), "old")

