"""The runs table records whose predicted errors, in which unit, a run's predicted totals are (for a knapsack plan
also what chose it), the trust table never ranks two units together, and a store from before these columns opens with
its rows."""

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
LATER_COLUMNS = (*NEW_COLUMNS, "nll_se", "kl_se", "top1_se")  # every column added to the runs table since its start


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "RUN_CACHE", tmp_path / "runs")
    monkeypatch.setattr(pipeline, "REFERENCE_CACHE", tmp_path / "reference")


def test_every_predicted_run_records_its_error_source_and_unit(tiny_model_dir, text_corpus, tmp_path):
    store = Store(tmp_path / "store.duckdb")
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    sampling = Sampling(4, 32, seed=0)
    layers, errors = analyze(loaded, text_corpus, sampling, AnalysisSettings(group_size=32, bits=(2, 4), max_blocks=1,
                                                                             quantizer_errors=True), store=store)
    table = run_sweep(loaded, text_corpus, sampling, layers, errors, sweep_points(["knapsack", "uniform"], [3.0], (0,)),
                      (2, 4), QuantizeSettings("attention", 32), EvalSettings(32, 64), store)
    assert table["key"].notna().all()
    runs = history.stored_runs(store).set_index("allocation")
    for allocation in ("knapsack", "uniform"):
        assert tuple(runs.loc[allocation, list(NEW_COLUMNS)]) == ("attention", "heuristic")
    trusted = history.trust(runs.reset_index())
    assert list(trusted["predicted_with"]) == ["attention errors, heuristic unit"] and list(trusted["runs"]) == [2]


def test_the_trust_table_ranks_each_unit_apart():
    runs = pd.DataFrame([a_run(f"r{i}", allocation="knapsack", predicted_error_attention=float(i),
                               predicted_error_layerwise=float(i), kl=0.1 * i, perplexity=10.0 + i,
                               error_source="rtn", error_unit=unit).row()
                         for i, unit in enumerate(["heuristic"] * 3 + ["calibrated"] * 3 + [None] * 3)])
    trusted = history.trust(runs).set_index("predicted_with")
    assert trusted["runs"].to_dict() == {"not recorded": 3, "rtn errors, calibrated unit": 3,
                                         "rtn errors, heuristic unit": 3}


def test_set_prediction_gives_a_stored_run_the_new_plans_source_and_unit(tmp_path):
    store = Store(tmp_path / "store.duckdb")
    history.record_run(store, a_run("r"))
    meta = {"allocation": "knapsack-layerwise", "analysis": "a", "error_source": "gptq", "error_unit": "calibrated",
            "predicted_error_attention": 1.0, "predicted_error_layerwise": 2.0}
    assert (history.set_prediction(store, "r", meta).error_source, history.find_run(store, "r").error_unit) == \
        ("gptq", "calibrated")
    again = history.set_prediction(store, "r", {"allocation": "aptq", "analysis": None})  # now without a prediction
    assert (again.error_source, again.error_unit) == (None, None)


def test_a_store_from_before_the_columns_opens_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.duckdb"
    old_schema = "\n".join(line for line in history.SCHEMA.splitlines()
                           if not any(f"EXISTS {column} " in line for column in LATER_COLUMNS))
    old_row = {name: value for name, value in a_run("old").row().items() if name not in LATER_COLUMNS}
    with duckdb.connect(str(path)) as con:
        con.execute(old_schema)
        con.register("row", pd.DataFrame([old_row]))
        con.execute("INSERT INTO runs BY NAME SELECT * FROM row")
        assert not set(LATER_COLUMNS) & {c[0] for c in con.execute("DESCRIBE runs").fetchall()}
    runs = history.stored_runs(Store(path))
    assert list(runs["key"]) == ["old"] and runs.loc[0, "perplexity"] == 12.0
    assert runs.loc[0, list(LATER_COLUMNS)].isna().all()
    history.record_run(Store(path), a_run("new", allocation="knapsack", error_source="rtn", error_unit="heuristic",
                                      kl_se=0.002))
    new = history.find_run(Store(path), "new")
    assert (new.error_source, new.kl_se) == ("rtn", 0.002)
    assert history.find_run(Store(path), "old").kl_se is None

