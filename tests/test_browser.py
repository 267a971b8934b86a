"""End to end: the real dashboard in a real headless Chromium, every page, screenshots under test-artifacts/.

The store is filled beforehand with a real analysis of a tiny model, a saved plan and two quantization runs, so that
every page has content; the browser switches to that model on the Home page like a person would.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aptq import charts, history
from aptq.allocate import PREDICTED_ERROR_ATTENTION, PREDICTED_ERROR_LAYERWISE, AllocationRequest, allocate, summarize
from aptq.data import load_corpus
from aptq.models import load_model, model_fingerprint
from aptq.pipeline import EvalSettings, QuantizeSettings, run_plan, uniform_plan
from aptq.sensitivity import analyze
from aptq.store import Store
from tests.browser import (
    ARTIFACTS,
    average_bits,
    browser_available,
    chromium,
    cut_texts,
    dashboard,
    metric_value,
    open_page,
    plotly_traces,
    scrolling_tables,
    titles_under_toolbars,
    wait_for,
    wait_for_charts,
    wait_for_text,
)
from ui.session import AnalysisRequest

pytestmark = pytest.mark.skipif(not browser_available(), reason="needs Debian's chromium and chromium-driver")
REQUEST = AnalysisRequest(samples=4, seqlen=64, group_size=64)
TABLE_DRAWN = "[data-testid=stDataFrame] .dvn-scroller"  # a data table's grid, drawn


@pytest.fixture(scope="module")
def filled_store(tmp_path_factory, tiny_model_dir) -> tuple[Path, str]:
    """A store with an analysis, a saved knapsack plan and two runs of the tiny llama; and the model's directory."""
    model = str(tiny_model_dir("llama"))
    store = Store(tmp_path_factory.mktemp("browser") / "store.duckdb")
    loaded, corpus = load_model(model, device="cpu"), load_corpus("brown")
    layers, errors = analyze(loaded, corpus, REQUEST.sampling, REQUEST.settings, store=store)
    plan = allocate(layers, errors, AllocationRequest(3.0, group_size=REQUEST.group_size))
    summary = summarize(plan, layers, errors)
    history.save_plan(store, model_fingerprint(loaded.path), "knapsack-3.00", plan.bits,
                      {"allocation": "knapsack", "budget": 3.0, "group_size": 64, "summary": summary})
    evaluation = EvalSettings(seqlen=64, max_tokens=256)
    predicted = {PREDICTED_ERROR_ATTENTION: summary[PREDICTED_ERROR_ATTENTION]}
    for bits, method, meta in ((plan.bits, "attention", {"name": "knapsack-3.00", "allocation": "knapsack",
                                                        "budget": 3.0} | predicted),
                               (uniform_plan(loaded.arch, 4), "rtn", {"name": "uniform-4", "allocation": "uniform"})):
        run_plan(loaded, corpus, REQUEST.sampling, bits, QuantizeSettings(method=method, group_size=64), evaluation,
                 store=store, plan_meta=meta)
    return store.path, model


def test_every_page_renders_without_errors(filled_store):
    from selenium.common.exceptions import ElementNotInteractableException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    store, model = filled_store
    with dashboard({"APTQ_STORE": str(store)}) as url, chromium() as driver:
        driver.get(url)
        body = wait_for_text(driver, "Full-precision perplexity")
        assert "SmolLM2-135M-Instruct" in body and "dequantized Q4_1" in body
        field = driver.find_element(By.CSS_SELECTOR, "input[aria-label='Model']")
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(model)
        next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text == "Use this model and corpus").click()
        wait_for_text(driver, "Analysis stored")
        wait_for_charts(driver, 1)
        driver.save_screenshot(str(ARTIFACTS / "home.png"))

        open_page(driver, "Sensitivity", "Layer-wise versus attention-aware ranking")
        wait_for_charts(driver, 3)
        wait_for(driver, lambda _: driver.find_elements(By.CSS_SELECTOR, TABLE_DRAWN), "the rank table")
        assert not scrolling_tables(driver)  # the rank table's five columns in view
        driver.save_screenshot(str(ARTIFACTS / "sensitivity.png"))

        body = open_page(driver, "Bit budget", "Pins (0)")
        wait_for_charts(driver, 2)
        before = shown_bits(body)  # a number: the page may print the same value as 3.00 or 3.000
        for attempt in range(3):  # keys that land while the page re-renders are lost on a loaded machine: again
            thumb = driver.find_element(By.CSS_SELECTOR, "[data-testid=stSlider] input[type=range]")
            driver.execute_script("arguments[0].focus()", thumb)  # the range input is hidden behind the thumb
            ActionChains(driver).send_keys(*[Keys.ARROW_RIGHT] * 10).perform()
            try:
                body = wait_for(driver, lambda body: shown_bits(body) > before, "a new plan after the slider moved",
                                timeout=40)
                break
            except AssertionError:
                if attempt == 2:
                    raise
        assert shown_bits(body) > before
        wait_for_charts(driver, 2)
        for attempt in range(3):  # plotly may be redrawing the heatmap (no size yet, or a click lost while the page
            # re-renders) on a loaded machine: again
            cells = driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .nsewdrag")[0]  # the plan heatmap
            size = cells.rect
            try:
                ActionChains(driver).move_to_element_with_offset(cells, -size["width"] / 4, -size["height"] * 3 / 7) \
                    .pause(0.5).click().perform()  # block 0, query projection
                wait_for_text(driver, "1 cell(s) selected", timeout=40)
                break
            except (ElementNotInteractableException, AssertionError):
                if attempt == 2:
                    raise
                time.sleep(2)
        next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text == "Pin selected").click()
        wait_for_text(driver, "Pins (1)")
        driver.save_screenshot(str(ARTIFACTS / "bit_budget.png"))

        open_page(driver, "Quantize", "Runs of this model")
        driver.save_screenshot(str(ARTIFACTS / "quantize.png"))

        open_page(driver, "Trade-offs", "2 run(s) covering all 2 blocks under this protocol")
        wait_for_charts(driver, 4)
        wait_for(driver, lambda _: driver.find_elements(By.CSS_SELECTOR, TABLE_DRAWN), "the trust table")
        assert not scrolling_tables(driver)  # the trust table's ρ columns in view
        assert not titles_under_toolbars(driver)  # half-width charts: trust, two plans side by side
        driver.save_screenshot(str(ARTIFACTS / "trade_offs.png"))

        next(e for e in driver.find_elements(By.CSS_SELECTOR, "[data-testid=stSidebar] label")
             if "Presentation mode" in e.text).click()
        body = open_page(driver, "Bit budget", "Pins (1)")
        assert "Candidate widths" not in body  # presentation mode: the fine controls are left out
        wait_for_charts(driver, 1)
        assert not cut_texts(driver)  # the larger type still shows every number of the plan in full
        driver.save_screenshot(str(ARTIFACTS / "bit_budget_presentation.png"))


LECTURE = AnalysisRequest(samples=4, seqlen=64, group_size=64, max_blocks=1)  # block 0 of the tiny llama's 2
LECTURE_TOKENS = 1024


@pytest.fixture(scope="module")
def lecture_store(tmp_path_factory, tiny_model_dir) -> tuple[Path, str, str]:
    """A partial analysis (block 0 of 2), knapsack and uniform runs over it under the default protocol, and one
    whole-model run under another protocol that must never share their chart; the store, the model, the key of
    the knapsack-3.00 run."""
    model = str(tiny_model_dir("llama"))
    store = Store(tmp_path_factory.mktemp("lecture") / "store.duckdb")
    loaded, corpus = load_model(model, device="cpu"), load_corpus("brown")
    layers, errors = analyze(loaded, corpus, LECTURE.sampling, LECTURE.settings, store=store)
    # The Quantize page's default window for this model (its context, 256) and few tokens, typed in on the page.
    settings = QuantizeSettings(method="rtn", group_size=64)
    evaluation = EvalSettings(seqlen=256, max_tokens=LECTURE_TOKENS, prompts=2)
    keys = {}
    for allocation, budget in (("knapsack", 2.5), ("knapsack", 3.0), ("knapsack", 3.5), ("uniform", 3.0)):
        plan = allocate(layers, errors, AllocationRequest(budget, allocation, group_size=64))
        summary = summarize(plan, layers, errors)
        meta = {"name": f"{allocation}-{budget:.2f}", "allocation": allocation, "budget": budget,
                "analysis": layers.attrs["analysis_key"], PREDICTED_ERROR_ATTENTION:
                summary[PREDICTED_ERROR_ATTENTION], PREDICTED_ERROR_LAYERWISE: summary[PREDICTED_ERROR_LAYERWISE]}
        keys[meta["name"]] = run_plan(loaded, corpus, LECTURE.sampling, plan.bits, settings, evaluation, store=store,
                                      plan_meta=meta).key
    run_plan(loaded, corpus, LECTURE.sampling, uniform_plan(loaded.arch, 4), settings,
             EvalSettings(seqlen=64, max_tokens=256), store=store, plan_meta={"name": "uniform-4 whole"})
    return store.path, model, keys["knapsack-3.00"]


def test_a_lecturer_path_shows_numbers_that_agree_with_each_other_and_the_store(lecture_store):
    """From a shared link to the trade-offs: plan bits, run bits and the current plan's point read off the screen
    agree with each other and with the store, and the curves hold only runs of one coverage and protocol."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    path, model, plan_run = lecture_store
    store = Store(path)
    runs = history.stored_runs(store).set_index("key")
    link = (f"?model={model}&samples=4&seqlen=64&group=64&blocks=1&solver=knapsack&budget=3.0")
    with dashboard({"APTQ_STORE": str(path)}) as url, chromium() as driver:
        driver.get(url + "/" + link)
        body = wait_for_text(driver, "Analysis stored")
        assert "first 1 of 2 blocks" in body  # the link chose the partial analysis, nobody typed anything

        body = open_page(driver, "Bit budget", "Pins (0)")
        assert not cut_texts(driver)  # each number and its scope are read in full
        plan_bits = float(metric_value(body, "Average bits (analysed layers)"))
        assert plan_bits == pytest.approx(runs.loc[plan_run, "covered_avg_bits"], abs=5e-4)
        whole = f"{runs.loc[plan_run, 'avg_bits']:.3f} average bits over the whole model"
        assert whole in body  # the plan's whole-model bits are the ones its run measured
        wait_for(driver, lambda _: "budget=3.0" in driver.current_url and "solver=knapsack" in driver.current_url,
                 f"the view in the address bar (now {driver.current_url})", timeout=30)

        body = open_page(driver, "Quantize", "Runs of this model")
        field = driver.find_element(By.CSS_SELECTOR, "input[aria-label='Evaluation tokens']")
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(str(LECTURE_TOKENS), Keys.ENTER)
        time.sleep(2)  # the rerun with the new count starts; the button's action is the one that run draws
        wait_for(driver, lambda _: field.get_attribute("value") == str(LECTURE_TOKENS), "the token count")
        next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text == "Quantize and evaluate").click()
        body = wait_for_text(driver, "Stored earlier: no model work was done")
        assert not cut_texts(driver)
        assert float(metric_value(body, "Average bits (block 0 of 2)")) == pytest.approx(plan_bits, abs=5e-4)
        assert float(metric_value(body, "Average bits (whole model)")) == pytest.approx(
            runs.loc[plan_run, "avg_bits"], abs=5e-4)
        assert float(metric_value(body, "Perplexity")) == pytest.approx(runs.loc[plan_run, "perplexity"], abs=5e-4)
        assert "The same prompts, continued greedily" in body
        # Both continuations of every stored prompt come on screen, not scrolled away (their starts: a long unbroken
        # word may end in an ellipsis in its cell); the table may draw after the metrics on a loaded machine.
        starts = [" ".join(text.split())[:16] for completion in json.loads(runs.loc[plan_run, "completions"])
                  for text in (completion["full_precision"], completion["quantized"])]
        wait_for(driver, lambda text: all(start in " ".join(text.split()) for start in starts),
                 "both continuations of every stored prompt", timeout=60)
        driver.save_screenshot(str(ARTIFACTS / "lecture_quantize.png"))

        body = open_page(driver, "Trade-offs", "under this protocol")
        same = runs[(runs["coverage"] == "block 0 of 2") & (runs["eval_tokens"] == runs.loc[plan_run, "eval_tokens"])]
        assert f"{len(same)} run(s) covering block 0 of 2 under this protocol" in body
        wait_for_charts(driver, 3)
        assert not cut_texts(driver)  # the run set's name (coverage and protocol) is read in full
        assert not titles_under_toolbars(driver)
        traces = [t for chart in plotly_traces(driver) for t in chart]
        curves = [t for t in traces if " · " in t["name"]]  # allocation · quantizer lines
        points = {(round(x, 6), round(y, 6)) for t in curves for x, y in zip(t["x"], t["y"])}
        assert curves, [t["name"] for t in traces]
        assert points == {(round(r.covered_avg_bits, 6), round(r.perplexity, 6)) for r in same.itertuples()}
        star = next(t for t in traces if t["name"].startswith("current plan (knapsack-3.00):"))  # quality chart
        assert "measured" in star["name"] and "estimated" not in star["name"]
        assert star["x"][0] == pytest.approx(runs.loc[plan_run, "covered_avg_bits"])
        assert star["y"][0] == pytest.approx(runs.loc[plan_run, "perplexity"])
        driver.save_screenshot(str(ARTIFACTS / "lecture_trade_offs.png"))


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """draw(figure) → its axes as Chromium drew them: {"x"/"y": {"range", "labels"}} (plotly.js from the plotly
    package, written beside the page: no server, no network)."""
    folder = tmp_path_factory.mktemp("charts")
    with chromium() as driver:
        def draw(figure) -> dict:
            page = folder / f"chart{len(list(folder.glob('*.html')))}.html"
            figure.write_html(page, include_plotlyjs="directory", default_width=900)
            driver.get(page.as_uri())
            wait_for(driver, lambda _: driver.execute_script(
                "const g = document.querySelector('.js-plotly-plot'); return !!(g && g._fullLayout)"),
                "the chart", timeout=30)
            return driver.execute_script(
                "const g = document.querySelector('.js-plotly-plot'); return Object.fromEntries(['x', 'y'].map(a => "
                "[a, {range: g._fullLayout[a + 'axis'].range, labels: Array.from(g.querySelectorAll("
                "'.' + a + 'tick text')).map(t => t.textContent)}]))")
        yield draw


def test_the_plan_heatmap_block_axis_starts_at_its_first_block(drawn):
    """With the embedded model's 30 blocks, the pin markers and the clickable squares over the cells made plotly
    pad the block axis to −2 (and the projection axis by most of a row)."""
    plan = pd.DataFrame([{"layer": f"model.layers.{b}.{kind}", "block": b, "kind": kind, "bits": 2 + (b % 3)}
                         for b in range(30) for kind in ("q", "k", "v", "o")])
    axes = drawn(charts.plan_heatmap(plan, selectable=True, pinned=frozenset({"model.layers.0.v"})))
    assert axes["x"]["range"] == pytest.approx([-0.5, 29.5])
    assert axes["x"]["labels"] == [str(b) for b in range(0, 30, 2)]
    assert axes["y"]["range"] == pytest.approx([3.5, -0.5])  # one row per projection, q at the top


def test_the_predicted_curves_label_their_log_axis_with_whole_values(drawn):
    """Over two decades plotly labelled every minor tick with a bare digit ("5 6 7 8 9 0.1 2 3 … 9 1 2 3"): the
    labels must be few, distinct, and each the value at its tick."""
    budgets = np.arange(2.0, 5.01, 0.25)
    curves = pd.DataFrame({"solver": "knapsack", "avg_bits": budgets,
                           PREDICTED_ERROR_ATTENTION: 2.4 * np.exp(-1.3 * (budgets - 2.0))})
    axes = drawn(charts.predicted_curves(curves, {"x": 3.0, "y": 0.46, "label": "current plan"}))
    labels = [label.replace(",", "") for label in axes["y"]["labels"]]
    low, high = (10 ** end for end in axes["y"]["range"])
    assert 2 <= len(labels) <= 8 and len(set(labels)) == len(labels), labels
    assert all(low <= float(label) <= high for label in labels), (labels, low, high)
    assert labels == sorted(labels, key=float)


def shown_bits(body: str) -> float:
    """The average bits on screen as a number; NaN while a re-render shows something else there."""
    try:
        return float(average_bits(body))
    except ValueError:
        return float("nan")
