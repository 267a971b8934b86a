"""Packed exports loaded by the real libraries — GPTQModel (its torch CPU kernel) and compressed-tensors (through
transformers) — against the perplexity of the run they came from; on-disk sizes against FP16.

The libraries pin their own transformers/torch, so they live in a separate environment and this runs in two steps:

    PYTHONPATH=. .venv/bin/python bench/bench_export_reference.py export
    python3 -m venv .venv-reference && .venv-reference/bin/pip install torch==2.13.0
    .venv-reference/bin/pip install --no-deps gptqmodel==7.7.0     # it asks for torch>=2.14.1; its torch kernel
    .venv-reference/bin/pip install -c <(echo torch==2.13.0) accelerate safetensors "transformers>=5" threadpoolctl \
        packaging device-smi protobuf pillow requests pypcre tokenicer logbar jinja2 dill defuser \
        compressed-tensors==0.20.1                                  # runs on torch 2.13 (see bench/results/export.md)
    PYTHONPATH=. .venv-reference/bin/python bench/bench_export_reference.py load

`export` quantizes the embedded model with RTN in groups of 64 — uniform 4-bit, uniform 4-bit symmetric, uniform
3-bit, and a knapsack plan at 3.0 bits (on weight-space RTN errors, see `proxy_tables`) — evaluates each on 2048
Brown tokens (window 512),
and exports GPTQ, compressed-tensors and llama.cpp overrides under data/cache/export-bench/. `load` loads each packed
checkpoint with the real library, measures its perplexity on the same windows and writes bench/results/export.md.
Only aptq.evaluate (torch alone) is imported in the second step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("APTQ_CACHE_DIR", Path(__file__).resolve().parent.parent / "data")) / "cache"
EXPORTS = CACHE / "export-bench"
MANIFEST = EXPORTS / "manifest.json"
WINDOWS = EXPORTS / "windows.pt"
RESULTS = Path(__file__).parent / "results" / "export.md"
GROUP = 64
SEQLEN, TOKENS = 512, 2048
TOLERANCE = 0.005  # the bar: within 0.5 % of the run's perplexity


def _size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*.safetensors"))


def proxy_tables(loaded) -> tuple:
    """Layers and predicted errors for the knapsack without an analysis (which takes hours on this shared machine):
    the weight-space RTN error ‖W − rtn(W)‖² per (layer, width), groups of 64, no clipping search. (our choice: the
    knapsack plan here is for the size comparison only; its widths need not be the analysis' ones.)"""
    import pandas as pd

    from aptq.models import get_weight
    from aptq.pipeline import layer_table
    from aptq.quantizer import QuantConfig, rtn

    layers = layer_table(loaded).assign(block=[layer.block for layer in loaded.arch.layers],
                                        fused=[layer.fused for layer in loaded.arch.layers])
    errors = []
    for layer in loaded.arch.layers:
        weight = get_weight(loaded.model, layer).detach()
        for bits in (2, 3, 4, 8):
            error = float((rtn(weight, QuantConfig(bits, GROUP, clip_search=False)) - weight).square().sum())
            errors.append({"layer": layer.name, "bits": bits, "err_layerwise": error, "err_attention": error,
                           "group_size": GROUP})
    return layers, pd.DataFrame(errors)


def export() -> None:
    from aptq.allocate import AllocationRequest, allocate
    from aptq.data import Sampling, evaluation_windows, load_corpus, token_ids
    from aptq.models import load_model
    from aptq.pipeline import EvalSettings, QuantizeSettings, run_plan, uniform_plan
    from aptq.progress import tqdm_progress
    from aptq.store import Store

    loaded = load_model(device="cpu")
    corpus = load_corpus("brown")
    store = Store(CACHE / "export-bench.duckdb")
    sampling = Sampling(8, 128, 0)  # unused by RTN runs (part of run_plan's signature)
    knapsack = allocate(*proxy_tables(loaded), AllocationRequest(3.0, "knapsack", group_size=GROUP)).bits
    plans = {"uniform-4bit": (uniform_plan(loaded.arch, 4), False),
             "uniform-4bit-sym": (uniform_plan(loaded.arch, 4), True),
             "uniform-3bit": (uniform_plan(loaded.arch, 3), False), "knapsack-3.0bit": (knapsack, False)}
    evaluation = EvalSettings(SEQLEN, TOKENS)
    manifest = {}
    for name, (plan, symmetric) in plans.items():
        target = EXPORTS / name
        start = time.perf_counter()
        bar, close = tqdm_progress(name)
        row = run_plan(loaded, corpus, sampling, plan, QuantizeSettings("rtn", GROUP, symmetric), evaluation, store,
                       bar, {"name": name}, target, overwrite=True,
                       export_formats=("gptq", "compressed-tensors", "llama.cpp"))
        close()
        bits = list(plan.values())
        manifest[name] = {"perplexity": row["perplexity"], "kl": row["kl"], "fp_perplexity": row["fp_perplexity"],
                          "symmetric": symmetric, "average_bits": sum(bits) / len(bits),
                          "widths": {str(b): bits.count(b) for b in sorted(set(bits))},
                          "seconds": time.perf_counter() - start}
        print(name, manifest[name])
    fp16 = sum(t.numel() * 2 for t in {p.data_ptr(): p for p in loaded.model.state_dict().values()}.values())
    torch.save(evaluation_windows(token_ids(loaded.tokenizer, corpus, "evaluation"), SEQLEN, TOKENS), WINDOWS)
    MANIFEST.write_text(json.dumps({"fp16_bytes": fp16, "runs": manifest}, indent=2))


def _gptqmodel(directory: Path) -> torch.nn.Module:
    from gptqmodel import BACKEND, GPTQModel

    return GPTQModel.load(str(directory), backend=BACKEND.TORCH, device="cpu").model.eval()


def _compressed_tensors(directory: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def _compressed_tensors_decompressor(directory: Path) -> torch.nn.Module:
    """The checkpoint's tensors into a float32 model, each quantized module decompressed by compressed-tensors' own
    pack-quantized decompressor (for checkpoints that transformers' loader refuses, see the results)."""
    import re

    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(directory))
    quantization = config.quantization_config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = load_file(str(directory / "model.safetensors"))
    schemes = {target.removeprefix("re:"): QuantizationScheme.model_validate(group)
               for group in quantization["config_groups"].values() for target in group["targets"]}
    weights = {}
    for name, module in model.named_modules():
        scheme = next((scheme for pattern, scheme in schemes.items() if re.match(pattern, name)), None)
        if scheme is None:
            continue
        local = {key.removeprefix(name + "."): state.pop(key) for key in list(state) if key.startswith(name + ".")}
        weights[name + ".weight"] = PackedQuantizationCompressor.decompress(local, scheme)["weight"].float()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in (state | weights).items()}, strict=False)
    assert not unexpected and all(key.endswith("lm_head.weight") for key in missing), (missing, unexpected)
    model.tie_weights()
    return model


LOADERS = {"gptq": ("GPTQModel, BACKEND.TORCH (float16)", _gptqmodel),
           "compressed-tensors": ("transformers + compressed-tensors (decompressed, float32)", _compressed_tensors)}
FALLBACK = ("compressed-tensors' PackedQuantizationCompressor.decompress into a float32 model",
            _compressed_tensors_decompressor)


def load() -> None:
    import compressed_tensors
    import gptqmodel
    import transformers

    from aptq.evaluate import evaluate

    saved = json.loads(MANIFEST.read_text())
    windows = torch.load(WINDOWS)
    rows, sizes, failures = [], [], []
    for name, run in saved["runs"].items():
        for fmt, (label, loader) in LOADERS.items():
            try:
                model = loader(EXPORTS / name / fmt)
            except Exception as error:  # a loader's failure is a result to record, not a crash
                failures.append(f"- {name} / {fmt} with {label}: {type(error).__name__}: {str(error)[:300]}")
                if fmt != "compressed-tensors":
                    continue
                label, model = FALLBACK[0], FALLBACK[1](EXPORTS / name / fmt)
            measured = evaluate(model, windows).perplexity
            gap = measured / run["perplexity"] - 1
            rows.append(f"| {name} | {fmt} | {label} | {run['perplexity']:.4f} | {measured:.4f} | {100 * gap:+.3f} % "
                        f"| {'yes' if abs(gap) <= TOLERANCE else 'NO'} |")
        packed = {fmt: _size(EXPORTS / name / fmt) for fmt in LOADERS}
        sizes.append(f"| {name} | {run['average_bits']:.3f} | {run['widths']} | {_size(EXPORTS / name) / 2 ** 20:.1f} "
                     f"| {packed['gptq'] / 2 ** 20:.1f} ({packed['gptq'] / saved['fp16_bytes']:.3f}) "
                     f"| {packed['compressed-tensors'] / 2 ** 20:.1f} "
                     f"({packed['compressed-tensors'] / saved['fp16_bytes']:.3f}) |")
    lines = ["# Packed exports loaded by the real libraries", "",
             f"- date: {time.strftime('%Y-%m-%d')}; machine: {os.cpu_count()} cores shared with other helpers' jobs "
             f"running at the same time, {platform.processor() or 'CPU'}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads",
             f"- libraries: gptqmodel {gptqmodel.__version__}, compressed-tensors {compressed_tensors.__version__}, "
             f"transformers {transformers.__version__}",
             "- commands: see the docstring of bench/bench_export_reference.py (export in .venv, load in "
             ".venv-reference)",
             f"- runs: embedded SmolLM2-135M, RTN with the clipping search, groups of {GROUP}; perplexity on "
             f"{TOKENS} Brown evaluation tokens, window {SEQLEN}; 'run' = our float32 model as evaluated by the "
             "pipeline, 'loaded' = the packed checkpoint as the library loads and runs it", "",
             "| plan | format | loaded with | run perplexity | loaded perplexity | gap | within 0.5 % |",
             "|---|---|---|---|---|---|---|", *rows, "", *(["Failures:", "", *failures, ""] if failures else []),
             f"Sizes (safetensors on disk; FP16 model = {saved['fp16_bytes'] / 2 ** 20:.1f} MiB, embeddings "
             "included and tied once; ratio to FP16 in brackets):", "",
             "| plan | average bits | layers per width | dequantized directory (float32) MiB | GPTQ MiB | "
             "compressed-tensors MiB |", "|---|---|---|---|---|---|", *sizes, ""]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("export", "load"))
    {"export": export, "load": load}[parser.parse_args().step]()
