"""Sweeps: every (allocation method, budget) becomes a plan, is quantized and evaluated, and lands in the store.

Each point reuses a stored run when the same plan was quantized before with the same settings (e.g. `uniform` at 3.25
and 3.5 bits is the same 3-bit plan), so an interrupted sweep resumes where it stopped, and a partly quantized point
resumes at its first unfinished block (aptq.pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from aptq import history
from aptq.allocate import (
    PREDICTED_ERROR_ATTENTION,
    PREDICTED_ERRORS,
    AllocationError,
    AllocationRequest,
    allocate,
    summarize,
)
from aptq.data import Corpus, Sampling
from aptq.models import LoadedModel, model_fingerprint
from aptq.pipeline import EvalSettings, QuantizeSettings, run_plan
from aptq.progress import Progress, no_progress
from aptq.store import Store
from aptq.validate import parse_budgets  # noqa: F401 (its home before; callers import it from here)


@dataclass(frozen=True)
class SweepPoint:
    allocation: str
    budget: float
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.allocation} @ {self.budget:g} bits" + (f" (seed {self.seed})" if self.allocation == "random"
                                                                else "")


def sweep_points(allocations: list[str], budgets: list[float], seeds: tuple[int, ...]) -> list[SweepPoint]:
    return [SweepPoint(allocation, budget, seed) for allocation in allocations for budget in budgets
            for seed in (seeds if allocation == "random" else (0,))]


def run_sweep(loaded: LoadedModel, corpus: Corpus, sampling: Sampling, layers: pd.DataFrame, errors: pd.DataFrame,
              points: list[SweepPoint], candidates: tuple[int, ...], settings: QuantizeSettings,
              evaluation: EvalSettings, store: Store | None = None, progress: Progress = no_progress) -> pd.DataFrame:
    """One row per point: its plan's summary and the measured run (or why the point was skipped)."""
    store = store or Store()
    model_fp = model_fingerprint(loaded.path)
    rtn_memo: dict = {}  # RTN rounds each (layer, width) once for the whole sweep
    rows = []
    for index, point in enumerate(points):
        request = AllocationRequest(point.budget, point.allocation, candidates, seed=point.seed,
                                    group_size=settings.group_size)
        base = {"allocation": point.allocation, "budget": point.budget, "seed": point.seed}
        try:
            plan = allocate(layers, errors, request)
        except AllocationError as exc:
            rows.append(base | {"skipped": str(exc)})
            continue
        summary = summarize(plan, layers, errors)
        meta = {"name": point.name, "allocation": point.allocation, "budget": point.budget,
                "analysis": layers.attrs.get("analysis_key"), "group_size": settings.group_size,
                **{name: summary[name] for name in PREDICTED_ERRORS}}
        history.save_plan(store, model_fp, point.name, plan.bits, meta | {"request": request, "summary": summary})

        def report(done: int, total: int, message: str, index: int = index) -> None:
            progress(index, len(points), f"{point.name}: {message}")

        run = run_plan(loaded, corpus, sampling, plan.bits, settings, evaluation, store, report, meta,
                       rtn_memo=rtn_memo)
        rows.append(base | {key: getattr(run, key) for key in ("key", "avg_bits", "effective_bits", "size_mb",
                                                               "perplexity", "kl", "top1", "quant_seconds", "cached")}
                    | {PREDICTED_ERROR_ATTENTION: summary[PREDICTED_ERROR_ATTENTION]})
        progress(index + 1, len(points), point.name)
    return pd.DataFrame(rows)
