"""How far the attention-weighted row Hessians move with fewer Gaussian sketches per segment (docs/algorithms.md §15).

    PYTHONPATH=. OMP_NUM_THREADS=2 .venv/bin/python bench/bench_row_sketches.py [--samples 64] [--seqlen 512] \
        [--blocks 0,5,15] [--sketches 16,4,1]

Collects the q/k row Hessians of the given blocks of the embedded model on Brown calibration segments once per
sketch count (aptq.hessian.ROW_SKETCHES per segment, whatever the calibration size) and prints, per layer, the mean
over heads of the relative Frobenius distance of each count's estimate to the first (largest) count's.
"""

from __future__ import annotations

import argparse
import json

import aptq.hessian as hessian
from aptq.capture import BlockWalk
from aptq.data import Sampling, calibration_segments, load_corpus, token_ids
from aptq.hessian import CollectOptions
from aptq.models import load_model
from aptq.pipeline import _collect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--blocks", default="0,5,15")
    parser.add_argument("--sketches", default="16,4,1", help="comma-separated; the first is the reference")
    args = parser.parse_args()
    blocks = [int(block) for block in args.blocks.split(",")]
    counts = [int(count) for count in args.sketches.split(",")]
    loaded = load_model(device="cpu")
    segments = calibration_segments(token_ids(loaded.tokenizer, load_corpus(), "calibration"),
                                    Sampling(args.samples, args.seqlen))
    options = CollectOptions(attention=True, probes=0, row_weights="attention")
    hessian.SKETCHED_SEGMENTS = args.samples  # every segment gets ROW_SKETCHES
    for step in BlockWalk(loaded.model, loaded.arch, segments, device="cpu", stop=max(blocks) + 1):
        if step.index not in blocks:
            continue
        rows = {}
        for count in counts:
            hessian.ROW_SKETCHES = count
            rows[count] = _collect(step, loaded.arch, options, {}, 1)[0].row
        for name, reference in rows[counts[0]].items():
            distances = {count: round(((rows[count][name] - reference).norm(dim=(-2, -1))
                                       / reference.norm(dim=(-2, -1))).mean().item(), 4) for count in counts[1:]}
            print(json.dumps({"block": step.index, "layer": name, "samples": args.samples, "seqlen": args.seqlen,
                              "reference_sketches": counts[0], "relative_distance": distances}), flush=True)


if __name__ == "__main__":
    main()
