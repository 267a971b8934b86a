"""The dashboard runs what the command line runs: the Trade-offs sweep plans with the errors of its quantizer (and
says when the analysis lacks them), the Quantize page gives aespa the options of the model's device."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import aptq.aespa as aespa
from aptq import history
from aptq.store import Store, default_path
from tests.analyzed import analyzed_tiny_llama


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory, tiny_model_dir) -> tuple[Path, str]:
    """A store with an analysis of the tiny llama without quantizer errors, and the model's directory."""
    return analyzed_tiny_llama(tmp_path_factory, tiny_model_dir)


def test_the_trade_offs_sweep_says_when_its_plans_use_rtns_errors(at):
    at.switch_page("pages/4_Trade_offs.py").run()
    assert not at.exception and not [e for e in at.info if "predicted errors" in e.value]
    at.selectbox(key="sweep_quantizer").set_value("gptq").run()
    assert not at.exception
    assert "The analysis has no predicted errors of GPTQ, so the plans use RTN's; rerun the analysis with quantizer " \
           "errors on (aptq analyze --quantizer-errors) to plan with GPTQ's." in [e.value for e in at.info]


@pytest.mark.integration
def test_the_quantize_page_gives_aespa_the_devices_options(at, monkeypatch):
    """On a CPU the page's aespa run takes the CPU setting by width (its counts lowered to 3 here), stored as such."""
    monkeypatch.setattr(aespa, "CPU_ITERATIONS", 3)
    monkeypatch.setattr(aespa, "CPU_WIDE_ITERATIONS", 3)
    at.switch_page("pages/3_Quantize.py").run()
    at.selectbox(key="run_plan_choice").set_value("uniform").run()
    at.number_input(key="run_seqlen").set_value(64)
    at.number_input(key="run_tokens").set_value(128)
    at.radio(key="run_method").set_value("aespa").run()
    next(b for b in at.button if b.label.startswith("Quantize and evaluate")).click().run()
    deadline = time.monotonic() + 120
    while not any(m.label == "Perplexity" for m in at.metric):
        assert not at.error and not at.exception, [e.value for e in [*at.error, *at.exception]]
        assert time.monotonic() < deadline, "the aespa run did not finish"
        time.sleep(0.3)
        at.run()
    (settings,) = history.stored_runs(Store(default_path()))["settings"]
    assert json.loads(settings)["aespa"]["iterations"] is None
