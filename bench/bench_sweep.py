"""Sweep benchmark: perplexity/KL versus average bits for every allocation method on the embedded model.

    .venv/bin/python -m bench.bench_sweep --budgets 2.5:4.5:0.25 --quantizer gptq

Runs the cached analysis (64 × 512 Brown calibration, group 64, widths 2, 3, 4, 8), then `aptq.sweep.run_sweep` into
the default store (the dashboard's Trade-offs page draws the same points), and writes bench/results/sweep.md: the
curves, knapsack at 3.0 bits against uniform 3-bit, aptq against random (median of 3 seeds) at 3.5 bits, and the
predicted-versus-measured rank correlation. Rerunning reuses every stored point.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from aptq.allocate import PREDICTED_ERROR_ATTENTION
from aptq.data import Sampling, load_corpus
from aptq.history import stored_runs, trust
from aptq.models import load_model, model_fingerprint
from aptq.pipeline import EvalSettings, QuantizeSettings
from aptq.progress import tqdm_progress
from aptq.sensitivity import AnalysisSettings, analyze
from aptq.store import Store
from aptq.sweep import SweepPoint, run_sweep, sweep_points
from aptq.validate import parse_budgets

RESULTS = Path(__file__).parent / "results" / "sweep.md"
CANDIDATES = (2, 3, 4, 8)


def table(frame: pd.DataFrame) -> list[str]:
    columns = list(frame.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budgets", default="2.5:4.5:0.25")
    parser.add_argument("--methods", default="uniform,aptq,knapsack,knapsack-layerwise")
    parser.add_argument("--quantizer", default="gptq")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    loaded = load_model(device=os.environ.get("APTQ_DEVICE"))
    corpus = load_corpus("brown")
    sampling = Sampling(64, 512, 0)
    store = Store()
    layers, errors = analyze(loaded, corpus, sampling, AnalysisSettings(group_size=64, bits=CANDIDATES), store)
    # The two comparisons first, so that an interrupted benchmark has them; then the curves.
    points = [SweepPoint("knapsack", 3.0), SweepPoint("uniform", 3.0), SweepPoint("aptq", 3.5),
              *(SweepPoint("random", 3.5, seed) for seed in range(3))]
    points += [point for point in sweep_points(args.methods.split(","), parse_budgets(args.budgets), (0,))
               if point not in points]
    settings, evaluation = QuantizeSettings(args.quantizer, 64), EvalSettings(512, args.tokens)
    progress, close = tqdm_progress("sweep")
    start = time.perf_counter()
    try:
        sweep = run_sweep(loaded, corpus, sampling, layers, errors, points, CANDIDATES, settings, evaluation, store,
                          progress)
    finally:
        close()
    seconds = time.perf_counter() - start
    measured = sweep.dropna(subset=["key"])

    def at(allocation: str, budget: float) -> pd.DataFrame:
        return measured[(measured["allocation"] == allocation) & (measured["budget"] == budget)]

    knap, uni = at("knapsack", 3.0).iloc[0], at("uniform", 3.0).iloc[0]
    aptq_row, random_rows = at("aptq", 3.5).iloc[0], at("random", 3.5)
    runs = stored_runs(store, model_fingerprint(loaded.path))
    protocol = runs.set_index("key").loc[measured["key"].iloc[0], ["eval_tokens", "eval_seqlen", "group_size"]]
    runs = runs[(runs[protocol.index] == protocol.to_numpy()).all(axis=1)
                & (runs["analysis"] == layers.attrs["analysis_key"])]  # predictions of this analysis only
    lines = [
        "# Sweep benchmark", "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {os.cpu_count()} cores, {platform.processor() or 'CPU'}, "
        f"torch {torch.__version__}, device {loaded.device}; sweep wall time {seconds / 60:.1f} min (stored points "
        f"reused)",
        f"- command: `.venv/bin/python -m bench.bench_sweep --budgets {args.budgets} --methods "
        f"{args.methods} --quantizer {args.quantizer} --tokens {args.tokens} --output {os.path.relpath(args.output)}`",
        f"- {loaded.display_name}; analysis {layers.attrs['analysis_key']} (Brown calibration 64 × 512, group 64, "
        f"widths {CANDIDATES}); each plan quantized with {args.quantizer} (group 64) and evaluated on the Brown "
        f"evaluation split, windows of 512, first {args.tokens} tokens", "",
        "## Curves", "",
        *table(sweep[[c for c in ("allocation", "budget", "seed", "avg_bits", "effective_bits", "perplexity", "kl",
                                  "top1", PREDICTED_ERROR_ATTENTION, "skipped") if c in sweep]]), "",
        "## Comparisons", "",
        f"- 3.0 bits: knapsack (attention-aware errors) perplexity {knap.perplexity:.3f}, KL {knap.kl:.4f} at "
        f"{knap.avg_bits:.3f} bits; uniform 3-bit perplexity {uni.perplexity:.3f}, KL {uni.kl:.4f}",
        f"- 3.5 bits: aptq (2/4 by trace per parameter) perplexity {aptq_row.perplexity:.3f}, KL {aptq_row.kl:.4f}; "
        f"random, median of seeds {sorted(random_rows['seed'].tolist())}: perplexity "
        f"{random_rows['perplexity'].median():.3f}, KL {random_rows['kl'].median():.4f}", "",
        f"## Predicted versus measured (Spearman over the {len(runs)} stored runs of this protocol and analysis)", "",
        *table(trust(runs)),
    ]
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
