"""Faults in real processes: kill -9 and Ctrl-C (SIGINT) in the middle of analyze, quantize and a sweep, then a resume
that completes with results identical to an uninterrupted run; two processes asking for the same analysis.

Each faulty run is a forked child process running the CLI's `main` (forked rather than spawned: a fresh interpreter
spends most of its time importing torch). A hook around one unit of work (a block's Hessians, a block's quantization)
lets the unit finish, tells the test, and pauses before its result is stored; the test then sends the signal, so the
fault always lands inside the work.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch

import aptq.data as data
import aptq.pipeline as pipeline
import aptq.sensitivity as sensitivity
from aptq import analyses, history
from aptq.cli import main
from aptq.data import Sampling, load_corpus
from aptq.models import load_model
from aptq.sensitivity import AnalysisSettings, analyze
from aptq.store import Store

FORK = multiprocessing.get_context("fork")
CALIBRATION = ["--samples", "4", "--seqlen", "24", "--group", "32", "--device", "cpu"]
EVALUATION = ["--eval-seqlen", "24", "--tokens", "96"]
HOOKS = {"analyze": (sensitivity, "collect_block"), "quantize": (pipeline, "_quantize_block"),
         "sweep": (pipeline, "_quantize_block")}


@pytest.fixture
def setup(tiny_model_dir, text_corpus, tmp_path, monkeypatch):
    """Private caches (inherited by the forked children) and the CLI arguments shared by every command."""
    monkeypatch.setattr(pipeline, "RUN_CACHE", tmp_path / "runs")
    monkeypatch.setattr(pipeline, "REFERENCE_CACHE", tmp_path / "reference")
    monkeypatch.setattr(data, "TOKEN_CACHE", tmp_path / "tokens")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text_corpus.calibration + "\n\n" + text_corpus.evaluation)
    assert load_corpus(str(corpus)).calibration == text_corpus.calibration
    return ["--model", str(tiny_model_dir("llama")), "--corpus", str(corpus), *CALIBRATION], tmp_path


def command(name: str, common: list[str], store: Path) -> list[str]:
    extra = {"analyze": ["--bits", "2,4"],
             "quantize": ["--method", "gptq", "--bits", "3", *EVALUATION],
             "sweep": ["--budgets", "3,4", "--methods", "uniform", "--candidates", "2,3,4,8", "--quantizer", "gptq",
                       *EVALUATION]}[name]
    return [name, *common, "--store", str(store), *extra]


def _child(argv: list[str], hook: tuple, pause_at: int, release: str, events) -> None:
    """In the forked child: count the hooked units (and pause after unit `pause_at`), then run the CLI."""
    # The parent's OpenMP thread pool does not survive a fork (its threads are gone in the child): torch must stay on
    # the calling thread here, or a matrix product in the child can crash.
    torch.set_num_threads(1)
    module, name = hook
    original = getattr(module, name)
    calls = 0

    def hooked(*args, **kwargs):
        nonlocal calls
        result = original(*args, **kwargs)
        calls += 1
        events.send(f"unit {calls}")
        if calls == pause_at:
            events.send("paused")
            while not os.path.exists(release):
                time.sleep(0.02)
        return result

    setattr(module, name, hooked)
    events.send(f"exit {main(argv)}")


class Child:
    """A forked CLI run; `pause_at=0`: never pause."""

    def __init__(self, name: str, argv: list[str], pause_at: int = 0, release: Path | None = None) -> None:
        self.events, child_end = FORK.Pipe(duplex=False)
        self.process = FORK.Process(target=_child, args=(argv, HOOKS[name], pause_at, str(release or "/nonexistent"),
                                                         child_end))
        self.process.start()
        child_end.close()
        self.seen: list[str] = []

    def wait_for(self, event: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while event not in self.seen:
            assert self.events.poll(max(0.0, deadline - time.monotonic())), f"no {event!r}; saw {self.seen}"
            self.seen.append(self.events.recv())

    def drain(self) -> None:
        try:
            while self.events.poll():
                self.seen.append(self.events.recv())
        except EOFError:  # the child has exited
            pass

    def finish(self, timeout: float = 300) -> int:
        self.process.join(timeout)
        assert self.process.exitcode is not None, "the child did not finish"
        self.drain()
        return self.process.exitcode

    def units(self) -> int:
        return sum(event.startswith("unit") for event in self.seen)


def interrupt(name: str, argv: list[str], pause_at: int, sig: signal.Signals) -> Child:
    child = Child(name, argv, pause_at)
    child.wait_for("paused")
    os.kill(child.process.pid, sig)
    child.finish()
    return child


def fault_then_resume(name: str, argv: list[str], first_pause: int, check: Callable[[], None]) -> int:
    """Ctrl-C after `first_pause` units; kill -9 after the next unit; `check` after each; then a clean resume.
    Returns the number of units the resume computed."""
    ctrl_c = interrupt(name, argv, first_pause, signal.SIGINT)
    assert ctrl_c.seen[-1] == "exit 130"  # the CLI's clean message and exit code on Ctrl-C
    check()
    killed = interrupt(name, argv, 1, signal.SIGKILL)
    assert killed.process.exitcode == -signal.SIGKILL
    check()
    resumed = Child(name, argv)
    assert resumed.finish() == 0 and resumed.seen[-1] == "exit 0"
    return resumed.units()


def runs(store: Path) -> pd.DataFrame:
    columns = ["key", "avg_bits", "perplexity", "kl", "top1"]
    return history.stored_runs(Store(store))[columns].sort_values("key", ignore_index=True)


@pytest.mark.integration
def test_analyze_survives_ctrl_c_and_kill_9_and_resumes_identically(setup):
    common, tmp = setup
    assert main(command("analyze", common, tmp / "clean.duckdb")) == 0
    key = Store(tmp / "clean.duckdb").query("SELECT key FROM analyses")["key"].item()
    store = Store(tmp / "faulty.duckdb")

    def never_running() -> None:
        state = analyses.status(store, key)
        assert state.status == "interrupted" and state.blocks_done == 1 and analyses.load(store, key) is None

    assert fault_then_resume("analyze", command("analyze", common, store.path), 2, never_running) == 1  # block 1
    clean, resumed = analyses.load(Store(tmp / "clean.duckdb"), key), analyses.load(store, key)
    pd.testing.assert_frame_equal(resumed[0], clean[0], check_exact=True)
    pd.testing.assert_frame_equal(resumed[1], clean[1], check_exact=True)


def drill_on_runs(name: str, setup, first_pause: int, stored_between: int) -> int:
    """`fault_then_resume` on a command that stores runs, `stored_between` of them stored after each fault; the
    resumed store's runs equal a clean store's. Returns the number of units the resume computed."""
    common, tmp = setup
    assert main(command(name, common, tmp / "clean.duckdb")) == 0
    faulty = tmp / "faulty.duckdb"

    def stored_so_far() -> None:
        assert len(history.stored_runs(Store(faulty))) == stored_between

    resumed_units = fault_then_resume(name, command(name, common, faulty), first_pause, stored_so_far)
    pd.testing.assert_frame_equal(runs(faulty), runs(tmp / "clean.duckdb"), check_exact=True)
    return resumed_units


@pytest.mark.integration
def test_quantize_survives_ctrl_c_and_kill_9_and_resumes_identically(setup):
    assert drill_on_runs("quantize", setup, first_pause=2, stored_between=0) == 1
    assert not any((setup[1] / "runs").iterdir())  # checkpoints go once the run is stored


@pytest.mark.integration
def test_a_sweep_survives_ctrl_c_and_kill_9_and_resumes_identically(setup):
    # Units: the two blocks of the first point, then of the second: Ctrl-C inside the second point.
    assert drill_on_runs("sweep", setup, first_pause=3, stored_between=1) == 2  # the 2nd point
    assert len(runs(setup[1] / "faulty.duckdb")) == 2


@pytest.mark.integration
def test_two_processes_compute_one_analysis_once(setup):
    common, tmp = setup
    argv = command("analyze", common, tmp / "shared.duckdb")
    release = tmp / "release"
    first = Child("analyze", argv, pause_at=1, release=release)
    first.wait_for("paused")  # the first process owns the analysis and is inside block 0
    second = Child("analyze", argv)
    store = Store(tmp / "shared.duckdb")
    time.sleep(3 * analyses.WAIT_POLL)  # the second is now waiting for the first (or would have computed)
    second.drain()
    assert second.process.is_alive() and second.units() == 0
    release.touch()
    assert first.finish() == 0 and second.finish() == 0
    assert first.units() == 2 and second.units() == 0  # the second reused the first's work
    [key] = store.query("SELECT key FROM analyses")["key"]
    assert analyses.status(store, key).status == "complete"


def test_a_failed_start_leaves_no_running_row(setup, tiny_model_dir, text_corpus):
    _, tmp = setup
    store = Store(tmp / "store.duckdb")

    def fail_at_start(done: int, total: int, message: str) -> None:
        raise RuntimeError("the device went away")

    with pytest.raises(RuntimeError, match="device went away"):
        analyze(load_model(str(tiny_model_dir("llama")), device="cpu"), text_corpus, Sampling(4, 24),
                AnalysisSettings(group_size=32, bits=(2, 4)), store=store, progress=fail_at_start)
    key = store.query("SELECT key FROM analyses")["key"].item()
    state = analyses.status(store, key)
    assert state.status == "interrupted" and state.owner is None and state.blocks_done == 0
