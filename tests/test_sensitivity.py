"""The sensitivity analysis end to end: tiny models of each family, the DuckDB cache, resume (the store itself:
tests/test_store.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import aptq.sensitivity as sensitivity
from aptq import analyses
from aptq.allocate import AllocationRequest, allocate, summarize
from aptq.capture import BlockWalk
from aptq.cli import main
from aptq.data import Sampling, calibration_segments, load_corpus, token_ids
from aptq.errors import UserError
from aptq.gptq import gptq, gptq_per_head, gptq_rows
from aptq.models import get_weight, load_model
from aptq.progress import Cancelled
from aptq.quantizer import QuantConfig
from aptq.sensitivity import AnalysisSettings, analyze
from aptq.store import Store

SAMPLING = Sampling(6, 24, seed=0)
SETTINGS = AnalysisSettings(group_size=32, bits=(2, 4, 8))
LAYER_COLUMNS = ["layer", "block", "kind", "fused", "n_params", "d_out", "d_in", "trace_layerwise", "trace_attention",
                 "trace_lm", "trace_lm_se", "score_layerwise", "score_attention", "score", "residual_ms",
                 "tokens", "pooled_hessian"]
ERROR_COLUMNS = ["layer", "bits", "group_size", "err_layerwise", "err_attention", "err_gptq_layerwise",
                 "err_gptq_attention", "err_aware_layerwise", "err_aware_attention"]


@pytest.fixture
def corpus(text_corpus):
    return text_corpus


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "cache.duckdb")


def count_calls(monkeypatch, name: str) -> list:
    """Wrap `aptq.sensitivity.<name>` to record its calls."""
    calls = []
    original = getattr(sensitivity, name)

    def wrapped(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(sensitivity, name, wrapped)
    return calls


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_analysis_of_each_family_round_trips_through_the_store(tiny_model_dir, corpus, store, family):
    loaded = load_model(str(tiny_model_dir(family)), device="cpu")
    layers, errors = analyze(loaded, corpus, SAMPLING, SETTINGS, store=store)
    assert list(layers.columns) == LAYER_COLUMNS and list(errors.columns) == ERROR_COLUMNS
    assert list(layers["layer"]) == [layer.name for layer in loaded.arch.layers]
    assert len(errors) == 3 * len(layers) and set(errors["group_size"]) == {32}
    numbers = layers.select_dtypes("number")
    assert np.isfinite(numbers.to_numpy()).all() and (layers[["trace_layerwise", "trace_lm"]] > 0).all().all()
    assert np.allclose(layers["score"], layers["trace_lm"] / layers["n_params"])
    same = layers["kind"].isin(["o", "gate", "up", "down"])
    assert np.allclose(layers.loc[same, "trace_attention"], layers.loc[same, "trace_layerwise"])
    assert (layers.loc[~same, "trace_attention"] != layers.loc[~same, "trace_layerwise"]).all()
    # The MLP output is linear in the down projection: its APTQ trace is the layer-wise one (up to probe noise).
    down = layers[layers["kind"] == "down"]
    assert np.allclose(down["trace_lm"], down["trace_layerwise"], rtol=6 * (down["trace_lm_se"] /
                                                                            down["trace_lm"]).max())
    module = layers["kind"].isin(["q", "k", "v", "o"])  # one residual size per (block, attention or MLP)
    assert (layers["residual_ms"] > 0).all() and (layers.groupby(["block", module])["residual_ms"].nunique() == 1).all()
    by_bits = errors.pivot(index="layer", columns="bits", values="err_attention")
    assert (by_bits[2] > by_bits[4]).all() and (by_bits[4] > by_bits[8]).all()
    fused = layers[layers["kind"].isin(["q", "k", "v"])]["fused"]
    assert (fused.nunique() == loaded.arch.n_blocks) == (family == "gpt2")

    stored = analyses.load(Store(store.path), layers.attrs["analysis_key"])
    pd.testing.assert_frame_equal(stored[0], layers)
    pd.testing.assert_frame_equal(stored[1], errors)


@pytest.mark.integration
def test_repeat_is_a_cache_hit_and_a_changed_setting_is_a_miss(tiny_model_dir, corpus, store, monkeypatch):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    layers, errors = analyze(loaded, corpus, SAMPLING, SETTINGS, store=store)
    assert layers.attrs["cached"] is False

    def no_model_work(*args, **kwargs):
        raise AssertionError("a cache hit must not walk the model")

    with monkeypatch.context() as patch:
        patch.setattr(sensitivity, "BlockWalk", no_model_work)
        again, again_errors = analyze(loaded, corpus, SAMPLING, SETTINGS, store=store)
    assert again.attrs["cached"] is True
    pd.testing.assert_frame_equal(again, layers)
    pd.testing.assert_frame_equal(again_errors, errors)

    walks = count_calls(monkeypatch, "BlockWalk")
    changed = [(SAMPLING, AnalysisSettings(group_size=32, bits=(2, 3))),
               (SAMPLING, AnalysisSettings(group_size=0, bits=(2, 4, 8))),
               (SAMPLING, AnalysisSettings(group_size=32, bits=(2, 4, 8), probes=2)),
               (Sampling(6, 24, seed=1), SETTINGS)]
    keys = {layers.attrs["analysis_key"]}
    for sampling, settings in changed:
        result, _ = analyze(loaded, corpus, sampling, settings, store=store)
        assert result.attrs["cached"] is False
        keys.add(result.attrs["analysis_key"])
    assert len(walks) == len(changed) and len(keys) == len(changed) + 1
    # Speed-only settings do not change the key.
    faster = AnalysisSettings(group_size=32, bits=(8, 4, 2), batch_size=1, device="cpu")
    assert analyze(loaded, corpus, SAMPLING, faster, store=store)[0].attrs["cached"] is True


@pytest.mark.integration
def test_an_interrupted_analysis_resumes_at_the_first_missing_block(tiny_model_dir, corpus, tmp_path, monkeypatch):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    full, full_errors = analyze(loaded, corpus, SAMPLING, SETTINGS, store=Store(tmp_path / "full.duckdb"))

    store = Store(tmp_path / "interrupted.duckdb")

    def cancel_after_first_block(done: int, total: int, message: str) -> None:
        if done == 1:
            raise Cancelled

    with pytest.raises(Cancelled):
        analyze(loaded, corpus, SAMPLING, SETTINGS, store=store, progress=cancel_after_first_block)
    key = full.attrs["analysis_key"]
    record = store.query("SELECT status, blocks_done FROM analyses WHERE key = ?", [key])
    assert record.to_dict("records") == [{"status": "interrupted", "blocks_done": 1}]
    assert analyses.load(store, key) is None

    collected = count_calls(monkeypatch, "collect_block")
    with pytest.raises(Cancelled):  # without resume, the stored block 0 is discarded and computed again
        analyze(loaded, corpus, SAMPLING, SETTINGS, store=store, progress=cancel_after_first_block, resume=False)
    assert [args[0].index for args in collected] == [0]

    collected.clear()
    resumed, resumed_errors = analyze(loaded, corpus, SAMPLING, SETTINGS, store=store)
    assert [args[0].index for args in collected] == [1]  # block 0 came from the store
    pd.testing.assert_frame_equal(resumed, full, rtol=1e-5)
    pd.testing.assert_frame_equal(resumed_errors, full_errors, rtol=1e-5)


def test_nonfinite_activations_name_the_block_and_layer(tiny_model_dir, corpus, store):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    o_proj = loaded.arch.block_layers(0)[3]
    with torch.no_grad():
        get_weight(loaded.model, o_proj)[0, 0] = float("nan")
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.gate_proj \(block 0\) contains NaN"):
        analyze(loaded, corpus, SAMPLING, SETTINGS, store=store)


def test_cli_analyze_prints_where_the_results_are_and_caches(tiny_model_dir, corpus, tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text(corpus.calibration + "\n\n" + corpus.evaluation)
    common = ["analyze", "--model", str(tiny_model_dir("opt")), "--corpus", str(text), "--samples", "4",
              "--seqlen", "16", "--group", "32", "--device", "cpu", "--store", str(tmp_path / "cli.duckdb")]
    assert main(common) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "cli.duckdb") in out and "Most sensitive" in out and "Least sensitive" in out
    assert "(computed)" in out
    assert main(common) == 0 and "(cache hit)" in capsys.readouterr().out
    assert main([*common, "--quantizer-errors"]) == 0 and "GPTQ and attention-aware GPTQ" in capsys.readouterr().out
    assert main([*common, "--samples", "100000"]) == 2  # the last value wins
    err = capsys.readouterr().err
    assert err.startswith("error: The calibration text has") and err.count("\n") == 1


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_quantizer_errors_are_the_objectives_of_the_quantizers_that_run(tiny_model_dir, corpus, store, family):
    """err_gptq_* and err_aware_* equal the losses gptq / gptq_per_head / gptq_rows report on the Hessians the
    attention-aware quantizer collects by default (attention row weights; post-norm weighting of o and down on Gemma 3),
    in the column order the quantizers walk by default (act-order from 3 bits); the key of an analysis without them is
    unchanged."""
    loaded = load_model(str(tiny_model_dir(family)), device="cpu")
    settings = AnalysisSettings(group_size=32, bits=(2, 4), max_blocks=1, quantizer_errors=True)
    layers, errors = analyze(loaded, corpus, SAMPLING, settings, store=store)
    plain = AnalysisSettings(group_size=32, bits=(2, 4), max_blocks=1)
    assert settings.key_fields()["act_order_from"] == settings.act_order_from == 3
    assert {"quantizer_errors", "act_order_from"}.isdisjoint(plain.key_fields())
    assert layers.attrs["analysis_key"] != analyze(
        loaded, corpus, SAMPLING, plain, store=store)[0].attrs["analysis_key"]
    segments = calibration_segments(token_ids(loaded.tokenizer, corpus, "calibration"), SAMPLING)
    step = next(iter(BlockWalk(loaded.model, loaded.arch, segments, stop=1)))
    options = sensitivity.analysis_options(loaded.arch, 1, SAMPLING.seed)
    hessians = sensitivity.collect_block(step, loaded.arch, options, {})
    assert bool(hessians.output_normed) == (family == "gemma3_text")
    by_key, by_layer = errors.set_index(["layer", "bits"]), layers.set_index("layer")
    for layer in loaded.arch.block_layers(0):
        weight, h = get_weight(loaded.model, layer).detach().float(), hessians.layerwise[layer.name]
        for bits in (2, 4):
            row, config = by_key.loc[(layer.name, bits)], QuantConfig(bits, 32)
            ordered = bits >= settings.act_order_from
            assert row["err_gptq_layerwise"] == pytest.approx(gptq(weight, h, config, act_order=ordered).loss,
                                                              rel=1e-5)
            if layer.kind == "v":
                aware = gptq_per_head(weight, hessians.value[layer.name], config, act_order=ordered).loss
            elif layer.kind in ("q", "k"):
                aware = gptq_rows(weight, h, hessians.row[layer.name], config, act_order=ordered).loss
            elif layer.name in hessians.output_normed:
                h_normed = hessians.output_normed[layer.name]
                aware = gptq(weight, h_normed, config, act_order=ordered).loss
                assert by_layer.loc[layer.name, "trace_attention"] == pytest.approx(
                    weight.shape[0] * h_normed.trace().item(), rel=1e-5)
            else:
                aware = row["err_gptq_layerwise"]
                assert row["err_aware_layerwise"] == row["err_gptq_layerwise"]
            assert row["err_aware_attention"] == pytest.approx(aware, rel=1e-5)
    assert (errors["err_gptq_layerwise"] < errors["err_layerwise"]).mean() > 0.5  # GPTQ beats RTN on its objective


def test_extra_group_sizes_give_pair_candidates_their_errors(tiny_model_dir, corpus, store):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    settings = AnalysisSettings(group_size=32, bits=(2, 4), max_blocks=1, extra_group_sizes=(0, 32))
    assert AnalysisSettings(group_size=32).key_fields() == AnalysisSettings(group_size=32,
                                                                            extra_group_sizes=(32,)).key_fields()
    layers, errors = analyze(loaded, corpus, SAMPLING, settings, store=store)
    assert sorted(set(errors["group_size"])) == [0, 32] and len(errors) == 2 * 2 * len(layers)
    by_group = errors.groupby("group_size")["err_layerwise"].sum()
    assert by_group[0] > by_group[32]  # finer grids, less error
    plan = allocate(layers, errors, AllocationRequest(3.0, "knapsack", ((2, 32), (4, 0), (4, 32))))
    summary = summarize(plan, layers, errors)
    assert summary["effective_bits"] <= 3.0 and set(plan.group_sizes.values()) <= {0, 32}
    assert np.isfinite(summary["predicted_error_attention"])


@pytest.mark.integration
def test_embedded_model_integration(tmp_path):
    loaded = load_model(device="cpu")
    corpus = load_corpus("brown")
    store = Store(tmp_path / "embedded.duckdb")
    settings = AnalysisSettings(group_size=64, bits=(2, 4), max_blocks=2)
    layers, errors = analyze(loaded, corpus, Sampling(4, 64, seed=0), settings, store=store)
    assert len(layers) == 2 * 7 and len(errors) == 2 * len(layers)
    assert np.isfinite(layers.select_dtypes("number").to_numpy()).all()
    assert (layers["trace_lm_se"] < layers["trace_lm"]).all()
    v = errors[errors["layer"].str.endswith("v_proj")]
    assert (v["err_attention"] != v["err_layerwise"]).all()
