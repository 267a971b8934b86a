"""Dashboard responsiveness on the full analysis of the embedded model: what a slider move costs on the server, how
long each page's script runs, and what a person waits for in a real browser.

    flock /tmp/heavy.lock env OMP_NUM_THREADS=1 .venv/bin/python bench/bench_ui.py [--calls 200] [--renders 10]
        [--repeats 5] [--screenshots docs/screenshots] [--pins 0.v=8]

Needs a complete all-block analysis of the embedded model in the store (`python -m aptq analyze`; `$APTQ_STORE` or
data/aptq.duckdb); the newest one is used, as the dashboard opens on it.
A. Slider move → new plan + heatmap figure, server side: `allocate` + `summarize` + `plan_frame` +
   `charts.plan_heatmap` + the figure's JSON (what Streamlit sends), median of `--calls` budgets. Target < 100 ms.
B. Page scripts in Streamlit's AppTest with warm caches: the first render of every page in a new session, and a Bit
   budget rerun after a slider change, median of `--renders`.
C. A real headless Chromium against `streamlit run app.py` (tests/browser.py): the time from the click on a page's
   sidebar link until its content is on screen (its text, its charts drawn, the script finished), for the first visit
   after the server started and as the median of `--repeats` later visits; and from one arrow-key step of the budget
   slider until the new plan's heatmap is drawn.
With `--screenshots DIR`, the README's walkthrough is then captured into DIR (full pages): Home, Sensitivity, Bit
budget (knapsack at 3 bits with `--pins`), Quantize (that plan quantized with RTN on the page, which is real model work
unless stored), Trade-offs.
Writes bench/results/ui.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aptq import analyses, charts  # noqa: E402
from aptq.allocate import AllocationRequest, allocate, plan_frame, summarize  # noqa: E402
from aptq.models import EMBEDDED_MODEL, load_model, model_fingerprint  # noqa: E402
from aptq.store import Store  # noqa: E402
from bench.bench_allocate import machine  # noqa: E402
from tests.browser import (  # noqa: E402
    chromium,
    dashboard,
    full_page_screenshot,
    open_page,
    wait_for,
    wait_for_text,
)

PAGES = ("app.py", "pages/1_Sensitivity.py", "pages/2_Bit_budget.py", "pages/3_Quantize.py", "pages/4_Trade_offs.py")
TARGET_MS = 100.0
POLL = 0.05  # seconds between looks at the browser's page while timing


@dataclass(frozen=True)
class BrowserPage:
    label: str  # its sidebar entry
    marker: str  # text only this page shows once it has run
    charts: int  # plotly charts it draws
    screenshot: str


BROWSER_PAGES = (BrowserPage("Home", "Analysis stored", 1, "home.png"),
                 BrowserPage("Sensitivity", "Layer-wise versus attention-aware ranking", 3, "sensitivity.png"),
                 BrowserPage("Bit budget", "Save this plan", 2, "bit_budget.png"),
                 BrowserPage("Quantize", "Runs of this model", 0, "quantize.png"),
                 BrowserPage("Trade-offs", "Two plans side by side", 2, "trade_offs.png"))


def median_ms(action, calls: int) -> float:
    times = []
    for i in range(calls):
        start = time.perf_counter()
        action(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def load() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def slider_move(layers, errors, calls: int) -> dict[str, float]:
    budgets = [2.5 + 0.05 * (i % 40) for i in range(calls)]
    steps = {}

    def request(i: int) -> AllocationRequest:
        return AllocationRequest(budgets[i], "knapsack", (2, 3, 4, 8), group_size=64)

    plan = allocate(layers, errors, request(0))
    frame = plan_frame(plan, layers)
    figure = charts.plan_heatmap(frame, "plan", selectable=True)
    steps["allocate"] = median_ms(lambda i: allocate(layers, errors, request(i)), calls)
    steps["summarize"] = median_ms(lambda i: summarize(plan, layers, errors), calls)
    steps["plan_frame"] = median_ms(lambda i: plan_frame(plan, layers), calls)
    steps["plan_heatmap"] = median_ms(lambda i: charts.plan_heatmap(frame, "plan", selectable=True), calls)
    steps["figure JSON"] = median_ms(lambda i: figure.to_json(), calls)

    def everything(i: int) -> None:
        new = allocate(layers, errors, request(i))
        summarize(new, layers, errors)
        charts.plan_heatmap(plan_frame(new, layers), "plan", selectable=True).to_json()

    steps["total (one slider move)"] = median_ms(everything, calls)
    return steps


def page_runs(renders: int) -> dict[str, float]:
    """AppTest sessions on the store of $APTQ_STORE: a new session opens on its newest analysis."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    for page in PAGES:  # warm every cache once
        at.switch_page(page).run()
        assert not at.exception and not at.error, (page, at.exception, at.error)
    empty = ROOT / "data" / "bench_ui_empty_app.py"
    empty.write_text("import streamlit as st\nst.write('empty')\n")
    timings = {"AppTest overhead: an empty one-line app": median_ms(lambda i: AppTest.from_file(str(empty)).run(),
                                                                    renders)}
    empty.unlink()
    timings |= {f"first render: {page}": median_ms(lambda i, page=page: fresh_session(page), renders)
                for page in PAGES}
    at.switch_page("pages/2_Bit_budget.py").run()
    timings["Bit budget rerun after a slider change"] = median_ms(
        lambda i: at.slider(key="budget").set_value(2.5 + 0.05 * (i % 30)).run(), renders)
    return timings


def fresh_session(page: str) -> None:
    """A new session (nothing in its session state) rendering `page` against the process's warm caches."""
    from streamlit.testing.v1 import AppTest

    AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).switch_page(page).run()


def drawn_charts(driver) -> int:
    return driver.execute_script("return Array.from(document.querySelectorAll('.js-plotly-plot'))"
                                 ".filter(g => g.querySelector('.main-svg')).length")


def chart_titles(driver) -> list[str]:
    return driver.execute_script("return Array.from(document.querySelectorAll('.js-plotly-plot .gtitle'))"
                                 ".map(t => t.textContent)")


def visit_seconds(driver, page: BrowserPage) -> float:
    """Click the page's sidebar link; seconds until its text and charts are on screen and its script has finished."""
    start = time.perf_counter()
    open_page(driver, page.label, page.marker, poll=POLL)
    wait_for(driver, lambda _: drawn_charts(driver) >= page.charts, f"{page.charts} charts on {page.label}",
             timeout=60, poll=POLL)
    seconds = time.perf_counter() - start
    print(f"{page.label}: {seconds:.2f} s", flush=True)  # a long run shows where it is
    return seconds


def slider_step_seconds(driver, key: str) -> float:
    """One arrow-key step of the focused budget slider; seconds until the new plan's heatmap title is drawn."""
    from selenium.webdriver.common.action_chains import ActionChains

    before = next(t for t in chart_titles(driver) if t.startswith("plan:"))
    start = time.perf_counter()
    ActionChains(driver).send_keys(key).perform()
    wait_for(driver, lambda _: any(t.startswith("plan:") and t != before for t in chart_titles(driver)),
             "the new plan's heatmap", timeout=60, poll=POLL)
    return time.perf_counter() - start


def browser_timings(link: str, repeats: int) -> dict[str, float]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    timings = {}
    with chromium() as driver:
        start = time.perf_counter()
        driver.get(link)
        wait_for_text(driver, "Analysis stored", timeout=300, poll=POLL)
        wait_for(driver, lambda _: drawn_charts(driver) >= 1, "the Home heatmap", timeout=60, poll=POLL)
        timings["open the dashboard (new server: model load, analysis read)"] = time.perf_counter() - start
        first = {page.label: visit_seconds(driver, page) for page in BROWSER_PAGES[1:] + BROWSER_PAGES[:1]}
        timings |= {f"first visit: {label}": seconds for label, seconds in first.items()}
        later = {page.label: [visit_seconds(driver, page) for _ in range(repeats)] for page in BROWSER_PAGES}
        timings |= {f"later visit: {label} (median of {repeats})": statistics.median(seconds)
                    for label, seconds in later.items()}
        open_page(driver, "Bit budget", "Save this plan", poll=POLL)
        thumb = driver.find_element(By.CSS_SELECTOR, "[data-testid=stSlider] input[type=range]")
        driver.execute_script("arguments[0].focus()", thumb)  # the range input is visually hidden behind the thumb
        steps = [slider_step_seconds(driver, Keys.ARROW_RIGHT if i % 2 == 0 else Keys.ARROW_LEFT)
                 for i in range(2 * repeats)]
        timings[f"budget slider: one step to the new plan heatmap (median of {len(steps)})"] = statistics.median(steps)
    return timings


def screenshots(link: str, folder: Path, tokens: int | None, quantize: bool = True) -> None:
    """The README walkthrough from a shared `link` (solver, budget, pins): every page, with `quantize` that plan
    quantized with RTN and evaluated on `tokens` (None: the page's default)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    folder.mkdir(parents=True, exist_ok=True)
    with chromium() as driver:
        driver.get(link)
        wait_for_text(driver, "Analysis stored", timeout=300)
        for page in BROWSER_PAGES[:3]:
            if page.label != "Home":
                open_page(driver, page.label, page.marker)
            wait_for(driver, lambda _, page=page: drawn_charts(driver) >= page.charts, page.label, timeout=60)
            full_page_screenshot(driver, folder / page.screenshot)
        body = open_page(driver, "Quantize", "Runs of this model")
        assert "No current plan" not in body, body[:2000]
        if quantize and tokens is not None:  # the sweep's protocol, so that this run joins its curves
            field = driver.find_element(By.CSS_SELECTOR, "input[aria-label='Evaluation tokens']")
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(str(tokens), Keys.ENTER)
            wait_for(driver, lambda _: field.get_attribute("value") == str(tokens), "the token count")
            time.sleep(2)  # the rerun with the new count has drawn the button whose action runs
        if quantize:
            next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text == "Quantize and evaluate").click()
            wait_for_text(driver, "The same prompts, continued greedily", timeout=1800)
        full_page_screenshot(driver, folder / "quantize.png")
        open_page(driver, "Trade-offs", "Two plans side by side")
        wait_for(driver, lambda _: drawn_charts(driver) >= 2, "Trade-offs charts", timeout=120)
        full_page_screenshot(driver, folder / "trade_offs.png")


def table(title: str, rows: dict[str, float], unit: str, digits: int) -> list[str]:
    return [title, "", f"| what | {unit} |", "|---|---|",
            *[f"| {k} | {v:.{digits}f} |" for k, v in rows.items()], ""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--renders", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--screenshots", type=Path, help="capture the README walkthrough into this folder")
    parser.add_argument("--pins", default="0.v=8", help="pins of the Bit budget screenshot (block.kind=bits,…)")
    parser.add_argument("--tokens", type=int, help="evaluation tokens of the screenshot's run (default: the page's)")
    parser.add_argument("--no-quantize", action="store_true", help="screenshots without the Quantize page's run")
    parser.add_argument("--screenshots-only", action="store_true", help="no timings (bench/results/ui.md unchanged)")
    args = parser.parse_args()
    store = Store()
    os.environ["APTQ_STORE"] = str(store.path)  # the AppTest sessions and the dashboard server read the same file
    keys = analyses.whole_model_keys(store, model_fingerprint(load_model(EMBEDDED_MODEL).path))
    if not keys:
        sys.exit(f"No complete analysis of every block of the embedded model in {store.path}: run "
                 f"`python -m aptq analyze` first.")
    layers, errors = analyses.load(store, keys[0])
    link_view = f"/?solver=knapsack&budget=3.0&pins={args.pins}"
    if args.screenshots_only:
        with dashboard({"APTQ_STORE": str(store.path)}, timeout=300) as url:
            screenshots(url + link_view, args.screenshots, args.tokens, not args.no_quantize)
        return
    loads = {"start": load()}
    steps = slider_move(layers, errors, args.calls)
    pages = page_runs(args.renders)
    loads["after AppTest"] = load()
    with dashboard({"APTQ_STORE": str(store.path)}, timeout=300) as url:
        browser = browser_timings(url, args.repeats)
        loads["after the browser"] = load()
        if args.screenshots:
            screenshots(url + link_view, args.screenshots, args.tokens, not args.no_quantize)
    total = steps["total (one slider move)"]
    lines = ["# Dashboard responsiveness", "",
             f"- date: {datetime.date.today().isoformat()}; machine: {machine()}, shared with other engineers' jobs "
             f"(1/5/15-minute load averages: " + "; ".join(f"{k} {v}" for k, v in loads.items())
             + "; absolute times are inflated by that load)",
             f"- command: `flock /tmp/heavy.lock env OMP_NUM_THREADS=1 .venv/bin/python bench/bench_ui.py --calls "
             f"{args.calls} --renders {args.renders} --repeats {args.repeats}"
             + (f" --screenshots {args.screenshots} --pins {args.pins}" if args.screenshots else "")
             + (f" --tokens {args.tokens}" if args.tokens else "") + "`",
             f"- analysis {keys[0]}: all {layers['block'].nunique()} blocks of SmolLM2-135M, {len(layers)} layers, "
             f"widths {sorted(int(b) for b in errors['bits'].unique())}", "",
             *table(f"## A. Slider move → plan + heatmap figure, server side (knapsack, median of {args.calls} budgets "
                    f"between 2.5 and 4.5)", steps, "median ms", 2),
             f"Target < {TARGET_MS:.0f} ms: **{'met' if total < TARGET_MS else 'NOT met'}** ({total:.1f} ms).", "",
             *table(f"## B. Page scripts in AppTest, warm caches (median of {args.renders}; a first render is a new "
                    f"session; the server-side script only, no drawing; AppTest adds its own cost, first row)",
                    pages, "median ms", 1),
             *table("## C. In a real browser (headless Chromium 1400 × 1000, `streamlit run app.py` on this machine): "
                    "click → the page's text and charts on screen, script finished", browser, "seconds", 2)]
    out = ROOT / "bench" / "results" / "ui.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
