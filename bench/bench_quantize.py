"""Quantization engine benchmark: FP, RTN, GPTQ and attention-aware GPTQ at several widths and group sizes.

    .venv/bin/python -m bench.bench_quantize --bits 4,3,2 --groups 64,0 --samples 64 --seqlen 512 --tokens 16384

Every run goes through `aptq.pipeline.run_plan` into the default store (so the dashboard shows them, and a rerun
reuses them). The table is rewritten after each run, so an interrupted benchmark keeps what it measured; rows already
in the output file under the same protocol (model, calibration, evaluation) are kept unless measured again, so one
invocation per (method, bits) adds its row to the table, and the header's command (the union of the table's rows)
reproduces the whole table from the store. Text below the table (a hand-written reading) is kept.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from aptq.choices import EMBEDDED_MODEL, METHOD_LABELS
from aptq.data import Sampling, load_corpus
from aptq.models import load_model
from aptq.pipeline import EvalSettings, QuantizeSettings, run_plan, uniform_plan
from aptq.progress import tqdm_progress
from aptq.sensitivity import default_group_size
from aptq.store import Store

RESULTS = Path(__file__).parent / "results" / "quantize.md"
COLUMNS = ("| method | bits | group | perplexity | KL (nats/token) | top-1 agreement | quantize s | evaluate s | "
           "notes |")
METHODS_BY_LABEL = {label: method for method, label in METHOD_LABELS.items()}


@dataclass(frozen=True)
class RowKey:
    method: str
    bits: int
    group: int  # 0 = per channel

    @staticmethod
    def of_line(line: str) -> RowKey:
        method, bits, group = (cell.strip() for cell in line.strip("|").split("|")[:3])
        return RowKey(METHODS_BY_LABEL[method], int(bits), 0 if group == "per-channel" else int(group))

    def order(self) -> tuple[int, int, int, int]:
        """Groups before per channel, wide before narrow, methods in the menu's order."""
        return (self.group == 0, self.group, -self.bits, list(METHOD_LABELS).index(self.method))


@dataclass
class Table:
    """The rows of a results file and the text after them, read back so that a later invocation adds to them."""

    rows: dict[RowKey, str]
    fp_line: str = ""
    reading: str = ""

    @staticmethod
    def read(path: Path, protocol: str) -> Table:
        """The file's rows when it was written under `protocol` (its "- model:" line), else an empty table."""
        lines = path.read_text().splitlines() if path.is_file() else []
        if protocol not in lines or COLUMNS not in lines:
            return Table({})
        start = lines.index(COLUMNS) + 2
        end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
        fp_line = next((line for line in lines if line.startswith("- full precision")), "")
        return Table({RowKey.of_line(line): line for line in lines[start:end]}, fp_line,
                     "\n".join(lines[end:]).strip("\n"))

    def command(self, args: argparse.Namespace) -> str:
        """The invocation that reproduces every row of the table (from the store where they were measured)."""
        keys = sorted(self.rows, key=RowKey.order)
        flags = {"bits": sorted({k.bits for k in keys}, reverse=True),
                 "groups": list(dict.fromkeys(k.group for k in keys)),
                 "methods": sorted({k.method for k in keys}, key=list(METHOD_LABELS).index)}
        text = " ".join(f"--{flag} {','.join(map(str, values))}" for flag, values in flags.items())
        model = f" --model {args.model}" if args.model != EMBEDDED_MODEL else ""
        return (f"`.venv/bin/python -m bench.bench_quantize {text} --samples {args.samples} --seqlen {args.seqlen} "
                f"--tokens {args.tokens}{model}`")

    def text(self, header: list[str]) -> str:
        rows = [self.rows[key] for key in sorted(self.rows, key=RowKey.order)]
        body = header + [self.fp_line, "", COLUMNS, "|---|---|---|---|---|---|---|---|---|"] + rows
        return "\n".join(body) + "\n" + (f"\n{self.reading}\n" if self.reading else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", default="4,3,2")
    parser.add_argument("--groups", default="64,0", help="group sizes, 0 = per channel")
    parser.add_argument("--methods", default="rtn,gptq,attention")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=16384, help="evaluation tokens (windows of 512)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="hub id, local directory or .gguf file")
    args = parser.parse_args()

    loaded = load_model(args.model, device=os.environ.get("APTQ_DEVICE"))
    corpus = load_corpus("brown")
    sampling = Sampling(args.samples, args.seqlen, 0)
    evaluation = EvalSettings(512, args.tokens)
    store = Store()
    protocol = (f"- model: {loaded.display_name} (baseline {loaded.baseline_label}); calibration: Brown calibration "
                f"split, {args.samples} × {args.seqlen} tokens, seed 0; evaluation: Brown evaluation split, windows of "
                f"512, first {args.tokens} tokens; asymmetric grid with the clipping search; GPTQ blocks of 128 "
                f"columns, 1 % damping")
    for group in (int(g) for g in args.groups.split(",")):
        for bits in (int(b) for b in args.bits.split(",")):
            for method in args.methods.split(","):
                progress, close = tqdm_progress(f"{method} {bits}-bit g{group}")
                try:
                    row = run_plan(loaded, corpus, sampling, uniform_plan(loaded.arch, bits),
                                   QuantizeSettings(method, group), evaluation, store, progress,
                                   {"allocation": "uniform", "budget": bits})
                finally:
                    close()
                # Read again before writing: the reading below the table may have been edited meanwhile.
                table = Table.read(args.output, protocol)
                table.fp_line = (f"- full precision ({loaded.baseline_label}): perplexity {row.fp_perplexity:.3f} "
                                 f"over {row.eval_tokens} predicted tokens")
                origin = " (stored run)" if row.cached else ""
                line = (f"| {METHOD_LABELS[method]} | {bits} | {group or 'per-channel'} | {row.perplexity:.3f} | "
                        f"{row.kl:.4f} | {row.top1:.4f} | {row.quant_seconds:.1f}{origin} | {row.eval_seconds:.1f} | "
                        f"{row.notes or ''} |")
                table.rows[RowKey(method, bits, group)] = line
                groups = ", ".join(dict.fromkeys(str(key.group) for key in sorted(table.rows, key=RowKey.order)))
                header = [
                    "# Quantization engine benchmark", "",
                    f"- date: {time.strftime('%Y-%m-%d')}; machine: {os.cpu_count()} cores, "
                    f"{platform.processor() or 'CPU'}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                    f"device {loaded.device} (of the last invocation)",
                    f"- command: {table.command(args)}",
                    protocol,
                    f"- hidden size {loaded.arch.hidden_size}; default group size "
                    f"{default_group_size(loaded.arch)} (default_group_size); group sizes measured: {groups} "
                    f"(0 = per channel)", "",
                ]
                args.output.write_text(table.text(header))
                print(line, flush=True)


if __name__ == "__main__":
    main()
