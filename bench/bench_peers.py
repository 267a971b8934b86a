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
    .venv/bin/python -m bench.bench_peers evaluate-longer --tokens 16384   # kept Ŵ on more evaluation tokens
    .venv/bin/python -m bench.bench_peers evaluate-longer --tokens 16384 --spread   # … on windows from 14 of 15 genres
    .venv/bin/python -m bench.bench_peers evaluate-longer --tokens 16384 --against autoround-w3-g64   # paired gaps

Another protocol (e.g. `dump --samples 64 --seqlen 512 --tokens 16384`, the issues' own) wants APTQ_CACHE_DIR set to a
directory of its own as well; its table is written to a file named after it (Inputs.results).

Another model: `dump --model SOURCE` (anything `aptq.models.load_model` takes; every later step reads it from the
dump) with APTQ_CACHE_DIR set to a directory of its own, so that its dump, Ŵ files and store stay apart; its table is
written to bench/results/peers_<model>.md.

Any environment with a peer and the pinned torch runs its `quantize` step (it imports no aptq module): the 2026-12-04
rows ran llm-compressor and GPTQModel from a second one, /work/venv-peers2, installed with the same pins.

(pip warns that llmcompressor 0.14.0.1 asks for auto-round ≤ 0.15.1; its GPTQ path does not use auto-round, so the
newest auto-round stays. GPTQModel 7.7.0 needs torch ≥ 2.14.1, so its 7.6.0 is the newest that installs beside the
pinned CPU torch; it downgrades numpy to 2.2.6.)

`dump` (project environment) saves the model's calibration segments exactly as our pipeline draws them
(aptq.data.calibration_segments on Brown, seed 0), the evaluation token ids and the converted model's directory.
`quantize` (reference environment, imports no aptq module) runs one peer on that directory with exactly those segments
(no dataset download), asymmetric, the given width and group, and saves the dequantized weight Ŵ of every quantized
linear with the wall time and peak RSS of the quantization. `ours` (project environment) runs our method as
aptq.pipeline.run_plan does (the store holds the run and a rerun reuses it; its Ŵ is saved like a peer's) on the same
segments and evaluation tokens, in its own process so that its peak RSS is its own; `--options` turns on the quantizers'
optional parts (act-order, v-rows, mlp-rows, attention-rows or uniform-rows, output-norms, shrink=S, fp-targets=A,
act-order-from=B, block=N, batch=N: QuantizeSettings.act_order_from, value_rows, mlp_rows, row_weights, output_norms,
shrink, fp_targets, block, batch_size) and aespa's (fixed-scales, iterations=N: AespaOptions). `evaluate` (project
environment) puts each peer's Ŵ into the model loaded with aptq.models.load_model and measures it with aptq.evaluate
against the pipeline's cached full-precision reference on the dumped evaluation windows, measures every kept Ŵ (ours
too) on validation windows of the calibration split that the fitted segments do not touch (the KL that settings are
chosen on), then writes the table with our rows beside the peers'.
Text below the table of that file (the reading, written by hand) is kept when it is rewritten.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from bench.reading import with_reading

WORK = Path(os.environ.get("APTQ_CACHE_DIR", Path(__file__).resolve().parent.parent / "data")) / "cache" / "peers"
INPUTS = WORK / "inputs.pt"
RESULTS = Path(__file__).parent / "results"
WINDOW = 512
# (calibration segments, their length, evaluation tokens) of the first tables (peers.md, peers_<model>.md); a dump with
# another protocol writes a table of its own (Inputs.results)
FIRST_PROTOCOL = (8, 512, 4096)
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
# --options → QuantizeSettings: the field and its value; also "shrink=S" (QuantizeSettings.shrink), "fp-targets=A"
# (QuantizeSettings.fp_targets) and
# "act-order-from=B" (QuantizeSettings.act_order_from: act-order for the layers of B bits and more), "block=N"
# (QuantizeSettings.block: N steps of block refinement) and "batch=N" (QuantizeSettings.batch_size: segments per
# forward pass, and per refinement step)
OPTIONS = {"act-order": ("act_order_from", 2), "v-rows": ("value_rows", True), "mlp-rows": ("mlp_rows", True),
           "attention-rows": ("row_weights", "attention"), "uniform-rows": ("row_weights", "uniform"),
           "output-norms": ("output_norms", True)}
# --options → AespaOptions (method aespa): the field and its value; also "iterations=N"
AESPA_FLAGS = {"fixed-scales": ("learn_scales", False)}
# Windows of WINDOW tokens from the calibration split, apart from the fitted segments (validation_windows). (our
# choice) 16, twice the evaluation's 4096 tokens.
VALIDATION_WINDOWS = 16
VALIDATION_SEED = 1  # their draw (the fitted segments' is seed 0)
VALIDATION = f"validation{VALIDATION_WINDOWS}-random{VALIDATION_SEED}"  # the name of what is cached per draw


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
        """The table's file: peers.md for the embedded model, peers_<model directory>.md for another; a protocol
        other than FIRST_PROTOCOL adds _<samples>x<seqlen>_<evaluation tokens>, so that it gets a table of its own."""
        name = "peers" if self.source is None else f"peers_{Path(self.model_dir).name}"
        if (self.samples, self.seqlen, self.evaluation.numel()) != FIRST_PROTOCOL:
            name += f"_{self.samples}x{self.seqlen}_{self.evaluation.numel()}"
        return RESULTS / f"{name}.md"


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
    run_key: str = ""  # ours only: the stored run, so that a later change of our defaults cannot swap it for another

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
        from aptq.aespa import CPU_ITERATIONS, AespaOptions
        from aptq.blockwise import BlockRefinement
        from aptq.pipeline import QuantizeSettings

        # act-order and full-precision targets off and aespa's 100 iterations at every width unless an option says
        # otherwise: the rows' labels name every option of theirs, as they did before act-order from 3 bits, the
        # targets and the iterations by width became the quantizers' defaults
        chosen, aespa = {"act_order_from": None, "fp_targets": 0.0}, {"iterations": CPU_ITERATIONS}
        for part in filter(None, self.options.split(",")):
            name, _, value = part.partition("=")
            if name in OPTIONS:
                field, setting = OPTIONS[name]
                chosen[field] = setting
            elif name in ("shrink", "fp-targets"):
                chosen[name.replace("-", "_")] = float(value)
            elif name == "act-order-from":
                chosen["act_order_from"] = int(value)
            elif name == "block":
                chosen["block"] = BlockRefinement(int(value))
            elif name == "batch":
                chosen["batch_size"] = int(value)
            elif name in AESPA_FLAGS:
                field, setting = AESPA_FLAGS[name]
                aespa[field] = setting
            else:  # "iterations=N", checked by main
                aespa[name] = int(value)
        return QuantizeSettings(self.method, self.group, aespa=AespaOptions(**aespa), **chosen)


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


def ours(method: str, bits: int, group: int, options: str, command: str, rerun: bool) -> None:
    """Our run stored as run_plan stores it, and its Ŵ saved beside the peers' (for the validation KL); `rerun`
    replaces a stored run of the same key (one stored before Ŵ were kept)."""
    from aptq import history
    from aptq.data import calibration_segments, load_corpus, token_ids
    from aptq.pipeline import identify_run, measure_run, remove_checkpoints, run_weights, uniform_plan
    from aptq.progress import tqdm_progress
    from aptq.store import Store

    inputs = load_inputs()
    loaded = inputs.load()
    sampling, evaluation = protocol(inputs)
    corpus = load_corpus("brown")
    if not torch.equal(calibration_segments(token_ids(loaded.tokenizer, corpus, "calibration"), sampling),
                       inputs.calibration):
        raise RuntimeError("The pipeline would draw other calibration segments than the dumped ones.")
    bar, close = tqdm_progress(f"{method} {bits}-bit g{group}")
    before_evaluation: list[float] = []  # the peak RSS when the evaluation starts: the quantization's, as the peers'

    def progress(done: int, total: int, message: str) -> None:
        if message.startswith("evaluating") and not before_evaluation:
            before_evaluation.append(peak_rss_gib())
        bar(done, total, message)

    asked = Quantized(method, bits, group, 0.0, None, "", command, options=options)
    store = Store()
    identity = identify_run(loaded, corpus, sampling, uniform_plan(loaded.arch, bits), asked.settings(), evaluation)
    if rerun:
        history.delete_runs(store, [identity.key])
    run = history.find_run(store, identity.key)
    cached = run is not None
    try:
        if not cached:
            run = measure_run(loaded, corpus, sampling, identity, asked.settings(), evaluation, progress,
                              {"allocation": "uniform", "budget": bits})
    finally:
        close()
    if not cached:
        history.record_run(store, run)
        weights = run_weights(loaded.arch, identity.key)
        path_of = {layer.name: layer.module_path for layer in loaded.arch.layers}
        torch.save({path_of[name]: weight for block in range(loaded.arch.n_blocks)
                    for name, weight in weights.block(block).items()}, WORK / f"{asked.name}.pt")
        remove_checkpoints(identity.key)
    note = ("stored run: time as stored" if cached else "process peak RSS until its evaluation began (model load, "
            "the reference statistics where not cached, quantization)")
    record = replace(asked, seconds=run.quant_seconds,
                     peak_rss_gib=None if cached else (before_evaluation or [peak_rss_gib()])[0],
                     load=load_average(), note=note, run_key=identity.key)
    save_record(record)
    print(record, run.perplexity)


@dataclass(frozen=True)
class Row:
    record: Quantized
    perplexity: float
    kl: float
    top1: float
    kl_validation: float | None = None  # None: no Ŵ kept (our runs stored before Ŵ were saved)


def validation_windows(inputs: Inputs, calibration_ids: torch.Tensor) -> torch.Tensor:
    """VALIDATION_WINDOWS windows of the calibration split that neither a fitted segment nor another window touches:
    data to choose settings on, never the evaluation split. (our choice) Drawn at random positions over the whole
    split (seed VALIDATION_SEED), like the fitted segments, so that they hold its mix of genres: the split's end alone
    (the windows until 2026-12-01) is one genre, with full-precision perplexity 61 against the evaluation's 34."""
    generator = torch.Generator().manual_seed(0)  # the draw of aptq.data.calibration_segments
    starts = torch.randint(0, calibration_ids.numel() - inputs.seqlen + 1, (inputs.samples,), generator=generator)
    if not torch.equal(torch.stack([calibration_ids[s:s + inputs.seqlen] for s in starts.tolist()]),
                       inputs.calibration):
        raise RuntimeError("The fitted segments' positions could not be recovered.")
    taken = [(s, s + inputs.seqlen) for s in starts.tolist()]
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    windows = []
    draws = 0
    while len(windows) < VALIDATION_WINDOWS and draws < 1000 * VALIDATION_WINDOWS:  # bounded: a nearly covered split
        draws += 1
        start = int(torch.randint(0, calibration_ids.numel() - WINDOW + 1, (1,), generator=generator))
        if all(start + WINDOW <= first or start >= end for first, end in taken):
            taken.append((start, start + WINDOW))
            windows.append(calibration_ids[start:start + WINDOW])
    if len(windows) < VALIDATION_WINDOWS:
        raise RuntimeError("The calibration split has too few tokens outside the fitted segments.")
    return torch.stack(windows)


def evaluate_weights(loaded, path: Path, windows: torch.Tensor, reference):
    """A method's saved Ŵ (module path → weight) swapped into the model and evaluated on `windows`."""
    from aptq.evaluate import evaluate
    from aptq.pipeline import swapped_weights

    weights = torch.load(path)
    by_module = {layer.module_path: layer.name for layer in loaded.arch.layers}
    if set(weights) != set(by_module):
        raise RuntimeError(f"{path.name}: the method's layers differ from the model's: "
                           f"{sorted(set(weights) ^ set(by_module))[:4]}")
    with swapped_weights(loaded.model, loaded.arch, {by_module[p]: w for p, w in weights.items()}):
        return evaluate(loaded.model, windows, reference=reference)


def cached_measure(record: Quantized, kind: str, measure) -> dict:
    """`measure()` (a dict of numbers) kept in {name}.{kind}.json while it is newer than the record's Ŵ."""
    measured = WORK / f"{record.name}.{kind}.json"
    if measured.is_file() and measured.stat().st_mtime > (WORK / f"{record.name}.pt").stat().st_mtime:
        return json.loads(measured.read_text())
    values = measure()
    measured.write_text(json.dumps(values))
    return values


def measure_peer(loaded, windows: torch.Tensor, reference, record: Quantized) -> Row:
    """The peer's Ŵ evaluated; kept beside its weights so that the next `evaluate` reads it instead."""
    def measure() -> dict:
        result = evaluate_weights(loaded, WORK / f"{record.name}.pt", windows, reference)
        return {"perplexity": result.perplexity, "kl": result.kl_divergence, "top1": result.top1_agreement}

    return Row(record, **cached_measure(record, "evaluation", measure))


def stored_ours(loaded, inputs: Inputs, record: Quantized) -> Row:
    from aptq.data import load_corpus
    from aptq.history import find_run
    from aptq.pipeline import identify_run, uniform_plan
    from aptq.store import Store

    sampling, evaluation = protocol(inputs)
    key = record.run_key or identify_run(loaded, load_corpus("brown"), sampling, uniform_plan(loaded.arch, record.bits),
                                         record.settings(), evaluation).key  # records made before run_key existed
    run = find_run(Store(), key)
    return Row(record, run.perplexity, run.kl, run.top1)


def cached_reference(loaded, windows: torch.Tensor):
    """The full-precision model's statistics on the validation windows, computed once per dump."""
    from aptq.evaluate import ReferenceStats, reference_stats

    path = WORK / f"{VALIDATION}-reference.pt"
    if path.is_file() and path.stat().st_mtime > INPUTS.stat().st_mtime:
        return ReferenceStats(**torch.load(path))
    stats = reference_stats(loaded.model, windows)
    torch.save(asdict(stats), path)
    return stats


def evaluate_all() -> None:
    from aptq.data import load_corpus, token_ids
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
    held_out = validation_windows(inputs, token_ids(loaded.tokenizer, corpus, "calibration"))
    held_out_reference = cached_reference(loaded, held_out)
    rows = []
    for path in sorted(WORK.glob("*.record.json")):
        record = Quantized(**json.loads(path.read_text()))
        if record.method in OURS:
            row = stored_ours(loaded, inputs, record)
        else:
            row = measure_peer(loaded, windows, reference, record)
        if (WORK / f"{record.name}.pt").is_file():
            kl = cached_measure(record, VALIDATION, lambda: {"kl": evaluate_weights(
                loaded, WORK / f"{record.name}.pt", held_out, held_out_reference).kl_divergence})["kl"]
            row = replace(row, kl_validation=kl)
        rows.append(row)
        print(rows[-1], flush=True)
    write_results(inputs, loaded.display_name, rows, float(torch.tensor(reference.mean_nll).exp()))


EARLIER = "measured in an earlier session; its Ŵ is not on this machine"


def row_order(label: str, bits: int, group: int) -> tuple:
    """The table's order: group, widest first, then method (OURS, PEERS) and options."""
    names = OURS | PEERS
    method = next(m for m, name in names.items() if label == name or label.startswith(name + " + "))
    return group, -bits, list(names).index(method), label


def earlier_rows(previous: str, measured: set[tuple[str, int, int]]) -> dict[tuple, tuple[str, str]]:
    """The previous table's rows that nothing measured here replaces (table line, command line), as they were: each
    session adds the rows it measures without redoing the others. The column added since (KL validation) reads —."""
    kept = {}
    for line in previous.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or len(cells) not in (8, 9) or not cells[1].isdigit():
            continue
        label, bits, group = cells[0], int(cells[1]), int(cells[2])
        if (label, bits, group) in measured:
            continue
        if len(cells) == 8:
            cells.insert(6, "—")
        prefix = f"- {label} W{bits} g{group}: "
        command = next((c for c in previous.splitlines() if c.startswith(prefix)), prefix + "(no command recorded)")
        if EARLIER not in command:
            command += f"; {EARLIER}"
        kept[row_order(label, bits, group)] = ("| " + " | ".join(cells) + " |", command)
    return kept


def write_results(inputs: Inputs, model_name: str, rows: list[Row], fp_perplexity: float) -> None:
    results = inputs.results
    previous = results.read_text() if results.is_file() else ""
    protocol_line = (
        f"- protocol: {model_name} ({Path(inputs.model_dir).name}); calibration: Brown "
        f"calibration split, {inputs.samples} × {inputs.seqlen} tokens drawn by aptq.data.calibration_segments, "
        f"seed 0 (the same tensor for every method); evaluation: Brown evaluation split, first "
        f"{inputs.evaluation.numel()} tokens in windows of {WINDOW}, KL and top-1 against the full-precision model "
        f"(top-128 reference, aptq.evaluate); asymmetric grids, groups of the given size, every decoder linear "
        f"quantized (not the tied embedding/LM head)")
    # Earlier rows are kept only under the same protocol (model file, tokens).
    measured = {(r.record.label, r.record.bits, r.record.group) for r in rows}
    entries = earlier_rows(previous, measured) if protocol_line in previous.splitlines() else {}
    for row in rows:
        rss = "—" if row.record.peak_rss_gib is None else f"{row.record.peak_rss_gib:.2f}"
        validation = "—" if row.kl_validation is None else f"{row.kl_validation:.4f}"
        entries[row_order(row.record.label, row.record.bits, row.record.group)] = (
            f"| {row.record.label} | {row.record.bits} | {row.record.group} | {row.perplexity:.3f} "
            f"| {row.kl:.4f} | {row.top1:.4f} | {validation} | {row.record.seconds:.0f} | {rss} |",
            f"- {row.record.label} W{row.record.bits} g{row.record.group}: `{row.record.command}`; load "
            f"{row.record.load}{'; ' + row.record.note if row.record.note else ''}")
    ordered = [entries[key] for key in sorted(entries)]
    lines = [
        "# The peers on the project's own tokens", "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {os.cpu_count()} cores, {platform.processor() or 'CPU'}, "
        f"torch {torch.__version__}; how the jobs shared the machine (threads, cores, what ran beside them): the "
        f"reading below, and each row's load averages",
        "- commands: the docstring of bench/bench_peers.py; each row's own command is in the list under the table",
        protocol_line,
        f"- full precision (the loaded model's weights): perplexity {fp_perplexity:.3f}",
        "- quantize s: wall time of the quantization alone (model loading and evaluation excluded); peak RSS: "
        "resource.getrusage of the process that quantized (its model load included)", "",
        f"- KL validation: KL on {VALIDATION_WINDOWS} windows of {WINDOW} tokens drawn over the calibration split "
        f"where no fitted segment lies (seed {VALIDATION_SEED}, bench_peers.validation_windows): what settings are "
        f"chosen on; — where no Ŵ was kept",
        "",
        "| method | bits | group | perplexity | KL | top-1 | KL validation | quantize s | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [table for table, _ in ordered]
    lines += ["", "Per row: command, load averages (1, 5, 15 min) when it finished, note", ""]
    lines += [command for _, command in ordered]
    results.write_text(with_reading(lines, previous))
    print("\n".join(lines))


def spread_windows(windows: torch.Tensor, count: int) -> torch.Tensor:
    """`count` of the windows at evenly spaced places from the first to the last: 32 of them reach 14 of the Brown
    evaluation split's 15 genres (with either model's tokenizer), where its first 16384 tokens are seven press reports
    (ca05–ca35, genre a)."""
    return windows[torch.linspace(0, len(windows) - 1, min(count, len(windows))).round().long()]


def evaluate_longer(tokens: int, names: list[str], spread: bool, against: str | None) -> None:
    """Every kept Ŵ (or `names`) on the first `tokens` evaluation tokens (windows of 512), more than the dump's, or
    (`spread`) on `tokens` tokens in windows spread over the whole evaluation split: a markdown table on stdout, for a
    reading, each measure ± its standard error over the windows. Full precision first, as the reference. With
    `against` (a Ŵ name), each Ŵ's perplexity ratio and KL difference to that Ŵ, paired window by window
    (aptq.evaluate.paired_difference): whether a gap between two methods stands out of the windows' spread."""
    from aptq.data import evaluation_windows, load_corpus, token_ids
    from aptq.evaluate import evaluate, paired_difference, reference_stats

    inputs = load_inputs()
    loaded = inputs.load()
    ids = token_ids(loaded.tokenizer, load_corpus("brown"), "evaluation")
    if spread:
        windows = spread_windows(evaluation_windows(ids, WINDOW), tokens // WINDOW)
        where = f"{windows.numel()} evaluation tokens in windows of {WINDOW} spread over the whole split"
    else:
        windows = evaluation_windows(ids, WINDOW, tokens)
        if not torch.equal(windows[:len(inputs.evaluation)], inputs.evaluation):
            raise RuntimeError("The evaluation windows do not start with the dumped ones.")
        where = f"first {windows.numel()} evaluation tokens, windows of {WINDOW}"
    reference = reference_stats(loaded.model, windows)
    print(f"{loaded.path.name}: {where}; full precision perplexity "
          f"{evaluate(loaded.model, windows, reference=reference).perplexity:.3f}\n")
    base = evaluate_weights(loaded, WORK / f"{against}.pt", windows, reference) if against else None
    paired = f" | perplexity / {against}'s (paired) | KL − {against}'s (paired)" if against else ""
    print(f"| Ŵ | perplexity (± se) | KL (± se) | top-1{paired} |\n|---|---|---|---{'|---|---' if against else ''}|")
    for path in sorted(WORK.glob("*.pt")) if not names else [WORK / f"{name}.pt" for name in names]:
        if path.name.endswith("-reference.pt") or path == INPUTS:
            continue
        result = evaluate_weights(loaded, path, windows, reference)
        line = (f"| {path.stem} | {result.perplexity:.3f} (± {result.perplexity * result.nll_se:.2f}) | "
                f"{result.kl_divergence:.4f} (± {result.kl_se:.4f}) | {result.top1_agreement:.4f}")
        if base is not None:
            (nll, nll_se), (kl, kl_se) = (paired_difference(result, base, measure) for measure in ("nll", "kl"))
            line += f" | {math.exp(nll):.4f} (± {math.exp(nll) * nll_se:.4f}) | {kl:+.4f} (± {kl_se:.4f})"
        print(line + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["dump", "quantize", "ours", "evaluate", "evaluate-longer"])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=8192, help="evaluation tokens (windows of 512)")
    parser.add_argument("--peer", choices=list(PEERS))
    parser.add_argument("--method", choices=list(OURS))
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--options", default="", help=f"ours only, comma-separated: {', '.join(OPTIONS)}, "
                                                       f"shrink=S, fp-targets=A, act-order-from=B, block=N; "
                                                       f"aespa also "
                                                       f"{', '.join(AESPA_FLAGS)}, iterations=N")
    parser.add_argument("--model", help="dump only: the model (default: the embedded one)")
    parser.add_argument("--rerun", action="store_true", help="ours only: measure again, replacing the stored run")
    parser.add_argument("--spread", action="store_true", help="evaluate-longer only: windows spread evenly over the "
                                                               "whole evaluation split instead of its first tokens")
    parser.add_argument("--names", default="", help="evaluate-longer only: comma-separated Ŵ names (file stems in "
                                                    "the work directory; default: every kept Ŵ)")
    parser.add_argument("--against", help="evaluate-longer only: a Ŵ name; every Ŵ's perplexity ratio and KL "
                                          "difference to it, paired window by window, with standard errors")
    args = parser.parse_args()
    options = ",".join(sorted(filter(None, (part.strip() for part in args.options.split(",")))))
    allowed = set(OPTIONS) | (set(AESPA_FLAGS) if args.method == "aespa" else set())
    for part in filter(None, options.split(",")):
        name, _, value = part.partition("=")
        if not (part in allowed or (args.method == "aespa" and name == "iterations" and value.isdigit())
                or (name in ("shrink", "fp-targets") and value.replace(".", "", 1).isdigit() and 0 <= float(value) <= 1)
                # aptq.widths.QUANT_WIDTHS, not imported: `quantize` runs in the peers' environment without aptq
                or (name == "act-order-from" and value.isdigit() and 2 <= int(value) <= 8)
                or (name == "block" and value.isdigit() and args.method != "rtn")
                or (name == "batch" and value.isdigit() and int(value) >= 1)):
            parser.error(f"unknown --options {part}: choose from {', '.join(sorted(allowed))}, shrink=S (0 to 1), "
                         "fp-targets=A (0 to 1), act-order-from=B (2 to 8), block=N (not rtn), batch=N (N ≥ 1)"
                         f"{', iterations=N' if args.method == 'aespa' else ''}")
    command = f"bench_peers {args.step} --{'peer' if args.step == 'quantize' else 'method'} " \
              f"{args.peer or args.method} --bits {args.bits} --group {args.group}" + \
              (f" --options {options}" if options else "")
    if args.step == "dump":
        dump(args.samples, args.seqlen, args.tokens, args.model)
    elif args.step == "quantize":
        quantize(args.peer, args.bits, args.group, command)
    elif args.step == "ours":
        ours(args.method, args.bits, args.group, options, command, args.rerun)
    elif args.step == "evaluate-longer":
        if args.against and not (WORK / f"{args.against}.pt").exists():
            parser.error(f"--against {args.against}: no such Ŵ in {WORK}; give a file stem of a kept Ŵ.")
        evaluate_longer(args.tokens, [name for name in args.names.split(",") if name], args.spread, args.against)
    else:
        evaluate_all()


if __name__ == "__main__":
    main()
