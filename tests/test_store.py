"""The DuckDB store file (aptq.store) and the analysis rows (aptq.analyses): locking, damaged, foreign and older files,
stale 'running' rows and claims. Processes killed in the middle of work: tests/test_faults.py."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import pytest

import aptq.store as store_module
from aptq import analyses
from aptq.errors import UserError
from aptq.progress import Cancelled
from aptq.store import Store

MODEL = analyses.ModelRecord("model-fp", "tiny", "llama", "here", "fp32", 1000, 2)
CALIBRATION = analyses.CalibrationRecord("calibration-fp", "text", "corpus-fp", "tokenizer-fp", 4, 24, 0)
RECORD = analyses.AnalysisRecord("key", MODEL, CALIBRATION, '{"group_size": 32}', 2, 2)

HOLD_LOCK = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
"""


def hold_lock(path: Path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path), str(seconds)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_a_store_held_by_another_process_is_busy_then_usable(tmp_path):
    path = tmp_path / "shared.duckdb"
    analyses.claim(Store(path), RECORD, "cpu", resume=True)
    holder = hold_lock(path, 30)
    try:
        with pytest.raises(UserError, match=r"is busy \(used by another process\); try again when"):
            analyses.status(Store(path, busy_timeout=0.5), "key")
    finally:
        holder.kill()
        holder.wait()
    holder = hold_lock(path, 0.5)  # released while we retry
    try:
        assert analyses.status(Store(path, busy_timeout=10), "key").blocks_done == 0
    finally:
        holder.wait()


def damaged_copy(tmp_path: Path, name: str) -> Path:
    """A real store whose blocks after the header are overwritten: DuckDB's checksums reject it."""
    path = tmp_path / name
    analyses.claim(Store(path), RECORD, "cpu", resume=True)
    content = bytearray(path.read_bytes())
    content[4096:8192] = b"\xff" * 4096
    path.write_bytes(bytes(content))
    return path


def test_damaged_stores_are_moved_aside_under_names_that_never_collide(tmp_path):
    path = damaged_copy(tmp_path, "store.duckdb")
    damaged = path.read_bytes()
    for _ in range(2):  # two damaged files in the same second: both copies are kept
        path.write_bytes(damaged)
        with pytest.warns(UserWarning, match=r"could not be read \(.*\); it was moved to .* a fresh store"):
            assert analyses.status(Store(path), "key") is None
    aside = sorted(tmp_path.glob("store.duckdb.corrupt-*"))
    assert len(aside) == 2 and all(copy.read_bytes() == damaged for copy in aside)
    analyses.claim(Store(path), RECORD, "cpu", resume=True)  # the fresh store works
    assert analyses.status(Store(path), "key").status == "running"


def test_a_file_that_is_not_a_duckdb_database_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("my notes, given as --store by mistake\n" * 50)
    with pytest.raises(UserError, match=r"notes.txt is not a DuckDB database written by this project .* left "
                                        r"untouched"):
        analyses.status(Store(path), "key")
    assert path.read_text().startswith("my notes") and list(tmp_path.iterdir()) == [path]


def test_an_unreadable_file_at_the_default_path_is_ours_and_moved_aside(tmp_path, monkeypatch):
    path = tmp_path / "aptq.duckdb"
    monkeypatch.setattr(store_module, "DEFAULT_PATH", path)
    path.write_bytes(b"torn " * 100)
    with pytest.warns(UserWarning, match="it was moved to"):
        assert analyses.status(Store(path), "key") is None
    [aside] = tmp_path.glob("aptq.duckdb.corrupt-*")
    assert aside.read_bytes() == b"torn " * 100


def test_a_database_of_another_application_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "inventory.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE items (sku VARCHAR, count INTEGER)")
    with pytest.raises(UserError, match=r"is a DuckDB database of another application \(tables items\)"):
        analyses.status(Store(path), "key")
    with duckdb.connect(str(path)) as con:
        tables = con.execute("SELECT table_name FROM information_schema.tables").fetchall()
    assert tables == [("items",)]


def test_a_store_of_another_version_is_explained(tmp_path):
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:  # our table name, other columns
        con.execute("CREATE TABLE analyses (key VARCHAR PRIMARY KEY, state VARCHAR)")
    with pytest.raises(UserError, match=r"comes from another version of this project \(table analyses has no "
                                        r"column blocks_done\); move it away"):
        analyses.status(Store(path), "key")


def test_a_running_row_whose_process_is_gone_reads_as_interrupted_and_is_resumed(tmp_path):
    store = Store(tmp_path / "store.duckdb")
    analyses.claim(store, RECORD, "cpu", resume=True)
    analyses.write_block(store, "key", 0, [{"layer": "a", "block": 0}], [{"layer": "a", "bits": 2, "group_size": 32}],
                         1.0, {"a": 0})
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_owner = f"{analyses.this_owner().rsplit(':', 2)[0]}:{gone.stdout.strip()}:1"
    store.execute("UPDATE analyses SET owner = ? WHERE key = 'key'", [dead_owner])  # as a kill -9 leaves it
    assert analyses.status(store, "key").status == "interrupted"
    assert analyses.claim(store, RECORD, "cpu", resume=True) == {0}  # claimed again, block 0 kept
    assert analyses.status(store, "key").owner == analyses.this_owner()


def test_a_live_owner_makes_a_second_claim_wait(tmp_path):
    store = Store(tmp_path / "store.duckdb")
    analyses.claim(store, RECORD, "cpu", resume=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_owner = f"{analyses.this_owner().rsplit(':', 2)[0]}:{sleeper.pid}:1"
        store.execute("UPDATE analyses SET owner = ? WHERE key = 'key'", [live_owner])
        with pytest.raises(analyses.Busy) as busy:
            analyses.claim(store, RECORD, "cpu", resume=False)  # not even a fresh start may take it over
        assert busy.value.owner == live_owner

        def cancel(done: int, total: int, message: str) -> None:
            assert "waiting for another process" in message
            raise Cancelled

        with pytest.raises(Cancelled):
            analyses.wait_while_running(store, "key", live_owner, cancel)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert analyses.status(store, "key").status == "interrupted"


def test_finishing_ends_the_claim(tmp_path):
    store = Store(tmp_path / "store.duckdb")
    analyses.claim(store, RECORD, "cpu", resume=True)
    analyses.finish(store, "key", "interrupted")
    state = analyses.status(store, "key")
    assert state.status == "interrupted" and state.owner is None


def test_a_store_damaged_inside_its_data_is_explained_when_read(tmp_path):
    path = tmp_path / "store.duckdb"
    store = Store(path)
    analyses.claim(store, RECORD, "cpu", resume=True)
    layers = [{"layer": f"layer{i}", "block": 0, "kind": "q", "n_params": i} for i in range(20000)]
    errors = [{"layer": f"layer{i}", "bits": 2, "group_size": 32, "err_attention": float(i)} for i in range(20000)]
    analyses.write_block(store, "key", 0, layers, errors, 1.0, {f"layer{i}": i for i in range(20000)})
    analyses.finish(store, "key", "complete")
    content = bytearray(path.read_bytes())
    for start in range(len(content) // 4, len(content), 1 << 17):  # the catalog still reads, the rows do not
        content[start:start + 4096] = b"\x55" * 4096
    path.write_bytes(bytes(content))
    with pytest.raises(UserError, match=r"could not be read \(.*orrupt.*\); it may be damaged"):
        analyses.load(Store(path), "key")


def test_threads_of_one_process_share_a_new_store(tmp_path):
    """The dashboard reads the store while its jobs write it: concurrent first connections must not conflict."""
    failures = []

    def read() -> None:
        try:
            for _ in range(10):
                assert analyses.status(Store(tmp_path / "store.duckdb"), "key") is None
        except Exception as exc:  # collected: an exception in a thread would not fail the test
            failures.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and not list(tmp_path.glob("*.corrupt-*"))


def test_a_complete_analysis_is_never_claimed_again(tmp_path):
    store = Store(tmp_path / "store.duckdb")
    analyses.claim(store, RECORD, "cpu", resume=True)
    analyses.finish(store, "key", "complete")
    assert analyses.claim(store, RECORD, "cpu", resume=True) is None  # a late second process reuses it
    assert analyses.status(store, "key").status == "complete"
