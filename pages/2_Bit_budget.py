"""Bit budget: drag the average bits, pick widths and a solver, pin layers; the plan updates from the cache alone."""

from __future__ import annotations

from dataclasses import asdict

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from aptq import charts
from aptq.allocate import (ALLOCATORS, FULL_PRECISION, AllocationError, AllocationRequest, Plan, allocate, plan_frame,
                           summarize)
from ui.session import Analysis, current_analysis, page_header, save_current_plan

SOLVER_HELP = ("knapsack: least total predicted error (attention-aware Hessians, each layer's error taken to its "
               "module's output and made relative to the residual stream — our choice) within the budget; "
               "knapsack-layerwise: the same with layer-wise errors; aptq: the paper's rule (least sensitive layers "
               "take the low width); uniform; random (seeded, for comparison).")


def controls(analysis: Analysis, available: list[int]) -> AllocationRequest:
    """The sidebar-like control column. Widgets persist for the session, so a page switch keeps the choices."""
    st.session_state.setdefault("budget", 3.0)
    st.session_state["budget"] = min(max(st.session_state["budget"], available[0]), available[-1])
    method = st.selectbox("Solver", ALLOCATORS, key="method", help=SOLVER_HELP, persist_state="session")
    candidates = st.multiselect("Candidate widths", available, default=available, key="candidates",
                                persist_state="session")
    low_high = (2, 4)
    if method == "aptq":
        pair = [w for w in available if w in candidates] or available
        low = st.selectbox("Low width", pair, index=0, key="aptq_low")
        high = st.selectbox("High width", pair, index=pair.index(4) if 4 in pair else len(pair) - 1, key="aptq_high",
                            help="The paper mixes 2 and 4 bits.")
        low_high = (int(low), int(high))
    # The range is fixed by the analysis (not by the candidates) so that the slider keeps its value.
    budget = st.slider("Average bits per weight", float(available[0]), float(available[-1]), step=0.05,
                       key="budget", persist_state="session")
    seed = st.number_input("Seed", value=0, step=1, key="seed", persist_state="session") if method == "random" else 0
    with st.expander("Per-type minimum widths"):
        kinds = [k for k in charts.KIND_ORDER if k in set(analysis.layers["kind"])]
        min_bits = {k: int(v) for k in kinds if (v := st.selectbox(f"min bits · {k}", [0] + available, key=f"min_{k}",
                                                                    persist_state="session"))}
    st.caption(f"Group size {analysis.group_size or 'per-channel'} (set by the analysis).")
    if analysis.request.max_blocks is not None:
        st.caption(f"The analysis covers the first {analysis.layers['block'].nunique()} blocks only: the plan and its "
                   f"numbers are for their layers, and quantizing keeps the other blocks in FP16.")
    return AllocationRequest(budget=float(budget), method=method, candidates=tuple(int(c) for c in candidates),
                             pins=dict(st.session_state["pins"]), min_bits=min_bits, low_high=low_high,
                             seed=int(seed), group_size=analysis.group_size)


@st.cache_resource(max_entries=4)
def sensitivity_figure(analysis_key: str, _layers: pd.DataFrame) -> go.Figure:
    """Built once per analysis, not on every slider move: it does not depend on the plan."""
    return charts.sensitivity_heatmap(_layers, "score_attention",
                                      "sensitivity (attention-aware trace per parameter), same layout")


def set_pins(pins: dict[str, int]) -> None:
    """Replace the pins; a new editor key makes the pin table start from them (its own edits are then applied)."""
    st.session_state["pins"] = pins
    st.session_state["pin_version"] = st.session_state.get("pin_version", 0) + 1
    st.rerun()


def headline(summary: dict) -> None:
    cols = st.columns(5)
    cols[0].metric("Average bits", f"{summary['avg_bits']:.3f}")
    cols[1].metric("Effective bits", f"{summary['effective_bits']:.3f}", help="with an fp16 scale and zero per group")
    cols[2].metric("Size", f"{summary['size_mb']:.1f} MB", help="quantizable linear weights only, with scales")
    cols[3].metric("Compression", f"{summary['compression']:.2f}×", help="FP16 size / plan size")
    cols[4].metric("Predicted error", f"{summary['predicted_error_attention']:.4g}",
                   help="Σ e(layer, b) with the attention-aware Hessians, each moved to its module's output "
                        "(× APTQ trace / trace of its Hessian) and divided by the median ‖h‖² of the residual stream "
                        "it is added to (our choice: the papers sum raw errors, which are not in one unit) — what the "
                        "knapsack minimizes")
    st.caption(f"FP16: {summary['fp16_size_mb']:.1f} MB. Predicted error with the layer-wise Hessians: "
               f"{summary['predicted_error_layerwise']:.4g}. Layers per width: "
               + ", ".join(f"{count} × {bits} bits" for bits, count in summary["layers_by_bits"].items()) + ".")


def pin_from_heatmap(plan: Plan, summary: dict, analysis: Analysis, available: list[int]) -> None:
    frame = plan_frame(plan, analysis.layers)
    event = st.plotly_chart(charts.plan_heatmap(frame, f"plan: {plan.request.method} at {plan.request.budget:.2f} bits",
                                                selectable=True),
                            width="stretch", on_select="rerun", selection_mode=("points", "box"), key="plan_map")
    cells = {(int(p["x"]), str(p["y"])) for p in event.selection.points}
    chosen = [row.layer for row in frame.itertuples() if (row.block, row.kind) in cells]
    left, mid, right = st.columns([2, 1, 1], vertical_alignment="bottom")
    left.write(f"**{len(chosen)} cell(s) selected.**" if chosen else "Click heatmap cells (shift-click adds) or use "
               "the box-select tool to pin them, or edit the table below.")
    width = mid.selectbox("Pin to", available + [FULL_PRECISION], key="pin_width",
                          format_func=lambda b: "keep FP16" if b == FULL_PRECISION else f"{b} bits")
    if right.button("Pin selected", disabled=not chosen):
        set_pins(st.session_state["pins"] | {name: int(width) for name in chosen})
    st.caption("Per type: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["bits_by_kind"].items())
               + " bits · " + "; ".join(plan.notes))


def pin_table(plan: Plan | None, analysis: Analysis, available: list[int]) -> None:
    pins: dict[str, int] = st.session_state["pins"]
    base = analysis.layers[["layer", "block", "kind"]]
    table = base.assign(bits=base["layer"].map(plan.bits) if plan else pd.NA,
                        pin=base["layer"].map(pins).astype("Int64"))
    edited = st.data_editor(table, hide_index=True, key=f"pin_table_{st.session_state.get('pin_version', 0)}",
                            disabled=["layer", "block", "kind", "bits"], height=280,
                            column_config={"pin": st.column_config.SelectboxColumn(
                                "pin (bits)", options=available + [FULL_PRECISION],
                                help="fix this layer's width (16 = keep in FP16); the budget is charged for it")})
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

left, view = st.columns([1, 3])
with left:
    request = controls(analysis, available)
try:
    plan = allocate(analysis.layers, analysis.errors, request)
except AllocationError as exc:
    plan = None
    view.error(str(exc))

if plan is not None:
    summary = summarize(plan, analysis.layers, analysis.errors)
    st.session_state["plan"] = {"bits": dict(plan.bits), "method": request.method, "budget": request.budget,
                                "group_size": analysis.group_size, "summary": summary,
                                "request": asdict(request), "analysis": analysis.key}
    with view:
        headline(summary)
        pin_from_heatmap(plan, summary, analysis, available)
        st.plotly_chart(sensitivity_figure(analysis.key, analysis.layers), width="stretch")

st.subheader(f"Pins ({len(st.session_state['pins'])})")
st.caption("Pins stay when the budget, the widths or the solver change, and when you visit other pages.")
pin_table(plan, analysis, available)

if plan is not None:
    st.subheader("Save this plan")
    name_col, button_col = st.columns([3, 1], vertical_alignment="bottom")
    name = name_col.text_input("Plan name", value=f"{request.method}-{request.budget:.2f}")
    if button_col.button("Save plan", type="primary") and save_current_plan(name, st.session_state["plan"], analysis):
        st.success(f"Saved plan {name!r}; the Quantize page runs the current plan, Trade-offs compares saved ones.")
