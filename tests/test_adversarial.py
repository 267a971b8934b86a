"""Adversarial input through the real command line and the dashboard: every probe must end with exit code 2 and one
sentence on stderr (no traceback), before any work, leaving the store byte for byte as it was. Ctrl-C at any moment
ends with one line and code 130; `--help` and argument errors do not import torch.

Probes run through `aptq.cli.main(argv)` in-process (fast: the tiny models load in a fraction of a second); the ones
about interpreter start-up (Ctrl-C, imports) run `python -m aptq` in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from streamlit.testing.v1 import AppTest
from transformers import AutoModelForCausalLM

from aptq import analyses
from aptq.cli import INTERRUPTED, main
from aptq.store import Store
from tests.tiny_models import tiny_config

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app.py"


@dataclass(frozen=True)
class Paths:
    """Everything a probe may name: good inputs to combine with one bad one, and bad files of every kind."""

    model: Path  # tiny llama, context 256
    gpt2: Path  # tiny GPT-2, learned positions up to 256
    corpus: Path
    store: Path
    tmp: Path

    def __getitem__(self, name: str) -> str:  # lets probes write "{tmp}/x" templates
        return str(getattr(self, name))


def _copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _edit_weights(directory: Path, edit) -> Path:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return directory


def _edit_config(directory: Path, **changes) -> Path:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | changes))
    return directory


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_model_dir) -> Paths:
    return make_paths(tmp_path_factory.mktemp("adversarial"), tiny_model_dir("llama"), tiny_model_dir("gpt2"))


def make_paths(tmp: Path, model: Path, gpt2: Path) -> Paths:
    """The probes' files under `tmp`, around a tiny llama and a tiny GPT-2 (also used by bench/bench_adversarial.py)."""
    tmp.mkdir(parents=True, exist_ok=True)
    corpus = tmp / "text.txt"
    corpus.write_text("\n\n".join(f"Sentence {i} of a small corpus about foxes and dogs." for i in range(300)))
    store = tmp / "store" / "aptq.duckdb"
    store.parent.mkdir()
    earlier = Store(store)
    earlier.add_schema(analyses.SCHEMA)  # a store that already holds a result: the probes must leave it unchanged
    earlier.execute("INSERT INTO models (fingerprint, name) VALUES ('f', 'a model measured earlier')")

    # Bad files of every kind the probes name.
    (tmp / "empty_dir").mkdir()
    (tmp / "file.txt").write_text("not a directory")
    (tmp / "empty.txt").write_text("")
    (tmp / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (tmp / "short.txt").write_text("Too short to calibrate on.")
    (tmp / "not_json.json").write_text("{layers: 3")
    (tmp / "list.json").write_text("[2, 3, 4]")
    (tmp / "string_bits.json").write_text(json.dumps({"model.layers.0.self_attn.q_proj": "3"}))
    (tmp / "bool_bits.json").write_text(json.dumps({"model.layers.0.self_attn.q_proj": True}))
    (tmp / "unknown_layer.json").write_text(json.dumps({"transformer.h.0.attn.c_attn.q": 3}))
    (tmp / "nine_bits.json").write_text(json.dumps({"model.layers.0.self_attn.q_proj": 9}))
    (tmp / "all_fp16.json").write_text(json.dumps({}))
    (tmp / "exists").mkdir()
    (tmp / "blocked.partial").write_text("a file where the export stages its files")
    (tmp / "no_config").mkdir()
    (tmp / "no_config" / "model.safetensors").write_bytes(b"")
    missing = _copy_model(model, tmp / "missing_tensor")
    _edit_weights(missing, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    extra = _copy_model(model, tmp / "extra_tensor")
    _edit_weights(extra, lambda t: t.update({"model.layers.7.mlp.down_proj.weight": torch.zeros(2, 2)}))
    (_copy_model(model, tmp / "garbage_weights") / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    _edit_config(_copy_model(model, tmp / "bloom"), model_type="bloom", architectures=["BloomForCausalLM"])
    ((_copy_model(model, tmp / "bad_config")) / "config.json").write_text("{not json")
    _edit_config(_copy_model(model, tmp / "short_context"), max_position_embeddings=32)
    other_vocab = tiny_config("llama")
    other_vocab.vocab_size = 1000
    AutoModelForCausalLM.from_config(other_vocab).save_pretrained(str(tmp / "other_vocab"))
    for name in model.iterdir():  # the same tokenizer files: only the output vocabulary differs
        if name.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(name, tmp / "other_vocab" / name.name)
    return Paths(model, gpt2, corpus, store, tmp)


# Valid arguments of each command, small enough that a probe which slipped through would still finish quickly;
# each probe adds its one bad argument after them (argparse keeps the last value given).
BASE = {
    "eval": "--model {model} --corpus {corpus} --device cpu --seqlen 16 --tokens 64",
    "analyze": "--model {model} --corpus {corpus} --device cpu --store {store} --samples 2 --seqlen 16",
    "quantize": "--model {model} --corpus {corpus} --device cpu --store {store} --samples 2 --seqlen 16 "
                "--method rtn --eval-seqlen 16 --tokens 64",
    "sweep": "--model {model} --corpus {corpus} --device cpu --store {store} --samples 2 --seqlen 16 "
             "--eval-seqlen 16 --tokens 64 --methods uniform --budgets 4 --quantizer rtn",
}

# (command, the bad arguments, a fragment the one sentence must contain)
PROBES = [
    # calibration sizes: zero and negative were silently replaced by the defaults or crashed
    ("analyze", "--samples 0", "at least 1"),
    ("analyze", "--samples -3", "at least 1"),
    ("analyze", "--seqlen 0", "at least 2"),
    ("analyze", "--seqlen 1", "at least 2"),
    ("analyze", "--batch-size 0", "--batch-size"),
    ("analyze", "--batch-size -2", "--batch-size"),
    ("analyze", "--max-blocks 0", "--max-blocks"),
    ("analyze", "--max-blocks 5", "has 2 blocks"),
    ("analyze", "--probes 0", "--probes"),
    ("analyze", "--group -4", "group size"),
    ("analyze", "--seed -1", "--seed"),
    ("analyze", "--seed 99999999999", "--seed"),
    ("analyze", "--samples abc", "invalid int"),
    # widths
    ("analyze", "--bits ,", "empty"),
    ("analyze", "--bits 1,4", "1 bits"),
    ("analyze", "--bits 3,9", "9 bits"),
    ("analyze", "--bits a,b", "integers"),
    # the model's context: RoPE models ran past it silently, learned positions crashed
    ("analyze", "--seqlen 257", "context of 256"),
    ("analyze", "--model {gpt2} --seqlen 300", "context of 256"),
    ("quantize", "--bits 4 --method gptq --seqlen 300", "context of 256"),
    ("sweep", "--seqlen 400", "context of 256"),
    ("eval", "--seqlen 257", "context of 256"),
    ("eval", "--model {gpt2} --seqlen 1024", "context of 256"),
    # devices
    ("analyze", "--device gpu", "Unknown device"),
    ("analyze", "--device tpu", "Unknown device"),
    ("analyze", "--device cuda:99", "cuda:99"),
    ("eval", "--device meta", "not supported"),
    ("eval", "--device ''", "Unknown device"),
    # corpora
    ("analyze", "--corpus {tmp}/empty_dir", "not a dataset"),
    ("eval", "--corpus {tmp}", "not a dataset"),
    ("analyze", "--corpus {tmp}/missing.txt", "does not exist"),
    ("analyze", "--corpus {tmp}/binary.txt", "not UTF-8"),
    ("analyze", "--corpus {tmp}/empty.txt", "empty"),
    ("analyze", "--corpus {tmp}/short.txt", "fewer than"),
    ("analyze", "--corpus wikitxt2", "Unknown corpus"),
    ("analyze", "--corpus ''", "No corpus"),
    ("eval", "--corpus /dev/null", "not a regular file"),
    ("eval", "--tokens 10", "window needs 16"),
    # models
    ("analyze", "--model {tmp}/missing_model", "does not exist"),
    ("analyze", "--model {tmp}/no_config", "no config.json"),
    ("analyze", "--model {tmp}/file.txt", "not a model directory"),
    ("analyze", "--model {tmp}/missing_tensor", "lack 1 tensor"),
    ("analyze", "--model {tmp}/extra_tensor", "unexpected"),
    ("eval", "--model {tmp}/garbage_weights", "Could not load"),
    ("analyze", "--model {tmp}/bloom", "lack"),  # llama weights under a BLOOM config: not its weights
    ("analyze", "--model {tmp}/bad_config", "no readable model config"),
    ("analyze", "--model {tmp}/missing.gguf", "does not exist"),
    ("analyze", "--model ''", "--model is empty"),
    ("eval", "--reference {tmp}/other_vocab", "another vocabulary"),
    ("eval", "--reference {tmp}/missing_tensor", "lack 1 tensor"),
    ("eval", "--reference {tmp}/short_context --seqlen 64", "context of 32"),
    ("eval", "--reference ''", "--reference is empty"),
    # the store path
    ("analyze", "--store {tmp}/empty_dir", "is a directory"),
    ("analyze", "--store {tmp}/file.txt/aptq.duckdb", "is a file"),
    # evaluation settings
    ("eval", "--seqlen 1", "at least 2"),
    ("eval", "--tokens -5", "--tokens"),
    ("eval", "--batch-size 0", "--batch-size"),
    ("quantize", "--bits 4 --eval-seqlen 1", "at least 2"),
    ("quantize", "--bits 4 --eval-seqlen 300", "context of 256"),
    ("quantize", "--bits 4 --tokens -1", "--tokens"),
    # plans and widths
    ("quantize", "", "either --bits"),
    ("quantize", "--bits 4 --plan {tmp}/all_fp16.json", "either --bits"),
    ("quantize", "--bits 1", "1 bits"),
    ("quantize", "--bits 16", "16 bits"),
    ("quantize", "--bits 4 --group -1", "group size"),
    ("quantize", "--bits 4 --method bogus", "invalid choice"),
    ("quantize", "--plan {tmp}/missing.json", "does not exist"),
    ("quantize", "--plan {tmp}/not_json.json", "not readable JSON"),
    ("quantize", "--plan {tmp}", "not readable JSON"),
    ("quantize", "--plan {tmp}/list.json", "must map layer names"),
    ("quantize", "--plan {tmp}/string_bits.json", "must map layer names"),
    ("quantize", "--plan {tmp}/bool_bits.json", "must map layer names"),
    ("quantize", "--plan {tmp}/unknown_layer.json", "does not have"),
    ("quantize", "--plan {tmp}/nine_bits.json", "9 bits"),
    ("quantize", "--plan {tmp}/all_fp16.json", "nothing to quantize"),
    # export targets: found only after the whole quantization before
    ("quantize", "--bits 4 --export {tmp}/file.txt", "is a file"),
    ("quantize", "--bits 4 --export {tmp}/file.txt --overwrite", "is a file"),
    ("quantize", "--bits 4 --export {tmp}/file.txt/out", "is a file"),
    ("quantize", "--bits 4 --export . --overwrite", "current directory"),
    ("quantize", "--bits 4 --export / --overwrite", "current directory"),
    ("quantize", "--bits 4 --export {tmp}/exists", "already exists"),
    ("quantize", "--bits 4 --export /proc/aptq-export", "not writable"),
    ("quantize", "--bits 4 --export {tmp}/blocked", "in the way"),
    ("quantize", "--bits 4 --export ''", "export directory is empty"),
    # sweeps: empty or out-of-range budgets ended with exit code 0 and nothing done
    ("sweep", "--budgets ,", "No budget"),
    ("sweep", "--budgets inf", "outside"),
    ("sweep", "--budgets nan", "outside"),
    ("sweep", "--budgets 9,10", "outside"),
    ("sweep", "--budgets 1.5", "outside"),
    ("sweep", "--budgets 2:4:0", "start:stop:step"),
    ("sweep", "--budgets 4:2:0.5", "start:stop:step"),
    ("sweep", "--budgets 2:4:1e-9", "more than 1000"),
    ("sweep", "--budgets 2:inf:0.5", "more than 1000"),
    ("sweep", "--budgets abc", "start:stop:step"),
    ("sweep", "--methods ,", "(none)"),
    ("sweep", "--methods knapsack,bogus", "bogus"),
    ("sweep", "--candidates ,", "empty"),
    ("sweep", "--candidates 2,9", "9 bits"),
    ("sweep", "--methods random --seeds ,", "--seeds is empty"),
    ("sweep", "--methods random --seeds -1", "--seeds"),
    ("sweep", "--quantizer bogus", "invalid choice"),
    ("sweep", "--eval-seqlen 0", "at least 2"),
    # last: a tree without the checks replaces these directories (bench/bench_adversarial.py runs the list in order)
    ("quantize", "--bits 4 --export {model} --overwrite", "which this run reads"),
    ("quantize", "--bits 4 --export {tmp}/store --overwrite", "which this run reads"),
]


def probe_argv(command: str, arguments: str, paths: Paths) -> list[str]:
    return [command] + shlex.split(BASE[command].format_map(paths)) + shlex.split(arguments.format_map(paths))


def _snapshot(paths: Paths) -> dict[str, object]:
    """What a probe must leave as it was: the store's bytes, and every entry under the probes' directory."""
    listing = {str(p.relative_to(paths.tmp)): p.stat().st_size for p in paths.tmp.rglob("*")}
    return {"store": hashlib.sha256(paths.store.read_bytes()).hexdigest(), "files": listing}


@pytest.mark.parametrize("command, arguments, expected", PROBES, ids=[f"{c} {a}" for c, a, _ in PROBES])
def test_bad_input_is_refused_in_one_sentence_before_any_work(paths, capsys, command, arguments, expected):
    argv = probe_argv(command, arguments, paths)
    before = _snapshot(paths)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("."), err
    assert "Traceback" not in err and expected in lines[0], err
    assert out == ""
    assert _snapshot(paths) == before


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


# --help and argument errors, each answered before any heavy module is imported
LIGHT_PROBES = [["--help"], ["quantize", "--help"], ["sweep", "--help"], ["analyze", "--samples", "0"],
                ["quantize", "--bits", "9"], ["sweep", "--budgets", "inf"], ["eval", "--bogus"]]


def test_help_and_argument_errors_import_no_heavy_module():
    done = _python(f"import sys\n"
                   f"from aptq.cli import main\n"
                   f"for argv in {LIGHT_PROBES!r}:\n"
                   f"    try:\n"
                   f"        main(argv)\n"
                   f"    except SystemExit:\n"
                   f"        pass\n"
                   f"print(sorted(m for m in ('torch', 'scipy', 'transformers', 'numpy', 'pandas', 'duckdb') "
                   f"if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "usage: python -m aptq quantize" in done.stdout and "--overwrite" in done.stdout


def _interrupt(argv: list[str], store: Path, wait) -> tuple[int, str]:
    """Run `python -m aptq argv`, send SIGINT once `wait(stderr so far)` says so, and return (code, stderr)."""
    log = store.with_suffix(".stderr")
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "aptq", *argv, "--store", str(store)], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=stderr, env=os.environ | {"OMP_NUM_THREADS": "1"})
        try:
            while not wait(log.read_text()) and process.poll() is None:
                time.sleep(0.05)
            process.send_signal(signal.SIGINT)
            code = process.wait(timeout=120)
        finally:
            process.kill()
    return code, log.read_text()


@pytest.mark.integration
def test_ctrl_c_at_any_moment_is_one_line_and_code_130(tmp_path):
    """SIGINT while the modules import (torch takes seconds), and in the middle of an analysis of the embedded model
    (long enough never to finish first): code 130, one last line, no traceback, the analysis marked interrupted."""
    argv = ["analyze", "--device", "cpu", "--samples", "8", "--seqlen", "256", "--max-blocks", "3"]
    start = time.monotonic()
    code, err = _interrupt(argv, tmp_path / "early.duckdb", lambda _: time.monotonic() - start > 0.3)
    assert code == 130 and err.strip().splitlines() == ["interrupted before any work started"], err
    store = tmp_path / "working.duckdb"
    code, err = _interrupt(argv, store, lambda text: "analyzing blocks" in text)
    assert code == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == INTERRUPTED, err
    assert Store(store).query("SELECT status FROM analyses")["status"].tolist() == ["interrupted"]


# ---- the dashboard ------------------------------------------------------------------------------------------------

SAME_PATH_AS_SENSITIVITY = pytest.param("pages/2_Bit_budget.py", marks=pytest.mark.integration)
SAME_PATH_AS_QUANTIZE = pytest.param("pages/4_Trade_offs.py", marks=pytest.mark.integration)


@pytest.fixture
def dashboard(paths, tmp_path, monkeypatch):
    """A new session on the tiny model and the probes' corpus, over an empty store of its own."""
    monkeypatch.setenv("APTQ_STORE", str(tmp_path / "store.duckdb"))

    def session(page: str | None = None, **state) -> AppTest:
        at = AppTest.from_file(str(APP), default_timeout=60)
        at.session_state["model_source"] = str(paths.model)
        at.session_state["corpus_spec"] = str(paths.corpus)
        for key, value in state.items():
            at.session_state[key] = value
        at.run()
        return at.switch_page(page).run() if page else at
    return session


def _errors(at: AppTest) -> str:
    assert not at.exception, [e.value for e in at.exception]
    return " ".join(e.value for e in at.error)


@pytest.mark.integration
def test_home_refuses_a_directory_as_corpus_without_carrying_it_to_other_pages(dashboard, paths):
    at = dashboard()
    assert _errors(at) == ""
    next(s for s in at.selectbox if s.label == "Corpus").set_value("file")
    next(t for t in at.text_input if t.label.startswith("Text file")).set_value(str(paths.tmp / "empty_dir"))
    next(b for b in at.button if b.label == "Use this model and corpus").click().run()
    assert "not a dataset" in _errors(at)
    assert at.session_state["corpus_spec"] == str(paths.corpus)  # the previous choice stays
    next(t for t in at.text_input if t.label == "Model").set_value(str(paths.tmp / "missing_tensor"))
    next(s for s in at.selectbox if s.label == "Corpus").set_value("brown")
    next(b for b in at.button if b.label == "Use this model and corpus").click().run()
    assert "lack 1 tensor" in _errors(at) and at.session_state["model_source"] == str(paths.model)
    for page in ("pages/1_Sensitivity.py", "pages/2_Bit_budget.py", "pages/3_Quantize.py", "pages/4_Trade_offs.py"):
        assert _errors(at.switch_page(page).run()) == "", page


# The unit set keeps one page of each path (Home; ui.session.current_analysis; model_and_corpus_or_stop).
@pytest.mark.parametrize("page", ["app.py", "pages/1_Sensitivity.py", SAME_PATH_AS_SENSITIVITY, "pages/3_Quantize.py",
                                  SAME_PATH_AS_QUANTIZE])
def test_every_page_explains_an_unusable_corpus_in_one_error(dashboard, paths, page):
    """A session whose corpus became unusable (here a directory; e.g. a file replaced since it was chosen)."""
    at = dashboard(None if page == "app.py" else page, corpus_spec=str(paths.tmp / "empty_dir"))
    assert len(at.error) == 1 and "not a dataset" in _errors(at)


# The unit set keeps the targets that depend on the page's inputs (the overwrite box, the model it reads); the
# others are aptq.validate's own checks, each also a CLI probe above.
@pytest.mark.parametrize("target, overwrite, expected", [
    pytest.param("{tmp}/file.txt", True, "is a file", marks=pytest.mark.integration),
    pytest.param(".", True, "current directory", marks=pytest.mark.integration),
    ("{tmp}/exists", False, "already exists"),
    ("{model}", True, "which this run reads")])
def test_the_quantize_page_checks_the_export_directory_before_starting(dashboard, paths, target, overwrite, expected):
    at = dashboard("pages/3_Quantize.py")
    assert _errors(at) == ""
    at.selectbox(key="run_plan_choice").set_value("uniform")
    at.text_input(key="run_export_dir").set_value(target.format_map(paths))
    at.checkbox(key="run_overwrite").set_value(overwrite)
    next(b for b in at.button if b.label.startswith("Quantize and evaluate")).click().run()
    assert expected in _errors(at)
    assert "last_run" not in at.session_state  # no job was started
