"""The peer quantizers on exactly the project's token tensors, side by side with ours (issues 19 and 20).

The peers pin their own transformers, so they run in a separate environment and this script works in steps:

    .venv/bin/python -m bench.bench_peers dump --samples 8 --seqlen 512 --tokens 4096
    python3 -m venv /work/venv-peers
    /work/venv-peers/bin/pip install torch==2.13.0
    /work/venv-peers/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    /work/venv-peers/bin/pip install torch==2.13.0 auto-round==0.16.1
    /work/venv-peers/bin/pip install torch==2.13.0 gptqmodel==7.6.0
    /work/venv-peers/bin/python -m bench.bench_peers quantize --peer llmcompressor --bits 3 --group 64
    /work/venv-peers/bin/python -m bench.bench_peers quantize --peer autoround-light --bits 3 --group 64
    taskset -c 1 /work/venv-peers/bin/python -m bench.bench_peers quantize --peer gptqmodel --bits 3 --group 64
    .venv/bin/python -m bench.bench_peers ours --method gptq --bits 3 --group 64
    .venv/bin/python -m bench.bench_peers ours --method attention --bits 3 --group 64 --options act-order,v-rows
    .venv/bin/python -m bench.bench_peers evaluate

Another model: `dump --model SOURCE` (anything `aptq.models.load_model` takes; every later step reads it from the
dump) with APTQ_CACHE_DIR set to a directory of its own, so that its dump, Ŵ files and store stay apart; its table is
written to bench/results/peers_<model>.md.

(pip warns that llmcompressor 0.14.0.1 asks for auto-round ≤ 0.15.1; its GPTQ path does not use auto-round, so the
newest auto-round stays. GPTQModel 7.7.0 needs torch ≥ 2.14.1, so its 7.6.0 is the newest that installs beside the
pinned CPU torch; it downgrades numpy to 2.2.6.)

`dump` (project environment) saves the model's calibration segments exactly as our pipeline draws them
(aptq.data.calibration_segments on Brown, seed 0), the evaluation token ids and the converted model's directory.
`quantize` (reference environment, imports no aptq module) runs one peer on that directory with exactly those segments
(no dataset download), asymmetric, the given width and group, and saves the dequantized weight Ŵ of every quantized
linear with the wall time and peak RSS of the quantization. `ours` (project environment) runs our method through
aptq.pipeline.run_plan (so the store holds it and a rerun reuses it) on the same segments and evaluation tokens, in its
own process so that its peak RSS is its own; `--options` turns on the attention-aware quantizer's optional parts
(act-order, v-rows, mlp-rows: QuantizeSettings.act_order, value_rows, mlp_rows). `evaluate` (project environment)
puts each peer's Ŵ into the model loaded with aptq.models.load_model and measures it with aptq.evaluate against the
pipeline's cached full-precision reference on the dumped evaluation windows, then writes the table with our rows
beside the peers'.
Text below the table of that file (the reading, written by hand) is kept when it is rewritten.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

WORK = Path(os.environ.get("APTQ_CACHE_DIR", Path(__file__).resolve().parent.parent / "data")) / "cache" / "peers"
INPUTS = WORK / "inputs.pt"
RESULTS = Path(__file__).parent / "results"
WINDOW = 512
# auto-round's recipes (auto_round.cli.main.RECIPES): default 200 iterations, light 50 at lr 5e-3; both with batches
# of 8 segments. nsamples/seqlen are ours (the dumped segments), not the recipes' 128 × 2048.
AUTOROUND_ITERATIONS = {"autoround": 200, "autoround-light": 50}
PEERS = {
    "llmcompressor": "llm-compressor 0.14.0.1 GPTQ (oneshot, GPTQModifier)",
    "autoround": "auto-round 0.16.1 default (200 iterations)",
    "autoround-light": "auto-round 0.16.1 light (50 iterations, lr 5e-3)",
    "gptqmodel": "GPTQModel 7.6.0 GPTQ",
}
OURS = {"rtn": "RTN (ours)", "gptq": "GPTQ (ours)", "attention": "attention-aware GPTQ (ours)", "aespa": "aespa (ours)"}
OPTIONS = {"act-order": "act_order", "v-rows": "value_rows", "mlp-rows": "mlp_rows"}  # --options → QuantizeSettings


@dataclass(frozen=True)
class Inputs:
    """What `dump` saves: the tensors every method sees."""

    model_dir: str
    calibration: torch.Tensor  # n_samples × seqlen token ids
    evaluation: torch.Tensor  # n_windows × WINDOW token ids
    samples: int
    seqlen: int
    tokens: int  # evaluation tokens asked for
    source: str | None = None  # what load_model was given; None: the embedded model

    def load(self):
        from aptq.choices import EMBEDDED_MODEL
        from aptq.models import load_model

        return load_model(self.source or EMBEDDED_MODEL, device="cpu")

    @property
    def results(self) -> Path:
        """The table's file: peers.md for the embedded model, peers_<model directory>.md for another."""
        return RESULTS / ("peers.md" if self.source is None else f"peers_{Path(self.model_dir).name}.md")


@dataclass(frozen=True)
class Quantized:
    """One quantization by one method: its measured cost (and, for a peer, the file of its Ŵ)."""

    method: str
    bits: int
    group: int
    seconds: float
    peak_rss_gib: float | None  # None: a stored run reused, not measured in this process
    load: str  # `uptime`'s load averages when it finished
    command: str
    note: str = ""
    options: str = ""  # ours only: "act-order,v-rows", … (OPTIONS)

    @property
    def name(self) -> str:
        return f"{self.method}-w{self.bits}-g{self.group}" + (f"-{self.options.replace(',', '-')}" if self.options
                                                               else "")

    @property
    def label(self) -> str:
        label = (OURS | PEERS)[self.method]
        return f"{label} + {self.options.replace(',', ', ')}" if self.options else label

    def settings(self):
        """Our quantizer's settings for this record."""
        from aptq.pipeline import QuantizeSettings

        chosen = {OPTIONS[name]: True for name in filter(None, self.options.split(","))}
        return QuantizeSettings(self.method, self.group, **chosen)


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kilobytes on Linux


def save_record(record: Quantized) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / f"{record.name}.record.json").write_text(json.dumps(asdict(record), indent=1))


def load_inputs() -> Inputs:
    return Inputs(**torch.load(INPUTS))


# ---------------------------------------------------------------------------------------------------------------
# dump (project environment)


def dump(samples: int, seqlen: int, tokens: int, source: str | None) -> None:
    from aptq.choices import EMBEDDED_MODEL
    from aptq.data import Sampling, calibration_segments, evaluation_windows, load_corpus, token_ids
    from aptq.models import load_model

    loaded = load_model(source or EMBEDDED_MODEL, device="cpu")
    corpus = load_corpus("brown")
    calibration = calibration_segments(token_ids(loaded.tokenizer, corpus, "calibration"), Sampling(samples, seqlen))
    evaluation = evaluation_windows(token_ids(loaded.tokenizer, corpus, "evaluation"), WINDOW, tokens)
    WORK.mkdir(parents=True, exist_ok=True)
    torch.save(asdict(Inputs(str(loaded.path), calibration, evaluation, samples, seqlen, tokens, source)), INPUTS)
    print(f"saved {tuple(calibration.shape)} calibration and {tuple(evaluation.shape)} evaluation ids of "
          f"{loaded.path} to {INPUTS}")


# ---------------------------------------------------------------------------------------------------------------
# quantize (reference environment: torch, transformers and the peers; no aptq import)


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """Ŵ (out × in) of a linear left dequantized in place (llm-compressor, auto-round), or of a GPTQModel packed
    linear through its own `dequantize_weight` (in × out); None for any other module."""
    if isinstance(module, torch.nn.Linear):
        return module.weight.detach().float().cpu().clone()
    if hasattr(module, "qweight") and hasattr(module, "dequantize_weight"):
        from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

        # post_init builds the unpacking buffers (GPTQModel runs it when it loads a checkpoint); the class's own
        # method, not the torch.compile wrapper post_init puts on the instance
        module.post_init()
        with torch.no_grad():
            if module.qzero_format() == 1:
                # quantize() leaves the packed zeros in the checkpoint format (GPTQ v1: zero − 1); GPTQModel's loader
                # converts them before inference, and both dequantize_weight and the layer's own kernel read them so:
                # without the conversion every weight is one grid step high (measured: Ŵ 0.87 from W, not 0.39)
                convert_gptq_v1_to_v2_format_module(module, bits=module.bits, pack_dtype=module.pack_dtype)
            weight = type(module).dequantize_weight(module).float().cpu().T.contiguous()
            probe = torch.randn(4, module.in_features, generator=torch.Generator().manual_seed(0))
            kernel = module(probe.to(module.scales.dtype)).float()
        bias = 0.0 if module.bias is None else module.bias.float()
        if (probe @ weight.T + bias - kernel).norm() > 1e-2 * kernel.norm():
            raise RuntimeError("the dequantized weight disagrees with the layer's own kernel")
        return weight
    return None


def dequantized_linears(model: torch.nn.Module, bits: int, group: int) -> dict[str, torch.Tensor]:
    """Ŵ of every decoder linear, each checked to lie on a grid of at most 2^bits values per group of columns."""
    weights = {}
    for name, module in model.named_modules():
        weight = dequantized_weight(module)
        if weight is not None and not name.endswith("lm_head"):
            ordered = weight.reshape(-1, group).sort(-1).values
            levels = int((ordered.diff(dim=-1) != 0).sum(-1).max()) + 1
            if levels > 2 ** bits:
                raise RuntimeError(f"{name}: {levels} distinct values in a group of {group}, not a {bits}-bit grid; "
                                   f"the peer left this layer unquantized or in a packed form")
            weights[name] = weight
    return weights


def run_llmcompressor(model: torch.nn.Module, calibration: torch.Tensor, bits: int, group: int) -> None:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from torch.utils.data import DataLoader

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group)
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                          ignore=["lm_head"], block_size=128, dampening_frac=0.01)
    rows = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in calibration]
    oneshot(model=model, dataset=DataLoader(rows, batch_size=1), recipe=recipe,
            num_calibration_samples=len(rows), max_seq_length=calibration.shape[1])


def run_autoround(model: torch.nn.Module, tokenizer, calibration: torch.Tensor, bits: int, group: int,
                  iterations: int) -> None:
    from auto_round import AutoRound

    # A list of 1 × seqlen id tensors is auto-round's own "already tokenized" input (auto_round.calibration.llm).
    rounder = AutoRound(model, tokenizer=tokenizer, bits=bits, group_size=group, sym=False,
                        dataset=[ids[None] for ids in calibration], nsamples=calibration.shape[0],
                        seqlen=calibration.shape[1], iters=iterations, lr=5e-3, batch_size=8, device_map="cpu")
    rounder.quantize()


def run_gptqmodel(model_dir: str, calibration: torch.Tensor, bits: int, group: int) -> tuple[torch.nn.Module, float]:
    """GPTQModel loads the model itself; the time counts its quantize() alone."""
    # Its thread pool asks for 2 model-loader workers, more than its CPU default grants on a 2-core machine; the
    # benchmark pins the process to one core (taskset) so the extra worker takes no second core.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig

    # Kept in memory (its default offloads finished layers to disk and leaves meta tensors) and in float32 like the
    # other methods (its CPU default is bfloat16).
    config = QuantizeConfig(bits=bits, group_size=group, sym=False, desc_act=False, damp_percent=0.01,
                            offload_to_disk=False)
    model = GPTQModel.load(model_dir, config, device="cpu", dtype=torch.float32)
    rows = [{"input_ids": ids.tolist(), "attention_mask": [1] * len(ids)} for ids in calibration]
    start = time.perf_counter()
    model.quantize(rows, batch_size=1)
    return model.model, time.perf_counter() - start


def quantize(peer: str, bits: int, group: int, command: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    inputs = load_inputs()
    if peer == "gptqmodel":
        rss_before = peak_rss_gib()  # before its own load: GPTQModel loads inside
        model, seconds = run_gptqmodel(inputs.model_dir, inputs.calibration, bits, group)
    else:
        model = AutoModelForCausalLM.from_pretrained(inputs.model_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(inputs.model_dir)
        rss_before = peak_rss_gib()
        start = time.perf_counter()
        if peer == "llmcompressor":
            run_llmcompressor(model, inputs.calibration, bits, group)
        else:
            run_autoround(model, tokenizer, inputs.calibration, bits, group, AUTOROUND_ITERATIONS[peer])
        seconds = time.perf_counter() - start
    record = Quantized(peer, bits, group, seconds, peak_rss_gib(), load_average(), command,
                       f"process peak RSS (model loaded: {rss_before:.2f} GiB)")
    torch.save(dequantized_linears(model, bits, group), WORK / f"{record.name}.pt")
    save_record(record)
    print(record)


# ---------------------------------------------------------------------------------------------------------------
# ours and evaluate (project environment)


def protocol(inputs: Inputs):
    from aptq.data import Sampling
    from aptq.pipeline import EvalSettings

    return Sampling(inputs.samples, inputs.seqlen, 0), EvalSettings(WINDOW, inputs.tokens)


def ours(method: str, bits: int, group: int, options: str, command: str) -> None:
    from aptq.data import calibration_segments, load_corpus, token_ids
    from aptq.pipeline import run_plan, uniform_plan
    from aptq.progress import tqdm_progress

    inputs = load_inputs()
    loaded = inputs.load()
    sampling, evaluation = protocol(inputs)
    corpus = load_corpus("brown")
    if not torch.equal(calibration_segments(token_ids(loaded.tokenizer, corpus, "calibration"), sampling),
                       inputs.calibration):
        raise RuntimeError("The pipeline would draw other calibration segments than the dumped ones.")
    progress, close = tqdm_progress(f"{method} {bits}-bit g{group}")
    asked = Quantized(method, bits, group, 0.0, None, "", command, options=options)
    try:
        run = run_plan(loaded, corpus, sampling, uniform_plan(loaded.arch, bits), asked.settings(), evaluation,
                       progress=progress, plan_meta={"allocation": "uniform", "budget": bits})
    finally:
        close()
    note = "stored run: time as stored" if run.cached else "process peak RSS: run_plan, evaluation in it"
    record = replace(asked, seconds=run.quant_seconds, peak_rss_gib=None if run.cached else peak_rss_gib(),
                     load=load_average(), note=note)
    save_record(record)
    print(record, run.perplexity)


@dataclass(frozen=True)
class Row:
    record: Quantized
    perplexity: float
    kl: float
    top1: float


def measure_peer(loaded, windows: torch.Tensor, reference, record: Quantized) -> Row:
    """The peer's Ŵ evaluated; kept beside its weights so that the next `evaluate` reads it instead."""
    from aptq.evaluate import evaluate
    from aptq.pipeline import swapped_weights

    measured = WORK / f"{record.name}.evaluation.json"
    if measured.is_file() and measured.stat().st_mtime > (WORK / f"{record.name}.pt").stat().st_mtime:
        return Row(record, **json.loads(measured.read_text()))
    weights = torch.load(WORK / f"{record.name}.pt")
    by_module = {layer.module_path: layer.name for layer in loaded.arch.layers}
    if set(weights) != set(by_module):
        raise RuntimeError(f"{record.name}: the peer's layers differ from the model's: "
                           f"{sorted(set(weights) ^ set(by_module))[:4]}")
    with swapped_weights(loaded.model, loaded.arch, {by_module[path]: w for path, w in weights.items()}):
        result = evaluate(loaded.model, windows, reference=reference)
    row = Row(record, result.perplexity, result.kl_divergence, result.top1_agreement)
    measured.write_text(json.dumps({"perplexity": row.perplexity, "kl": row.kl, "top1": row.top1}))
    return row


def stored_ours(loaded, inputs: Inputs, record: Quantized) -> Row:
    from aptq.data import load_corpus
    from aptq.history import find_run
    from aptq.pipeline import identify_run, uniform_plan
    from aptq.store import Store

    sampling, evaluation = protocol(inputs)
    identity = identify_run(loaded, load_corpus("brown"), sampling, uniform_plan(loaded.arch, record.bits),
                            record.settings(), evaluation)
    run = find_run(Store(), identity.key)
    return Row(record, run.perplexity, run.kl, run.top1)


def evaluate_all() -> None:
    from aptq.data import load_corpus
    from aptq.pipeline import QuantizeSettings, identify_run, reference_for, uniform_plan

    inputs = load_inputs()
    loaded = inputs.load()
    corpus = load_corpus("brown")
    sampling, evaluation = protocol(inputs)
    identity = identify_run(loaded, corpus, sampling, uniform_plan(loaded.arch, 4), QuantizeSettings("gptq"),
                            evaluation)
    windows, reference = reference_for(loaded, corpus, evaluation, identity)
    if not torch.equal(windows, inputs.evaluation):
        raise RuntimeError("The pipeline's evaluation windows differ from the dumped ones.")
    rows = []
    for path in sorted(WORK.glob("*.record.json")):
        record = Quantized(**json.loads(path.read_text()))
        if record.method in OURS:
            rows.append(stored_ours(loaded, inputs, record))
        else:
            rows.append(measure_peer(loaded, windows, reference, record))
        print(rows[-1], flush=True)
    write_results(inputs, loaded.display_name, rows, float(torch.tensor(reference.mean_nll).exp()))


def write_results(inputs: Inputs, model_name: str, rows: list[Row], fp_perplexity: float) -> None:
    order = list(OURS | PEERS)
    rows = sorted(rows, key=lambda r: (r.record.group, -r.record.bits, order.index(r.record.method), r.record.options))
    results = inputs.results
    previous = results.read_text() if results.is_file() else ""
    reading = previous[previous.index("## Reading"):] if "## Reading" in previous else ""
    lines = [
        "# The peers on the project's own tokens", "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {os.cpu_count()} cores, {platform.processor() or 'CPU'}, "
        f"torch {torch.__version__}; how the jobs shared the machine (threads, cores, what ran beside them): the "
        f"reading below, and each row's load averages",
        "- commands: the docstring of bench/bench_peers.py; each row's own command is in the list under the table",
        f"- protocol: {model_name} ({Path(inputs.model_dir).name}); calibration: Brown "
        f"calibration split, {inputs.samples} × {inputs.seqlen} tokens drawn by aptq.data.calibration_segments, "
        f"seed 0 (the same tensor for every method); evaluation: Brown evaluation split, first "
        f"{inputs.evaluation.numel()} tokens in windows of {WINDOW}, KL and top-1 against the full-precision model "
        f"(top-128 reference, aptq.evaluate); asymmetric grids, groups of the given size, every decoder linear "
        f"quantized (not the tied embedding/LM head)",
        f"- full precision (the loaded model's weights): perplexity {fp_perplexity:.3f}",
        "- quantize s: wall time of the quantization alone (model loading and evaluation excluded); peak RSS: "
        "resource.getrusage of the process that quantized (its model load included)", "",
        "| method | bits | group | perplexity | KL | top-1 | quantize s | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        rss = "—" if row.record.peak_rss_gib is None else f"{row.record.peak_rss_gib:.2f}"
        lines.append(f"| {row.record.label} | {row.record.bits} | {row.record.group} | {row.perplexity:.3f} "
                     f"| {row.kl:.4f} | {row.top1:.4f} | {row.record.seconds:.0f} | {rss} |")
    lines += ["", "Per row: command, load averages (1, 5, 15 min) when it finished, note", ""]
    lines += [f"- {r.record.label} W{r.record.bits} g{r.record.group}: `{r.record.command}`; load "
              f"{r.record.load}{'; ' + r.record.note if r.record.note else ''}" for r in rows]
    results.write_text("\n".join(lines) + "\n" + (f"\n{reading.rstrip()}\n" if reading else ""))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["dump", "quantize", "ours", "evaluate"])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=8192, help="evaluation tokens (windows of 512)")
    parser.add_argument("--peer", choices=list(PEERS))
    parser.add_argument("--method", choices=list(OURS))
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--options", default="", help=f"ours only, comma-separated: {', '.join(OPTIONS)}")
    parser.add_argument("--model", help="dump only: the model (default: the embedded one)")
    args = parser.parse_args()
    options = ",".join(sorted(filter(None, (part.strip() for part in args.options.split(",")))))
    if unknown := set(filter(None, options.split(","))) - set(OPTIONS):
        parser.error(f"unknown --options {', '.join(sorted(unknown))}: choose from {', '.join(OPTIONS)}")
    command = f"bench_peers {args.step} --{'peer' if args.step == 'quantize' else 'method'} " \
              f"{args.peer or args.method} --bits {args.bits} --group {args.group}" + \
              (f" --options {options}" if options else "")
    if args.step == "dump":
        dump(args.samples, args.seqlen, args.tokens, args.model)
    elif args.step == "quantize":
        quantize(args.peer, args.bits, args.group, command)
    elif args.step == "ours":
        ours(args.method, args.bits, args.group, options, command)
    else:
        evaluate_all()


if __name__ == "__main__":
    main()
