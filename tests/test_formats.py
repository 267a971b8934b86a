"""Packed checkpoints read back by unpackers written from each format's specification, not from aptq.packing.

GPTQ: `qweight` (d_in·b/32 × d_out int32) is, column by column, one little-endian bit stream of the codes along the
input dimension (3-bit codes straddle words); `qzeros` (n_groups × d_out·b/32) likewise along the output dimension,
each zero point minus one in v1 checkpoints; `scales` (n_groups × d_out) float16; `g_idx` the group of each input
column; weight[o, i] = scales[g, o] · (q[i, o] − z[g, o]) with g = g_idx[i].
compressed-tensors pack-quantized (dense packing, 0.20): each output row's codes as one little-endian bit stream
(⌈d_in·b/32⌉ words), as unsigned `signed + 2^(b−1)`; asymmetric zero points packed the same way along the output rows
(⌈d_out·b/32⌉ × n_groups); weight = (q − zp) · scale.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aptq.errors import UserError
from aptq.export import PackedPlan, Provenance, compressed_tensors_tensors, export_model, gptq_tensors, plan_files
from aptq.gptq import gptq
from aptq.models import get_weight, load_model, set_weight
from aptq.packing import pack_stream
from aptq.quantizer import QuantConfig, recover_codes, rtn

# ---------------------------------------------------------------------------------------------------------------
# Independent unpackers


def stream_bits(words: np.ndarray) -> np.ndarray:
    """The bits of int32 words (last axis) as one little-endian stream: bit 0 of word 0 first."""
    as_bytes = np.ascontiguousarray(words, dtype="<i4").view(np.uint8)
    return np.unpackbits(as_bytes, axis=-1, bitorder="little")


def read_stream(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """`count` unsigned b-bit values from each row's bit stream (words along the last axis)."""
    stream = stream_bits(words)[..., :count * bits].reshape(*words.shape[:-1], count, bits).astype(np.int64)
    return (stream << np.arange(bits)).sum(axis=-1)


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int, d_in: int, d_out: int, v1: bool) -> torch.Tensor:
    codes = read_stream(tensors["qweight"].numpy().T, bits, d_in).T  # d_in × d_out
    zeros = read_stream(tensors["qzeros"].numpy(), bits, d_out) + (1 if v1 else 0)  # n_groups × d_out
    group = tensors["g_idx"].numpy().astype(np.int64)
    scales = tensors["scales"].float().numpy()
    weight = scales[group] * (codes - zeros[group])  # float32 · small integers: exact
    return torch.from_numpy(weight.T.astype(np.float32))


def unpack_compressed_tensors(tensors: dict[str, torch.Tensor], bits: int, symmetric: bool,
                              group_size: int) -> torch.Tensor:
    d_out, d_in = tensors["weight_shape"].tolist()
    offset = 2 ** (bits - 1)
    signed = read_stream(tensors["weight_packed"].numpy(), bits, d_in) - offset
    scale = tensors["weight_scale"].float().numpy()
    if symmetric:
        zero_point = np.zeros_like(scale, dtype=np.int64)
    else:
        zero_point = read_stream(tensors["weight_zero_point"].numpy().T, bits, d_out).T - offset
    group = np.arange(d_in) // (group_size or d_in)
    return torch.from_numpy(((signed - zero_point[:, group]) * scale[:, group]).astype(np.float32))


# ---------------------------------------------------------------------------------------------------------------
# Every width, per channel and grouped, asymmetric and symmetric


def quantized_layer(bits: int, group_size: int, symmetric: bool, method: str) -> tuple[torch.Tensor, QuantConfig]:
    generator = torch.Generator().manual_seed(bits * 10 + group_size + symmetric)
    weight = torch.randn(64, 96, generator=generator)
    weight[:, 5] = 0  # a dead input column
    cfg = QuantConfig(bits, group_size, symmetric)
    if method == "rtn":
        return rtn(weight, cfg), cfg
    inputs = torch.randn(96, 400, generator=generator)
    inputs[5] = 0
    return gptq(weight, inputs @ inputs.T / 400, cfg).weight, cfg


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [0, 32])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_independent_unpackers_recover_our_weights_exactly(bits, group_size, symmetric, method):
    weight, cfg = quantized_layer(bits, group_size, symmetric, method)
    codes = recover_codes(weight, cfg)
    assert torch.equal(codes.dequantize(), weight)
    if symmetric:
        assert (codes.zeros == 2 ** (bits - 1)).all()
    for v1 in (True, False):
        if v1 and int(codes.zeros.min()) == 0:
            continue  # v1 cannot hold a zero point of 0 (the exporter writes v2 then)
        tensors = gptq_tensors(codes, 1 if v1 else 2)
        assert tensors["qweight"].shape == (96 * bits // 32, 64) and tensors["qweight"].dtype == torch.int32
        assert tensors["qzeros"].shape == (1 if not group_size else 96 // group_size, 64 * bits // 32)
        assert tensors["scales"].dtype == torch.float16
        assert torch.equal(unpack_gptq(tensors, bits, 96, 64, v1), weight)
    ct = compressed_tensors_tensors(codes)
    assert ct["weight_packed"].shape == (64, 96 * bits // 32)
    assert ("weight_zero_point" in ct) == (not symmetric)
    assert torch.equal(unpack_compressed_tensors(ct, bits, symmetric, group_size), weight)


# ---------------------------------------------------------------------------------------------------------------
# Whole exports: files, configs, provenance, bad input


def mixed_plan(arch) -> dict[str, int]:
    widths = {"q": 4, "k": 4, "v": 3, "o": 8, "gate": 2, "up": 2, "down": 4}
    plan = {layer.name: widths[layer.kind] for layer in arch.layers}
    plan[arch.block_layers(1)[-1].name] = 16  # one layer kept in full precision
    return plan


@pytest.fixture
def quantized_llama(tiny_model_dir):
    """The tiny Llama with the mixed plan applied by RTN, groups of 32, asymmetric."""
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    plan = mixed_plan(loaded.arch)
    for layer in loaded.arch.layers:
        if plan[layer.name] < 16:
            set_weight(loaded.model, layer, rtn(get_weight(loaded.model, layer), QuantConfig(plan[layer.name], 32)))
    return loaded, plan


PROVENANCE = Provenance("tiny", "rtn", {"group_size": 32}, "analysis-key", {}, "run-key", 12.5, 0.1, 0.9, 11.0,
                        "corpus", 256, 32)


def export(loaded, plan, target, formats, group_size=32, symmetric=False):
    packed = PackedPlan(loaded.arch, plan, group_size, symmetric)
    files = plan_files(loaded.arch, loaded.model, plan, group_size, symmetric, {})
    return export_model(loaded.model, loaded.tokenizer, target, files, packed=packed, formats=formats,
                        provenance=PROVENANCE)


def test_a_mixed_plan_exports_every_format_that_unpacks_to_the_run(quantized_llama, tmp_path):
    loaded, plan = quantized_llama
    target = export(loaded, plan, tmp_path / "out", ("gptq", "compressed-tensors", "llama.cpp"))
    assert (target / "model.safetensors").is_file()  # the dequantized directory stays
    provenance = json.loads((target / "export.json").read_text())
    assert (provenance["analysis"], provenance["perplexity"], provenance["method"]) == ("analysis-key", 12.5, "rtn")

    gptq_dir = target / "gptq"
    config = json.loads((gptq_dir / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"], config["sym"], config["desc_act"]) == \
        ("gptq", 4, 32, False, False)
    kept = [layer for layer in loaded.arch.layers if plan[layer.name] == 16][0]
    assert config["dynamic"]["-:" + kept.module_path.replace(".", r"\.") + "$"] == {}
    assert config["checkpoint_format"] == "gptq_v2"  # asymmetric: zero points as they are
    notes = json.loads((gptq_dir / "aptq_notes.json").read_text())
    assert "dtype=torch.float16" in notes["gptqmodel_dtype"]  # GPTQModel's CPU default, bfloat16, rounds the scales
    v1 = False
    state = load_file(str(gptq_dir / "model.safetensors"))
    for layer in loaded.arch.layers:
        bits = plan[layer.name]
        weight = get_weight(loaded.model, layer)
        if bits == 16:
            assert f"{layer.module_path}.weight" in state and f"{layer.module_path}.qweight" not in state
            continue
        if bits != 4:
            override = config["dynamic"]["+:" + layer.module_path.replace(".", r"\.") + "$"]
            assert override == {"bits": bits, "group_size": 32}
        tensors = {name: state[f"{layer.module_path}.{name}"] for name in ("qweight", "qzeros", "scales", "g_idx")}
        assert torch.equal(unpack_gptq(tensors, bits, weight.shape[1], weight.shape[0], v1), weight)

    ct_dir = target / "compressed-tensors"
    config = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["format"]) == ("compressed-tensors", "pack-quantized")
    assert set(config["config_groups"]) == {"group_2bit", "group_3bit", "group_4bit", "group_8bit"}
    weights = config["config_groups"]["group_3bit"]["weights"]
    assert {key: weights[key] for key in ("num_bits", "strategy", "group_size", "symmetric", "type")} == \
        {"num_bits": 3, "strategy": "group", "group_size": 32, "symmetric": False, "type": "int"}
    assert "re:" + kept.module_path.replace(".", r"\.") + "$" in config["ignore"]
    state = load_file(str(ct_dir / "model.safetensors"))
    for layer in loaded.arch.layers:
        if plan[layer.name] < 16:
            tensors = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.startswith(layer.module_path + ".")}
            assert torch.equal(unpack_compressed_tensors(tensors, plan[layer.name], False, 32),
                               get_weight(loaded.model, layer))

    lines = (target / "llama.cpp" / "tensor_types.txt").read_text().split()
    assert r"blk\.0\.attn_v\.weight=q3_k" in lines and r"blk\.1\.ffn_down\.weight=f16" in lines
    assert all("=" in line and not line.startswith("#") for line in lines)
    note = json.loads((target / "llama.cpp" / "llama_quantize.json").read_text())
    assert note["base_type"] == "Q4_K" and "blk.0.attn_q.weight" in note["k_quant_fallback"]  # 64 columns < 256


def test_a_bfloat16_run_packs_codes_that_round_to_its_weights(tiny_model_dir, text_corpus, tmp_path, monkeypatch):
    """The GPU default: the model in bfloat16, GPTQ's float32 result rounded to it. Both packed formats hold codes
    whose values, rounded to bfloat16, are the run's weights (before, packed formats refused such a model)."""
    import aptq.pipeline as pipeline
    from aptq.data import Sampling, calibration_segments, token_ids
    from aptq.pipeline import QuantizeSettings

    monkeypatch.setattr(pipeline, "RUN_CACHE", tmp_path / "runs")
    half = load_model(str(tiny_model_dir("llama")), device="cpu", dtype=torch.bfloat16)
    plan = mixed_plan(half.arch)
    segments = calibration_segments(token_ids(half.tokenizer, text_corpus, "calibration"), Sampling(6, 32, seed=0))
    run = pipeline.quantize_model(half, plan, QuantizeSettings("gptq", 32), segments, key="bf16")[0]
    with run.applied(half.model):
        target = export(half, plan, tmp_path / "out", ("gptq", "compressed-tensors"))
        gptq_state = load_file(str(target / "gptq" / "model.safetensors"))
        ct_state = load_file(str(target / "compressed-tensors" / "model.safetensors"))
        for layer in half.arch.layers:
            bits = plan[layer.name]
            if bits == 16:
                continue
            weight = get_weight(half.model, layer)
            assert weight.dtype == torch.bfloat16
            tensors = {name: gptq_state[f"{layer.module_path}.{name}"] for name in ("qweight", "qzeros", "scales",
                                                                                    "g_idx")}
            unpacked = unpack_gptq(tensors, bits, weight.shape[1], weight.shape[0], v1=False)
            assert torch.equal(unpacked.to(torch.bfloat16), weight)
            tensors = {k.rsplit(".", 1)[1]: v for k, v in ct_state.items() if k.startswith(layer.module_path + ".")}
            assert torch.equal(unpack_compressed_tensors(tensors, bits, False, 32).to(torch.bfloat16), weight)


def test_packed_checkpoints_are_smaller_than_the_dequantized_one(quantized_llama, tmp_path):
    loaded, plan = quantized_llama
    target = export(loaded, plan, tmp_path / "out", ("gptq",))
    state = load_file(str(target / "gptq" / "model.safetensors"))
    layer = loaded.arch.layers[0]  # q_proj at 4 bits: 64 × 64 codes in 64·4/32 × 64 words
    assert state[f"{layer.module_path}.qweight"].numel() * 4 == 64 * 64 * 4 // 8


@pytest.mark.parametrize("fmt, group_size, change, message", [
    ("gptq", 64, {}, r"mlp\.down_proj has 96 input columns, which groups of 64 do not divide"),
    ("compressed-tensors", 64, {}, r"down_proj has 96 input columns"),
    ("gptq", 32, {"q": 5}, r"q_proj has 5 bits, which the GPTQ format cannot hold"),
    ("parquet", 32, {}, "Unknown export format 'parquet'"),
])
def test_a_format_that_cannot_hold_the_plan_is_refused_before_writing(quantized_llama, tmp_path, fmt, group_size,
                                                                      change, message):
    loaded, plan = quantized_llama
    plan = plan | {layer.name: change[layer.kind] for layer in loaded.arch.layers if layer.kind in change}
    with pytest.raises(UserError, match=message):
        export(loaded, plan, tmp_path / "out", (fmt,), group_size)
    assert not any(tmp_path.iterdir())  # nothing written, not even a partial directory


def test_weights_off_the_grid_are_refused_and_nothing_is_left(quantized_llama, tmp_path):
    loaded, plan = quantized_llama
    layer = loaded.arch.layers[0]
    set_weight(loaded.model, layer, get_weight(loaded.model, layer) * 1.0001)  # no longer on a float16-scale grid
    with pytest.raises(UserError, match=rf"{layer.name} is not on its 4-bit grid"):
        export(loaded, plan, tmp_path / "out", ("compressed-tensors",))
    assert not any(tmp_path.iterdir())


def test_an_existing_or_unwritable_directory_is_refused(quantized_llama, tmp_path):
    loaded, plan = quantized_llama
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="already exists"):
        export(loaded, plan, tmp_path / "taken", ("gptq",))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="cannot be created: .*a-file is a file"):
        export(loaded, plan, tmp_path / "a-file" / "out", ("gptq",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "taken"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_a_row_that_does_not_fill_its_last_word_leaves_the_rest_zero(bits):
    codes = torch.randint(0, 2 ** bits, (45, 3), generator=torch.Generator().manual_seed(bits))
    words = pack_stream(codes, bits)
    assert words.shape == (-(-45 * bits // 32), 3)
    assert torch.equal(torch.from_numpy(read_stream(words.numpy().T, bits, 45).T), codes)
    tail = stream_bits(words.numpy().T)[:, 45 * bits:]
    assert not tail.any()
