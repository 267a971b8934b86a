"""Sweeps: every (allocation method, budget) becomes a plan, is quantized and evaluated, and lands in the store.

Each point reuses a stored run when the same plan was quantized before with the same settings (e.g. `uniform` at 3.25
and 3.5 bits is the same 3-bit plan), so an interrupted sweep resumes where it stopped, and a partly quantized point
resumes at its first unfinished block (aptq.pipeline). `run_sweep` quantizes the points one after the other in this
process; aptq.ray_sweep spreads the same plans over a Ray cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pandas as pd

from aptq import history
from aptq.allocate import (
    PREDICTED_ERROR_ATTENTION,
    PREDICTED_ERRORS,
    AllocationError,
    AllocationRequest,
    Candidate,
    allocate,
    error_source_for,
    summarize,
)
from aptq.data import Corpus, Sampling
from aptq.export import LayerGroups
from aptq.history import RunRecord
from aptq.models import LoadedModel, model_fingerprint
from aptq.pipeline import EvalSettings, QuantizeSettings, run_plan
from aptq.progress import Progress, no_progress
from aptq.store import Store

# The measured run's columns a sweep's table shows for each point.
RUN_COLUMNS = ("key", "avg_bits", "effective_bits", "size_mb", "perplexity", "kl", "top1", "quant_seconds", "cached")


@dataclass(frozen=True)
class SweepPoint:
    allocation: str
    budget: float
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.allocation} @ {self.budget:g} bits" + (f" (seed {self.seed})" if self.allocation == "random"
                                                                else "")


@dataclass(frozen=True)
class PointPlan:
    """A sweep point turned into a plan (saved in the store), or the reason the point was skipped."""

    point: SweepPoint
    bits: dict[str, int] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # the plan_meta of aptq.pipeline.run_plan
    skipped: str | None = None
    layer_groups: LayerGroups = ()  # with (bits, group size) candidates (aptq.allocate.Plan)

    def settings_for(self, settings: QuantizeSettings) -> QuantizeSettings:
        """The sweep's settings with this plan's group sizes."""
        return replace(settings, layer_groups=self.layer_groups)

    def row(self, run: RunRecord | None = None, failed: str | None = None) -> dict:
        """The point's line in the sweep's table: its measured run, why it was skipped, or why its run failed."""
        base = {"allocation": self.point.allocation, "budget": self.point.budget, "seed": self.point.seed}
        if self.skipped is not None:
            return base | {"skipped": self.skipped}
        if run is None:
            return base | {"failed": failed}
        return (base | {key: getattr(run, key) for key in RUN_COLUMNS}
                | {name: self.meta[name] for name in (PREDICTED_ERROR_ATTENTION, "error_source")})


def sweep_points(allocations: list[str], budgets: list[float], seeds: tuple[int, ...]) -> list[SweepPoint]:
    return [SweepPoint(allocation, budget, seed) for allocation in allocations for budget in budgets
            for seed in (seeds if allocation == "random" else (0,))]


def plan_points(layers: pd.DataFrame, errors: pd.DataFrame, points: list[SweepPoint], candidates: tuple[Candidate, ...],
                settings: QuantizeSettings, model_fp: str, store: Store) -> list[PointPlan]:
    """Every point's plan from the analysis, saved in the store in the points' order (a plan reached again keeps the
    latest point's name). The plans use the predicted errors of the quantizer that will run (`settings.method`),
    or RTN's where the analysis has none of its (aptq.allocate.error_source_for), in the unit `layers.attrs` names
    (the calibrated unit after aptq.calibrate.with_unit, else the heuristic one), times the width and grid multiples
    it carries (aptq.calibrate.with_width_multiples; none: 1 at every width). With (bits, group size) candidates
    the budgets are effective bits and each plan carries its layers' group sizes."""
    source = error_source_for(errors, settings.method).source
    unit = layers.attrs.get("unit", "heuristic")
    multiples, grid_multiples = layers.attrs.get("width_multiples", {}), layers.attrs.get("grid_multiples", {})
    plans = []
    for point in points:
        request = AllocationRequest(point.budget, point.allocation, candidates, seed=point.seed,
                                    group_size=settings.group_size, quantizer=source, unit=unit,
                                    width_multiples=multiples, grid_multiples=grid_multiples)
        try:
            plan = allocate(layers, errors, request)
        except AllocationError as exc:
            plans.append(PointPlan(point, skipped=str(exc)))
            continue
        summary = summarize(plan, layers, errors)
        meta = {"name": point.name, "allocation": point.allocation, "budget": point.budget,
                "analysis": layers.attrs.get("analysis_key"), "group_size": settings.group_size,
                **{name: summary[name] for name in ("error_source", "error_unit", "width_multiples", "grid_multiples",
                                                    *PREDICTED_ERRORS)}}
        layer_groups = plan.layer_groups()
        history.save_plan(store, model_fp, point.name, plan.bits,
                          meta | {"request": request, "summary": summary, "layer_groups": layer_groups})
        plans.append(PointPlan(point, plan.bits, meta, layer_groups=layer_groups))
    return plans


def run_sweep(loaded: LoadedModel, corpus: Corpus, sampling: Sampling, layers: pd.DataFrame, errors: pd.DataFrame,
              points: list[SweepPoint], candidates: tuple[Candidate, ...], settings: QuantizeSettings,
              evaluation: EvalSettings, store: Store | None = None, progress: Progress = no_progress) -> pd.DataFrame:
    """One row per point: its plan's summary and the measured run (or why the point was skipped)."""
    store = store or Store()
    planned = plan_points(layers, errors, points, candidates, settings, model_fingerprint(loaded.path), store)
    rtn_memo: dict = {}  # RTN rounds each (layer, width) once for the whole sweep
    rows = []
    for index, point_plan in enumerate(planned):
        name = point_plan.point.name
        if point_plan.skipped is not None:
            rows.append(point_plan.row())
            continue

        def report(done: int, total: int, message: str, index: int = index, name: str = name) -> None:
            progress(index, len(points), f"{name}: {message}")

        run = run_plan(loaded, corpus, sampling, point_plan.bits, point_plan.settings_for(settings), evaluation, store,
                       report, point_plan.meta, rtn_memo=rtn_memo)
        rows.append(point_plan.row(run))
        progress(index + 1, len(points), name)
    return pd.DataFrame(rows)
