"""Cost of the per-token row Hessians (q/k-norm and soft-cap families) per segment and head, on the CPU.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_geometry.py

Times `mapped_middle` + `sandwiched_sum` of aptq/geometry.py on random keys with a causal mask and a standard RoPE, for
three sizes: with a q/k norm (cumulative sums) and with a soft-cap (a dense L × L product). The baseline, timed in
the same run on the same middle factors: the q/k-norm sum formed from every position's real d × d matrix
(`per_position_sum`, how `sandwiched_sum` computed it before 2026-12-01), checked equal. Writes
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

from aptq.geometry import (  # noqa: E402
    AttentionGeometry,
    NormJacobian,
    complex_to_real,
    mapped_middle,
    query_pairs,
    rotary_layout,
    sandwiched_sum,
)

# (segment length, head size): SmolLM2-like, Gemma 3-like and Qwen3-like heads
SIZES = ((512, 64), (512, 256), (2048, 128))


def per_position_sum(middle: torch.Tensor, jacobian: NormJacobian) -> torch.Tensor:
    """The baseline: Σ_r J_rᵀ M_r J_r with every N_r = s_r² D M_r D formed as a real d × d matrix."""
    gain, u = jacobian.gain, jacobian.direction
    scaled = complex_to_real(middle) * (gain[:, None] * gain[None, :]) * jacobian.scale.square()[:, None, None]
    pushed = (scaled @ u[:, :, None])[..., 0]
    cross = pushed.T @ u
    curvature = (pushed * u).sum(-1)
    return scaled.sum(0) - cross - cross.T + (u * curvature[:, None]).T @ u


def timed(function, *args) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


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
            middle, middle_s = timed(mapped_middle, keys, weights, layout)
            result, sum_s = timed(sandwiched_sum, middle, norm)
            if norm is None:
                rows.append(f"| {length} | {head_dim} | {case} | {middle_s:.2f} | {sum_s:.2f} | — | — |")
                continue
            expected, baseline_s = timed(per_position_sum, middle, norm)
            torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
            rows.append(f"| {length} | {head_dim} | {case} | {middle_s:.2f} | {sum_s:.2f} | {baseline_s:.2f} | "
                        f"{(middle_s + baseline_s) / (middle_s + sum_s):.2f}× |")
    load = os.getloadavg()[0]
    text = "\n".join([
        "# Per-token row Hessians: seconds per segment and head (one thread)", "",
        f"Machine: {os.cpu_count()} cores, load average {load:.1f} while measuring (other jobs share the cores).", "",
        "Seconds per segment and head: forming the per-position middle factors (`mapped_middle`), then their sum",
        "(`sandwiched_sum`) against the baseline sum from per-position real matrices (`per_position_sum`); speed-up of",
        "the whole step (middle + sum).", "",
        "| L | d_h | case | middle s | sum s | baseline sum s | speed-up |", "|---|---|---|---|---|---|---|",
        *rows, ""])
    (ROOT / "bench" / "results" / "geometry.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
