"""Cost of the calibrated unit's noise measurement per layer: forwards from the layer's block (the inputs replayed)
against whole-model forwards, in one process, on the embedded model.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_unit_speed [--samples 16] [--seqlen 512] [--blocks 0,10,20,29]

The validation part is what `aptq.calibrate` holds out (the last 25 % of the calibration segments); one noise level
per layer (the 3-bit RTN error's size is not needed for timing: noise of the weight's own power / 16). For each of the
out projections of `--blocks`, `measure_layer` runs whole and replayed, alternately, and both KLs are printed (they
must agree). The last line extrapolates one unit calibration of every layer: Σ over blocks of each block's cost
interpolated linearly in the block index (the cost falls with the blocks left to run).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from aptq import calibrate
from aptq.data import Sampling, calibration_segments, load_corpus, token_ids
from aptq.evaluate import reference_stats
from aptq.models import get_weight, load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--blocks", default="0,10,20,29")
    args = parser.parse_args()
    loaded = load_model(device="cpu")
    segments = calibration_segments(token_ids(loaded.tokenizer, load_corpus(), "calibration"),
                                    Sampling(args.samples, args.seqlen))
    windows = calibrate.validation_segments(segments, calibrate.UnitSettings().holdout)
    with torch.inference_mode():
        reference = reference_stats(loaded.model, windows)
    blocks = sorted(int(b) for b in args.blocks.split(","))
    rows = []
    for block, inputs in calibrate.block_inputs(loaded, windows, set(blocks)):
        layer = next(layer for layer in loaded.arch.block_layers(block) if layer.kind == "o")
        levels = np.array([float(get_weight(loaded.model, layer).detach().pow(2).mean()) / 16])
        whole = calibrate.measure_layer(loaded, layer.name, levels, windows, reference, seed=0)
        replayed = calibrate.measure_layer(loaded, layer.name, levels, windows, reference, seed=0, inputs=inputs)
        rows.append({"layer": layer.name, "block": block, "whole_s": round(whole.seconds, 2),
                     "replayed_s": round(replayed.seconds, 2), "kl_whole": whole.kl[0], "kl_replayed": replayed.kl[0],
                     "load": os.getloadavg()[0]})
        print(json.dumps(rows[-1]), flush=True)
    every = np.arange(loaded.arch.n_blocks)
    per_block = {kind: np.interp(every, blocks, [row[f"{kind}_s"] for row in rows]) for kind in ("whole", "replayed")}
    layers_per_block = len(loaded.arch.layers) // loaded.arch.n_blocks
    total = {kind: float(cost.sum() * layers_per_block) for kind, cost in per_block.items()}
    print(json.dumps({"layers": len(loaded.arch.layers), "windows": list(windows.shape),
                      "unit_whole_s": round(total["whole"]), "unit_replayed_s": round(total["replayed"]),
                      "speedup": round(total["whole"] / total["replayed"], 2)}))


if __name__ == "__main__":
    main()
