"""Runs a person manages (name, tag, delete, filter, CSV) and stored full-precision baselines, on a real DuckDB file."""

from __future__ import annotations

import io
from dataclasses import replace

import pandas as pd
import pytest

from aptq import history
from aptq.history import RunRecord
from aptq.store import Store


def a_run(key: str, **fields) -> RunRecord:
    """A complete run record (a 3-bit GPTQ run of model "m"), with `fields` replaced."""
    run = RunRecord(key=key, model="m", model_name="tiny", corpus="brown", eval_seqlen=64, eval_tokens=252,
                    calibration="c", method="gptq", group_size=64, settings="{}", plan='{"l0": 3}', plan_key="p",
                    plan_name=None, allocation="manual", budget=None, analysis=None, avg_bits=3.0,
                    effective_bits=3.5, size_mb=1.0, predicted_error_attention=None, predicted_error_layerwise=None,
                    perplexity=12.0, kl=0.1, top1=0.9, fp_perplexity=11.0, quant_seconds=1.0, eval_seconds=1.0,
                    device="cpu", notes=None, coverage="all 2 blocks", covered_avg_bits=3.0,
                    covered_effective_bits=3.5)
    return replace(run, **fields)


def stored(tmp_path) -> Store:
    store = Store(tmp_path / "store.duckdb")
    for i, (name, allocation, method) in enumerate([("knapsack-3.00", "knapsack", "gptq"),
                                                    ("uniform-4", "uniform", "rtn"),
                                                    ("aptq-3.00", "aptq", "attention")]):
        history.record_run(store, a_run(f"r{i}", plan_name=name, allocation=allocation, method=method,
                                        perplexity=10.0 + i))
    return store


def test_a_run_record_is_one_row_of_the_runs_table_and_reads_back_equal(tmp_path):
    store = stored(tmp_path)
    assert set(RunRecord.columns()) | {"quantizer"} == set(history.stored_runs(store).columns)  # + quantizer_names
    run = a_run("full", budget=3.0, analysis="a", predicted_error_attention=0.5, predicted_error_layerwise=0.7,
                notes="a fallback", completions="[]", label="mine", tag="t")
    history.record_run(store, run)
    back = history.find_run(store, "full")
    assert back == replace(run, created=back.created) and back.created is not None
    assert type(back.eval_tokens) is int and back.calibration == "c"
    assert history.find_run(store, "r0").budget is None  # NULL reads back as None, not NaN
    assert history.find_run(store, "missing") is None


def test_runs_get_a_name_and_a_tag_and_are_filtered_by_them(tmp_path):
    store = stored(tmp_path)
    history.label_run(store, "r1", "  baseline for class ", "lecture 3")
    runs = history.stored_runs(store, "m")
    row = runs.set_index("key").loc["r1"]
    assert row["label"] == "baseline for class" and row["tag"] == "lecture 3"
    assert list(history.filter_runs(runs, tag="lecture 3")["key"]) == ["r1"]
    assert list(history.filter_runs(runs, "BASELINE")["key"]) == ["r1"]
    assert set(history.filter_runs(runs, "knap")["key"]) == {"r0"}
    assert len(history.filter_runs(runs, "")) == 3
    history.record_run(store, a_run("refined", model="m", settings='{"block": {"iterations": 50}}'))
    runs = history.stored_runs(store, "m")
    assert runs.set_index("key").loc["refined", "quantizer"] == "gptq + 50 refinement steps"
    assert list(history.filter_runs(runs, "refinement")["key"]) == ["refined"]
    history.label_run(store, "r1", "", None)
    assert history.stored_runs(store, "m").set_index("key").loc["r1", ["label", "tag"]].isna().all()


def test_deleting_runs_removes_exactly_those(tmp_path):
    store = stored(tmp_path)
    assert history.delete_runs(store, ["r0", "r2", "missing"]) == 2
    assert list(history.stored_runs(store, "m")["key"]) == ["r1"]


def test_the_csv_export_reads_back_as_the_runs_table(tmp_path):
    runs = history.stored_runs(stored(tmp_path), "m")
    back = pd.read_csv(io.StringIO(history.runs_csv(runs)))
    assert list(back["key"]) == list(runs["key"]) and "plan" not in back
    assert back["perplexity"].tolist() == runs["perplexity"].tolist()


def test_a_baseline_is_stored_once_per_protocol(tmp_path):
    store = Store(tmp_path / "store.duckdb")
    history.record_baseline(store, "m", "brown", 64, 252, 30.0, 100.0)
    history.record_baseline(store, "m", "brown", 64, 252, 31.0, 110.0)  # measured again: replaces
    history.record_baseline(store, "m", "brown", 512, 16383, 20.0, 90.0)
    baselines = history.stored_baselines(store, "m")
    assert len(baselines) == 2
    assert baselines.set_index("eval_seqlen").loc[64, "perplexity"] == 31.0


@pytest.mark.integration
def test_threads_of_one_process_share_the_store(tmp_path):
    """A background job writing runs while a page reads them (one process, as in the dashboard) sees no error."""
    import threading

    store = Store(tmp_path / "store.duckdb")
    errors: list[str] = []

    def work(index: int) -> None:
        for i in range(40):
            try:
                history.record_run(store, a_run(f"t{index}-{i}"))
                history.stored_runs(store, "m")
            except Exception as exc:  # collected: the assertion below names it
                errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert len(history.stored_runs(store, "m")) == 160
