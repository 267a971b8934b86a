"""What the Trade-offs page compares: which runs may share a chart, the best runs, what the analysis predicts before
anything is quantized, and an estimate for a plan not yet measured.

Runs are comparable only when they cover the same layers and were measured under the same perplexity protocol
(corpus, window, tokens): a run set. Predictions are comparable only within one analysis (each analysis has its own
unit of predicted error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from aptq import history
from aptq.allocate import (
    FULL_PRECISION,
    PREDICTED_ERROR_ATTENTION,
    AllocationError,
    AllocationRequest,
    allocate,
    equal_bytes_pairs,
    summarize,
)
from aptq.choices import PAIRS_SOLVER
from aptq.models import Architecture

MIN_FIT_RUNS = 3  # (our choice) runs with predictions needed before an unmeasured plan gets an estimate
SET_COLUMNS = ["coverage", "corpus", "eval_seqlen", "eval_tokens"]
HIGHER_IS_BETTER = {"perplexity": False, "kl": False, "top1": True}
BAND_Z = 2.0  # (our choice) uncertainty bands of ± 2 standard errors (about 95 % for a normally distributed mean)
# the standard error each measure's band is drawn from (aptq.evaluate: over the evaluation windows)
MEASURE_SE = {"perplexity": "nll_se", "kl": "kl_se", "top1": "top1_se"}
PREDICTED_ERROR_ATTENTION_SE = f"{PREDICTED_ERROR_ATTENTION}_se"


@dataclass(frozen=True)
class RunSet:
    """Runs that may be drawn and ranked together: one coverage, one perplexity protocol."""

    coverage: str
    corpus: str
    eval_seqlen: int
    eval_tokens: int
    count: int

    @property
    def protocol(self) -> str:
        return f"{self.corpus} evaluation split, window {self.eval_seqlen}, {self.eval_tokens} tokens"

    @property
    def label(self) -> str:
        return f"{self.coverage} · {self.protocol} ({self.count} run{'s' if self.count != 1 else ''})"


def run_sets(runs: pd.DataFrame) -> list[RunSet]:
    """The run sets present in `runs` (coverage filled in, see aptq.coverage.fill_coverage), largest first."""
    if runs.empty:
        return []
    counts = runs.groupby(SET_COLUMNS, dropna=False).size().sort_values(ascending=False, kind="stable")
    return [RunSet(str(cov), str(corpus), int(seqlen), int(tokens), int(n))
            for (cov, corpus, seqlen, tokens), n in counts.items()]


def select(runs: pd.DataFrame, run_set: RunSet) -> pd.DataFrame:
    return runs[(runs["coverage"] == run_set.coverage) & (runs["corpus"] == run_set.corpus)
                & (runs["eval_seqlen"] == run_set.eval_seqlen) & (runs["eval_tokens"] == run_set.eval_tokens)]


@dataclass(frozen=True)
class Predicted:
    runs: pd.DataFrame  # the runs predicted by `analysis`
    analysis: str | None
    left_out: int  # runs with a prediction from another analysis


def newest_analysis(runs: pd.DataFrame) -> Predicted:
    """The runs that carry a prediction, restricted to the analysis of the newest one (predictions of different
    analyses are in different units)."""
    predicted = runs.dropna(subset=[PREDICTED_ERROR_ATTENTION])
    if predicted.empty:
        return Predicted(predicted, None, 0)
    analysis = predicted["analysis"]
    newest = analysis.loc[predicted["created"].idxmax()]
    same = analysis.isna() if pd.isna(newest) else analysis == newest
    return Predicted(predicted[same], None if pd.isna(newest) else str(newest), int((~same).sum()))


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float  # ± one standard deviation of the fit's residuals, in log space (our choice of uncertainty band)
    high: float
    quantizer: str  # (aptq.history.quantizer_names) whose runs the line was fitted to
    runs: int


def estimate(runs: pd.DataFrame, predicted: float, analysis: str | None, measured: str) -> Estimate | None:
    """An unmeasured plan's `measured`, read off a log–log line fitted to the runs of the best-covered quantizer
    (aptq.history.quantizer_names; our choice) among those predicted by the plan's own `analysis`; None with too few
    runs."""
    usable = runs[runs["analysis"] == analysis].dropna(subset=[PREDICTED_ERROR_ATTENTION, measured])
    usable = usable[(usable[PREDICTED_ERROR_ATTENTION] > 0) & (usable[measured] > 0)]
    if usable.empty or not math.isfinite(predicted) or predicted <= 0:
        return None
    quantizers = history.quantizer_names(usable)
    quantizer = str(quantizers.value_counts().index[0])
    fit = usable[quantizers == quantizer]
    if len(fit) < MIN_FIT_RUNS or fit[PREDICTED_ERROR_ATTENTION].nunique() < 2:
        return None
    x, y = np.log(fit[PREDICTED_ERROR_ATTENTION].to_numpy()), np.log(fit[measured].to_numpy())
    slope, intercept = np.polyfit(x, y, 1)
    spread = float(np.std(y - (intercept + slope * x), ddof=2)) if len(fit) > 2 else 0.0
    center = intercept + slope * math.log(predicted)
    return Estimate(math.exp(center), math.exp(center - spread), math.exp(center + spread), quantizer, len(fit))


def pareto_frontier(runs: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The runs no other run beats on both fewer bits and better `y` (lower perplexity/KL, higher top-1), by bits."""
    better = HIGHER_IS_BETTER.get(y, False)
    ordered = runs.dropna(subset=[x, y]).sort_values([x, y], ascending=[True, not better], kind="stable")
    keep, best = [], -math.inf if better else math.inf
    for index, value in ordered[y].items():
        if (value > best) if better else (value < best):
            keep.append(index)
            best = value
    return ordered.loc[keep]


def runs_of_plan(runs: pd.DataFrame, plan: dict[str, int], arch: Architecture) -> pd.DataFrame:
    """The runs that quantized exactly `plan` (layers it does not name in FP16)."""
    complete = {layer.name: int(plan.get(layer.name, FULL_PRECISION)) for layer in arch.layers}
    return runs[runs["plan"] == history.plan_json(complete)]


def predicted_curves(layers: pd.DataFrame, errors: pd.DataFrame, solvers: tuple[str, ...], budgets: list[float],
                     candidates: tuple[int, ...], group_size: int) -> pd.DataFrame:
    """Predicted total error (attention-aware, in one unit) of every solver's plan at every budget, from the
    analysis alone: solver, budget, avg_bits (over the analysed layers), PREDICTED_ERROR_ATTENTION and its standard
    error (aptq.allocate.summarize; NaN for an analysis without standard errors). Budgets a solver cannot meet are
    left out.

    With errors at several group sizes, also PAIRS_SOLVER: the knapsack over (bits, group size) pairs at the bytes
    of a `budget`-bit plan in groups of `group_size` (allocate.equal_bytes_pairs); its avg_bits is the average width
    a plan in groups of `group_size` would have at the same size, so that every curve shares one axis."""
    groups = sorted({int(g) for g in errors.get("group_size", pd.Series([group_size]))} - {group_size})
    rows = []
    for solver in (*solvers, *([PAIRS_SOLVER] if groups else [])):
        for budget in budgets:
            request = AllocationRequest(budget, solver, candidates, group_size=group_size)
            if solver == PAIRS_SOLVER:
                request = equal_bytes_pairs(layers, budget, request, groups)
            try:
                plan = allocate(layers, errors, request)
            except AllocationError:
                continue
            summary = summarize(plan, layers, errors)
            # a pairs plan's effective bits less the overhead of `group_size` groups (the same for every width)
            bits = (summary["avg_bits"] if solver != PAIRS_SOLVER else
                    summary["effective_bits"] - request.budget + budget)
            rows.append({"solver": solver, "budget": budget, "avg_bits": bits,
                         PREDICTED_ERROR_ATTENTION: summary[PREDICTED_ERROR_ATTENTION],
                         PREDICTED_ERROR_ATTENTION_SE: summary[PREDICTED_ERROR_ATTENTION_SE]})
    return pd.DataFrame(rows, columns=["solver", "budget", "avg_bits", PREDICTED_ERROR_ATTENTION,
                                       PREDICTED_ERROR_ATTENTION_SE])


def band(values: pd.Series, se: pd.Series, measure: str) -> tuple[pd.Series, pd.Series]:
    """Low and high ends of `values` ± BAND_Z standard errors `se` (NaN where `se` is): for perplexity `se` is that
    of the mean NLL and the band exp(NLL ± BAND_Z·se); KL's low end stops at 0 and top-1's within [0, 1], the
    bounds the measures have."""
    values, se = values.astype(float), se.astype(float)
    if measure == "perplexity":
        return values * np.exp(-BAND_Z * se), values * np.exp(BAND_Z * se)
    low, high = values - BAND_Z * se, values + BAND_Z * se
    return (low.clip(lower=0), high) if measure != "top1" else (low.clip(lower=0), high.clip(upper=1))
