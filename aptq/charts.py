"""Plotly figures built from DataFrames: pure functions, so the dashboard and the CLI draw the same charts.

Colours are fixed per method and per bit width, so a reader learns them once.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

KIND_ORDER = ["q", "k", "v", "o", "gate", "up", "down"]
METHOD_COLORS = {"fp": "#222222", "uniform": "#7f7f7f", "aptq": "#1f77b4", "knapsack": "#d62728",
                 "knapsack-layerwise": "#ff7f0e", "random": "#9467bd", "rtn": "#8c564b", "gptq": "#2ca02c",
                 "attention": "#e377c2"}
BIT_COLORS = {2: "#b2182b", 3: "#ef8a62", 4: "#fddbc7", 5: "#d1e5f0", 6: "#92c5de", 8: "#4393c3", 16: "#2166ac"}
METRIC_LABELS = {"trace_layerwise": "layer-wise trace tr(I⊗H)", "trace_attention": "attention-aware trace",
                 "trace_lm": "APTQ trace tr(H_LM) (Hutchinson)", "score": "APTQ trace per parameter",
                 "score_layerwise": "layer-wise trace per parameter",
                 "score_attention": "attention-aware trace per parameter"}


def _kinds(frame: pd.DataFrame) -> list[str]:
    present = set(frame["kind"])
    return [k for k in KIND_ORDER if k in present]


def sensitivity_heatmap(layers: pd.DataFrame, metric: str, title: str | None = None) -> go.Figure:
    """Blocks × projection types, coloured by log10 of `metric`; hover shows the exact value and the layer name."""
    grid = layers.pivot_table(index="kind", columns="block", values=metric, aggfunc="first").reindex(_kinds(layers))
    names = layers.pivot_table(index="kind", columns="block", values="layer", aggfunc="first").reindex(grid.index)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_values = np.log10(grid.to_numpy(dtype=float))
    log_values[~np.isfinite(log_values)] = np.nan
    figure = go.Figure(go.Heatmap(
        z=log_values, x=list(grid.columns), y=list(grid.index), customdata=np.dstack([grid.to_numpy(), names]),
        colorscale="Viridis", colorbar={"title": "log₁₀"},
        hovertemplate="block %{x} · %{y}<br>%{customdata[1]}<br>value %{customdata[0]:.4g}<extra></extra>"))
    figure.update_layout(title=title or METRIC_LABELS.get(metric, metric), xaxis_title="block",
                         yaxis_title="projection", yaxis_autorange="reversed", height=330, margin={"t": 50, "b": 40})
    return figure


def plan_heatmap(plan: pd.DataFrame, title: str = "bits per layer") -> go.Figure:
    """Blocks × projection types coloured by the plan's bit width (discrete colours per width)."""
    widths = sorted(set(int(b) for b in plan["bits"]))
    grid = plan.pivot_table(index="kind", columns="block", values="bits", aggfunc="first").reindex(_kinds(plan))
    # Map each width to the middle of its own band so the colour scale is discrete and stable per width.
    position = {w: i + 0.5 for i, w in enumerate(widths)}
    z = grid.apply(lambda col: col.map(lambda b: position.get(int(b)) if pd.notna(b) else np.nan))
    steps = max(len(widths), 1)
    scale = []
    for i, w in enumerate(widths):
        color = BIT_COLORS.get(w, "#cccccc")
        scale += [[i / steps, color], [(i + 1) / steps, color]]
    figure = go.Figure(go.Heatmap(
        z=z.to_numpy(dtype=float), x=list(grid.columns), y=list(grid.index), customdata=grid.to_numpy(),
        zmin=0, zmax=steps, colorscale=scale or "Greys",
        colorbar={"tickvals": [i + 0.5 for i in range(steps)], "ticktext": [f"{w} bit" for w in widths]},
        hovertemplate="block %{x} · %{y}: %{customdata} bits<extra></extra>"))
    figure.update_layout(title=title, xaxis_title="block", yaxis_title="projection", yaxis_autorange="reversed",
                         height=330, margin={"t": 50, "b": 40})
    return figure


def block_bars(layers: pd.DataFrame, metric: str) -> go.Figure:
    """Per-block totals of `metric`, stacked by projection type."""
    totals = layers.groupby(["block", "kind"], as_index=False)[metric].sum()
    figure = px.bar(totals, x="block", y=metric, color="kind", category_orders={"kind": _kinds(layers)},
                    log_y=True, labels={metric: METRIC_LABELS.get(metric, metric)})
    figure.update_layout(height=320, margin={"t": 30, "b": 40}, title="per block")
    return figure


def rank_comparison(layers: pd.DataFrame, x_metric: str, y_metric: str) -> go.Figure:
    """Rank of every layer under two metrics; points off the diagonal are where the metrics disagree."""
    frame = layers.assign(rank_x=layers[x_metric].rank(ascending=False), rank_y=layers[y_metric].rank(ascending=False))
    figure = px.scatter(frame, x="rank_x", y="rank_y", color="kind", hover_name="layer",
                        category_orders={"kind": _kinds(layers)},
                        labels={"rank_x": f"rank by {METRIC_LABELS.get(x_metric, x_metric)}",
                                "rank_y": f"rank by {METRIC_LABELS.get(y_metric, y_metric)}"})
    top = float(len(frame))
    figure.add_shape(type="line", x0=1, y0=1, x1=top, y1=top, line={"dash": "dot", "color": "#999"})
    figure.update_layout(height=420, margin={"t": 30})
    return figure


def tradeoff_curves(runs: pd.DataFrame, y: str = "perplexity", protocol: str = "") -> go.Figure:
    """`y` against average bits, one line per method (columns: method, avg_bits, y)."""
    figure = go.Figure()
    for method, group in runs.sort_values("avg_bits").groupby("method", sort=False):
        figure.add_trace(go.Scatter(x=group["avg_bits"], y=group[y], mode="lines+markers", name=str(method),
                                    line={"color": METHOD_COLORS.get(str(method))}))
    figure.update_layout(xaxis_title="average bits per weight", yaxis_title=y, yaxis_type="log",
                         title=f"{y} vs bits" + (f" — {protocol}" if protocol else ""), height=420)
    return figure


def predicted_vs_measured(runs: pd.DataFrame, measured: str = "kl_divergence") -> go.Figure:
    """Predicted total error against a measured quantity, coloured by method (log–log)."""
    figure = px.scatter(runs, x="predicted_error", y=measured, color="method", hover_name="label",
                        color_discrete_map=METHOD_COLORS, log_x=True, log_y=True)
    figure.update_layout(height=420, title=f"predicted error vs measured {measured}")
    return figure
