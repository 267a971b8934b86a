"""Allocation that predicts what it measures (issue 17), on a model's first blocks (default: the embedded model).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_allocation --quantizer attention --max-blocks 4

One run (resumable: the analysis and the unit are cached in --store, each plan's measurement in --plans-cache):
1. the analysis with the quantizer errors (RTN, GPTQ, attention-aware GPTQ) of the first --max-blocks blocks;
2. the measured unit (aptq.calibrate) on the last 25 % of the calibration segments;
3. plans of the analysed layers (uniform, knapsack in both units and with the width multiples that the uniform plans
   measure on the validation part, aptq, random; with --pair-groups the knapsack over (bits, group size) pairs at
   equal bytes; with --uniform-groups uniform 2-, 3- and 4-bit plans on those grids, whose multiples price the grids
   of knapsack-pairs-multiples) allocated on the errors of --quantizer, each quantized by the pipeline with that
   quantizer (true-sequential over the analysed blocks; the other blocks stay in full precision; the post-norm
   weighting where the model has post-norms, as the CLI runs it) on the calibration segments outside the validation
   part (or the first --fit-samples of them), so that the validation KL (where the unit is chosen) is measured on
   tokens the quantizer never saw; KL and perplexity on the evaluation split's first --tokens tokens are reported
   only;
4. writes --output (default bench/results/allocation_<quantizer>.md): predicted errors per source, unit factors,
   Spearman of predicted totals against measured KL, the share of uniform 3-bit's gap that the 3-bit knapsack
   closes, and two checks of why mixed plans measure dearer than predicted (bench/allocation_checks.py). Text from
   "## Reading" on in an existing output (written by hand) is kept.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from aptq.allocate import (
    ERROR_SOURCES,
    AllocationRequest,
    Plan,
    allocate,
    equal_bytes_pairs,
    measured_width_multiples,
    summarize,
    unit_factors,
)
from aptq.calibrate import NO_MULTIPLES, MeasuredMultiples, UnitSettings, calibrate_unit, validation_segments, with_unit
from aptq.choices import EMBEDDED_MODEL, PAIRS_SOLVER
from aptq.data import Sampling, calibration_segments, digest, load_corpus, token_ids
from aptq.evaluate import evaluate, reference_stats
from aptq.models import load_model
from aptq.pipeline import (
    EvalSettings,
    QuantizeSettings,
    has_output_norms,
    identify_run,
    measure_run,
    remove_checkpoints,
    run_weights,
)
from aptq.sensitivity import AnalysisSettings, analyze
from aptq.store import Store
from bench.allocation_checks import fitted_multiples_lines, selection_bias_lines
from bench.reading import with_reading

GROUP = 64
QUANTIZER_NAMES = {"rtn": "RTN", "gptq": "GPTQ", "attention": "the attention-aware GPTQ"}
CANDIDATES = (2, 3, 4, 8)
# The sweep runs from 2.5 to 4.5 bits; --budgets picks among them (the defaults run every one).
SWEEP_BUDGETS = (2.5, 3.0, 3.5, 4.0, 4.5)
# (method, budget, unit, seed, with the width multiples); the uniform plans come first: they measure the multiples.
PLANS = ([("uniform", b, "heuristic", 0, False) for b in (2.0, 3.0, 4.0)]
         + [("knapsack", b, unit, 0, False) for b in SWEEP_BUDGETS for unit in ("heuristic", "calibrated")]
         + [("knapsack", b, "heuristic", 0, True) for b in SWEEP_BUDGETS]
         + [("knapsack-layerwise", 3.0, "heuristic", 0, False)]
         + [("aptq", b, "heuristic", 0, False) for b in SWEEP_BUDGETS]
         + [("random", 3.0, "heuristic", seed, False) for seed in (0, 1, 2)]
         + [(PAIRS_SOLVER, b, unit, 0, multiplied) for multiplied in (False, True) for b in SWEEP_BUDGETS
            for unit in ("heuristic", "calibrated")])
UNIFORM_WIDTHS = (2, 3, 4)
UNIFORM_IN_GROUP = "uniform-g"  # + a group size: a uniform plan on that grid (--uniform-groups)
DEFAULT_PLAN_UNITS = "heuristic,calibrated"


def plan_label(method: str, multiplied: bool) -> str:
    """How --methods names a plan: its allocator, "knapsack-multiples" for the knapsack with the width multiples
    ("knapsack-pairs-multiples": with each grid's multiples too)."""
    return f"{method}-multiples" if multiplied else method


def plan_request(method: str, budget: float, unit: str, seed: int, multiples: MeasuredMultiples,
                 pair_groups: tuple[int, ...], quantizer: str, layers: pd.DataFrame) -> AllocationRequest:
    """The allocation request of a plan of PLANS; "knapsack-pairs" chooses among (bits, group size) pairs at the
    effective bits of a uniform plan of `budget` bits in groups of GROUP (so that both store the same bytes), priced
    with the grids' multiples when `multiples` has them."""
    request = AllocationRequest(budget, method, CANDIDATES, seed=seed, group_size=GROUP, unit=unit, low_high=(2, 4),
                                quantizer=quantizer, width_multiples=multiples.widths)
    if method != PAIRS_SOLVER:
        return request
    return replace(equal_bytes_pairs(layers, budget, request, pair_groups), grid_multiples=multiples.grids)


def uniform_grid(method: str) -> int | None:
    """The group size of a uniform plan's grid ("uniform": GROUP, "uniform-g<group>": that group); None otherwise."""
    if method == "uniform":
        return GROUP
    return int(method.removeprefix(UNIFORM_IN_GROUP)) if method.startswith(UNIFORM_IN_GROUP) else None


def measured_multiples(rows: list[dict], unit: str) -> MeasuredMultiples:
    """The width multiples (groups of GROUP) and grid multiples (the other grids) in `unit` from the uniform plans
    measured so far: validation KL over the plan's predicted total, as aptq.calibrate.calibrate_widths measures them."""
    by_grid: dict[int, dict[int, tuple[float, float]]] = {}
    for row in rows:
        if (group := uniform_grid(row["method"])) is not None:
            by_grid.setdefault(group, {})[int(row["budget"])] = (row["kl_validation"], row[f"{unit}_attention"])
    multiples = {group: measured_width_multiples(uniform) for group, uniform in by_grid.items()}
    return MeasuredMultiples(multiples.pop(GROUP), multiples)


def uniform_in_group(method: str, bits: int, unit: str, quantizer: str, layers: pd.DataFrame) -> Plan:
    """The plan a "uniform-g<group>" label names: every layer at `bits` on that group's grid."""
    group = uniform_grid(method)
    request = AllocationRequest(bits, "uniform", CANDIDATES, group_size=GROUP, unit=unit, quantizer=quantizer)
    names = layers["layer"]
    return Plan({name: bits for name in names}, request, group_sizes={name: group for name in names})


def parse_group_sizes(parser: argparse.ArgumentParser, flag: str, text: str) -> tuple[int, ...]:
    """A comma-separated list of group sizes (0: per channel); anything else is refused in one line (exit 2)."""
    try:
        return tuple(int(group) for group in text.split(",") if group)
    except ValueError:
        parser.error(f"{flag}: {text!r} is not a comma-separated list of group sizes (e.g. 32,192,0)")


def scored_plan(plan: Plan, unit: str, quantizer: str, multiples: MeasuredMultiples = NO_MULTIPLES) -> Plan:
    """The plan as `summarize` scores it in `unit` (with the width and grid multiples, if given): its widths and group
    sizes."""
    request = AllocationRequest(plan.request.budget, plan.request.method, plan.request.candidates, group_size=GROUP,
                                unit=unit, quantizer=quantizer, width_multiples=multiples.widths,
                                grid_multiples=multiples.grids)
    return Plan(plan.bits, request, group_sizes=plan.group_sizes)


def measure_plan(loaded, corpus, sampling: Sampling, bits: dict[str, int], settings: QuantizeSettings,
                 evaluation: EvalSettings, validation: torch.Tensor, reference) -> dict[str, float]:
    """The plan's layers quantized by the pipeline (`settings`), the rest in full precision: KL on the validation
    segments, KL and perplexity on the evaluation windows (the run is not stored; its blocks are removed)."""
    identity = identify_run(loaded, corpus, sampling, bits, settings, evaluation)
    try:
        run = measure_run(loaded, corpus, sampling, identity, settings, evaluation)
        with run_weights(loaded.arch, identity.key).applied(loaded.model):
            kl_validation = evaluate(loaded.model, validation, reference=reference).kl_divergence
    finally:
        remove_checkpoints(identity.key)
    return {"validation": kl_validation, "evaluation": run.kl, "perplexity": run.perplexity,
            "fp_perplexity": run.fp_perplexity}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="/tmp/allocation/store.duckdb")
    parser.add_argument("--plans-cache", default="/tmp/allocation/plans.json")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-blocks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048, help="evaluation-split tokens for the reported KL")
    parser.add_argument("--quantizer", choices=list(ERROR_SOURCES), default="rtn",
                        help="the quantizer that runs the plans; the solvers use its predicted errors")
    parser.add_argument("--output", help="default: bench/results/allocation_<quantizer>[_<model file stem>].md")
    parser.add_argument("--no-calibrated-unit", action="store_true",
                        help="skip the measured unit (hours for a whole model on a CPU): heuristic-unit plans only")
    parser.add_argument("--plan-units", default=DEFAULT_PLAN_UNITS,
                        help="the units whose knapsack plans run (the measured unit's only where it is measured)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default=",".join(dict.fromkeys(plan_label(method, multiplied)
                                                                    for method, _, _, _, multiplied in PLANS)),
                        help="the plans that run, by plan_label (uniform and knapsack are always in)")
    parser.add_argument("--budgets", default=",".join(dict.fromkeys(str(budget) for method, budget, *_ in PLANS
                                                                    if method != "uniform")),
                        help="the budgets of the plans other than uniform's")
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="anything aptq.models.load_model takes")
    parser.add_argument("--pair-groups", default="",
                        help="group sizes besides 64 (e.g. 192,0): the analysis predicts errors for them and "
                             "'knapsack-pairs' plans choose a (bits, group size) per layer at the effective bits of "
                             "uniform plans of the budget in groups of 64")
    parser.add_argument("--uniform-groups", default="",
                        help="group sizes besides 64 (e.g. 0 for per channel) in which uniform 2-, 3- and 4-bit plans "
                             "also run: each grid's predictions checked on their own, and its multiples measured "
                             "(knapsack-pairs-multiples prices each grid by them)")
    parser.add_argument("--fit-samples", type=int,
                        help="the plans' quantizer calibrates on the first this many segments outside the validation "
                             "part (default: all of them)")
    args = parser.parse_args()
    plan_units = set(args.plan_units.split(","))
    if unknown := plan_units - {"heuristic", "calibrated"}:
        parser.error(f"--plan-units: {', '.join(sorted(unknown))} is not a unit; use heuristic and/or calibrated")
    pair_groups = parse_group_sizes(parser, "--pair-groups", args.pair_groups)
    uniform_groups = parse_group_sizes(parser, "--uniform-groups", args.uniform_groups)
    if missing := set(uniform_groups) - set(pair_groups):
        parser.error(f"--uniform-groups: the analysis predicts no errors in groups of {sorted(missing)}; add them to "
                     f"--pair-groups")
    unmeasured = set(pair_groups) - set(uniform_groups)
    if plan_label(PAIRS_SOLVER, True) in args.methods.split(",") and unmeasured:
        parser.error(f"--methods {plan_label(PAIRS_SOLVER, True)}: the grids of groups {sorted(unmeasured)} have no "
                     f"uniform plans to measure their multiples; add them to --uniform-groups")
    model_tag = "" if args.model == EMBEDDED_MODEL else f"_{Path(args.model).stem}"
    args.output = args.output or f"bench/results/allocation_{args.quantizer}{model_tag}.md"
    torch.set_num_threads(args.threads)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    loaded = load_model(args.model, device="cpu")
    corpus = load_corpus("brown")
    store = Store(args.store)
    sampling = Sampling(args.samples, args.seqlen, seed=0)
    analysis = AnalysisSettings(group_size=GROUP, bits=CANDIDATES, max_blocks=args.max_blocks, quantizer_errors=True,
                                extra_group_sizes=pair_groups)
    start = time.perf_counter()
    layers, errors = analyze(loaded, corpus, sampling, analysis, store=store)
    analysis_seconds = time.perf_counter() - start
    print(f"analysis {layers.attrs['analysis_key']}: {analysis_seconds:.0f} s", flush=True)
    start = time.perf_counter()
    units = None if args.no_calibrated_unit else calibrate_unit(
        loaded, corpus, sampling, layers, errors, UnitSettings(), store=store,
        progress=lambda d, t, m: print(f"unit {d}/{t} {m}", flush=True))
    unit_seconds = time.perf_counter() - start
    measured = layers if units is None else with_unit(layers, units)
    scorings = ("heuristic",) if units is None else ("heuristic", "calibrated")

    calibration_ids = token_ids(loaded.tokenizer, corpus, "calibration")
    segments = calibration_segments(calibration_ids, sampling)
    validation = validation_segments(segments, 0.25)
    # The first segments of a draw are the draw of fewer (one generator stream): the plans' quantizer fits on exactly
    # the segments before the validation part.
    fitting = Sampling(min(args.fit_samples or len(segments), len(segments) - len(validation)), args.seqlen, seed=0)
    if not torch.equal(calibration_segments(calibration_ids, fitting), segments[:fitting.n_samples]):
        raise RuntimeError("The fitting segments are not the calibration draw's first ones.")
    settings = QuantizeSettings(method=args.quantizer, group_size=GROUP,
                                output_norms=args.quantizer == "attention" and has_output_norms(loaded))
    evaluation = EvalSettings(args.seqlen, args.tokens)
    cache_path = Path(args.plans_cache)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    reference = None
    rows = []
    plans: dict[str, Plan] = {}  # by the first 8 characters of the plan's key
    multiples: dict[str, MeasuredMultiples] = {}  # by unit, once a plan needs them
    methods = {"uniform", "knapsack", *args.methods.split(",")} | ({PAIRS_SOLVER} if pair_groups else set())
    budgets = {float(budget) for budget in args.budgets.split(",")}
    chosen = [(method, budget, unit, seed, multiplied) for method, budget, unit, seed, multiplied in PLANS
              if unit in scorings and plan_label(method, multiplied) in methods
              and (method == "uniform" or (budget in budgets and unit in plan_units))]
    in_groups = [(f"{UNIFORM_IN_GROUP}{group}", float(bits), "heuristic", 0, False)
                 for group in uniform_groups for bits in UNIFORM_WIDTHS]
    chosen = [plan for plan in chosen if plan[0] == "uniform"] + in_groups + [plan for plan in chosen
                                                                            if plan[0] != "uniform"]
    for method, budget, unit, seed, multiplied in chosen:  # every uniform plan first: they measure the multiples
        if multiplied and unit not in multiples:
            multiples[unit] = measured_multiples(rows, unit)
        plan = (uniform_in_group(method, int(budget), unit, args.quantizer, measured)
                if method.startswith(UNIFORM_IN_GROUP) else
                allocate(measured, errors, plan_request(method, budget, unit, seed,
                                                        multiples[unit] if multiplied else NO_MULTIPLES,
                                                        pair_groups, args.quantizer, measured)))
        plan_settings = replace(settings, layer_groups=plan.layer_groups())
        # the quantizer's settings in the key: a default that changes (act-order, full-precision targets) measures
        # its plans anew instead of reading those of the settings before
        key = digest(json.dumps(plan.bits, sort_keys=True), str(args.tokens), args.quantizer,
                     str(fitting.n_samples), str(args.seqlen), json.dumps(plan_settings.key_fields(), sort_keys=True))
        plans[key[:8]] = plan
        if key not in cache:
            reference = reference or reference_stats(loaded.model, validation)
            cache[key] = measure_plan(loaded, corpus, fitting, plan.bits, plan_settings, evaluation, validation,
                                      reference)
            cache_path.write_text(json.dumps(cache))
            print(f"plan {method} {budget} {unit} {seed}: {cache[key]}", flush=True)
        row = {"method": method, "budget": budget, "unit": unit, "seed": seed, "multiplied": multiplied,
               "plan": key[:8],
               "kl_validation": cache[key]["validation"], "kl_evaluation": cache[key]["evaluation"],
               "perplexity": cache[key]["perplexity"], "fp_perplexity": cache[key]["fp_perplexity"]}
        for scoring in scorings:
            summary = summarize(scored_plan(plan, scoring, args.quantizer), measured, errors)
            row["avg_bits"], row["effective_bits"] = summary["avg_bits"], summary["effective_bits"]
            for label in ("attention", "layerwise"):
                row[f"{scoring}_{label}"] = summary[f"predicted_error_{label}"]
                row[f"{scoring}_{label}_se"] = summary[f"predicted_error_{label}_se"]
        rows.append(row)
    table = pd.DataFrame(rows)
    multiples = {scoring: measured_multiples(rows, scoring) for scoring in scorings}
    for row in table.itertuples():  # every plan's prediction with the multiples, once they are measured
        for scoring in scorings:
            scored = scored_plan(plans[row.plan], scoring, args.quantizer, multiples[scoring])
            table.loc[row.Index, f"{scoring}_multiplied"] = summarize(scored, measured, errors)[
                "predicted_error_attention"]
    write_report(args, loaded.display_name, table, plans, layers, errors, measured, units, multiples, validation,
                 fitting.n_samples, settings, scorings, analysis_seconds, unit_seconds, load_before)


def write_report(args, model_name: str, table: pd.DataFrame, plans: dict[str, Plan], layers, errors, measured, units,
                 multiples: dict[str, MeasuredMultiples], validation: torch.Tensor, n_fitting: int,
                 settings: QuantizeSettings,
                 scorings: tuple[str, ...], analysis_seconds: float, unit_seconds: float,
                 load_before: list[str]) -> None:
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    lines = ["# Allocation benchmark (issue 17): predicted errors of the quantizer that runs, a measured unit", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {platform.machine()}, "
             f"2 shared cores, torch {torch.__version__}, {args.threads} thread(s); load average before "
             f"{' '.join(load_before)}, after {' '.join(load_after)} (what ran beside it: the reading below)",
             f"- command: `OMP_NUM_THREADS={args.threads} .venv/bin/python -m bench.bench_allocation --quantizer "
             f"{args.quantizer} --samples {args.samples} --seqlen {args.seqlen} --max-blocks {args.max_blocks} "
             f"--tokens {args.tokens} --threads {args.threads} --model {args.model}"
             f"{f' --fit-samples {args.fit_samples}' if args.fit_samples else ''} --methods {args.methods} "
             f"--budgets {args.budgets}{f' --pair-groups {args.pair_groups}' if args.pair_groups else ''}"
             f"{' --no-calibrated-unit' if units is None else ''}"
             f"{f' --plan-units {args.plan_units}' if args.plan_units != DEFAULT_PLAN_UNITS else ''}"
             f"{f' --uniform-groups {args.uniform_groups}' if args.uniform_groups else ''}`",
             f"- {model_name}, Brown; analysis of the first {args.max_blocks} blocks "
             f"({len(layers)} layers), calibration {args.samples} × {args.seqlen}, group {GROUP}, widths "
             f"{CANDIDATES}, with the quantizer errors: {analysis_seconds:.0f} s (0 when cached); the unit: "
             + ("heuristic only (the measured unit skipped)" if units is None else
                f"last 25 % of the calibration segments, noise of each layer's 3-bit RTN error size, "
                f"{unit_seconds:.0f} s this run, {units['seconds'].sum():.0f} s measured in all "
                f"({units['seconds'].mean():.1f} s per layer)"),
             f"- plans: the analysed layers only (the other blocks stay in full precision), allocated on the "
             f"predicted errors of {QUANTIZER_NAMES[args.quantizer]} and quantized by the pipeline with it "
             f"(settings {json.dumps(settings.key_fields(), sort_keys=True)}) on the first {n_fitting} calibration "
             f"segments; KL on the other {len(validation)} (validation, never fitted) and KL and perplexity on the "
             f"evaluation split's first {args.tokens} tokens (windows of {args.seqlen})", "",
             "## Predicted errors per source (Σ over the analysed layers, raw units)", "",
             "| bits | RTN layer-wise | GPTQ layer-wise | aware layer-wise | RTN attention | GPTQ attention | "
             "aware attention |", "|---|---|---|---|---|---|---|"]
    columns = ["err_layerwise", "err_gptq_layerwise", "err_aware_layerwise", "err_attention", "err_gptq_attention",
               "err_aware_attention"]
    at_group = errors[errors["group_size"] == GROUP] if "group_size" in errors else errors
    sums = at_group.groupby("bits")[columns].sum()
    lines += [f"| {bits} | " + " | ".join(f"{row[c]:.4g}" for c in columns) + " |" for bits, row in sums.iterrows()]
    by_kind = at_group.merge(layers[["layer", "kind"]], on="layer")
    at3 = by_kind[by_kind["bits"] == 3].groupby("kind")[["err_attention", "err_gptq_attention",
                                                        "err_aware_attention"]].sum()
    lines += ["", "At 3 bits per kind (attention-aware measure): RTN / GPTQ / aware = "
              + "; ".join(f"{kind} {r.err_attention:.3g} / {r.err_gptq_attention:.3g} / {r.err_aware_attention:.3g}"
                          for kind, r in at3.iterrows()), ""]
    metric = ERROR_SOURCES[args.quantizer][1]
    if units is not None:
        lines += _unit_section(measured, metric)
    lines += _plan_section(table, multiples, scorings)
    lines += ["", "## Why mixed plans miss their promise: two checks (bench/allocation_checks.py)", ""]
    for scoring in scorings:
        unpriced = {key: scored_plan(plan, scoring, args.quantizer) for key, plan in plans.items()}
        lines += fitted_multiples_lines(table, unpriced, measured, errors, metric, scoring)
    lines += selection_bias_lines(table, plans, measured, errors)
    output = Path(args.output)
    output.write_text(with_reading(lines, output.read_text() if output.is_file() else ""))
    print("\n".join(lines))


def _unit_section(measured: pd.DataFrame, metric: str) -> list[str]:
    """The heuristic unit's per-layer factors against the measured unit's."""
    lines = ["## The unit: heuristic factor against the measured one (per layer, attention-aware metric)", ""]
    heuristic = unit_factors(measured, metric, "heuristic")[0]
    calibrated, calibrated_se = unit_factors(measured, metric, "calibrated")
    rho = spearmanr(heuristic, calibrated).statistic
    ratio = calibrated / heuristic
    lines += [f"- Spearman(heuristic factor, measured factor) over {len(measured)} layers: {rho:.3f}; measured / "
              f"heuristic spans {ratio.min():.3g} … {ratio.max():.3g} (median {np.median(ratio):.3g})",
              f"- relative standard error of the measured rates: median {np.median(calibrated_se / calibrated):.2%}; "
              f"of the Hutchinson traces: median "
              f"{np.median(measured['trace_lm_se'] / measured['trace_lm']):.2%}", "",
              "| layer | trace_lm/tr/residual | kl_rate/tr | ratio |", "|---|---|---|---|"]
    lines += [f"| {name} | {h:.3g} | {c:.3g} | {c / h:.3g} |"
              for name, h, c in zip(measured["layer"], heuristic, calibrated)]
    return lines + [""]


def _plan_section(table: pd.DataFrame, multiples: dict[str, MeasuredMultiples], scorings: tuple[str, ...]) -> list[str]:
    """Every plan's measured KL against its predictions in each unit of `scorings` (with the multiples too), the
    knapsack against uniform, and the Spearman table."""
    calibrated = "calibrated" in scorings
    distinct = table.drop_duplicates("plan")
    lines = ["## Plans: predicted totals against measured KL", "",
             "Multiples (uniform plans' validation KL / their prediction; groups of 64, then the other grids "
             "measured): " + "; ".join(f"{scoring} unit {multiples[scoring].describe()}" for scoring in scorings), "",
             "| method | budget | unit | multiples | seed | plan | avg bits | effective bits | KL validation | "
             "KL evaluation | perplexity | predicted (heuristic) | × multiples | predicted KL (calibrated) ± se | "
             "× multiples |", "|" + "---|" * 15]
    lines += [f"| {r.method} | {r.budget:g} | {r.unit} | {'yes' if r.multiplied else 'no'} | {r.seed} | {r.plan} | "
              f"{r.avg_bits:.3f} | {r.effective_bits:.3f} | {r.kl_validation:.4f} | {r.kl_evaluation:.4f} | "
              f"{r.perplexity:.3f} | "
              f"{r.heuristic_attention:.4g} ± {r.heuristic_attention_se:.2g} | {r.heuristic_multiplied:.4f} | "
              + (f"{r.calibrated_attention:.4f} ± {r.calibrated_attention_se:.2g} | {r.calibrated_multiplied:.4f} |"
                 if calibrated else "— | — |")
              for r in table.itertuples()]
    lines += ["", f"Full precision on the same evaluation tokens: perplexity {table['fp_perplexity'].iloc[0]:.3f}."]
    uniform_rows = table[table["method"] == "uniform"].sort_values("budget")
    uniform = uniform_rows[uniform_rows["budget"] == 3.0].iloc[0]
    widest = uniform_rows["budget"].max()  # above it the comparison is with that plan, not an interpolation
    knapsacks = table[table["method"].isin(["knapsack", PAIRS_SOLVER])]
    for r in knapsacks.itertuples():
        pairs = f", (bits, group) pairs at {r.effective_bits:.3f} effective bits" if r.method == PAIRS_SOLVER else ""
        priced = (" × width and grid multiples" if r.method == PAIRS_SOLVER else " × width multiples") \
            if r.multiplied else ""
        label = f"{r.unit} unit{priced}{pairs}"
        below = {column: np.interp(r.budget, uniform_rows["budget"], uniform_rows[column])
                 for column in ("kl_validation", "kl_evaluation")}
        how = "interpolated" if r.budget <= widest else f"its widest plan, {widest:g} bits"
        line = (f"{r.method.capitalize()} at {r.budget:g} bits ({label}): KL evaluation {r.kl_evaluation:.4f} "
                f"against uniform {below['kl_evaluation']:.4f} ({how}), validation {r.kl_validation:.4f} "
                f"against {below['kl_validation']:.4f}")
        if r.budget == 3.0:
            closed = {column: (uniform[column] - getattr(r, column)) / (uniform[column] - floor)
                      for column, floor in (("kl_evaluation", 0.0), ("kl_validation", 0.0),
                                            ("perplexity", uniform["fp_perplexity"]))}
            line += (f"; closes {closed['perplexity']:.1%} of uniform 3-bit's perplexity gap to full precision, "
                     f"{closed['kl_evaluation']:.1%} of its KL ({closed['kl_validation']:.1%} on validation)")
        lines.append(line + ".")
    if calibrated:
        ratio_kl = distinct["kl_validation"] / distinct["calibrated_attention"]
        lines += ["", f"Measured KL (validation) / KL predicted in the calibrated unit: median "
                  f"{ratio_kl.median():.3g}, range {ratio_kl.min():.3g} … {ratio_kl.max():.3g}."]
    lines += ["", f"Spearman over the {len(distinct)} distinct plans:", "",
              "| predicted by | KL validation | KL evaluation |", "|---|---|---|"]
    predictors = {f"{scoring} unit, {label} errors": f"{scoring}_{label}"
                  for scoring in scorings for label in ("attention", "layerwise")}
    predictors |= {f"{scoring} unit × width and grid multiples, attention errors": f"{scoring}_multiplied"
                   for scoring in scorings}
    for name, column in predictors.items():
        lines.append(f"| {name} | {spearmanr(distinct[column], distinct['kl_validation']).statistic:.3f} | "
                     f"{spearmanr(distinct[column], distinct['kl_evaluation']).statistic:.3f} |")
    return lines


if __name__ == "__main__":
    main()
