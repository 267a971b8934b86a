"""Sensitivity: how much every layer matters, under the layer-wise and the attention-aware measures."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from aptq import charts, ranking
from aptq.allocate import comparable_errors
from ui.experts import separate_experts
from ui.session import current_analysis, page_header
from ui.shell import presenting

page_header("Sensitivity")
analysis = current_analysis()
if analysis is None:
    st.stop()
layers, errors = analysis.layers, analysis.errors

METRICS = charts.METRIC_LABELS | {"error": "predicted error at b bits"}  # the same default (first) as Home's
TABLE_COLUMNS = {"layer": "layer", "block": "block", "kind": "projection", "n_params": "parameters",
                 "score": "APTQ score", "score_attention": "attention-aware score",
                 "score_layerwise": "layer-wise score", "trace_lm": "APTQ trace", "trace_lm_se": "± (std. error)",
                 "trace_attention": "attention-aware trace", "trace_layerwise": "layer-wise trace",
                 "residual_ms": "residual ‖h‖²"}
RANK_NAMES = {"score_attention": "attention-aware", "score": "APTQ"}  # the metrics the ranking compares with
left, mid, right = st.columns([2, 1, 1])
metric = left.selectbox("Metric", list(METRICS), format_func=METRICS.get, key="sens_metric", persist_state="session")
frame, label = layers, METRICS[metric]
if metric == "error":
    bits = mid.selectbox("Bits", sorted(int(b) for b in errors["bits"].unique()), key="sens_bits")
    hessian = right.radio("Hessian", ["attention", "layerwise"], horizontal=True, key="sens_hessian",
                          format_func={"attention": "attention-aware", "layerwise": "layer-wise"}.get)
    comparable = left.toggle("In one unit (what the solver sums)", value=True, key="sens_comparable",
                             help="× APTQ trace / trace of the Hessian used / residual-stream size (our choice); "
                                  "off: as each Hessian measures it")
    column = f"err_{hessian}"
    at_bits = errors[errors["bits"] == bits]
    chosen = (comparable_errors(layers, at_bits, column) if comparable else at_bits).set_index("layer")[column]
    frame = layers.assign(error=layers["layer"].map(chosen))
    label = f"predicted error e(layer, {bits} bits), {hessian} Hessian" + (", in one unit" if comparable else "")

st.plotly_chart(charts.sensitivity_heatmap(frame, metric, label, separate_experts(frame)), width="stretch")
st.caption("Log colour scale; hover a cell for the exact value. Values come from the cache: "
           f"{analysis.description}. Below: each block's share of the model's total (linear scale).")
st.plotly_chart(charts.block_bars(frame, metric, label), width="stretch")

st.subheader("Layer-wise versus attention-aware ranking")
# Room for the table's five columns without a horizontal scroll; with presentation mode's larger type, one above the
# other.
rank_left, rank_right = (st.container(), st.container()) if presenting() else st.columns([5, 6])
x_metric = "score_layerwise"
y_metric = rank_right.selectbox("Compare with", list(RANK_NAMES), format_func=METRICS.get, key="sens_rank",
                                persist_state="session")
rank_left.plotly_chart(charts.rank_comparison(layers, x_metric, y_metric), width="stretch")
rank_right.metric("Spearman rank correlation", f"{ranking.spearman(layers, x_metric, y_metric):.3f}")
rank_right.write("Layers whose rank moves the most (positive: more sensitive than the layer-wise view says):")
# Block and projection instead of the module path, the move before the ranks: the move stays in view.
shifts = ranking.rank_shifts(layers, x_metric, y_metric).merge(layers[["layer", "block", "kind"]], on="layer")
rank_right.dataframe(shifts[["block", "kind", "shift", "rank_x", "rank_y"]], hide_index=True, column_config={
    "block": st.column_config.NumberColumn("block", format="%d", width="small"),
    "kind": st.column_config.TextColumn("projection", width="small"),
    "rank_x": st.column_config.NumberColumn("layer-wise rank", format="%d"),
    "rank_y": st.column_config.NumberColumn(f"{RANK_NAMES[y_metric]} rank", format="%d"),
    "shift": st.column_config.NumberColumn("move", format="%+d", width="small")})

with st.expander("What these numbers are", expanded=not presenting()):
    st.markdown("Notation: `X` is a layer's input (`d_in × N`, one column per calibration token), `W` its weight, "
                "`ΔW = Q(W) − W` the quantization error. Items marked *(our choice)* are where the papers are silent "
                "and this project decided.")
    st.markdown("**Layer-wise (GPTQ).** The error of a layer is measured at its own output, with the Hessian of "
                "that squared error:")
    st.latex(r"\|\Delta W X\|_F^2 = \operatorname{tr}(\Delta W H \Delta W^\top),\qquad "
             r"H = \tfrac{2}{N}\textstyle\sum_{n} x_n x_n^\top")
    st.markdown("**Attention-aware (aespa / BoA).** The error of q, k and v is measured at the attention output. "
                "For the value projection this is exact, with one Hessian per key/value head:")
    st.latex(r"H_{V,h} = 2\,\mathbb{E}\left[X A_h^\top A_h X^\top\right]")
    st.markdown("For query and key, linearizing the softmax gives a Kronecker-factored bound with a *row Hessian* "
                "`G` (keys after RoPE for the query, queries for the key, mapped back to the weight's frame):")
    st.latex(r"\operatorname{tr}\left(G_{Q,h}\,\Delta W_{Q,h}\, H\, \Delta W_{Q,h}^\top\right),\qquad "
             r"G_{Q,h} = \mathbb{E}_p\left[K_h^\top \left(\operatorname{diag}(A_p) - A_p A_p^\top\right) K_h\right]")
    st.markdown("*(our choice)* Each query's score changes are weighed by its own attention probabilities, centred "
                "(what its softmax sees; the papers' `E[KᵀK]` weighs every key alike), as the attention-aware "
                "quantizer collects them, so the analysis measures that quantizer's objective. In models that "
                "normalise the out and down projections' outputs (Gemma 2/3, OLMo 2) those layers, and v's and q/k's "
                "query positions, are weighed per token by `1/σ²` of that output, the factor the post-norm divides "
                "an error by.")
    st.markdown("**APTQ trace.** The Levenberg–Marquardt Hessian of the attention (or MLP) output with respect to "
                "the layer's weights; its trace estimated with Hutchinson probes *(our choice: the paper's exact "
                "formulas are not available to us)*. The table's `trace_lm_se` is the estimate's standard error.")
    st.latex(r"\operatorname{tr}(H_{LM}) = 2\,\mathbb{E}\|J\|_F^2 \approx \tfrac{2}{m}\textstyle\sum_{i=1}^{m} "
             r"\left\|\partial (u_i^\top F)/\partial W\right\|^2,\quad u_i \sim \text{Rademacher}")
    st.markdown("**Score** — trace per parameter, so that large and small layers compare *(our choice of "
                "normalization, as in HAWQ)*; `score` uses the APTQ trace, the other scores the other traces:")
    st.latex(r"s_\ell = \operatorname{tr}(H_\ell)\,/\,n_\ell")
    st.markdown("**Predicted error** of giving layer ℓ `b` bits — what the Bit budget solver minimizes. `ΔW_b` is the "
                "round-to-nearest error at `b` bits with the analysis's group size, its clipping searched with the "
                "layer-wise `H` *(our choice)*, and the attention-aware `H` (Kronecker form for q/k):")
    st.latex(r"e(\ell, b) = \operatorname{tr}\left(\Delta W_b\, H\, \Delta W_b^\top\right)")
    st.markdown("Before summing, each error is put in one unit *(our choice: raw errors of different layers are "
                "measured in different places, and summed raw they made the knapsack lose to uniform 3-bit)*: moved "
                "to the attention or MLP output with the ratio of traces, and made relative to the median per-token "
                "squared norm of the residual stream that output is added to:")
    st.latex(r"\tilde e(\ell, b) = e(\ell, b)\,\frac{\operatorname{tr}(H_{LM,\ell})}{\operatorname{tr}(H_\ell)}"
             r"\,\frac{1}{\operatorname{median}_t \|h_t\|^2}")

with st.expander("Table"):
    shown = [c for c in TABLE_COLUMNS if c in layers]
    st.dataframe(pd.DataFrame(layers)[shown].rename(columns=TABLE_COLUMNS), hide_index=True,
                 column_config={"layer": st.column_config.TextColumn(width="medium")})
