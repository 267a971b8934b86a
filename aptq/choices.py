"""The names a user chooses from (the embedded model, quantizers, allocators, named corpora), in one torch-free place:
listing them (the CLI's --help, argument checks) imports nothing heavy."""

from __future__ import annotations

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
METHOD_LABELS = {"rtn": "RTN", "gptq": "GPTQ", "attention": "attention-aware GPTQ (BoA)",
                 "aespa": "aespa (attention-aware GPTQ, rounding optimised on the attention-wise loss)"}
QUANTIZERS = tuple(METHOD_LABELS)
ALLOCATORS = ("knapsack", "knapsack-layerwise", "aptq", "uniform", "random")
# the solvers whose plans the predicted errors (source, unit) make; the only ones that take (bits, group) candidates
ERROR_SOLVERS = ("knapsack", "knapsack-layerwise")
PAIRS_SOLVER = "knapsack-pairs"  # how curves and benchmarks name the knapsack over (bits, group size) pairs
NAMED_CORPORA = ("brown", "wikitext2", "c4")
# (our choice) the share by which the attention-aware Hessians are shrunk toward GPTQ's (aptq.pipeline,
# `QuantizeSettings.shrink`), chosen on validation segments of the calibration split: bench/results/quantizer.md
ATTENTION_SHRINK = 0.0
# (our choice) the pair weights of q/k's row Hessians (aptq.hessian.CollectOptions.row_weights), chosen the same way
ROW_WEIGHT_CHOICES = ("uniform", "attention")
ROW_WEIGHTS = "attention"
# (our choice) act-order for the layers of at least this many bits (`QuantizeSettings.act_order_from`; None: off),
# chosen on validation windows of the calibration split (bench/results/peers.md): it lowered GPTQ's and the
# attention-aware quantizer's KL at 3 and 4 bits and raised both at 2
ACT_ORDER_FROM: int | None = 3
ACT_ORDER_WIDTHS: tuple[int | None, ...] = (None, 2, 3, 4)  # the first widths the dashboard offers (None: off)
# (our choice) the share of the full-precision-output objective (`QuantizeSettings.fp_targets`, docs/algorithms.md
# §17), chosen on validation windows of the calibration split (bench/results/peers.md): of 0, 0.1, 0.25, 0.5 and 1,
# 0.25 gave GPTQ's lowest validation KL at 3 bits on the embedded model; it lowered every quantizer's at 2 and 3 bits on
# the embedded model and Gemma 3
FP_TARGETS = 0.25


def act_order_label(first: int | None) -> str:
    """How the dashboard names a first act-order width."""
    return "off" if first is None else "every layer" if first == 2 else f"layers of {first}+ bits"
