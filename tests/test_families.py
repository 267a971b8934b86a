"""The generic adapter on every family of tests/tiny_models.py, mixtures of experts, and the layer-wise path.

- every family: the layers found, their roles and shapes; fused and interleaved slices recombine to the stored tensor;
  set_weight round-trips; zeroing the value layer silences the attention (the slice is really the value);
- mixtures of experts: each expert's Hessian from the tokens the router sends it, its APTQ trace against autograd, the
  pooled fallback for a starved expert;
- end to end for all 20 families and one family the tool does not know (BLOOM): analyze → quantize (attention-aware
  where available, else GPTQ) → export → reload with transformers → the same perplexity;
- bad input: no decoder blocks, a block without linear layers, a fused layout that does not split.
"""

from __future__ import annotations

import warnings
from itertools import groupby
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer

from aptq.capture import BlockWalk
from aptq.data import Sampling, evaluation_windows, token_ids
from aptq.errors import UserError
from aptq.evaluate import evaluate
from aptq.hessian import CollectOptions, HessianCollector, _probe_seed, rademacher
from aptq.models import (
    ATTENTION_FAMILIES,
    architecture_of_model,
    get_module,
    get_weight,
    load_model,
    resolve_source,
    set_weight,
)
from aptq.pipeline import EvalSettings, QuantizeSettings, run_plan, uniform_plan
from aptq.sensitivity import AnalysisSettings, analyze
from aptq.store import Store
from tests.tiny_models import FAMILIES, HEAD_DIM, HEADS, HIDDEN

PLAIN_MLP = {"phi", "gpt_neox", "falcon", "starcoder2", "opt", "gpt2"}  # up/down without a gate
MOE = {"mixtral", "qwen3_moe"}  # four experts each
KV_HEADS = {"falcon": 1, "phi": 4, "gpt_neox": 4, "opt": 4, "gpt2": 4}  # others: 2
EXPERTS = 4


def expected_kinds(family: str) -> list[str]:
    mlp = ["up", "down"] if family in PLAIN_MLP else ["gate", "up", "down"]
    return ["q", "k", "v", "o"] + (["gate", "up", "down"] * EXPERTS if family in MOE else mlp)


def stored_tensor(model: nn.Module, layer) -> torch.Tensor:
    """The whole tensor a layer lives in, d_out × d_in, read without the adapter's helpers."""
    weight = getattr(get_module(model, layer.module_path), layer.parameter)
    weight = weight[layer.expert] if layer.expert is not None else weight
    return weight.t() if layer.transposed else weight


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_every_layer_with_its_role(family, tiny_model):
    model, arch = tiny_model(family)
    assert (arch.family, arch.n_blocks, arch.n_heads, arch.head_dim) == (family, 2, HEADS, HEAD_DIM)
    assert arch.n_kv_heads == KV_HEADS.get(family, 2)
    assert arch.attention_aware == (family in ATTENTION_FAMILIES)
    assert arch.attention_aware or arch.attention_unavailable_reason
    blocks = model.get_submodule(arch.blocks_path)
    for block in range(arch.n_blocks):
        layers = arch.block_layers(block)
        assert [layer.kind for layer in layers] == expected_kinds(family)
        shapes = {layer.kind: tuple(get_weight(model, layer).shape) for layer in layers}
        assert shapes["q"] == (HEADS * HEAD_DIM, HIDDEN) and shapes["o"] == (HIDDEN, HEADS * HEAD_DIM)
        assert shapes["k"] == shapes["v"] == (arch.n_kv_heads * HEAD_DIM, HIDDEN)
        assert shapes["down"][0] == HIDDEN and shapes["up"][1] == HIDDEN
        # Every linear module of the block is some layer's home.
        linears = {f"{arch.blocks_path}.{block}.{path}" for path, module in blocks[block].named_modules()
                   if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"}
        assert linears <= {layer.module_path for layer in layers}


@pytest.mark.parametrize("family", ["phi3", "gpt_neox", "falcon", "gpt2", "mixtral", "qwen3_moe"])
def test_fused_slices_recombine_to_the_stored_tensor(family, tiny_model):
    model, arch = tiny_model(family)
    fused = [layer for layer in arch.layers if layer.rows is not None]
    assert fused
    for _, members in groupby(fused, key=lambda layer: layer.fused):
        members = list(members)
        stored = stored_tensor(model, members[0])
        rebuilt, covered = torch.zeros_like(stored), torch.zeros(stored.shape[0], dtype=torch.int64)
        for layer in members:
            rows = layer.rows.index()
            rebuilt[rows] = get_weight(model, layer)
            covered[rows] += 1
        assert torch.equal(covered, torch.ones_like(covered)) and torch.equal(rebuilt, stored)
    if family == "gpt_neox":  # per head [q_h | k_h | v_h]: the key rows of head 1 start at 3·16 + 16
        k = arch.block_layers(0)[1]
        assert k.rows.index()[16:18].tolist() == [64, 65]


@pytest.mark.parametrize("family", FAMILIES)
def test_set_weight_round_trips_and_touches_nothing_else(family, tiny_model):
    model, arch = tiny_model(family)
    before = {layer.name: get_weight(model, layer).clone() for layer in arch.layers}
    layer = next(layer for layer in arch.layers if layer.kind == "k")  # a slice in every fused family
    value = torch.randn_like(before[layer.name])
    set_weight(model, layer, value)
    for other in arch.layers:
        assert torch.equal(get_weight(model, other), value if other.name == layer.name else before[other.name])


def _zero_rows_of_bias(model: nn.Module, layer) -> None:
    bias = getattr(get_module(model, layer.module_path), "bias", None)
    if bias is not None:
        with torch.no_grad():
            bias[layer.rows.index() if layer.rows is not None else slice(None)] = 0


@pytest.mark.parametrize("family", FAMILIES)
def test_zeroing_the_value_layer_silences_the_attention(family, tiny_model):
    """The v layer (a slice of a fused tensor in four families) is really the value projection: with it and its bias
    zero, the output projection reads zeros; with the experts' down projections zero, the experts output zeros."""
    model, arch = tiny_model(family)
    seen = {}
    for layer in arch.block_layers(0):
        if layer.kind == "v" or (layer.expert is not None and layer.kind == "down"):
            set_weight(model, layer, torch.zeros_like(get_weight(model, layer)))
            _zero_rows_of_bias(model, layer)
    o = next(layer for layer in arch.block_layers(0) if layer.kind == "o")
    handles = [get_module(model, o.module_path).register_forward_pre_hook(
        lambda module, args: seen.update(o_input=args[0]))]
    if family in MOE:
        experts = next(layer for layer in arch.block_layers(0) if layer.expert is not None).module_path
        handles.append(get_module(model, experts).register_forward_hook(
            lambda module, args, output: seen.update(experts=output)))
    with torch.no_grad():
        model(torch.arange(1, 13).reshape(2, 6))
    for handle in handles:
        handle.remove()
    assert seen["o_input"].abs().max() == 0
    assert family not in MOE or seen["experts"].abs().max() == 0


# ---------------------------------------------------------------------------------------------------------------
# Mixtures of experts


def _collect_block0(model, arch, segments, probes=0):
    walk = BlockWalk(model, arch, segments, device="cpu")
    mlp_inputs = []
    for step in walk:
        mlp = step.block.get_submodule(arch.mlp_attr)
        handle = mlp.register_forward_pre_hook(lambda module, args: mlp_inputs.append(args[0].detach()))
        with HessianCollector(step, arch, CollectOptions(attention=arch.attention_aware, probes=probes)) as collector:
            for batch in step.batches():
                collector.process(batch)
        handle.remove()
        return collector.result(), torch.cat(mlp_inputs), step.block
    raise AssertionError("no block")


def test_each_expert_hessian_comes_from_the_tokens_routed_to_it(tiny_model):
    model, arch = tiny_model("mixtral")
    segments = torch.randint(3, 1000, (8, 32), generator=torch.Generator().manual_seed(0))
    hessians, mlp_input, block = _collect_block0(model, arch, segments)
    x = mlp_input.reshape(-1, HIDDEN).double()
    experts = block.mlp.experts
    _, _, chosen = block.mlp.gate(x.float())
    own = [layer for layer in arch.block_layers(0) if layer.expert is not None and layer.name not in hessians.pooled]
    assert own, "every expert fell back: the calibration is too small for this test"
    assert sum(hessians.layer_tokens[f"{arch.blocks_path}.0.mlp.experts.{e}.down_proj"] for e in range(EXPERTS)) \
        == 2 * x.shape[0]  # top-2 routing: every token reaches two experts
    for layer in own:
        routed = x[(chosen == layer.expert).any(-1)]
        if layer.kind == "down":
            gate, up = (routed @ experts.gate_up_proj[layer.expert].double().T).chunk(2, dim=-1)
            routed = experts.act_fn(gate) * up
        expected = 2 * routed.T @ routed / routed.shape[0]
        assert hessians.layer_tokens[layer.name] == routed.shape[0]
        torch.testing.assert_close(hessians.layerwise[layer.name].double(), expected, rtol=1e-4, atol=1e-6)


def test_a_starved_expert_gets_the_pooled_hessian_with_a_warning(tiny_model):
    model, arch = tiny_model("qwen3_moe")
    segments = torch.randint(3, 1000, (2, 8), generator=torch.Generator().manual_seed(0))  # 16 tokens < width 64
    with pytest.warns(UserWarning, match="fewer calibration tokens than their input width"):
        hessians, mlp_input, _ = _collect_block0(model, arch, segments)
    gate = f"{arch.blocks_path}.0.mlp.experts.0.gate_proj"
    assert gate in hessians.pooled
    x = mlp_input.reshape(-1, HIDDEN).double()
    torch.testing.assert_close(hessians.layerwise[gate].double(), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)


def test_expert_traces_match_autograd_on_the_parameter_slice(tiny_model):
    """Hutchinson's per-segment ‖∂(uᵀF)/∂W_e‖² (F: the MLP output, whose probe is end 1) against the gradient of the
    experts' 3-D parameter computed by autograd, sliced to the expert's rows."""
    model, arch = tiny_model("mixtral")
    n, length = 3, 16
    segments = torch.randint(3, 1000, (n, length), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # starved experts: the traces do not use the Hessians
        hessians, mlp_input, block = _collect_block0(model, arch, segments, probes=1)
    mlp = block.mlp
    for layer in [layer for layer in arch.block_layers(0) if layer.expert is not None][:6]:
        per_segment = []
        for s in range(n):
            probe = rademacher((length, HIDDEN), _probe_seed(0, 0, s, 0, 1))
            parameter = getattr(mlp.experts, layer.parameter)
            (gradient,) = torch.autograd.grad((mlp(mlp_input[s:s + 1]) * probe).sum(), parameter)
            gradient = gradient[layer.expert]
            gradient = layer.rows.take(gradient) if layer.rows is not None else gradient
            per_segment.append(gradient.double().square().sum() * 2 / length)
        assert hessians.lm_trace[layer.name] == pytest.approx(float(torch.stack(per_segment).mean()), rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def bloom_dir(tmp_path_factory) -> Path:
    """A family outside the tested list: fused query_key_value of unknown layout, ALiBi instead of rotary."""
    config = CONFIG_MAPPING["bloom"](vocab_size=49152, hidden_size=HIDDEN, n_layer=2, n_head=HEADS, bos_token_id=1,
                                     eos_token_id=2)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-bloom")
    AutoModelForCausalLM.from_config(config).save_pretrained(str(directory))
    AutoTokenizer.from_pretrained(str(resolve_source("embedded")[0])).save_pretrained(str(directory))
    return directory


# One family per path stays in the quick loop (plain, fused rows, experts, layer-wise); the others are integration
# tests (about 13 s each here).
QUICK_END_TO_END = ("llama", "phi3", "qwen3_moe", "bloom")


@pytest.mark.parametrize("family", [
    pytest.param(family, marks=() if family in QUICK_END_TO_END else pytest.mark.integration)
    for family in FAMILIES + ("bloom",)])
def test_end_to_end_analyze_quantize_export_reload(family, tiny_model_dir, bloom_dir, text_corpus, tmp_path):
    loaded = load_model(str(bloom_dir if family == "bloom" else tiny_model_dir(family)), device="cpu")
    arch = loaded.arch
    store = Store(tmp_path / "store.duckdb")
    sampling = Sampling(4, 32, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # starved experts at 128 calibration tokens
        layers, errors = analyze(loaded, text_corpus, sampling, AnalysisSettings(group_size=16, bits=(4,)), store)
    assert layers["layer"].tolist() == [layer.name for layer in arch.layers]
    assert layers[["score", "score_layerwise", "score_attention"]].notna().all().all() and (layers.score > 0).all()
    assert len(errors) == len(layers) and (errors.err_layerwise > 0).all()
    if arch.moe:  # top-2 of 4 experts: per block, the down layers saw twice the calibration tokens
        downs = layers[layers.layer.str.contains("experts") & (layers.kind == "down")]
        assert (downs.groupby("block").tokens.sum() == 2 * 4 * 32).all()
    method = "attention" if arch.attention_aware else "gptq"
    if not arch.attention_aware:
        with pytest.raises(UserError, match="attention-aware quantizer is unavailable"):
            run_plan(loaded, text_corpus, sampling, uniform_plan(arch, 4), QuantizeSettings(method="attention"),
                     store=store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        run = run_plan(loaded, text_corpus, sampling, uniform_plan(arch, 4),
                       QuantizeSettings(method=method, group_size=16), EvalSettings(seqlen=32, max_tokens=128), store,
                       export_dir=tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager").eval()
    windows = evaluation_windows(token_ids(loaded.tokenizer, text_corpus, "evaluation"), 32, 128)
    assert evaluate(reloaded, windows).perplexity == pytest.approx(run.perplexity, rel=1e-4)
    assert run.perplexity != pytest.approx(run.fp_perplexity, rel=1e-7)  # something was quantized


# ---------------------------------------------------------------------------------------------------------------
# Bad input


class _Block(nn.Module):
    def __init__(self, linear: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8) if linear else nn.LayerNorm(8)


class _Decoder(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList(blocks)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed


def test_a_custom_decoder_goes_layer_wise():
    arch = architecture_of_model(_Decoder([_Block(), _Block()]), "custom")
    assert [layer.name for layer in arch.layers] == ["layers.0.proj", "layers.1.proj"]
    assert {layer.kind for layer in arch.layers} == {"linear"} and not arch.attention_aware


@pytest.mark.parametrize("model, message", [
    (nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8)), "no list of decoder blocks"),
    (_Decoder([_Block(), _Block(linear=False)]), "decoder block 1 .* has no linear layers"),
])
def test_models_without_blocks_or_layers_are_named_in_one_sentence(model, message):
    with pytest.raises(UserError, match=f"The model custom: .*{message}"):
        architecture_of_model(model, "custom")


def test_a_fused_layout_that_does_not_split_is_refused(tiny_model):
    model, _ = tiny_model("gpt_neox")
    model.gpt_neox.layers[1].attention.query_key_value = nn.Linear(HIDDEN, 100)
    with pytest.raises(UserError, match="query_key_value has 100 output rows"):
        architecture_of_model(model, "broken-neox")


def test_cli_says_why_the_attention_path_is_unavailable_and_refuses_it(bloom_dir, tmp_path, capsys):
    from aptq.cli import main

    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"This is sentence {i} of a small test corpus." for i in range(400)))
    code = main(["quantize", "--model", str(bloom_dir), "--corpus", str(text), "--method", "attention", "--bits", "4",
                 "--device", "cpu", "--store", str(tmp_path / "store.duckdb")])
    stderr = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(stderr) == 2
    assert stderr[0].startswith("Attention-aware metrics and quantizer unavailable for tiny-bloom")
    assert stderr[1].startswith("error: The attention-aware quantizer is unavailable for this model: the attention "
                                "of 'bloom' models is not among the tested families")
    assert not (tmp_path / "store.duckdb").exists()  # refused before anything was stored


@pytest.mark.parametrize("page", ("app.py", "pages/1_Sensitivity.py", "pages/2_Bit_budget.py", "pages/3_Quantize.py",
                                  "pages/4_Trade_offs.py"))
def test_every_page_says_why_the_attention_path_is_unavailable(page, bloom_dir, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("APTQ_STORE", str(tmp_path / "store.duckdb"))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=120)
    at.session_state["model_source"] = str(bloom_dir)
    at.switch_page(page).run()
    said = [info.value for info in at.info if info.value.startswith("Attention-aware metrics and quantizer unavail")]
    assert not at.exception and len(said) == 1, page
    assert "the attention of 'bloom' models is not among the tested families" in said[0]
