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


def _grid(frame: pd.DataFrame, column: str) -> tuple[np.ndarray, list[str], list[int]]:
    """`column` laid out as projection kinds × blocks (NaN where a cell is missing), with the row and column labels.
    Plain numpy: pandas' pivot_table costs tens of ms, and these grids are rebuilt on every slider move."""
    kinds = _kinds(frame)
    blocks = np.unique(frame["block"].to_numpy())
    values = frame[column].to_numpy()
    grid = np.full((len(kinds), len(blocks)), np.nan, dtype=float if values.dtype.kind in "iuf" else object)
    grid[pd.Index(kinds).get_indexer(frame["kind"]), np.searchsorted(blocks, frame["block"].to_numpy())] = values
    return grid, kinds, blocks.tolist()


def _grid_layout(title: str, blocks: list[int]) -> dict:
    """Shared layout of the block × projection heatmaps: integer block ticks (no block 0.5), q at the top."""
    dtick = 1 if len(blocks) <= 16 else 2 if len(blocks) <= 40 else 5
    return {"title": title, "height": 330, "margin": {"t": 50, "b": 40},
            "xaxis": {"title": "block", "tickmode": "linear", "dtick": dtick},
            "yaxis": {"title": "projection", "autorange": "reversed"}}


def sensitivity_heatmap(layers: pd.DataFrame, metric: str, title: str | None = None) -> go.Figure:
    """Blocks × projection types, coloured by log10 of `metric`; hover shows the exact value and the layer name."""
    values, kinds, blocks = _grid(layers, metric)
    names, _, _ = _grid(layers, "layer")
    with np.errstate(divide="ignore", invalid="ignore"):
        log_values = np.log10(values)
    log_values[~np.isfinite(log_values)] = np.nan
    return go.Figure(go.Heatmap(
        z=log_values, x=blocks, y=kinds, customdata=np.dstack([values.astype(object), names]),
        colorscale="Viridis", colorbar={"title": "log₁₀"},
        hovertemplate="block %{x} · %{y}<br>%{customdata[1]}<br>value %{customdata[0]:.4g}<extra></extra>"),
        _grid_layout(title or METRIC_LABELS.get(metric, metric), blocks))


def plan_heatmap(plan: pd.DataFrame, title: str = "bits per layer", selectable: bool = False) -> go.Figure:
    """Blocks × projection types coloured by the plan's bit width (discrete colours per width).

    `selectable` overlays one invisible square marker per cell: plotly selects scatter points but not heatmap cells,
    so clicks and box selections land on the markers (a selected cell shows a dark square; shift-click adds).
    """
    bits, kinds, blocks = _grid(plan, "bits")
    widths = sorted({int(b) for b in plan["bits"]})
    steps = max(len(widths), 1)
    # Each width sits in the middle of its own colour band, so the scale is discrete and stable per width.
    band = np.searchsorted(widths, np.nan_to_num(bits, nan=-1)) + 0.5
    band[np.isnan(bits)] = np.nan
    scale = [[(i + edge) / steps, BIT_COLORS.get(w, "#cccccc")] for i, w in enumerate(widths) for edge in (0, 1)]
    hover = "block %{x} · %{y}: %{customdata} bits<extra></extra>"
    traces = [go.Heatmap(z=band, x=blocks, y=kinds, customdata=bits, zmin=0, zmax=steps, colorscale=scale or "Greys",
                         colorbar={"tickvals": [i + 0.5 for i in range(steps)],
                                   "ticktext": [f"{w} bit" for w in widths]},
                         hovertemplate=hover, hoverinfo="skip" if selectable else None)]
    if selectable:  # hover and clicks go to the markers
        traces.append(go.Scatter(
            x=plan["block"], y=plan["kind"], customdata=plan["bits"], mode="markers", showlegend=False,
            marker={"symbol": "square-open", "size": 18, "color": "#111", "opacity": 0, "line": {"width": 3}},
            selected={"marker": {"opacity": 1}}, unselected={"marker": {"opacity": 0}}, hovertemplate=hover))
    return go.Figure(traces, _grid_layout(title, blocks))


def block_bars(layers: pd.DataFrame, metric: str, label: str | None = None) -> go.Figure:
    """Per-block totals of `metric`, stacked by projection type."""
    totals = layers.groupby(["block", "kind"], as_index=False)[metric].sum()
    figure = px.bar(totals, x="block", y=metric, color="kind", category_orders={"kind": _kinds(layers)},
                    log_y=True, labels={metric: label or METRIC_LABELS.get(metric, metric)})
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


QUANT_DASH = {"rtn": "dot", "gptq": "dash", "attention": "solid"}  # line style per quantization method
QUANT_SYMBOLS = {"rtn": "square", "gptq": "diamond", "attention": "circle"}
AXIS_LABELS = {"avg_bits": "average bits per weight", "effective_bits": "effective bits per weight (with scales)",
               "perplexity": "perplexity", "kl": "KL(full precision ‖ quantized), nats/token",
               "top1": "top-1 agreement", "predicted_error_attention": "predicted Σ e (attention-aware)",
               "predicted_error_layerwise": "predicted Σ e (layer-wise)"}


def tradeoff_curves(runs: pd.DataFrame, y: str = "perplexity", protocol: str = "", x: str = "avg_bits",
                    current: dict | None = None) -> go.Figure:
    """`y` against bits from stored runs (columns allocation, method, plan_name, x, y): one line per allocation
    method (colour) and quantization method (dash). `current` = {"x", "y" (None when there is no estimate),
    "label"} adds the current plan, predicted only: an open star, or a dotted vertical line without an estimate."""
    figure = go.Figure()
    for (allocation, method), group in runs.sort_values(x).groupby(["allocation", "method"], sort=True):
        figure.add_trace(go.Scatter(
            x=group[x], y=group[y], mode="lines+markers", name=f"{allocation} · {method}",
            line={"color": METHOD_COLORS.get(str(allocation)), "dash": QUANT_DASH.get(str(method), "solid")},
            marker={"symbol": QUANT_SYMBOLS.get(str(method), "circle"), "size": 8}, customdata=group[["plan_name"]],
            hovertemplate=f"%{{customdata[0]}}<br>%{{x:.3f}} bits<br>{y} %{{y:.4g}}<extra>%{{fullData.name}}</extra>"))
    if current is not None and current.get("y") is not None:
        figure.add_trace(go.Scatter(x=[current["x"]], y=[current["y"]], mode="markers", name=current["label"],
                                    marker={"symbol": "star-open", "size": 16, "color": "#000", "line": {"width": 2}}))
    elif current is not None:
        figure.add_vline(x=current["x"], line={"dash": "dot", "color": "#000"}, annotation_text=current["label"])
    figure.update_layout(xaxis_title=AXIS_LABELS.get(x, x), yaxis_title=AXIS_LABELS.get(y, y), yaxis_type="log",
                         title=f"{y} vs bits" + (f" — {protocol}" if protocol else ""), height=440,
                         legend={"title": "allocation · quantization"})
    return figure


def predicted_vs_measured(runs: pd.DataFrame, measured: str = "kl", protocol: str = "") -> go.Figure:
    """Predicted total error (attention-aware) against a measured quantity, log–log; colour = allocation method,
    symbol = quantization method. Points on a rising line mean the predictions rank plans correctly."""
    figure = px.scatter(runs, x="predicted_error_attention", y=measured, color="allocation", symbol="method",
                        hover_name="plan_name", hover_data={"avg_bits": ":.3f"}, color_discrete_map=METHOD_COLORS,
                        symbol_map=QUANT_SYMBOLS, log_x=True, log_y=True,
                        labels={k: v for k, v in AXIS_LABELS.items() if k in ("predicted_error_attention", measured)})
    figure.update_layout(height=420, title=f"predicted error vs measured {measured}"
                         + (f" — {protocol}" if protocol else ""))
    return figure
