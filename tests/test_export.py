import json
import re

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from aptq.errors import UserError
from aptq.export import export_model, plan_files, write_plan_files
from aptq.models import load_model
from tests.tiny_models import save_tiny_model


def mixed_plan(arch) -> dict[str, int]:
    widths = {"q": 4, "k": 4, "v": 4, "o": 3, "gate": 2, "up": 2, "down": 8}
    plan = {layer.name: widths[layer.kind] for layer in arch.layers}
    plan[arch.block_layers(1)[-1].name] = 16  # one layer kept in full precision
    return plan


def test_plan_formats_name_every_module(tmp_path):
    loaded = load_model(str(save_tiny_model("llama", tmp_path / "m")), device="cpu")
    files = plan_files(loaded.arch, loaded.model, mixed_plan(loaded.arch), 64, False, {"method": "test"})
    # 96 % 64: the first down projection cannot be grouped; the other one is kept at 16
    assert files.document["indivisible"] == [layer.name for layer in loaded.arch.layers if layer.kind == "down"][:1]
    dynamic = files.gptqmodel
    assert dynamic["bits"] == 4  # the most common width is the base
    skipped = [k for k in dynamic["dynamic"] if k.startswith("-:")]
    assert skipped == [r"-:model\.layers\.1\.mlp\.down_proj$"]
    assert re.match(r"model\.layers\.0\.mlp\.gate_proj$", r"model.layers.0.mlp.gate_proj")
    assert dynamic["dynamic"][r"+:model\.layers\.0\.mlp\.gate_proj$"] == {"bits": 2, "group_size": 64}
    recipe = yaml.safe_load(files.recipe)["quant_stage"]["quant_modifiers"]["GPTQModifier"]
    assert set(recipe["config_groups"]) == {"group_2bit", "group_3bit", "group_4bit", "group_8bit"}
    assert recipe["config_groups"]["group_3bit"]["weights"]["group_size"] == 64
    assert r"re:model\.layers\.1\.mlp\.down_proj$" in recipe["ignore"]
    target = write_plan_files(tmp_path / "plan", files)
    assert json.loads((target / "plan.json").read_text())["layers"] == files.document["layers"]
    with pytest.raises(UserError, match="already exists"):
        write_plan_files(tmp_path / "plan", files)


def test_gpt2_fused_projections_export_one_module(tmp_path):
    loaded = load_model(str(save_tiny_model("gpt2", tmp_path / "m")), device="cpu")
    plan = {layer.name: 4 for layer in loaded.arch.layers}
    plan["transformer.h.0.attn.c_attn.q"] = 2
    with pytest.raises(UserError, match="must share one bit width"):
        plan_files(loaded.arch, loaded.model, plan, 0, False, {})


def test_exported_model_reloads_with_transformers(tmp_path):
    loaded = load_model(str(save_tiny_model("opt", tmp_path / "m")), device="cpu")
    with torch.no_grad():
        loaded.model.model.decoder.layers[0].fc1.weight.mul_(0.5)  # stands in for a quantized weight
    files = plan_files(loaded.arch, loaded.model, mixed_plan(loaded.arch) | {}, 0, True, {})
    target = export_model(loaded.model, loaded.tokenizer, tmp_path / "out", files)
    again = AutoModelForCausalLM.from_pretrained(str(target))
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, loaded.model(ids).logits, atol=1e-5)
    assert not (tmp_path / "out.partial").exists()


def test_a_run_exports_packed_checkpoints_of_its_own_weights_with_its_measurements(tiny_model_dir, text_corpus,
                                                                                    tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import aptq.pipeline as pipeline
    from aptq.data import Sampling
    from aptq.models import get_weight
    from aptq.pipeline import EvalSettings, QuantizeSettings, run_plan, uniform_plan
    from aptq.store import Store
    from tests.test_formats import unpack_gptq

    monkeypatch.setattr(pipeline, "RUN_CACHE", tmp_path / "runs")
    monkeypatch.setattr(pipeline, "REFERENCE_CACHE", tmp_path / "reference")
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    store = Store(tmp_path / "store.duckdb")
    arguments = (loaded, text_corpus, Sampling(6, 32, seed=0), uniform_plan(loaded.arch, 3),
                 QuantizeSettings("rtn", 32, symmetric=True), EvalSettings(seqlen=32, max_tokens=256), store)
    with pytest.raises(UserError, match="needs an export directory"):
        run_plan(*arguments, export_formats=("gptq",))
    row = run_plan(*arguments, export_dir=tmp_path / "first", export_formats=("gptq", "llama.cpp"))
    again = run_plan(*arguments, export_dir=tmp_path / "again", export_formats=("gptq",))  # from the stored run
    assert again.cached and not row.cached
    for target in (tmp_path / "first", tmp_path / "again"):
        provenance = json.loads((target / "export.json").read_text())
        assert (provenance["perplexity"], provenance["kl"], provenance["run_key"]) == \
            (row.perplexity, row.kl, row.key)
        assert provenance["method"] == "rtn" and provenance["plan"] == uniform_plan(loaded.arch, 3)
        dequantized = AutoModelForCausalLM.from_pretrained(str(target))
        state = load_file(str(target / "gptq" / "model.safetensors"))
        config = json.loads((target / "gptq" / "config.json").read_text())["quantization_config"]
        assert (config["bits"], config["sym"], config["checkpoint_format"]) == (3, True, "gptq")
        for layer in loaded.arch.layers:
            weight = get_weight(dequantized, layer)
            tensors = {name: state[f"{layer.module_path}.{name}"] for name in ("qweight", "qzeros", "scales", "g_idx")}
            assert torch.equal(unpack_gptq(tensors, 3, weight.shape[1], weight.shape[0], v1=True), weight)
