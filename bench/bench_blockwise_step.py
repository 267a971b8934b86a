"""The time of one block-refinement step (aptq.blockwise) on a model's first block, by attention kernel and precision.

    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python -m bench.bench_blockwise_step [--model SOURCE] [--repeats 5]

One step is a forward and a backward pass of the block on one calibration batch (8 segments of 512 Brown tokens, the
default batch at that length) with every quantizable layer's weights a function of learned variables, as
`refine_block` runs it. Measured for the eager attention kernel in float32 (the models' loaded setting), PyTorch's
fused kernel in float32, and the fused kernel under bfloat16 autocast (what `refine_block` uses); the median of
`--repeats` steps after one warm-up step, and the block's output in each setting against eager float32. Prints a
Markdown table (bench/results/blockwise_step.md records one).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from aptq.blockwise import _forward, _fused_attention, _LayerGrid, _parameters
from aptq.capture import BlockWalk
from aptq.choices import EMBEDDED_MODEL
from aptq.data import Sampling, calibration_segments, load_corpus, token_ids
from aptq.models import get_weight, load_model
from aptq.quantizer import QuantConfig, rtn

SETTINGS = (("eager", False), ("fused", False), ("fused", True))  # (attention kernel, bfloat16 autocast)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    loaded = load_model(args.model, device="cpu")
    segments = calibration_segments(token_ids(loaded.tokenizer, load_corpus("brown"), "calibration"),
                                    Sampling(8, 512, seed=0))
    step = next(iter(BlockWalk(loaded.model, loaded.arch, segments, device="cpu")))
    batch = step.batch(0)
    layers = loaded.arch.block_layers(0)
    config = QuantConfig(2, 64)
    grids = {layer.name: _LayerGrid(get_weight(loaded.model, layer).detach(),
                                    rtn(get_weight(loaded.model, layer).detach(), config), config) for layer in layers}
    reference = None
    print(f"{args.model}, block 0, batch {tuple(batch.hidden.shape)}; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load {os.getloadavg()[0]:.2f}")
    print("| attention kernel | bfloat16 autocast | step s (median) | output vs eager float32 (max abs) |")
    print("|---|---|---|---|")
    for kernel, bfloat16 in SETTINGS:
        times = []
        for _ in range(args.repeats + 1):
            context = _fused_attention(loaded.model) if kernel == "fused" else torch.enable_grad()
            started = time.perf_counter()
            with context:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
                    weights = {name: grid.relaxed() for name, grid in grids.items()}
                    output = _forward(step, _parameters(step, loaded.arch, layers, weights), batch)
                output.square().mean().backward()
            times.append(time.perf_counter() - started)
            for grid in grids.values():
                grid.offset.grad = grid.log_factor.grad = None
        reference = output.detach() if reference is None else reference
        difference = (output.detach() - reference).abs().max().item()
        print(f"| {kernel} | {'yes' if bfloat16 else 'no'} | {statistics.median(times[1:]):.3f} | {difference:.3g} |")


if __name__ == "__main__":
    main()
