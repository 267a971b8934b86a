"""Command line: `python -m aptq <command> …`. Bad input prints one sentence on stderr and exits with code 2.

Every argument and path is checked (aptq.validate) before any work starts. This module imports nothing heavy at import
time: `--help` and argument errors answer without loading torch; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from aptq import validate
from aptq.choices import (
    ACT_ORDER_FROM,
    ALLOCATORS,
    ATTENTION_SHRINK,
    EMBEDDED_MODEL,
    ERROR_SOLVERS,
    FP_TARGETS,
    METHOD_LABELS,
    QUANTIZERS,
    ROW_WEIGHT_CHOICES,
    ROW_WEIGHTS,
)
from aptq.errors import UserError
from aptq.widths import QUANT_WIDTHS

if TYPE_CHECKING:
    from aptq.history import RunRecord

INTERRUPTED = "interrupted; finished work is kept in the store"
INTERRUPTED_EARLY = "interrupted before any work started"


def _leave_at_once(signum: int, frame: object) -> None:
    os.write(2, f"{INTERRUPTED_EARLY}\n".encode())
    os._exit(130)


def work_starts() -> None:
    """Until here (arguments, imports, loading) there is nothing to keep, and main() lets Ctrl-C end the process at
    once: a KeyboardInterrupt inside an extension module's import surfaces as a broken import, not as itself. From
    here on Ctrl-C is a KeyboardInterrupt again, so that long work stores what it finished and says so."""
    signal.signal(signal.SIGINT, signal.default_int_handler)

# CPU defaults keep a run within minutes on 2 cores; the papers' settings apply on a GPU.
CPU_EVAL_TOKENS = 16384


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=EMBEDDED_MODEL,
                        help="hub id, local HF directory, .gguf file, or the embedded default (%(default)s)")
    parser.add_argument("--corpus", default="brown",
                        help="brown (embedded), wikitext2, c4, a UTF-8 text file or a saved dataset directory "
                             "(default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def add_eval_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="perplexity of a model on a corpus's evaluation split",
                                 description="Token-level perplexity over non-overlapping windows of the evaluation "
                                             "split (the GPTQ protocol); with --reference also the KL divergence "
                                             "and top-1 agreement against another model.")
    add_model_arguments(parser)
    parser.add_argument("--seqlen", type=int, default=512, help="window length in tokens (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=CPU_EVAL_TOKENS,
                        help="evaluate at most this many tokens, 0 = the whole split (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default: %(default)s)")
    parser.add_argument("--reference", default=None, help="a second model to compare against (KL, top-1)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=run_eval)


def check_sources(args: argparse.Namespace) -> None:
    """The model and corpus every command reads, and the store it writes, before anything is loaded."""
    validate.model_source(args.model)
    validate.corpus_source(args.corpus)
    if getattr(args, "store", None) is not None:
        validate.store_path(args.store)


def check_evaluation(seqlen: int, tokens: int) -> None:
    validate.at_least(seqlen, 2, "The evaluation window (--seqlen / --eval-seqlen)")
    validate.at_least(tokens, 0, "--tokens (0 = the whole split)")


def run_eval(args: argparse.Namespace) -> None:
    check_evaluation(args.seqlen, args.tokens)
    validate.at_least(args.batch_size, 1, "--batch-size")
    check_sources(args)
    if args.reference is not None:
        validate.model_source(args.reference, "--reference")

    from aptq.data import evaluation_windows, load_corpus, token_ids
    from aptq.evaluate import evaluate
    from aptq.models import load_model
    from aptq.progress import tqdm_progress

    loaded = load_model(args.model, device=args.device)
    validate.within_context(args.seqlen, loaded.max_length, "The evaluation window")
    corpus = load_corpus(args.corpus)
    windows = evaluation_windows(token_ids(loaded.tokenizer, corpus, "evaluation"), args.seqlen, args.tokens or None)
    reference = None
    if args.reference:
        other = load_model(args.reference, device=args.device)
        validate.same_vocabulary(loaded.model, loaded.tokenizer, other.model, other.tokenizer)
        validate.within_context(args.seqlen, other.max_length, "The evaluation window (for the reference)")
        reference = other.model
    work_starts()
    progress, close = tqdm_progress("evaluating")
    try:
        result = evaluate(loaded.model, windows, reference=reference, batch_size=args.batch_size, progress=progress,
                          device=loaded.device)
    finally:
        close()
    record = {"model": loaded.display_name, "baseline": loaded.baseline_label, "corpus": corpus.name,
              "split": "evaluation", "device": str(loaded.device)} | result.as_dict()
    if args.json:
        print(json.dumps(record, indent=2))
        return
    print(f"{loaded.display_name} ({loaded.baseline_label}) on {corpus.name} evaluation split: "
          f"perplexity {result.perplexity:.3f} over {result.tokens} predicted tokens "
          f"({result.windows} windows × {result.seqlen}), {result.tokens_per_second:.0f} tokens/s on {loaded.device}")
    if result.kl_divergence is not None:
        print(f"KL to reference {result.kl_divergence:.5f} nats/token, top-1 agreement {result.top1_agreement:.4f}")


def integer_list(what: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: comma-separated integers, named `what` in the one-sentence error."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{what} must be integers separated by commas, got {text!r}") from exc

    return parse


_bit_list = integer_list("bit widths")


def act_order_width(text: str) -> int | None:
    """An argparse type: `--act-order`'s first width, 2–8 bits, or "off"."""
    if text == "off":
        return None
    if not text.isdigit() or int(text) not in QUANT_WIDTHS:
        raise argparse.ArgumentTypeError(f"act-order applies from a width of 2–8 bits or is 'off', got {text!r}")
    return int(text)


def _share(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{what} must be a number from 0 to 1, got {text!r}")
    return value


def shrinkage(text: str) -> float:
    """An argparse type: `--shrink`, a number from 0 to 1."""
    return _share(text, "the shrinkage")


def fp_target_share(text: str) -> float:
    """An argparse type: `--fp-targets`, a number from 0 to 1."""
    return _share(text, "the share of the full-precision targets")


def refinement_steps(text: str) -> int:
    """An argparse type: `--block-refinement`, a whole number of steps ≥ 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"the block refinement's steps must be a whole number ≥ 0, got {text!r}")
    return int(text)


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=None,
                        help="calibration segments (default: 64 on CPU, 128 on GPU)")
    parser.add_argument("--seqlen", type=int, default=None,
                        help="tokens per segment (default: 512 on CPU, 2048 on GPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the segment draw and probes (default: 0)")
    parser.add_argument("--batch-size", type=int, default=None, help="segments per forward pass (default: auto)")
    parser.add_argument("--store", default=None, help="DuckDB file (default: $APTQ_STORE or data/aptq.duckdb)")


def check_calibration(args: argparse.Namespace) -> None:
    """The calibration arguments and the paths of the commands that calibrate, before anything is loaded."""
    if args.samples is not None:
        validate.at_least(args.samples, 1, "--samples (calibration segments)")
    if args.seqlen is not None:
        validate.at_least(args.seqlen, 2, "--seqlen (tokens per calibration segment)")
    validate.seed(args.seed, "--seed")
    if args.batch_size is not None:
        validate.at_least(args.batch_size, 1, "--batch-size")
    if args.group_size is not None:
        validate.group_size(args.group_size)
    check_sources(args)


def calibration_of(args: argparse.Namespace, loaded):
    """The sampling the arguments ask for, within the model's context (the default length is cut to it)."""
    from aptq.data import Sampling
    from aptq.sensitivity import default_calibration

    samples, seqlen = default_calibration(loaded.device)
    if args.seqlen is not None:
        seqlen = validate.within_context(args.seqlen, loaded.max_length, "A calibration segment (--seqlen)")
    return Sampling(samples if args.samples is None else args.samples, min(seqlen, loaded.max_length), args.seed)


def group_size_of(args: argparse.Namespace, loaded) -> int:
    from aptq.sensitivity import default_group_size

    return default_group_size(loaded.arch) if args.group_size is None else args.group_size


def say_attention_unavailable(loaded) -> None:
    """One line (on stderr, so that --json output stays clean) when the attention-aware path does not apply."""
    if loaded.attention_unavailable:
        print(loaded.attention_unavailable, file=sys.stderr)


class LazyBar:
    """A tqdm progress callback whose bar appears on the first report, so bad input fails with one line."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar: tuple | None = None

    def __call__(self, done: int, total: int, message: str) -> None:
        from aptq.progress import tqdm_progress

        if self.bar is None:
            self.bar = tqdm_progress(self.description)
        self.bar[0](done, total, message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar[1]()
            self.bar = None


def add_analyze_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("analyze", help="per-layer sensitivity: traces, scores and predicted errors",
                                 description="Walk the model block by block over calibration segments and measure "
                                             "each linear layer's sensitivity (layer-wise and attention-aware "
                                             "Hessians, APTQ trace) and the predicted error of each bit width. "
                                             "Results are cached in the DuckDB store; a repeat is instant.")
    add_model_arguments(parser)
    add_calibration_arguments(parser)
    parser.add_argument("--group", dest="group_size", type=int, default=None,
                        help="quantization group size for the predicted errors, 0 = per channel "
                             "(default: 128 when the hidden size allows it, else 64)")
    parser.add_argument("--bits", type=_bit_list, default=(2, 3, 4, 8),
                        help="bit widths for the predicted errors (default: 2,3,4,8)")
    parser.add_argument("--probes", type=int, default=None,
                        help="Hutchinson probes per segment for the APTQ trace (default: 1)")
    parser.add_argument("--max-blocks", type=int, default=None, help="analyze only the first N blocks")
    add_analysis_arguments(parser)
    parser.add_argument("--calibrate-unit", action="store_true",
                        help="then measure the calibrated cross-layer unit: KL of noise injected into one layer at a "
                             "time, on the last quarter of the calibration segments (needs at least 8): forward "
                             "passes over them per layer, ≈ 1 min per layer of the embedded model at 16 × 512 on a "
                             "CPU; stored as measured, so an interrupted run resumes")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the blocks an interrupted run already stored (default: on)")
    parser.set_defaults(handler=run_analyze)


def add_analysis_arguments(parser: argparse.ArgumentParser) -> None:
    """Analysis settings that key the stored analysis: `sweep` takes them too, to plan from the same analysis."""
    parser.add_argument("--quantizer-errors", action="store_true",
                        help="also predict the errors of GPTQ and the attention-aware quantizer (one GPTQ run per "
                             "layer and width), so that plans can use the errors of the quantizer that will run")
    parser.add_argument("--extra-group-sizes", type=integer_list("group sizes"), default=(),
                        help="also predict the errors at these group sizes, comma separated, 0 = per channel (e.g. "
                             "32,128): errors for (bits, group size) candidates")


def check_analysis_arguments(args: argparse.Namespace) -> None:
    for size in args.extra_group_sizes:
        validate.group_size(size)


def analysis_for(args: argparse.Namespace, loaded, corpus, sampling, bits=(2, 3, 4, 8), probes=None,
                 max_blocks=None, resume=True):
    """(layers, errors) of the analysis the arguments describe: from the store, or computed with a progress bar."""
    from aptq.hessian import DEFAULT_PROBES
    from aptq.sensitivity import AnalysisSettings, analyze
    from aptq.store import Store

    settings = AnalysisSettings(group_size=group_size_of(args, loaded), bits=bits,
                                probes=DEFAULT_PROBES if probes is None else probes, max_blocks=max_blocks,
                                batch_size=args.batch_size, quantizer_errors=args.quantizer_errors,
                                extra_group_sizes=args.extra_group_sizes)
    bar = LazyBar("analyzing blocks")
    try:
        return analyze(loaded, corpus, sampling, settings, store=Store(args.store), progress=bar, resume=resume)
    finally:
        bar.close()


def run_analyze(args: argparse.Namespace) -> None:
    check_calibration(args)
    check_analysis_arguments(args)
    validate.bit_widths(args.bits, "--bits")
    if args.probes is not None:
        validate.at_least(args.probes, 1, "--probes")
    if args.max_blocks is not None:
        validate.at_least(args.max_blocks, 1, "--max-blocks")

    from aptq.calibrate import unit_settings_for
    from aptq.data import load_corpus
    from aptq.models import load_model
    from aptq.sensitivity import ranked
    from aptq.store import Store

    loaded = load_model(args.model, device=args.device)
    validate.block_count(args.max_blocks, loaded.arch.n_blocks)
    say_attention_unavailable(loaded)
    corpus = load_corpus(args.corpus)
    sampling = calibration_of(args, loaded)
    unit_settings = unit_settings_for(sampling.n_samples, args.bits, args.seed) if args.calibrate_unit else None
    work_starts()
    layers, errors = analysis_for(args, loaded, corpus, sampling, args.bits, args.probes, args.max_blocks,
                                  args.resume)
    origin = "cache hit" if layers.attrs["cached"] else "computed"
    print(f"{loaded.display_name} on {corpus.name}: {len(layers)} layers, {sampling.n_samples} × {sampling.seqlen} "
          f"calibration tokens ({origin}); results in {Store(args.store).path}, analysis "
          f"{layers.attrs['analysis_key']} (tables layer_metrics, predicted_errors: errors of RTN"
          f"{', GPTQ and attention-aware GPTQ' if args.quantizer_errors else ''})")
    most, least = ranked(layers, "score", 10)
    columns = ["layer", "kind", "score", "score_attention", "score_layerwise"]
    for title, frame in (("Most sensitive (APTQ trace per parameter)", most), ("Least sensitive", least)):
        print(f"\n{title}:")
        print(frame[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if unit_settings is not None:
        calibrate_unit_for(args, loaded, corpus, sampling, layers, errors, unit_settings)


def calibrate_unit_for(args: argparse.Namespace, loaded, corpus, sampling, layers, errors, settings):
    """The calibrated unit of the analysis (stored, so a repeat is a cache hit), after one line about it."""
    from aptq.calibrate import calibrate_unit, validation_count
    from aptq.store import Store

    bar = LazyBar("calibrating the unit")
    try:
        units = calibrate_unit(loaded, corpus, sampling, layers, errors, settings, Store(args.store), bar)
    finally:
        bar.close()
    relative = (units["kl_rate_se"] / units["kl_rate"]).median()
    print(f"\nCalibrated unit: KL per unit of error of {len(units)} layers, from noise as large as their "
          f"{','.join(map(str, settings.noise_bits))}-bit RTN error on the last "
          f"{validation_count(sampling.n_samples, settings.holdout)} of {sampling.n_samples} calibration segments "
          f"(median relative standard error {relative:.0%}); stored in table unit_calibrations, used by plans with "
          f"unit \"calibrated\" (sweep --unit calibrated).")
    return units


def calibrate_widths_for(args: argparse.Namespace, loaded, corpus, sampling, layers, errors, settings, widths):
    """The layers table carrying the measured width multiples (stored, so a repeat is a cache hit), after one line
    about them; with --pairs, the multiples of the other group sizes' grids too."""
    from aptq.calibrate import WIDTH_HOLDOUT, calibrate_widths, multiples_of, validation_count, with_width_multiples
    from aptq.store import Store

    bar = LazyBar("measuring the width multiples")
    grids = tuple(args.extra_group_sizes) if args.pairs else ()
    try:
        table = calibrate_widths(loaded, corpus, sampling, layers, errors, settings, widths, Store(args.store), bar,
                                 grids=grids)
    finally:
        bar.close()
    held = validation_count(sampling.n_samples, WIDTH_HOLDOUT)
    print(f"\nWidth multiples (held-out KL / predicted total of each uniform plan, {settings.method} on the first "
          f"{sampling.n_samples - held} calibration segments, KL on the other {held}): "
          f"{multiples_of(table, settings.group_size).describe()}; stored in table width_calibrations, charged by "
          f"every plan of this sweep.")
    return with_width_multiples(layers, table, settings.group_size)


def add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group", dest="group_size", type=int, default=None,
                        help="columns per scale/zero group, 0 = per output channel "
                             "(default: 128 when the hidden size allows it, else 64)")
    parser.add_argument("--symmetric", action="store_true", help="symmetric grid (default: asymmetric)")
    parser.add_argument("--act-order", dest="act_order_from", nargs="?", type=act_order_width, const=2,
                        default=ACT_ORDER_FROM, metavar="FROM_BITS",
                        help="GPTQ columns in order of decreasing diag(H), static groups, for the layers of at least "
                             "FROM_BITS bits; alone: every layer; 'off': none (default: "
                             f"{ACT_ORDER_FROM or 'off'}, chosen in bench/results/peers.md)")
    parser.add_argument("--value-rows", action="store_true",
                        help="attention/aespa: BoA row compensation for v through the out projection (off by default: "
                             "measured in bench/results/quantizer.md)")
    parser.add_argument("--mlp-rows", action="store_true",
                        help="attention/aespa: BoA row compensation for gate and up through the down projection (off "
                             "by default: measured in bench/results/quantizer.md)")
    parser.add_argument("--output-norms", choices=("auto", "on", "off"), default="auto",
                        help="attention/aespa: in blocks with post-norms (Gemma 2/3, OLMo 2) weigh each token's error "
                             "by 1/σ² of the out (down) projection's output the norm divides it by; auto: on where "
                             "the model has post-norms (default: %(default)s, measured in "
                             "bench/results/peers_gemma-3-270m-q4_k_m-a5fd3b62230a.md)")
    parser.add_argument("--fp-targets", type=fp_target_share, default=FP_TARGETS, metavar="SHARE",
                        help="gptq/attention/aespa: this share of each layer's objective is the full-precision "
                             "model's output, the rest its output on the quantized model's inputs; W* = W + SHARE·W D "
                             "H⁻¹, 0 = off (docs/algorithms.md §17; default %(default)s, chosen in "
                             "bench/results/peers.md)")
    parser.add_argument("--shrink", type=shrinkage, default=ATTENTION_SHRINK,
                        help="attention/aespa: shrink v's and q/k's attention-aware Hessians toward GPTQ's by this "
                             "share, 0 = as the papers give them, 1 = plain GPTQ (default: %(default)s, chosen in "
                             "bench/results/quantizer.md)")
    parser.add_argument("--row-weights", choices=ROW_WEIGHT_CHOICES, default=ROW_WEIGHTS,
                        help="attention/aespa: q/k's row Hessians from each query's visible keys alike (uniform) or "
                             "from its attention probabilities, centred (attention) (default: %(default)s, chosen in "
                             "bench/results/quantizer.md)")
    parser.add_argument("--aespa-iterations", type=int, default=None,
                        help="aespa: rounding iterations per layer at every width (default on a CPU: 100 below 3 bits, "
                             "50 from 3 bits; on a GPU: 10000)")
    parser.add_argument("--aespa-fixed-scales", action="store_true",
                        help="aespa: keep the starting solution's scales (default: learn a factor on each group's "
                             "scale)")
    parser.add_argument("--block-refinement", type=refinement_steps, default=0, metavar="STEPS",
                        help="gptq/attention/aespa: after each block's layers are quantized, tune their codes and "
                             "scales jointly on the block's output for STEPS signed-gradient steps, one calibration "
                             "batch each; 0 = off (docs/algorithms.md §18; default %(default)s, measured in "
                             "bench/results/peers_64x512_16384.md)")
    parser.add_argument("--eval-seqlen", type=int, default=512, help="evaluation window (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=CPU_EVAL_TOKENS,
                        help="evaluate at most this many tokens, 0 = the whole split (default: %(default)s)")


def quantize_settings(args: argparse.Namespace, loaded, method: str):
    from dataclasses import replace

    from aptq.aespa import AespaOptions
    from aptq.blockwise import BlockRefinement
    from aptq.pipeline import EvalSettings, QuantizeSettings, has_output_norms

    aespa = replace(AespaOptions.for_device(args.device or str(loaded.device), args.aespa_iterations),
                    learn_scales=not args.aespa_fixed_scales)
    return (QuantizeSettings(method=method, group_size=group_size_of(args, loaded), symmetric=args.symmetric,
                             act_order_from=args.act_order_from, value_rows=args.value_rows, mlp_rows=args.mlp_rows,
                             shrink=args.shrink, row_weights=args.row_weights,
                             output_norms={"on": True, "off": False}.get(args.output_norms, has_output_norms(loaded)),
                             fp_targets=args.fp_targets, batch_size=args.batch_size, device=args.device, aespa=aespa,
                             block=BlockRefinement(args.block_refinement)),
            EvalSettings(args.eval_seqlen, args.tokens or None))


def add_quantize_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("quantize", help="quantize with uniform bits or a plan, evaluate, store, export",
                                 description="Quantize the model block by block (true-sequential) with one bit "
                                             "width for every layer or a plan, measure perplexity, KL divergence "
                                             "and top-1 agreement against full precision, store the run, and "
                                             "optionally export it. A run stored before is not repeated.")
    add_model_arguments(parser)
    add_calibration_arguments(parser)
    add_quantization_arguments(parser)
    parser.add_argument("--method", choices=list(QUANTIZERS), default="attention",
                        help="; ".join(f"{k}: {v}" for k, v in METHOD_LABELS.items()) + " (default: %(default)s)")
    parser.add_argument("--bits", type=int, default=None, help="one width (2–8) for every layer")
    parser.add_argument("--plan", default=None,
                        help="a plan JSON: {layer: bits} or a plan.json this tool exported (16 = keep)")
    parser.add_argument("--export", default=None, help="write the quantized model and the plan files here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
    parser.add_argument("--export-format", action="append", default=[], metavar="FORMAT",
                        help="also write this format into the export (repeatable): gptq or compressed-tensors (packed "
                             "checkpoints), llama.cpp (llama-quantize tensor-type overrides)")
    parser.add_argument("--json", action="store_true", help="print the run as JSON")
    parser.set_defaults(handler=run_quantize)


def read_plan(path: str) -> dict[str, int]:
    from pathlib import Path

    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"The plan file {path} does not exist.") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"The plan file {path} is not readable JSON ({exc}).") from None
    layers = document.get("layers", document) if isinstance(document, dict) else None
    if not isinstance(layers, dict) or not all(type(v) is int for v in layers.values()):
        raise UserError(f"The plan file {path} must map layer names to integer bits (or be a plan.json export).")
    return layers


def print_run(run: RunRecord, as_json: bool) -> None:
    """A run as two lines, or as JSON."""
    if as_json:
        print(json.dumps(run.as_dict(), indent=2, default=str))
        return
    origin = "stored run, no work done" if run.cached else f"quantized in {run.quant_seconds:.1f} s"
    print(f"{run.method} · {run.avg_bits:.3f} bits ({run.effective_bits:.3f} effective, "
          f"{run.size_mb:.1f} MB of linear weights) · {origin}")
    print(f"perplexity {run.perplexity:.3f} (full precision {run.fp_perplexity:.3f}) on {run.corpus}, "
          f"window {run.eval_seqlen}, {run.eval_tokens} tokens · KL {run.kl:.5f} · top-1 {run.top1:.4f}")
    if run.notes:
        print(f"notes: {run.notes}")
    if run.export_dir:
        print(f"exported to {run.export_dir}")


def run_quantize(args: argparse.Namespace) -> None:
    if (args.bits is None) == (args.plan is None):
        raise UserError("Give either --bits (one width for every layer) or --plan (a plan JSON file).")
    validate.block_refinement(args.method, args.block_refinement)
    check_calibration(args)
    check_evaluation(args.eval_seqlen, args.tokens)
    if args.bits is not None:
        validate.bit_widths([args.bits], "--bits")
    chosen_plan = None if args.plan is None else read_plan(args.plan)

    from aptq.data import load_corpus
    from aptq.models import load_model
    from aptq.pipeline import run_plan, uniform_plan
    from aptq.store import Store

    if args.export is not None:  # checked again against the loaded model's directory by run_plan
        validate.export_target(args.export, args.overwrite, keep=(Store(args.store).path, args.model))
    loaded = load_model(args.model, device=args.device)
    say_attention_unavailable(loaded)
    corpus = load_corpus(args.corpus)
    plan = uniform_plan(loaded.arch, args.bits) if chosen_plan is None else chosen_plan
    settings, evaluation = quantize_settings(args, loaded, args.method)
    meta = {"allocation": "uniform", "budget": args.bits} if args.plan is None else {"name": args.plan}
    sampling = calibration_of(args, loaded)
    work_starts()
    bar = LazyBar(f"{args.method}")
    try:
        run = run_plan(loaded, corpus, sampling, plan, settings, evaluation, Store(args.store),
                       bar, meta, args.export, args.overwrite, export_formats=tuple(args.export_format))
    finally:
        bar.close()
    print_run(run, args.json)


def add_sweep_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("sweep", help="plans for many budgets and solvers, each quantized and evaluated",
                                 description="For every allocation method and budget, turn the cached sensitivity "
                                             "analysis into a plan, quantize and evaluate it, and store the "
                                             "perplexity/KL-versus-bits curves. Stored points are reused, so an "
                                             "interrupted sweep resumes.")
    add_model_arguments(parser)
    add_calibration_arguments(parser)
    add_quantization_arguments(parser)
    parser.add_argument("--budgets", default="2.5:4.5:0.25",
                        help="average bits: start:stop:step or a comma list (default: %(default)s)")
    parser.add_argument("--methods", default="uniform,aptq,knapsack,knapsack-layerwise",
                        help=f"allocation methods, comma separated, from {', '.join(ALLOCATORS)} "
                             f"(default: %(default)s)")
    parser.add_argument("--candidates", type=_bit_list, default=(2, 3, 4, 8),
                        help="bit widths a layer may take (default: 2,3,4,8)")
    parser.add_argument("--pairs", action="store_true",
                        help="the knapsack plans choose a (bits, group size) pair per layer among --candidates × "
                             "(--group and each of --extra-group-sizes); the budgets are then effective bits per "
                             "weight, scales and zero points included")
    parser.add_argument("--seeds", type=_bit_list, default=(0, 1, 2),
                        help="seeds of the random allocation (default: 0,1,2)")
    parser.add_argument("--quantizer", choices=list(QUANTIZERS), default="gptq",
                        help="how each plan is quantized (default: %(default)s); the plans use its predicted errors "
                             "when the analysis has them (--quantizer-errors), else RTN's")
    add_analysis_arguments(parser)
    parser.add_argument("--unit", choices=("heuristic", "calibrated"), default="heuristic",
                        help="how errors of different layers are made comparable: the heuristic factor, or the "
                             "calibrated unit (measured first as analyze --calibrate-unit does; stored) "
                             "(default: %(default)s)")
    parser.add_argument("--width-multiples", action="store_true",
                        help="first measure each candidate width's multiple: the plan with every analysed layer at "
                             "that width, quantized by --quantizer on the first three quarters of the calibration "
                             "segments, its KL on the last quarter over its predicted total (needs at least 8 "
                             "segments; stored); the plans then charge it to every layer's predicted error at that "
                             "width; with --pairs, each grid of --extra-group-sizes is measured the same way and "
                             "priced by its own multiples")
    ray = parser.add_argument_group("Ray", "run the plans in parallel as Ray tasks (needs the ray package); only "
                                           "this process writes the store")
    ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="a Ray cluster's address (host:port, auto, local); without one: $RAY_ADDRESS, else the "
                          "cluster `ray start` started on this machine, else a new local one")
    ray.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs each run asks for (default: %(default)s)")
    ray.add_argument("--ray-gpus", type=float, default=None,
                     help="GPUs each run asks for (default: 1 when this machine has CUDA, else 0)")
    ray.add_argument("--ray-memory", type=float, default=None,
                     help="memory each run asks for, in GiB (default: three times the model's float32 weights)")
    ray.add_argument("--ray-retries", type=int, default=3,
                     help="retries of a run whose worker died (default: %(default)s)")
    parser.set_defaults(handler=run_sweep_command)


def check_pairs(allocations: list[str], extra_group_sizes: tuple[int, ...]) -> None:
    """--pairs: group sizes to choose from, and only allocators that take (bits, group size) candidates."""
    if not extra_group_sizes:
        raise UserError("--pairs chooses among group sizes: give the others with --extra-group-sizes (e.g. 128,0).")
    other = [method for method in allocations if method not in ERROR_SOLVERS]
    if other:
        raise UserError(f"--pairs is for the knapsack methods ({', '.join(ERROR_SOLVERS)}), not {other[0]}; leave "
                        f"it out of --methods or sweep it without --pairs.")


def ray_options(args: argparse.Namespace):
    """The Ray options the arguments ask for (checked before anything is loaded), or None without --ray."""
    if args.ray is None:
        return None
    if not args.ray_cpus > 0:
        raise UserError(f"--ray-cpus must be positive, got {args.ray_cpus}.")
    if args.ray_gpus is not None and not args.ray_gpus >= 0:
        raise UserError(f"--ray-gpus must be 0 or more, got {args.ray_gpus}.")
    if args.ray_memory is not None and not args.ray_memory > 0:
        raise UserError(f"--ray-memory must be positive (GiB), got {args.ray_memory}.")
    validate.at_least(args.ray_retries, 0, "--ray-retries")
    from aptq.ray_sweep import GIB, RayOptions, import_ray

    import_ray()  # missing: one sentence now, not after the analysis
    if args.ray_gpus is None:
        import torch

        args.ray_gpus = 1.0 if torch.cuda.is_available() else 0.0
    return RayOptions(args.ray or None, args.ray_cpus, args.ray_gpus,
                      None if args.ray_memory is None else int(args.ray_memory * GIB), args.ray_retries)


def run_sweep_command(args: argparse.Namespace) -> int:
    allocations = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in allocations if m not in ALLOCATORS]
    if unknown or not allocations:
        raise UserError(f"Unknown allocation method {unknown[0] if unknown else '(none)'}; choose from "
                        f"{', '.join(ALLOCATORS)}.")
    check_calibration(args)
    check_analysis_arguments(args)
    check_evaluation(args.eval_seqlen, args.tokens)
    candidates = validate.bit_widths(args.candidates, "--candidates")
    budgets = validate.budgets(validate.parse_budgets(args.budgets), candidates)
    if "random" in allocations:
        if not args.seeds:
            raise UserError("--seeds is empty; the random allocation needs at least one seed.")
        for seed in args.seeds:
            validate.seed(seed, "Each of --seeds")
    ray = ray_options(args)
    validate.block_refinement(args.quantizer, args.block_refinement)
    if args.pairs:
        check_pairs(allocations, args.extra_group_sizes)

    from aptq.allocate import PREDICTED_ERROR_ATTENTION, check_group_sizes, error_source_for, pair_candidates
    from aptq.calibrate import unit_settings_for, widths_to_measure
    from aptq.data import load_corpus
    from aptq.models import load_model
    from aptq.pipeline import layer_table
    from aptq.store import Store
    from aptq.sweep import SweepPoint, run_sweep, sweep_points


    points = sweep_points(allocations, budgets, args.seeds)
    loaded = load_model(args.model, device=args.device)
    corpus = load_corpus(args.corpus)
    sampling = calibration_of(args, loaded)
    unit_settings = unit_settings_for(sampling.n_samples, candidates, args.seed) if args.unit == "calibrated" else None
    widths = widths_to_measure(candidates, sampling.n_samples) if args.width_multiples else ()
    plan_candidates = pair_candidates(candidates, (group_size_of(args, loaded), *args.extra_group_sizes)) \
        if args.pairs else candidates
    if args.pairs:  # every pair plan uses the main group size too: refused before the analysis
        check_group_sizes(layer_table(loaded), {group for _, group in plan_candidates})
    work_starts()
    layers, errors = analysis_for(args, loaded, corpus, sampling, bits=candidates)
    if unit_settings is not None:
        from aptq.calibrate import with_unit

        layers = with_unit(layers, calibrate_unit_for(args, loaded, corpus, sampling, layers, errors, unit_settings))
    settings, evaluation = quantize_settings(args, loaded, args.quantizer)
    if widths:
        layers = calibrate_widths_for(args, loaded, corpus, sampling, layers, errors, settings, widths)
    if note := error_source_for(errors, settings.method).note:
        print(note, file=sys.stderr)
    bar = LazyBar("sweep" if ray is None else "sweep on Ray")
    try:
        if ray is None:
            table = run_sweep(loaded, corpus, sampling, layers, errors, points, plan_candidates, settings,
                              evaluation, Store(args.store), bar)
        else:
            from aptq.ray_sweep import run_sweep_on_ray

            table = run_sweep_on_ray(loaded, corpus, sampling, layers, errors, points, plan_candidates, settings,
                                     evaluation, Store(args.store), bar, ray)
    finally:
        bar.close()
    columns = [c for c in ("allocation", "budget", "seed", "avg_bits", "effective_bits", "perplexity", "kl", "top1",
                           PREDICTED_ERROR_ATTENTION, "error_source", "quant_seconds", "cached", "skipped", "failed")
               if c in table]
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    failed = table[table["failed"].notna()] if "failed" in table else table.iloc[:0]
    for row in failed.itertuples():
        point = SweepPoint(row.allocation, row.budget, row.seed)
        print(f"error: the run of plan {point.name!r} (saved in the store) failed: {row.failed}", file=sys.stderr)
    return 1 if len(failed) else 0


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one sentence and exit code 2 (through main), like every other bad input."""

    def error(self, message: str) -> None:
        raise UserError(f"{message[0].upper()}{message[1:]}; see `{self.prog} --help`.")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m aptq", description="See and steer mixed-precision quantization of language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(commands)
    add_analyze_parser(commands)
    add_quantize_parser(commands)
    add_sweep_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    previous = signal.signal(signal.SIGINT, _leave_at_once)
    try:
        args = build_parser().parse_args(argv)
        status = args.handler(args)  # None, or 1 when some of the work failed (a sweep's runs)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment failed us (disk full, a file vanished): one sentence, not a traceback
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: could not read or write{where} ({exc.strerror or exc}).", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    return status or 0
