"""End to end: the real dashboard in a real headless Chromium, every page, screenshots under test-artifacts/.

The store is filled beforehand with a real analysis of a tiny model, a saved plan and two quantization runs, so that
every page has content; the browser switches to that model on the Home page like a person would.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from aptq import history
from aptq.allocate import AllocationRequest, allocate, summarize
from aptq.data import load_corpus
from aptq.models import load_model, model_fingerprint
from aptq.pipeline import EvalSettings, QuantizeSettings, run_plan, uniform_plan
from aptq.sensitivity import analyze
from aptq.store import Store
from tests.browser import ARTIFACTS, ERROR_MARKERS, browser_available, chromium, dashboard
from ui.session import AnalysisRequest

pytestmark = pytest.mark.skipif(not browser_available(), reason="needs Debian's chromium and chromium-driver")
REQUEST = AnalysisRequest(samples=4, seqlen=64, group_size=64)


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
    predicted = {"predicted_error_attention": summary["predicted_error_attention"]}
    for bits, method, meta in ((plan.bits, "attention", {"name": "knapsack-3.00", "allocation": "knapsack",
                                                        "budget": 3.0} | predicted),
                               (uniform_plan(loaded.arch, 4), "rtn", {"name": "uniform-4", "allocation": "uniform"})):
        run_plan(loaded, corpus, REQUEST.sampling, bits, QuantizeSettings(method=method, group_size=64), evaluation,
                 store=store, plan_meta=meta)
    return store.path, model


def body_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def wait_for(driver, condition, what: str, timeout: float = 120):
    """Poll until `condition(body text)` holds and the script has finished (no status widget); fail on error text."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while True:
        body = body_text(driver)
        found = [marker for marker in ERROR_MARKERS if marker in body]
        assert not found, f"{what}: the page shows {found}:\n{body[:3000]}"
        if condition(body) and not driver.find_elements(By.CSS_SELECTOR, "[data-testid=stStatusWidget]"):
            return body
        assert time.monotonic() < deadline, f"{what} did not appear; the page shows:\n{body[:2000]}"
        time.sleep(0.5)


def wait_for_text(driver, text: str, timeout: float = 120) -> str:
    return wait_for(driver, lambda body: text in body, repr(text), timeout)


def wait_for_charts(driver, count: int, timeout: float = 60) -> None:
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while len(driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .main-svg")) < count:
        assert time.monotonic() < deadline, f"fewer than {count} charts rendered"
        time.sleep(0.5)
    time.sleep(1)  # let plotly finish drawing before a screenshot


def open_page(driver, label: str, text: str) -> str:
    """Click the sidebar link (same session, so the chosen model and the plan stay)."""
    from selenium.webdriver.common.by import By

    link = next(a for a in driver.find_elements(By.CSS_SELECTOR, "[data-testid=stSidebarNav] a") if a.text == label)
    link.click()
    return wait_for_text(driver, text)


def average_bits(body: str) -> str:
    lines = body.splitlines()
    return lines[lines.index("Average bits") + 1]


def test_every_page_renders_without_errors(filled_store):
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
        driver.save_screenshot(str(ARTIFACTS / "sensitivity.png"))

        body = open_page(driver, "Bit budget", "Pins (0)")
        wait_for_charts(driver, 2)
        before = average_bits(body)
        thumb = driver.find_element(By.CSS_SELECTOR, "[data-testid=stSlider] input[type=range]")
        driver.execute_script("arguments[0].focus()", thumb)  # the range input is visually hidden behind the thumb
        ActionChains(driver).send_keys(*[Keys.ARROW_RIGHT] * 10).perform()
        body = wait_for(driver, lambda body: average_bits(body) != before, "a new plan after the slider moved")
        assert float(average_bits(body)) > float(before)
        wait_for_charts(driver, 2)
        cells = driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .nsewdrag")[0]  # the plan heatmap
        size = cells.rect
        ActionChains(driver).move_to_element_with_offset(cells, -size["width"] / 4, -size["height"] * 3 / 7) \
            .pause(0.5).click().perform()  # block 0, query projection
        wait_for_text(driver, "1 cell(s) selected")
        next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text == "Pin selected").click()
        wait_for_text(driver, "Pins (1)")
        driver.save_screenshot(str(ARTIFACTS / "bit_budget.png"))

        open_page(driver, "Quantize", "Runs of this model")
        driver.save_screenshot(str(ARTIFACTS / "quantize.png"))

        open_page(driver, "Trade offs", "2 run(s) under this protocol")
        wait_for_charts(driver, 4)
        driver.save_screenshot(str(ARTIFACTS / "trade_offs.png"))
