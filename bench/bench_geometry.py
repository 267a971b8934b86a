"""Cost of the per-token row Hessians (q/k-norm and soft-cap families) per segment and head, on the CPU.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_geometry.py

Times `mapped_middle` + `sandwiched_sum` of aptq/geometry.py on random keys with a causal mask and a standard RoPE, for
two sizes: with a q/k norm (cumulative sums) and with a soft-cap (a dense L × L product). Writes
bench/results/geometry.md with the machine's load average (other jobs may share the cores).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aptq.geometry import AttentionGeometry, NormJacobian, mapped_middle, query_pairs, rotary_layout, sandwiched_sum  # noqa: E402

SIZES = ((512, 64), (2048, 128))  # (segment length, head size): SmolLM2-like and Qwen3-like heads


def rope(length: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inverse = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.arange(length)[:, None] * inverse[None]
    doubled = torch.cat([angles, angles], -1)
    return doubled.cos()[None], doubled.sin()[None]


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for length, head_dim in SIZES:
        layout = rotary_layout(rope(length, head_dim), length, head_dim, torch.device("cpu"))
        geometry = AttentionGeometry(torch.ones(length, length, dtype=torch.bool).tril(), layout)
        keys = torch.randn(length, head_dim)
        direction = torch.randn(length, head_dim) / head_dim ** 0.5
        jacobian = NormJacobian(torch.rand(length), direction, torch.rand(head_dim))
        for case, weights, norm in (("q/k norm", query_pairs(geometry, None), jacobian),
                                    ("soft-cap", query_pairs(geometry, torch.rand(length, length)), None)):
            start = time.perf_counter()
            sandwiched_sum(mapped_middle(keys, weights, layout), norm)
            rows.append(f"| {length} | {head_dim} | {case} | {time.perf_counter() - start:.2f} |")
    load = os.getloadavg()[0]
    text = "\n".join([
        "# Per-token row Hessians: seconds per segment and head (one thread)", "",
        f"Machine: {os.cpu_count()} cores, load average {load:.1f} while measuring (other jobs share the cores).", "",
        "| L | d_h | case | seconds |", "|---|---|---|---|", *rows, ""])
    (ROOT / "bench" / "results" / "geometry.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
