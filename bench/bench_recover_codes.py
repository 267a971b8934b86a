"""Cost of reading a run's codes back for the packed exports (`aptq.quantizer.recover_codes`): weights of a bfloat16 or
float16 model (the GPU default, rounded after quantization) against float32 weights of the same grid, in one process.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_recover_codes [--rows 2048] [--cols 2048] [--repeats 3]

For each width and group size, one rows × cols Gaussian layer is quantized by GPTQ on a random Hessian (float32, as
the pipeline computes it), then its codes are read back from the float32 weights and from the same weights cast to
bfloat16 and float16; each read is checked (float32: bit for bit; the half dtypes: the codes' values round to the
weights) and timed, best of --repeats. Seconds per million weights, so that a model's export can be extrapolated.
Writes bench/results/recover_codes.md; a hand-written "## Reading" below the table is kept.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from aptq.gptq import gptq
from aptq.quantizer import QuantConfig, recover_codes
from bench.reading import with_reading

RESULTS = Path(__file__).parent / "results" / "recover_codes.md"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def seconds_per_million(weight: torch.Tensor, cfg: QuantConfig, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        codes = recover_codes(weight, cfg)
        best = min(best, time.perf_counter() - start)
    if not torch.equal(codes.dequantize().to(weight.dtype), weight):
        raise AssertionError(f"codes of {weight.dtype} weights at {cfg} do not give them back")
    return best / weight.numel() * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(args.cols, 2 * args.cols, generator=generator)
    hessian = inputs @ inputs.T / inputs.shape[1]
    load = os.getloadavg()
    rows = []
    for bits in (2, 3, 4, 8):
        for group in (128, 0):
            cfg = QuantConfig(bits, group)
            quantized = gptq(torch.randn(args.rows, args.cols, generator=generator), hessian, cfg).weight
            times = [seconds_per_million(quantized.to(dtype), cfg, args.repeats) for dtype in DTYPES]
            rows.append(f"| {bits} | {group or 'per channel'} | " + " | ".join(f"{t:.3f}" for t in times)
                        + f" | {times[1] / times[0]:.1f}× | {times[2] / times[0]:.1f}× |")
            print(rows[-1], flush=True)
    lines = ["# Reading codes back for the packed exports: half-precision weights against float32", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {platform.machine()}, "
             f"{torch.get_num_threads()} thread(s), torch {torch.__version__}; load average at the start "
             f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, at the end "
             + " ".join(f"{x:.2f}" for x in os.getloadavg()),
             f"- command: `bench_recover_codes --rows {args.rows} --cols {args.cols} --repeats {args.repeats}`",
             f"- one {args.rows} × {args.cols} GPTQ-quantized Gaussian layer per row (float32 grid, asymmetric); its "
             "codes read back from the weights in each dtype, best of the repeats; every read checked", "",
             "| bits | group | float32 s/M weights | bfloat16 s/M | float16 s/M | bfloat16 / float32 "
             "| float16 / float32 |",
             "|---|---|---|---|---|---|---|", *rows]
    previous = RESULTS.read_text() if RESULTS.exists() else ""
    RESULTS.write_text(with_reading(lines, previous))


if __name__ == "__main__":
    main()
