"""Command line: `python -m aptq <command> …`. Bad input prints one sentence on stderr and exits with code 2."""

from __future__ import annotations

import argparse
import json
import sys

from aptq.errors import UserError
from aptq.models import EMBEDDED_MODEL

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


def run_eval(args: argparse.Namespace) -> None:
    from aptq.data import evaluation_windows, load_corpus, token_ids
    from aptq.evaluate import check_window, evaluate
    from aptq.models import load_model
    from aptq.progress import tqdm_progress

    loaded = load_model(args.model, device=args.device)
    check_window(loaded.model, args.seqlen)
    corpus = load_corpus(args.corpus)
    windows = evaluation_windows(token_ids(loaded.tokenizer, corpus, "evaluation"), args.seqlen, args.tokens or None)
    reference = load_model(args.reference, device=args.device).model if args.reference else None
    progress, close = tqdm_progress("evaluating")
    try:
        result = evaluate(loaded.model, windows, reference=reference, batch_size=args.batch_size, progress=progress)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aptq",
                                     description="See and steer mixed-precision quantization of language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is kept in the cache", file=sys.stderr)
        return 130
    return 0
