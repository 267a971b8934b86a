"""How long a quantization run or an analysis will take, from the speed measured by earlier ones on this machine.

(our choice) Quantization time is taken as proportional to the number of quantized layers and, for GPTQ and the
attention-aware method, to the calibration tokens (the Hessians are collected over them); evaluation time as
proportional to the evaluated tokens. Each rate is the median over the stored runs of the same method, device and
block-refinement steps (aptq.blockwise: a few hundred steps take several times the layer-wise quantizer's time).
An analysis block's time is taken as proportional to the calibration tokens (N × L), at the median rate of the
blocks of this model analysed before on the same device, whatever their settings (our choice: quantizer errors or
more widths make a block slower, and the estimate does not model that).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from aptq.allocate import FULL_PRECISION


@dataclass(frozen=True)
class RunTime:
    quant_seconds: float
    eval_seconds: float
    runs: int  # how many stored runs the quantization rate comes from

    @property
    def total(self) -> float:
        return self.quant_seconds + self.eval_seconds


def _work(plan_json: str, settings_json: str, method: str) -> float:
    """Quantized layers × (calibration tokens unless RTN): the unit of quantization work."""
    layers = sum(1 for bits in json.loads(plan_json).values() if bits < FULL_PRECISION)
    if method == "rtn":
        return float(layers)
    settings = json.loads(settings_json or "{}")
    return float(layers * settings.get("samples", 1) * settings.get("seqlen", 1))


def _refinement_steps(settings_json: str) -> int:
    return (json.loads(settings_json or "{}").get("block") or {}).get("iterations", 0)


def expected_run_time(runs: pd.DataFrame, method: str, device: str, plan: dict[str, int], samples: int, seqlen: int,
                      eval_tokens: int, refinement_steps: int = 0) -> RunTime | None:
    """The expected seconds of quantizing `plan` with `method` (and `refinement_steps` of block refinement) and
    evaluating `eval_tokens`; None when no stored run of that method, device and refinement has been timed."""
    same = runs[(runs["method"] == method) & (runs["device"] == device)
                & (runs["settings"].map(_refinement_steps) == refinement_steps)].dropna(subset=["quant_seconds"])
    if same.empty:
        return None
    work = same.apply(lambda row: _work(row["plan"], row["settings"], method), axis=1)
    rate = (same["quant_seconds"] / work.where(work > 0)).median()
    timed = runs[(runs["device"] == device) & (runs["eval_seconds"] > 0)]
    eval_rate = (timed["eval_seconds"] / timed["eval_tokens"]).median() if not timed.empty else 0.0
    mine = _work(json.dumps(plan), json.dumps({"samples": samples, "seqlen": seqlen}), method)
    return RunTime(float(rate * mine), float(eval_rate * eval_tokens), len(same))


@dataclass(frozen=True)
class AnalysisTime:
    seconds: float
    blocks_measured: int  # how many stored blocks the rate comes from


def expected_analysis_time(rates: list[float], blocks: int, samples: int, seqlen: int) -> AnalysisTime | None:
    """The expected seconds of analysing `blocks` blocks over samples × seqlen calibration tokens, from the
    seconds per token of blocks analysed before (analyses.block_seconds_per_token); None without any."""
    if not rates:
        return None
    return AnalysisTime(float(np.median(rates)) * blocks * samples * seqlen, len(rates))
