"""Trade-offs: quality against bits for every allocation and quantization method, how far the predictions can be
trusted, two plans side by side, and the plan files that production tools read."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import streamlit as st

from aptq import charts, coverage, history, tradeoffs
from aptq.allocate import PREDICTED_ERROR_ATTENTION, PREDICTED_ERROR_LAYERWISE
from aptq.choices import ALLOCATORS as SOLVERS
from aptq.choices import PAIRS_SOLVER
from aptq.export import plan_files
from aptq.models import Architecture, LoadedModel
from ui.experts import separate_experts
from ui.plans import PlanChoice, measured_runs, model_layer_table, plan_choices, plan_table
from ui.session import (
    current_corpus,
    model_and_corpus_or_stop,
    model_source,
    page_header,
    requested_analysis,
)
from ui.shell import presenting
from ui.sweep import sweep_section

MEASURES = {"perplexity": "perplexity", "kl": "KL divergence", "top1": "top-1 agreement"}
# The plans' summaries side by side, in words (aptq.allocate.summarize over the layers each plan decides).
SUMMARY_COLUMNS = {"avg_bits": "average bits", "effective_bits": "effective bits", "size_mb": "size (MB)",
                   PREDICTED_ERROR_ATTENTION: "predicted error (attention-aware)",
                   PREDICTED_ERROR_LAYERWISE: "predicted error (layer-wise)"}
X_AXES = {"covered_avg_bits": "average, covered layers", "covered_effective_bits": "effective, covered layers",
          "avg_bits": "average, whole model", "effective_bits": "effective, whole model"}


def current_point(chosen: pd.DataFrame, current: PlanChoice, run_set: tradeoffs.RunSet, loaded: LoadedModel,
                  measured: str, x: str) -> dict | None:
    """The current plan on the chart: its measured run if there is one, else an estimate, else its bits only; None
    when it covers other layers than this run set (then it is not comparable)."""
    scope = coverage.coverage_of(loaded.arch, current.bits).label
    if scope != run_set.coverage:
        st.caption(f"The current plan covers {scope}, these runs {run_set.coverage}: it is not drawn here.")
        return None
    whole = coverage.whole_model_size(model_layer_table(model_source()), current.bits, current.group_size)
    bits = {"covered_avg_bits": current.summary.get("avg_bits"),
            "covered_effective_bits": current.summary.get("effective_bits"),
            "avg_bits": whole["avg_bits"], "effective_bits": whole["effective_bits"]}[x]
    done = tradeoffs.runs_of_plan(chosen, current.bits, loaded.arch)
    if not done.empty:
        run = done.iloc[0]
        return {"x": run[x], "y": run[measured], "low": run[measured], "high": run[measured],
                "label": f"current plan ({current.name}): measured, {run['quantizer']}"}
    found = tradeoffs.estimate(chosen, current.summary.get(PREDICTED_ERROR_ATTENTION, np.nan),
                               current.summary.get("analysis"), measured)
    if found is None:
        return {"x": bits, "y": None, "label": f"current plan ({current.name}): not measured yet"}
    return {"x": bits, "y": found.value, "low": found.low, "high": found.high,
            "label": f"current plan ({current.name}): estimated from {found.runs} {found.quantizer} runs, not measured"}


def quality_section(runs: pd.DataFrame, current: PlanChoice | None, loaded: LoadedModel) -> None:
    sets = tradeoffs.run_sets(runs)
    # The whole width: a run set's name (coverage, protocol, count) ended in "…" in a third of it.
    index = st.selectbox("Runs compared", range(len(sets)), format_func=lambda i: sets[i].label, key="trade_set",
                         help="only runs that cover the same layers and were measured under the same protocol share "
                              "a chart")
    run_set = sets[index]
    cols = st.columns(2)
    measured = cols[0].radio("Measure", list(MEASURES), format_func=MEASURES.get, horizontal=True, key="trade_y")
    x = cols[1].radio("Bits", list(X_AXES), format_func=X_AXES.get, horizontal=True, key="trade_x")
    chosen = tradeoffs.select(runs, run_set)
    point = current_point(chosen, current, run_set, loaded, measured, x) if current and current.summary else None
    baseline = {"perplexity": chosen["fp_perplexity"].dropna().median(), "top1": 1.0}.get(measured)
    st.plotly_chart(charts.tradeoff_curves(chosen, measured, f"{MEASURES[measured]} vs bits — {run_set.protocol}", x,
                                           baseline if baseline is None or np.isfinite(baseline) else None,
                                           tradeoffs.pareto_frontier(chosen, x, measured), point), width="stretch")
    st.caption(f"{len(chosen)} run(s) covering {run_set.coverage} under this protocol; colour = allocation method, "
               f"line style = quantizer (dotted RTN, dashed GPTQ, solid attention-aware, dash-dotted aespa; runs with "
               f"block refinement have lines of their own); shaded: ± {tradeoffs.BAND_Z:g} standard errors of each "
               f"measure over the evaluation windows (the uncertainty of another draw of windows from the same text; "
               f"two runs on the same windows differ far more surely than their bands suggest; runs stored before "
               f"the store kept it have no band); the thick "
               f"grey steps are the best runs (Pareto frontier); dashed line: full precision.")

    st.subheader("How far to trust the predictions")
    predicted = tradeoffs.newest_analysis(chosen)
    if predicted.runs.empty:
        st.info("None of these runs carries a predicted error: run plans made on the Bit budget page.")
        return
    if predicted.left_out:
        st.caption(f"Runs predicted by analysis {predicted.analysis or '(unnamed)'} only ({len(predicted.runs)}; "
                   f"{predicted.left_out} from other analyses left out): predictions from different analyses are "
                   f"not comparable.")
    # Room for the table's four columns; with presentation mode's larger type, one above the other.
    left, right = (st.container(), st.container()) if presenting() else st.columns(2)
    correlated = "kl" if measured == "top1" else measured
    left.plotly_chart(charts.predicted_vs_measured(predicted.runs, correlated, run_set.protocol), width="stretch")
    right.write(f"Spearman rank correlation of the predicted total error with the measured {MEASURES[correlated]}, "
                f"per quantizer and per source and unit of the predictions, which do not rank together (1 = the "
                f"predictions order plans exactly as the measurements do; needs 3 runs): the table below.")
    # The chosen measure's columns only, named in words; below both columns, at full width: its five columns do not
    # fit half the page without scrolling.
    trust = history.trust(predicted.runs)
    st.dataframe(trust[["quantizer", "predicted_with", "runs", f"spearman_attention_{correlated}",
                        f"spearman_layerwise_{correlated}"]],
                 hide_index=True,
                 column_config={"quantizer": st.column_config.TextColumn("quantizer", width="small"),
                                "predicted_with": st.column_config.TextColumn("predicted with"),
                                "runs": st.column_config.NumberColumn(width="small"),
                                f"spearman_attention_{correlated}": st.column_config.
                                NumberColumn("ρ, attention-aware errors", format="%.3f"),
                                f"spearman_layerwise_{correlated}": st.column_config.
                                NumberColumn("ρ, layer-wise errors", format="%.3f")})
    st.caption("Predicted with: whose predicted errors (RTN, GPTQ, attention-aware) and which unit the plan's "
               "predicted totals use — for knapsack plans also what chose the plan; \"not recorded\": runs "
               "stored before the store kept it.")


@st.cache_data(show_spinner="Predicting every solver's error…", max_entries=8)
def cached_predictions(key: str, _frames: tuple[pd.DataFrame, pd.DataFrame], group_size: int) -> pd.DataFrame:
    layers, errors = _frames
    widths = tuple(sorted(int(b) for b in errors["bits"].unique()))
    budgets = [float(b) for b in np.arange(widths[0], min(widths[-1], 5.0) + 1e-9, 0.25)]
    return tradeoffs.predicted_curves(layers, errors, SOLVERS, budgets, widths, group_size)


def predictions_section(loaded: LoadedModel, current: PlanChoice | None) -> None:
    request, key, frames = requested_analysis(loaded, current_corpus())
    if frames is None:
        st.info("No stored analysis for the Home page's settings: the predictions need one.")
        return
    curves = cached_predictions(key, frames, request.group_size)
    star = None
    if current is not None and current.summary.get("analysis") == key:
        star = {"x": current.summary["avg_bits"], "y": current.summary[PREDICTED_ERROR_ATTENTION],
                "label": f"current plan ({current.name})"}
    st.plotly_chart(charts.predicted_curves(curves, star), width="stretch")
    st.caption("Each solver's plan at budgets from the lowest width up, scored by the analysis alone (no "
               "quantization): lower is better if the predictions can be trusted — the section below checks that "
               f"against measured runs. Shaded: ± {tradeoffs.BAND_Z:g} standard errors of each predicted total, "
               "from the standard errors of the unit's factors (Hutchinson's traces, or the measured KL rates); "
               "none where the analysis has none."
               + (f" {PAIRS_SOLVER}: the knapsack giving each layer a (bits, group size) pair of the analysed group "
                  f"sizes, at the bytes of the budget in the analysis' "
                  f"{f'groups of {request.group_size}' if request.group_size else 'per-channel grid'}."
                  if PAIRS_SOLVER in set(curves["solver"]) else ""))


def side_by_side(choices: dict[str, PlanChoice], arch: Architecture) -> None:
    keys = list(choices)
    if len(keys) < 2:  # a plan beside itself would read "0 layers differ"
        st.info("Only one plan so far: save another on the Bit budget page to compare two side by side.")
        return
    cols = st.columns(2)
    picked = [cols[i].selectbox(f"Plan {'AB'[i]}", keys, index=min(i, len(keys) - 1), key=f"trade_plan_{i}",
                                format_func=lambda k: choices[k].label) for i in range(2)]
    tables = [plan_table(arch, choices[k]) for k in picked]
    separate = separate_experts(tables[0])
    for i, (key, table) in enumerate(zip(picked, tables)):
        covered = table[table["layer"].isin(set(choices[key].bits))]  # the blocks the plan decides, not FP16 filler
        scope = coverage.coverage_of(arch, choices[key].bits)
        cols[i].plotly_chart(charts.plan_heatmap(covered, f"{choices[key].name} — {scope.label}",
                                                 separate_experts=separate), width="stretch",
                             key=f"trade_map_{i}")
    rows = {choices[k].name: {label: choices[k].summary.get(name) for name, label in SUMMARY_COLUMNS.items()}
            for k in picked}
    st.dataframe(pd.DataFrame(rows).T, width="content")
    diff = tables[0][["layer", "bits", "group"]].merge(tables[1][["layer", "bits", "group"]], on="layer",
                                                      suffixes=(" A", " B"))
    diff = diff[(diff["bits A"] != diff["bits B"]) | (diff["group A"] != diff["group B"])]
    st.write(f"{len(diff)} of {len(tables[0])} layers differ:")
    st.dataframe(diff.assign(change=diff["bits B"] - diff["bits A"]), hide_index=True, height=240)


def downloads(choices: dict[str, PlanChoice], loaded: LoadedModel) -> None:
    key = st.selectbox("Plan", list(choices), format_func=lambda k: choices[k].label, key="trade_download")
    choice = choices[key]
    symmetric = st.checkbox("Symmetric grid", key="trade_symmetric")
    files = plan_files(loaded.arch, loaded.model, choice.bits, choice.group_size, symmetric,
                       {"name": choice.name, "allocation": choice.allocation, "budget": choice.budget,
                        "model": loaded.display_name}, choice.layer_groups)
    cols = st.columns(3)
    cols[0].download_button("Plan JSON", json.dumps(files.document, indent=2), f"{choice.name}.plan.json",
                            "application/json")
    cols[1].download_button("GPTQModel quantize config", json.dumps(files.gptqmodel, indent=2),
                            f"{choice.name}.gptqmodel.json", "application/json")
    cols[2].download_button("llm-compressor recipe", files.recipe, f"{choice.name}.recipe.yaml", "text/yaml")
    if files.document["indivisible"]:
        st.warning(f"{len(files.document['indivisible'])} layer(s) have columns not divisible by group size "
                   f"{choice.group_size}: {files.document['note']}")


page_header("Trade-offs")
loaded, corpus, model_fp = model_and_corpus_or_stop()
choices = plan_choices(model_fp)
runs = measured_runs(loaded, model_fp)

st.subheader("Predicted error before quantizing")
predictions_section(loaded, choices.get("current"))

st.subheader("Quality against bits")
if runs is None or runs.empty:
    st.info("No quantization runs of this model yet: run plans on the Quantize page, then come back to compare "
            "them.")
else:
    quality_section(runs, choices.get("current"), loaded)

st.subheader("Measure a sweep")
sweep_section(loaded, corpus)

st.subheader("Two plans side by side")
if not choices:
    st.info("No plans yet: make one on the Bit budget page (and save it to keep it).")
    st.stop()
side_by_side(choices, loaded.arch)

st.subheader("Download a plan")
downloads(choices, loaded)
