"""The measured cross-layer unit (aptq.calibrate) on a tiny llama: rates from injected noise, the store, bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from aptq import calibrate
from aptq.allocate import AllocationRequest, allocate, summarize
from aptq.calibrate import UnitSettings, calibrate_unit, calibrate_widths, widths_to_measure, with_unit
from aptq.data import Sampling
from aptq.errors import UserError
from aptq.evaluate import reference_stats
from aptq.models import get_weight, load_model
from aptq.progress import Cancelled
from aptq.sensitivity import AnalysisSettings, analyze
from aptq.store import Store

SAMPLING = Sampling(8, 24, seed=0)
ANALYSIS = AnalysisSettings(group_size=32, bits=(2, 3, 4), max_blocks=1)


@pytest.fixture(scope="module")
def analysed_once(tiny_model_dir, text_corpus, tmp_path_factory):
    """One analysis for the module (the tests leave the model's weights as they found them, and check it)."""
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    path = tmp_path_factory.mktemp("calibrate") / "unit.duckdb"
    layers, errors = analyze(loaded, text_corpus, SAMPLING, ANALYSIS, store=Store(path))
    return loaded, path, layers, errors


@pytest.fixture
def analysed(analysed_once, tmp_path):
    """The module's analysis in a private copy of its store: each test measures its own unit calibrations."""
    loaded, source, layers, errors = analysed_once
    shutil.copy(source, tmp_path / "unit.duckdb")
    return loaded, Store(tmp_path / "unit.duckdb"), layers.copy(), errors.copy()


def test_rates_grow_with_the_noise_as_kl_does_and_are_stored(analysed, text_corpus, monkeypatch):
    loaded, store, layers, errors = analysed
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    settings = UnitSettings(noise_bits=(3, 2))
    units = calibrate_unit(loaded, text_corpus, SAMPLING, layers, errors, settings, store=store)
    assert list(units["layer"]) == list(layers["layer"])
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())  # noise removed again
    assert (units["kl_rate"] >= 0).all()
    kinds = layers.set_index("layer").loc[units["layer"], "kind"].to_numpy()
    # In a tiny random model only v and o move the output well above float resolution (KL ~1e-7 against ~1e-9 of
    # rounding; q/k and the MLP stay near it): there the rate stands out of its error and KL grows as σ² (the
    # linearity the unit rests on), within 15 %.
    resolved = units[np.isin(kinds, ("v", "o"))]
    assert (resolved["kl_rate"] > 3 * resolved["kl_rate_se"]).all()
    for row in resolved.itertuples():
        assert row.kl[1] / row.kl[0] == pytest.approx(row.noise_ms[1] / row.noise_ms[0], rel=0.15)
    monkeypatch.setattr(calibrate, "measure_layer", lambda *a, **k: pytest.fail("a stored layer was measured again"))
    again = calibrate_unit(loaded, text_corpus, SAMPLING, layers, errors, settings, store=store)
    assert again["kl_rate"].tolist() == units["kl_rate"].tolist()


def test_calibrated_unit_feeds_the_knapsack_with_an_uncertainty(analysed, text_corpus):
    loaded, store, layers, errors = analysed
    units = calibrate_unit(loaded, text_corpus, SAMPLING, layers, errors, store=store)
    measured = with_unit(layers, units)
    request = AllocationRequest(3.0, "knapsack", (2, 3, 4), group_size=32, unit="calibrated")
    summary = summarize(allocate(measured, errors, request), measured, errors)
    factor = (measured["kl_rate"] / measured["trace_attention"]).to_numpy()
    chosen = errors.set_index(["layer", "bits"])["err_attention"]
    plan = allocate(measured, errors, request)
    expected = sum(f * chosen[(name, plan.bits[name])] for name, f in zip(measured["layer"], factor))
    assert summary["predicted_error_attention"] == pytest.approx(expected)
    assert 0 < summary["predicted_error_attention_se"] < summary["predicted_error_attention"]
    assert summary["error_unit"] == "calibrated"


def test_an_interrupted_calibration_keeps_what_it_measured(analysed, text_corpus):
    loaded, store, layers, errors = analysed
    seen = []

    def stop_after_two(done: int, total: int, message: str) -> None:
        seen.append(done)
        if done == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        calibrate_unit(loaded, text_corpus, SAMPLING, layers, errors, store=store, progress=stop_after_two)
    key = UnitSettings().key(layers.attrs["analysis_key"])
    from aptq import analyses
    assert len(analyses.load_units(store, key)) == 2


def test_calibration_too_short_for_a_validation_part_is_refused(tiny_model_dir, text_corpus, tmp_path):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    short = Sampling(4, 24, seed=0)
    layers, errors = analyze(loaded, text_corpus, short, ANALYSIS, store=Store(tmp_path / "s.duckdb"))
    with pytest.raises(UserError, match=r"^The calibration has 4 segment\(s\), too few to hold out a validation part "
                                        r"of 2 segments at 25%; use at least 8 calibration segments"):
        calibrate_unit(loaded, text_corpus, short, layers, errors, store=Store(tmp_path / "s.duckdb"))


def test_a_layer_without_tokens_is_refused_before_any_work(analysed, text_corpus, monkeypatch):
    loaded, store, layers, errors = analysed
    monkeypatch.setattr(calibrate, "reference_stats", lambda *a, **k: pytest.fail("work started"))
    starved = layers.assign(tokens=np.where(layers["layer"] == layers["layer"].iloc[3], 0, layers["tokens"]))
    with pytest.raises(UserError, match=rf"^No calibration token reaches {layers['layer'].iloc[3]} \(1 layer"):
        calibrate_unit(loaded, text_corpus, SAMPLING, starved, errors, store=store)
    with pytest.raises(UserError, match=r"^The analysis has no predicted errors at \[8\] bits"):
        calibrate_unit(loaded, text_corpus, SAMPLING, layers, errors, UnitSettings(noise_bits=(8,)), store=store)


def test_width_multiples_are_each_uniform_plans_held_out_kl_over_its_prediction(analysed, text_corpus, monkeypatch):
    """Each width's plan is fitted on the segments before the validation quarter (the pipeline's own run on the
    first 6 of the 8 segments gives the same KL there), and a repeat is a cache hit."""
    from aptq.data import calibration_segments, token_ids
    from aptq.evaluate import evaluate
    from aptq.pipeline import EvalSettings, QuantizeSettings, identify_run, measure_run, remove_checkpoints, run_weights

    loaded, store, layers, errors = analysed
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    settings = QuantizeSettings("gptq", 32)
    table = calibrate_widths(loaded, text_corpus, SAMPLING, layers, errors, settings, (2, 3), store=store)
    assert list(table["bits"]) == [2, 3]
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    windows = calibration_segments(token_ids(loaded.tokenizer, text_corpus, "calibration"), SAMPLING)[6:]
    reference = reference_stats(loaded.model, windows)
    for row in table.itertuples():
        plan = {name: row.bits for name in layers["layer"]}
        fitting = Sampling(6, SAMPLING.seqlen, seed=0)
        evaluation = EvalSettings(32, 64)
        identity = identify_run(loaded, text_corpus, fitting, plan, settings, evaluation)
        try:
            measure_run(loaded, text_corpus, fitting, identity, settings, evaluation)
            with run_weights(loaded.arch, identity.key).applied(loaded.model):
                kl = evaluate(loaded.model, windows, reference=reference).kl_divergence
        finally:
            remove_checkpoints(identity.key)
        # the analysis has no GPTQ errors: the plans (and so the multiples) use RTN's
        request = AllocationRequest(float(row.bits), "uniform", (row.bits,), group_size=32, quantizer="rtn")
        predicted = summarize(allocate(layers, errors, request), layers, errors)["predicted_error_attention"]
        assert row.kl == pytest.approx(kl, rel=1e-4) and row.predicted == pytest.approx(predicted)
        assert row.multiple == pytest.approx(kl / predicted, rel=1e-4)
    assert table.loc[0, "kl"] > table.loc[1, "kl"] > 0
    monkeypatch.setattr(calibrate, "quantize_model", lambda *a, **k: pytest.fail("a stored width was measured again"))
    again = calibrate_widths(loaded, text_corpus, SAMPLING, layers, errors, settings, (2, 3), store=store)
    assert again["multiple"].tolist() == table["multiple"].tolist()


def test_grid_multiples_measure_each_grids_uniform_plan_and_are_offered_with_the_own_grids(
        tiny_model_dir, text_corpus, tmp_path, monkeypatch):
    """Per channel beside groups of 32: each grid's uniform plan is quantized on its own grid (its KL is the
    pipeline's run of that grid), stored under that grid's settings, split into width and grid multiples, offered
    only to plans at the measured own group size; a repeat is a cache hit, a grid the analysis lacks refused before
    any work."""
    from aptq import analyses
    from aptq.calibrate import width_multiple_choices, with_width_multiples
    from aptq.data import calibration_segments, token_ids
    from aptq.evaluate import evaluate
    from aptq.pipeline import EvalSettings, QuantizeSettings, identify_run, measure_run, remove_checkpoints, run_weights

    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    store = Store(tmp_path / "grids.duckdb")
    layers, errors = analyze(loaded, text_corpus, SAMPLING, AnalysisSettings(group_size=32, bits=(2, 3), max_blocks=1,
                                                                             extra_group_sizes=(0,)), store=store)
    settings = QuantizeSettings("rtn", 32)
    table = calibrate_widths(loaded, text_corpus, SAMPLING, layers, errors, settings, (2, 3), store=store,
                             grids=(0,))
    assert sorted(zip(table["group_size"], table["bits"])) == [(0, 2), (0, 3), (32, 2), (32, 3)]
    windows = calibration_segments(token_ids(loaded.tokenizer, text_corpus, "calibration"), SAMPLING)[6:]
    reference = reference_stats(loaded.model, windows)
    for row in table[table["group_size"] == 0].itertuples():
        plan = {name: row.bits for name in layers["layer"]}
        per_channel = QuantizeSettings("rtn", 0)
        identity = identify_run(loaded, text_corpus, Sampling(6, SAMPLING.seqlen, seed=0), plan, per_channel,
                                EvalSettings(24, 48))
        try:
            measure_run(loaded, text_corpus, Sampling(6, SAMPLING.seqlen, seed=0), identity, per_channel,
                        EvalSettings(24, 48))
            with run_weights(loaded.arch, identity.key).applied(loaded.model):
                kl = evaluate(loaded.model, windows, reference=reference).kl_divergence
        finally:
            remove_checkpoints(identity.key)
        request = AllocationRequest(float(row.bits), "uniform", (row.bits,), group_size=0)
        predicted = summarize(allocate(layers, errors, request), layers, errors)["predicted_error_attention"]
        assert row.kl == pytest.approx(kl, rel=1e-4) and row.multiple == pytest.approx(kl / predicted, rel=1e-4)
    charged = with_width_multiples(layers, table, 32).attrs
    by_grid = {(int(r.group_size), int(r.bits)): r.multiple for r in table.itertuples()}
    assert charged["width_multiples"] == {2: by_grid[(32, 2)], 3: by_grid[(32, 3)]}
    assert charged["grid_multiples"] == {0: {2: by_grid[(0, 2)], 3: by_grid[(0, 3)]}}
    stored = analyses.load_widths(store, layers.attrs["analysis_key"])
    (offered,) = width_multiple_choices(stored, "heuristic", "rtn", 32).values()
    assert (offered.widths, offered.grids) == (charged["width_multiples"], charged["grid_multiples"])
    assert width_multiple_choices(stored, "heuristic", "rtn", 64) == {}  # nothing measured in groups of 64
    monkeypatch.setattr(calibrate, "quantize_model", lambda *a, **k: pytest.fail("a stored grid was measured again"))
    again = calibrate_widths(loaded, text_corpus, SAMPLING, layers, errors, settings, (2, 3), store=store,
                             grids=(0,))
    assert again["multiple"].tolist() == table["multiple"].tolist()
    with pytest.raises(UserError, match=r"^The predicted errors were computed for group size\(s\) \[0, 32\], not 16"):
        calibrate_widths(loaded, text_corpus, SAMPLING, layers, errors, settings, (2, 3), store=store, grids=(16,))


def test_a_width_without_a_usable_multiple_is_refused_and_not_stored(analysed, text_corpus, monkeypatch):
    """A KL of 0 (nothing measurable) gives no multiple: one sentence, and no row that later reads would fail on."""
    from types import SimpleNamespace

    from aptq import analyses
    from aptq.allocate import AllocationError
    from aptq.pipeline import QuantizeSettings

    loaded, store, layers, errors = analysed
    monkeypatch.setattr(calibrate, "evaluate", lambda *a, **k: SimpleNamespace(kl_divergence=0.0))
    with pytest.raises(AllocationError, match=r"^The uniform 3-bit plan has a measured KL of 0 and a predicted"):
        calibrate_widths(loaded, text_corpus, SAMPLING, layers, errors, QuantizeSettings("rtn", 32), (3,),
                         store=store)
    assert analyses.load_widths(store, layers.attrs["analysis_key"]).empty


def test_width_multiples_need_a_validation_part_and_skip_8_bits():
    assert widths_to_measure((2, 3, 4, 8), 8) == (2, 3, 4)
    assert widths_to_measure((8,), 8) == (8,)
    with pytest.raises(UserError, match=r"^The calibration has 4 segment\(s\), too few to hold out a validation"):
        widths_to_measure((2, 3, 4), 4)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3_moe", "gpt2"])
def test_noise_measured_from_the_blocks_inputs_gives_the_full_forwards_kl(family, tiny_model_dir, text_corpus):
    """The forwards that start at the noisy layer's block (its full-precision inputs replayed) give the KL of whole
    forwards, in every family's block arguments (masks per layer type, rotary embeddings, experts)."""
    loaded = load_model(str(tiny_model_dir(family)), device="cpu")
    windows = torch.randint(3, 200, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = reference_stats(loaded.model, windows)
    last = loaded.arch.n_blocks - 1
    (block, inputs), = calibrate.block_inputs(loaded, windows, {last})
    assert block == last and inputs.shape[:2] == windows.shape
    for layer in [layer for layer in loaded.arch.block_layers(last) if layer.expert is None][-3:]:
        # noise as large as the weights: a tiny random model's output hardly moves under less (KL ~1e-9)
        power = float(get_weight(loaded.model, layer).detach().float().pow(2).mean())
        levels = np.array([4 * power, 16 * power])
        whole = calibrate.measure_layer(loaded, layer.name, levels, windows, reference, seed=0)
        replayed = calibrate.measure_layer(loaded, layer.name, levels, windows, reference, seed=0, inputs=inputs)
        assert min(whole.kl) > 1e-7, "noise too small to compare"
        np.testing.assert_allclose(replayed.kl, whole.kl, rtol=1e-4)
    other = calibrate.measure_layer(loaded, layer.name, levels, windows, reference, seed=0, inputs=inputs.flip(0))
    assert not np.allclose(other.kl, whole.kl, rtol=1e-2)  # the replayed inputs are what the block sees
