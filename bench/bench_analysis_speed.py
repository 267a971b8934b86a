"""Analysis time against one calibration forward, in the same process (issue 15's ≤ 2×, ≤ 3× with traces).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_analysis_speed.py --samples 16 --seqlen 512 --max-blocks 4 \
        [--profile out.prof]
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_analysis_speed.py --components

`--components`: the products this version changed, each against its previous form in the same process (CPU seconds,
so that other processes' load matters less), at the embedded model's shapes with random inputs: the Gram sums
`xᵀx` (aptq.products.add_gram_), `A_h Xᵀ` (causal_products) and the clipping search's chunk size (same grids).

On the embedded model, over the first `--max-blocks` blocks: (1) one forward of the calibration segments through
those blocks (the walk with no hooks: embeddings once, then each block on each batch), (2) the walk collecting the
layer-wise and attention-aware Hessians, (3) the same with the Hutchinson traces, (4) the predicted errors
(`layer_rows`: RTN with the clipping search at 4 widths + `layer_error`). Prints one JSON line; with `--profile`, the
cProfile statistics of (3) + (4) go to that file and the top functions by cumulative and own time are printed.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _cpu_seconds(work, repeats: int = 5) -> float:
    """Median CPU seconds of `work()` over `repeats` runs after one warm-up."""
    work()
    seconds = []
    for _ in range(repeats):
        start = time.process_time()
        work()
        seconds.append(time.process_time() - start)
    return sorted(seconds)[len(seconds) // 2]


def components() -> dict:
    from aptq import quantizer
    from aptq.products import add_gram_, causal_products

    torch.manual_seed(0)
    record: dict = {}
    rows = 4096  # one batch: 8 segments × 512 tokens
    for d in (576, 1536):  # the embedded model's hidden and intermediate sizes
        x, total = torch.randn(rows, d), torch.zeros(d, d)
        record[f"gram_{d}"] = (_cpu_seconds(lambda: total.add_(x.T @ x)), _cpu_seconds(lambda: add_gram_(total, x)))
    probs = torch.softmax(torch.randn(8, 3, 512, 512).masked_fill(
        torch.ones(512, 512, dtype=torch.bool).triu(1), float("-inf")), dim=-1)  # one KV group of 3 query heads
    x_v = torch.randn(8, 512, 576)
    record["attention_AX"] = (_cpu_seconds(lambda: probs @ x_v[:, None]),
                              _cpu_seconds(lambda: list(causal_products(probs, x_v))))
    weight = torch.randn(1536, 576)
    inputs = torch.randn(4096, 576) * torch.rand(576) * 3  # uneven input channels, as in real activations
    hessian = inputs.T @ inputs / 4096
    grids = {}

    def search(chunk: int):
        def run():
            quantizer.CLIP_SEARCH_ELEMENTS = chunk
            grids[chunk] = [quantizer.rtn(weight, quantizer.QuantConfig(bits, 64), hessian) for bits in (2, 3, 4, 8)]
        return run
    record["clip_search_4_widths"] = (_cpu_seconds(search(2 ** 20), 3), _cpu_seconds(search(2 ** 18), 3))
    record["clip_search_same_grids"] = all(torch.equal(a, b) for a, b in zip(grids[2 ** 20], grids[2 ** 18]))
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-blocks", type=int, default=4)
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--components", action="store_true")
    args = parser.parse_args()
    if args.components:
        record = components()
        load = Path("/proc/loadavg").read_text().split()[0]
        print(json.dumps({"threads": torch.get_num_threads(), "load_average": load,
                          "cpu_seconds_previous_current": record}))
        return

    from aptq.capture import BlockWalk
    from aptq.data import Sampling, calibration_segments, load_corpus, token_ids
    from aptq.hessian import CollectOptions
    from aptq.models import load_model
    from aptq.sensitivity import AnalysisSettings, collect_block, layer_rows

    loaded = load_model(device="cpu")
    segments = calibration_segments(token_ids(loaded.tokenizer, load_corpus(), "calibration"),
                                    Sampling(args.samples, args.seqlen))
    arch = loaded.arch

    def walk() -> BlockWalk:
        return BlockWalk(loaded.model, arch, segments, device="cpu", stop=args.max_blocks)

    times: dict[str, float] = {}
    start = time.perf_counter()
    with torch.no_grad():
        for step in walk():
            step.finish()
    times["forward"] = time.perf_counter() - start

    for name, options in (("hessians", CollectOptions(attention=True, probes=0)),
                          ("hessians_traces", CollectOptions(attention=True, probes=1))):
        profiler = cProfile.Profile() if args.profile and name == "hessians_traces" else None
        collect_seconds, rows_seconds = 0.0, 0.0
        if profiler:
            profiler.enable()
        cache: dict = {}
        for step in walk():
            begin = time.perf_counter()
            hessians = collect_block(step, arch, options, cache)
            collect_seconds += time.perf_counter() - begin
            if name == "hessians_traces":
                begin = time.perf_counter()
                layer_rows(loaded.model, arch, hessians, AnalysisSettings(group_size=64))
                rows_seconds += time.perf_counter() - begin
        if profiler:
            profiler.disable()
            profiler.dump_stats(str(args.profile))
        times[name] = collect_seconds
        if rows_seconds:
            times["predicted_errors"] = rows_seconds
    times["analysis"] = times["hessians_traces"] + times["predicted_errors"]
    ratios = {f"{k}_over_forward": v / times["forward"] for k, v in times.items() if k != "forward"}
    load = Path("/proc/loadavg").read_text().split()[0]
    print(json.dumps({"samples": args.samples, "seqlen": args.seqlen, "blocks": args.max_blocks,
                      "threads": torch.get_num_threads(), "load_average": load} | times | ratios))
    if args.profile:
        stats = pstats.Stats(str(args.profile))
        stats.sort_stats("cumulative").print_stats(25)
        stats.sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
