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
    assert files.document["indivisible"] == [l.name for l in loaded.arch.layers if l.kind == "down"][:1]  # 96 % 64; the other down is kept at 16
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
