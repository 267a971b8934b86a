"""Predicted against realised RTN error per layer, on the first blocks of the embedded model.

    OMP_NUM_THREADS=1 flock /tmp/heavy.lock .venv/bin/python bench/bench_rtn_prediction.py [--blocks 1]

Predicted: the analysis's `err_layerwise` / `err_attention` (aptq.sensitivity, stored in a private store). Realised:
the weights `quantize --method rtn` leaves (aptq.pipeline.quantize_model, its checkpoint files) scored with the same
measures on the Hessians of the block's full-precision inputs (the analysis's own, collected again). Also shown: what
the analysis predicted before METHOD_VERSION 4, RTN with its clipping searched under H. Brown, groups of 64, widths
2/3/4, calibration 8 × 512. Prints a Markdown table and the largest relative differences.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BITS = (2, 3, 4)
GROUP = 64


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=1)
    args = parser.parse_args()

    import aptq.pipeline as pipeline
    from aptq.capture import BlockWalk
    from aptq.data import Sampling, calibration_segments, load_corpus, token_ids
    from aptq.models import get_weight, load_model
    from aptq.pipeline import QuantizeSettings, quantize_model
    from aptq.quantizer import QuantConfig, layer_error, rtn
    from aptq.sensitivity import AnalysisSettings, _attention_error, analysis_options, analyze, collect_block
    from aptq.store import Store

    start = time.perf_counter()
    loaded = load_model(device="cpu")
    corpus = load_corpus("brown")
    sampling = Sampling(8, 512, seed=0)
    scratch = Path(tempfile.mkdtemp(prefix="rtn-prediction-"))
    pipeline.RUN_CACHE = scratch / "runs"
    _, errors = analyze(loaded, corpus, sampling, AnalysisSettings(GROUP, BITS, max_blocks=args.blocks),
                        store=Store(scratch / "store.duckdb"))
    predicted = errors.set_index(["layer", "bits"])
    segments = calibration_segments(token_ids(loaded.tokenizer, corpus, "calibration"), sampling)
    options = analysis_options(loaded.arch, probes=1, seed=sampling.seed)
    rows = []
    walk = BlockWalk(loaded.model, loaded.arch, segments, device=loaded.device, stop=args.blocks)
    for step in walk:
        hessians = collect_block(step, loaded.arch, options, {})
        for bits in BITS:
            plan = {layer.name: bits for layer in loaded.arch.block_layers(step.index)}
            run, _ = quantize_model(loaded, plan | {layer.name: 16 for layer in loaded.arch.layers
                                                    if layer.name not in plan},
                                    QuantizeSettings("rtn", GROUP), None, f"rtn-{step.index}-{bits}")
            realised = run.block(step.index)
            for layer in loaded.arch.block_layers(step.index):
                weight = get_weight(loaded.model, layer).detach().float()
                h = hessians.layerwise[layer.name]
                old = rtn(weight, QuantConfig(bits, GROUP), h)  # the analysis before METHOD_VERSION 4
                measures = {}
                for label, quantized in (("realised", realised[layer.name].float()), ("old", old)):
                    layerwise = layer_error(weight, quantized, h)
                    measures[label] = (layerwise, _attention_error(weight, quantized, layer.name, hessians,
                                                                   loaded.arch, h, layerwise))
                row = predicted.loc[(layer.name, bits)]
                rows.append((layer.name, bits, row["err_layerwise"], measures["realised"][0], measures["old"][0],
                             row["err_attention"], measures["realised"][1], measures["old"][1]))
    print("| layer | bits | predicted (layer-wise) | realised | before the fix | predicted (attention) | realised "
          "| before the fix |")
    print("|---|---|---|---|---|---|---|---|")
    for name, bits, *values in rows:
        print(f"| {name} | {bits} | " + " | ".join(f"{v:.6g}" for v in values) + " |")
    for column, label in ((0, "layer-wise"), (3, "attention")):
        now = max(abs(r[2 + column] / r[3 + column] - 1) for r in rows)
        before = [r[4 + column] / r[3 + column] for r in rows]
        print(f"\n{label}: max |predicted/realised − 1| = {now:.2e}; before the fix predicted/realised from "
              f"{min(before):.4f} to {max(before):.4f} (median {torch.tensor(before).median().item():.4f}), "
              f"{len(rows)} (layer, width) pairs")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
