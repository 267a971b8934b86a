from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertLMHeadModel

from aptq.errors import UserError
from aptq.models import get_module, get_weight, load_model, set_weight
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module", params=["llama", "opt", "gpt2"])
def tiny(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


def test_adapter_names_every_projection(tiny):
    family, path = tiny
    loaded = load_model(str(path), device="cpu")
    arch = loaded.arch
    assert arch.family == family and arch.n_blocks == 2
    kinds = [layer.kind for layer in arch.block_layers(0)]
    expected = {"llama": ["q", "k", "v", "o", "gate", "up", "down"], "opt": ["q", "k", "v", "o", "up", "down"],
                "gpt2": ["q", "k", "v", "o", "up", "down"]}[family]
    assert kinds == expected
    shapes = {layer.kind: tuple(get_weight(loaded.model, layer).shape) for layer in arch.block_layers(1)}
    kv_rows = arch.n_kv_heads * arch.head_dim
    assert shapes["q"] == (arch.n_heads * arch.head_dim, 64)
    assert shapes["k"] == shapes["v"] == (kv_rows, 64)
    assert shapes["o"] == (64, arch.n_heads * arch.head_dim)
    assert shapes["down"][0] == 64 and shapes["up"][1] == 64
    assert (arch.n_kv_heads < arch.n_heads) == (family == "llama") and arch.rope == (family == "llama")


def test_gpt2_fused_projections_are_row_slices(tmp_path):
    loaded = load_model(str(save_tiny_model("gpt2", tmp_path)), device="cpu")
    q, k, v = loaded.arch.block_layers(0)[:3]
    assert q.fused == k.fused == v.fused == "transformer.h.0.attn.c_attn"
    fused = get_module(loaded.model, q.module_path).weight  # Conv1D: d_in × 3·d_out
    assert torch.equal(get_weight(loaded.model, k), fused[:, 64:128].t())
    set_weight(loaded.model, v, torch.zeros(64, 64))
    assert fused[:, 128:].abs().sum() == 0 and fused[:, :128].abs().sum() > 0


@pytest.mark.integration
def test_embedded_model_loads_from_its_converted_cache():
    loaded = load_model(device="cpu")
    arch = loaded.arch
    assert (arch.family, arch.n_blocks, arch.n_heads, arch.n_kv_heads, arch.head_dim) == ("llama", 30, 9, 3, 64)
    assert len(arch.layers) == 210 and loaded.baseline_label == "dequantized Q4_1"
    assert (loaded.path / "model.safetensors").is_file()
    assert loaded.load_seconds < 30  # generous: the first call may convert; a speed check lives in bench/


def test_unknown_architecture_loads_layer_wise_and_says_why(tmp_path):
    # A BERT decoder with its language-model head: complete weights for AutoModelForCausalLM.
    BertLMHeadModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, is_decoder=True)).save_pretrained(str(tmp_path))
    loaded = load_model(str(tmp_path), device="cpu")
    arch = loaded.arch
    linears = [name for name, module in loaded.model.get_submodule(arch.blocks_path).named_modules()
               if isinstance(module, torch.nn.Linear)]
    assert arch.family == "bert" and len(arch.layers) == len(linears) == 6
    assert not arch.attention_aware and "not among the tested families" in arch.attention_unavailable_reason


@pytest.mark.parametrize("source, message", [
    ("/definitely/not/here", "does not exist"),
    ("./missing-model-dir", "does not exist"),
    ("no-such-org/no-such-model-xyz", "neither a local path nor a hub model"),
])
def test_bad_model_sources_give_one_sentence(source, message):
    with pytest.raises(UserError, match=message):
        load_model(source, device="cpu")


def test_directory_without_config_is_not_a_model(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path), device="cpu")


def test_corrupt_weights_file(tmp_path):
    path = save_tiny_model("llama", tmp_path)
    (path / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(UserError, match="Could not load the model weights"):
        load_model(str(path), device="cpu")
