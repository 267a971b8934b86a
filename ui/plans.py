"""Plans as the Quantize and Trade-offs pages offer them: the Bit budget page's current plan and the saved ones."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd
import streamlit as st

from aptq import coverage, history
from aptq.allocate import FULL_PRECISION, PREDICTED_ERRORS
from aptq.export import LayerGroups, group_sizes
from aptq.models import Architecture, LoadedModel
from aptq.pipeline import layer_table
from aptq.store import Store
from ui.session import cached_model, model_source, store_call


@dataclass(frozen=True)
class PlanChoice:
    label: str
    name: str
    bits: dict[str, int]
    allocation: str
    budget: float
    group_size: int  # the group size its summary (effective bits, predicted errors) was computed for
    summary: dict  # aptq.allocate.summarize, plus the analysis key; empty when there was no analysis
    layer_groups: LayerGroups = ()  # the layers on another group size (a plan of (bits, group size) pairs)

    def run_meta(self) -> dict:
        """The plan_meta of aptq.pipeline.run_plan."""
        return {"name": self.name, "allocation": self.allocation, "budget": self.budget,
                "analysis": self.summary.get("analysis"),
                **{name: self.summary.get(name) for name in (*PREDICTED_ERRORS, "error_source", "error_unit")}}


def current_plan() -> PlanChoice | None:
    plan = st.session_state.get("plan")
    if plan is None:
        return None
    return PlanChoice(f"current plan: {plan['method']} at {plan['budget']:.2f} bits",
                      f"{plan['method']}-{plan['budget']:.2f}", plan["bits"], plan["method"], plan["budget"],
                      plan["group_size"], plan["summary"] | {"analysis": plan["analysis"]},
                      tuple(plan.get("layer_groups", ())))


def plan_choices(model_fp: str) -> dict[str, PlanChoice]:
    """"current" (when the Bit budget page made one), then this model's saved plans by key, newest first."""
    current = current_plan()
    choices = {"current": current} if current else {}
    saved = store_call(lambda: history.stored_plans(Store(), model_fp))
    for row in saved.itertuples() if saved is not None else ():
        summary = json.loads(row.summary or "{}")
        layer_groups = tuple(sorted(json.loads(row.layer_groups).items())) if row.layer_groups else ()
        choices[row.key] = PlanChoice(f"saved {row.name!r} ({row.allocation}, "
                                      f"{summary.get('avg_bits', row.budget or 0):.2f} bits)", row.name,
                                      json.loads(row.plan), row.allocation, row.budget, int(row.group_size), summary,
                                      layer_groups)
    return choices


def plan_table(arch: Architecture, choice: PlanChoice) -> pd.DataFrame:
    """block, kind, layer, bits, group of every quantizable layer: the input of charts.plan_heatmap."""
    group_of = group_sizes(choice.group_size, choice.layer_groups)
    return pd.DataFrame([{"block": layer.block, "kind": layer.kind, "layer": layer.name,
                          "bits": choice.bits.get(layer.name, FULL_PRECISION), "group": group_of(layer.name)}
                         for layer in arch.layers])


@st.cache_data(show_spinner=False, max_entries=4)
def model_layer_table(source: str) -> pd.DataFrame:
    """Every quantizable layer of the model (name, kind, size): bits over the whole model, analysed or not."""
    return layer_table(cached_model(source))


def measured_runs(loaded: LoadedModel, model_fp: str) -> pd.DataFrame | None:
    """The model's stored runs with the layers each covers (aptq.coverage); None after st.error on a store failure."""
    runs = store_call(lambda: history.stored_runs(Store(), model_fp))
    return None if runs is None else coverage.fill_coverage(runs, loaded.arch, model_layer_table(model_source()))
