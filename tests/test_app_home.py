"""The dashboard's Home page in Streamlit's AppTest: analysis start, cancel and resume on a real tiny model, and the
page's behaviour with a bad model, an empty, a locked and an older-version store."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest
from streamlit.testing.v1 import AppTest

from aptq.data import load_corpus
from aptq.models import load_model
from aptq.progress import Cancelled
from aptq.sensitivity import analyze
from aptq.store import Store
from ui import jobs
from ui.session import AnalysisRequest

APP = Path(__file__).resolve().parent.parent / "app.py"
PAGES = ("app.py", "pages/1_Sensitivity.py", "pages/2_Bit_budget.py", "pages/3_Quantize.py", "pages/4_Trade_offs.py")
REQUEST = AnalysisRequest(samples=4, seqlen=64, group_size=64)


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "store.duckdb"
    monkeypatch.setenv("APTQ_STORE", str(path))
    return path


def app(model: str | None = None, request: AnalysisRequest | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    if model is not None:
        at.session_state["model_source"] = model
    if request is not None:
        at.session_state["analysis_request"] = request
    return at


def visit(at: AppTest, page: str) -> AppTest:
    return at.switch_page(page).run()


def texts(elements) -> str:
    return " ".join(str(e.value) for e in elements)


def run_until(at: AppTest, done, timeout: float = 60) -> AppTest:
    """Rerun the page (as the progress fragment does every second) until `done(at)` holds."""
    deadline = time.monotonic() + timeout
    while not done(at):
        assert time.monotonic() < deadline, f"timed out; errors: {texts(at.error)}"
        time.sleep(1.0)  # as often as the progress fragment reruns: each rerun draws the whole page again
        at.run()
    return at


@pytest.mark.integration
def test_every_page_explains_an_empty_store(store, tiny_model_dir):
    at = app(str(tiny_model_dir("llama")), REQUEST)
    for page in PAGES:
        visit(at, page)
        assert not at.exception and not at.error, page
        assert at.info, f"{page} shows no hint"
    hints = {page: texts(visit(at, page).info) for page in PAGES[1:3]}
    assert all("start one on the Home page" in hint for hint in hints.values()), hints
    assert "Not analyzed yet" in texts(visit(at, "app.py").info)
    assert "No runs yet" in texts(visit(at, "pages/3_Quantize.py").info)


# The unit set keeps one page of each path (Home; ui.session.current_analysis; model_and_corpus_or_stop).
@pytest.mark.parametrize("page", [pytest.param(page, marks=pytest.mark.integration)
                                  if page in ("pages/2_Bit_budget.py", "pages/4_Trade_offs.py") else page
                                  for page in PAGES])
def test_a_bad_model_shows_an_error_not_a_traceback(store, page):
    at = visit(app("/no/such/model"), page)
    assert not at.exception
    assert "does not exist" in texts(at.error)


@pytest.mark.integration  # the unit set starts (resumes) from Home in the next test, with these checks
def test_analysis_starts_from_home_and_shows_the_heatmap(store, tiny_model_dir):
    at = app(str(tiny_model_dir("llama")), REQUEST).run()
    assert "the first one measures its speed" in texts(at.caption)  # nothing analysed here yet: no estimate
    start = next(b for b in at.button if b.label == "Start / resume analysis")
    start.click().run()
    run_until(at, lambda at: "Analysis stored" in texts(at.success))
    assert not at.exception and not at.error
    assert "2 blocks" not in texts(at.success)  # every block of the tiny model: "all blocks"
    assert any(s.label == "Heatmap metric" for s in at.selectbox)
    assert not any(b.label == "Start / resume analysis" for b in at.button)  # nothing left to do


def test_an_interrupted_analysis_resumes_from_home(store, tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")

    def stop_after_first_block(done: int, total: int, message: str) -> None:
        if done >= 1 and message != "starting":
            raise Cancelled

    with pytest.raises(Cancelled):
        analyze(loaded, load_corpus("brown"), REQUEST.sampling, REQUEST.settings, store=Store(store),
                progress=stop_after_first_block)
    at = app(str(tiny_model_dir("llama")), REQUEST).run()
    assert "interrupted after 1 of 2 blocks" in texts(at.warning)
    # The block left is expected to take what the stored one took (same tokens, same device).
    (first,) = Store(store).query("SELECT seconds FROM analysis_blocks")["seconds"]
    assert f"Expected: about {jobs.format_seconds(first)} on cpu, at the median speed of 1 block " in texts(at.caption)
    next(b for b in at.button if b.label == "Start / resume analysis").click().run()
    run_until(at, lambda at: "Analysis stored" in texts(at.success))
    assert not at.error and not at.exception
    assert any(s.label == "Heatmap metric" for s in at.selectbox)
    assert not any(b.label == "Start / resume analysis" for b in at.button)  # nothing left to do


def test_cancel_stops_a_queued_analysis(store, tiny_model_dir):
    source = str(tiny_model_dir("llama"))
    at = app(source, REQUEST).run()
    # Hold the model's job lock, as a running quantization would: the analysis waits in the queue.
    registry = jobs._registry()
    with registry.guard:
        lock = registry.locks.setdefault(source, threading.Lock())
    with lock:
        next(b for b in at.button if b.label == "Start / resume analysis").click().run()
        next(b for b in at.button if b.label == "Cancel").click().run()
    run_until(at, lambda at: "was cancelled" in texts(at.warning))
    assert "Not analyzed yet" in texts(at.info) and not at.error


def test_a_locked_store_is_reported_as_busy(store, tiny_model_dir):
    Store(store).execute("SELECT 1")  # create the file
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(60)", str(store)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        at = visit(app(str(tiny_model_dir("llama"))), "pages/1_Sensitivity.py")
    finally:
        holder.kill()
        holder.wait()
    assert not at.exception
    assert len(at.error) == 1 and "busy" in texts(at.error)


def test_an_older_store_is_reported_not_raised(store, tiny_model_dir):
    with duckdb.connect(str(store)) as con:  # an analyses table from another version: other columns
        con.execute("CREATE TABLE analyses (key VARCHAR PRIMARY KEY, state VARCHAR)")
    at = app(str(tiny_model_dir("llama")))
    for page in PAGES:
        visit(at, page)
        assert not at.exception, page
    assert "another version" in texts(visit(at, "pages/1_Sensitivity.py").error)


def test_full_precision_perplexity_runs_in_the_background(store, tiny_model_dir):
    at = app(str(tiny_model_dir("llama")), REQUEST).run()
    at.number_input(key="fp_seqlen").set_value(64)
    at.number_input(key="fp_tokens").set_value(256)
    next(b for b in at.button if b.label == "Measure perplexity").click().run()
    run_until(at, lambda at: "Perplexity **" in texts(at.success))
    assert "window 64, 252 predicted tokens" in texts(at.success) and not at.error
