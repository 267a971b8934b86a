"""Memory and time of analysis, attention-aware quantization and evaluation on big synthetic LLaMA models.

    .venv/bin/python bench/bench_big_model.py make --hidden 2560 --layers 32 --out /tmp/synthetic-2.7b
    .venv/bin/python bench/bench_big_model.py stage analyze --model /tmp/synthetic-2.7b --samples 4 --seqlen 128 \
        --max-blocks 3 --dtype bfloat16 --json out.json
    .venv/bin/python bench/bench_big_model.py cpu          # the recorded CPU benchmark: bench/results/big_model.md

`make` writes a LLaMA-architecture model with random weights (a config, one bf16 safetensors shard per block plus
the index, and a one-word tokenizer), generated block by block so that making it never holds more than one block.
`stage` runs one of `analyze` (every Hessian, the Hutchinson traces, the predicted errors: what `aptq analyze` does per
block, without the store), `quantize` (attention-aware GPTQ through `aptq.pipeline.quantize_model`, then the
evaluation of the quantized weights) or `eval` (full-precision perplexity) in this process and prints one JSON line
with its wall time, seconds per block, peak RSS, peak anonymous memory (sampled) and peak device memory. Each stage
runs in its own process so that each peak is its own. Calibration and evaluation tokens are random ids (seeded):
the weights are random too, so only time and memory mean anything; with `--model embedded` the Brown corpus is used.
Imports nothing of DuckDB, datasets or Streamlit (bench/gpu_check.sh runs it on a machine without them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------------------------
# A synthetic model on disk


def llama_config(hidden: int, layers: int, heads: int | None = None, kv_heads: int | None = None,
                 intermediate: int | None = None, vocab: int = 32000):
    from transformers import LlamaConfig

    heads = heads or (hidden // 128 if hidden % 128 == 0 else hidden // 64)
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate or int(hidden * 2.6875) // 64 * 64,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads or max(1, heads // 4), vocab_size=vocab,
                       max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype="bfloat16")


def make_model(hidden: int, layers: int, out: Path, seed: int = 0, **shape) -> Path:
    """Random weights (normal · 0.02, norms 1) written one block per shard; nothing larger than a block in memory."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    config = llama_config(hidden, layers, **shape)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    generator = torch.Generator().manual_seed(seed)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        part = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(part, []).append(name)
    index, total = {}, 0
    for number, names in enumerate(groups.values()):
        shard = f"model-{number:05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16)
            total += tensors[name].numel() * 2
            index[name] = shard
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": index}))
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# One stage in this process


class AnonymousPeak:
    """Samples RssAnon (private memory, not the page cache of memory-mapped weights) every 50 ms."""

    def __init__(self) -> None:
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, self._read())
            time.sleep(0.05)

    def __enter__(self) -> AnonymousPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, self._read())


def _tokens(loaded, args, split: str, n: int, length: int) -> torch.Tensor:
    if args.model != "embedded":
        return torch.randint(0, loaded.model.config.vocab_size, (n, length),
                             generator=torch.Generator().manual_seed(0 if split == "calibration" else 1))
    from aptq.data import Sampling, calibration_segments, evaluation_windows, load_corpus, token_ids

    ids = token_ids(loaded.tokenizer, load_corpus(), split)
    if split == "calibration":
        return calibration_segments(ids, Sampling(n, length))
    return evaluation_windows(ids, length, n * length)


def _analyze(loaded, segments, args) -> int:
    from aptq.capture import BlockWalk
    from aptq.hessian import CollectOptions
    from aptq.sensitivity import AnalysisSettings, collect_block, layer_rows

    settings = AnalysisSettings(group_size=args.group, bits=tuple(args.bits), clip_search=args.clip_search)
    options = CollectOptions(attention=True, probes=1)
    walk = BlockWalk(loaded.model, loaded.arch, segments, device=args.device, stop=args.max_blocks)
    cache: dict = {}
    for step in walk:
        layer_rows(loaded.model, loaded.arch, collect_block(step, loaded.arch, options, cache), settings)
    return walk.stop


def _quantize(loaded, segments, args) -> tuple[int, dict]:
    from aptq.blockwise import BlockRefinement
    from aptq.evaluate import evaluate
    from aptq.pipeline import QuantizeSettings, quantize_model

    n_blocks = min(args.max_blocks or loaded.arch.n_blocks, loaded.arch.n_blocks)
    plan = {layer.name: 4 if layer.block < n_blocks else 16 for layer in loaded.arch.layers}
    settings = QuantizeSettings("attention", args.group, clip_search=args.clip_search, device=args.device,
                                block=BlockRefinement(args.block_refinement))
    key = f"bench-big-{os.getpid()}"
    start = time.perf_counter()
    quantized, notes = quantize_model(loaded, plan, settings, segments, key)
    quantize_seconds = time.perf_counter() - start
    extra = {"quantize_seconds": quantize_seconds, "notes": notes, "refinement_steps": args.block_refinement}
    if args.eval_windows:
        windows = _tokens(loaded, args, "evaluation", args.eval_windows, args.seqlen)
        result = evaluate(loaded.model, windows, device=args.device, weights=quantized, blockwise=args.blockwise)
        extra |= {"eval_seconds": result.seconds, "perplexity": result.perplexity}
    quantized.checkpoints.remove()
    return n_blocks, extra


def run_stage(args) -> dict:
    from aptq.models import load_model

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with AnonymousPeak() as anonymous:
        start = time.perf_counter()
        dtype = getattr(torch, args.dtype) if args.dtype else None
        loaded = load_model(args.model if args.model != "embedded" else "", device=args.device, dtype=dtype)
        load_seconds = time.perf_counter() - start
        segments = _tokens(loaded, args, "calibration", args.samples, args.seqlen)
        start = time.perf_counter()
        extra: dict = {}
        if args.stage == "analyze":
            blocks = _analyze(loaded, segments, args)
        elif args.stage == "quantize":
            blocks, extra = _quantize(loaded, segments, args)
        else:
            from aptq.evaluate import evaluate

            windows = _tokens(loaded, args, "evaluation", args.eval_windows or args.samples, args.seqlen)
            result = evaluate(loaded.model, windows, device=args.device, blockwise=args.blockwise)
            blocks, extra = loaded.arch.n_blocks, {"perplexity": result.perplexity}
        seconds = time.perf_counter() - start
    params = loaded.n_params
    block_bytes = sum(p.numel() * p.element_size() for p in loaded.model.get_submodule(
        loaded.arch.blocks_path)[0].parameters())
    record = {"stage": args.stage, "model": args.model, "blockwise_eval": args.blockwise,
              "clip_search": args.clip_search, "params": params, "hidden": loaded.arch.hidden_size,
              "dtype": str(next(loaded.model.parameters()).dtype), "device": args.device,
              "samples": args.samples, "seqlen": args.seqlen, "blocks": blocks, "load_seconds": load_seconds,
              "seconds": seconds, "seconds_per_block": seconds / max(blocks, 1),
              "model_bytes": sum(p.numel() * p.element_size() for p in loaded.model.parameters()),
              "block_bytes": block_bytes, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "peak_anonymous_bytes": anonymous.peak_kib * 1024} | extra
    if args.device.startswith("cuda"):
        record["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    return record


# ---------------------------------------------------------------------------------------------------------------
# The recorded CPU benchmark


RECORDS = Path("/tmp/aptq-big-model-records.jsonl")  # one JSON line per finished stage: survives an interruption


def _stage_in_subprocess(stage: str, model: Path, extra: list[str]) -> None:
    command = [sys.executable, __file__, "stage", stage, "--model", str(model), "--json", str(RECORDS), *extra]
    subprocess.run(command, check=True, capture_output=True, env=os.environ | {"OMP_NUM_THREADS": "1"})


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def cpu_benchmark(args) -> None:
    free_gib = int(subprocess.run(["free", "-g"], capture_output=True, text=True).stdout.splitlines()[1].split()[6])
    header = [f"- started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; 2 CPU cores shared with 6 other "
              f"helpers' jobs (load average {Path('/proc/loadavg').read_text().split()[0]} at the start), "
              f"OMP_NUM_THREADS=1; available memory at the start: {free_gib} GiB"]
    if free_gib < 12:
        write_report(header + [f"- skipped: only {free_gib} GiB available (12 GiB needed)"])
        return
    RECORDS.unlink(missing_ok=True)
    common = ["--samples", "4", "--seqlen", "128", "--max-blocks", "1", "--dtype", "bfloat16", "--group", "128",
              "--no-clip-search", "--bits", "4"]
    models = [(Path("/tmp/aptq-synthetic-big"), args.hidden, args.layers)]
    models += [(Path(f"/tmp/aptq-synthetic-{hidden}"), hidden, 2) for hidden in (1024, 1536, 2048)]
    for path, hidden, layers in models:
        try:
            if not (path / "model.safetensors.index.json").is_file():  # a model left by an interruption is reused
                make_model(hidden, layers, path)
            for stage in ("analyze", "quantize"):
                _stage_in_subprocess(stage, path, common)
        finally:
            subprocess.run(["rm", "-rf", str(path)], check=False)
        write_report(header)


def write_report(header: list[str]) -> None:
    """bench/results/big_model.md from the records finished so far."""
    records = [json.loads(line) for line in RECORDS.read_text().splitlines()] if RECORDS.is_file() else []
    big = [r for r in records if r["params"] > 1e9]
    small = [r for r in records if r["params"] <= 1e9]
    lines = ["# Big synthetic models on the CPU: memory and time per block", "", *header,
             "- command: `.venv/bin/python bench/bench_big_model.py cpu` (each stage in its own process)", "",
             "## Peak memory against the model's size", "",
             "Synthetic LLaMA (random weights), bf16 safetensors on disk loaded in bf16; calibration 4 × 128 random "
             "tokens; the first block analysed / quantized (the quantize walk stops after the last quantized "
             "block); "
             "predicted errors at 4 bits only, grids without the clipping search (the full settings cost several "
             "TFLOP per block at hidden 2560: hours on one shared thread; they add compute, not memory, beyond the "
             "clipping search's 8 MiB chunk buffers).", "",
             "| stage | params | model GiB | one block GiB | peak RSS GiB | peak RSS / model | peak anonymous GiB "
             "| s per block |", "|---|---|---|---|---|---|---|---|"]
    for r in big:
        lines.append(f"| {r['stage']} | {r['params'] / 1e9:.2f} B | {_gib(r['model_bytes'])} | "
                     f"{_gib(r['block_bytes'])} | {_gib(r['peak_rss_bytes'])} | "
                     f"{r['peak_rss_bytes'] / r['model_bytes']:.2f} | {_gib(r['peak_anonymous_bytes'])} | "
                     f"{r['seconds_per_block']:.1f} |")
    lines += ["", "## Time per block against the hidden size (2-block models, same settings)", "",
              "| hidden | stage | s per block | quantize s per quantized block |", "|---|---|---|---|"]
    for r in small:
        quantize = f"{r['quantize_seconds'] / r['blocks']:.1f}" if "quantize_seconds" in r else ""
        lines.append(f"| {r['hidden']} | {r['stage']} | {r['seconds_per_block']:.1f} | {quantize} |")
    lines += ["", "Raw records:", "", "```", *[json.dumps(r) for r in records], "```"]
    path = ROOT / "bench" / "results" / "big_model.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make")
    make.add_argument("--hidden", type=int, required=True)
    make.add_argument("--layers", type=int, required=True)
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--heads", type=int, default=None)
    make.add_argument("--kv-heads", type=int, default=None)
    make.add_argument("--intermediate", type=int, default=None)
    make.add_argument("--vocab", type=int, default=32000)
    stage = sub.add_parser("stage")
    stage.add_argument("stage", choices=("analyze", "quantize", "eval"))
    stage.add_argument("--model", required=True, help="a model directory, or 'embedded'")
    stage.add_argument("--device", default="cpu")
    stage.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the device's)")
    stage.add_argument("--samples", type=int, default=4)
    stage.add_argument("--seqlen", type=int, default=128)
    stage.add_argument("--max-blocks", type=int, default=None)
    stage.add_argument("--group", type=int, default=128)
    stage.add_argument("--eval-windows", type=int, default=0, help="windows of --seqlen tokens to evaluate")
    stage.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8], help="widths of the predicted errors")
    stage.add_argument("--no-clip-search", dest="clip_search", action="store_false",
                       help="plain min/max grids (the exhaustive clipping search costs ~1.6 TFLOP per width and "
                            "block at hidden 2560, hours on one CPU thread)")
    stage.add_argument("--blockwise", action="store_true", default=None,
                       help="evaluate block by block even when the model fits on the device")
    stage.add_argument("--block-refinement", type=int, default=0, metavar="STEPS",
                       help="quantize: STEPS of block refinement per block after the layer-wise quantizer")
    stage.add_argument("--json", type=Path, default=None, help="also append the record to this file")
    cpu = sub.add_parser("cpu")
    cpu.add_argument("--hidden", type=int, default=2560)
    cpu.add_argument("--layers", type=int, default=32)
    sub.add_parser("report", help="rewrite bench/results/big_model.md from the records finished so far")
    args = parser.parse_args()
    if args.command == "make":
        make_model(args.hidden, args.layers, args.out, heads=args.heads, kv_heads=args.kv_heads,
                   intermediate=args.intermediate, vocab=args.vocab)
    elif args.command == "stage":
        record = run_stage(args)
        line = json.dumps(record)
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(line + "\n")
        print(line)
    elif args.command == "cpu":
        cpu_benchmark(args)
    else:
        write_report(["- (report of the records finished before an interruption)"])


if __name__ == "__main__":
    main()
