"""The RTN errors the knapsack plans with are the errors of the RTN that runs: the analysis's err_layerwise and
err_attention equal those measures of the weights `quantize --method rtn` leaves, on the block's own Hessians."""

from __future__ import annotations

import pytest

import aptq.pipeline as pipeline
import aptq.sensitivity as sensitivity
from aptq.capture import BlockWalk
from aptq.data import Sampling, calibration_segments, token_ids
from aptq.models import get_weight, load_model
from aptq.pipeline import QuantizeSettings, quantize_model
from aptq.quantizer import layer_error
from aptq.sensitivity import AnalysisSettings, analyze
from aptq.store import Store

SAMPLING = Sampling(6, 24, seed=0)
BITS = (2, 3)


def test_predicted_rtn_errors_are_the_errors_of_the_rtn_run(tiny_model_dir, text_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "RUN_CACHE", tmp_path / "runs")
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    settings = AnalysisSettings(group_size=16, bits=BITS, max_blocks=1)
    layers, errors = analyze(loaded, text_corpus, SAMPLING, settings, store=Store(tmp_path / "a.duckdb"))
    segments = calibration_segments(token_ids(loaded.tokenizer, text_corpus, "calibration"), SAMPLING)
    step = next(iter(BlockWalk(loaded.model, loaded.arch, segments, stop=1)))
    options = sensitivity.analysis_options(loaded.arch, 1, SAMPLING.seed)
    hessians = sensitivity.collect_block(step, loaded.arch, options, {})
    predicted = errors.set_index(["layer", "bits"])
    for bits in BITS:
        plan = {layer.name: bits if layer.block == 0 else 16 for layer in loaded.arch.layers}
        run, _ = quantize_model(loaded, plan, QuantizeSettings("rtn", 16), None, f"rtn-{bits}")
        quantized = run.block(0)
        for layer in loaded.arch.block_layers(0):
            weight, h = get_weight(loaded.model, layer).detach().float(), hessians.layerwise[layer.name]
            realised = layer_error(weight, quantized[layer.name].float(), h)
            attention = sensitivity._attention_error(weight, quantized[layer.name].float(), layer.name, hessians,
                                                     loaded.arch, h, realised)
            row = predicted.loc[(layer.name, bits)]
            assert row["err_layerwise"] == pytest.approx(realised, rel=1e-6), layer.name
            assert row["err_attention"] == pytest.approx(attention, rel=1e-6), layer.name
    # Analyses stored before the predictions changed are not mixed in: the key carries the formulas' version.
    monkeypatch.setattr(sensitivity, "METHOD_VERSION", sensitivity.METHOD_VERSION - 1)
    assert sensitivity.analysis_key(loaded, text_corpus, SAMPLING, settings) != layers.attrs["analysis_key"]
