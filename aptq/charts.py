"""Plotly figures built from DataFrames: pure functions, so the dashboard and the CLI draw the same charts.

Colours are fixed per method and per bit width, so a reader learns them once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from aptq.allocate import PREDICTED_ERROR_ATTENTION, PREDICTED_ERROR_LAYERWISE
from aptq.choices import PAIRS_SOLVER
from aptq.history import quantizer_names
from aptq.tradeoffs import MEASURE_SE, PREDICTED_ERROR_ATTENTION_SE, band

KIND_ORDER = ["q", "k", "v", "o", "gate", "up", "down"]
METHOD_COLORS = {"fp": "#222222", "uniform": "#7f7f7f", "aptq": "#1f77b4", "knapsack": "#d62728",
                 "knapsack-layerwise": "#ff7f0e", "knapsack-pairs": "#17becf", "random": "#9467bd",
                 "rtn": "#8c564b", "gptq": "#2ca02c", "attention": "#e377c2"}
# One hue per width, told apart at a glance and on a projector: red (2) … green (8), FP16 a neutral grey.
BIT_COLORS = {2: "#d7191c", 3: "#fd8d3c", 4: "#fed976", 5: "#c7e9b4", 6: "#7fcdbb", 7: "#41b6c4", 8: "#1a9641",
              16: "#bdbdbd"}
# Per-layer metrics in the order the pages offer them; the first is every page's default.
METRIC_LABELS = {"score": "APTQ trace per parameter", "score_attention": "attention-aware trace per parameter",
                 "score_layerwise": "layer-wise trace per parameter", "trace_lm": "APTQ trace tr(H_LM) (Hutchinson)",
                 "trace_attention": "attention-aware trace", "trace_layerwise": "layer-wise trace tr(I⊗H)"}


def chart_title(text: str) -> dict:
    """A title just above the plot, below the chart's toolbar (a top margin of 70 px holds both): placed at the top
    of the figure, a title in half the page's width ran under the toolbar."""
    return {"text": text, "yref": "paper", "y": 1, "yanchor": "bottom", "pad": {"b": 10}}


def _kinds(frame: pd.DataFrame) -> list[str]:
    present = set(frame["kind"])
    return [k for k in KIND_ORDER if k in present]


# aptq.models names expert e's layers "<experts module>.<e>.gate_proj" (likewise up_proj, down_proj).
EXPERT_LAYER = re.compile(r"\.(\d+)\.(?:gate|up|down)_proj$")


def expert_numbers(frame: pd.DataFrame) -> np.ndarray:
    """Each layer's expert index (a mixture's gate/up/down) as floats, NaN for the other layers. A plain loop: pandas'
    str.extract costs tens of ms here, on every slider move."""
    found = (EXPERT_LAYER.search(name) for name in frame["layer"].tolist())
    return np.array([float(match.group(1)) if match else np.nan for match in found])


def heatmap_rows(frame: pd.DataFrame, separate_experts: bool = True) -> pd.Series:
    """The heatmap row of each layer: its kind, or "gate·e3" for expert 3's gate when experts get rows of their own
    (otherwise all experts of a kind share the kind's row, aggregated)."""
    return _rows_of(frame, expert_numbers(frame), separate_experts)


def _rows_of(frame: pd.DataFrame, experts: np.ndarray, separate_experts: bool) -> pd.Series:
    kinds = frame["kind"].astype(str)
    if not separate_experts or np.isnan(experts).all():
        return kinds
    return kinds + pd.Series(["" if np.isnan(e) else f"·e{int(e)}" for e in experts], index=frame.index)


def _row_order(frame: pd.DataFrame, rows: pd.Series, experts: np.ndarray) -> list[str]:
    """Rows by kind (q … down), each kind's experts in index order after its layer outside the experts (if any)."""
    rank = {kind: i for i, kind in enumerate(KIND_ORDER)}
    keys = {row: (rank.get(kind, len(rank)), -1 if np.isnan(e) else e)
            for row, kind, e in zip(rows.tolist(), frame["kind"].tolist(), experts)}
    return sorted(keys, key=keys.get)


@dataclass(frozen=True)
class Cells:
    """The heatmap cells of a layer table, rows and blocks in display order. `layers`: the table with each layer's
    "row"; `table`: one entry per cell with "row", "block", "count" (its layers) and the aggregated columns; `shared`:
    some cell holds several layers (a mixture's experts sharing their kind's row)."""

    layers: pd.DataFrame
    table: pd.DataFrame
    rows: list[str]
    blocks: list[int]
    shared: bool

    def grid(self, column: str, fill=np.nan) -> np.ndarray:
        """`column` of `table` laid out as rows × blocks (`fill` where a cell is missing)."""
        values = self.table[column].to_numpy()
        grid = np.full((len(self.rows), len(self.blocks)), fill,
                       dtype=float if values.dtype.kind in "iuf" and fill is np.nan else object)
        grid[pd.Index(self.rows).get_indexer(self.table["row"]), np.searchsorted(self.blocks, self.table["block"])] \
            = values
        return grid


def _cells(frame: pd.DataFrame, separate_experts: bool, aggregations: dict[str, tuple[str, str]]) -> Cells:
    """The cells of `frame`; where a cell holds several layers, `aggregations` (pandas named aggregations, built-in
    reductions only) reduce them. Without shared cells the layers are the cells: no groupby, since these grids are
    rebuilt on every slider move."""
    experts = expert_numbers(frame)
    layers = frame.assign(row=_rows_of(frame, experts, separate_experts))
    rows = _kinds(frame) if np.isnan(experts).all() else _row_order(frame, layers["row"], experts)
    blocks = sorted(set(frame["block"].tolist()))
    shared = bool(layers.duplicated(["row", "block"]).any())
    if shared:
        table = layers.groupby(["row", "block"], sort=False).agg(**aggregations, count=("layer", "size"))
        table = table.reset_index()
    else:
        # A cell of one layer: its value under every reduction, except a count of distinct values (1).
        table = layers.assign(count=1, **{name: 1 if how == "nunique" else layers[column]
                                          for name, (column, how) in aggregations.items()})
    return Cells(layers, table, rows, blocks, shared)


def _grid_layout(title: str, rows: list[str], blocks: list[int]) -> dict:
    """Shared layout of the block × projection heatmaps: integer block ticks (no block 0.5), q at the top; with many
    rows (one per expert) taller, thinner rows and a labelled subset (each kind's first row and every n-th expert)."""
    dtick = 1 if len(blocks) <= 16 else 2 if len(blocks) <= 40 else 5
    yaxis = {"title": "projection", "type": "category"}
    height = 330
    if len(rows) > 10:
        height = int(min(1400, 150 + len(rows) * max(3.0, min(16.0, 1200 / len(rows)))))
        step = max(1, len(rows) // 40)
        shown = [row for i, row in enumerate(rows) if "·e" not in row or row.endswith("·e0") or i % step == 0]
        yaxis |= {"tickmode": "array", "tickvals": shown, "ticktext": shown}
    # Both ranges fixed to the cells: plotly pads its autorange for the plan heatmap's clickable markers, which ran
    # the block axis from -2.
    yaxis |= {"autorange": False, "range": [len(rows) - 0.5, -0.5]}
    return {"title": chart_title(title), "height": height, "margin": {"t": 70, "b": 40},
            "xaxis": {"title": "block", "tickmode": "linear", "tick0": blocks[0] if blocks else 0, "dtick": dtick,
                      "range": [blocks[0] - 0.5, blocks[-1] + 0.5] if blocks else None}, "yaxis": yaxis}


def sensitivity_heatmap(layers: pd.DataFrame, metric: str, title: str | None = None,
                        separate_experts: bool = True) -> go.Figure:
    """Blocks × projection types, coloured by log10 of `metric`; hover shows the exact value and the layer name.

    A mixture's experts get a row each ("gate·e3"), or with `separate_experts` False share their kind's row, coloured
    by the mean over the block's experts (our choice: per-expert values are comparable, a sum would grow with the
    expert count), the hover giving their range."""
    cells = _cells(layers, separate_experts, {"value": (metric, "mean"), "low": (metric, "min"),
                                              "high": (metric, "max"), "layer": ("layer", "first")})
    table = cells.table
    if cells.shared:
        table["layer"] = [name if count == 1 else f"mean of {count} experts (min {low:.4g}, max {high:.4g})"
                          for name, count, low, high in zip(table["layer"], table["count"], table["low"],
                                                             table["high"])]
    values, names = cells.grid("value"), cells.grid("layer", fill="")
    with np.errstate(divide="ignore", invalid="ignore"):
        log_values = np.log10(values)
    log_values[~np.isfinite(log_values)] = np.nan
    return go.Figure(go.Heatmap(
        z=log_values, x=cells.blocks, y=cells.rows, customdata=np.dstack([values.astype(object), names]),
        colorscale="Viridis", colorbar={"title": "log₁₀"},
        hovertemplate="block %{x} · %{y}<br>%{customdata[1]}<br>value %{customdata[0]:.4g}<extra></extra>"),
        _grid_layout(title or METRIC_LABELS.get(metric, metric), cells.rows, cells.blocks))


def _width_of_most_experts(cells: Cells) -> None:
    """For cells holding several experts: "bits" becomes the width most of them have (ties: the wider), "mix" their
    widths for the hover ("(most experts) — 2 bit ×3, 4 bit ×5", or "(all 8 experts)")."""
    counts = cells.layers.groupby(["row", "block", "bits"], sort=False).size().rename("n").reset_index()
    mode = counts.sort_values(["n", "bits"]).drop_duplicates(["row", "block"], keep="last").set_index(["row", "block"])
    mixes: dict[tuple, list[str]] = {}
    for row, block, bits, n in counts.sort_values("bits").itertuples(index=False):
        mixes.setdefault((row, block), []).append(f"{'FP16' if bits == 16 else f'{bits} bit'} ×{n}")
    keys = list(zip(cells.table["row"], cells.table["block"]))
    cells.table["bits"] = mode["bits"].reindex(keys).to_numpy()
    cells.table["mix"] = ["" if count == 1 else f" (all {count} experts)" if len(mixes[key]) == 1
                          else " (most experts) — " + ", ".join(mixes[key])
                          for key, count in zip(keys, cells.table["count"])]


def _group_labels(table: pd.DataFrame, short: bool) -> list[str]:
    """Each cell's group size: " · groups of 64" / " · per channel" / " · mixed groups" (experts on several), or
    `short` "g64" / "ch" / "mix"; "" for a cell kept in full precision."""
    words = ("g{}", "ch", "mix") if short else (" · groups of {}", " · per channel", " · mixed groups")
    return ["" if bits == 16 else words[2] if n > 1 else words[1] if group == 0 else words[0].format(int(group))
            for bits, group, n in zip(table["bits"], table["group"], table["groups"])]


def plan_heatmap(plan: pd.DataFrame, title: str = "bits per layer", selectable: bool = False,
                 pinned: frozenset[str] = frozenset(), separate_experts: bool = True) -> go.Figure:
    """Blocks × projection types coloured by the plan's bit width (one fixed colour per width, BIT_COLORS).

    `pinned` layers carry a black ring, so a pinned cell never looks like one the solver chose. `selectable` overlays
    one invisible square marker per cell: plotly selects scatter points but not heatmap cells, so clicks and box
    selections land on the markers (a selected cell shows a dark square; shift-click adds). A mixture's experts get a
    row each, or with `separate_experts` False share their kind's row, coloured by the width most of them have, the
    hover listing the widths, and a cross marking cells whose experts differ. With a "group" column (the group size
    of each layer) the hover names each cell's group size, and a plan on several group sizes writes them in the cells.
    """
    grouped = "group" in plan.columns
    cells = _cells(plan, separate_experts, {"bits": ("bits", "max"), "widths": ("bits", "nunique")}
                   | ({"group": ("group", "max"), "groups": ("group", "nunique")} if grouped else {}))
    if cells.shared:
        _width_of_most_experts(cells)
    else:
        cells.table["mix"] = ""
    for column, short in (("group_hover", False), ("group_label", True)):
        cells.table[column] = _group_labels(cells.table, short) if grouped else ""
    bits, mix, blocks, rows = cells.grid("bits"), cells.grid("mix", fill=""), cells.blocks, cells.rows
    group_hover = cells.grid("group_hover", fill="")
    widths = sorted({int(b) for b in plan["bits"]})
    steps = max(len(widths), 1)
    # Each width sits in the middle of its own colour band, so the scale is discrete and stable per width.
    band = np.searchsorted(widths, np.nan_to_num(bits, nan=-1)) + 0.5
    band[np.isnan(bits)] = np.nan
    scale = [[(i + edge) / steps, BIT_COLORS.get(w, "#cccccc")] for i, w in enumerate(widths) for edge in (0, 1)]
    hover = "block %{x} · %{y}: %{customdata[0]} bits%{customdata[2]}%{customdata[1]}<extra></extra>"
    # A plan of (bits, group size) pairs writes each cell's group size in it: colour alone would hide half the choice.
    labels = ({"text": cells.grid("group_label", fill=""), "texttemplate": "%{text}",
               "textfont": {"size": 9, "color": "#222"}} if grouped and plan["group"].nunique() > 1 else {})
    traces = [go.Heatmap(z=band, x=blocks, y=rows, customdata=np.dstack([bits.astype(object), mix, group_hover]),
                         zmin=0, zmax=steps, colorscale=scale or "Greys",
                         colorbar={"tickvals": [i + 0.5 for i in range(steps)],
                                   "ticktext": ["FP16" if w == 16 else f"{w} bit" for w in widths]},
                         hovertemplate=hover, hoverinfo="skip" if selectable else None, xgap=1, ygap=1, **labels)]
    mixed = cells.table[cells.table["widths"] > 1]
    if not mixed.empty:
        traces.append(go.Scatter(x=mixed["block"], y=mixed["row"], mode="markers", name="experts differ",
                                 showlegend=True, hoverinfo="skip",
                                 marker={"symbol": "x-thin-open", "size": 10, "color": "#333", "line": {"width": 1}}))
    held = cells.layers[cells.layers["layer"].isin(pinned)]
    if not held.empty:
        traces.append(go.Scatter(x=held["block"], y=held["row"], mode="markers", name="pinned", showlegend=True,
                                 marker={"symbol": "circle-open", "size": 12, "color": "#000", "line": {"width": 2}},
                                 hoverinfo="skip"))
    if selectable:  # hover and clicks go to the markers, one per cell (aggregated experts share one)
        table = cells.table
        traces.append(go.Scatter(
            x=table["block"], y=table["row"],
            customdata=np.column_stack([table["bits"].astype(int), table["mix"], table["group_hover"]]),
            mode="markers", showlegend=False,
            marker={"symbol": "square-open", "size": 18, "color": "#111", "opacity": 0, "line": {"width": 3}},
            selected={"marker": {"opacity": 1}}, unselected={"marker": {"opacity": 0}}, hovertemplate=hover))
    layout = _grid_layout(title, rows, blocks) | {"legend": {"orientation": "h", "y": -0.25}}
    if labels:  # the key to the cells' text, under the title
        layout["title"] |= {"pad": {"b": 28}, "subtitle": {"text": "in each cell its group size: g32 = a scale "
                                                                   "per 32 columns, ch = per output channel",
                                                           "font": {"size": 11}}}
        layout["margin"] = layout["margin"] | {"t": 90}
        layout["height"] += 20
    return go.Figure(traces, layout)


def block_bars(layers: pd.DataFrame, metric: str, label: str | None = None) -> go.Figure:
    """Each block's share of the model's total `metric`, stacked by projection type on a linear axis (a stack on a
    log axis would misstate the parts)."""
    totals = layers.groupby(["block", "kind"], as_index=False)[metric].sum()
    totals = totals.assign(share=100 * totals[metric] / totals[metric].sum())
    figure = px.bar(totals, x="block", y="share", color="kind", category_orders={"kind": _kinds(layers)},
                    hover_data={metric: ":.4g"},
                    labels={"share": "share of the total (%)", metric: label or METRIC_LABELS.get(metric, metric)})
    figure.update_layout(height=340, margin={"t": 70, "b": 40},
                         title=chart_title(f"share per block — {label or METRIC_LABELS.get(metric, metric)}"))
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


# line style and marker per quantization method
QUANT_DASH = {"rtn": "dot", "gptq": "dash", "attention": "solid", "aespa": "dashdot"}
QUANT_SYMBOLS = {"rtn": "square", "gptq": "diamond", "attention": "circle", "aespa": "triangle-up"}
AXIS_LABELS = {"avg_bits": "average bits per weight, whole model",
               "effective_bits": "effective bits per weight (with scales), whole model",
               "covered_avg_bits": "average bits per weight over the covered layers",
               "covered_effective_bits": "effective bits per weight (with scales) over the covered layers",
               "perplexity": "perplexity", "kl": "KL(full precision ‖ quantized), nats/token",
               "top1": "top-1 agreement", PREDICTED_ERROR_ATTENTION: "predicted Σ e (attention-aware)",
               PREDICTED_ERROR_LAYERWISE: "predicted Σ e (layer-wise)"}


def _translucent(color: str | None, alpha: float = 0.15) -> str:
    """A '#rrggbb' colour (grey when None) as rgba with the given opacity: the fill of an uncertainty band."""
    color = color or "#7f7f7f"
    return f"rgba({int(color[1:3], 16)}, {int(color[3:5], 16)}, {int(color[5:7], 16)}, {alpha})"


def _column_or_nan(frame: pd.DataFrame, name: str) -> pd.Series:
    """`frame[name]`, or NaN throughout where the frame has no such column (runs stored before it existed)."""
    return frame[name] if name in frame else pd.Series(np.nan, index=frame.index)


def _band_trace(x: pd.Series, low: pd.Series, high: pd.Series, color: str | None, group: str,
                log: bool) -> go.Scatter | None:
    """A filled band from `low` to `high` along `x`, in the legend group of its line (they show and hide together);
    None where any point lacks a band, or on a log axis where one reaches 0."""
    if low.isna().any() or high.isna().any() or (log and (low <= 0).any()):
        return None
    return go.Scatter(x=[*x, *x[::-1]], y=[*high, *low[::-1]], fill="toself", fillcolor=_translucent(color),
                      line={"width": 0}, mode="lines", hoverinfo="skip", showlegend=False, legendgroup=group)


def tradeoff_curves(runs: pd.DataFrame, y: str = "perplexity", title: str = "", x: str = "covered_avg_bits",
                    baseline: float | None = None, frontier: pd.DataFrame | None = None,
                    current: dict | None = None) -> go.Figure:
    """`y` against bits from stored runs of one run set (aptq.tradeoffs): one line per allocation method (colour) and
    quantizer (aptq.history.quantizer_names; dash and marker by its method), each in its band of ± BAND_Z standard
    errors over the evaluation windows (aptq.tradeoffs.band; none for runs stored before the store kept them);
    `baseline` the full-precision value (a horizontal line); `frontier` the runs nothing beats (a grey step line).
    `current` = {"x", "y", "low", "high", "label"} adds the current plan: a filled star when it was measured (low =
    high = y), an open star with its uncertainty band when estimated, a dotted vertical line when there is neither."""
    figure = go.Figure()
    if frontier is not None and len(frontier) > 1:
        figure.add_trace(go.Scatter(x=frontier[x], y=frontier[y], mode="lines", name="best runs (Pareto frontier)",
                                    line={"color": "#bbbbbb", "width": 8, "shape": "hv"}, hoverinfo="skip"))
    ordered = runs.sort_values(x)
    low, high = band(ordered[y], _column_or_nan(ordered, MEASURE_SE[y]), y)
    for (allocation, quantizer, method), group in ordered.groupby(["allocation", quantizer_names(ordered), "method"],
                                                                  sort=True):
        name, color = f"{allocation} · {quantizer}", METHOD_COLORS.get(str(allocation))
        shade = _band_trace(group[x], low[group.index], high[group.index], color, name, y != "top1")
        if shade is not None:
            figure.add_trace(shade)
        figure.add_trace(go.Scatter(
            x=group[x], y=group[y], mode="lines+markers", name=name, legendgroup=name,
            line={"color": color, "dash": QUANT_DASH.get(str(method), "solid")},
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
                         title=chart_title(title or f"{y} vs bits"),
                         margin={"t": 70}, legend={"title": "allocation · quantization"})
    if y != "top1":
        figure.update_yaxes(log_axis([runs[y], low.dropna(), high.dropna(), [baseline],
                                      [(current or {}).get(k) for k in ("low", "high")]]))
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


def log_axis(parts: list, most_labels: int = 8) -> dict:
    """A log axis over the values of `parts` (_log_range) labelled with whole numbers: 1, 2, 5 × 10^k over up to two
    and a half decades, 1, 3 × 10^k up to three and a half, else powers of ten (every n-th, at most `most_labels`).
    Plotly's own labels between decades are bare digits ("2 3 4 … 9", meaning 0.2 … 0.9 or 20 … 90), crowded and
    ambiguous on a projector. A range holding fewer than two such values keeps plotly's labels."""
    span = _log_range(parts)
    if span is None:
        return {"type": "log"}
    low, high = span
    decades = range(int(np.floor(low)), int(np.ceil(high)) + 1)
    if high - low <= 3.5:
        ticks = [m * 10.0 ** e for e in decades for m in ((1, 2, 5) if high - low <= 2.5 else (1, 3))]
    else:
        stride = int(np.ceil((high - low) / (most_labels - 1)))
        ticks = [10.0 ** e for e in decades if e % stride == 0]
    ticks = [t for t in ticks if low <= np.log10(t) <= high]
    if len(ticks) < 2:
        return {"type": "log", "range": span}
    return {"type": "log", "range": span, "tickmode": "array", "tickvals": ticks,
            "ticktext": [f"{t:,.0f}" if t >= 1 else f"{t:g}" for t in ticks]}


def predicted_curves(curves: pd.DataFrame, current: dict | None = None) -> go.Figure:
    """Predicted total error against bits for every solver (aptq.tradeoffs.predicted_curves), before anything is
    quantized, each in its band of ± BAND_Z standard errors (the unit's, propagated by aptq.allocate.summarize);
    `current` = {"x", "y", "label"} marks the current plan."""
    figure = go.Figure()
    low, high = band(curves[PREDICTED_ERROR_ATTENTION], _column_or_nan(curves, PREDICTED_ERROR_ATTENTION_SE), "kl")
    for solver, group in curves.groupby("solver", sort=False):
        color = METHOD_COLORS.get(str(solver))
        shade = _band_trace(group["avg_bits"], low[group.index], high[group.index], color, str(solver), True)
        if shade is not None:
            figure.add_trace(shade)
        figure.add_trace(go.Scatter(x=group["avg_bits"], y=group[PREDICTED_ERROR_ATTENTION], mode="lines+markers",
                                    name=str(solver), line={"color": color}, legendgroup=str(solver),
                                    hovertemplate="%{x:.3f} bits<br>predicted %{y:.4g}<extra>%{fullData.name}</extra>"))
    if current is not None:
        figure.add_trace(go.Scatter(x=[current["x"]], y=[current["y"]], mode="markers", name=current["label"],
                                    marker={"symbol": "star", "size": 16, "color": "#000"}))
    pairs = PAIRS_SOLVER in set(curves["solver"])
    figure.update_layout(xaxis_title="average bits per weight over the analysed layers"
                         + (f" ({PAIRS_SOLVER}: of a plan in the analysis' groups of the same size)" if pairs else ""),
                         yaxis=log_axis([curves[PREDICTED_ERROR_ATTENTION], low.dropna(), high.dropna(),
                                         [(current or {}).get("y")]])
                         | {"title": AXIS_LABELS[PREDICTED_ERROR_ATTENTION]}, height=400,
                         title=chart_title("predicted error against bits, every solver (from the analysis alone)"),
                         margin={"t": 70}, legend={"title": "solver"})
    return figure


def predicted_vs_measured(runs: pd.DataFrame, measured: str = "kl", protocol: str = "") -> go.Figure:
    """Predicted total error (attention-aware) against a measured quantity, log–log; colour = allocation method,
    symbol = quantization method. Points on a rising line mean the predictions rank plans correctly."""
    figure = px.scatter(runs, x=PREDICTED_ERROR_ATTENTION, y=measured, color="allocation", symbol="method",
                        hover_name="plan_name", hover_data={"avg_bits": ":.3f"}, color_discrete_map=METHOD_COLORS,
                        symbol_map=QUANT_SYMBOLS, log_x=True, log_y=True,
                        labels={k: v for k, v in AXIS_LABELS.items() if k in (PREDICTED_ERROR_ATTENTION, measured)})
    figure.update_xaxes(log_axis([runs[PREDICTED_ERROR_ATTENTION]]))
    figure.update_yaxes(log_axis([runs[measured]]))
    figure.update_layout(height=440, margin={"t": 110}, title=chart_title(
        f"predicted error vs measured {measured}" + (f"<br><sup>{protocol}</sup>" if protocol else "")))
    return figure
