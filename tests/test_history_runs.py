"""Runs a person manages (name, tag, delete, filter, CSV) and stored full-precision baselines, on a real DuckDB file."""

from __future__ import annotations

import io

import pandas as pd

from aptq import history
from aptq.store import Store


def stored(tmp_path) -> Store:
    store = Store(tmp_path / "store.duckdb")
    rows = [{"key": f"r{i}", "model": "m", "plan_name": name, "allocation": allocation, "method": method,
             "coverage": "all 2 blocks", "plan": "{}", "perplexity": 10.0 + i}
            for i, (name, allocation, method) in enumerate([("knapsack-3.00", "knapsack", "gptq"),
                                                            ("uniform-4", "uniform", "rtn"),
                                                            ("aptq-3.00", "aptq", "attention")])]
    for row in rows:
        history.record_run(store, row)
    return store


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


def test_threads_of_one_process_share_the_store(tmp_path):
    """A background job writing runs while a page reads them (one process, as in the dashboard) sees no error."""
    import threading

    store = Store(tmp_path / "store.duckdb")
    errors: list[str] = []

    def work(index: int) -> None:
        for i in range(40):
            try:
                history.record_run(store, {"key": f"t{index}-{i}", "model": "m"})
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
