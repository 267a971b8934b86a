"""Seconds of the attention-aware start's query/key walks (BoA, act-order from 3 bits), today's code against a git
revision's, in one run.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python -m bench.bench_boa_speed [--baseline HEAD] [--bits 3] \
        [--group 64] [--repeats 3] [--model SOURCE] [--output bench/results/boa_speed.md]

Block 0's q and k of a model (the embedded one unless `--model`, anything aptq.models.load_model takes) with their
real weights and one column Hessian of their real width (correlated random inputs) and row factors per head of their
real head size (bench.bench_aespa_speed.block_layers): a walk's cost depends on the shapes, not on the values. Three
ways, alternating `--repeats` times so that the machine's load reaches them alike: the baseline's `aptq/gptq.py`
(read from git and imported beside today's) walking q, then k; today's `gptq_rows` the same; today's
`gptq_rows_shared` (both in one walk, as the pipeline runs them). Each row: the median over the repeats, and the
largest difference of its weights from the baseline's.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

import aptq.gptq as current
from aptq.choices import ACT_ORDER_FROM, EMBEDDED_MODEL
from aptq.models import load_model
from aptq.quantizer import QuantConfig
from bench.bench_aespa_speed import baseline_module, block_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="HEAD")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="a model source (default: the embedded model)")
    parser.add_argument("--output", default="bench/results/boa_speed.md")
    args = parser.parse_args()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    baseline = baseline_module(args.baseline, "aptq/gptq.py")
    revision = subprocess.run(["git", "rev-parse", "--short", args.baseline], check=True, capture_output=True,
                              text=True).stdout.strip()
    torch.set_num_threads(1)
    loaded = load_model(args.model or EMBEDDED_MODEL, device="cpu")
    cfg = QuantConfig(args.bits, args.group)
    act_order = ACT_ORDER_FROM is not None and args.bits >= ACT_ORDER_FROM
    layers = block_layers(loaded)
    qk = [(weight, row) for kind, weight, _, row in layers if kind in ("q", "k")]
    H = next(column for kind, _, column, _ in layers if kind == "q")[0]  # q's and k's: one input

    def one_by_one(module) -> list[torch.Tensor]:
        return [module.gptq_rows(weight, H, row, cfg, act_order=act_order).weight for weight, row in qk]

    ways = {"baseline: q, then k": lambda: one_by_one(baseline), "today: q, then k": lambda: one_by_one(current),
            "today: q and k in one walk": lambda: [result.weight for result in current.gptq_rows_shared(
                qk, H, cfg, act_order=act_order)]}
    seconds: dict[str, list[float]] = {}
    weights: dict[str, list[torch.Tensor]] = {}
    for _ in range(args.repeats):
        for label, run in ways.items():
            began = time.perf_counter()
            weights[label] = run()
            seconds.setdefault(label, []).append(time.perf_counter() - began)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    base = statistics.median(seconds["baseline: q, then k"])
    shapes = " and ".join(f"{weight.shape[0]} × {weight.shape[1]} ({row.shape[0]} × {row.shape[1]}-row heads)"
                          for weight, row in qk)
    lines = [
        "# BoA's query/key walks: seconds, today's code against a baseline revision",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); load average before "
        f"{' '.join(load_before)}, after {' '.join(load_after)}",
        f"- command: `{' '.join(['python -m bench.bench_boa_speed', *sys.argv[1:]])}`",
        f"- block 0 of {Path(str(loaded.path)).name}: q and k {shapes}; W{args.bits} g{args.group}, act-order "
        f"{'on' if act_order else 'off'}; median of {args.repeats} alternating repeats; baseline: {revision}",
        "",
        "| way | seconds | / baseline | largest weight difference from the baseline's |",
        "|---|---|---|---|",
    ]
    for label, times in seconds.items():
        median = statistics.median(times)
        difference = max((new - old).abs().max().item()
                         for new, old in zip(weights[label], weights["baseline: q, then k"]))
        lines.append(f"| {label} | {median:.2f} | {median / base:.2f} | {difference:.3g} |")
    text = "\n".join(lines) + "\n"
    print(text)
    output = Path(args.output)
    output.write_text((output.read_text() + "\n" if output.exists() else "") + text)


if __name__ == "__main__":
    main()
