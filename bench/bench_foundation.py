"""Foundation figures: embedded-model load times and full-precision perplexity on the Brown evaluation split.

    .venv/bin/python bench/bench_foundation.py [--seqlens 512,2048] [--tokens 0]

The first load converts the GGUF file into a fresh cache directory (APTQ_CACHE_DIR is pointed at a temporary folder
for that measurement); the cached load is timed in a new process, as a user starting the dashboard would see it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Prints the import time of aptq.models (torch, transformers), the first load_model (which also imports the modeling
# code transformers loads lazily) and a second load_model in the same process (what the dashboard sees afterwards).
LOAD_SNIPPET = ("import time; t = time.perf_counter(); from aptq.models import load_model; i = time.perf_counter() - t;"
                " t = time.perf_counter(); load_model(device='cpu'); f = time.perf_counter() - t;"
                " t = time.perf_counter(); load_model(device='cpu'); print(i, f, time.perf_counter() - t)")


def timed_load(cache_dir: str) -> tuple[float, float, float]:
    """(import s, first load s, second load s) in a new process."""
    env = os.environ | {"APTQ_CACHE_DIR": cache_dir, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", LOAD_SNIPPET], env=env, capture_output=True, text=True, check=True)
    imported, first, second = out.stdout.strip().splitlines()[-1].split()
    return float(imported), float(first), float(second)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlens", default="512,2048")
    parser.add_argument("--tokens", type=int, default=0, help="0 = the whole evaluation split")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from aptq.data import evaluation_windows, load_corpus, token_ids
    from aptq.evaluate import evaluate
    from aptq.models import load_model

    with tempfile.TemporaryDirectory() as fresh:
        first = timed_load(fresh)
        cached = [timed_load(fresh) for _ in range(3)]
    loaded = load_model(device="cpu")
    corpus = load_corpus("brown")
    ids = token_ids(loaded.tokenizer, corpus, "evaluation")
    rows = []
    for seqlen in (int(s) for s in args.seqlens.split(",")):
        result = evaluate(loaded.model, evaluation_windows(ids, seqlen, args.tokens or None))
        rows.append(result.as_dict())
        print(json.dumps(rows[-1]), flush=True)
    lines = [
        "# Foundation benchmark", "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        f"- command: `.venv/bin/python bench/bench_foundation.py --seqlens {args.seqlens} --tokens {args.tokens}`", "",
        "## Embedded model load (SmolLM2-135M-Instruct)", "",
        f"- first load, converting GGUF → safetensors cache: {first[1]:.1f} s (after {first[0]:.1f} s of imports)",
        f"- cached load in a new process (3 runs): {', '.join(f'{c[1]:.2f} s' for c in cached)}, of which most is "
        f"transformers importing its modeling code on first use; importing torch and transformers before it: "
        f"{', '.join(f'{c[0]:.2f} s' for c in cached)}",
        f"- cached load again in the same process (the dashboard's case after its first page): "
        f"{', '.join(f'{c[2]:.2f} s' for c in cached)}", "",
        f"## Full-precision ({loaded.baseline_label}) perplexity, Brown evaluation split ({ids.numel()} tokens)", "",
        "| window | windows | predicted tokens | perplexity | seconds | tokens/s |", "|---|---|---|---|---|---|",
    ] + [f"| {r['seqlen']} | {r['windows']} | {r['tokens']} | {r['perplexity']:.3f} | {r['seconds']:.0f} | "
         f"{r['tokens_per_second']:.0f} |" for r in rows]
    (ROOT / "bench" / "results" / "foundation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
