"""Quantization time per method and perplexity on the embedded model's first blocks, for comparing two versions.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_quantize_speed.py [--blocks 2] [--samples 8] [--seqlen 256]
    PYTHONPATH=/tmp/aptq-before OMP_NUM_THREADS=1 .venv/bin/python bench/bench_quantize_speed.py   # an older aptq/

Quantizes the first `--blocks` blocks at 3 bits (groups of 64; the rest kept) with RTN, GPTQ and attention-aware
GPTQ through `aptq.pipeline.quantize_model`, then evaluates 8 windows of `--seqlen` Brown tokens. Works with the
version that returns a quantized copy of the model and with the one that returns the quantized weights. Prints one
JSON line per method.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import aptq.pipeline as pipeline
from aptq.data import Sampling, calibration_segments, evaluation_windows, load_corpus, token_ids
from aptq.evaluate import evaluate
from aptq.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    args = parser.parse_args()
    pipeline.RUN_CACHE = Path(tempfile.mkdtemp()) / "runs"
    loaded = load_model(device="cpu")
    corpus = load_corpus()
    segments = calibration_segments(token_ids(loaded.tokenizer, corpus, "calibration"),
                                    Sampling(args.samples, args.seqlen))
    windows = evaluation_windows(token_ids(loaded.tokenizer, corpus, "evaluation"), args.seqlen, 8 * args.seqlen)
    plan = {layer.name: 3 if layer.block < args.blocks else 16 for layer in loaded.arch.layers}
    for method in pipeline.QUANTIZERS:
        start = time.perf_counter()
        result, _ = pipeline.quantize_model(loaded, plan, pipeline.QuantizeSettings(method, 64), segments,
                                            key=f"speed-{method}")
        seconds = time.perf_counter() - start
        if isinstance(result, pipeline.torch.nn.Module):  # the older version: a quantized copy
            perplexity = evaluate(result, windows).perplexity
        else:
            perplexity = evaluate(loaded.model, windows, weights=result).perplexity
        print(json.dumps({"method": method, "aptq": str(Path(pipeline.__file__).parent), "blocks": args.blocks,
                          "quantize_seconds": round(seconds, 2), "perplexity": perplexity,
                          "load_average": Path("/proc/loadavg").read_text().split()[0]}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
