"""Quantization time per method and perplexity on a model's first blocks (the embedded one by default), for comparing
two versions.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/bench_quantize_speed.py [--blocks 2] [--samples 8] \
        [--seqlen 256]
    PYTHONPATH=/tmp/aptq-before OMP_NUM_THREADS=1 .venv/bin/python bench/bench_quantize_speed.py   # an older aptq/
    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/bench_quantize_speed.py --methods aespa --samples 64 \
        --seqlen 512 --phases [--model SOURCE]

Quantizes the first `--blocks` blocks at 3 bits (groups of 64; the rest kept) with each of `--methods` (default every
quantizer, today's default settings) through `aptq.pipeline.quantize_model`, then evaluates 8 windows of `--seqlen`
Brown tokens. Works with the version that returns a quantized copy of the model and with the one that returns the
quantized weights. Prints one JSON line per method; with `--phases` the quantization runs under cProfile and the line
adds the seconds of the pipeline's phases (PHASES; cumulative: the aespa optimiser and the shared q/k walks are parts
of the quantization, and profiling adds its own overhead).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import aptq.pipeline as pipeline
from aptq.choices import EMBEDDED_MODEL
from aptq.data import Sampling, calibration_segments, evaluation_windows, load_corpus, token_ids
from aptq.evaluate import evaluate
from aptq.models import load_model

# phase → the function whose cumulative time it is (a function of aptq/)
# (with full-precision targets "hessians" includes the full-precision stream's forwards and the mismatch moments)
PHASES = {"hessians": "_collect", "quantization": "_quantize_block",
          "aespa_optimiser": "optimise_rounding", "shared_qk_walks": "shared_row_walks", "next_inputs": "finish"}


def phase_seconds(profiler: cProfile.Profile) -> dict[str, float]:
    """The cumulative seconds of each of PHASES' functions in the profile (0 where it did not run)."""
    totals = dict.fromkeys(PHASES, 0.0)
    for (filename, _, function), (_, _, _, cumulative, _) in pstats.Stats(profiler).stats.items():
        for phase, name in PHASES.items():
            if function == name and "/aptq/" in filename:
                totals[phase] += cumulative
    return {phase: round(seconds, 2) for phase, seconds in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--methods", default=",".join(pipeline.QUANTIZERS), help="comma-separated quantizers")
    parser.add_argument("--phases", action="store_true", help="profile the quantization and report its phases")
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="anything aptq.models.load_model takes")
    args = parser.parse_args()
    if unknown := set(args.methods.split(",")) - set(pipeline.QUANTIZERS):
        parser.error(f"unknown methods {', '.join(sorted(unknown))}; choose from {', '.join(pipeline.QUANTIZERS)}")
    pipeline.RUN_CACHE = Path(tempfile.mkdtemp()) / "runs"
    loaded = load_model(args.model, device="cpu")
    corpus = load_corpus()
    segments = calibration_segments(token_ids(loaded.tokenizer, corpus, "calibration"),
                                    Sampling(args.samples, args.seqlen))
    windows = evaluation_windows(token_ids(loaded.tokenizer, corpus, "evaluation"), args.seqlen, 8 * args.seqlen)
    plan = {layer.name: 3 if layer.block < args.blocks else 16 for layer in loaded.arch.layers}
    for method in args.methods.split(","):
        profiler = cProfile.Profile() if args.phases else None
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        result, _ = pipeline.quantize_model(loaded, plan, pipeline.QuantizeSettings(method, 64), segments,
                                            key=f"speed-{method}")
        if profiler:
            profiler.disable()
        seconds = time.perf_counter() - start
        phases = {"phases": phase_seconds(profiler)} if profiler else {}
        if isinstance(result, pipeline.torch.nn.Module):  # the older version: a quantized copy
            perplexity = evaluate(result, windows).perplexity
        else:
            perplexity = evaluate(loaded.model, windows, weights=result).perplexity
        print(json.dumps({"method": method, "aptq": str(Path(pipeline.__file__).parent),
                          "model": loaded.arch.family, "blocks": args.blocks,
                          "samples": args.samples, "seqlen": args.seqlen, "quantize_seconds": round(seconds, 2),
                          **phases, "perplexity": perplexity,
                          "load_average": Path("/proc/loadavg").read_text().split()[0]}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
