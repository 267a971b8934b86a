"""Full-precision targets (aptq.targets): the split of the objective, the walk's full-precision stream, the mismatch
moments against brute force, and the pipeline's use of them."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import aptq.pipeline as pipeline
from aptq.capture import BlockWalk
from aptq.choices import FP_TARGETS
from aptq.data import Sampling, calibration_segments, token_ids
from aptq.geometry import RmsNorm, output_norm_modules
from aptq.hessian import CollectOptions
from aptq.models import get_module, get_weight, load_model
from aptq.pipeline import QuantizeSettings, swapped_weights, uniform_plan
from aptq.targets import MismatchMoments, full_precision_target


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "RUN_CACHE", tmp_path / "runs")


def _objective(W, X, W_hat, X_tilde, G=None):
    """Σ_t (W x_t − Ŵ x̃_t)ᵀ G (W x_t − Ŵ x̃_t), X and X̃ with tokens as rows."""
    residual = X @ W.T - X_tilde @ W_hat.T
    G = torch.eye(W.shape[0], dtype=W.dtype) if G is None else G
    return torch.einsum("ti,ij,tj->", residual, G, residual)


def test_the_full_precision_target_splits_the_objective_exactly():
    torch.manual_seed(0)
    tokens, d_in, d_out = 200, 12, 5
    X = torch.randn(tokens, d_in, dtype=torch.float64) @ torch.randn(d_in, d_in, dtype=torch.float64)
    X_tilde = X + 0.3 * torch.randn(tokens, d_in, dtype=torch.float64)
    W = torch.randn(d_out, d_in, dtype=torch.float64)
    H = 2 / tokens * X_tilde.T @ X_tilde
    D = 2 / tokens * (X - X_tilde).T @ X_tilde
    target = full_precision_target(W, D, H, damp=0).double()
    # W* is the least-squares fit of the full-precision outputs on the quantized inputs
    fitted = torch.linalg.lstsq(X_tilde, X @ W.T).solution.T
    assert torch.allclose(target, fitted, rtol=1e-4, atol=1e-4)
    A = torch.randn(d_out, d_out, dtype=torch.float64)
    G = A @ A.T  # a row factor, as q/k's
    for W_hat in (torch.randn(d_out, d_in, dtype=torch.float64), torch.round(W * 2) / 2):
        for rows in (None, G):
            delta = target - W_hat
            split = _objective(W, X, target, X_tilde, rows) + tokens / 2 * torch.trace(
                (torch.eye(d_out, dtype=torch.float64) if rows is None else rows) @ delta @ H @ delta.T)
            assert torch.allclose(_objective(W, X, W_hat, X_tilde, rows), split, rtol=1e-4)
    # a share α of the full-precision objective: the least-squares fit of the blend of the two objectives
    share = 0.3
    blended = torch.linalg.lstsq(torch.cat([X_tilde * (1 - share) ** 0.5, X_tilde * share ** 0.5]),
                                 torch.cat([X_tilde @ W.T * (1 - share) ** 0.5, X @ W.T * share ** 0.5])).solution.T
    assert torch.allclose(full_precision_target(W, D, H, damp=0, share=share).double(), blended, rtol=1e-4,
                          atol=1e-4)
    # where the two streams agree the target is the weight itself, damping or not
    assert torch.equal(full_precision_target(W.float(), torch.zeros(d_in, d_in), H.float(), damp=0.01), W.float())


def test_a_hessian_that_does_not_factorize_raises_the_damping_as_gptq_does_or_keeps_the_weight():
    generator = torch.Generator().manual_seed(1)
    W, D = torch.randn(4, 6, generator=generator), torch.randn(6, 6, generator=generator)
    # one eigenvalue −0.02: H + 0.01 · mean(diag H) I is indefinite, H + 0.1 · mean(diag H) I is not
    H = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -0.02]))
    damped = H + 0.1 * H.diagonal().mean() * torch.eye(6)
    torch.testing.assert_close(full_precision_target(W, D, H, damp=0.01), W + W @ D @ torch.linalg.inv(damped))
    assert torch.equal(full_precision_target(W, D, -torch.eye(6), damp=0.01), W)  # no damping makes it factorize


def _perturbed(model, arch, block):
    """Every linear weight of `block` with noise (a stand-in for its quantized weights)."""
    generator = torch.Generator().manual_seed(block)
    return {layer.name: get_weight(model, layer) + 0.05 * torch.randn(get_weight(model, layer).shape,
                                                                        generator=generator)
            for layer in arch.block_layers(block)}


def _layer_inputs(model, arch, block, ids, outputs=None):
    """Each linear's input in `block` (tokens as rows) on a full forward of the model as it is; its outputs go to
    `outputs` when given."""
    seen = {}

    def keep(module, args, output, name):
        seen[name] = args[0].reshape(-1, args[0].shape[-1])
        if outputs is not None:
            outputs[name] = output.reshape(-1, output.shape[-1])

    handles = [get_module(model, layer.module_path).register_forward_hook(
        lambda module, args, output, name=layer.name: keep(module, args, output, name))
        for layer in arch.block_layers(block)]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_the_walks_full_precision_stream_and_mismatch_moments_match_brute_force(tiny_model, family):
    """Gemma 3's out and down projections are read by post-norms: their moments weigh each token by 1/σ(ỹ)²."""
    model, arch = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full_states = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    noise = {block: _perturbed(model, arch, block) for block in range(arch.n_blocks)}
    walk = BlockWalk(model, arch, ids, batch_size=3, reference=True)  # two batches, the second of one segment
    for step in walk:
        for batch in step.reference.batches():
            assert torch.allclose(batch.hidden, full_states[step.index][batch.segments.start:batch.segments.stop],
                                  atol=1e-5)
        if step.index == 1:
            layers = arch.block_layers(1)
            post_norms = output_norm_modules(step.block)
            normed = {layer.module_path: RmsNorm.of(post_norms[layer.kind]).eps for layer in layers
                      if layer.kind in post_norms}
            assert bool(normed) == (family == "gemma3_text")
            moments = MismatchMoments(step, layers, f"{arch.blocks_path}.1.", normed).collect()
            in_pieces = MismatchMoments(step, layers, f"{arch.blocks_path}.1.", normed).collect(parts=2)
            for layer in layers:
                assert torch.allclose(in_pieces[layer.name], moments[layer.name], rtol=1e-4, atol=1e-6), layer.name
            full, outputs = _layer_inputs(model, arch, 1, ids), {}
            with swapped_weights(model, arch, noise[0]):
                damaged = _layer_inputs(model, arch, 1, ids, outputs)
            for layer in layers:
                x, x_tilde = full[layer.name], damaged[layer.name]
                weights = torch.ones(x.shape[0])
                if layer.module_path in normed:
                    y = outputs[layer.name]
                    weights = 1 / (y.square().mean(-1) + normed[layer.module_path])
                expected = 2 / x.shape[0] * (x - x_tilde).T @ (x_tilde * weights[:, None])
                assert torch.allclose(moments[layer.name], expected, rtol=1e-4, atol=1e-5), layer.name
        with swapped_weights(model, arch, noise[step.index]):
            step.finish()  # true-sequential: the next block's inputs come from the "quantized" block
    # the quantized stream did move away from the full-precision one
    assert not torch.allclose(step.batch(0).hidden, full_states[step.index][:3], atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3_moe"])
def test_one_pass_over_the_quantized_stream_serves_the_hessians_and_the_moments(tiny_model, family):
    """The pipeline runs the full-precision stream's forwards inside the Hessian pass with the collector's hooks
    paused: every Hessian (the experts' too, whose recorder adds up rather than overwrites) and every moment as when
    the two are collected apart."""
    model, arch = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (6, 48), generator=torch.Generator().manual_seed(1))
    noise = _perturbed(model, arch, 0)
    options = CollectOptions(attention=True, probes=0, output_norms=True)
    walk = BlockWalk(model, arch, ids, batch_size=4, reference=True, stop=2)  # batches of 4 and 2
    for step in walk:
        if step.index == 0:
            with swapped_weights(model, arch, noise):
                step.finish()  # the streams part
            continue
        layers = [layer for layer in arch.block_layers(1) if layer.expert is None]
        post_norms = output_norm_modules(step.block)
        normed = {layer.module_path: RmsNorm.of(post_norms[layer.kind]).eps for layer in layers
                  if layer.kind in post_norms}
        prefix = f"{arch.blocks_path}.1."
        moments = MismatchMoments(step, layers, prefix, normed).collect()
        alone, _ = pipeline._collect(step, arch, options, {}, 1)
        merged, merged_moments = pipeline._collect(step, arch, options, {}, 1,
                                                   MismatchMoments(step, layers, prefix, normed))
        assert merged_moments.keys() == moments.keys()
        for name, moment in moments.items():
            assert moment.abs().max() > 0 and torch.equal(merged_moments[name], moment), name
        assert any(layer.expert is not None for layer in arch.block_layers(1)) == (family == "qwen3_moe")
        for part in ("layerwise", "value", "row", "output_normed", "layer_tokens"):
            assert getattr(merged, part).keys() == getattr(alone, part).keys()
            for name, value in getattr(alone, part).items():
                assert (value == getattr(merged, part)[name] if isinstance(value, int)
                        else torch.equal(getattr(merged, part)[name], value)), (part, name)


@pytest.mark.parametrize("family, settings", [("llama", QuantizeSettings("gptq", 32)),
                                               ("gemma3_text", QuantizeSettings("attention", 32, output_norms=True))])
def test_fp_targets_leave_block_zero_alone_and_fit_the_full_precision_outputs_after_it(tiny_model_dir, text_corpus,
                                                                                      family, settings):
    """Gemma 3 under the attention-aware quantizer: o and down fit the post-norm-weighted objective, v its layer-wise
    target, q and k theirs under their row factors."""
    loaded = load_model(str(tiny_model_dir(family)), device="cpu")
    segments = calibration_segments(token_ids(loaded.tokenizer, text_corpus, "calibration"), Sampling(6, 32, seed=0))
    plan = uniform_plan(loaded.arch, 8)
    runs = {fp: pipeline.quantize_model(loaded, plan, replace(settings, fp_targets=float(fp)), segments,
                                        key=f"targets-{fp}")[0] for fp in (False, True)}
    for layer in loaded.arch.block_layers(0):  # the two streams agree before the first quantized block: D = 0
        assert torch.equal(runs[True].block(0)[layer.name], runs[False].block(0)[layer.name])
    # block 1 sees the same inputs in both runs; against the full-precision model's outputs, the targets fit better
    full, outputs = _layer_inputs(loaded.model, loaded.arch, 1, segments), {}
    with runs[False].swapped(loaded.model, 0):
        damaged = _layer_inputs(loaded.model, loaded.arch, 1, segments, outputs)
    post_norms = output_norm_modules(loaded.model.get_submodule(loaded.arch.blocks_path)[1])
    for layer in loaded.arch.block_layers(1):
        W = get_weight(loaded.model, layer).float()
        weights = torch.ones(segments.numel())
        if layer.kind in post_norms:  # as H̃ weighs the tokens
            weights = 1 / (outputs[layer.name].square().mean(-1) + RmsNorm.of(post_norms[layer.kind]).eps)
        errors = {fp: _objective(W, full[layer.name] * weights[:, None] ** 0.5,
                                 runs[fp].block(1)[layer.name].float(), damaged[layer.name] * weights[:, None] ** 0.5)
                  for fp in runs}
        assert errors[True] < errors[False], layer.name
    assert "fp_targets" not in QuantizeSettings("gptq", fp_targets=0).key_fields()  # off: the keys of runs before it
    assert "fp_targets" not in QuantizeSettings("rtn").key_fields()
    assert QuantizeSettings("gptq").key_fields()["fp_targets"] == FP_TARGETS
