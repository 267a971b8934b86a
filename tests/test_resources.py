"""Bad input of the machine kind: a model larger than memory allows, a disk too small for a run, a device that runs
out of memory or disappears mid-run (simulated by raising PyTorch's own error types from a hook on a real block):
one sentence, the finished blocks kept, the run resumable to the same result."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import aptq.pipeline as pipeline
from aptq import analyses, history, resources
from aptq.data import Sampling, calibration_segments, token_ids
from aptq.errors import UserError
from aptq.models import load_model
from aptq.pipeline import EvalSettings, QuantizeSettings, quantize_model, run_plan, uniform_plan
from aptq.sensitivity import AnalysisSettings, analyze
from aptq.store import Store

SAMPLING = Sampling(4, 24, seed=0)
SETTINGS = AnalysisSettings(group_size=32, bits=(3,))
EVALUATION = EvalSettings(seqlen=32, max_tokens=128)  # windows longer than the calibration segments (24 tokens)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "RUN_CACHE", tmp_path / "runs")
    monkeypatch.setattr(pipeline, "REFERENCE_CACHE", tmp_path / "reference")


@pytest.fixture
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir("llama")), device="cpu")


def failing_block(loaded, block: int, error: RuntimeError,
                  seqlen: int | None = None) -> torch.utils.hooks.RemovableHandle:
    """A hook on one of the block's own layers (the walk's recording pass does not run them) that raises once, on the
    first input of `seqlen` tokens (None: on the first input)."""
    layer = next(layer for layer in loaded.arch.block_layers(block) if layer.kind == "down")
    raised = []

    def hook(module, args, output):
        if not raised and seqlen in (None, args[0].shape[1]):
            raised.append(True)
            raise error
    return loaded.model.get_submodule(layer.module_path).register_forward_hook(hook)


def test_weights_converted_on_loading_beyond_the_available_memory_are_refused(tiny_model_dir, monkeypatch):
    directory = tiny_model_dir("llama")  # float32 safetensors
    monkeypatch.setattr(resources, "available_memory", lambda: 2048)
    n_params = load_model(str(directory), device="cpu", dtype=torch.float32).n_params  # mapped, not converted
    needed = resources.readable_size(2 * n_params)
    with pytest.raises(UserError, match=rf"in float16 needs {needed} of memory .* only 2\.0 KiB is available"):
        load_model(str(directory), device="cpu", dtype=torch.float16)


def test_a_run_the_disk_cannot_hold_is_refused_before_any_block(loaded, text_corpus, monkeypatch):
    monkeypatch.setattr(resources, "free_disk", lambda directory: 1000)
    plan = uniform_plan(loaded.arch, 3)
    with pytest.raises(UserError, match=r"needs \d+\.\d KiB of disk .* only 1000 bytes is free"):
        quantize_model(loaded, plan, QuantizeSettings("rtn", 32), None, "disk-too-small")
    assert not (pipeline.RUN_CACHE / "disk-too-small").exists()


def test_out_of_device_memory_mid_analysis_keeps_the_finished_block_and_resumes(loaded, text_corpus, tmp_path):
    fresh, fresh_errors = analyze(loaded, text_corpus, SAMPLING, SETTINGS, store=Store(tmp_path / "fresh.duckdb"))
    store = Store(tmp_path / "failed.duckdb")
    handle = failing_block(loaded, 1, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(UserError, match=r"ran out of memory during the analysis of block 1 \(CUDA out of memory\. "
                                        r"Tried .*\); the 1 finished block\(s\) are kept"):
        analyze(loaded, text_corpus, SAMPLING, SETTINGS, store=store)
    handle.remove()
    key = fresh.attrs["analysis_key"]
    record = store.query("SELECT status, blocks_done FROM analyses WHERE key = ?", [key])
    assert record.to_dict("records") == [{"status": "interrupted", "blocks_done": 1}]
    resumed, resumed_errors = analyze(loaded, text_corpus, SAMPLING, SETTINGS, store=store)
    assert analyses.status(store, key).status == "complete"
    pd.testing.assert_frame_equal(resumed, fresh, rtol=1e-5)
    pd.testing.assert_frame_equal(resumed_errors, fresh_errors, rtol=1e-5)


def test_a_lost_device_mid_quantization_keeps_the_finished_block_and_resumes(loaded, text_corpus):
    segments = calibration_segments(token_ids(loaded.tokenizer, text_corpus, "calibration"), SAMPLING)
    plan = uniform_plan(loaded.arch, 3)
    settings = QuantizeSettings("gptq", 32)
    fresh, _ = quantize_model(loaded, plan, settings, segments, "fresh")
    handle = failing_block(loaded, 1, torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(UserError, match=r"failed during the quantization of block 1 \(CUDA error: an illegal memory "
                                        r"access was encountered\); the 1 finished block\(s\) are kept"):
        quantize_model(loaded, plan, settings, segments, "lost")
    handle.remove()
    first_block = pipeline.RUN_CACHE / "lost" / "block-0000.safetensors"
    written = first_block.stat().st_mtime_ns
    resumed, _ = quantize_model(loaded, plan, settings, segments, "lost")
    assert first_block.stat().st_mtime_ns == written  # block 0 came from the run directory
    for block in range(loaded.arch.n_blocks):
        for name, weight in fresh.block(block).items():
            assert torch.equal(resumed.block(block)[name], weight), name


def test_out_of_device_memory_mid_evaluation_stores_nothing_and_resumes_without_quantizing(loaded, text_corpus,
                                                                                          tmp_path):
    plan = uniform_plan(loaded.arch, 3)
    settings = QuantizeSettings("gptq", 32)
    fresh = run_plan(loaded, text_corpus, SAMPLING, plan, settings, EVALUATION, Store(tmp_path / "fresh.duckdb"))
    store = Store(tmp_path / "failed.duckdb")  # the reference is cached on disk now: the hook meets the quantized model
    loaded_weights = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    handle = failing_block(loaded, 1, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB"),
                           seqlen=EVALUATION.seqlen)
    with pytest.raises(UserError, match=r"ran out of memory during the evaluation of the quantized model \(CUDA out "
                                        r"of memory\. Tried .*\); the 2 finished block\(s\) are kept: run it again "
                                        r"on the CPU"):
        run_plan(loaded, text_corpus, SAMPLING, plan, settings, EVALUATION, store)
    handle.remove()
    assert all(torch.equal(p, loaded_weights[name]) for name, p in loaded.model.named_parameters())
    assert history.find_run(store, fresh.key) is None
    run_directory = pipeline.RUN_CACHE / fresh.key
    written = {path.name: path.stat().st_mtime_ns for path in run_directory.glob("block-*.safetensors")}
    assert len(written) == loaded.arch.n_blocks
    at_evaluation: dict[str, int] = {}

    def look_when_evaluating(done: int, total: int, message: str) -> None:
        if message.startswith("evaluating") and not at_evaluation:
            at_evaluation.update({path.name: path.stat().st_mtime_ns
                                  for path in run_directory.glob("block-*.safetensors")})
    resumed = run_plan(loaded, text_corpus, SAMPLING, plan, settings, EVALUATION, store, look_when_evaluating)
    assert at_evaluation == written  # evaluated from the kept blocks, none quantized again
    assert (resumed.perplexity, resumed.kl, resumed.top1) == (fresh.perplexity, fresh.kl, fresh.top1)
    assert history.find_run(store, fresh.key).perplexity == fresh.perplexity
    assert not run_directory.exists()  # removed once the run is stored


def test_a_lost_device_during_the_reference_evaluation_stores_nothing(loaded, text_corpus, tmp_path):
    store = Store(tmp_path / "lost.duckdb")
    plan, settings = uniform_plan(loaded.arch, 3), QuantizeSettings("rtn", 32)
    handle = failing_block(loaded, 0, torch.AcceleratorError("CUDA error: device-side assert triggered"),
                           seqlen=EVALUATION.seqlen)
    with pytest.raises(UserError, match=r"failed during the evaluation of the full-precision reference \(CUDA error: "
                                        r"device-side assert triggered\); the 0 finished block\(s\) are kept"):
        run_plan(loaded, text_corpus, SAMPLING, plan, settings, EVALUATION, store)
    handle.remove()
    key = pipeline.identify_run(loaded, text_corpus, SAMPLING, plan, settings, EVALUATION).key
    assert history.find_run(store, key) is None
    assert not list(pipeline.REFERENCE_CACHE.glob("*.pt"))  # no reference statistics cached half
