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
# One hue per width, told apart at a glance and on a projector: red (2) … green (8), FP16 a neutral grey.
BIT_COLORS = {2: "#d7191c", 3: "#fd8d3c", 4: "#fed976", 5: "#c7e9b4", 6: "#7fcdbb", 7: "#41b6c4", 8: "#1a9641",
              16: "#bdbdbd"}
# Per-layer metrics in the order the pages offer them; the first is every page's default.
METRIC_LABELS = {"score": "APTQ trace per parameter", "score_attention": "attention-aware trace per parameter",
                 "score_layerwise": "layer-wise trace per parameter", "trace_lm": "APTQ trace tr(H_LM) (Hutchinson)",
                 "trace_attention": "attention-aware trace", "trace_layerwise": "layer-wise trace tr(I⊗H)"}


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
    return {"title": {"text": title, "y": 0.97, "yanchor": "top"}, "height": 330, "margin": {"t": 60, "b": 40},
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


def plan_heatmap(plan: pd.DataFrame, title: str = "bits per layer", selectable: bool = False,
                 pinned: frozenset[str] = frozenset()) -> go.Figure:
    """Blocks × projection types coloured by the plan's bit width (one fixed colour per width, BIT_COLORS).

    `pinned` layers carry a black ring, so a pinned cell never looks like one the solver chose. `selectable` overlays
    one invisible square marker per cell: plotly selects scatter points but not heatmap cells, so clicks and box
    selections land on the markers (a selected cell shows a dark square; shift-click adds).
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
                                   "ticktext": ["FP16" if w == 16 else f"{w} bit" for w in widths]},
                         hovertemplate=hover, hoverinfo="skip" if selectable else None, xgap=1, ygap=1)]
    held = plan[plan["layer"].isin(pinned)]
    if not held.empty:
        traces.append(go.Scatter(x=held["block"], y=held["kind"], mode="markers", name="pinned", showlegend=True,
                                 marker={"symbol": "circle-open", "size": 12, "color": "#000", "line": {"width": 2}},
                                 hoverinfo="skip"))
    if selectable:  # hover and clicks go to the markers
        traces.append(go.Scatter(
            x=plan["block"], y=plan["kind"], customdata=plan["bits"], mode="markers", showlegend=False,
            marker={"symbol": "square-open", "size": 18, "color": "#111", "opacity": 0, "line": {"width": 3}},
            selected={"marker": {"opacity": 1}}, unselected={"marker": {"opacity": 0}}, hovertemplate=hover))
    layout = _grid_layout(title, blocks) | {"legend": {"orientation": "h", "y": -0.25}}
    return go.Figure(traces, layout)


def block_bars(layers: pd.DataFrame, metric: str, label: str | None = None) -> go.Figure:
    """Each block's share of the model's total `metric`, stacked by projection type on a linear axis (a stack on a
    log axis would misstate the parts)."""
    totals = layers.groupby(["block", "kind"], as_index=False)[metric].sum()
    totals = totals.assign(share=100 * totals[metric] / totals[metric].sum())
    figure = px.bar(totals, x="block", y="share", color="kind", category_orders={"kind": _kinds(layers)},
                    hover_data={metric: ":.4g"},
                    labels={"share": "share of the total (%)", metric: label or METRIC_LABELS.get(metric, metric)})
    figure.update_layout(height=340, margin={"t": 60, "b": 40},
                         title={"text": f"share per block — {label or METRIC_LABELS.get(metric, metric)}", "y": 0.97,
                                "yanchor": "top"})
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
AXIS_LABELS = {"avg_bits": "average bits per weight, whole model",
               "effective_bits": "effective bits per weight (with scales), whole model",
               "covered_avg_bits": "average bits per weight over the covered layers",
               "covered_effective_bits": "effective bits per weight (with scales) over the covered layers",
               "perplexity": "perplexity", "kl": "KL(full precision ‖ quantized), nats/token",
               "top1": "top-1 agreement", "predicted_error_attention": "predicted Σ e (attention-aware)",
               "predicted_error_layerwise": "predicted Σ e (layer-wise)"}


def tradeoff_curves(runs: pd.DataFrame, y: str = "perplexity", title: str = "", x: str = "covered_avg_bits",
                    baseline: float | None = None, frontier: pd.DataFrame | None = None,
                    current: dict | None = None) -> go.Figure:
    """`y` against bits from stored runs of one run set (aptq.tradeoffs): one line per allocation method (colour) and
    quantization method (dash); `baseline` the full-precision value (a horizontal line); `frontier` the runs nothing
    beats (a grey step line). `current` = {"x", "y", "low", "high", "label"} adds the current plan: a filled star when
    it was measured (low = high = y), an open star with its uncertainty band when estimated, a dotted vertical line
    when there is neither."""
    figure = go.Figure()
    if frontier is not None and len(frontier) > 1:
        figure.add_trace(go.Scatter(x=frontier[x], y=frontier[y], mode="lines", name="best runs (Pareto frontier)",
                                    line={"color": "#bbbbbb", "width": 8, "shape": "hv"}, hoverinfo="skip"))
    for (allocation, method), group in runs.sort_values(x).groupby(["allocation", "method"], sort=True):
        figure.add_trace(go.Scatter(
            x=group[x], y=group[y], mode="lines+markers", name=f"{allocation} · {method}",
            line={"color": METHOD_COLORS.get(str(allocation)), "dash": QUANT_DASH.get(str(method), "solid")},
            marker={"symbol": QUANT_SYMBOLS.get(str(method), "circle"), "size": 9}, customdata=group[["plan_name"]],
            hovertemplate=f"%{{customdata[0]}}<br>%{{x:.3f}} bits<br>{y} %{{y:.4g}}<extra>%{{fullData.name}}</extra>"))
    if baseline is not None:
        figure.add_hline(y=baseline, line={"dash": "dash", "color": METHOD_COLORS["fp"]},
                         annotation_text=f"full precision {baseline:.4g}", annotation_position="bottom right")
    if current is not None and current.get("y") is not None:
        error = {"type": "data", "symmetric": False, "array": [current["high"] - current["y"]],
                 "arrayminus": [current["y"] - current["low"]], "visible": bool(current["high"] > current["low"])}
        figure.add_trace(go.Scatter(x=[current["x"]], y=[current["y"]], mode="markers", name=current["label"],
                                    error_y=error, marker={"symbol": "star" if current["high"] == current["low"]
                                                           else "star-open", "size": 18, "color": "#000",
                                                           "line": {"width": 2}}))
    elif current is not None:
        figure.add_vline(x=current["x"], line={"dash": "dot", "color": "#000"}, annotation_text=current["label"])
    figure.update_layout(xaxis_title=AXIS_LABELS.get(x, x), yaxis_title=AXIS_LABELS.get(y, y),
                         yaxis_type="linear" if y == "top1" else "log", height=460,
                         title={"text": title or f"{y} vs bits", "y": 0.97, "yanchor": "top"},
                         margin={"t": 60}, legend={"title": "allocation · quantization"})
    if y != "top1":
        figure.update_yaxes(range=_log_range([runs[y], [baseline], [(current or {}).get(k) for k in ("low", "high")]]))
    return figure


def _log_range(parts: list) -> list[float] | None:
    """log10 axis range over the positive finite values, padded by 5 % of a decade or more. Set explicitly because
    plotly's own log autorange, with the unmeasured plan's vertical line drawn, ran the axis up to 1e28."""
    values = np.array([v for part in parts for v in part if v is not None], dtype=float)
    values = np.log10(values[np.isfinite(values) & (values > 0)])
    if values.size == 0:
        return None
    pad = max(0.05, 0.05 * (values.max() - values.min()))
    return [float(values.min() - pad), float(values.max() + pad)]


def predicted_curves(curves: pd.DataFrame, current: dict | None = None) -> go.Figure:
    """Predicted total error against bits for every solver (aptq.tradeoffs.predicted_curves), before anything is
    quantized; `current` = {"x", "y", "label"} marks the current plan."""
    figure = go.Figure()
    for solver, group in curves.groupby("solver", sort=False):
        figure.add_trace(go.Scatter(x=group["avg_bits"], y=group["predicted_error_attention"], mode="lines+markers",
                                    name=str(solver), line={"color": METHOD_COLORS.get(str(solver))},
                                    hovertemplate="%{x:.3f} bits<br>predicted %{y:.4g}<extra>%{fullData.name}</extra>"))
    if current is not None:
        figure.add_trace(go.Scatter(x=[current["x"]], y=[current["y"]], mode="markers", name=current["label"],
                                    marker={"symbol": "star", "size": 16, "color": "#000"}))
    figure.update_layout(xaxis_title="average bits per weight over the analysed layers",
                         yaxis_title=AXIS_LABELS["predicted_error_attention"], yaxis_type="log", height=400,
                         title={"text": "predicted error against bits, every solver (from the analysis alone)",
                                "y": 0.97, "yanchor": "top"}, margin={"t": 60}, legend={"title": "solver"})
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
