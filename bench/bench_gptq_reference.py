"""Our GPTQ against llm-compressor's GPTQ on the same real layer inputs: loss tr(ΔW H ΔWᵀ) and time.

llm-compressor pins its own transformers, so it lives in a separate environment and this script runs in two steps:

    .venv/bin/python -m bench.bench_gptq_reference dump --blocks 0,15,29 --samples 32 --seqlen 512
    python3 -m venv .venv-reference && .venv-reference/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    .venv-reference/bin/python -m bench.bench_gptq_reference compare

`dump` collects the layer-wise Hessians of the chosen blocks of the embedded model on Brown calibration segments and
saves weights and Hessians; `compare` quantizes each layer with both implementations (4 and 3 bits, per channel
and groups of 64, minmax grids without the clipping search so both use the same grid rule) and writes
bench/results/gptq_reference.md. Only aptq.gptq and aptq.quantizer (torch alone) are imported in the second step.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

DUMP = Path(os.environ.get("APTQ_CACHE_DIR", Path(__file__).resolve().parent.parent / "data")) / "cache" / \
    "gptq_reference_layers.pt"
RESULTS = Path(__file__).parent / "results" / "gptq_reference.md"


def dump(blocks: list[int], samples: int, seqlen: int) -> None:
    from aptq.capture import BlockWalk
    from aptq.data import Sampling, calibration_segments, load_corpus, token_ids
    from aptq.hessian import CollectOptions, HessianCollector
    from aptq.models import get_weight, load_model

    loaded = load_model(device="cpu")
    corpus = load_corpus("brown")
    segments = calibration_segments(token_ids(loaded.tokenizer, corpus, "calibration"), Sampling(samples, seqlen))
    layers = {}
    for step in BlockWalk(loaded.model, loaded.arch, segments, stop=max(blocks) + 1):
        if step.index not in blocks:
            continue
        with HessianCollector(step, loaded.arch, CollectOptions(attention=False, probes=0)) as collector:
            for batch in step.batches():
                step.keep_output(batch, collector.process(batch))
        hessians = collector.result()
        for layer in loaded.arch.block_layers(step.index):
            layers[layer.name] = (get_weight(loaded.model, layer).detach().clone(), hessians.layerwise[layer.name])
    DUMP.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"layers": layers, "calibration": f"{samples} × {seqlen} Brown tokens"}, DUMP)
    print(f"saved {len(layers)} layers to {DUMP}")


def reference_gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    if group:
        args = QuantizationArgs(num_bits=bits, symmetric=False, strategy="group", group_size=group)
        blocks = W.reshape(W.shape[0], -1, group)
        scale, zero = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)
    else:
        args = QuantizationArgs(num_bits=bits, symmetric=False, strategy="channel")
        scale, zero = calculate_qparams(W.amin(1, keepdim=True), W.amax(1, keepdim=True), args)
    quantized, _, _ = quantize_weight(W[None].clone(), H[None].clone(), scale[None], zero[None], None, args)
    return quantized[0]


def compare() -> None:
    from aptq.gptq import gptq
    from aptq.quantizer import QuantConfig, layer_error

    saved = torch.load(DUMP)
    lines = ["# Our GPTQ against llm-compressor's GPTQ on the same layer inputs", "",
             f"- date: {time.strftime('%Y-%m-%d')}; machine: {os.cpu_count()} cores, {platform.processor() or 'CPU'}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads",
             "- commands: see the docstring of bench/bench_gptq_reference.py (dump, then compare in the reference "
             "environment with llmcompressor 0.14.0.1)",
             f"- inputs: embedded SmolLM2-135M weights, layer-wise Hessians from {saved['calibration']}; asymmetric "
             "minmax grids (no clipping search), blocks of 128 columns, 1 % damping", "",
             "| layer | bits | group | loss (ours) | loss (llm-compressor) | ours / theirs | time ours ms | "
             "time theirs ms |", "|---|---|---|---|---|---|---|---|"]
    ratios, time_ours, time_theirs = [], 0.0, 0.0
    for name, (W, H) in saved["layers"].items():
        for bits in (4, 3):
            for group in (0, 64):
                start = time.perf_counter()
                ours = gptq(W, H, QuantConfig(bits, group, clip_search=False)).weight
                t_ours = time.perf_counter() - start
                start = time.perf_counter()
                theirs = reference_gptq(W, H, bits, group)
                t_theirs = time.perf_counter() - start
                loss_ours, loss_theirs = layer_error(W, ours, H), layer_error(W, theirs, H)
                ratios.append(loss_ours / loss_theirs)
                time_ours += t_ours
                time_theirs += t_theirs
                lines.append(f"| {name} | {bits} | {group or 'channel'} | {loss_ours:.5g} | {loss_theirs:.5g} | "
                             f"{ratios[-1]:.4f} | {t_ours * 1e3:.0f} | {t_theirs * 1e3:.0f} |")
    ratios_t = torch.tensor(ratios)
    lines[6:6] = [f"- summary over {len(ratios)} (layer, bits, group) cases: loss ratio ours/theirs median "
                  f"{ratios_t.median():.4f}, min {ratios_t.min():.4f}, max {ratios_t.max():.4f}; total time ours "
                  f"{time_ours:.2f} s, theirs {time_theirs:.2f} s (ratio {time_ours / time_theirs:.2f})", ""]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["dump", "compare"])
    parser.add_argument("--blocks", default="0,15,29")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    if args.step == "dump":
        dump([int(b) for b in args.blocks.split(",")], args.samples, args.seqlen)
    else:
        compare()


if __name__ == "__main__":
    main()
