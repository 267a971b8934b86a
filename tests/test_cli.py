import json
import subprocess
import sys

import pytest

from tests.tiny_models import save_tiny_model


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aptq", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_eval_on_a_local_model_and_text_file(tmp_path):
    model = save_tiny_model("opt", tmp_path / "model")
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"This is sentence {i} of a small test corpus." for i in range(400)))
    done = run_cli("eval", "--model", str(model), "--corpus", str(text), "--seqlen", "32", "--tokens", "128",
                   "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["windows"] == 4 and record["tokens"] == 4 * 31 and record["perplexity"] > 1


@pytest.mark.integration
def test_bad_input_is_one_sentence_and_exit_code_2(tmp_path):
    done = run_cli("eval", "--model", str(tmp_path / "missing"))
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: Model path") and "Traceback" not in done.stderr
    done = run_cli("eval", "--corpus", str(tmp_path / "missing.txt"), "--device", "cpu")
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr


def test_the_default_calibration_length_is_cut_to_a_short_context(tmp_path, tiny_model_dir, capsys):
    """The CPU default of 512 tokens per segment would run past the tiny model's context of 256; it is cut to it
    (an explicit --seqlen past the context is refused instead, see tests/test_adversarial.py)."""
    from aptq.cli import main

    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"This is sentence {i} of a small test corpus." for i in range(400)))
    code = main(["quantize", "--model", str(tiny_model_dir("llama")), "--corpus", str(text), "--device", "cpu",
                 "--store", str(tmp_path / "store.duckdb"), "--method", "gptq", "--bits", "4", "--samples", "2",
                 "--eval-seqlen", "32", "--tokens", "128", "--json"])
    assert code == 0
    assert json.loads(json.loads(capsys.readouterr().out)["settings"])["seqlen"] == 256
