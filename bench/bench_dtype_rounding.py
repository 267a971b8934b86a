"""What storing dequantized weights in bf16 or fp16 adds to the quantization error, on the embedded model's layers.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_dtype_rounding.py

A GPU run keeps the model in bf16 (fp16 where bf16 is unsupported; aptq.models.default_dtype), so the dequantized grid
`s · (level − z)` computed in float32 is rounded to that dtype when written back. Per layer (blocks 0, 10, 20, 29; all
seven projections), RTN at 4, 3 and 2 bits with groups of 64 in float32 gives Q; the table reports the squared
Frobenius norm of that rounding, ‖dtype(Q) − Q‖², relative to the quantization error ‖Q − W‖² (median and max over
layers). Prints a Markdown table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from aptq.models import get_weight, load_model
    from aptq.quantizer import QuantConfig, rtn

    loaded = load_model(device="cpu")
    layers = [layer for layer in loaded.arch.layers if layer.block in (0, 10, 20, 29)]
    print("| bits | dtype | median ‖rounding‖² / ‖quantization error‖² | max | layers |")
    print("|---|---|---|---|---|")
    for bits in (4, 3, 2):
        ratios: dict[str, list[float]] = {"bfloat16": [], "float16": []}
        for layer in layers:
            weight = get_weight(loaded.model, layer).detach().float()
            quantized = rtn(weight, QuantConfig(bits, 64, clip_search=False))
            error = (quantized - weight).square().sum().item()
            for dtype in ratios:
                rounding = (quantized.to(getattr(torch, dtype)).float() - quantized).square().sum().item()
                ratios[dtype].append(rounding / error)
        for dtype, values in ratios.items():
            values = torch.tensor(values)
            print(f"| {bits} | {dtype} | {values.median().item():.2e} | {values.max().item():.2e} | {len(values)} |")


if __name__ == "__main__":
    main()
