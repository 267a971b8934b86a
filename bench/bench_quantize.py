"""Quantization engine benchmark: FP, RTN, GPTQ and attention-aware GPTQ at several widths and group sizes.

    .venv/bin/python -m bench.bench_quantize --bits 4,3,2 --groups 64,0 --samples 64 --seqlen 512 --tokens 16384

Every run goes through `aptq.pipeline.run_plan` into the default store (so the dashboard shows them, and a rerun
reuses them); the table is rewritten after each run, so an interrupted benchmark keeps what it measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from aptq.choices import EMBEDDED_MODEL, METHOD_LABELS
from aptq.data import Sampling, load_corpus
from aptq.models import load_model
from aptq.pipeline import EvalSettings, QuantizeSettings, run_plan, uniform_plan
from aptq.progress import tqdm_progress
from aptq.sensitivity import default_group_size
from aptq.store import Store

RESULTS = Path(__file__).parent / "results" / "quantize.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", default="4,3,2")
    parser.add_argument("--groups", default="64,0", help="group sizes, 0 = per channel")
    parser.add_argument("--methods", default="rtn,gptq,attention")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=16384, help="evaluation tokens (windows of 512)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="hub id, local directory or .gguf file")
    args = parser.parse_args()

    loaded = load_model(args.model, device=os.environ.get("APTQ_DEVICE"))
    corpus = load_corpus("brown")
    sampling = Sampling(args.samples, args.seqlen, 0)
    evaluation = EvalSettings(512, args.tokens)
    store = Store()
    header = [
        "# Quantization engine benchmark", "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {os.cpu_count()} cores, {platform.processor() or 'CPU'}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {loaded.device}",
        f"- command: `.venv/bin/python -m bench.bench_quantize --bits {args.bits} --groups {args.groups} "
        f"--methods {args.methods} --samples {args.samples} --seqlen {args.seqlen} --tokens {args.tokens}"
        + (f" --model {args.model}`" if args.model != EMBEDDED_MODEL else "`"),
        f"- model: {loaded.display_name} (baseline {loaded.baseline_label}); calibration: Brown calibration split, "
        f"{args.samples} × {args.seqlen} tokens, seed 0; evaluation: Brown evaluation split, windows of 512, first "
        f"{args.tokens} tokens; asymmetric grid with the clipping search; GPTQ blocks of 128 columns, 1 % damping",
        f"- hidden size {loaded.arch.hidden_size}; default group size {default_group_size(loaded.arch)} "
        f"(default_group_size); group sizes measured: {args.groups} (0 = per channel)", "",
        "| method | bits | group | perplexity | KL (nats/token) | top-1 agreement | quantize s | evaluate s | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines: list[str] = []
    for group in (int(g) for g in args.groups.split(",")):
        for bits in (int(b) for b in args.bits.split(",")):
            for method in args.methods.split(","):
                progress, close = tqdm_progress(f"{method} {bits}-bit g{group}")
                try:
                    row = run_plan(loaded, corpus, sampling, uniform_plan(loaded.arch, bits),
                                   QuantizeSettings(method, group), evaluation, store, progress,
                                   {"allocation": "uniform", "budget": bits})
                finally:
                    close()
                if not lines:
                    header.insert(-2, f"- full precision ({loaded.baseline_label}): perplexity "
                                      f"{row.fp_perplexity:.3f} over {row.eval_tokens} predicted tokens\n")
                origin = " (stored run)" if row.cached else ""
                lines.append(f"| {METHOD_LABELS[method]} | {bits} | {group or 'per-channel'} | "
                             f"{row.perplexity:.3f} | {row.kl:.4f} | {row.top1:.4f} | "
                             f"{row.quant_seconds:.1f}{origin} | {row.eval_seconds:.1f} | "
                             f"{row.notes or ''} |")
                args.output.write_text("\n".join(header + lines) + "\n")
                print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
