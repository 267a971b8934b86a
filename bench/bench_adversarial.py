"""The adversarial command-line probes of tests/test_adversarial.py against one or more source trees, each probe
classified by what the tree's `aptq.cli.main` did with it:

    refused    exit code 2 with one line on stderr, the store unchanged (the goal)
    clumsy     exit code 2, but several lines (argparse's usage) or no final full stop
    traceback  an exception escaped main()
    accepted   exit code 0: the bad value was silently replaced, or work was done on bad input
    changed    the store's bytes changed although the command failed

    PYTHONPATH=. .venv/bin/python bench/bench_adversarial.py [OLD_TREE]

Each tree runs in its own child process (its modules under its own path) from a scratch directory, over the same
probe files (tiny models, made once by this tree). Writes bench/results/adversarial.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from tests.test_adversarial import PROBES, make_paths, probe_argv
from tests.tiny_models import save_tiny_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "adversarial.md"

CHILD = """
import contextlib, hashlib, io, json, os, sys
tree, probes, store, out = sys.argv[1:5]
sys.path.insert(0, tree)
from aptq.cli import main
digest = lambda: hashlib.sha256(open(store, "rb").read()).hexdigest() if os.path.exists(store) else None
results = []
for argv in json.loads(open(probes).read()):
    before, err = digest(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:
            code = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    results.append({"code": code, "stderr": err.getvalue(), "changed": digest() != before})
open(out, "w").write(json.dumps(results))
"""


def classify(result: dict) -> str:
    if isinstance(result["code"], str):
        return "traceback"
    if result["code"] == 0:
        return "accepted"
    if result["changed"]:
        return "changed"
    lines = result["stderr"].strip().splitlines()
    return "refused" if len(lines) == 1 and lines[0].endswith(".") else "clumsy"


def run_tree(tree: Path, argvs: list[list[str]], store: Path, scratch: Path) -> list[dict]:
    probes, out = scratch / "probes.json", scratch / f"results-{abs(hash(str(tree)))}.json"
    probes.write_text(json.dumps(argvs))
    work = scratch / f"cwd-{abs(hash(str(tree)))}"  # `--export .` probes point here
    work.mkdir()
    subprocess.run([sys.executable, "-c", CHILD, str(tree), str(probes), str(store), str(out)], cwd=work, check=True,
                   env=os.environ | {"OMP_NUM_THREADS": "1"})
    return json.loads(out.read_text())


def main() -> None:
    trees = [Path(t).resolve() for t in sys.argv[1:]] + [ROOT]
    rows = []
    for tree in trees:
        with tempfile.TemporaryDirectory() as scratch_dir:
            scratch = Path(scratch_dir)
            paths = make_paths(scratch / "probes", save_tiny_model("llama", scratch / "llama"),
                               save_tiny_model("gpt2", scratch / "gpt2"))
            argvs = [probe_argv(command, arguments, paths) for command, arguments, _ in PROBES]
            results = run_tree(tree, argvs, paths.store, scratch)
        kinds = [classify(r) for r in results]
        rows.append((tree, Counter(kinds), [(p, k, r) for p, k, r in zip(PROBES, kinds, results) if k != "refused"]))
    lines = ["# Adversarial command-line probes", "",
             f"{len(PROBES)} probes from tests/test_adversarial.py (`PYTHONPATH=. .venv/bin/python "
             f"bench/bench_adversarial.py [OLD_TREE]`), run in-process through each tree's `aptq.cli.main` on tiny "
             f"models; other jobs were running on the machine (timing plays no part here).", "",
             "| tree | refused (goal) | clumsy | traceback | accepted (exit 0) | store changed |",
             "|---|---|---|---|---|---|"]
    for tree, counts, _ in rows:
        lines.append(f"| `{tree.name}` | {counts['refused']} | {counts['clumsy']} | {counts['traceback']} | "
                     f"{counts['accepted']} | {counts['changed']} |")
    for tree, _, bad in rows:
        lines += ["", f"## Not refused in one sentence: `{tree.name}` ({len(bad)})", ""]
        lines += [f"- `{command} {arguments}` → {kind}: "
                  f"{result['code'] if kind == 'traceback' else result['stderr'].strip().splitlines()[-1:]}"
                  for (command, arguments, _), kind, result in bad]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
