"""The experts toggle on the dashboard's pages, in Streamlit's AppTest on a stored analysis of the tiny Mixtral (four
experts per block): one heatmap row per expert by default, the experts of a kind in one row with the toggle off."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from aptq.data import load_corpus
from aptq.models import load_model
from aptq.sensitivity import analyze
from aptq.store import Store
from ui.session import AnalysisRequest

REQUEST = AnalysisRequest(samples=4, seqlen=64, group_size=32)  # 32 divides the experts' width 96
EXPERT_ROWS = ["q", "k", "v", "o"] + [f"{kind}·e{e}" for kind in ("gate", "up", "down") for e in range(4)]
KIND_ROWS = ["q", "k", "v", "o", "gate", "up", "down"]


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory, tiny_model_dir) -> tuple[Path, str]:
    model = str(tiny_model_dir("mixtral"))
    path = tmp_path_factory.mktemp("analyzed-moe") / "store.duckdb"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # starved experts at 256 calibration tokens
        analyze(load_model(model, device="cpu"), load_corpus("brown"), REQUEST.sampling, REQUEST.settings,
                store=Store(path))
    return path, model


def heatmap_rows(at: AppTest) -> list[list[str]]:
    """The row labels of every heatmap on the page, in order."""
    specs = [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]
    return [trace["y"] for spec in specs for trace in spec["data"][:1] if trace["type"] == "heatmap"]


def test_bit_budget_heatmaps_show_experts_and_the_toggle_aggregates_them(at):
    at.switch_page("pages/2_Bit_budget.py").run()
    assert not at.exception and not at.error
    assert at.toggle(key="separate_experts").value
    assert heatmap_rows(at) == [EXPERT_ROWS, EXPERT_ROWS]  # the plan and the sensitivity
    at.toggle(key="separate_experts").set_value(False).run()
    assert not at.exception and not at.error
    assert heatmap_rows(at) == [KIND_ROWS, KIND_ROWS]


def test_sensitivity_page_has_the_toggle(at):
    at.switch_page("pages/1_Sensitivity.py").run()
    assert not at.exception and not at.error
    assert heatmap_rows(at)[0] == EXPERT_ROWS
    at.toggle(key="separate_experts").set_value(False).run()
    assert heatmap_rows(at)[0] == KIND_ROWS
