"""Dashboard responsiveness: what a slider move costs on the server, and how long each page takes to render.

    .venv/bin/python bench/bench_ui.py [--calls 200] [--renders 10] [--blocks 2] [--store PATH]

A. Slider move → new plan + heatmap figure, on the embedded model's 210 layers: `allocate` + `summarize` +
   `plan_frame` + `charts.plan_heatmap` + the figure's JSON (what Streamlit sends), median of `--calls` budgets.
   Tables: the newest complete all-block analysis of the embedded model in the store if there is one, else synthetic
   errors with the real layer shapes (bench_allocate.synthetic_tables; the solver's cost does not depend on the values).
B. Full page runs in Streamlit's AppTest with warm caches (the model loaded, the analysis read once): the first render
   of every page, and a Bit budget rerun after a slider change, median of `--renders`. Needs a stored analysis of the
   embedded model: the first `--blocks` blocks with 4 × 64 calibration tokens are analysed into `--store` if absent
   (about a minute per block on a busy 2-core machine).
Target: < 100 ms server-side per slider move. Writes bench/results/ui.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aptq import analyses, charts  # noqa: E402
from aptq.allocate import AllocationRequest, allocate, plan_frame, summarize  # noqa: E402
from aptq.data import load_corpus  # noqa: E402
from aptq.models import EMBEDDED_MODEL, load_model, model_fingerprint  # noqa: E402
from aptq.sensitivity import analyze  # noqa: E402
from aptq.store import Store  # noqa: E402
from bench.bench_allocate import machine, shapes, synthetic_tables  # noqa: E402
from ui.session import AnalysisRequest  # noqa: E402

PAGES = ("app.py", "pages/1_Sensitivity.py", "pages/2_Bit_budget.py", "pages/3_Quantize.py", "pages/4_Trade_offs.py")
TARGET_MS = 100.0


def median_ms(action, calls: int) -> float:
    times = []
    for i in range(calls):
        start = time.perf_counter()
        action(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def embedded_tables(store: Store, model_fp: str):
    """(layers, errors, description): a complete all-block stored analysis of the embedded model, else synthetic."""
    keys = analyses.whole_model_keys(store, model_fp)
    if keys:
        layers, errors = analyses.load(store, keys[0])
        return layers, errors, f"stored analysis {keys[0]}"
    layers, errors = synthetic_tables(30, shapes(576, 192, 1536), (2, 3, 4, 8))
    return layers, errors, "synthetic errors with SmolLM2-135M's real layer shapes (no complete analysis stored)"


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


def page_runs(loaded, store_path: Path, blocks: int, renders: int) -> dict[str, float]:
    from streamlit.testing.v1 import AppTest

    os.environ["APTQ_STORE"] = str(store_path)
    request = AnalysisRequest(4, 64, 64, max_blocks=blocks)
    store = Store(store_path)
    analyze(loaded, load_corpus("brown"), request.sampling, request.settings, store=store)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.session_state["analysis_request"] = request
    for page in PAGES:  # warm every cache once
        at.switch_page(page).run()
        assert not at.exception and not at.error, (page, at.exception, at.error)
    empty = store_path.with_name("bench_ui_empty_app.py")
    empty.write_text("import streamlit as st\nst.write('empty')\n")
    timings = {"AppTest overhead: an empty one-line app": median_ms(lambda i: AppTest.from_file(str(empty)).run(),
                                                                    renders)}
    timings |= {f"first render: {page}": median_ms(lambda i, page=page: fresh_session(request, page), renders)
                for page in PAGES}
    at.switch_page("pages/2_Bit_budget.py").run()
    timings["Bit budget rerun after a slider change"] = median_ms(
        lambda i: at.slider(key="budget").set_value(2.5 + 0.05 * (i % 30)).run(), renders)
    return timings


def fresh_session(request: AnalysisRequest, page: str) -> None:
    """A new session (nothing in its session state) rendering `page` against the process's warm caches."""
    from streamlit.testing.v1 import AppTest

    session = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    session.session_state["analysis_request"] = request
    session.switch_page(page).run()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--renders", type=int, default=10)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--store", type=Path, default=ROOT / "data" / "cache" / "bench_ui.duckdb")
    args = parser.parse_args()
    loaded = load_model(EMBEDDED_MODEL)
    layers, errors, source = embedded_tables(Store(), model_fingerprint(loaded.path))
    steps = slider_move(layers, errors, args.calls)
    pages = page_runs(loaded, args.store.resolve(), args.blocks, args.renders)
    total = steps["total (one slider move)"]
    lines = ["# Dashboard responsiveness", "",
             f"- date: {datetime.date.today().isoformat()}; machine: {machine()} (shared with other engineers: "
             f"timings are indicative; 1-minute load average {os.getloadavg()[0]:.1f} at the end of the run)",
             f"- command: `.venv/bin/python bench/bench_ui.py --calls {args.calls} --renders {args.renders} "
             f"--blocks {args.blocks}`", "",
             f"## A. Slider move → plan + heatmap figure (SmolLM2-135M, {len(layers)} layers, knapsack, widths "
             f"2/3/4/8, group 64)", "", f"Tables: {source}. Median of {args.calls} budgets between 2.5 and 4.5.", "",
             "| step | median ms |", "|---|---|", *[f"| {k} | {v:.2f} |" for k, v in steps.items()], "",
             f"Target < {TARGET_MS:.0f} ms: **{'met' if total < TARGET_MS else 'NOT met'}** ({total:.1f} ms).", "",
             f"## B. Page runs in AppTest, warm caches (embedded model, stored analysis of its first {args.blocks} "
             f"blocks, 4 × 64 calibration tokens)", "",
             f"Median of {args.renders}; a first render is a new session (empty session state); the server-side "
             f"script run only, without the browser's drawing. AppTest adds its own cost to every run (a new "
             f"script runner, compiling the script: first row); a running server reuses those.", "",
             "| run | median ms |", "|---|---|", *[f"| {k} | {v:.1f} |" for k, v in pages.items()], ""]
    out = ROOT / "bench" / "results" / "ui.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
