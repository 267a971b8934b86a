"""The out and down projections under the error after a post-norm (aptq.hessian `output_norms`, docs/algorithms.md
§16) against the Jacobian autograd finds in the tiny models' own norms."""

from __future__ import annotations

import pytest
import torch

from aptq.capture import BlockWalk
from aptq.errors import UserError
from aptq.geometry import RmsNorm, output_norm_modules
from aptq.gptq import gptq
from aptq.hessian import BlockHessians, CollectOptions, HessianCollector
from aptq.models import get_weight
from aptq.pipeline import QuantizeSettings, quantize_layer
from aptq.quantizer import QuantConfig

POST_NORM_FAMILIES = ("gemma2", "gemma3_text", "olmo2")
# Weights of this spread make the outputs' sizes vary about tenfold over tokens, as in trained models; at the default
# 0.02 the norms' ε dominates their tiny outputs and every token weighs the same.
INIT = 0.3


def segments(n: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 5000, (n, length), generator=torch.Generator().manual_seed(seed))


def collect(model, arch, ids: torch.Tensor, disturb=None) -> BlockHessians:
    """Block 0's Hessians with the post-norm weighting, in batches of two segments; `disturb(block)` may hook the
    block after the collector has."""
    step = next(iter(BlockWalk(model, arch, ids, batch_size=2, stop=1)))
    with HessianCollector(step, arch, CollectOptions(attention=False, probes=0, output_norms=True)) as collector:
        if disturb is not None:
            disturb(step.block)
        for batch in step.batches():
            step.keep_output(batch, collector.process(batch))
    return collector.result()


def recorded(model, arch, ids: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the layer's input x and output y in the model's own forward pass."""
    layer = next(layer for layer in arch.block_layers(0) if layer.kind == kind)
    seen = {}
    module = model.get_submodule(layer.module_path)
    handle = module.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    model(input_ids=ids, use_cache=False)
    handle.remove()
    return seen["x"].flatten(0, -2), seen["y"].flatten(0, -2)


@pytest.mark.parametrize("kind", ["o", "down"])
@pytest.mark.parametrize("family", POST_NORM_FAMILIES)
def test_the_weighted_hessian_is_the_error_after_the_models_own_post_norm(tiny_model, family, kind):
    """For a random ΔW, Σ_t ‖J_t ΔW x_t‖² with J_t the autograd Jacobian of the block's own post-norm at the token's
    output equals tr(diag(gain²) ΔW H̃ ΔWᵀ) · N/2 up to the radial part the weighting leaves out (a 1/d share for
    a random direction); the unweighted H misses it by the spread of the outputs' sizes."""
    model, arch = tiny_model(family, initializer_range=INIT)
    ids = segments(6, 16)
    hessians = collect(model, arch, ids)
    layer = next(layer for layer in arch.block_layers(0) if layer.kind == kind)
    assert set(hessians.output_normed) == {other.name for other in arch.block_layers(0)
                                                if other.kind in ("o", "down")}
    norm_module = output_norm_modules(model.get_submodule(f"{arch.blocks_path}.0"))[kind]
    gain = RmsNorm.of(norm_module).gain
    x, y = recorded(model, arch, ids, kind)
    delta = torch.randn(get_weight(model, layer).shape, generator=torch.Generator().manual_seed(3)) * 1e-2
    changes = x @ delta.T  # ΔW x_t, tokens × d_out
    exact = sum(torch.autograd.functional.jvp(norm_module, y[t:t + 1], changes[t:t + 1])[1].square().sum()
                for t in range(len(y)))
    weighted = torch.trace(torch.diag(gain.square()) @ delta @ hessians.output_normed[layer.name] @ delta.T)
    unweighted = torch.trace(torch.diag(gain.square()) @ delta @ hessians.layerwise[layer.name] @ delta.T)
    n = len(y)
    assert weighted * n / 2 == pytest.approx(exact.item(), rel=0.06)
    # one weight for every token, the mean of 1/σ², misses by far more
    unweighted_scaled = unweighted * n / 2 * (1 / (y.square().mean(-1) + RmsNorm.of(norm_module).eps)).mean()
    assert abs(unweighted_scaled / exact - 1) > 3 * abs(weighted * n / 2 / exact - 1)


def test_the_value_hessian_weighs_each_query_by_the_post_norm_after_the_out_projection(tiny_model):
    """H_V,g = (2/(N r)) Σ_h Σ_t (A_h X)_t (A_h X)_tᵀ / σ_t², σ_t the RMS of the out projection's output at query t."""
    model, arch = tiny_model("gemma3_text", initializer_range=INIT)
    ids = segments(4, 16)
    step = next(iter(BlockWalk(model, arch, ids, batch_size=2, stop=1)))
    options = CollectOptions(attention=True, probes=0, output_norms=True, row_weights="attention")
    with HessianCollector(step, arch, options) as collector:
        for batch in step.batches():
            step.keep_output(batch, collector.process(batch))
    hessians = collector.result()
    attention = model.get_submodule(f"{arch.blocks_path}.0.{arch.attention_attr}")
    seen = {}
    handle = attention.register_forward_hook(lambda m, args, out: seen.update(probs=out[1].detach()))
    x, _ = recorded(model, arch, ids, "v")
    handle.remove()
    _, y = recorded(model, arch, ids, "o")
    eps = RmsNorm.of(output_norm_modules(model.get_submodule(f"{arch.blocks_path}.0"))["o"]).eps
    inverse = (y.square().mean(-1) + eps).rsqrt().reshape(len(ids), -1)  # (n, L)
    x = x.reshape(len(ids), -1, x.shape[-1])
    repeats = arch.n_heads // arch.n_kv_heads
    v_layer = next(layer for layer in arch.block_layers(0) if layer.kind == "v")
    for g in range(arch.n_kv_heads):
        outputs = seen["probs"][:, g * repeats:(g + 1) * repeats] @ x[:, None]  # (n, r, L, d_in)
        weighted = (outputs * inverse[:, None, :, None]).reshape(-1, x.shape[-1]).double()
        expected = weighted.T @ weighted * (2 / (ids.numel() * repeats))
        torch.testing.assert_close(hessians.value[v_layer.name][g].double(), expected, rtol=1e-4, atol=1e-7)


def test_blocks_without_post_norms_get_no_weighted_hessians(tiny_model):
    model, arch = tiny_model("llama")
    assert output_norm_modules(model.get_submodule(f"{arch.blocks_path}.0")) == {}
    assert collect(model, arch, segments(4, 12)).output_normed == {}


def test_a_post_norm_that_does_not_read_the_projection_output_is_refused(tiny_model):
    model, arch = tiny_model("gemma3_text")
    layer = next(layer for layer in arch.block_layers(0) if layer.kind == "o")

    def doubled_output(block):  # after the collector's hook: the norm reads 2y while y was recorded
        block.get_submodule(layer.module_path[len(f"{arch.blocks_path}.0."):]).register_forward_hook(
            lambda m, args, out: 2 * out)

    with pytest.raises(UserError, match="does not read the output of"):
        collect(model, arch, segments(4, 12), disturb=doubled_output)


@pytest.mark.parametrize("method", ["attention", "aespa"])
def test_the_attention_aware_methods_quantize_o_and_down_under_the_weighted_hessian(tiny_model, method):
    model, arch = tiny_model("gemma3_text", initializer_range=INIT)
    hessians = collect(model, arch, segments(6, 16))
    layer = next(layer for layer in arch.block_layers(0) if layer.kind == "down")
    weight = get_weight(model, layer).detach()
    config = QuantConfig(bits=3, group_size=16)
    settings = QuantizeSettings(method="attention", output_norms=True, act_order_from=None)
    quantized, _ = quantize_layer(weight, layer, hessians, config, settings)
    expected = gptq(weight, hessians.output_normed[layer.name], config, act_order=False, damp=settings.damp).weight
    torch.testing.assert_close(quantized, expected)
    assert not torch.equal(quantized, gptq(weight, hessians.layerwise[layer.name], config, damp=settings.damp).weight)
    if method == "aespa":
        from aptq.aespa import layer_objective
        objective = layer_objective(layer, weight, hessians, None)
        torch.testing.assert_close(objective.column[0], hessians.output_normed[layer.name])


def test_output_norms_enter_the_run_key_only_when_on():
    assert "output_norms" not in QuantizeSettings().key_fields()
    assert QuantizeSettings(output_norms=True).key_fields()["output_norms"] is True
    assert "output_norms" not in QuantizeSettings(method="gptq", output_norms=True).key_fields()

