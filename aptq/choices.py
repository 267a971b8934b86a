"""The names a user chooses from (the embedded model, quantizers, allocators, named corpora), in one torch-free place:
listing them (the CLI's --help, argument checks) imports nothing heavy."""

from __future__ import annotations

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
METHOD_LABELS = {"rtn": "RTN", "gptq": "GPTQ", "attention": "attention-aware GPTQ (BoA)",
                 "aespa": "aespa (attention-aware GPTQ, rounding optimised on the attention-wise loss)"}
QUANTIZERS = tuple(METHOD_LABELS)
ALLOCATORS = ("knapsack", "knapsack-layerwise", "aptq", "uniform", "random")
NAMED_CORPORA = ("brown", "wikitext2", "c4")
