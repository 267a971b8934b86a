"""Block refinement (aptq.blockwise): the layer-wise solution comes back exactly at the start, the refined weights lie
on their grid, each family's layers are put where the model reads them, the block's output error falls and never
rises, and the pipeline keys and refuses it as documented."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import aptq.pipeline as pipeline
from aptq.blockwise import (
    BlockRefinement,
    _forward,
    _fused_attention,
    _LayerGrid,
    _parameters,
    _targets,
    refine_block,
)
from aptq.capture import BlockWalk
from aptq.data import Sampling, calibration_segments, token_ids
from aptq.errors import UserError
from aptq.gptq import gptq
from aptq.models import get_weight, load_model
from aptq.pipeline import QuantizeSettings, swapped_weights, uniform_plan
from aptq.progress import Cancelled
from aptq.quantizer import QuantConfig, recover_codes, rtn


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "RUN_CACHE", tmp_path / "runs")


@pytest.mark.parametrize("cfg", [QuantConfig(2, 16), QuantConfig(3, 16, symmetric=True), QuantConfig(4, 0)])
def test_the_start_comes_back_exactly_and_moved_variables_stay_on_the_grid(cfg):
    """A GPTQ start (codes moved away from round-to-nearest), 40 columns in groups of 16 (the last one padded)."""
    torch.manual_seed(0)
    W = torch.randn(12, 40)
    X = torch.randn(200, 40) @ torch.randn(40, 40)
    start = gptq(W, 2 * X.T @ X / 200, cfg).weight
    assert not torch.equal(start, rtn(W, cfg))  # the shifts matter
    grid = _LayerGrid(W, start, cfg)
    assert torch.equal(grid.hard(), start)
    assert torch.equal(grid.relaxed().detach(), start)  # what the optimiser sees at its first step
    with torch.no_grad():
        grid.offset.uniform_(-0.5, 0.5)
        grid.log_factor.uniform_(-0.3, 0.3)
    moved = grid.hard()
    assert not torch.equal(moved, start)
    codes = recover_codes(moved, cfg)  # raises where a row-group is on no grid of cfg
    assert torch.equal(codes.dequantize().float(), moved)


def _first_step(model, arch, segments, **walk_options):
    walk = BlockWalk(model, arch, segments, batch_size=3, **walk_options)
    return walk, next(iter(walk))


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "gpt_neox", "falcon", "qwen3_moe", "gemma2",
                                    "gemma3_text"])
def test_each_layer_is_put_where_the_model_reads_it(tiny_model, family):
    """Fused rows (phi3, interleaved in gpt_neox), transposed Conv1D weights (gpt2), a single KV head (falcon), the
    dense layers of a mixture: the block's output with the layers put in by `_parameters` is the output with them
    swapped into the module, also under the fused attention kernel the refinement switches to (Gemma 2's soft-capped
    scores keep their eager kernel; Gemma 3's first block has a sliding window shorter than the segments), and the
    gradient reaches each layer."""
    model, arch = tiny_model(family)
    segments = torch.randint(3, 100, (4, 16))
    walk, step = _first_step(model, arch, segments)
    layers = [layer for layer in arch.block_layers(0) if layer.expert is None]
    weights = {}
    for layer in layers:
        weight = get_weight(model, layer).detach()
        weights[layer.name] = (weight + 0.1 * torch.randn_like(weight)).requires_grad_()
    batch = step.batch(0)
    output = _forward(step, _parameters(step, arch, layers, weights), batch)
    with swapped_weights(model, arch, {name: weight.detach() for name, weight in weights.items()}):
        expected = step.forward(batch).float()
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    with _fused_attention(model):
        fused = _forward(step, _parameters(step, arch, layers, weights), batch)
        used = model.config._attn_implementation
    assert used == {"gemma2": "eager", "llama": "sdpa", "gemma3_text": "sdpa"}.get(family, used)
    assert model.config._attn_implementation == "eager"  # put back
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5)
    output.square().sum().backward()
    assert all(weight.grad is not None and weight.grad.abs().sum() > 0 for weight in weights.values())


def _block_error(model, arch, step, weights) -> float:
    targets = [step.reference.forward(batch).float() for batch in step.reference.batches()]
    with swapped_weights(model, arch, weights), torch.no_grad():
        return sum((step.forward(batch).float() - target).square().sum().item()
                   for batch, target in zip(step.batches(), targets))


@pytest.mark.parametrize("family, dtype", [("llama", torch.float32), ("llama", torch.bfloat16),
                                           ("gemma2", torch.float32), ("gemma3_text", torch.float32),
                                           ("gpt2", torch.float32), ("qwen3_moe", torch.float32)])
def test_refinement_lowers_the_blocks_output_error_and_leaves_the_model_alone(tiny_model, family, dtype):
    model, arch = tiny_model(family)
    model.to(dtype)
    torch.manual_seed(1)
    segments = torch.randint(3, 100, (6, 16))
    walk = BlockWalk(model, arch, segments, batch_size=3, reference=True, stop=2)
    steps = iter(walk)
    first = next(steps)  # block 1's two streams differ once block 0 is quantized
    with swapped_weights(model, arch, {layer.name: rtn(get_weight(model, layer), QuantConfig(2, 16))
                                       for layer in arch.block_layers(0)}):
        first.finish()
    step = next(steps)
    assert {target.dtype for target in _targets(step)} == {dtype}  # the targets keep the model's dtype
    todo = [(layer, 2) for layer in arch.block_layers(1)]
    configs = {layer.name: QuantConfig(2, 16) for layer, _ in todo}
    # in float32, as the pipeline hands them over: exactly on their grid (a bfloat16 copy is not)
    start = {layer.name: rtn(get_weight(model, layer).float(), configs[layer.name]) for layer, _ in todo}
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    refined, note = refine_block(step, model, arch, todo, start, configs, BlockRefinement(40))
    assert note is None
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert _block_error(model, arch, step, refined) < _block_error(model, arch, step, start)
    for layer, _ in todo:
        if layer.expert is not None:  # the experts keep their layer-wise weights
            assert torch.equal(refined[layer.name], start[layer.name])
        else:
            recover_codes(refined[layer.name], configs[layer.name])
    # a step that only overshoots finds nothing better: the layer-wise weights come back, with a note
    kept, note = refine_block(step, model, arch, todo, start, configs, BlockRefinement(1, learning_rate=0.5))
    assert note is not None and all(torch.equal(kept[name], start[name]) for name in start)


def test_refinement_reports_progress_and_can_be_cancelled(tiny_model):
    model, arch = tiny_model("llama")
    walk, step = _first_step(model, arch, torch.randint(3, 100, (6, 16)), reference=True)
    todo = [(layer, 3) for layer in arch.block_layers(0)]
    configs = {layer.name: QuantConfig(3, 16) for layer, _ in todo}
    start = {layer.name: rtn(get_weight(model, layer), configs[layer.name]) for layer, _ in todo}
    seen = []

    def progress(done, total, message):
        seen.append(message)
        raise Cancelled()

    with pytest.raises(Cancelled):
        refine_block(step, model, arch, todo, start, configs, BlockRefinement(30), progress, arch.n_blocks)
    assert seen == [f"block 1/{arch.n_blocks}: refining, step 10/30"]


def test_the_pipeline_refines_keys_and_refuses_as_documented(tiny_model_dir, text_corpus):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    segments = calibration_segments(token_ids(loaded.tokenizer, text_corpus, "calibration"), Sampling(6, 32, seed=0))
    plan = uniform_plan(loaded.arch, 2)
    settings = QuantizeSettings("gptq", 32, fp_targets=0)  # no targets: the walk carries the stream for the refinement
    refined_settings = replace(settings, block=BlockRefinement(20))
    plain = pipeline.quantize_model(loaded, plan, settings, segments, key="plain")[0]
    refined = pipeline.quantize_model(loaded, plan, refined_settings, segments, key="refined")[0]
    layer = loaded.arch.block_layers(1)[0]
    assert not torch.equal(plain.block(1)[layer.name], refined.block(1)[layer.name])
    recover_codes(refined.block(1)[layer.name], settings.config(2))
    # a bfloat16 model: the layer-wise weights reach the refinement in float32 (on their grid; 4-bit levels rounded to
    # bfloat16 are off it), the stored ones are the model's dtype
    half = load_model(str(tiny_model_dir("llama")), device="cpu", dtype=torch.bfloat16)
    targets = replace(refined_settings, fp_targets=0.25)  # the path that rounded them to the model's dtype
    stored = pipeline.quantize_model(half, uniform_plan(half.arch, 4), targets, segments, "refined-bf16")[0].block(1)
    assert stored[layer.name].dtype == torch.bfloat16
    assert "block" not in settings.key_fields()  # off: the keys of every run stored before it
    assert refined_settings.key_fields()["block"] == {"iterations": 20, "learning_rate": None}
    # the refinement's steps take one batch each: a batch size given is in its key, and only there
    assert replace(refined_settings, batch_size=4).key_fields() == refined_settings.key_fields() | {"batch_size": 4}
    assert replace(settings, batch_size=4).key_fields() == settings.key_fields()
    with pytest.raises(UserError, match="RTN"):
        QuantizeSettings("rtn", block=BlockRefinement(5))
    for wrong in (-1, 2.5, True):
        with pytest.raises(UserError, match="whole number"):
            BlockRefinement(wrong)
    with pytest.raises(UserError, match="above 0"):
        BlockRefinement(5, learning_rate=0)


def test_out_of_device_memory_in_the_refinement_refines_the_block_on_the_cpu(tiny_model_dir, monkeypatch):
    """The refinement's own fallback: the layer-wise result is kept, the step moves to the CPU and the refinement runs
    again there, with a note (no accelerator here: the step claims one and the first refinement fails as it would)."""
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    walk, step = _first_step(loaded.model, loaded.arch, torch.randint(3, 100, (6, 16)), reference=True)
    todo = [(layer, 3) for layer in loaded.arch.block_layers(0)]
    settings = QuantizeSettings("gptq", 16, block=BlockRefinement(10))
    start = {layer.name: rtn(get_weight(loaded.model, layer), settings.config(3)) for layer, _ in todo}
    devices = []

    def short_of_memory_once(step, *arguments):
        devices.append(step.device.type)
        if len(devices) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return refine_block(step, *arguments)

    monkeypatch.setattr(pipeline, "refine_block", short_of_memory_once)
    step.device = torch.device("cuda")
    weights, notes = pipeline._refine_step(loaded, step, todo, start, settings, lambda *_: None)
    assert devices == ["cuda", "cpu"]
    assert notes[0] == "Out of device memory in block 0's refinement: it was refined on the CPU."
    assert any(not torch.equal(weights[name], start[name]) for name in start)
