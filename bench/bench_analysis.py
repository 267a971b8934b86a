"""Sensitivity-analysis figures on the embedded model: cost of each Hessian kind, cache hit, rankings.

    .venv/bin/python bench/bench_analysis.py [--samples 64] [--seqlen 512] [--group 64] [--probes 1]

In one process, on the CPU defaults (64 × 512 calibration tokens): the full analysis (`analyze`, into a fresh store
in a temporary folder: all Hessians, Hutchinson traces, predicted errors, store writes) with its peak RSS; the same
analysis again (a cache hit); then three bare walks over the same segments that collect only the layer-wise Hessians,
the layer-wise + attention-aware Hessians, and those + the Hutchinson traces, to give the cost ratios. Writes
bench/results/analysis.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed_walk(loaded, segments, options, batch_size) -> float:
    from aptq.capture import BlockWalk
    from aptq.sensitivity import collect_block

    start = time.perf_counter()
    geometry_cache: dict = {}
    for step in BlockWalk(loaded.model, loaded.arch, segments, batch_size=batch_size):
        collect_block(step, loaded.arch, options, geometry_cache)
    return time.perf_counter() - start


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


class PhaseTimer:
    """Wraps functions of a module to add up the wall time spent in them (the predicted-error phase of `analyze`)."""

    def __init__(self, module, names: tuple[str, ...]):
        self.module, self.names, self.seconds, self.originals = module, names, 0.0, {}

    def __enter__(self) -> PhaseTimer:
        for name in self.names:
            original = self.originals[name] = getattr(self.module, name)

            def timed(*args, _original=original, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            setattr(self.module, name, timed)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.originals.items():
            setattr(self.module, name, original)


def ranking_table(layers, column: str) -> list[str]:
    from aptq.sensitivity import ranked

    most, least = ranked(layers, column, 10)
    lines = [f"| rank | most sensitive ({column}) | value | least sensitive | value |", "|---|---|---|---|---|"]
    for rank, ((_, top), (_, bottom)) in enumerate(zip(most.iterrows(), least.iterrows()), start=1):
        lines.append(f"| {rank} | {top['layer']} | {top[column]:.4g} | {bottom['layer']} | {bottom[column]:.4g} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--probes", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    import aptq.sensitivity as sensitivity
    from aptq import analyses
    from aptq.data import Sampling, calibration_segments, load_corpus, token_ids
    from aptq.hessian import CollectOptions
    from aptq.models import load_model
    from aptq.sensitivity import AnalysisSettings, analyze
    from aptq.store import Store

    command = (f".venv/bin/python bench/bench_analysis.py --samples {args.samples} --seqlen {args.seqlen} "
               f"--group {args.group} --probes {args.probes}" +
               (f" --batch-size {args.batch_size}" if args.batch_size else ""))
    loaded = load_model(device="cpu")
    corpus = load_corpus("brown")
    sampling = Sampling(args.samples, args.seqlen, seed=0)
    settings = AnalysisSettings(group_size=args.group, probes=args.probes, batch_size=args.batch_size)
    segments = calibration_segments(token_ids(loaded.tokenizer, corpus, "calibration"), sampling)
    rss_before = peak_rss_mib()
    load_before = load_average()
    with tempfile.TemporaryDirectory() as folder:
        store = Store(Path(folder) / "bench.duckdb")
        start = time.perf_counter()
        with PhaseTimer(sensitivity, ("rtn", "layer_error")) as predicted:
            layers, errors = analyze(loaded, corpus, sampling, settings, store=store)
        full = time.perf_counter() - start
        rss_full = peak_rss_mib()
        print(f"full analysis {full:.1f} s, peak RSS {rss_full:.0f} MiB", flush=True)
        start = time.perf_counter()
        again, _ = analyze(loaded, corpus, sampling, settings, store=store)
        hit = time.perf_counter() - start
        assert again.attrs["cached"]
        print(f"cache hit {hit:.3f} s", flush=True)
        block_seconds = analyses.total_block_seconds(store)
    walks = {}
    for label, options in (("layer-wise H only", CollectOptions(attention=False, probes=0)),
                           ("+ attention-aware H_V, G", CollectOptions(attention=True, probes=0)),
                           ("+ Hutchinson traces", CollectOptions(attention=True, probes=args.probes))):
        walks[label] = timed_walk(loaded, segments, options, args.batch_size)
        print(f"walk {label}: {walks[label]:.1f} s", flush=True)
    load_after = load_average()
    base = walks["layer-wise H only"]
    scores = layers[["score_layerwise", "score_attention", "score"]]
    spearman = scores.corr(method="spearman")
    lines = [
        "# Sensitivity analysis benchmark", "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
        + "".join(f", {k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ)
        + f" (the machine is shared with other engineers: timings are indicative; load average {load_before} "
        f"before, {load_after} after)",
        f"- command: `{command}`",
        f"- model: {loaded.display_name} ({loaded.baseline_label}), {loaded.arch.n_blocks} blocks, "
        f"{len(layers)} linear layers; calibration: Brown, {sampling.n_samples} segments × {sampling.seqlen} tokens "
        f"(seed 0); predicted errors for bits {', '.join(map(str, settings.bits))}, group {settings.group_size}; "
        f"{settings.probes} Hutchinson probe(s) per segment", "",
        "## Cost", "",
        "| run | seconds | × layer-wise walk |", "|---|---|---|",
    ] + [f"| walk: {label} | {seconds:.1f} | {seconds / base:.2f} |" for label, seconds in walks.items()] + [
        f"| full `analyze` (all Hessians, traces, predicted errors, store) | {full:.1f} | {full / base:.2f} |",
        f"| of which block work recorded in the store | {block_seconds:.1f} | |",
        f"| of which predicted errors, measured (`rtn` with clipping search + `layer_error`, {len(settings.bits)} "
        f"widths × {len(layers)} layers) | {predicted.seconds:.1f} | |",
        f"| of which predicted errors and store writes, ≈ full − traces walk | "
        f"{full - walks['+ Hutchinson traces']:.1f} | |",
        f"| second identical `analyze` (cache hit) | {hit:.3f} | |", "",
        f"Peak RSS: {rss_full:.0f} MiB after the full analysis ({rss_before:.0f} MiB with the model loaded and the "
        f"segments drawn, before it). Targets: attention-aware ≤ 2×, with traces ≤ 3× the layer-wise walk; "
        f"cache hit < 1 s.", "",
        f"## Spearman rank correlation between the scores ({len(layers)} layers)", "",
        "| | score_layerwise | score_attention | score (APTQ) |", "|---|---|---|---|",
    ] + [f"| {row} | " + " | ".join(f"{spearman.loc[row, col]:.3f}" for col in spearman.columns) + " |"
         for row in spearman.index] + [""]
    for column in ("score_layerwise", "score_attention", "score"):
        lines += [f"## Top 10 by {column}", ""] + ranking_table(layers, column) + [""]
    lines += [f"## Predicted error summed over layers (group {settings.group_size})", "",
              "| bits | Σ err_layerwise | Σ err_attention |", "|---|---|---|"]
    totals = errors.groupby("bits")[["err_layerwise", "err_attention"]].sum()
    lines += [f"| {bits} | {row.err_layerwise:.4g} | {row.err_attention:.4g} |" for bits, row in totals.iterrows()]
    (ROOT / "bench" / "results" / "analysis.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
