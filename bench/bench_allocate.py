"""Speed of `allocate` (knapsack) on cached-table shapes: SmolLM2-135M and a synthetic LLaMA-2-70B.

    .venv/bin/python bench/bench_allocate.py [--calls 50]

Builds synthetic sensitivity tables with the real layer shapes (errors fall ~4× per extra bit with a random
per-layer scale and a random per-width jitter (our choice)), then times many calls of `allocate` per budget and
reports the median (the time a dashboard slider move costs). Prints a markdown table and writes
bench/results/allocate.md. Targets: SmolLM2-135M < 20 ms, 70B < 200 ms. A third table with the 70B shapes plus
one output row per layer (a small gcd) times the rounded-up fallback of the DP.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aptq.allocate import AllocationRequest, allocate, summarize  # noqa: E402

KINDS = ("q", "k", "v", "o", "gate", "up", "down")


def shapes(hidden: int, kv: int, intermediate: int, extra_rows: int = 0) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of each projection of a LLaMA-style block; `extra_rows` breaks the common gcd of the sizes."""
    return {"q": (hidden + extra_rows, hidden), "k": (kv + extra_rows, hidden), "v": (kv + extra_rows, hidden),
            "o": (hidden + extra_rows, hidden), "gate": (intermediate + extra_rows, hidden),
            "up": (intermediate + extra_rows, hidden), "down": (hidden + extra_rows, intermediate)}


MODELS = {  # name: (blocks, shapes, widths, target ms)
    "SmolLM2-135M": (30, shapes(576, 192, 1536), (2, 3, 4, 8), 20.0),
    "LLaMA-2-70B (synthetic)": (80, shapes(8192, 1024, 28672), (2, 3, 4, 5, 8), 200.0),
    # Not a real model: one extra output row per layer leaves a small gcd, so the DP falls back to rounded-up costs.
    "70B, d_out + 1 (rounded-up costs)": (80, shapes(8192, 1024, 28672, extra_rows=1), (2, 3, 4, 5, 8), 200.0),
}
BUDGETS = (2.5, 3.0, 4.0, 5.0)


def synthetic_tables(blocks: int, block_shapes: dict[str, tuple[int, int]], widths: tuple[int, ...],
                     seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    layers, errors = [], []
    for block in range(blocks):
        for kind in KINDS:
            d_out, d_in = block_shapes[kind]
            name = f"model.layers.{block}.{kind}"
            scale = rng.lognormal(sigma=1.0) * d_out * d_in
            # The trace and residual columns make the solver convert the errors as it does for a real analysis.
            trace = scale * rng.uniform(0.5, 2)
            layers.append({"layer": name, "block": block, "kind": kind, "fused": name, "n_params": d_out * d_in,
                           "d_out": d_out, "d_in": d_in, "score": scale / (d_out * d_in), "trace_lm": trace,
                           "trace_attention": scale, "trace_layerwise": scale,
                           "residual_ms": 10.0 ** (block / blocks * 3)})
            for bits in widths:
                base = scale * 4.0 ** -bits
                errors.append({"layer": name, "bits": bits, "err_layerwise": base,
                               "err_attention": base * rng.uniform(0.7, 1.4)})
    return pd.DataFrame(layers), pd.DataFrame(errors)


def median_ms(layers: pd.DataFrame, errors: pd.DataFrame, request: AllocationRequest, calls: int) -> float:
    allocate(layers, errors, request)  # warm-up
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        allocate(layers, errors, request)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"`nproc` = {os.cpu_count()}, {cpu}, Python {platform.python_version()}, numpy {np.__version__}, " \
           f"pandas {pd.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    lines = ["| table | layers | widths | budget | median ms | target ms | ok | avg bits | solver note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, (blocks, block_shapes, widths, target) in MODELS.items():
        layers, errors = synthetic_tables(blocks, block_shapes, widths)
        for budget in BUDGETS:
            request = AllocationRequest(budget, "knapsack", widths, group_size=128)
            ms = median_ms(layers, errors, request, args.calls)
            plan = allocate(layers, errors, request)
            avg = summarize(plan, layers, errors)["avg_bits"]
            lines.append(f"| {name} | {len(layers)} | {widths} | {budget} | {ms:.2f} | {target:.0f} | "
                         f"{'yes' if ms < target else 'NO'} | {avg:.4f} | {plan.notes[0]} |")
            print(lines[-1], flush=True)
    command = f".venv/bin/python bench/bench_allocate.py --calls {args.calls}"
    report = ["# Bit-budget solver benchmark (`allocate`, method knapsack)", "",
              f"- date: {datetime.date.today().isoformat()}; machine: {machine()} (shared with other engineers: "
              f"timings are indicative; 1-minute load average {os.getloadavg()[0]:.1f} at the end of the run)",
              f"- command: `{command}`",
              f"- median of {args.calls} calls after one warm-up; each call validates the request, builds the "
              f"per-group tables from the DataFrames and runs the DP (errors synthetic: ~4× per bit, random "
              f"per-layer scale)", "", *lines, ""]
    out = ROOT / "bench" / "results" / "allocate.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(report))
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
