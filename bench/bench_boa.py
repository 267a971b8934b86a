"""BoA's row compensation for the value projection and act-order, measured on held-out calibration data (issue 19).

    flock /tmp/heavy.lock env OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/bench_boa.py \
        [--blocks 0,10] [--bits 2,3,4] [--group 64] [--samples 32] [--seqlen 512] [--holdout 0.25]

The calibration segments are split as the unit calibration does (aptq.calibrate.validation_segments): the first part
fits (its Hessians quantize), the last `--holdout` share validates (never the evaluation split). Per block
(full-precision inputs), bit width and setting of the attention-aware method in `SETTINGS` (v per head or with row
factors; act-order off or on), every layer of the block is quantized with `aptq.pipeline.quantize_layer` from the fit
part's Hessians; the table gives

- each layer's attention-wise objective (aptq.aespa.layer_objective: v `Σ_g tr(R_g ΔW_g H_V,g ΔW_gᵀ)`, q/k
  `tr(G ΔW H ΔWᵀ)`, o and MLP `tr(ΔW H ΔWᵀ)`) on the validation part's Hessians;
- the relative error of the attention module's output (after the out projection) on the validation segments with only
  v quantized, `Σ ‖ΔY‖² / Σ ‖Y‖²`;
- the relative error of the block's output on the validation segments with the whole block quantized.

Appends the run to bench/results/quantizer.md and prints it.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from aptq.aespa import layer_objective, out_projection
from aptq.calibrate import validation_segments
from aptq.capture import Batch, BlockStep, BlockWalk
from aptq.data import Sampling, calibration_segments, load_corpus, token_ids
from aptq.gptq import gptq_per_head
from aptq.hessian import BlockHessians, CollectOptions
from aptq.models import LoadedModel, get_weight, load_model
from aptq.pipeline import QuantizeSettings, quantize_layer, swapped_weights
from aptq.quantizer import QuantConfig
from aptq.sensitivity import collect_block

RESULTS = Path(__file__).resolve().parent / "results" / "quantizer.md"
SETTINGS = {  # label → (value_rows, act_order); "summed": the row factor of the group's summed out slices
    "v per head": (False, False),
    "v rows": (True, False),
    "v rows of summed slices": ("summed", False),
    "v rows, act-order": (True, True),
}


@dataclass(frozen=True)
class Measured:
    objective: dict[str, float]  # layer kind → validation objective
    attention_error: float  # relative, only v quantized
    block_error: float  # relative, the whole block quantized
    value_seconds: float  # quantizing v
    seconds: float  # quantizing the block


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def kind_of(name: str) -> str:
    return name.rsplit(".", 1)[1].removesuffix("_proj")


@torch.no_grad()
def relative_output_error(loaded: LoadedModel, step: BlockStep, weights: dict[str, torch.Tensor],
                          attention_only: bool) -> float:
    """`Σ ‖Y_q − Y‖² / Σ ‖Y‖²` over the step's batches: the attention module's output or the block's."""
    attention = step.block.get_submodule(loaded.arch.attention_attr)
    captured: list[torch.Tensor] = []
    handle = attention.register_forward_hook(lambda module, args, output: captured.append(output[0]))

    def output_of(batch: Batch) -> torch.Tensor:
        captured.clear()
        block_output = step.forward(batch)
        return captured[0] if attention_only else block_output

    try:
        error = total = 0.0
        for batch in step.batches():
            reference = output_of(batch)
            with swapped_weights(loaded.model, loaded.arch, weights):
                output = output_of(batch)
            error += float((output - reference).double().pow(2).sum())
            total += float(reference.double().pow(2).sum())
    finally:
        handle.remove()
    return error / total


def summed_row_factor(out_weight: torch.Tensor, n_kv: int, head_dim: int) -> torch.Tensor:
    """`(Σ_{h∈g} W_O,h)ᵀ (Σ_{h∈g} W_O,h)` per KV head: the exact row factor of the attention output (o_proj adds
    the heads) when a group's heads attend alike, cross terms within the group included (a candidate to
    `out_row_factor`'s sum of per-head Gram matrices, which leaves them out)."""
    slices = out_weight.float().reshape(out_weight.shape[0], -1, head_dim).transpose(0, 1)  # h × d_model × d_h
    summed = slices.reshape(n_kv, -1, out_weight.shape[0], head_dim).sum(dim=1)
    return summed.transpose(1, 2) @ summed


def measure_block(loaded: LoadedModel, fit: BlockHessians, held: BlockHessians, held_step: BlockStep, bits: int,
                  group: int) -> dict[str, Measured]:
    """Every setting; the layers other than v are quantized once per act-order setting (v alone differs)."""
    out_weight = out_projection(loaded.model, loaded.arch, held_step.index)
    config = QuantConfig(bits, group)
    layers = loaded.arch.block_layers(held_step.index)
    originals = {layer.name: get_weight(loaded.model, layer).detach() for layer in layers}

    def quantized(names: list[str], settings: QuantizeSettings) -> tuple[dict[str, torch.Tensor], float]:
        start = time.perf_counter()
        weights = {layer.name: quantize_layer(originals[layer.name], layer, fit, config, settings, out_weight)[0]
                   for layer in layers if layer.name in names}
        return weights, time.perf_counter() - start

    values = [name for name in originals if kind_of(name) == "v"]
    others = [name for name in originals if kind_of(name) != "v"]
    shared = {act_order: quantized(others, QuantizeSettings("attention", group, act_order=act_order))
              for act_order in {act_order for _, act_order in SETTINGS.values()}}
    results = {}
    for label, (value_rows, act_order) in SETTINGS.items():
        if value_rows == "summed":
            start = time.perf_counter()
            value = {name: gptq_per_head(originals[name], fit.value[name], config, act_order=act_order,
                                         row_factors=summed_row_factor(out_weight, fit.value[name].shape[0],
                                                                       loaded.arch.head_dim)).weight
                     for name in values}
            value_seconds = time.perf_counter() - start
        else:
            value, value_seconds = quantized(values, QuantizeSettings("attention", group, act_order=act_order,
                                                                      value_rows=value_rows))
        weights = shared[act_order][0] | value
        objective = {kind_of(layer.name): layer_objective(layer, originals[layer.name], held, out_weight).loss(
            originals[layer.name], weights[layer.name]) for layer in layers}
        results[label] = Measured(objective, relative_output_error(loaded, held_step, value, attention_only=True),
                                  relative_output_error(loaded, held_step, weights, attention_only=False),
                                  value_seconds, shared[act_order][1] + value_seconds)
    return results


def section(block: int, bits: int, results: dict[str, Measured]) -> list[str]:
    base = results["v per head"]
    kinds = list(base.objective)
    lines = [f"#### Block {block}, {bits} bits", "",
             "| setting | " + " | ".join(f"{kind} obj." for kind in kinds)
             + " | attention out (v only) | block out (all) | v s | block s |",
             "|---" * (len(kinds) + 5) + "|"]
    for label, measured in results.items():
        cells = [f"{measured.objective[kind]:.4g}" + ("" if measured is base else
                                                       f" ({measured.objective[kind] / base.objective[kind]:.3f})")
                 for kind in kinds]
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {measured.attention_error:.4e} ({measured.attention_error / base.attention_error:.3f})"
                     f" | {measured.block_error:.4e} ({measured.block_error / base.block_error:.3f})"
                     f" | {measured.value_seconds:.1f} | {measured.seconds:.0f} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", default="0,10")
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--holdout", type=float, default=0.25)
    args = parser.parse_args()
    blocks = sorted(int(b) for b in args.blocks.split(","))
    command = (f"flock /tmp/heavy.lock env OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/bench_boa.py "
               f"--blocks {args.blocks} --bits {args.bits} --group {args.group} --samples {args.samples} "
               f"--seqlen {args.seqlen} --holdout {args.holdout}")
    load_before, started = load_average(), time.perf_counter()
    loaded = load_model(device="cpu")
    segments = calibration_segments(token_ids(loaded.tokenizer, load_corpus("brown"), "calibration"),
                                    Sampling(args.samples, args.seqlen, seed=0))
    held_segments = validation_segments(segments, args.holdout)
    fit_segments = segments[:segments.shape[0] - held_segments.shape[0]]
    options = CollectOptions(attention=True, probes=0)
    walks = [BlockWalk(loaded.model, loaded.arch, part, device="cpu", stop=blocks[-1] + 1)
             for part in (fit_segments, held_segments)]
    lines = [f"### Run of {time.strftime('%Y-%m-%d %H:%M')} UTC", "", f"- command: `{command}`",
             f"- {fit_segments.shape[0]} fit and {held_segments.shape[0]} validation segments × {args.seqlen} tokens "
             f"(Brown calibration split); group {args.group}; full-precision block inputs", ""]
    for fit_step, held_step in zip(*walks, strict=True):
        if fit_step.index not in blocks:
            continue
        fit = collect_block(fit_step, loaded.arch, options, {})
        held = collect_block(held_step, loaded.arch, options, {})
        for bits in (int(b) for b in args.bits.split(",")):
            lines += section(fit_step.index, bits, measure_block(loaded, fit, held, held_step, bits, args.group))
            print("\n".join(lines[-8:]), flush=True)
    lines.insert(4, f"- load average {load_before} before, {load_average()} after; "
                    f"{time.perf_counter() - started:.0f} s in all; objectives on the validation Hessians, in "
                    f"parentheses relative to `v per head` (act-order off, the current default)")
    RESULTS.write_text(RESULTS.read_text() + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
