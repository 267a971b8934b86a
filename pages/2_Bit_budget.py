"""Bit budget: drag the average bits, pick widths and a solver, pin layers; the plan updates from the cache alone."""

from __future__ import annotations

from dataclasses import asdict

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from aptq import charts, coverage
from aptq.allocate import (
    ALLOCATORS,
    FULL_PRECISION,
    PREDICTED_ERROR_ATTENTION,
    PREDICTED_ERROR_LAYERWISE,
    AllocationError,
    AllocationRequest,
    Plan,
    allocate,
    available_error_sources,
    pair_candidates,
    plan_frame,
    summarize,
)
from aptq.calibrate import (
    NO_MULTIPLES,
    WIDTH_HOLDOUT,
    calibrate_widths,
    multiples_of,
    validation_count,
    widths_to_measure,
)
from aptq.choices import ERROR_SOLVERS, METHOD_LABELS
from aptq.data import digest
from aptq.errors import UserError
from aptq.pipeline import QuantizeSettings, has_output_norms
from aptq.progress import Progress
from aptq.share import pins_from_text, pins_to_text
from aptq.store import Store, default_path
from ui import jobs
from ui.experts import separate_experts
from ui.plans import model_layer_table
from ui.session import (
    Analysis,
    current_analysis,
    current_corpus,
    current_model,
    forget_stored_widths,
    model_source,
    page_header,
    save_current_plan,
)
from ui.shell import presenting

SOLVER_HELP = ("knapsack: least total predicted error (attention-aware Hessians, each layer's error taken to its "
               "module's output and made relative to the residual stream — our choice) within the budget; "
               "knapsack-layerwise: the same with layer-wise errors; aptq: the paper's rule (least sensitive layers "
               "take the low width); uniform; random (seeded, for comparison).")
GROUPS_HELP = ("the analysis predicted errors at these group sizes (Home's *extra group sizes*): with more than one, "
               "the knapsack gives each layer a width and a group size, charged by its effective bits (a coarser group "
               "spends fewer bits on scales and can buy a wider code)")
UNIT_HELP = ("how the errors of different layers are made comparable: heuristic — each moved to its module's output "
             "and divided by the residual stream's size (our choice); calibrated — the KL per unit of error measured "
             "by injecting noise into one layer at a time (needs an analysis with Home's *Calibrate the unit*)")

WIDTH_HELP = ("each width's measured KL over its predicted total (a uniform plan of that width quantized on most of "
              "the calibration segments, its KL on the rest: `aptq sweep --width-multiples`), charged to every "
              "layer at that width, so that the solver pays for what narrow widths cost once the quantizer runs "
              "block after block (our choice); the predicted error is then an estimate of the KL. With several group "
              "sizes, each grid measured (choose the group sizes, then Measure) is priced by its own multiples")


def budget_row(available: list[int]) -> float:
    """A full-width slider over the analysis's widths and a number box beside it, kept in step."""
    st.session_state.setdefault("budget", 3.0)
    st.session_state["budget"] = min(max(float(st.session_state["budget"]), available[0]), available[-1])
    st.session_state["budget_box"] = st.session_state["budget"]
    slider, box = st.columns([6, 1], vertical_alignment="bottom")
    # The range is fixed by the analysis (not by the candidates) so that the slider keeps its value.
    slider.slider("Average bits per weight over the analysed layers", float(available[0]), float(available[-1]),
                  step=0.05, key="budget", persist_state="session")
    box.number_input("Bits", float(available[0]), float(available[-1]), step=0.05, format="%.2f", key="budget_box",
                     on_change=lambda: st.session_state.update(budget=st.session_state["budget_box"]),
                     help="type an exact budget")
    return float(st.session_state["budget"])


def controls(analysis: Analysis, available: list[int], budget: float) -> AllocationRequest:
    """The control column. Widgets persist for the session, so a page switch keeps the choices; presentation mode
    keeps the solver only."""
    method = st.selectbox("Solver", ALLOCATORS, key="method", help=SOLVER_HELP, persist_state="session")
    candidates, low_high, seed, min_bits = available, (2, 4), 0, {}
    if not presenting():
        candidates = st.multiselect("Candidate widths", available, default=available, key="candidates",
                                    persist_state="session")
        seed = st.number_input("Seed", value=0, step=1, key="seed", persist_state="session") \
            if method == "random" else 0
        with st.expander("Per-type minimum widths"):
            kinds = [k for k in charts.KIND_ORDER if k in set(analysis.layers["kind"])]
            min_bits = {k: int(v) for k in kinds if (v := st.selectbox(f"min bits · {k}", [0] + available,
                                                                        key=f"min_{k}", persist_state="session"))}
    if method == "aptq":
        pair = [w for w in available if w in candidates] or available
        low = st.selectbox("Low width", pair, index=0, key="aptq_low")
        high = st.selectbox("High width", pair, index=pair.index(4) if 4 in pair else len(pair) - 1, key="aptq_high",
                            help="The paper mixes 2 and 4 bits.")
        low_high = (int(low), int(high))
    sources = available_error_sources(analysis.errors)
    quantizer = st.selectbox("Error source", sources, format_func=METHOD_LABELS.get, key="error_source",
                             persist_state="session", help="whose predicted errors the solver sums: pick the "
                             "quantizer you will run (GPTQ and attention-aware errors need an analysis with "
                             "quantizer errors: Home's *Quantizer errors*)")
    unit = st.selectbox("Unit", analysis.units_offered, key="error_unit", persist_state="session", help=UNIT_HELP)
    groups = [analysis.group_size]
    grids = sorted({int(g) for g in analysis.errors.get("group_size", pd.Series([analysis.group_size]))})
    if len(grids) > 1 and method in ERROR_SOLVERS and not presenting():
        groups = st.multiselect("Group sizes", grids, default=[analysis.group_size], key="group_sizes",
                                persist_state="session", format_func=lambda g: f"{g} columns" if g else "per channel",
                                help=GROUPS_HELP) or [analysis.group_size]
    multiples = NO_MULTIPLES
    if offered := analysis.width_multiples_offered(unit, quantizer):
        choice = st.selectbox("Width multiples", ["none", *offered], key="width_multiples", persist_state="session",
                              help=WIDTH_HELP)
        multiples = offered.get(choice, multiples)
    if not presenting():
        with st.expander("Measure width multiples"):
            measure_widths(analysis, quantizer, unit, [int(c) for c in candidates],
                           [g for g in groups if g != analysis.group_size])
    if len(groups) > 1:
        st.caption("Each layer takes a (bits, group size) pair: the budget counts effective bits, scales and zero "
                   "points included.")
        widths: tuple = pair_candidates(candidates, groups)
    else:
        st.caption(f"Group size {analysis.group_size or 'per-channel'} (set by the analysis).")
        widths = tuple(int(c) for c in candidates)
    return AllocationRequest(budget=budget, method=method, candidates=widths,
                             pins=dict(st.session_state["pins"]), min_bits=min_bits, low_high=low_high,
                             seed=int(seed), group_size=analysis.group_size, quantizer=quantizer, unit=unit,
                             width_multiples=multiples.widths,
                             grid_multiples=multiples.grids if len(groups) > 1 else {})


def measure_widths(analysis: Analysis, quantizer: str, unit: str, candidates: list[int], grids: list[int]) -> None:
    """A background job measuring the width multiples of the error source's quantizer (what `aptq sweep
    --width-multiples` does), on the analysis's group size and the other chosen `grids`, its progress and Cancel;
    the choice above offers them once stored."""
    if not candidates:
        st.caption("Choose candidate widths first.")
        return
    loaded, corpus = current_model(), current_corpus()
    try:
        widths = widths_to_measure(tuple(candidates), analysis.request.samples)
    except UserError as exc:  # said before anything can start; not an error of the plan above
        st.info(str(exc))
        return
    held = validation_count(analysis.request.samples, WIDTH_HOLDOUT)
    on_grids = f", on {len(grids) + 1} grids (the chosen group sizes)" if grids else ""
    st.caption(f"Quantizes a uniform plan of the analysed layers at {', '.join(map(str, widths))} bits{on_grids} "
               f"with {METHOD_LABELS[quantizer]} on the first {analysis.request.samples - held} calibration segments "
               f"and measures its KL on the other {held} (never the evaluation split): one quantization per width "
               f"and grid.")
    settings = QuantizeSettings(method=quantizer, group_size=analysis.group_size, output_norms=has_output_norms(loaded))
    key = "widths:" + digest(analysis.key, unit, repr(settings), repr(widths), repr(grids))

    def work(progress: Progress) -> pd.DataFrame:
        return calibrate_widths(loaded, corpus, analysis.request.sampling, analysis.layers_in(unit), analysis.errors,
                                settings, widths, Store(default_path()), progress, grids=tuple(grids))

    st.button("Measure", key="measure_widths", on_click=lambda: jobs.start(
        key, f"width multiples · {quantizer}", model_source(), work))
    job = jobs.find(key)
    if job is not None and job.state == "finished":
        if st.session_state.get("widths_read") != key:  # once: the stored multiples join the choice above
            st.session_state["widths_read"] = key
            forget_stored_widths()
            st.rerun()
        st.success(f"Measured: {multiples_of(job.result, analysis.group_size).describe()}")
    else:
        jobs.show(job)


@st.cache_resource(max_entries=4)
def sensitivity_figure(analysis_key: str, _layers: pd.DataFrame, separate: bool) -> go.Figure:
    """Built once per analysis, not on every slider move: it does not depend on the plan."""
    return charts.sensitivity_heatmap(_layers, "score_attention",
                                      "sensitivity (attention-aware trace per parameter), same layout", separate)


def set_pins(pins: dict[str, int]) -> None:
    """Replace the pins; a new editor key makes the pin table start from them (its own edits are then applied)."""
    st.session_state["pins"] = pins
    st.session_state["pin_version"] = st.session_state.get("pin_version", 0) + 1
    st.rerun()


def headline(summary: dict, whole: dict[str, float], analysis: Analysis) -> None:
    partial = analysis.request.max_blocks is not None
    scope = "analysed layers" if partial else "whole model"
    # Four columns, the compression and the standard error under their numbers (deltas without arrow or colour):
    # in five, or on one line, the numbers ended in "…".
    cols = st.columns(4)
    cols[0].metric(f"Average bits ({scope})", f"{summary['avg_bits']:.3f}",
                   help="parameter-weighted mean width of the layers the plan decides")
    cols[1].metric(f"Effective bits ({scope})", f"{summary['effective_bits']:.3f}",
                   help="with an fp16 scale and zero per group")
    cols[2].metric("Size (whole model)", f"{whole['size_mb']:.1f} MB",
                   f"{16 / whole['effective_bits']:.2f}× smaller than FP16", delta_color="off", delta_arrow="off",
                   help="every quantizable linear weight with scales; layers outside the analysis in FP16")
    cols[3].metric("Predicted error", f"{summary[PREDICTED_ERROR_ATTENTION]:.4g}",
                   f"± {summary[PREDICTED_ERROR_ATTENTION + '_se']:.2g}", delta_color="off", delta_arrow="off",
                   help=f"errors of {METHOD_LABELS[summary['error_source']]} in the {summary['error_unit']} "
                        "unit; ± one standard error from the Hutchinson traces (heuristic) or the KL measurements "
                        "(calibrated). Σ e(layer, b) with the attention-aware Hessians, each moved to its "
                        "module's output "
                        "(× APTQ trace / trace of its Hessian) and divided by the median ‖h‖² of the residual stream "
                        "it is added to (heuristic; our choice: the papers sum raw errors, which are not in one unit) "
                        "or × its measured KL per unit of error (calibrated) — what the knapsack minimizes")
    if partial:
        st.warning(f"The analysis covers {coverage_label(analysis)} only: the plan decides those layers, and a run "
                   f"keeps the others in FP16 — **{whole['avg_bits']:.3f} average bits over the whole model**. "
                   f"Runs of this plan are compared only with runs of the same coverage.")
    st.caption(f"FP16: {summary['fp16_size_mb']:.1f} MB over the {scope}. Predicted error with the layer-wise "
               f"Hessians: {summary[PREDICTED_ERROR_LAYERWISE]:.4g}. Layers per width: "
               + ", ".join(f"{count} × {bits} bits" for bits, count in summary["layers_by_bits"].items()) + ".")


def coverage_label(analysis: Analysis) -> str:
    blocks = sorted(analysis.layers["block"].unique())
    return f"blocks {blocks[0]}–{blocks[-1]}" if len(blocks) > 1 else f"block {blocks[0]}"


def uniform_note(plan: Plan, summary: dict, available: list[int]) -> None:
    """A uniform plan has whole widths: say so when the budget lies between them, never round silently."""
    if plan.request.method != "uniform" or abs(summary["avg_bits"] - plan.request.budget) < 1e-9:
        return
    below = max((w for w in available if w <= plan.request.budget), default=available[0])
    above = min((w for w in available if w > plan.request.budget), default=None)
    st.info(f"Uniform plans come in whole widths: {plan.request.budget:.2f} bits gives every free layer "
            f"{below} bits (the widest width within the budget; average {summary['avg_bits']:.3f})."
            + (f" The next width is {above} bits." if above else "")
            + " Other solvers mix widths to use the whole budget.")


def pin_from_heatmap(plan: Plan, summary: dict, analysis: Analysis, available: list[int], separate: bool) -> None:
    frame = plan_frame(plan, analysis.layers)
    title = f"plan: {plan.request.method} at {plan.request.budget:.2f} bits"
    event = st.plotly_chart(charts.plan_heatmap(frame, title, selectable=True,
                                                pinned=frozenset(st.session_state["pins"]), separate_experts=separate),
                            width="stretch", on_select="rerun", selection_mode=("points", "box"), key="plan_map")
    cells = {(int(p["x"]), str(p["y"])) for p in event.selection.points}
    rows = charts.heatmap_rows(frame, separate)  # a cell of aggregated experts selects all of them
    chosen = [layer for layer, block, row in zip(frame["layer"], frame["block"], rows) if (block, row) in cells]
    left, mid, right = st.columns([2, 1, 1], vertical_alignment="bottom")
    left.write(f"**{len(chosen)} cell(s) selected.**" if chosen else "Click heatmap cells (shift-click adds) or use "
               "the box-select tool to pin them, or edit the table below. Pinned cells carry a black ring.")
    width = mid.selectbox("Pin to", available + [FULL_PRECISION], key="pin_width",
                          format_func=lambda b: "keep FP16" if b == FULL_PRECISION else f"{b} bits")
    if right.button("Pin selected", disabled=not chosen):
        set_pins(st.session_state["pins"] | {name: int(width) for name in chosen})
    st.caption("Per type: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["bits_by_kind"].items())
               + " bits · " + "; ".join(plan.notes))


def pin_table(plan: Plan | None, analysis: Analysis, available: list[int]) -> None:
    pins: dict[str, int] = st.session_state["pins"]
    base = analysis.layers[["layer", "block", "kind"]]
    table = pd.DataFrame({"pin": base["layer"].map(pins).astype("Int64"),
                          "bits": base["layer"].map(plan.bits) if plan else pd.NA,
                          "block": base["block"], "kind": base["kind"], "layer": base["layer"]})
    edited = st.data_editor(table, hide_index=True, key=f"pin_table_{st.session_state.get('pin_version', 0)}",
                            disabled=["layer", "block", "kind", "bits"], height=280, width="stretch",
                            column_config={"pin": st.column_config.SelectboxColumn(
                                "pin (bits)", options=available + [FULL_PRECISION], width="small",
                                help="fix this layer's width (16 = keep in FP16); the budget is charged for it"),
                                "bits": st.column_config.NumberColumn("plan bits", width="small"),
                                "block": st.column_config.NumberColumn(width="small"),
                                "kind": st.column_config.TextColumn("projection", width="small")})
    edited_pins = {row.layer: int(row.pin) for row in edited.itertuples() if pd.notna(row.pin)}
    if edited_pins != pins:
        set_pins(edited_pins)
    if pins and st.button("Clear all pins"):
        set_pins({})


page_header("Bit budget")
analysis = current_analysis()
if analysis is None:
    st.stop()
available = sorted(int(b) for b in analysis.errors["bits"].unique())
st.session_state.setdefault("pins", {})
if "url_pins" in st.session_state:  # pins named by a shared link (ui.shell), resolved against this analysis
    st.session_state["pins"] = pins_from_text(st.session_state.pop("url_pins"), analysis.layers)

budget = budget_row(available)
left, view = st.columns([1, 3])
with left:
    request = controls(analysis, available, budget)
layers = analysis.layers_in(request.unit)
try:
    plan = allocate(layers, analysis.errors, request)
except AllocationError as exc:
    plan = None
    view.error(str(exc))
st.session_state["pins_text"] = pins_to_text(st.session_state["pins"], analysis.layers)

if plan is not None:
    summary = summarize(plan, layers, analysis.errors)
    table = model_layer_table(model_source())
    whole = coverage.whole_model_size(table, plan.bits, plan.group_size_of(table))
    st.session_state["plan"] = {"bits": dict(plan.bits), "method": request.method, "budget": request.budget,
                                "group_size": analysis.group_size, "summary": summary,
                                "request": asdict(request), "analysis": analysis.key,
                                "layer_groups": plan.layer_groups()}
    with view:
        headline(summary, whole, analysis)
        uniform_note(plan, summary, available)
        separate = separate_experts(analysis.layers)
        pin_from_heatmap(plan, summary, analysis, available, separate)
        if not presenting():
            st.plotly_chart(sensitivity_figure(analysis.key, analysis.layers, separate), width="stretch")

st.subheader(f"Pins ({len(st.session_state['pins'])})")
st.caption("Pins stay when the budget, the widths or the solver change, and when you visit other pages.")
pin_table(plan, analysis, available)

if plan is not None:
    st.subheader("Save this plan")
    name_col, button_col = st.columns([3, 1], vertical_alignment="bottom")
    name = name_col.text_input("Plan name", value=f"{request.method}-{request.budget:.2f}")
    if button_col.button("Save plan", type="primary") and save_current_plan(name, st.session_state["plan"], analysis):
        st.success(f"Saved plan {name!r}; the Quantize page runs the current plan, Trade-offs compares saved ones.")
