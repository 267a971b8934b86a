"""The quantization pipeline end to end on tiny models: every method, the store, resume, export, bad plans."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import aptq.pipeline as pipeline
from aptq.aespa import AespaOptions
from aptq.cli import main
from aptq.data import Sampling, calibration_segments, digest, evaluation_windows, token_ids
from aptq.errors import UserError
from aptq.evaluate import evaluate
from aptq.history import plan_json, stored_runs
from aptq.models import get_weight, load_model
from aptq.pipeline import EvalSettings, QuantizeSettings, run_plan, uniform_plan
from aptq.progress import Cancelled
from aptq.store import Store

SAMPLING = Sampling(6, 32, seed=0)
EVALUATION = EvalSettings(seqlen=32, max_tokens=256)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "cache.duckdb")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "RUN_CACHE", tmp_path / "runs")
    monkeypatch.setattr(pipeline, "REFERENCE_CACHE", tmp_path / "reference")


@pytest.mark.parametrize("family", ["llama", pytest.param("opt", marks=pytest.mark.integration),
                                    pytest.param("gpt2", marks=pytest.mark.integration)])
@pytest.mark.parametrize("method", pipeline.QUANTIZERS)
def test_every_method_quantizes_evaluates_and_is_stored_once(tiny_model_dir, text_corpus, store, family, method):
    loaded = load_model(str(tiny_model_dir(family)), device="cpu")
    before = {layer.name: get_weight(loaded.model, layer).clone() for layer in loaded.arch.layers}
    plan = uniform_plan(loaded.arch, 3)
    # 20 aespa iterations (not the CPU default's 100): the same path, a fifth of its optimisation
    settings = QuantizeSettings(method=method, group_size=32, aespa=AespaOptions(iterations=20))
    row = run_plan(loaded, text_corpus, SAMPLING, plan, settings, EVALUATION, store)
    assert not row.cached and row.method == method and row.avg_bits == 3
    assert row.effective_bits == pytest.approx(3 + 32 / 32)
    assert row.kl > 0 and 0 <= row.top1 <= 1 and row.perplexity > 1 and row.fp_perplexity > 1
    assert (row.calibration is None) == (method == "rtn")
    for layer in loaded.arch.layers:  # the loaded model is untouched: the work happens on a copy
        assert torch.equal(get_weight(loaded.model, layer), before[layer.name])
    again = run_plan(loaded, text_corpus, SAMPLING, plan, settings, EVALUATION, store)
    assert again.cached and again.perplexity == row.perplexity
    assert len(stored_runs(store)) == 1


def test_a_bfloat16_run_is_its_own_run_with_its_own_reference(tiny_model_dir, text_corpus, store, tmp_path):
    """The same plan and settings on the model in bfloat16 (the GPU default) round every weight, and the full-precision
    reference, differently: it must not be served the float32 run's stored metrics."""
    plan_of = {}
    rows = {}
    for dtype in (torch.float32, torch.bfloat16):
        loaded = load_model(str(tiny_model_dir("llama")), device="cpu", dtype=dtype)
        plan_of[dtype] = uniform_plan(loaded.arch, 3)
        rows[dtype] = run_plan(loaded, text_corpus, SAMPLING, plan_of[dtype], QuantizeSettings("rtn", 32), EVALUATION,
                               store)
    single, half = rows[torch.float32], rows[torch.bfloat16]
    assert not half.cached and half.key != single.key and len(stored_runs(store)) == 2
    assert half.fp_perplexity != single.fp_perplexity  # its own reference, measured in bfloat16
    assert len(list((tmp_path / "reference").glob("*.pt"))) == 2
    assert json.loads(half.settings)["dtype"] == "bfloat16" and "dtype" not in json.loads(single.settings)
    # float32 keys are made as before the dtype counted: runs stored then are still found
    identity = pipeline.identify_run(load_model(str(tiny_model_dir("llama")), device="cpu"), text_corpus, SAMPLING,
                                     plan_of[torch.float32], QuantizeSettings("rtn", 32), EVALUATION)
    assert single.key == identity.key == digest(
        identity.model, "-", plan_json(identity.plan), json.dumps(QuantizeSettings("rtn", 32).key_fields(),
                                                                   sort_keys=True),
        identity.evaluation, str(pipeline.PIPELINE_VERSION))


@pytest.mark.integration
@pytest.mark.integration
def test_full_precision_layers_stay_exact_and_kl_grows_as_bits_shrink(tiny_model_dir, text_corpus, store):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    kept = loaded.arch.layers[0].name
    rows = {}
    for bits in (8, 4, 2):
        plan = uniform_plan(loaded.arch, bits) | {kept: 16}
        rows[bits] = run_plan(loaded, text_corpus, SAMPLING, plan, QuantizeSettings("gptq", 32), EVALUATION, store)
    assert rows[8].kl < rows[4].kl < rows[2].kl
    assert rows[8].avg_bits > 8  # the full-precision layer counts at 16 bits
    # The weights run_plan evaluates come from quantize_model: with them swapped in, the kept weight is bit for bit
    # the original and every other one has changed.
    segments = calibration_segments(token_ids(loaded.tokenizer, text_corpus, "calibration"), SAMPLING)
    quantized, _ = pipeline.quantize_model(loaded, plan, QuantizeSettings("gptq", 32), segments, key="kept")
    originals = {layer.name: get_weight(loaded.model, layer).clone() for layer in loaded.arch.layers}
    with quantized.applied(loaded.model) as model:
        for layer in loaded.arch.layers:
            assert torch.equal(get_weight(model, layer), originals[layer.name]) == (layer.name == kept)


@pytest.mark.integration
def test_gptq_beats_rtn_on_a_real_model_block(text_corpus, store):
    """Two blocks of the embedded model at 2 bits, everything else kept: GPTQ's KL is below RTN's."""
    loaded = load_model(device="cpu")
    plan = {layer.name: 2 for layer in loaded.arch.layers if layer.block < 2}
    evaluation = EvalSettings(seqlen=64, max_tokens=512)
    kl = {method: run_plan(loaded, text_corpus, Sampling(8, 64), plan, QuantizeSettings(method, 64), evaluation,
                           store).kl for method in ("rtn", "gptq", "attention")}
    assert kl["gptq"] < kl["rtn"] and kl["attention"] < kl["rtn"]


@pytest.mark.integration
def test_an_interrupted_run_resumes_at_the_first_unfinished_block(tiny_model_dir, text_corpus, store, monkeypatch):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    plan = uniform_plan(loaded.arch, 3)
    settings = QuantizeSettings("attention", 32)

    def stop_after_first_block(done: int, total: int, message: str) -> None:
        if message.startswith("quantizing") and done == 1:
            raise Cancelled

    with pytest.raises(Cancelled):
        run_plan(loaded, text_corpus, SAMPLING, plan, settings, EVALUATION, store, stop_after_first_block)
    assert stored_runs(store).empty
    quantized_blocks = []
    original = pipeline._quantize_block
    monkeypatch.setattr(pipeline, "_quantize_block",
                        lambda model, todo, *rest: quantized_blocks.append(todo[0][0].block) or original(model, todo,
                                                                                                         *rest))
    resumed = run_plan(loaded, text_corpus, SAMPLING, plan, settings, EVALUATION, store)
    assert quantized_blocks == [1]
    monkeypatch.setattr(pipeline, "_quantize_block", original)
    store_fresh = Store(store.path.with_name("fresh.duckdb"))
    monkeypatch.setattr(pipeline, "RUN_CACHE", store.path.parent / "fresh-runs")
    fresh = run_plan(loaded, text_corpus, SAMPLING, plan, settings, EVALUATION, store_fresh)
    assert resumed.perplexity == pytest.approx(fresh.perplexity, rel=1e-6)
    assert not (pipeline.RUN_CACHE / resumed.key).exists()  # checkpoints go once the row is stored


def test_export_reloads_with_transformers_and_reproduces_the_perplexity(tiny_model_dir, text_corpus, store,
                                                                         tmp_path):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    target = tmp_path / "export"
    row = run_plan(loaded, text_corpus, SAMPLING, uniform_plan(loaded.arch, 4), QuantizeSettings("gptq", 32),
                   EVALUATION, store, export_dir=target)
    assert (target / "plan.json").is_file() and (target / "llmcompressor_recipe.yaml").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(str(target)).eval()
    windows = evaluation_windows(token_ids(loaded.tokenizer, text_corpus, "evaluation"), 32, 256)
    assert evaluate(reloaded, windows).perplexity == pytest.approx(row.perplexity, rel=1e-5)
    with pytest.raises(UserError, match="already exists"):
        run_plan(loaded, text_corpus, SAMPLING, uniform_plan(loaded.arch, 4), QuantizeSettings("gptq", 32),
                 EVALUATION, store, export_dir=target)
    assert not target.with_name("export.partial").exists()


def test_a_plan_of_bits_and_group_pairs_quantizes_each_layer_on_its_own_group(tiny_model_dir, text_corpus, store,
                                                                              tmp_path):
    """Pair candidates (aptq.allocate): q and v in groups of 16, down per channel, the rest at the run's 32; q and k
    of one width but different groups are walked apart (the shared walk needs one grid)."""
    from safetensors.torch import load_file

    from aptq.allocate import weight_size
    from aptq.pipeline import layer_table
    from aptq.quantizer import QuantConfig, recover_codes
    from tests.test_formats import unpack_gptq

    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    groups = {"q": 16, "v": 16, "down": 0}
    layer_groups = tuple(sorted((layer.name, groups[layer.kind]) for layer in loaded.arch.layers
                                if layer.kind in groups))
    plan = uniform_plan(loaded.arch, 3)
    settings = QuantizeSettings("attention", 32, layer_groups=layer_groups)
    assert "layer_groups" not in QuantizeSettings("attention", 32).key_fields()  # runs stored before keep their keys
    assert settings.key_fields()["layer_groups"] == dict(layer_groups)
    segments = calibration_segments(token_ids(loaded.tokenizer, text_corpus, "calibration"), SAMPLING)
    quantized, _ = pipeline.quantize_model(loaded, plan, settings, segments, key="pairs")
    with quantized.applied(loaded.model) as model:
        for layer in loaded.arch.layers:
            weight = get_weight(model, layer)
            own = groups.get(layer.kind, 32)
            assert recover_codes(weight, QuantConfig(3, own)).scales.shape[1] == (weight.shape[1] // own if own else 1)
            coarser = {16: 32, 32: 0}.get(own)  # a grid of one group size does not hold the finer one's values
            if coarser is not None:
                with pytest.raises(ValueError, match="not on a 3-bit grid"):
                    recover_codes(weight, QuantConfig(3, coarser))
    row = run_plan(loaded, text_corpus, SAMPLING, plan, settings, EVALUATION, store)
    expected = weight_size(layer_table(loaded), np.full(len(loaded.arch.layers), 3),
                           np.array([groups.get(layer.kind, 32) for layer in loaded.arch.layers]))
    assert row.effective_bits == pytest.approx(expected["effective_bits"]) and row.effective_bits != 4.0
    uniform_row = run_plan(loaded, text_corpus, SAMPLING, plan, QuantizeSettings("attention", 32), EVALUATION, store)
    assert uniform_row.key != row.key and uniform_row.plan_key != row.plan_key
    # the exports carry each module's grid: GPTQ's `dynamic` overrides and one compressed-tensors group per grid
    run_plan(loaded, text_corpus, SAMPLING, plan, settings, EVALUATION, store, export_dir=tmp_path / "out",
             export_formats=("gptq", "compressed-tensors"))
    config = json.loads((tmp_path / "out" / "gptq" / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"]) == (3, 32)
    overrides = {key[2:].replace("\\", "")[:-1]: value for key, value in config["dynamic"].items()}
    assert overrides == {layer.module_path: {"bits": 3, "group_size": groups[layer.kind] or -1}
                         for layer in loaded.arch.layers if layer.kind in groups}
    config = json.loads((tmp_path / "out" / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    assert {name: (group["weights"]["strategy"], group["weights"].get("group_size"))
            for name, group in config["config_groups"].items()} == \
        {"group_3bit_channel": ("channel", None), "group_3bit_g16": ("group", 16), "group_3bit_g32": ("group", 32)}
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["group_sizes"] == dict(layer_groups)
    dequantized = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    state = load_file(str(tmp_path / "out" / "gptq" / "model.safetensors"))
    for layer in loaded.arch.layers:  # GPTQ's g_idx gives each layer's own groups back
        weight = get_weight(dequantized, layer)
        tensors = {name: state[f"{layer.module_path}.{name}"] for name in ("qweight", "qzeros", "scales", "g_idx")}
        assert torch.equal(unpack_gptq(tensors, 3, weight.shape[1], weight.shape[0], v1=False), weight)


@pytest.mark.parametrize("plan, message", [
    ({"model.layers.9.self_attn.q_proj": 4}, "does not have"),
    ({"model.layers.0.self_attn.q_proj": 9}, "use 2–8, or 16"),
    ({"model.layers.0.self_attn.q_proj": 16}, "nothing to quantize"),
])
def test_bad_plans_are_one_clear_sentence(tiny_model_dir, text_corpus, store, plan, message):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    with pytest.raises(UserError, match=message):
        run_plan(loaded, text_corpus, SAMPLING, plan, QuantizeSettings("rtn", 32), EVALUATION, store)
    assert stored_runs(store).empty


def test_cli_quantize_with_a_plan_file_and_export(tiny_model_dir, text_corpus, tmp_path, capsys):
    model = str(tiny_model_dir("opt"))
    loaded = load_model(model, device="cpu")
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps({layer.name: 4 if layer.kind == "down" else 3 for layer in loaded.arch.layers}))
    corpus = str(tmp_path / "corpus.txt")
    (tmp_path / "corpus.txt").write_text(text_corpus.text("calibration") + "\n\n" + text_corpus.text("evaluation"))
    args = ["quantize", "--model", model, "--corpus", corpus, "--device", "cpu", "--method", "gptq",
            "--plan", str(plan_path), "--group", "32", "--samples", "4", "--seqlen", "32", "--eval-seqlen", "32",
            "--tokens", "128", "--store", str(tmp_path / "cli.duckdb"), "--export", str(tmp_path / "out"), "--json"]
    assert main(args) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["method"] == "gptq" and 3 < row["avg_bits"] < 4
    exported = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert exported["layers"] == json.loads(plan_path.read_text())
    assert main(args) == 2  # the export directory exists now
    assert "already exists" in capsys.readouterr().err
    assert main([*args[:-3], "--plan", str(tmp_path / "out" / "plan.json"), "--json"]) == 0  # our export reads back
    assert json.loads(capsys.readouterr().out)["cached"]
