"""Ray sweep benchmark: the same RTN sweep of the embedded model sequentially, on a local Ray instance with 2 CPUs,
and on a head and a worker node started by `ray start` (1 CPU each); wall times side by side, stored rows compared.

    for stage in analysis sequential ray-local ray-nodes; do
        OMP_NUM_THREADS=1 flock /tmp/heavy.lock .venv/bin/python -m bench.bench_ray_sweep --stage $stage; done
    .venv/bin/python -m bench.bench_ray_sweep --stage report

The analysis (a small calibration: the plans only need its predicted errors) is stored once in the benchmark's own
store; each sweep then starts from a copy of that store and an empty run directory, with the full-precision reference
computed before its clock starts. Each stage is one short job (the CPU queue's lock is held per stage) and leaves its
store and timings under /tmp/aptq-ray-bench; `report` compares the stores and writes bench/results/ray_sweep.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import time
from pathlib import Path

import pandas as pd
import torch

from aptq import pipeline
from aptq.data import Sampling, load_corpus
from aptq.history import stored_runs
from aptq.models import load_model, model_fingerprint
from aptq.pipeline import EvalSettings, QuantizeSettings, identify_run, reference_for, uniform_plan
from aptq.progress import tqdm_progress
from aptq.ray_sweep import RayOptions, import_ray, run_sweep_on_ray
from aptq.sensitivity import AnalysisSettings, analyze
from aptq.store import Store
from aptq.sweep import run_sweep, sweep_points
from tests.ray_nodes import QUIET, started_nodes

ray = import_ray()  # (tests.ray_nodes imported it first, choosing the authentication mode of the nodes it starts)

RESULTS = Path(__file__).parent / "results" / "ray_sweep.md"
WORK = Path("/tmp/aptq-ray-bench")
SAMPLING = Sampling(8, 256, 0)
CANDIDATES = (3, 4)  # two widths: each worker rounds every layer once per width (its own RTN memo)
GROUP = 64
TIMES = ["created", "quant_seconds", "eval_seconds"]


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def stored(store: Store, model_fp: str) -> pd.DataFrame:
    return stored_runs(store, model_fp).drop(columns=TIMES).sort_values("key").reset_index(drop=True)


MODES = {"sequential": "sequential (this process, 1 thread)",
         "ray-local": "Ray, local instance (`ray.init`, 2 CPUs)",
         "ray-nodes": "Ray, head + worker node (`ray start`, 1 CPU each)"}


def timed_sweep(mode: str, sweep_args: tuple, store: Store) -> dict:
    """Wall time of the cluster's start and of the sweep in one mode, and the load averages around them."""
    start, load_before = time.perf_counter(), load()
    if mode == "sequential":
        started = start
        run_sweep(*sweep_args, store)
        finished = time.perf_counter()
    elif mode == "ray-local":
        ray.init(address="local", num_cpus=2, **QUIET)
        started = time.perf_counter()
        run_sweep_on_ray(*sweep_args, store)
        finished = time.perf_counter()
        ray.shutdown()
    else:
        with started_nodes((1, 1)) as address:
            started = time.perf_counter()
            run_sweep_on_ray(*sweep_args, store, options=RayOptions(address=address))
            finished = time.perf_counter()
    return {"start": started - start, "sweep": finished - started, "load": f"{load_before} → {load()}"}


def report(args: argparse.Namespace, loaded, layers, model_fp: str) -> None:
    baseline = stored(Store(WORK / "sequential.duckdb"), model_fp)
    lines = ["# Ray sweep benchmark", "",
             f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} cores "
             f"({platform.processor() or platform.machine()}), torch {torch.__version__}, ray {ray.__version__}, "
             f"OMP_NUM_THREADS=1; other helpers' jobs ran at the same time (load averages below)",
             "- commands: see the module docstring of bench/bench_ray_sweep.py (`--methods "
             f"{args.methods} --budgets {args.budgets} --tokens {args.tokens}`), each stage under `flock "
             "/tmp/heavy.lock`",
             f"- {loaded.display_name}; analysis {layers.attrs['analysis_key']} (Brown, {SAMPLING.n_samples} × "
             f"{SAMPLING.seqlen} calibration tokens: only the plans come from it), {len(baseline)} RTN plans (widths "
             f"{' and '.join(map(str, CANDIDATES))}, group {GROUP}), each evaluated on the first {args.tokens} "
             "Brown evaluation tokens in windows of 512; the reference was computed before the clocks started; each "
             "sweep starts from an empty run directory",
             "", "## Wall time", "",
             "| how | cluster start (s) | sweep (s) | load average (1, 5, 15 min) before → after | stored rows |",
             "|---|---|---|---|---|"]
    for mode, name in MODES.items():
        if not (WORK / f"{mode}.json").is_file():
            lines.append(f"| {name} | not measured: the session ended first | | | |")
            continue
        timing = json.loads((WORK / f"{mode}.json").read_text())
        same = stored(Store(WORK / f"{mode}.duckdb"), model_fp)
        verdict = "identical to the sequential sweep" if same.equals(baseline) else "DIFFERENT"
        lines.append(f"| {name} | {timing['start']:.1f} | {timing['sweep']:.1f} | {timing['load']} | "
                     f"{len(same)}, {verdict} |")
    lines += ["", "Identical: every column of the stored runs equal (perplexity, KL, top-1, sizes, plans, names, "
              "predictions), except when they were measured (created, quant_seconds, eval_seconds).", "",
              "## Points", "", "| plan | avg_bits | perplexity | kl | top1 |", "|---|---|---|---|---|"]
    for row in baseline.sort_values(["allocation", "budget"]).itertuples():
        lines.append(f"| {row.plan_name} | {row.avg_bits:.3f} | {row.perplexity:.3f} | {row.kl:.4f} | "
                     f"{row.top1:.4f} |")
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["analysis", *MODES, "report"], required=True)
    parser.add_argument("--methods", default="knapsack,knapsack-layerwise")
    parser.add_argument("--budgets", default="3.25,3.5,3.75")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    WORK.mkdir(exist_ok=True)
    analysed = WORK / "analysis.duckdb"
    loaded = load_model(device="cpu")
    corpus = load_corpus("brown")
    analysis_settings = AnalysisSettings(group_size=GROUP, bits=CANDIDATES)
    if args.stage == "analysis":
        update, close = tqdm_progress("analysis")
        analyze(loaded, corpus, SAMPLING, analysis_settings, store=Store(analysed), progress=update)
        close()
        return
    layers, errors = analyze(loaded, corpus, SAMPLING, analysis_settings, store=Store(analysed))
    assert layers.attrs["cached"], "run --stage analysis first"
    model_fp = model_fingerprint(loaded.path)
    if args.stage == "report":
        report(args, loaded, layers, model_fp)
        return
    points = sweep_points(args.methods.split(","), [float(b) for b in args.budgets.split(",")], (0,))
    settings, evaluation = QuantizeSettings("rtn", GROUP), EvalSettings(512, args.tokens)
    pipeline.RUN_CACHE, pipeline.REFERENCE_CACHE = WORK / "runs", WORK / "reference"
    reference_for(loaded, corpus, evaluation,
                  identify_run(loaded, corpus, SAMPLING, uniform_plan(loaded.arch, 4), settings, evaluation))
    shutil.rmtree(pipeline.RUN_CACHE, ignore_errors=True)
    shutil.copy(analysed, WORK / f"{args.stage}.duckdb")
    timing = timed_sweep(args.stage, (loaded, corpus, SAMPLING, layers, errors, points, CANDIDATES, settings,
                                      evaluation), Store(WORK / f"{args.stage}.duckdb"))
    (WORK / f"{args.stage}.json").write_text(json.dumps(timing))
    print(args.stage, timing)


if __name__ == "__main__":
    main()
