"""Home asks for what `aptq analyze` can: quantizer errors, extra group sizes and the calibrated unit reach the stored
analysis, the pages that use them offer them, and an option the command line would refuse is refused before anything
starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from aptq import analyses
from aptq.calibrate import UnitSettings
from aptq.store import Store, default_path
from tests.analyzed import analyzed_tiny_llama
from tests.test_app_home import run_until, texts


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory, tiny_model_dir) -> tuple[Path, str]:
    """A store with an analysis of the tiny llama at 4 × 64 without the options, and the model's directory."""
    return analyzed_tiny_llama(tmp_path_factory, tiny_model_dir)


def start_button(at: AppTest):
    return next(b for b in at.button if b.label.startswith("Start / resume"))


def test_an_option_the_command_line_refuses_is_one_error_and_starts_nothing(at):
    at.run()
    at.multiselect(key="extra_group_sizes").set_value([128]).run()  # the tiny llama's layers read 64 or 96 columns
    assert [e.value for e in at.error] == [
        "The group size 128 does not divide the 64 input columns of model.layers.0.self_attn.q_proj; use a divisor of "
        "32 (every layer's d_in is a multiple of it) or 0 (per channel)."]
    assert start_button(at).disabled and not at.exception
    at.multiselect(key="extra_group_sizes").set_value([]).run()
    at.checkbox(key="calibrate_unit").check().run()  # 4 calibration segments: too few to hold out a validation part
    assert len(at.error) == 1 and at.error[0].value.startswith("The calibration has 4 segment(s), too few to hold out")
    assert start_button(at).disabled
    statuses = Store(default_path()).query("SELECT status FROM analyses")["status"].tolist()
    assert statuses == ["complete"]  # only the fixture's analysis: nothing was started


@pytest.mark.integration  # a whole analysis with quantizer errors and the unit: 28 s at load 7.7 on 2 cores
def test_each_option_reaches_the_stored_analysis_and_the_pages_that_use_it(at):
    at.run()
    at.number_input(key="calib_samples").set_value(8)
    at.number_input(key="calib_seqlen").set_value(32)
    at.number_input(key="max_blocks").set_value(1)
    at.checkbox(key="quantizer_errors").check()
    at.multiselect(key="extra_group_sizes").set_value([32])
    at.checkbox(key="calibrate_unit").check().run()
    assert not at.error and "errors of GPTQ and attention-aware GPTQ, errors also at groups 32, calibrated unit" \
        in texts(at.info)
    start_button(at).click().run()
    run_until(at, lambda at: "Analysis stored" in texts(at.success) or at.error)
    assert not at.error and not at.exception, texts(at.error)
    request = at.session_state["analysis_request"]
    key, stored = Store(default_path()).query("SELECT key, settings FROM analyses ORDER BY updated DESC").iloc[0]
    settings = json.loads(stored)
    assert settings["quantizer_errors"] is True and settings["extra_group_sizes"] == [32]
    assert settings["group_size"] == request.group_size == 64 and settings["max_blocks"] == 1
    units = analyses.load_units(Store(default_path()), UnitSettings(seed=request.seed).key(key))
    assert len(units) == 7 and (units["kl_rate"] >= 0).all()  # every layer of block 0

    at.switch_page("pages/2_Bit_budget.py").run()
    assert not at.error and not at.exception, texts(at.error)
    assert at.selectbox(key="error_source").options == ["RTN", "GPTQ", "attention-aware GPTQ (BoA)"]
    assert at.selectbox(key="error_unit").options == ["heuristic", "calibrated"]
    at.selectbox(key="error_source").set_value("attention")
    at.selectbox(key="error_unit").set_value("calibrated").run()
    assert not at.error and not at.exception, texts(at.error)
    plan = at.session_state["plan"]
    assert (plan["summary"]["error_source"], plan["summary"]["error_unit"], plan["analysis"]) == \
        ("attention", "calibrated", key)

    at.switch_page("pages/4_Trade_offs.py").run()
    assert not at.exception
    assert at.selectbox(key="sweep_unit").options == ["heuristic", "calibrated"]
