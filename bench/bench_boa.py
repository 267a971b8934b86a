"""BoA's row compensation for the value projection, for gate/up and act-order, and BoA against GPTQ, measured on
held-out calibration data (issue 19).

    flock /tmp/heavy.lock nice -n 10 env OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/bench_boa.py \
        [--blocks 0,10] [--bits 2,3,4] [--group 64] [--samples 32] [--seqlen 512] [--holdout 0.25] \
        [--settings "v per head,mlp rows"] [--model SOURCE]

The calibration segments are split as the unit calibration does (aptq.calibrate.validation_segments): the first part
fits (its Hessians quantize), the last `--holdout` share validates (never the evaluation split). Per block
(full-precision inputs), bit width and setting in `SETTINGS` (the attention-aware method with v per head or with row
factors, gate/up with or without the down projection's row factors, act-order off or on, q/k's row Hessians from
uniform or attention-weighted pairs, the attention-aware Hessians shrunk toward GPTQ's or not; or plain GPTQ), every
layer of the block is quantized with `aptq.pipeline.quantize_layer` from the fit part's Hessians; the table gives

- each layer's attention-wise objective (aptq.aespa.layer_objective: v `Σ_g tr(R_g ΔW_g H_V,g ΔW_gᵀ)`, q/k
  `tr(G ΔW H ΔWᵀ)`, o and MLP `tr(ΔW H ΔWᵀ)`) on the validation part's Hessians, and gate's and up's Kronecker
  objective `tr(R ΔW H ΔWᵀ)` with the down projection's row factor R (aptq.pipeline.mlp_row_factor, "R obj.");
- the relative error of the attention module's output (after the out projection) on the validation segments with only
  q and k quantized and with only v quantized, `Σ ‖ΔY‖² / Σ ‖Y‖²`, and of the MLP's output (after the down
  projection) with only gate and up quantized;
- the relative error of the block's output on the validation segments with the whole block quantized.

Appends the run to bench/results/quantizer.md and prints it.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from aptq.aespa import layer_objective
from aptq.calibrate import validation_segments
from aptq.capture import Batch, BlockStep, BlockWalk
from aptq.choices import EMBEDDED_MODEL
from aptq.data import Sampling, calibration_segments, load_corpus, token_ids
from aptq.gptq import gptq_per_head
from aptq.hessian import BlockHessians, CollectOptions
from aptq.models import LinearLayer, LoadedModel, block_weight, get_weight, load_model
from aptq.pipeline import QuantizeSettings, mlp_row_factor, quantize_layer, swapped_weights
from aptq.quantizer import QuantConfig, layer_error
from aptq.sensitivity import collect_block

RESULTS = Path(__file__).resolve().parent / "results" / "quantizer.md"


@dataclass(frozen=True)
class Setting:
    value_rows: bool | str = False  # "summed": the row factor of the group's summed out slices
    act_order: bool = False
    mlp_rows: bool = False
    method: str = "attention"  # or "gptq"
    # QuantizeSettings.shrink and .row_weights at the values the method had before 2026-12-01, so that "v per head"
    # stays the baseline of the earlier runs
    shrink: float = 0.0
    row_weights: str = "uniform"

    def for_layer(self, kind: str) -> tuple:
        """What a layer of this kind's quantization depends on: layers with equal keys are quantized once."""
        return (self.method, self.act_order, self.value_rows if kind == "v" else None,
                self.mlp_rows if kind in ("gate", "up") else None, self.shrink if kind in ("q", "k", "v") else None,
                self.row_weights if kind in ("q", "k") else None)


SETTINGS = {
    "v per head": Setting(),  # the method's default before 2026-12-01
    "v rows": Setting(value_rows=True),
    "v rows of summed slices": Setting(value_rows="summed"),
    "v rows + act-order": Setting(value_rows=True, act_order=True),
    "mlp rows": Setting(mlp_rows=True),
    "gptq": Setting(method="gptq"),
    **{f"shrink {share:g}": Setting(shrink=share) for share in (0.1, 0.25, 0.5, 0.75)},
    "attention rows": Setting(row_weights="attention"),
    "attention rows + act-order": Setting(row_weights="attention", act_order=True),
    **{f"attention rows + shrink {share:g}": Setting(row_weights="attention", shrink=share) for share in (0.25, 0.5)},
}


@dataclass(frozen=True)
class Measured:
    objective: dict[str, float]  # layer kind (and "gate R", "up R") → validation objective
    qk_error: float  # relative error of the attention output, only q and k quantized
    attention_error: float  # relative, only v quantized
    mlp_error: float  # relative, only gate and up quantized
    block_error: float  # relative, the whole block quantized
    value_seconds: float  # quantizing v
    mlp_seconds: float  # quantizing gate and up
    seconds: float  # quantizing the block


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


@torch.no_grad()
def relative_output_error(loaded: LoadedModel, step: BlockStep, weights: dict[str, torch.Tensor],
                          module: str | None) -> float:
    """`Σ ‖Y_q − Y‖² / Σ ‖Y‖²` over the step's batches: the output of the block's `module` (its attention or MLP
    attribute), or the block's (None)."""
    hooked = step.block.get_submodule(module or loaded.arch.attention_attr)
    captured: list[torch.Tensor] = []
    handle = hooked.register_forward_hook(
        lambda _, args, output: captured.append(output[0] if isinstance(output, tuple) else output))

    def output_of(batch: Batch) -> torch.Tensor:
        captured.clear()
        block_output = step.forward(batch)
        return block_output if module is None else captured[0]

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


def measure_block(loaded: LoadedModel, fits: dict[str, BlockHessians], held: BlockHessians, held_step: BlockStep,
                  bits: int, group: int, labels: list[str]) -> dict[str, Measured]:
    """The settings named, each quantized from the fit Hessians of its row weights (`fits`); a layer is quantized
    once per distinct key of what its quantization depends on."""
    out_weight = block_weight(loaded.model, loaded.arch, held_step.index, "o")
    down_weight = block_weight(loaded.model, loaded.arch, held_step.index, "down")
    config = QuantConfig(bits, group)
    layers = loaded.arch.block_layers(held_step.index)
    originals = {layer.name: get_weight(loaded.model, layer).detach() for layer in layers}
    done: dict[tuple, tuple[torch.Tensor, float]] = {}  # (layer, key) → quantized weight, seconds

    def quantized(layer: LinearLayer, setting: Setting) -> tuple[torch.Tensor, float]:
        key = (layer.name, setting.for_layer(layer.kind))
        if key not in done:
            start = time.perf_counter()
            weight = originals[layer.name]
            fit = fits[setting.row_weights]
            if layer.kind == "v" and setting.value_rows == "summed":
                rows = summed_row_factor(out_weight, fit.value[layer.name].shape[0], loaded.arch.head_dim)
                result = gptq_per_head(weight, fit.value[layer.name], config, act_order=setting.act_order,
                                       row_factors=rows).weight
            else:
                settings = QuantizeSettings(setting.method, group, act_order_from=2 if setting.act_order else None,
                                            value_rows=bool(setting.value_rows), mlp_rows=setting.mlp_rows,
                                            shrink=setting.shrink, row_weights=setting.row_weights)
                result = quantize_layer(weight, layer, fit, config, settings, out_weight, down_weight)[0]
            done[key] = result, time.perf_counter() - start
        return done[key]

    def objectives(weights: dict[str, torch.Tensor]) -> dict[str, float]:
        found = {layer.kind: layer_objective(layer, originals[layer.name], held, out_weight).loss(
            originals[layer.name], weights[layer.name]) for layer in layers}
        for layer in layers:  # gate's and up's Kronecker objective through the down projection
            if layer.name in held.mlp:
                rows = mlp_row_factor(down_weight, held.mlp[layer.name]).unsqueeze(0)
                found[f"{layer.kind} R"] = layer_error(originals[layer.name], weights[layer.name],
                                                       held.layerwise[layer.name], rows)
        return found

    results = {}
    for label in labels:
        timed = {layer: quantized(layer, SETTINGS[label]) for layer in layers}
        weights = {layer.name: weight for layer, (weight, _) in timed.items()}
        seconds = {kind: sum(s for layer, (_, s) in timed.items() if layer.kind in kind) for kind in
                   (("v",), ("gate", "up"))}
        only = {kind: {layer.name: weights[layer.name] for layer in layers if layer.kind in kind}
                for kind in (("q", "k"), ("v",), ("gate", "up"))}
        attention = loaded.arch.attention_attr
        results[label] = Measured(objectives(weights),
                                  relative_output_error(loaded, held_step, only[("q", "k")], attention),
                                  relative_output_error(loaded, held_step, only[("v",)], attention),
                                  relative_output_error(loaded, held_step, only[("gate", "up")], loaded.arch.mlp_attr),
                                  relative_output_error(loaded, held_step, weights, None),
                                  seconds[("v",)], seconds[("gate", "up")], sum(s for _, s in timed.values()))
    return results


def ratio(value: float, base: float, first: bool) -> str:
    return f"{value:.4g}" + ("" if first else f" ({value / base:.3f})")


def section(block: int, bits: int, results: dict[str, Measured]) -> list[str]:
    base = next(iter(results.values()))
    kinds = list(base.objective)
    lines = [f"#### Block {block}, {bits} bits", "",
             "| setting | " + " | ".join(f"{kind} obj." for kind in kinds)
             + " | attention out (q, k only) | attention out (v only) | MLP out (gate, up) | block out (all) | v s "
             "| gate+up s | block s |",
             "|---" * (len(kinds) + 8) + "|"]
    for label, measured in results.items():
        first = measured is base
        cells = [ratio(measured.objective[kind], base.objective[kind], first) for kind in kinds]
        cells += [ratio(getattr(measured, name), getattr(base, name), first)
                  for name in ("qk_error", "attention_error", "mlp_error", "block_error")]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {measured.value_seconds:.1f} | "
                     f"{measured.mlp_seconds:.1f} | {measured.seconds:.0f} |")
    return lines + [""]


def summary(cases: list[dict[str, Measured]]) -> list[str]:
    """Per setting, the geometric mean over the run's (block, width) cases of its real errors relative to the first
    setting's, and in how many cases it was lower."""
    base_label = next(iter(cases[0]))
    names = {"qk_error": "attention out (q, k only)", "attention_error": "attention out (v only)",
             "block_error": "block out (all)"}
    lines = [f"#### Summary over {len(cases)} cases (geometric mean ratio to `{base_label}`; lower in n cases)", "",
             "| setting | " + " | ".join(names.values()) + " |", "|---" * (len(names) + 1) + "|"]
    for label in cases[0]:
        cells = []
        for name in names:
            ratios = [getattr(case[label], name) / getattr(case[base_label], name) for case in cases]
            mean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
            cells.append(f"{mean:.3f} ({sum(r < 1 for r in ratios)}/{len(ratios)})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", default="0,10")
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--holdout", type=float, default=0.25)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"labels, the first the base: {list(SETTINGS)}")
    parser.add_argument("--model", help="the model (anything aptq.models.load_model takes; default: the embedded one)")
    args = parser.parse_args()
    blocks = sorted(int(b) for b in args.blocks.split(","))
    labels = args.settings.split(",")
    unknown = [label for label in labels if label not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    command = (f"flock /tmp/heavy.lock nice -n 10 env OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python "
               f"bench/bench_boa.py --blocks {args.blocks} --bits {args.bits} --group {args.group} "
               f"--samples {args.samples} --seqlen {args.seqlen} --holdout {args.holdout} --settings '{args.settings}'"
               + (f" --model {args.model}" if args.model else ""))
    load_before, started = load_average(), time.perf_counter()
    loaded = load_model(args.model or EMBEDDED_MODEL, device="cpu")
    segments = calibration_segments(token_ids(loaded.tokenizer, load_corpus("brown"), "calibration"),
                                    Sampling(args.samples, args.seqlen, seed=0))
    held_segments = validation_segments(segments, args.holdout)
    fit_segments = segments[:segments.shape[0] - held_segments.shape[0]]
    options = CollectOptions(attention=True, probes=0, mlp_rows=any(SETTINGS[label].mlp_rows for label in labels))
    walks = [BlockWalk(loaded.model, loaded.arch, part, device="cpu", stop=blocks[-1] + 1)
             for part in (fit_segments, held_segments)]
    lines = [f"### Run of {time.strftime('%Y-%m-%d %H:%M')} UTC", "", f"- command: `{command}`",
             f"- model: {loaded.display_name}",
             f"- {fit_segments.shape[0]} fit and {held_segments.shape[0]} validation segments × {args.seqlen} tokens "
             f"(Brown calibration split); group {args.group}; full-precision block inputs", ""]
    cases: list[dict[str, Measured]] = []
    for fit_step, held_step in zip(*walks, strict=True):
        if fit_step.index not in blocks:
            continue
        fits = {weights: collect_block(fit_step, loaded.arch, replace(options, row_weights=weights), {})
                for weights in dict.fromkeys(SETTINGS[label].row_weights for label in labels)}
        held = collect_block(held_step, loaded.arch, options, {})
        for bits in (int(b) for b in args.bits.split(",")):
            cases.append(measure_block(loaded, fits, held, held_step, bits, args.group, labels))
            measured = section(fit_step.index, bits, cases[-1])
            lines += measured
            print("\n".join(measured), flush=True)
    totals = summary(cases)
    lines += totals
    print("\n".join(totals), flush=True)
    lines.insert(5, f"- load average {load_before} before, {load_average()} after; "
                    f"{time.perf_counter() - started:.0f} s in all; objectives on the validation Hessians, in "
                    f"parentheses relative to `{labels[0]}`")
    RESULTS.write_text(RESULTS.read_text() + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
