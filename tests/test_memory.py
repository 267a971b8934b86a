"""Big-model memory behaviour on tiny models: block-by-block evaluation equals the whole-model pass, quantization
leaves the loaded model bit-identical (weights swapped by reference, never copied), split batches (the out-of-memory
path) give the same Hessians."""

from __future__ import annotations

import pytest
import torch

import aptq.pipeline as pipeline
from aptq.capture import BlockWalk
from aptq.data import Sampling, calibration_segments, token_ids
from aptq.evaluate import _log_prob_batches, evaluate, reference_stats
from aptq.hessian import CollectOptions, HessianCollector
from aptq.models import get_weight, load_model
from aptq.pipeline import QuantizeSettings, quantize_model, uniform_plan
from aptq.progress import no_progress


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "RUN_CACHE", tmp_path / "runs")


def _windows(seed: int, n: int = 5, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 1000, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
def test_block_by_block_evaluation_gives_the_whole_model_logits(tiny_model, family):
    model, _ = tiny_model(family)
    windows = _windows(0)
    with torch.inference_mode():
        whole = torch.cat(list(_log_prob_batches(model, windows, 2, "cpu", False, None, no_progress)))
        blockwise = torch.cat(list(_log_prob_batches(model, windows, 2, "cpu", True, None, no_progress)))
        direct = torch.log_softmax(model(windows).logits[:, :-1].float(), -1)
    torch.testing.assert_close(whole, direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(blockwise, whole, rtol=1e-4, atol=1e-4)
    reference = reference_stats(model, windows, blockwise=False)
    a = evaluate(model, windows, reference=reference, batch_size=2, blockwise=False)
    b = evaluate(model, windows, reference=reference, batch_size=2, blockwise=True)
    assert b.perplexity == pytest.approx(a.perplexity, rel=1e-5)
    assert b.top1_agreement == a.top1_agreement == 1.0 and abs(b.kl_divergence) < 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_quantize_and_evaluate_leave_every_loaded_parameter_bit_identical(tiny_model_dir, text_corpus, family):
    loaded = load_model(str(tiny_model_dir(family)), device="cpu")
    before = {name: (param, param.detach().clone()) for name, param in loaded.model.named_parameters()}
    segments = calibration_segments(token_ids(loaded.tokenizer, text_corpus, "calibration"), Sampling(4, 32))
    quantized, _ = quantize_model(loaded, uniform_plan(loaded.arch, 3), QuantizeSettings("attention", 32), segments,
                                  key=f"memory-{family}")
    windows = _windows(1, 3, 32)
    whole = evaluate(loaded.model, windows, weights=quantized, blockwise=False)
    blockwise = evaluate(loaded.model, windows, weights=quantized, blockwise=True)
    plain = evaluate(loaded.model, windows)
    after = dict(loaded.model.named_parameters())
    assert after.keys() == before.keys()
    for name, (param, values) in before.items():
        assert after[name] is param and torch.equal(param, values), name  # same tensor object, same bits
    assert blockwise.perplexity == pytest.approx(whole.perplexity, rel=1e-5)
    assert whole.perplexity != pytest.approx(plain.perplexity, rel=1e-6)  # the quantized weights were in use
    with quantized.applied(loaded.model) as model:  # and they are the ones on disk, swapped in by reference
        layer = loaded.arch.layers[0]
        stored = quantized.block(layer.block)[layer.name]
        assert torch.equal(get_weight(model, layer), stored)
    assert all(torch.equal(p, before[n][1]) for n, p in loaded.model.named_parameters())


def test_split_batches_give_the_same_hessians(tiny_model):
    """The out-of-memory path processes each batch in pieces: the Hessians must not change."""
    model, arch = tiny_model("llama")
    segments = _windows(2, 4, 16)
    results = []
    for parts in (1, 4):
        step = next(iter(BlockWalk(model, arch, segments, device="cpu", batch_size=4)))
        with HessianCollector(step, arch, CollectOptions(attention=True, probes=1)) as collector:
            for batch in step.batches():
                for piece in step.split(batch, parts):
                    collector.process(piece)
        results.append(collector.result())
    whole, split = results
    for name in whole.layerwise:
        torch.testing.assert_close(split.layerwise[name], whole.layerwise[name], rtol=1e-5, atol=1e-6)
        assert split.lm_trace[name] == pytest.approx(whole.lm_trace[name], rel=1e-5)
    for name in whole.row:
        torch.testing.assert_close(split.row[name], whole.row[name], rtol=1e-5, atol=1e-6)
    for name in whole.value:
        torch.testing.assert_close(split.value[name], whole.value[name], rtol=1e-5, atol=1e-6)


def test_probes_drawn_on_the_compute_device_keep_the_seeded_signs():
    """Drawn where the block runs (here the CPU): the same signs as the previous host-side draw for every seed."""
    from aptq.hessian import rademacher

    for seed in (0, 7, 2**40 + 3):
        previous = torch.randint(0, 2, (5, 12), generator=torch.Generator().manual_seed(seed)).float() * 2 - 1
        assert torch.equal(rademacher((5, 12), seed, torch.device("cpu")), previous)
