"""The Trade-offs page's sweep: the Home page's analysis turned into plans at many budgets, each quantized and
evaluated in the background, in this process or as Ray tasks on a cluster (aptq.sweep, aptq.ray_sweep)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from aptq import validate
from aptq.aespa import AespaOptions
from aptq.allocate import error_source_for, pair_candidates
from aptq.calibrate import NO_MULTIPLES, grid_name
from aptq.choices import ALLOCATORS, ERROR_SOLVERS, METHOD_LABELS, QUANTIZERS
from aptq.data import Corpus, digest
from aptq.models import LoadedModel
from aptq.pipeline import EvalSettings, QuantizeSettings, has_output_norms
from aptq.progress import Progress
from aptq.store import Store, default_path
from aptq.sweep import run_sweep, sweep_points
from ui import jobs
from ui.session import Analysis, analysis_of, checked, corpus_spec, model_source


def pairs_and_multiples(analysis: Analysis, unit: str, method: str, cols: list) -> tuple[list[int], pd.DataFrame]:
    """The group sizes the sweep's knapsack plans choose among (the analysis's own alone unless it predicted errors
    at others and more are chosen) and its layers table in `unit`, carrying the chosen measured multiples of the
    quantizer's error source, as `aptq sweep --pairs --width-multiples` plans."""
    layers = analysis.layers_in(unit).copy()  # the plans' meta names the analysis (aptq.sweep.plan_points)
    layers.attrs["analysis_key"] = analysis.key
    grids = sorted({int(g) for g in analysis.errors.get("group_size", pd.Series([analysis.group_size]))})
    groups = [analysis.group_size]
    if len(grids) > 1:
        groups = cols[0].multiselect("Group sizes", grids, default=[analysis.group_size], key="sweep_groups",
                                     format_func=grid_name,
                                     help="with more than one, each knapsack plan gives every layer a (bits, group "
                                          "size) pair and the budgets count effective bits (as `aptq sweep --pairs` "
                                          "and the Bit budget page)") or [analysis.group_size]
    source = error_source_for(analysis.errors, method).source
    multiples = NO_MULTIPLES
    if offered := analysis.width_multiples_offered(unit, source):
        choice = cols[1].selectbox("Width multiples", ["none", *offered], key="sweep_multiples",
                                   help="measured multiples charged to every layer at each width (and grid), as "
                                        "on the Bit budget page (`aptq sweep --width-multiples`)")
        multiples = offered.get(choice, NO_MULTIPLES)
    layers.attrs |= {"width_multiples": multiples.widths,
                     "grid_multiples": multiples.grids if len(groups) > 1 else {}}
    return groups, layers


def sweep_section(loaded: LoadedModel, corpus: Corpus) -> None:
    """Solvers, budgets, quantizer and where to run; the running sweep's progress; failed runs when it ends."""
    analysis = analysis_of(loaded, corpus)
    if analysis is None:
        return
    request, key, frames = analysis.request, analysis.key, (analysis.layers, analysis.errors)
    candidates = tuple(sorted(int(bits) for bits in frames[1]["bits"].unique()))
    cols = st.columns(3)
    methods = cols[0].multiselect("Solvers", ALLOCATORS, default=["uniform", "knapsack"], key="sweep_methods")
    budget_text = cols[1].text_input("Budgets (bits)", "2.5:4.5:0.5", key="sweep_budgets",
                                     help="start:stop:step or a comma list")
    method = cols[2].selectbox("Quantizer", QUANTIZERS, index=QUANTIZERS.index("rtn"), format_func=METHOD_LABELS.get,
                               key="sweep_quantizer")
    tokens = cols[2].number_input("Evaluation tokens", min_value=16, value=16384, step=512, key="sweep_tokens")
    unit = cols[1].selectbox("Unit", analysis.units_offered, key="sweep_unit",
                             help="how the plans make errors of different layers comparable (as `aptq sweep "
                                  "--unit`): the heuristic factor, or the calibrated unit once the analysis has it "
                                  "(Home's *Calibrate the unit*)")
    groups, layers = pairs_and_multiples(analysis, unit, method, cols)
    ray_cols = st.columns([1, 2])
    on_ray = ray_cols[0].checkbox("Run on Ray", key="sweep_on_ray",
                                  help="each plan a Ray task (1 CPU each); this process alone writes the store")
    address = ray_cols[1].text_input("Ray address", key="sweep_ray_address", disabled=not on_ray,
                                     placeholder="host:port, auto or local; empty: $RAY_ADDRESS, a `ray start` "
                                                 "here, else a new local Ray")
    settings = QuantizeSettings(method=method, group_size=request.group_size,
                                aespa=AespaOptions.for_device(str(loaded.device)),
                                output_norms=has_output_norms(loaded))
    if note := error_source_for(frames[1], settings.method).note:
        st.info(note)
    evaluation = EvalSettings(seqlen=min(512, loaded.max_length), max_tokens=int(tokens))

    def start() -> None:
        budgets: list[float] = []
        if not methods:
            st.error("Choose at least one solver.")
            return
        if not checked(lambda: budgets.extend(validate.budgets(validate.parse_budgets(budget_text), candidates))):
            return
        if len(groups) > 1 and (others := [m for m in methods if m not in ERROR_SOLVERS]):
            st.error(f"(bits, group size) pairs are for the knapsack solvers ({', '.join(ERROR_SOLVERS)}), not "
                     f"{others[0]}: leave it out of the solvers, or keep one group size.")
            return
        if on_ray:
            from aptq.ray_sweep import RayOptions, import_ray

            if not checked(import_ray):
                return
        points = sweep_points(list(methods), budgets, (0,))
        plan_candidates = pair_candidates(candidates, groups) if len(groups) > 1 else candidates
        store = Store(default_path())

        def work(progress: Progress) -> pd.DataFrame:
            errors = frames[1]
            if not on_ray:
                return run_sweep(loaded, corpus, request.sampling, layers, errors, points, plan_candidates, settings,
                                 evaluation, store, progress)
            from aptq.ray_sweep import run_sweep_on_ray

            return run_sweep_on_ray(loaded, corpus, request.sampling, layers, errors, points, plan_candidates,
                                    settings, evaluation, store, progress, RayOptions(address.strip() or None))

        job_key = "sweep:" + digest(model_source(), corpus_spec(), key, unit, repr(points), repr(plan_candidates),
                                    repr(layers.attrs), repr(settings), repr(evaluation), str(on_ray),
                                    address.strip())
        where = f"on Ray {address.strip()}".rstrip() if on_ray else "here"
        jobs.start(job_key, f"sweep of {len(points)} plans {where}", model_source(), work)
        st.session_state["last_sweep"] = job_key

    st.button("Measure the sweep", on_click=start)
    job = jobs.find(st.session_state.get("last_sweep", ""))
    if job is None or job.state != "finished":
        jobs.show(job)
        return
    table: pd.DataFrame = job.result
    failed = table[table["failed"].notna()] if "failed" in table else table.iloc[:0]
    measured = int(table["key"].notna().sum()) if "key" in table else 0
    st.success(f"{job.label}: {measured} points measured or found stored; the charts above include them.")
    if not failed.empty:
        st.error(f"{len(failed)} point(s) failed; their plans are saved, and measuring the sweep again retries them.")
        st.dataframe(failed[["allocation", "budget", "failed"]], hide_index=True)
