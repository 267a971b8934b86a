"""Trade-offs: quality against bits for every allocation and quantization method, how far the predictions can be
trusted, two plans side by side, and the plan files that production tools read."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import streamlit as st

from aptq import charts, history
from aptq.allocate import FULL_PRECISION, weight_size
from aptq.export import plan_files
from aptq.models import Architecture, LoadedModel
from aptq.pipeline import layer_table
from aptq.store import Store
from ui.plans import PlanChoice, plan_choices, plan_table
from ui.session import cached_model_fingerprint, current_corpus, current_model, model_source, page_header, store_call

MEASURES = {"perplexity": "perplexity", "kl": "KL divergence", "top1": "top-1 agreement"}
MIN_FIT_RUNS = 3  # (our choice) runs with predictions needed before the current plan gets an estimate


def protocol_label(corpus: str, seqlen: int, tokens: int) -> str:
    return f"{corpus} evaluation split, window {seqlen}, {tokens} tokens"


def estimate(runs: pd.DataFrame, predicted: float, analysis: str | None, measured: str) -> tuple[float, str] | None:
    """The current plan's `measured`, read off a log–log line fitted to the runs of the best-covered quantization
    method (our choice): an estimate, never a measurement. Only runs predicted by the plan's own `analysis` count:
    predictions from different analyses are not in one unit."""
    usable = runs[runs["analysis"] == analysis].dropna(subset=["predicted_error_attention", measured])
    usable = usable[(usable["predicted_error_attention"] > 0) & (usable[measured] > 0)]
    if usable.empty or not np.isfinite(predicted) or predicted <= 0:
        return None
    method = usable["method"].value_counts().index[0]
    fit = usable[usable["method"] == method]
    if len(fit) < MIN_FIT_RUNS or fit["predicted_error_attention"].nunique() < 2:
        return None
    slope, intercept = np.polyfit(np.log(fit["predicted_error_attention"]), np.log(fit[measured]), 1)
    return float(np.exp(intercept + slope * np.log(predicted))), method


def whole_model_bits(loaded: LoadedModel, choice: PlanChoice) -> dict[str, float]:
    """The plan's bits counted over every layer of the model, as runs count them: after an analysis of the first
    blocks only, the other blocks stay in FP16."""
    bits = np.array([choice.bits.get(layer.name, FULL_PRECISION) for layer in loaded.arch.layers])
    return weight_size(layer_table(loaded), bits, choice.group_size)


def quality_section(runs: pd.DataFrame, current: PlanChoice | None, loaded: LoadedModel) -> None:
    protocols = runs.groupby(["corpus", "eval_seqlen", "eval_tokens"]).size().sort_values(ascending=False)
    cols = st.columns(3)
    corpus, seqlen, tokens = cols[0].selectbox("Perplexity protocol", list(protocols.index),
                                               format_func=lambda p: protocol_label(*p), key="trade_protocol")
    measured = cols[1].radio("Measure", list(MEASURES), format_func=MEASURES.get, horizontal=True, key="trade_y")
    x = cols[2].radio("Bits", ["avg_bits", "effective_bits"], horizontal=True, key="trade_x",
                      format_func={"avg_bits": "average", "effective_bits": "effective (with scales)"}.get)
    chosen = runs[(runs["corpus"] == corpus) & (runs["eval_seqlen"] == seqlen) & (runs["eval_tokens"] == tokens)]
    protocol = protocol_label(corpus, seqlen, tokens)
    point = None
    if current is not None and current.summary:
        found = estimate(chosen, current.summary["predicted_error_attention"], current.summary.get("analysis"),
                         measured)
        label = f"current plan ({current.name}): " + (f"estimated from the {found[1]} runs, not measured" if found
                                                       else "not measured yet")
        point = {"x": whole_model_bits(loaded, current)[x], "y": found[0] if found else None, "label": label}
    st.plotly_chart(charts.tradeoff_curves(chosen, measured, protocol, x, point), width="stretch")
    baseline = chosen["fp_perplexity"].dropna()
    st.caption(f"{len(chosen)} run(s) under this protocol; colour = allocation method, line style = quantizer "
               f"(dotted RTN, dashed GPTQ, solid attention-aware)."
               + (f" Full-precision perplexity {baseline.iloc[0]:.3f}." if not baseline.empty else ""))

    st.subheader("How far to trust the predictions")
    predicted = chosen.dropna(subset=["predicted_error_attention"])
    if predicted.empty:
        st.info("None of these runs carries a predicted error: run plans made on the Bit budget page.")
        return
    # Predictions from different analyses are in different units: keep those of the newest prediction's analysis.
    analysis = predicted["analysis"].fillna("")
    latest = analysis[predicted["created"].idxmax()]
    if analysis.nunique() > 1:
        st.caption(f"Runs predicted by analysis {latest or '(unnamed)'} only ({(analysis == latest).sum()} of "
                   f"{len(predicted)}): predictions from different analyses are not comparable.")
    predicted = predicted[analysis == latest]
    left, right = st.columns([3, 2])
    left.plotly_chart(charts.predicted_vs_measured(predicted, "kl" if measured == "top1" else measured, protocol),
                      width="stretch")
    right.write("Spearman rank correlation of the predicted total error with the measured quantity, per quantizer "
                "(1 = the predictions order plans exactly as the measurements do; needs 3 runs):")
    right.dataframe(history.trust(predicted), hide_index=True)


def side_by_side(choices: dict[str, PlanChoice], arch: Architecture) -> None:
    keys = list(choices)
    cols = st.columns(2)
    picked = [cols[i].selectbox(f"Plan {'AB'[i]}", keys, index=min(i, len(keys) - 1), key=f"trade_plan_{i}",
                                format_func=lambda k: choices[k].label) for i in range(2)]
    tables = [plan_table(arch, choices[k].bits) for k in picked]
    for i, (key, table) in enumerate(zip(picked, tables)):
        cols[i].plotly_chart(charts.plan_heatmap(table, choices[key].name), width="stretch", key=f"trade_map_{i}")
    rows = {choices[k].name: {name: choices[k].summary.get(name) for name in
                              ("avg_bits", "effective_bits", "size_mb", "predicted_error_attention",
                               "predicted_error_layerwise")} for k in picked}
    st.dataframe(pd.DataFrame(rows).T, width="content")
    diff = tables[0][["layer", "bits"]].merge(tables[1][["layer", "bits"]], on="layer", suffixes=(" A", " B"))
    diff = diff[diff["bits A"] != diff["bits B"]]
    st.write(f"{len(diff)} of {len(tables[0])} layers differ:")
    st.dataframe(diff.assign(change=diff["bits B"] - diff["bits A"]), hide_index=True, height=240)


def downloads(choices: dict[str, PlanChoice], loaded: LoadedModel) -> None:
    key = st.selectbox("Plan", list(choices), format_func=lambda k: choices[k].label, key="trade_download")
    choice = choices[key]
    symmetric = st.checkbox("Symmetric grid", key="trade_symmetric")
    files = plan_files(loaded.arch, loaded.model, choice.bits, choice.group_size, symmetric,
                       {"name": choice.name, "allocation": choice.allocation, "budget": choice.budget,
                        "model": loaded.display_name})
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
loaded, corpus = current_model(), current_corpus()
if loaded is None or corpus is None:
    st.stop()
model_fp = cached_model_fingerprint(model_source())
choices = plan_choices(model_fp)
runs = store_call(lambda: history.stored_runs(Store(), model_fp))

st.subheader("Quality against bits")
if runs is None or runs.empty:
    st.info("No quantization runs of this model yet: run plans on the Quantize page, then come back to compare "
            "them.")
else:
    quality_section(runs, choices.get("current"), loaded)

st.subheader("Two plans side by side")
if not choices:
    st.info("No plans yet: make one on the Bit budget page (and save it to keep it).")
    st.stop()
side_by_side(choices, loaded.arch)

st.subheader("Download a plan")
downloads(choices, loaded)
