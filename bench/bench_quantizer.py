"""Clipping search of `aptq.quantizer`, the current implementation against the previous one, on real weights and H.

    .venv/bin/python bench/bench_quantizer.py [--blocks 0,29] [--group 64] [--bits 2,3,4,8] [--channel-blocks 29]
        [--channel-bits 2,4] [--segments 4] [--seqlen 512] [--threads 1,2] [--append]

Weights: the embedded model's linear layers in `--blocks`. Hessians: `H = 2 X Xᵀ / N` of each layer's real input over
`--segments` Brown calibration segments (forward hooks on the full-precision model, stopped after the last block
needed).
In one process, for each thread count, layer and bit width, one after the other:

- predicted-error phase (what `sensitivity.layer_rows` does per layer and bit width): `rtn(W, cfg, H)` with the
  clipping search on groups of `--group` columns, then `layer_error`;
- per-channel search (what GPTQ does at a layer's first column with `group_size=0`): one `grid_params` over all
  columns with the full H.

The baseline is the previous implementation, kept only here: all candidates of up to 2^25 elements at once, each step a
new tensor. Both are checked to give the same grids (and so the same quantized weights and errors). Times are wall
clock and process CPU time. Writes bench/results/quantizer.md (`--append`: adds the run to it; without, the file and
its hand-written summary are replaced).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from aptq.quantizer import (
    CLIP_FACTORS,
    CLIP_SEARCH_ELEMENTS,
    GridParams,
    QuantConfig,
    _params_for_range,
    grid_params,  # noqa: E402
    group_spans,
    layer_error,
    quantize_dequantize,
    rtn,
)

BASELINE_ELEMENTS = 2 ** 25


# ---------------------------------------------------------------------------------------------------------------
# The previous implementation (baseline)


def baseline_best_clipped(block, low, high, cfg, H):
    factors = torch.tensor(CLIP_FACTORS, dtype=block.dtype, device=block.device).unsqueeze(1)
    rows, cols = block.shape
    chunk = max(1, BASELINE_ELEMENTS // (len(CLIP_FACTORS) * cols))
    scales, zeros = [], []
    for start in range(0, rows, chunk):
        part = slice(start, start + chunk)
        candidates = _params_for_range(factors * low[part], factors * high[part], cfg)
        grids = GridParams(candidates.scale.unsqueeze(-1), candidates.zero.unsqueeze(-1))
        delta = quantize_dequantize(block[part], grids, cfg) - block[part]
        errors = (delta * delta).sum(dim=-1) if H is None else ((delta @ H) * delta).sum(dim=-1)
        best = errors.argmin(dim=0, keepdim=True)
        scales.append(candidates.scale.gather(0, best).squeeze(0))
        zeros.append(candidates.zero.gather(0, best).squeeze(0))
    return GridParams(torch.cat(scales), torch.cat(zeros))


def baseline_grid_params(block, cfg, H=None):
    low = torch.clamp(block.min(dim=1).values, max=0)
    high = torch.clamp(block.max(dim=1).values, min=0)
    params = baseline_best_clipped(block, low, high, cfg, None if H is None else H.to(block))
    return GridParams(params.scale.unsqueeze(1), params.zero.unsqueeze(1))


def baseline_rtn(W, cfg, H=None):
    weights = W.float()
    result = torch.empty_like(weights)
    for start, end in group_spans(W.shape[1], cfg):
        block = weights[:, start:end]
        hessian = None if H is None else H[start:end, start:end]
        result[:, start:end] = quantize_dequantize(block, baseline_grid_params(block, cfg, hessian), cfg)
    return result.to(W.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Data


class _Stop(Exception):
    pass


def real_layers(blocks: list[int], segments: int, seqlen: int) -> tuple[object, dict[str, tuple]]:
    """{layer name: (W float32, H = 2 X Xᵀ / N float32)} for the linear layers of `blocks`."""
    from aptq.data import Sampling, calibration_segments, load_corpus, token_ids
    from aptq.models import get_module, get_weight, load_model

    loaded = load_model(device="cpu")
    ids = token_ids(loaded.tokenizer, load_corpus("brown"), "calibration")
    batch = calibration_segments(ids, Sampling(segments, seqlen, seed=0))
    layers = [layer for block in blocks for layer in loaded.arch.block_layers(block)]
    last = max(layers, key=lambda layer: [lay.name for lay in loaded.arch.layers].index(layer.name)).name
    sums: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.T @ x
            if name == last:
                raise _Stop

        return hook

    handles = [get_module(loaded.model, layer.module_path).register_forward_hook(hook_for(layer.name))
               for layer in layers]
    try:
        with torch.no_grad():
            for segment in batch.split(1):
                try:
                    loaded.model(segment)
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    n_tokens = batch.numel()
    data = {layer.name: (get_weight(loaded.model, layer).detach().float().clone(), 2 * sums[layer.name] / n_tokens)
            for layer in layers}
    return loaded, data


# ---------------------------------------------------------------------------------------------------------------
# Timing


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def predicted_error_phase(data, bits_list, group):
    """Per layer and bit width: (old wall, old cpu, new wall, new cpu); and how far the results agree."""
    rows, differing, worst = [], 0, 0.0
    total_groups = 0
    for name, (weight, hessian) in data.items():
        for bits in bits_list:
            cfg = QuantConfig(bits, group)
            (old_q, old_e), old_wall, old_cpu = timed(lambda: (q := baseline_rtn(weight, cfg, hessian),
                                                                layer_error(weight, q, hessian)))
            (new_q, new_e), new_wall, new_cpu = timed(lambda: (q := rtn(weight, cfg, hessian),
                                                                layer_error(weight, q, hessian)))
            for start, end in group_spans(weight.shape[1], cfg):
                differing += int((old_q[:, start:end] != new_q[:, start:end]).any(dim=1).sum())
                total_groups += weight.shape[0]
            worst = max(worst, abs(new_e - old_e) / max(abs(old_e), 1e-30))
            rows.append((name, bits, old_wall, old_cpu, new_wall, new_cpu))
    return rows, differing, total_groups, worst


def per_channel_phase(data, names, bits_list):
    rows, differing, total = [], 0, 0
    for name in names:
        weight, hessian = data[name]
        for bits in bits_list:
            cfg = QuantConfig(bits, 0)
            old, old_wall, old_cpu = timed(lambda: baseline_grid_params(weight, cfg, hessian))
            new, new_wall, new_cpu = timed(lambda: grid_params(weight, cfg, hessian))
            differing += int(((old.scale != new.scale) | (old.zero != new.zero)).sum())
            total += weight.shape[0]
            rows.append((name, bits, old_wall, old_cpu, new_wall, new_cpu))
    return rows, differing, total


def summed(rows, key=lambda row: True):
    chosen = [row for row in rows if key(row)]
    return [sum(row[i] for row in chosen) for i in range(2, 6)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", default="0,29")
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--bits", default="2,3,4,8")
    parser.add_argument("--channel-blocks", default="29")
    parser.add_argument("--channel-bits", default="2,4")
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", default=str(torch.get_num_threads()))
    parser.add_argument("--append", action="store_true", help="add this run to bench/results/quantizer.md")
    args = parser.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    channel_blocks = [int(b) for b in args.channel_blocks.split(",")] if args.channel_blocks else []
    bits_list = [int(b) for b in args.bits.split(",")]
    channel_bits = [int(b) for b in args.channel_bits.split(",")] if args.channel_bits else []
    command = (f".venv/bin/python bench/bench_quantizer.py --blocks {args.blocks} --group {args.group} "
               f"--bits {args.bits} --channel-blocks {args.channel_blocks} --channel-bits {args.channel_bits} "
               f"--segments {args.segments} --seqlen {args.seqlen} --threads {args.threads}"
               + (" --append" if args.append else ""))
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ)

    start = time.perf_counter()
    loaded, data = real_layers(sorted(set(blocks) | set(channel_blocks)), args.segments, args.seqlen)
    print(f"weights and Hessians in {time.perf_counter() - start:.1f} s", flush=True)
    group_data = {name: pair for name, pair in data.items() if int(name.split(".")[2]) in blocks}
    channel_names = [name for name in data if int(name.split(".")[2]) in channel_blocks]

    lines = [] if args.append else ["# Clipping search benchmark", ""]
    lines += [
        f"## Run of {time.strftime('%Y-%m-%d %H:%M')}", "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; torch {torch.__version__}"
        + (f"; environment: `{env}`" if env else ""),
        f"- command: `{command}`",
        f"- model: {loaded.display_name}; Hessians `2 X Xᵀ / N` of the real inputs over {args.segments} Brown "
        f"segments × {args.seqlen} tokens; {len(CLIP_FACTORS)} clip factors; new chunk {CLIP_SEARCH_ELEMENTS} "
        f"candidate elements (CPU), baseline {BASELINE_ELEMENTS}",
        "- baseline: the previous implementation (kept in this script); new: `aptq.quantizer` as it is now. The "
        "machine is shared with other sessions: the load average is given per run, CPU time is the process's.", "",
    ]
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        load_before = load_average()
        rows, differing, total_groups, worst = predicted_error_phase(group_data, bits_list, args.group)
        channel_rows, channel_differing, channel_total = per_channel_phase(data, channel_names, channel_bits)
        lines += [f"### {threads} thread(s) (load average {load_before} before, {load_average()} after)", "",
                  f"#### Predicted-error phase: `rtn` with the clipping search (group {args.group}) + `layer_error`, "
                  f"blocks {args.blocks}", "",
                  "| layer kind | bits | baseline wall s | baseline CPU s | new wall s | new CPU s | speed-up (wall) "
                  "| speed-up (CPU) |", "|---|---|---|---|---|---|---|---|"]
        kinds = list(dict.fromkeys(name.rsplit(".", 1)[1] for name in group_data))
        for kind in kinds:
            for bits in bits_list:
                ow, oc, nw, nc = summed(rows, lambda row: row[0].rsplit(".", 1)[1] == kind and row[1] == bits)
                lines.append(f"| {kind} | {bits} | {ow:.2f} | {oc:.2f} | {nw:.2f} | {nc:.2f} | {ow / nw:.1f}× | "
                             f"{oc / nc:.1f}× |")
        ow, oc, nw, nc = summed(rows)
        lines += [f"| **all ({len(group_data)} layers × {len(bits_list)} widths)** | | {ow:.2f} | {oc:.2f} | "
                  f"{nw:.2f} | {nc:.2f} | **{ow / nw:.1f}×** | **{oc / nc:.1f}×** |", "",
                  f"Per block: baseline {ow / len(blocks):.2f} s, new {nw / len(blocks):.2f} s wall; over the "
                  f"{loaded.arch.n_blocks} blocks of a full analysis ≈ {ow / len(blocks) * loaded.arch.n_blocks:.0f} s "
                  f"→ {nw / len(blocks) * loaded.arch.n_blocks:.0f} s.",
                  f"Agreement: quantized weights differ in {differing} of {total_groups} row-groups; largest relative "
                  f"difference of `layer_error` {worst:.1e}.", ""]
        if channel_rows:
            lines += [f"#### Per-channel search: one `grid_params` over all columns with the full H (GPTQ, "
                      f"`group_size=0`), blocks {args.channel_blocks}", "",
                      "| layer | bits | baseline wall s | baseline CPU s | new wall s | new CPU s | speed-up (wall) "
                      "| speed-up (CPU) |", "|---|---|---|---|---|---|---|---|"]
            for name, bits, ow, oc, nw, nc in channel_rows:
                lines.append(f"| {name.split('layers.')[1]} | {bits} | {ow:.2f} | {oc:.2f} | {nw:.2f} | {nc:.2f} | "
                             f"{ow / nw:.1f}× | {oc / nc:.1f}× |")
            ow, oc, nw, nc = summed(channel_rows)
            lines += [f"| **all** | | {ow:.2f} | {oc:.2f} | {nw:.2f} | {nc:.2f} | **{ow / nw:.1f}×** | "
                      f"**{oc / nc:.1f}×** |", "",
                      f"Agreement: the chosen grids differ in {channel_differing} of {channel_total} rows.", ""]
        print("\n".join(lines[-40:]), flush=True)
    results = Path(__file__).resolve().parent / "results" / "quantizer.md"
    previous = results.read_text() if args.append and results.exists() else ""
    results.write_text(previous + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
