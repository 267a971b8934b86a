"""Cost of aespa against GPTQ and attention-aware GPTQ on the embedded model's first blocks, and what it gains per
layer under its own objective.

    flock /tmp/heavy.lock env OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/bench_aespa.py \
        [--blocks 1] [--bits 2] [--samples 16] [--seqlen 512] [--iterations 0,100,300]

Per block (full-precision inputs, one Hessian collection shared by every method): seconds of GPTQ, of attention-aware
GPTQ and of aespa at each iteration count (its start included), and per layer the attention-wise loss of aespa's
result relative to its start (attention-aware GPTQ), with whether the start was kept. One JSON line per block and
setting, with the load average.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from aptq.aespa import AespaOptions, layer_objective
from aptq.capture import BlockWalk
from aptq.data import Sampling, calibration_segments, load_corpus, token_ids
from aptq.hessian import CollectOptions
from aptq.models import block_weight, get_weight, load_model
from aptq.pipeline import QuantizeSettings, _collect, quantize_layer
from aptq.quantizer import QuantConfig


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--iterations", default="0,100,300")
    args = parser.parse_args()
    loaded = load_model(device="cpu")
    corpus = load_corpus()
    segments = calibration_segments(token_ids(loaded.tokenizer, corpus, "calibration"),
                                    Sampling(args.samples, args.seqlen))
    config = QuantConfig(args.bits, args.group)
    walk = BlockWalk(loaded.model, loaded.arch, segments, device="cpu", stop=args.blocks)
    for step in walk:
        start = time.perf_counter()
        hessians, _ = _collect(step, loaded.arch, CollectOptions(attention=True, probes=0), {}, 1)
        collect_seconds = time.perf_counter() - start
        out_weight = block_weight(loaded.model, loaded.arch, step.index, "o")
        layers = loaded.arch.block_layers(step.index)
        settings = [("gptq", QuantizeSettings("gptq", args.group)),
                    ("attention", QuantizeSettings("attention", args.group))]
        settings += [(f"aespa-{n}", QuantizeSettings("aespa", args.group, aespa=AespaOptions(iterations=int(n))))
                     for n in args.iterations.split(",")]
        results = {}
        for label, setting in settings:
            start = time.perf_counter()
            results[label] = {layer.name: quantize_layer(get_weight(loaded.model, layer).detach(), layer, hessians,
                                                         config, setting, out_weight)[0] for layer in layers}
            seconds = time.perf_counter() - start
            ratios = {}
            if setting.method == "aespa":  # against its start, the attention-aware GPTQ result above
                for layer in layers:
                    weight = get_weight(loaded.model, layer).detach()
                    objective = layer_objective(layer, weight, hessians, out_weight)
                    ratios[layer.kind] = round(objective.loss(weight, results[label][layer.name])
                                               / objective.loss(weight, results["attention"][layer.name]), 4)
            print(json.dumps({"block": step.index, "method": label, "bits": args.bits, "group": args.group,
                              "calibration": f"{args.samples}x{args.seqlen}", "seconds": round(seconds, 1),
                              "collect_seconds": round(collect_seconds, 1), "loss_vs_start": ratios,
                              "load_average": load_average()}), flush=True)

if __name__ == "__main__":
    main()
