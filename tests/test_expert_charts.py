"""Heatmaps of mixtures of experts (aptq.charts): one row per expert, or the experts of a kind aggregated in its row.

The layer tables come from the real adapter on tiny Mixtral and Qwen3-MoE configs (built on the meta device, no
weights); the values are set by the tests so that every cell's expected content is known.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from aptq import charts
from aptq.models import architecture_of
from tests.tiny_models import tiny_config

EXPERTS = 4  # tiny Mixtral's


def layer_frame(family: str, **overrides) -> pd.DataFrame:
    config = tiny_config(family)
    for name, value in overrides.items():
        setattr(config, name, value)
    arch = architecture_of(config)
    frame = pd.DataFrame([{"block": layer.block, "kind": layer.kind, "layer": layer.name, "expert": layer.expert}
                          for layer in arch.layers])
    return frame.assign(score=np.arange(1.0, len(frame) + 1))  # a distinct value per layer


def cell(figure_trace, row: str, block: int):
    return figure_trace.z[list(figure_trace.y).index(row)][list(figure_trace.x).index(block)]


def test_each_expert_gets_a_row_holding_its_own_value():
    frame = layer_frame("mixtral")
    heat = charts.sensitivity_heatmap(frame, "score").data[0]
    experts = [f"{kind}·e{e}" for kind in ("gate", "up", "down") for e in range(EXPERTS)]
    assert list(heat.y) == ["q", "k", "v", "o"] + experts
    for layer in frame.itertuples():  # no expert's value hides another's
        row = layer.kind if pd.isna(layer.expert) else f"{layer.kind}·e{int(layer.expert)}"
        assert cell(heat, row, layer.block) == pytest.approx(np.log10(layer.score))
    assert charts.heatmap_rows(frame).tolist() == [
        kind if pd.isna(e) else f"{kind}·e{int(e)}" for kind, e in zip(frame["kind"], frame["expert"])]


def test_aggregated_experts_show_their_mean_and_range():
    frame = layer_frame("mixtral")
    heat = charts.sensitivity_heatmap(frame, "score", separate_experts=False).data[0]
    assert list(heat.y) == ["q", "k", "v", "o", "gate", "up", "down"]
    gates = frame[(frame.kind == "gate") & (frame.block == 1)].score
    assert len(gates) == EXPERTS
    assert cell(heat, "gate", 1) == pytest.approx(np.log10(gates.mean()))
    hover = heat.customdata[list(heat.y).index("gate")][1][1]
    assert hover == f"mean of {EXPERTS} experts (min {gates.min():.4g}, max {gates.max():.4g})"
    assert cell(heat, "q", 1) == pytest.approx(np.log10(frame[(frame.kind == "q") & (frame.block == 1)].score.item()))


def test_aggregated_plan_cell_has_the_width_of_most_experts_and_marks_mixed_cells():
    frame = layer_frame("mixtral")
    gate = (frame.kind == "gate") & (frame.block == 0)
    up = (frame.kind == "up") & (frame.block == 0)
    bits = np.full(len(frame), 4)
    bits[np.flatnonzero(gate)[:3]] = 2  # three experts at 2 bits, one at 4
    bits[np.flatnonzero(up)[:2]] = 3  # a tie, 3 against 4: the wider width colours the cell
    plan = frame.assign(bits=bits)
    figure = charts.plan_heatmap(plan, selectable=True, separate_experts=False)
    heat, crosses, markers = figure.data
    assert crosses.name == "experts differ"
    assert sorted(zip(crosses.x, crosses.y)) == [(0, "gate"), (0, "up")]
    widths = {(int(x), y): (int(c[0]), c[1]) for x, y, c in zip(markers.x, markers.y, markers.customdata)}
    assert len(widths) == 2 * 7  # one selectable marker per cell
    assert widths[(0, "gate")] == (2, " (most experts) — 2 bit ×3, 4 bit ×1")
    assert widths[(0, "up")][0] == 4 and widths[(1, "gate")] == (4, f" (all {EXPERTS} experts)")
    assert widths[(1, "q")] == (4, "")
    # Selecting an aggregated cell selects every expert in it (the mapping the Bit budget page uses).
    rows = charts.heatmap_rows(plan, separate_experts=False)
    chosen = plan.layer[(plan.block == 0) & (rows == "gate")]
    assert chosen.tolist() == plan.layer[gate].tolist()


def test_pins_of_experts_ring_their_own_rows():
    plan = layer_frame("mixtral").assign(bits=4)
    pinned = frozenset(plan.layer[(plan.kind == "down") & (plan.block == 1)][:1])
    rings = charts.plan_heatmap(plan, pinned=pinned).data[1]
    assert rings.name == "pinned" and list(zip(rings.x, rings.y)) == [(1, "down·e0")]


def test_128_experts_stay_readable_and_aggregate_to_the_kinds():
    frame = layer_frame("qwen3_moe", num_experts=128, num_experts_per_tok=8)
    figure = charts.sensitivity_heatmap(frame, "score")
    assert len(figure.data[0].y) == 4 + 3 * 128
    labels = list(figure.layout.yaxis.tickvals)
    assert len(labels) <= 50 and {"q", "gate·e0", "up·e0", "down·e0"} <= set(labels)
    assert 330 < figure.layout.height <= 1400
    aggregated = charts.plan_heatmap(frame.assign(bits=3), separate_experts=False)
    assert list(aggregated.data[0].y) == ["q", "k", "v", "o", "gate", "up", "down"]
    assert aggregated.layout.height == 330 and len(aggregated.data) == 1  # no mixed cells, no pins


def test_a_dense_model_keeps_one_row_per_kind():
    frame = layer_frame("llama")
    for figure in (charts.sensitivity_heatmap(frame, "score"), charts.plan_heatmap(frame.assign(bits=4))):
        assert list(figure.data[0].y) == ["q", "k", "v", "o", "gate", "up", "down"]
        assert figure.layout.height == 330
    assert np.isnan(charts.expert_numbers(frame)).all()


def test_a_plan_of_bits_and_group_sizes_writes_each_cells_group_in_it():
    frame = layer_frame("mixtral")
    group = np.select([frame.kind == "q", frame.kind == "down"], [32, 0], 64)
    group[np.flatnonzero((frame.kind == "up") & (frame.block == 1))[:1]] = 32  # one expert of a cell on another size
    plan = frame.assign(bits=np.where(frame.kind == "k", 16, 3), group=group)
    heat, markers = charts.plan_heatmap(plan, selectable=True, separate_experts=False).data
    labels = {(int(x), y): heat.text[list(heat.y).index(y)][list(heat.x).index(x)]
              for x, y in zip(markers.x, markers.y)}
    assert labels[(0, "q")] == "g32" and labels[(0, "down")] == "ch" and labels[(0, "v")] == "g64"
    assert labels[(0, "k")] == ""  # full precision has no groups
    assert labels[(1, "up")] == "mix" and labels[(0, "up")] == "g64"
    hovers = {(int(x), y): c[2] for x, y, c in zip(markers.x, markers.y, markers.customdata)}
    assert hovers[(0, "q")] == " · groups of 32" and hovers[(0, "down")] == " · per channel"
    assert hovers[(1, "up")] == " · mixed groups"
    assert "g32 = a scale per 32 columns" in charts.plan_heatmap(plan).layout.title.subtitle.text  # the key
    # One group size throughout: the hover still names it, the cells stay clean.
    one = charts.plan_heatmap(plan.assign(group=64)).data[0]
    assert one.text is None and one.customdata[0][0][2] == " · groups of 64"
    assert not charts.plan_heatmap(plan.assign(group=64)).layout.title.subtitle.text
