"""The block refinement's steps and step size chosen on validation data (issue 20; docs/algorithms.md §18), by proxy.

    APTQ_CACHE_DIR=/tmp/emb64 OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_refinement_tuning \\
        --method aespa --bits 2 --group 64 --options attention-rows,fp-targets=0.25 --blocks 4 \\
        --variants 0,100,100:0.02,200::4

Reads bench_peers' dump (its calibration segments, so the same tokens as the whole-model runs; `dump` first), quantizes
the first BLOCKS blocks (the others stay in full precision) with the layer-wise quantizer of `--method/--options` and
each variant of the refinement (`STEPS`, `STEPS:LR` or `STEPS:LR:BATCH`: LR the first step's size, 1 / STEPS where
empty or left out; BATCH the segments a step takes, the walk's default where left out; 0 is the layer-wise quantizer
alone), and measures the KL against the full-precision model on bench_peers' validation windows
of the calibration split — never on the evaluation split. (our choice) The first blocks: the refinement lowered their
block loss most in the whole-model runs, and they are cheap enough to try several variants in one session; the proxy
chooses, a whole-model run then confirms. The table goes to bench/results/refinement_tuning_<dump>_w<bits>.md (text
below the table, the reading written by hand, is kept when it is rewritten).
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.bench_peers import (
    RESULTS,
    Quantized,
    cached_reference,
    load_average,
    load_inputs,
    validation_windows,
)
from bench.reading import with_reading


@dataclass(frozen=True)
class Variant:
    steps: int
    learning_rate: float | None  # None: 1 / steps
    batch: int | None  # segments per step; None: the walk's default (aptq.capture.default_batch_size)

    @staticmethod
    def parse(text: str) -> Variant:
        steps, rate, batch = (text.split(":") + ["", ""])[:3]
        return Variant(int(steps), float(rate) if rate else None, int(batch) if batch else None)

    def __post_init__(self) -> None:
        self.refinement()  # UserError for what the run would refuse
        if self.batch is not None and self.batch < 1:
            raise ValueError(f"A step takes at least one segment, got {self.batch}.")

    def refinement(self):
        """As the run takes it (aptq.blockwise.BlockRefinement)."""
        from aptq.blockwise import BlockRefinement

        return BlockRefinement(self.steps, self.learning_rate)

    @property
    def label(self) -> str:
        if not self.steps:
            return "layer-wise alone"
        batch = f", {self.batch} segments a step" if self.batch else ""
        return f"{self.steps} steps, first step {self.refinement().step_size:.4g}{batch}"


@dataclass(frozen=True)
class Measured:
    variant: Variant
    kl_validation: float
    perplexity_validation: float
    seconds: float
    notes: list[str]


def measure(loaded, segments: torch.Tensor, windows: torch.Tensor, reference, settings, plan: dict[str, int],
            variant: Variant) -> Measured:
    from aptq.evaluate import evaluate
    from aptq.pipeline import quantize_model, remove_checkpoints, swapped_weights
    from aptq.progress import tqdm_progress
    from aptq.widths import FULL_PRECISION

    chosen = replace(settings, block=variant.refinement(), batch_size=variant.batch)
    key = f"refinement-tuning-{variant.steps}-{variant.learning_rate}-{variant.batch}"
    remove_checkpoints(key)  # a run of another dump or settings under the same name
    progress, close = tqdm_progress(variant.label)
    started = time.perf_counter()
    try:
        weights, notes = quantize_model(loaded, plan, chosen, segments, key, progress)
        seconds = time.perf_counter() - started
        blocks = {layer.block for layer in loaded.arch.layers if plan[layer.name] < FULL_PRECISION}
        quantized = {name: weight for block in blocks for name, weight in weights.block(block).items()}
    finally:
        close()
        remove_checkpoints(key)
    with swapped_weights(loaded.model, loaded.arch, quantized):
        result = evaluate(loaded.model, windows, reference=reference)
    return Measured(variant, result.kl_divergence, result.perplexity, seconds, notes)


def write(path: Path, header: list[str], rows: list[Measured]) -> None:
    table = ["| refinement | KL validation | perplexity validation | quantize s | notes |", "|---|---|---|---|---|"]
    table += [f"| {row.variant.label} | {row.kl_validation:.4f} | {row.perplexity_validation:.3f} | {row.seconds:.0f} "
              f"| {'; '.join(row.notes) or '—'} |" for row in rows]
    path.write_text(with_reading(header + [""] + table, path.read_text() if path.is_file() else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=["gptq", "attention", "aespa"], default="aespa")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--options", default="attention-rows,fp-targets=0.25",
                        help="the layer-wise quantizer's, as bench_peers ours takes them (no block=N)")
    parser.add_argument("--blocks", type=int, default=4, help="the first BLOCKS blocks are quantized")
    parser.add_argument("--variants", default="0,100,100:0.02,200::4",
                        help="STEPS, STEPS:LR or STEPS:LR:BATCH, comma-separated")
    args = parser.parse_args()
    from aptq.errors import UserError

    try:
        variants = [Variant.parse(part) for part in args.variants.split(",")]
    except (ValueError, UserError):
        parser.error(f"--variants: STEPS, STEPS:LR or STEPS:LR:BATCH, comma-separated, got {args.variants!r}")
    if "block=" in args.options:
        parser.error("--options: the refinement's steps are the variants, not an option")

    from aptq.data import load_corpus, token_ids
    from aptq.widths import FULL_PRECISION

    inputs = load_inputs()
    loaded = inputs.load()
    windows = validation_windows(inputs, token_ids(loaded.tokenizer, load_corpus("brown"), "calibration"))
    reference = cached_reference(loaded, windows)
    settings = Quantized(args.method, args.bits, args.group, 0.0, None, "", "", options=args.options).settings()
    plan = {layer.name: args.bits if layer.block < args.blocks else FULL_PRECISION for layer in loaded.arch.layers}
    quantized = sum(bits < FULL_PRECISION for bits in plan.values())
    command = ("bench_refinement_tuning " + " ".join(f"--{name} {value}" for name, value in vars(args).items()))
    header = [f"# Block refinement: steps and step size on validation windows ({Path(inputs.model_dir).name})", "",
              f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {platform.machine()}, "
              f"{torch.get_num_threads()} thread(s), torch {torch.__version__}; load average at the start "
              f"{load_average()}",
              f"- command: `{command}`",
              f"- the first {args.blocks} blocks quantized ({quantized} layers, {args.bits} bits, group {args.group}, "
              f"{args.method} with {args.options or 'its defaults'}), the others in full precision; calibration "
              f"{inputs.samples} × {inputs.seqlen} (bench_peers' dump); KL and perplexity on bench_peers' "
              f"{len(windows)} validation windows of the calibration split (no fitted segment in them)"]
    rows = []
    for variant in variants:
        rows.append(measure(loaded, inputs.calibration, windows, reference, settings, plan, variant))
        write(RESULTS / f"refinement_tuning_{Path(inputs.model_dir).name}_w{args.bits}.md",
              header + [f"- load average at the end: {load_average()}"], rows)
        print(rows[-1])


if __name__ == "__main__":
    main()
