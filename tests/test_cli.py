import json
import re
import subprocess
import sys

import pytest

from tests.tiny_models import save_tiny_model


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aptq", *args], capture_output=True, text=True, timeout=300)


def refused_in_one_line(capsys, argv: list[str], message: str) -> str:
    """`main(argv)` exits with 2 and prints one line that starts with `error: message`; that line."""
    from aptq.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    return err


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


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"This is sentence {i} of a small test corpus." for i in range(400)))
    return path


def analysis_key_in(out: str) -> str:
    return re.search(r"analysis (\w+) \(tables", out).group(1)


@pytest.mark.integration
def test_analyze_predicts_errors_at_extra_group_sizes(tmp_path, tiny_model_dir, text_file, capsys):
    from aptq import analyses
    from aptq.cli import main
    from aptq.store import Store

    store = tmp_path / "store.duckdb"
    common = ["analyze", "--model", str(tiny_model_dir("llama")), "--corpus", str(text_file), "--device", "cpu",
              "--store", str(store), "--samples", "4", "--seqlen", "24", "--group", "32", "--bits", "2,3",
              "--max-blocks", "1"]
    capsys.readouterr()  # the tiny model's writing, when this test made it
    for bad, message in ((["--extra-group-sizes", "16,x"], "Argument --extra-group-sizes: group sizes must be integers "
                                                          "separated by commas, got '16,x'; see"),
                         (["--extra-group-sizes=16,-8"], "The group size must be 0 (per output channel) or a positive "
                                                         "number of columns, got -8."),
                         (["--extra-group-sizes=0,128"], "The group size 128 does not divide the 64 input columns of "
                                                         "model.layers.0.self_attn.q_proj; use a divisor of 32")):
        refused_in_one_line(capsys, [*common, *bad], message)
    assert not store.exists()  # refused before any work
    assert main([*common, "--extra-group-sizes", "0,16"]) == 0
    _, errors = analyses.load(Store(store), analysis_key_in(capsys.readouterr().out))
    assert sorted(set(errors["group_size"])) == [0, 16, 32] and errors["err_layerwise"].notna().all()


@pytest.mark.integration
def test_analyze_calibrates_the_unit_and_refuses_a_calibration_too_short(tmp_path, tiny_model_dir, text_file,
                                                                         capsys):
    from aptq import analyses
    from aptq.calibrate import UnitSettings
    from aptq.cli import main
    from aptq.store import Store

    store = tmp_path / "store.duckdb"
    common = ["analyze", "--model", str(tiny_model_dir("llama")), "--corpus", str(text_file), "--device", "cpu",
              "--store", str(store), "--seqlen", "24", "--group", "32", "--max-blocks", "1", "--calibrate-unit"]
    capsys.readouterr()
    for bad, message in ((["--samples", "4"], "The calibration has 4 segment(s), too few to hold out a validation "
                                              "part of 2 segments at 25%; use at least 8 calibration segments"),
                         (["--samples", "8", "--bits", "2,4"], "The unit calibration sizes its noise like each "
                                                               "layer's RTN error at [3] bits; add them to the")):
        refused_in_one_line(capsys, [*common, *bad], message)
    assert not store.exists()  # refused before the analysis
    assert main([*common, "--samples", "8", "--bits", "2,3"]) == 0
    out = capsys.readouterr().out
    assert "Calibrated unit: KL per unit of error of 7 layers" in out and "last 2 of 8 calibration segments" in out
    units = analyses.load_units(Store(store), UnitSettings().key(analysis_key_in(out)))
    assert len(units) == 7 and (units["kl_rate"] >= 0).all() and units["kl_rate_se"].notna().all()


def tiny_sweep(model_dir: str, text_file, store, *options: str) -> list[str]:
    """A knapsack sweep at 3 bits of the tiny model, evaluated on 64 tokens, with `options` added."""
    return ["sweep", "--model", model_dir, "--corpus", str(text_file), "--device", "cpu", "--store", str(store),
            "--seqlen", "24", "--group", "32", "--methods", "knapsack", "--budgets", "3", "--eval-seqlen", "32",
            "--tokens", "64", *options]


@pytest.mark.integration
def test_sweep_plans_with_the_quantizers_errors_or_says_it_uses_rtns(tmp_path, tiny_model_dir, text_file, capsys):
    from aptq.cli import main

    common = tiny_sweep(str(tiny_model_dir("llama")), text_file, tmp_path / "store.duckdb", "--samples", "4",
                        "--quantizer", "gptq", "--candidates", "2,4")
    assert main(common) == 0
    captured = capsys.readouterr()
    assert "The analysis has no predicted errors of GPTQ, so the plans use RTN's; rerun the analysis with quantizer " \
           "errors on (aptq analyze --quantizer-errors) to plan with GPTQ's." in captured.err
    assert "error_source" in captured.out and " rtn " in captured.out
    assert main([*common, "--quantizer-errors"]) == 0
    captured = capsys.readouterr()
    assert "no predicted errors" not in captured.err and " gptq " in captured.out


@pytest.mark.integration
def test_sweep_with_pairs_quantizes_each_plan_on_its_chosen_group_sizes(tmp_path, tiny_model_dir, text_file,
                                                                         capsys):
    from aptq.cli import main
    from aptq.history import stored_runs
    from aptq.store import Store

    store = tmp_path / "store.duckdb"
    common = tiny_sweep(str(tiny_model_dir("llama")), text_file, store, "--samples", "4", "--quantizer", "gptq",
                        "--quantizer-errors", "--candidates", "2,3,4", "--pairs")
    capsys.readouterr()
    for extra, message in ((["--methods", "knapsack"], "--pairs chooses among group sizes: give the others with "
                                                       "--extra-group-sizes"),
                           (["--extra-group-sizes", "16,0", "--methods", "knapsack,uniform"],
                            "--pairs is for the knapsack methods (knapsack, knapsack-layerwise), not uniform"),
                           (["--extra-group-sizes", "16", "--group", "64"],  # every pair plan uses the main group
                            "The group size 64 does not divide the 96 input columns of model.layers.0.mlp.down_proj")):
        refused_in_one_line(capsys, [*common, *extra], message)
    assert not store.exists()  # refused before any work
    assert main([*common, "--extra-group-sizes", "16,0", "--budgets", "3.6"]) == 0
    (run,) = stored_runs(Store(store)).itertuples()
    settings = json.loads(run.settings)
    assert run.effective_bits <= 3.6 + 1e-9 and settings["layer_groups"]  # some layer left the sweep's group 32
    assert set(settings["layer_groups"].values()) <= {16, 0}


@pytest.mark.integration
def test_sweep_plans_in_the_calibrated_unit(tmp_path, tiny_model_dir, text_file, capsys):
    from aptq.cli import main
    from aptq.history import stored_plans
    from aptq.store import Store

    store = tmp_path / "store.duckdb"
    common = tiny_sweep(str(tiny_model_dir("llama")), text_file, store, "--quantizer", "rtn", "--candidates", "2,3,4",
                        "--unit", "calibrated")
    capsys.readouterr()
    assert main([*common, "--samples", "4"]) == 2
    assert capsys.readouterr().err.startswith("error: The calibration has 4 segment(s), too few to hold out")
    assert not store.exists()
    assert main([*common, "--samples", "8"]) == 0
    assert "Calibrated unit: KL per unit of error of 14 layers" in capsys.readouterr().out
    (summary,) = stored_plans(Store(store))["summary"]
    assert json.loads(summary)["error_unit"] == "calibrated"


@pytest.mark.integration
def test_sweep_measures_the_width_multiples_first_and_plans_with_them(tmp_path, tiny_model_dir, text_file, capsys):
    from aptq.cli import main
    from aptq.history import stored_runs
    from aptq.store import Store

    store = tmp_path / "store.duckdb"
    common = tiny_sweep(str(tiny_model_dir("llama")), text_file, store, "--quantizer", "gptq", "--candidates",
                        "2,3,4,8", "--width-multiples")
    capsys.readouterr()
    assert main([*common, "--samples", "4"]) == 2
    assert capsys.readouterr().err.startswith("error: The calibration has 4 segment(s), too few to hold out")
    assert not store.exists()
    assert main([*common, "--samples", "8"]) == 0
    out = capsys.readouterr().out
    assert "Width multiples (held-out KL / predicted total of each uniform plan, gptq on the first 6 calibration " \
           "segments, KL on the other 2): 2 bits ×" in out and "4 bits ×" in out and "8 bits" not in out
    (unit,) = stored_runs(Store(store))["error_unit"]
    assert unit == "heuristic × width multiples"


@pytest.mark.integration
def test_sweep_with_pairs_measures_each_grids_multiples_and_prices_the_pairs_by_them(tmp_path, tiny_model_dir,
                                                                                       text_file, capsys):
    from aptq.cli import main
    from aptq.history import stored_plans
    from aptq.store import Store

    store = tmp_path / "store.duckdb"
    assert main(tiny_sweep(str(tiny_model_dir("llama")), text_file, store, "--quantizer", "rtn", "--candidates",
                           "2,3,4", "--samples", "8", "--pairs", "--extra-group-sizes", "0", "--budgets", "3.2",
                           "--width-multiples")) == 0
    out = capsys.readouterr().out
    assert "segments, KL on the other 2): 2 bits ×" in out and "; per channel: 2 ×" in out
    (summary,) = map(json.loads, stored_plans(Store(store))["summary"])
    assert summary["error_unit"] == "heuristic × width multiples per grid"
    assert set(summary["width_multiples"]) == {"2", "3", "4"} == set(summary["grid_multiples"]["0"])


@pytest.mark.parametrize("flag, setting, value, default", [(["--value-rows"], "value_rows", True, None),
                                                           (["--mlp-rows"], "mlp_rows", True, None),
                                                           (["--shrink", "0.5"], "shrink", 0.5, None),
                                                           (["--fp-targets", "0"], "fp_targets", None, 0.25),
                                                           (["--row-weights", "uniform"], "row_weights", None,
                                                            "attention"),
                                                           (["--act-order"], "act_order", True, 3),
                                                           (["--act-order", "off"], "act_order", False, 3),
                                                           (["--act-order", "4"], "act_order", 4, 3)])
def test_quantize_row_flags_reach_the_stored_runs_settings(tmp_path, tiny_model_dir, text_file, capsys, flag, setting,
                                                          value, default):
    """A setting at its value before it existed (None: absent) leaves the key as it was; every other value is in it."""
    from aptq.cli import main

    common = ["quantize", "--model", str(tiny_model_dir("llama")), "--corpus", str(text_file), "--device", "cpu",
              "--store", str(tmp_path / "store.duckdb"), "--method", "attention", "--bits", "4", "--samples", "2",
              "--seqlen", "32", "--eval-seqlen", "32", "--tokens", "64", "--json"]
    assert main([*common, *flag]) == 0
    flagged = json.loads(capsys.readouterr().out)
    assert json.loads(flagged["settings"]).get(setting) == value
    assert main(common) == 0  # without the flag: another run
    without = json.loads(capsys.readouterr().out)
    assert json.loads(without["settings"]).get(setting) == default and without["key"] != flagged["key"]


def test_quantize_weighs_by_post_norms_where_the_model_has_them_and_refuses_it_elsewhere_before_any_work(
        tmp_path, tiny_model_dir, text_file, capsys):
    from aptq.cli import main

    store = tmp_path / "store.duckdb"
    llama = tiny_model_dir("llama")
    capsys.readouterr()  # the tiny model's writing, when this test made it
    err = refused_in_one_line(capsys, ["quantize", "--model", str(llama), "--corpus", str(text_file), "--device",
                                       "cpu", "--store", str(store), "--method", "attention", "--bits", "4",
                                       "--output-norms", "on"], "This llama model does not normalise")
    assert "--output-norms" in err
    assert not store.exists()
    gemma = ["quantize", "--model", str(tiny_model_dir("gemma3_text")), "--corpus", str(text_file), "--device", "cpu",
             "--store", str(store), "--method", "attention", "--bits", "4", "--samples", "2", "--seqlen", "32",
             "--eval-seqlen", "32", "--tokens", "64", "--json"]
    assert main(gemma) == 0  # auto: on for a model with post-norms
    assert json.loads(json.loads(capsys.readouterr().out)["settings"])["output_norms"] is True
    assert main([*gemma, "--output-norms", "off"]) == 0
    assert "output_norms" not in json.loads(json.loads(capsys.readouterr().out)["settings"])


@pytest.mark.parametrize("text", ["1", "9", "all"])
def test_quantize_refuses_an_act_order_width_outside_two_to_eight_before_any_work(capsys, text):
    from aptq.cli import main

    assert main(["quantize", "--model", "no-such-model", "--bits", "3", "--act-order", text]) == 2
    assert capsys.readouterr().err.startswith("error: Argument --act-order: act-order applies from a width of 2–8 bits")


@pytest.mark.parametrize("flag, what", [("--shrink", "the shrinkage"),
                                        ("--fp-targets", "the share of the full-precision targets")])
@pytest.mark.parametrize("text", ["1.5", "-0.2", "half"])
def test_quantize_refuses_a_share_outside_zero_to_one_before_any_work(capsys, flag, what, text):
    from aptq.cli import main

    assert main(["quantize", "--model", "no-such-model", "--bits", "3", flag, text]) == 2
    assert capsys.readouterr().err.startswith(f"error: Argument {flag}: {what} must be a number from 0 to 1")


@pytest.mark.parametrize("text", ["-3", "2.5", "many"])
def test_quantize_refuses_block_refinement_steps_that_are_not_a_whole_number_before_any_work(capsys, text):
    from aptq.cli import main

    assert main(["quantize", "--model", "no-such-model", "--bits", "3", "--block-refinement", text]) == 2
    assert capsys.readouterr().err.startswith("error: Argument --block-refinement: the block refinement's steps must "
                                              "be a whole number ≥ 0")


@pytest.mark.parametrize("command", ["quantize", "sweep"])
def test_block_refinement_with_rtn_is_refused_before_any_work(capsys, command):
    """The model does not exist: the refusal comes before the model is looked for."""
    from aptq.cli import main

    method = ["--method", "rtn", "--bits", "3"] if command == "quantize" else ["--quantizer", "rtn"]
    assert main([command, "--model", "no-such-model", *method, "--block-refinement", "10"]) == 2
    assert capsys.readouterr().err.startswith("error: Block refinement fits calibration data, which RTN does not use")
