"""Seconds per iteration of aespa's rounding optimiser, today's code against a git revision's, in one run.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python -m bench.bench_aespa_speed [--baseline HEAD] [--bits 2] \
        [--iterations 100] [--repeats 3] [--output bench/results/aespa_speed.md]

The layers of the embedded model's block 0 with their real weights (q, k, v, o, gate, up, down) and Kronecker factors
of their real shapes (column Hessians from correlated random inputs, q/k row factors per head, v's per-KV-head H_V
with the out projection's row factor): the cost of an iteration depends on the shapes, not on the values. The start
is round-to-nearest (what the optimiser starts from does not change its cost per iteration). The baseline's
`aptq/aespa.py` is read from git and imported beside today's; the two alternate layer by layer, `--repeats` times,
so that the machine's load reaches both alike. Each row: the median over the repeats.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import torch

import aptq.aespa as current
from aptq.choices import EMBEDDED_MODEL
from aptq.models import get_weight, load_model
from aptq.quantizer import QuantConfig, rtn

TOKENS = 2048


def baseline_module(revision: str, source_path: str = "aptq/aespa.py") -> ModuleType:
    """A git revision's copy of one aptq module, imported beside today's (its own imports are today's)."""
    source = subprocess.run(["git", "show", f"{revision}:{source_path}"], check=True, capture_output=True,
                            text=True).stdout
    name = f"{Path(source_path).stem}_baseline"
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def column_hessian(d_in: int, generator: torch.Generator) -> torch.Tensor:
    mixing = torch.randn(d_in, d_in, generator=generator) / d_in ** 0.5 + torch.eye(d_in)
    X = mixing @ torch.randn(d_in, TOKENS, generator=generator)
    return 2 / TOKENS * X @ X.T


def block_layers(loaded) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(kind, weight, column factor(s), row factor or None) for block 0's layers."""
    generator = torch.Generator().manual_seed(0)
    head_dim, n_kv = loaded.arch.head_dim, loaded.arch.n_kv_heads
    rows = []
    for layer in loaded.arch.block_layers(0):
        weight = get_weight(loaded.model, layer).detach().float()
        d_out, d_in = weight.shape
        if layer.kind == "v":
            column = torch.stack([column_hessian(d_in, generator) for _ in range(n_kv)])
            out = get_weight(loaded.model, next(o for o in loaded.arch.block_layers(0) if o.kind == "o")).float()
            row = current.out_row_factor(out, n_kv, head_dim)
        elif layer.kind in ("q", "k"):
            column = column_hessian(d_in, generator).unsqueeze(0)
            heads = d_out // head_dim
            keys = torch.randn(heads, 256, head_dim, generator=generator)
            row = keys.transpose(1, 2) @ keys / 256
        else:
            column, row = column_hessian(d_in, generator).unsqueeze(0), None
        rows.append((layer.kind, weight, column, row))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="HEAD")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="bench/results/aespa_speed.md")
    args = parser.parse_args()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    baseline = baseline_module(args.baseline)
    revision = subprocess.run(["git", "rev-parse", "--short", args.baseline], check=True, capture_output=True,
                              text=True).stdout.strip()
    loaded = load_model(EMBEDDED_MODEL, device="cpu")
    cfg = QuantConfig(args.bits, args.group)
    layers = block_layers(loaded)
    seconds: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for kind, weight, column, row in layers:
            start = rtn(weight, cfg)
            for label, module in (("baseline", baseline), ("today", current)):
                objective = module.AttentionObjective(column, row)
                options = module.AespaOptions(iterations=args.iterations)
                began = time.perf_counter()
                module.optimise_rounding(weight, start, objective, cfg, options)
                seconds.setdefault((kind, label), []).append((time.perf_counter() - began) / args.iterations)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    kinds = list(dict.fromkeys(kind for kind, _ in seconds))
    lines = [
        "# aespa's rounding optimiser: seconds per iteration, today's code against a baseline revision",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); load average before "
        f"{' '.join(load_before)}, after {' '.join(load_after)}",
        f"- command: `{' '.join(['python -m bench.bench_aespa_speed', *sys.argv[1:]])}`",
        f"- block 0 of the embedded model, W{args.bits} g{args.group}, {args.iterations} iterations per layer "
        f"(hard-rounding checks included), median of {args.repeats} alternating repeats; baseline: {revision}",
        "",
        "| layer | shape | baseline s/it | today s/it | today / baseline |",
        "|---|---|---|---|---|",
    ]
    shapes = {kind: tuple(weight.shape) for kind, weight, _, _ in layers}
    totals = {"baseline": 0.0, "today": 0.0}
    for kind in kinds:
        old, new = (statistics.median(seconds[kind, label]) for label in ("baseline", "today"))
        totals["baseline"] += old
        totals["today"] += new
        lines.append(f"| {kind} | {shapes[kind][0]} × {shapes[kind][1]} | {old:.4f} | {new:.4f} | {new / old:.2f} |")
    lines.append(f"| block | | {totals['baseline']:.4f} | {totals['today']:.4f} | "
                 f"{totals['today'] / totals['baseline']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
