"""The dashboard's pages in Streamlit's AppTest on a store holding a real analysis of a tiny model: the slider makes
the plan, pins survive budget changes and page switches, plans are saved, quantized, compared and downloaded."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from aptq import analyses, ranking
from aptq.allocate import PREDICTED_ERROR_ATTENTION
from aptq.data import load_corpus
from aptq.models import load_model, model_fingerprint
from aptq.sensitivity import analyze
from aptq.store import Store
from tests.analyzed import analyzed_tiny_llama
from ui.session import AnalysisRequest

APP = Path(__file__).resolve().parent.parent / "app.py"


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory, tiny_model_dir) -> tuple[Path, str]:
    """A store with a complete analysis of the tiny llama (made once), and the model's directory."""
    return analyzed_tiny_llama(tmp_path_factory, tiny_model_dir)


def texts(elements) -> str:
    return " ".join(str(e.value) for e in elements)


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label.startswith(label))


def button(at: AppTest, label: str):
    return next(b for b in at.button if b.label.startswith(label))


def no_problems(at: AppTest) -> None:
    assert not at.exception, texts(at.exception)
    assert not at.error, texts(at.error)


def set_pins(at: AppTest, edits: dict[int, int]) -> AppTest:
    """Edit the pin column of the pin table (row index → bits), as a person does in the data editor."""
    editor = at.data_editor[0]
    at.session_state[editor.key] = {"edited_rows": {row: {"pin": bits} for row, bits in edits.items()},
                                    "added_rows": [], "deleted_rows": []}
    return at.run()


def test_home_opens_on_the_stored_analysis(at):
    at.run()
    no_problems(at)
    assert "Analysis stored" in texts(at.success) and "4 × 64 calibration tokens" in texts(at.success)
    assert any(s.label == "Heatmap metric" for s in at.selectbox)


def test_sensitivity_page_shows_every_view(at):
    at.switch_page("pages/1_Sensitivity.py").run()
    no_problems(at)
    assert len(at.latex) >= 6 and "(our choice" in texts(at.markdown)
    assert "Spearman rank correlation" in [m.label for m in at.metric]
    at.selectbox(key="sens_metric").set_value("error").run()
    no_problems(at)
    at.selectbox(key="sens_bits").set_value(2).run()
    at.radio(key="sens_hessian").set_value("layerwise").run()
    no_problems(at)
    at.toggle(key="sens_comparable").set_value(False).run()  # the errors as each Hessian measures them
    no_problems(at)


def test_the_rank_table_names_layers_by_block_and_projection(at, analyzed):
    """The table beside the ranking chart keeps the move in view: block and projection instead of the module path,
    then the move, then the two ranks; its rows are the biggest moves of ranking.rank_shifts."""
    at.switch_page("pages/1_Sensitivity.py").run()
    no_problems(at)
    shown = next(d.value for d in at.dataframe if "shift" in d.value.columns)
    assert list(shown.columns) == ["block", "kind", "shift", "rank_x", "rank_y"]
    store = Store(analyzed[0])
    layers, _ = analyses.load(store, analyses.whole_model_keys(store, model_fingerprint(Path(analyzed[1])))[0])
    expected = ranking.rank_shifts(layers, "score_layerwise", "score_attention").merge(
        layers[["layer", "block", "kind"]], on="layer")
    assert shown.reset_index(drop=True).equals(expected[list(shown.columns)].reset_index(drop=True))


def test_the_slider_changes_the_plan(at):
    at.switch_page("pages/2_Bit_budget.py").run()
    no_problems(at)
    assert metric(at, "Average bits") == "3.000"
    first = dict(at.session_state["plan"]["bits"])
    at.slider(key="budget").set_value(4.5).run()
    no_problems(at)
    assert float(metric(at, "Average bits")) == pytest.approx(4.5, abs=0.05)
    second = at.session_state["plan"]["bits"]
    assert second != first and sum(second.values()) > sum(first.values())
    at.slider(key="budget").set_value(3.5)
    at.selectbox(key="method").set_value("aptq").run()
    no_problems(at)
    assert at.session_state["plan"]["method"] == "aptq" and set(at.session_state["plan"]["bits"].values()) <= {2, 4}


def test_a_single_plan_is_not_compared_with_itself(at):
    at.switch_page("pages/2_Bit_budget.py").run()  # the current plan, nothing saved
    at.switch_page("pages/4_Trade_offs.py").run()
    no_problems(at)
    assert "Only one plan so far" in texts(at.info)
    assert "layers differ" not in texts(at.markdown)


def test_a_pin_survives_budget_changes_and_page_switches(at):
    at.switch_page("pages/2_Bit_budget.py").run()
    layer = at.data_editor[0].value["layer"].iloc[0]
    set_pins(at, {0: 8})
    no_problems(at)
    assert at.session_state["pins"] == {layer: 8} and at.session_state["plan"]["bits"][layer] == 8
    for budget in (2.5, 4.0):
        at.slider(key="budget").set_value(budget).run()
        no_problems(at)
        assert at.session_state["pins"] == {layer: 8} and at.session_state["plan"]["bits"][layer] == 8
    at.switch_page("pages/1_Sensitivity.py").run()
    at.switch_page("pages/2_Bit_budget.py").run()
    assert at.slider(key="budget").value == 4.0 and at.session_state["pins"] == {layer: 8}
    assert metric(at, "Average bits") == "4.000"
    button(at, "Clear all pins").click().run()
    no_problems(at)
    assert at.session_state["pins"] == {} and "Pins (0)" in texts(at.subheader)


def test_pins_that_break_the_budget_explain_and_stay_editable(at):
    at.switch_page("pages/2_Bit_budget.py").run()
    set_pins(at, {row: 8 for row in range(len(at.data_editor[0].value))})
    assert "budget" in texts(at.error) and not at.exception
    assert at.data_editor  # the pin table is still there: the person can undo
    set_pins(at, {0: None})
    assert len(at.session_state["pins"]) == len(at.data_editor[0].value) - 1
    button(at, "Clear all pins").click().run()
    no_problems(at)
    assert at.session_state["pins"] == {}


def wait_for_run(at: AppTest, timeout: float = 120) -> AppTest:
    deadline = time.monotonic() + timeout
    while not any(m.label == "Perplexity" for m in at.metric):
        assert not at.error, texts(at.error)
        assert time.monotonic() < deadline, "the quantization run did not finish"
        time.sleep(0.3)
        at.run()
    return at


@pytest.mark.integration
def test_save_quantize_and_compare_plans(at):
    at.switch_page("pages/2_Bit_budget.py").run()
    button(at, "Save plan").click().run()
    assert "Saved plan 'knapsack-3.00'" in texts(at.success)

    at.switch_page("pages/3_Quantize.py").run()
    no_problems(at)
    assert "current plan" in at.selectbox(key="run_plan_choice").format_func("current")
    at.number_input(key="run_seqlen").set_value(64)
    at.number_input(key="run_tokens").set_value(256)
    at.radio(key="run_method").set_value("attention").run()
    at.number_input(key="run_block_steps").set_value(5).run()  # block refinement: 5 steps a block
    button(at, "Quantize and evaluate").click().run()
    wait_for_run(at)
    no_problems(at)
    assert "window 64, 252 predicted tokens" in texts(at.caption)
    at.selectbox(key="run_plan_choice").set_value("uniform").run()
    at.radio(key="run_method").set_value("rtn").run()
    assert "run_block_steps" not in [widget.key for widget in at.number_input]  # RTN fits no data
    settings = Store(os.environ["APTQ_STORE"]).query("SELECT settings FROM runs")["settings"]
    assert [json.loads(text).get("block") for text in settings] == [{"iterations": 5, "learning_rate": None}]
    button(at, "Quantize and evaluate").click().run()
    wait_for_run(at)
    assert len(at.dataframe[-1].value) == 2  # the runs table (the completions table comes first)
    made = at.dataframe[-1].value.set_index("allocation")[["error_source", "error_unit", "quantizer"]]
    assert made.loc["knapsack"].tolist() == ["rtn", "heuristic", "attention + 5 refinement steps"]
    assert made.loc["uniform"].tolist() == ["rtn", "heuristic", "rtn"]

    at.switch_page("pages/4_Trade_offs.py").run()
    no_problems(at)
    assert "2 run(s) covering all 2 blocks under this protocol" in texts(at.caption)
    assert [b.label for b in at.download_button] == ["Plan JSON", "GPTQModel quantize config", "llm-compressor recipe"]
    assert "layers differ" in texts(at.markdown)
    summary = next(d.value for d in at.dataframe if "average bits" in d.value.columns)
    assert not [c for c in summary.columns if "_" in c]  # the plans' numbers named in words
    trust = next(d.value for d in at.dataframe if "runs" in d.value.columns and "quantizer" in d.value.columns)
    assert list(trust.columns) == ["quantizer", "predicted_with", "runs", "spearman_attention_perplexity",
                                   "spearman_layerwise_perplexity"]
    assert list(trust["quantizer"]) == ["attention + 5 refinement steps", "rtn"]  # the refined run ranked apart
    assert list(trust["predicted_with"]) == ["rtn errors, heuristic unit"] * 2
    at.radio(key="trade_y").set_value("kl").run()
    no_problems(at)
    trust = next(d.value for d in at.dataframe if "runs" in d.value.columns and "quantizer" in d.value.columns)
    assert list(trust.columns)[3:] == ["spearman_attention_kl", "spearman_layerwise_kl"]  # the measure on the chart


def test_the_number_box_drives_the_slider_and_uniform_says_it_rounds(at):
    at.switch_page("pages/2_Bit_budget.py").run()
    at.number_input(key="budget_box").set_value(3.4).run()
    no_problems(at)
    assert at.slider(key="budget").value == pytest.approx(3.4)
    assert float(metric(at, "Average bits")) == pytest.approx(3.4, abs=0.05)
    at.slider(key="budget").set_value(2.5)
    at.selectbox(key="method").set_value("uniform").run()
    no_problems(at)
    assert metric(at, "Average bits") == "2.000" and at.number_input(key="budget_box").value == pytest.approx(2.5)
    assert "Uniform plans come in whole widths: 2.50 bits gives every free layer 2 bits" in texts(at.info)


def test_a_shared_url_restores_solver_budget_and_pins(at):
    at.query_params.update({"solver": "aptq", "budget": "3.5", "pins": "0.q=8"})
    at.run()
    at.switch_page("pages/2_Bit_budget.py").run()
    no_problems(at)
    q_layer = next(name for name in at.session_state["plan"]["bits"] if name.endswith("0.self_attn.q_proj"))
    assert at.session_state["plan"]["method"] == "aptq" and at.session_state["budget"] == 3.5
    assert at.session_state["pins"] == {q_layer: 8} and at.session_state["plan"]["bits"][q_layer] == 8
    # (AppTest runs a page without the entry script, so the address bar's update is checked in the browser test.)


def test_a_shared_url_restores_the_analysis_options(at):
    at.query_params.update({"samples": "4", "seqlen": "64", "group": "64", "quantizer_errors": "1",
                            "extra_groups": "32", "calibrate": "1"})
    at.run()
    assert not at.exception, texts(at.exception)
    assert at.checkbox(key="quantizer_errors").value and at.checkbox(key="calibrate_unit").value
    assert at.multiselect(key="extra_group_sizes").value == [32]


def test_a_shared_url_naming_an_error_source_or_unit_the_analysis_lacks_falls_back(at):
    at.query_params.update({"errors": "attention", "unit": "calibrated"})
    at.run()
    at.switch_page("pages/2_Bit_budget.py").run()
    no_problems(at)
    assert at.selectbox(key="error_source").value == "rtn" and at.selectbox(key="error_unit").value == "heuristic"


def test_presentation_mode_leaves_out_the_fine_controls(at):
    at.session_state["presentation"] = True
    at.switch_page("pages/2_Bit_budget.py").run()
    no_problems(at)
    assert not [m for m in at.multiselect if m.label == "Candidate widths"] and at.slider(key="budget")


def session_over(store: Path, monkeypatch, model: str, request: AnalysisRequest) -> AppTest:
    """A session of `model` over a new store holding the analysis `request` asks for."""
    analyze(load_model(model, device="cpu"), load_corpus("brown"), request.sampling, request.settings,
            store=Store(store))
    monkeypatch.setenv("APTQ_STORE", str(store))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.session_state["model_source"] = model
    at.session_state["analysis_request"] = request
    return at


@pytest.fixture
def partial(tmp_path, monkeypatch, tiny_model_dir) -> AppTest:
    """A session over a store whose analysis covers block 0 of the tiny llama's 2 blocks."""
    return session_over(tmp_path / "store.duckdb", monkeypatch, str(tiny_model_dir("llama")),
                        AnalysisRequest(samples=4, seqlen=64, group_size=64, max_blocks=1))


def quantize(at: AppTest, method: str, plan: str = "current", bits: int | None = None) -> AppTest:
    at.switch_page("pages/3_Quantize.py").run()
    at.selectbox(key="run_plan_choice").set_value(plan).run()
    if bits is not None:
        at.selectbox(key="run_uniform_bits").set_value(bits).run()
    at.number_input(key="run_seqlen").set_value(64)
    at.number_input(key="run_tokens").set_value(256)
    at.radio(key="run_method").set_value(method).run()
    button(at, "Quantize and evaluate").click().run()
    return wait_for_run(at)


def test_the_bit_budget_page_plans_bit_and_group_pairs_and_the_run_keeps_them(tmp_path, monkeypatch,
                                                                               tiny_model_dir):
    """An analysis with extra group sizes: choosing several makes the knapsack give each layer a (bits, group size)
    pair within the budget in effective bits; the Quantize page runs the current plan on those groups."""
    store = tmp_path / "store.duckdb"
    at = session_over(store, monkeypatch, str(tiny_model_dir("llama")),
                      AnalysisRequest(samples=4, seqlen=64, group_size=32, max_blocks=1, extra_group_sizes=(16, 0)))
    at.switch_page("pages/2_Bit_budget.py").run()
    at.multiselect(key="group_sizes").set_value([32, 16, 0]).run()
    no_problems(at)
    assert "the budget counts effective bits" in texts(at.caption)
    plan = at.session_state["plan"]
    assert plan["layer_groups"] and float(metric(at, "Effective bits (analysed layers)")) <= 3.0 + 1e-3
    quantize(at, "rtn")
    no_problems(at)
    (settings,) = Store(store).query("SELECT settings FROM runs")["settings"]
    assert json.loads(settings)["layer_groups"] == {name: group for name, group in plan["layer_groups"]}
    at.switch_page("pages/4_Trade_offs.py").run()  # the predicted curves add the pairs knapsack
    no_problems(at)
    assert "knapsack-pairs: the knapsack giving each layer a (bits, group size) pair" in texts(at.caption)


def session_with_grid_multiples(tmp_path, monkeypatch, tiny_model_dir, per_channel: dict[int, float]):
    """A session over a tiny llama analysed in groups of 32 and per channel, with RTN width multiples stored for both
    grids (groups of 32: 2 bits ×2, else ×1; per channel: `per_channel`), run once: (app test, store path, layers,
    errors)."""
    from aptq.calibrate import WidthCalibration, width_settings
    from aptq.pipeline import QuantizeSettings

    store = tmp_path / "store.duckdb"
    request = AnalysisRequest(samples=4, seqlen=64, group_size=32, max_blocks=1, extra_group_sizes=(0,))
    at = session_over(store, monkeypatch, str(tiny_model_dir("llama")), request)
    layers, errors = analyze(load_model(str(tiny_model_dir("llama")), device="cpu"), load_corpus("brown"),
                             request.sampling, request.settings, store=Store(store))  # stored: read back
    key = layers.attrs["analysis_key"]
    for group, multiples in ((32, {2: 2.0, 3: 1.0, 4: 1.0}), (0, per_channel)):
        how = width_settings(QuantizeSettings("rtn", group))
        for bits, multiple in multiples.items():
            analyses.write_width(Store(store), WidthCalibration(key, "heuristic", "rtn", how, bits, multiple, 1.0,
                                                                1.0))
    at.run()
    return at, store, layers, errors


def test_grid_multiples_price_the_pairs_the_bit_budget_page_plans(tmp_path, monkeypatch, tiny_model_dir):
    """Multiples stored for groups of 32 and per channel: one choice carrying both, and with both group sizes chosen
    the plan's predicted total charges each layer its grid's multiple."""
    from aptq.allocate import AllocationRequest, Plan, pair_candidates, summarize

    at, _, layers, errors = session_with_grid_multiples(tmp_path, monkeypatch, tiny_model_dir,
                                                        {2: 50.0, 3: 5.0, 4: 3.0})
    at.switch_page("pages/2_Bit_budget.py").run()
    at.multiselect(key="group_sizes").set_value([32, 0]).run()
    label = "measured with rtn: 2 bits ×2, 3 bits ×1, 4 bits ×1; per channel: 2 ×50, 3 ×5, 4 ×3"
    assert at.selectbox(key="width_multiples").options == ["none", label]
    at.selectbox(key="width_multiples").set_value(label).run()
    no_problems(at)
    plan = at.session_state["plan"]
    assert plan["summary"]["error_unit"] == "heuristic × width multiples per grid"
    charged = AllocationRequest(3.0, candidates=pair_candidates((2, 3, 4), (32, 0)), group_size=32,
                                width_multiples={2: 2.0, 3: 1.0, 4: 1.0}, grid_multiples={0: {2: 50.0, 3: 5.0, 4: 3.0}})
    groups = {name: 32 for name in plan["bits"]} | dict(plan["layer_groups"])
    expected = summarize(Plan(plan["bits"], charged, group_sizes=groups), layers, errors)
    assert plan["summary"][PREDICTED_ERROR_ATTENTION] == pytest.approx(expected[PREDICTED_ERROR_ATTENTION])


def test_the_trade_offs_sweep_plans_pairs_priced_by_the_chosen_multiples(tmp_path, monkeypatch, tiny_model_dir):
    """The sweep section offers what `aptq sweep --pairs --width-multiples` does: with both group sizes and the
    stored multiples chosen, a solver that cannot take pairs is refused in one sentence, and the knapsack's plan is
    saved with its layers' group sizes and the multiples in its unit, then measured on them."""
    at, store, _, _ = session_with_grid_multiples(tmp_path, monkeypatch, tiny_model_dir, {2: 1.5, 3: 1.0, 4: 1.0})
    at.switch_page("pages/4_Trade_offs.py").run()
    at.multiselect(key="sweep_groups").set_value([32, 0]).run()
    label = "measured with rtn: 2 bits ×2, 3 bits ×1, 4 bits ×1; per channel: 2 ×1.5, 3 ×1, 4 ×1"
    assert at.selectbox(key="sweep_multiples").options == ["none", label]
    at.selectbox(key="sweep_multiples").set_value(label)
    at.text_input(key="sweep_budgets").set_value("3")
    at.number_input(key="sweep_tokens").set_value(256).run()
    button(at, "Measure the sweep").click().run()
    assert texts(at.error) == ("(bits, group size) pairs are for the knapsack solvers (knapsack, knapsack-layerwise), "
                               "not uniform: leave it out of the solvers, or keep one group size.")
    at.multiselect(key="sweep_methods").set_value(["knapsack"]).run()
    button(at, "Measure the sweep").click().run()
    deadline = time.monotonic() + 300
    while not (at.success or at.error or at.exception) and time.monotonic() < deadline:
        time.sleep(2)
        at.run()
    no_problems(at)
    assert "sweep of 1 plans here: 1 points measured or found stored" in texts(at.success)
    plans = Store(store).query("SELECT summary, layer_groups FROM plans")
    (summary,) = [json.loads(s) for s in plans["summary"]]
    assert summary["error_unit"] == "heuristic × width multiples per grid" and summary["grid_multiples"]
    chosen = dict(json.loads(plans["layer_groups"][0]))
    assert chosen and set(chosen.values()) == {0}  # some layers per channel, the rest in the groups of 32
    (settings,) = Store(store).query("SELECT settings FROM runs")["settings"]
    assert json.loads(settings)["layer_groups"] == chosen


def test_a_saved_plan_of_bit_and_group_pairs_runs_on_its_own_group_sizes(partial, tiny_model_dir):
    """A plan that `aptq sweep --pairs` saved: the Quantize page keeps each layer's group size (the group choice is
    locked to the plan's) instead of running every layer at one."""
    from aptq import history

    at = partial
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    layers = loaded.arch.block_layers(0)
    plan = {layer.name: 3 for layer in layers}
    layer_groups = tuple(sorted((layer.name, 16) for layer in layers if layer.kind in ("q", "k")))
    key = history.save_plan(Store(os.environ["APTQ_STORE"]), model_fingerprint(loaded.path), "pairs", plan,
                            {"allocation": "knapsack", "budget": 3.5, "group_size": 64, "layer_groups": layer_groups})
    quantize(at, "rtn", key)
    no_problems(at)
    assert at.selectbox(key="run_group").disabled and "This plan gives 2 layers their own group size" in \
        texts(at.caption)
    (settings,) = Store(os.environ["APTQ_STORE"]).query("SELECT settings FROM runs")["settings"]
    assert json.loads(settings)["layer_groups"] == dict(layer_groups)


@pytest.mark.integration
def test_a_partial_analysis_quantizes_and_compares_only_the_analysed_blocks(partial):
    at = partial
    at.switch_page("pages/2_Bit_budget.py").run()
    no_problems(at)
    assert "covers blocks" not in texts(at.warning) and "block 0 only" in texts(at.warning)
    assert "average bits over the whole model" in texts(at.warning)
    quantize(at, "rtn", "uniform", 3)
    no_problems(at)
    assert metric(at, "Average bits (block 0 of 2)") == "3.000"
    assert metric(at, "Average bits (whole model)") == "9.500"  # two equal blocks, the second in FP16
    assert "stay in FP16, so the whole model averages 9.500 bits" in texts(at.info)
    quantize(at, "rtn")  # the Bit budget page's knapsack plan at 3 bits
    runs = Store(os.environ["APTQ_STORE"]).query("SELECT coverage, covered_avg_bits, analysis, "
                                                 f"{PREDICTED_ERROR_ATTENTION} FROM runs")
    assert set(runs["coverage"]) == {"block 0 of 2"} and runs[PREDICTED_ERROR_ATTENTION].notna().all()
    assert runs["analysis"].nunique() == 1
    at.switch_page("pages/4_Trade_offs.py").run()
    no_problems(at)
    assert "2 run(s) covering block 0 of 2 under this protocol" in texts(at.caption)


def test_width_multiples_are_measured_from_the_bit_budget_page(tmp_path, monkeypatch, tiny_model_dir):
    """Too few calibration segments: one sentence saying so, no button. Enough: Measure runs calibrate_widths as a
    job, stores one multiple per width (the same as the backend computes), and the choice offers them at once."""
    from aptq.calibrate import calibrate_widths
    from aptq.pipeline import QuantizeSettings

    model = str(tiny_model_dir("llama"))
    store = tmp_path / "store.duckdb"
    monkeypatch.setenv("APTQ_STORE", str(store))
    for samples in (4, 8):
        request = AnalysisRequest(samples=samples, seqlen=64, group_size=64, max_blocks=1)
        analyze(load_model(model, device="cpu"), load_corpus("brown"), request.sampling, request.settings,
                store=Store(store))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.session_state["model_source"] = model
    at.session_state["analysis_request"] = AnalysisRequest(samples=4, seqlen=64, group_size=64, max_blocks=1)
    at.run()
    at.switch_page("pages/2_Bit_budget.py").run()
    no_problems(at)
    assert "too few to hold out" in texts(at.info) and not any(b.key == "measure_widths" for b in at.button)
    at.session_state["analysis_request"] = AnalysisRequest(samples=8, seqlen=64, group_size=64, max_blocks=1)
    at.run()
    no_problems(at)
    assert not [s for s in at.selectbox if s.key == "width_multiples"]
    at.button(key="measure_widths").click().run()
    deadline = time.monotonic() + 120
    while not [s for s in at.selectbox if s.key == "width_multiples"]:
        assert not at.error, texts(at.error)
        assert time.monotonic() < deadline, "the width multiples were not measured"
        time.sleep(0.3)
        at.run()
    no_problems(at)
    (label,) = at.selectbox(key="width_multiples").options[1:]
    assert label.startswith("measured with rtn: 2 bits ×") and "4 bits ×" in label
    loaded = load_model(model, device="cpu")
    layers, errors = analyses.load(Store(store), at.session_state["plan"]["analysis"])
    table = calibrate_widths(loaded, load_corpus("brown"), request.sampling, layers, errors,
                             QuantizeSettings("rtn", 64), (2, 3, 4), Store(store))  # stored: read back, not remeasured
    assert label == "measured with rtn: " + ", ".join(f"{r.bits} bits ×{r.multiple:.3g}" for r in table.itertuples())
    assert "Measured: 2 bits ×" in texts(at.success)


def test_measured_width_multiples_are_offered_and_charged(tmp_path, monkeypatch, tiny_model_dir):
    """Width multiples stored for the analysis (aptq sweep --width-multiples) appear as a choice, and the plan then
    charges them: its predicted error is in the multiplied unit, a 2-bit multiple of 100 raising it."""
    from aptq.allocate import AllocationRequest, Plan, summarize
    from aptq.calibrate import WidthCalibration, width_settings
    from aptq.pipeline import QuantizeSettings

    model = str(tiny_model_dir("llama"))
    request = AnalysisRequest(samples=4, seqlen=64, group_size=64, max_blocks=1)
    store = tmp_path / "store.duckdb"
    layers, errors = analyze(load_model(model, device="cpu"), load_corpus("brown"), request.sampling,
                             request.settings, store=Store(store))
    how = width_settings(QuantizeSettings("gptq", 64))
    for bits, multiple in ((2, 100.0), (3, 1.0), (4, 1.0)):
        analyses.write_width(Store(store), WidthCalibration(layers.attrs["analysis_key"], "heuristic", "rtn", how,
                                                            bits, multiple, 1.0, 1.0))
    monkeypatch.setenv("APTQ_STORE", str(store))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.session_state["model_source"] = model
    at.session_state["analysis_request"] = request
    at.run()
    at.switch_page("pages/2_Bit_budget.py").run()
    at.slider(key="budget").set_value(3.0).run()
    no_problems(at)
    choice = at.selectbox(key="width_multiples")
    label = "measured with gptq: 2 bits ×100, 3 bits ×1, 4 bits ×1"
    assert choice.options == ["none", label] and choice.value == "none"
    plain = at.session_state["plan"]
    choice.set_value(label).run()
    no_problems(at)
    charged = at.session_state["plan"]
    assert charged["summary"]["error_unit"] == "heuristic × width multiples"
    assert charged["summary"]["width_multiples"] == {2: 100.0, 3: 1.0, 4: 1.0}
    assert charged["bits"] == plain["bits"] and 2 in charged["bits"].values()  # the tiny model's q/k stay cheapest
    multiples = {2: 100.0, 3: 1.0, 4: 1.0}
    request = AllocationRequest(3.0, group_size=64, width_multiples=multiples)
    expected = summarize(Plan(charged["bits"], request), layers, errors)
    assert charged["summary"][PREDICTED_ERROR_ATTENTION] == pytest.approx(expected[PREDICTED_ERROR_ATTENTION])
    assert charged["summary"][PREDICTED_ERROR_ATTENTION] > plain["summary"][PREDICTED_ERROR_ATTENTION]
    shared = AppTest.from_file(str(APP), default_timeout=60)
    shared.session_state["model_source"] = model
    shared.query_params.update({"samples": "4", "seqlen": "64", "group": "64", "blocks": "1",
                                "multiples": label})
    shared.run()
    shared.switch_page("pages/2_Bit_budget.py").run()
    no_problems(shared)
    assert shared.selectbox(key="width_multiples").value == label  # a shared link restores the choice
