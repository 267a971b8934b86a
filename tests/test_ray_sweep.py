"""Sweeps on Ray (aptq.ray_sweep) on a tiny model: the rows the sequential sweep stores, on a local cluster and on a
head and a worker started by `ray start`; a worker killed mid-sweep is retried, and a run that fails for good is
reported while the others land. One local cluster serves the module (Ray starts slowly on two cores)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest

import aptq.pipeline as pipeline
from aptq.cli import main
from aptq.data import Corpus, Sampling
from aptq.errors import UserError
from aptq.history import stored_plans, stored_runs
from aptq.models import LoadedModel, load_model, model_fingerprint
from aptq.pipeline import EvalSettings, QuantizeSettings
from aptq.ray_sweep import AUTH_MODE, RayOptions, import_ray, ray_token_available, run_sweep_on_ray
from aptq.sensitivity import AnalysisSettings, analyze
from aptq.store import Store
from aptq.sweep import run_sweep, sweep_points

try:
    ray = import_ray()  # this process's first import: in the authentication mode of the nodes started below
except UserError:
    pytest.skip("ray is not installed", allow_module_level=True)
pytestmark = pytest.mark.integration  # slow for `make check`: each Ray start takes tens of seconds on two cores
from tests.ray_nodes import QUIET, alive_nodes, started_nodes  # noqa: E402
from tests.test_app_pages import analyzed, button, no_problems, texts  # noqa: E402, F401 (the page's fixture)

SAMPLING = Sampling(6, 32, seed=0)
SETTINGS = QuantizeSettings("rtn", 32)
EVALUATION = EvalSettings(32, 256)
CANDIDATES = (2, 3, 4)
# 6 points, 5 distinct plans: uniform at 3 and 3.5 bits is one 3-bit plan, quantized once
POINTS = sweep_points(["uniform", "knapsack"], [2.5, 3.0, 3.5], seeds=(0,))
TIMES = ["created", "quant_seconds", "eval_seconds"]  # what may differ between two measurements of one run


@dataclass(frozen=True)
class Inputs:
    loaded: LoadedModel
    corpus: Corpus
    layers: pd.DataFrame
    errors: pd.DataFrame
    analysed: Path  # a store holding the analysis and nothing else

    def sweep_args(self) -> tuple:
        return (self.loaded, self.corpus, SAMPLING, self.layers, self.errors, POINTS, CANDIDATES, SETTINGS,
                EVALUATION)

    def fresh_store(self, directory: Path) -> Store:
        shutil.copy(self.analysed, directory / "sweep.duckdb")
        return Store(directory / "sweep.duckdb")


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, text_corpus, tmp_path_factory) -> Inputs:
    with pytest.MonkeyPatch.context() as patch:  # the run directories travel to the workers with the job
        caches = tmp_path_factory.mktemp("caches")
        patch.setattr(pipeline, "RUN_CACHE", caches / "runs")
        patch.setattr(pipeline, "REFERENCE_CACHE", caches / "reference")
        loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
        analysed = tmp_path_factory.mktemp("analysis") / "analysed.duckdb"
        layers, errors = analyze(loaded, text_corpus, SAMPLING, AnalysisSettings(group_size=32, bits=CANDIDATES),
                                 store=Store(analysed))
        yield Inputs(loaded, text_corpus, layers, errors, analysed)


def stored(store: Store, loaded: LoadedModel) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The store's runs and plans, in key order, without the times of measurement."""
    model_fp = model_fingerprint(loaded.path)
    runs = stored_runs(store, model_fp).drop(columns=TIMES).sort_values("key").reset_index(drop=True)
    plans = stored_plans(store, model_fp).drop(columns=["created"]).sort_values("key").reset_index(drop=True)
    return runs, plans


@pytest.fixture(scope="module")
def sequential(inputs, tmp_path_factory) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The sequential sweep's table, stored runs and stored plans: what every Ray sweep must reproduce."""
    store = inputs.fresh_store(tmp_path_factory.mktemp("sequential"))
    table = run_sweep(*inputs.sweep_args(), store)
    return (table, *stored(store, inputs.loaded))


def assert_as_sequential(table: pd.DataFrame, store: Store, inputs: Inputs, sequential) -> None:
    expected_table, expected_runs, expected_plans = sequential
    assert "failed" not in table
    pd.testing.assert_frame_equal(table.drop(columns="quant_seconds"), expected_table.drop(columns="quant_seconds"))
    runs, plans = stored(store, inputs.loaded)
    assert len(runs) == 5 and runs["key"].is_unique  # nothing lost, nothing twice
    pd.testing.assert_frame_equal(runs, expected_runs)  # the same numbers, names and predictions
    pd.testing.assert_frame_equal(plans, expected_plans)
    assert not any(pipeline.RUN_CACHE.glob("*/*"))  # every run directory went once its row was stored


def test_token_lookup_agrees_with_rays_loader(tmp_path):
    """aptq.ray_sweep.ray_token_available looks where Ray's token loader looks, in its order. Runs before the module's
    clusters: Ray's loader caches the token this process authenticates with, and is reset to the real one after."""
    token_file, blank, home = tmp_path / "token", tmp_path / "blank", tmp_path / "home"
    token_file.write_text("secret\n")
    blank.write_text(" \nsecret\n")  # Ray reads the first line only
    (home / ".ray").mkdir(parents=True)
    cases = [{}, {"RAY_AUTH_TOKEN": "secret"}, {"RAY_AUTH_TOKEN": " "}, {"RAY_AUTH_TOKEN_PATH": str(token_file)},
             {"RAY_AUTH_TOKEN_PATH": str(blank)}, {"RAY_AUTH_TOKEN": "secret", "RAY_AUTH_TOKEN_PATH": str(blank)}]
    loader = ray._raylet.AuthenticationTokenLoader.instance()
    found = {}
    try:
        for number, case in enumerate(cases):
            for default_token in ("", "secret"):
                (home / ".ray" / "auth_token").write_text(default_token)
                with pytest.MonkeyPatch.context() as patch:
                    patch.setenv("HOME", str(home))
                    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
                        patch.delenv(name, raising=False)
                    for name, value in case.items():
                        patch.setenv(name, value)
                    loader.reset_cache()
                    try:
                        expected = loader.has_token(ignore_auth_mode=True)
                    except ray.exceptions.AuthenticationError:  # a token path without a token: Ray stops
                        expected = False
                    assert ray_token_available() == expected, (case, default_token)
                    found[number, default_token] = expected
    finally:
        loader.reset_cache()
    assert found[0, ""] is False and found[0, "secret"] is True  # ~/.ray/auth_token alone decides
    assert found[4, "secret"] is False and found[5, ""] is True  # the order: RAY_AUTH_TOKEN, its path, the default


@pytest.fixture(scope="module")
def local_cluster(inputs):
    ray.init(address="local", num_cpus=2, **QUIET)
    yield
    ray.shutdown()


def test_local_ray_sweep_stores_the_rows_of_the_sequential_sweep(local_cluster, inputs, sequential, tmp_path):
    store = inputs.fresh_store(tmp_path)
    reports = []
    table = run_sweep_on_ray(*inputs.sweep_args(), store, lambda *report: reports.append(report), RayOptions())
    assert_as_sequential(table, store, inputs, sequential)
    assert reports[-1] == (5, 5, "5 runs done, 0 failed, 0 waiting or running on Ray")
    again = run_sweep_on_ray(*inputs.sweep_args(), store)  # all stored: answered by the store, no task
    assert again.dropna(subset=["key"])["cached"].all()


def kill_a_running_task(killed: list[str]):
    """A progress callback that, on the driver's first report, waits for a worker of this test process to run a
    sweep task and kills it with SIGKILL (as the OOM killer or a lost node would)."""

    def report(done: int, total: int, message: str) -> None:
        if "on Ray" not in message:  # not yet dispatched
            return
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            for process in psutil.Process().children(recursive=True):
                try:
                    title = process.cmdline()
                except psutil.Error:
                    continue
                if title and title[0].startswith("ray::aptq "):
                    os.kill(process.pid, signal.SIGKILL)
                    killed.append(title[0].rstrip("\0"))
                    return
            time.sleep(0.005)

    return report


def test_a_worker_killed_mid_sweep_is_retried_and_nothing_is_lost_or_duplicated(local_cluster, inputs, sequential,
                                                                                  tmp_path):
    store = inputs.fresh_store(tmp_path)
    killed: list[str] = []
    table = run_sweep_on_ray(*inputs.sweep_args(), store, kill_a_running_task(killed), RayOptions(max_retries=3))
    assert len(killed) == 1, "no sweep task was seen running"
    assert_as_sequential(table, store, inputs, sequential)


def test_a_run_that_fails_for_good_is_reported_while_the_others_land(local_cluster, inputs, sequential, tmp_path):
    store = inputs.fresh_store(tmp_path)
    killed: list[str] = []
    table = run_sweep_on_ray(*inputs.sweep_args(), store, kill_a_running_task(killed), RayOptions(max_retries=0))
    failed = table[table["failed"].notna()]  # the killed run's points (two for the 3-bit uniform plan)
    assert len(killed) == 1 and killed[0] == f"ray::aptq {POINTS[failed.index[0]].name}"
    assert failed["failed"].str.contains("WorkerCrashedError").all()  # with the error Ray gave
    assert table.drop(index=failed.index)["perplexity"].notna().all()
    runs, _ = stored(store, inputs.loaded)
    assert len(runs) == 4 and runs["key"].is_unique  # the other runs landed
    rerun = run_sweep_on_ray(*inputs.sweep_args(), store)  # the failed run alone is measured again
    assert list(rerun.index[~rerun["cached"].astype(bool)]) == [failed.index[0]]
    assert_as_sequential(rerun, store, inputs, (sequential[0].assign(cached=rerun["cached"]), *sequential[1:]))


def cli_sweep(inputs: Inputs, model_dir: Path, text_corpus: Corpus, directory: Path) -> tuple[Store, list[str]]:
    """A store holding the analysis, and the CLI arguments of a sweep of two uniform RTN plans on it."""
    store = inputs.fresh_store(directory)
    corpus_file = directory / "corpus.txt"
    corpus_file.write_text(text_corpus.calibration + "\n\n" + text_corpus.evaluation)
    return store, ["sweep", "--model", str(model_dir), "--corpus", str(corpus_file), "--store", str(store.path),
                   "--device", "cpu", "--samples", "6", "--seqlen", "32", "--group", "32", "--candidates", "2,3,4",
                   "--methods", "uniform", "--budgets", "2,3", "--quantizer", "rtn", "--eval-seqlen", "32",
                   "--tokens", "256"]


def assert_cli_sweep_stored(store: Store, inputs: Inputs) -> None:
    runs = stored_runs(store, model_fingerprint(inputs.loaded.path))
    assert sorted(runs["budget"]) == [2.0, 3.0] and set(runs["method"]) == {"rtn"}


def test_cli_sweep_on_ray_and_its_arguments(local_cluster, inputs, tiny_model_dir, text_corpus, tmp_path, capsys):
    assert main(["sweep", "--ray", "--ray-cpus", "0"]) == 2
    assert "--ray-cpus must be positive" in capsys.readouterr().err
    store, arguments = cli_sweep(inputs, tiny_model_dir("llama"), text_corpus, tmp_path)
    assert main([*arguments, "--ray"]) == 0  # uses the module's cluster (a connection made before is kept)
    output = capsys.readouterr().out
    assert "uniform" in output and "perplexity" in output
    assert_cli_sweep_stored(store, inputs)


def test_trade_offs_page_measures_a_sweep_on_ray(local_cluster, at):
    """The page's choice: Run on Ray with an empty address uses the Ray this process is connected to."""
    at.switch_page("pages/4_Trade_offs.py").run()
    at.text_input(key="sweep_budgets").set_value("3,4")
    at.number_input(key="sweep_tokens").set_value(256)
    at.checkbox(key="sweep_on_ray").check().run()
    button(at, "Measure the sweep").click().run()
    deadline = time.monotonic() + 600  # the job runs in a thread of this process, its tasks on the module's cluster
    while not (at.success or at.error or at.exception) and time.monotonic() < deadline:
        time.sleep(5)  # each run redraws the page's charts: not too often
        at.run()
    no_problems(at)
    assert "sweep of 4 plans on Ray: 4 points measured or found stored" in texts(at.success)
    runs = stored_runs(Store(os.environ["APTQ_STORE"]))
    assert sorted(runs["budget"]) == [3.0, 3.0, 4.0, 4.0] and set(runs["method"]) == {"rtn"}


@pytest.fixture(scope="module")
def nodes() -> Iterator[str]:
    """A head and a worker node started by `ray start`, this process connected to them; their address. It ends the
    module's local cluster first: the tests using it come last."""
    with started_nodes((1, 1)) as address:
        yield address


def test_sweep_on_a_head_and_a_worker_started_by_ray_start(nodes, inputs, sequential, tmp_path):
    store = inputs.fresh_store(tmp_path)
    table = run_sweep_on_ray(*inputs.sweep_args(), store, options=RayOptions(address=nodes))
    assert alive_nodes() == 2
    assert_as_sequential(table, store, inputs, sequential)


def from_a_shell(command: list[str], directory: Path) -> subprocess.CompletedProcess:
    """The command run in a fresh process, from a shell without RAY_AUTH_MODE (this process set it at ray's import)."""
    shell = {name: value for name, value in os.environ.items() if name != AUTH_MODE}
    shell["APTQ_CACHE_DIR"] = str(directory / "cache")  # its run and reference directories
    return subprocess.run(command, env=shell, cwd=Path(__file__).parents[1], capture_output=True, text=True,
                          timeout=900)


def test_a_fresh_cli_process_joins_nodes_started_by_ray_start(nodes, inputs, tiny_model_dir, text_corpus, tmp_path):
    """`python -m aptq sweep --ray ADDRESS`: where a token exists (here ~/.ray/auth_token) the nodes use token
    authentication, and a driver that did not choose it too was rejected (issue 18)."""
    store, arguments = cli_sweep(inputs, tiny_model_dir("llama"), text_corpus, tmp_path)
    finished = from_a_shell([sys.executable, "-m", "aptq", *arguments, "--ray", nodes], tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "perplexity" in finished.stdout
    assert_cli_sweep_stored(store, inputs)


def test_a_driver_that_imported_ray_first_is_told_which_mode_to_set(nodes, inputs, tiny_model_dir, text_corpus,
                                                                    tmp_path):
    if not ray_token_available():
        pytest.skip("no Ray token here: the nodes run without authentication, any driver joins")
    _, arguments = cli_sweep(inputs, tiny_model_dir("llama"), text_corpus, tmp_path)
    script = f"import sys, ray; from aptq.cli import main; sys.exit(main({[*arguments, '--ray', nodes]!r}))"
    finished = from_a_shell([sys.executable, "-c", script], tmp_path)
    assert finished.returncode == 2, finished.stderr[-3000:]  # a UserError, after Ray's own connection attempts
    assert "ray was imported before aptq with authentication mode 'disabled'" in finished.stderr
    assert f"set {AUTH_MODE}=token before starting Python" in finished.stderr
