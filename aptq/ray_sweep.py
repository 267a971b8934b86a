"""Sweeps on a Ray cluster: each (allocation, budget, quantizer) run is a Ray task; only the driver writes the store.

    table = run_sweep_on_ray(loaded, corpus, sampling, layers, errors, points, candidates, settings, evaluation,
                             store, progress, RayOptions(address="auto"))

The driver (this process) reads the analysis once, turns every point into a plan and saves the plans
(aptq.sweep.plan_points), answers the runs stored before from the store, and puts what the workers need — the
model's path, the corpus, sampling, settings and the plans — into Ray's object store once (`ray.put`). Each task loads
the model from that path (once per worker process), quantizes and evaluates one plan without touching the store
(aptq.pipeline.measure_run) and returns the run row; the driver stores each row as it lands, so the DuckDB file is
never shared between processes. The stored rows are those of the sequential sweep (aptq.sweep.run_sweep).

Failures: a worker that dies is retried by Ray (`max_retries`), and the retry resumes at the first block the dead
attempt had not finished (the run directory, aptq.pipeline); an exception raised by a run is not retried (our choice:
it would fail the same way again) and the run is reported as failed, with its plan's name and the error, while the
other runs still land. Ctrl-C (or Cancel on the page) cancels the tasks not yet finished; the stored runs stay.

Every node needs this project at the driver's working directory (Ray puts that on the workers' import path), the
same Python environment, and the model at the path the driver loaded it from. Ray is imported only here, when asked
for.

Authentication: Ray 2.60 reads its mode (RAY_AUTH_MODE) once, when it is imported. `ray start --head` turns token
authentication on when the variable is unset and a token is available, but a driver given an address does not, and
such a cluster rejects it ("InvalidAuthToken"). So the first import here decides the mode as `ray start --head` does in
this environment (`cluster_auth_mode`); a ray imported before is left as it is, and if it cannot join, the error says
which mode to set.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from aptq import history, pipeline
from aptq.allocate import Candidate
from aptq.data import Corpus, Sampling
from aptq.errors import UserError
from aptq.history import RunRecord
from aptq.models import LoadedModel, load_model, model_fingerprint
from aptq.pipeline import (
    EvalSettings,
    QuantizeSettings,
    RunIdentity,
    identify_run,
    measure_run,
    reference_for,
    remove_checkpoints,
    stored_run,
)
from aptq.progress import Progress, no_progress
from aptq.store import Store
from aptq.sweep import PointPlan, SweepPoint, plan_points

GIB = 1024 ** 3
# (our choice) a worker holds the model, the quantized weights swapped in for evaluation and its RTN memo: about three
# copies of the weights in float32 (the weights stay in CPU memory even when the work runs on a GPU).
MEMORY_PER_WEIGHT_BYTES = 3 * 4
WAIT_SECONDS = 0.5  # how often the driver looks for finished runs (and lets Ctrl-C in)


@dataclass(frozen=True)
class RayOptions:
    """Where the runs go and what each one declares to Ray's scheduler."""

    address: str | None = None  # None: RAY_ADDRESS, else the cluster `ray start` started here, else a new local one
    num_cpus: float = 1
    num_gpus: float = 0
    memory_bytes: int | None = None  # None: estimated from the model's size (MEMORY_PER_WEIGHT_BYTES)
    max_retries: int = 3  # retries of a run whose worker died


@dataclass(frozen=True)
class SweepJob:
    """What every task needs, put into Ray's object store once."""

    model_path: str
    model_labels: dict  # source, display_name and baseline_label of the driver's model: the stored rows name it alike
    corpus: Corpus
    sampling: Sampling
    settings: QuantizeSettings
    evaluation: EvalSettings
    plans: dict[str, PointPlan]  # run key → the first point of the sweep that asks for that run
    run_cache: Path  # the driver's run and reference directories (aptq.pipeline), so that a retry finds the blocks
    reference_cache: Path


AUTH_MODE = "RAY_AUTH_MODE"


def ray_token_available() -> bool:
    """Whether Ray would find an authentication token, looking where and in the order its token loader does (Ray
    2.60): RAY_AUTH_TOKEN, else the first line of the file RAY_AUTH_TOKEN_PATH names, else of ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return bool(token.strip())
    home = os.environ.get("HOME") or "."
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(home, ".ray", "auth_token")
    try:
        with open(path) as file:
            return bool(file.readline().strip())
    except OSError:
        return False


def cluster_auth_mode() -> str:
    """The authentication mode of a cluster `ray start --head` starts in this environment: RAY_AUTH_MODE when set,
    else "token" when a token is available, else "disabled" (Ray 2.60's maybe_enable_token_auth_if_token_available)."""
    explicit = os.environ.get(AUTH_MODE)
    if explicit is not None:
        return explicit.lower()
    return "token" if ray_token_available() else "disabled"


def import_ray():
    """The ray module, or one sentence saying how to get it. Imported first here, it takes the authentication mode of
    the clusters `ray start` starts in this environment; a ray imported before keeps its mode."""
    if "ray" not in sys.modules and cluster_auth_mode() == "token":
        os.environ[AUTH_MODE] = "token"  # read by ray at its import; inherited by the nodes this process starts
    try:
        import ray
    except ImportError as exc:
        raise UserError("Sweeps on Ray need the ray package: install it with `.venv/bin/pip install ray==2.60.0` "
                        "(requirements-dev.txt).") from exc
    return ray


@contextmanager
def connected(options: RayOptions) -> Iterator[object]:
    """The ray module, connected: a connection the caller made is used as is; else one is made and closed after."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
    except (ConnectionError, ValueError, RuntimeError, ray.exceptions.RayError) as exc:
        where = f"at {options.address}" if options.address else "(RAY_ADDRESS, a local `ray start`, or a new one)"
        raise UserError(f"Could not connect to a Ray cluster {where}: {str(exc).splitlines()[0]} "
                        f"({auth_mode_advice()})") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def auth_mode_advice() -> str:
    """What this process's Ray authentication mode is, and what to set when it is not the one of a cluster started in
    this environment (ray was imported before import_ray could choose)."""
    from ray._raylet import AuthenticationMode, get_authentication_mode

    mode = "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "disabled"
    expected = cluster_auth_mode()
    if mode != expected:
        return (f"ray was imported before aptq with authentication mode '{mode}', but a cluster started here uses "
                f"'{expected}': set {AUTH_MODE}={expected} before starting Python")
    return f"this process uses Ray authentication mode '{mode}'; {AUTH_MODE} must match the cluster's"


# ---------------------------------------------------------------------------------------------------------------
# In the worker


_worker_model: dict[tuple[str, str | None], tuple[LoadedModel, dict]] = {}  # per worker process: the model, RTN memo


def _loaded(job: SweepJob) -> tuple[LoadedModel, dict]:
    """The job's model loaded once per worker process, with an RTN memo shared by the runs this worker does."""
    cache_key = (job.model_path, job.settings.device)
    if cache_key not in _worker_model:
        _worker_model.clear()  # one model at a time
        loaded = replace(load_model(job.model_path, device=job.settings.device), **job.model_labels)
        _worker_model[cache_key] = (loaded, {})
    return _worker_model[cache_key]


def measure_task(job: SweepJob, key: str) -> RunRecord:
    """One run in a Ray worker: quantized and evaluated, its row returned to the driver (the store is not opened)."""
    # This worker process's pipeline keeps its run and reference files where the driver's does.
    pipeline.RUN_CACHE, pipeline.REFERENCE_CACHE = job.run_cache, job.reference_cache
    loaded, rtn_memo = _loaded(job)
    point_plan = job.plans[key]
    settings = point_plan.settings_for(job.settings)
    identity = identify_run(loaded, job.corpus, job.sampling, point_plan.bits, settings, job.evaluation)
    if identity.key != key:
        raise UserError(f"The model at {job.model_path} on this node is not the driver's (other weights, tokenizer "
                        f"or dtype: here it computes in {identity.dtype}): the run's key differs.")
    row = measure_run(loaded, job.corpus, job.sampling, identity, settings, job.evaluation,
                      plan_meta=point_plan.meta, rtn_memo=rtn_memo)
    remove_checkpoints(key)  # (our choice) the row is safe with the driver now; a lost row means one run again
    return row


# ---------------------------------------------------------------------------------------------------------------
# In the driver


def failure_message(exc: Exception) -> str:
    """One line: the run's own error when it raised one, else what Ray says happened to its worker."""
    cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the run's own exception
    if isinstance(cause, UserError):
        return str(cause)
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text.splitlines()[0] if text else '(no message)'}"


@dataclass
class _Tally:
    """The sweep's progress across workers: its distinct runs stored (before or now) or failed, out of all."""

    progress: Progress
    total: int
    done: int = 0
    failed: int = 0

    def report(self, running: int) -> None:
        self.progress(self.done + self.failed, self.total,
                      f"{self.done} runs done, {self.failed} failed, {running} waiting or running on Ray")


def run_sweep_on_ray(loaded: LoadedModel, corpus: Corpus, sampling: Sampling, layers: pd.DataFrame,
                     errors: pd.DataFrame, points: list[SweepPoint], candidates: tuple[Candidate, ...],
                     settings: QuantizeSettings, evaluation: EvalSettings, store: Store | None = None,
                     progress: Progress = no_progress, options: RayOptions = RayOptions()) -> pd.DataFrame:
    """The table of aptq.sweep.run_sweep, with a `failed` column naming the error of each run that failed for good;
    the runs are measured by Ray tasks and stored here."""
    store = store or Store()
    planned = plan_points(layers, errors, points, candidates, settings, model_fingerprint(loaded.path), store)
    identities = {index: identify_run(loaded, corpus, sampling, point_plan.bits, point_plan.settings_for(settings),
                                      evaluation)
                  for index, point_plan in enumerate(planned) if point_plan.skipped is None}
    stored: dict[str, RunRecord] = {}  # run key → its stored run
    first: dict[str, int] = {}  # run key → the index of the first point that asks for it
    for index, identity in identities.items():
        if identity.key in first:
            continue  # the same plan again: its prediction reaches the row once the run is stored (below)
        first[identity.key] = index
        row = stored_run(store, identity, planned[index].meta)
        if row is not None:
            stored[identity.key] = replace(row, cached=True)
    todo = {key: planned[index] for key, index in first.items() if key not in stored}
    tally = _Tally(progress, len(first), done=len(stored))
    failures: dict[str, str] = {}
    if todo:
        reference_for(loaded, corpus, evaluation, identities[first[next(iter(todo))]],  # computed once, here
                      lambda done, total, message: progress(tally.done, tally.total, f"reference: {message}"))
        with connected(options) as ray:
            _dispatch(ray, loaded, corpus, sampling, settings, evaluation, todo, options, store, stored, failures,
                      tally)
    rows = []
    for index, point_plan in enumerate(planned):
        identity = identities.get(index)
        if identity is None:
            rows.append(point_plan.row())
        elif identity.key in failures:
            rows.append(point_plan.row(failed=failures[identity.key]))
        else:
            rows.append(point_plan.row(_with_prediction(store, stored[identity.key], identity, point_plan,
                                                        first[identity.key] == index)))
    return pd.DataFrame(rows)


def _with_prediction(store: Store, row: RunRecord, identity: RunIdentity, point_plan: PointPlan,
                     is_first: bool) -> RunRecord:
    """A later point of the sweep with the same plan as an earlier one gives the stored run its name and prediction,
    in the points' order, as the sequential sweep does; its row reads as cached."""
    if is_first:
        return row
    return replace(stored_run(store, identity, point_plan.meta) or row, cached=True)


def _dispatch(ray, loaded: LoadedModel, corpus: Corpus, sampling: Sampling, settings: QuantizeSettings,
              evaluation: EvalSettings, todo: dict[str, PointPlan], options: RayOptions, store: Store,
              stored: dict[str, RunRecord], failures: dict[str, str], tally: _Tally) -> None:
    """One task per run key; each row is stored as it lands. Ctrl-C or Cancel: the tasks still out are cancelled."""
    job = SweepJob(str(loaded.path), {"source": loaded.source, "display_name": loaded.display_name,
                                      "baseline_label": loaded.baseline_label},
                   corpus, sampling, settings, evaluation, todo, pipeline.RUN_CACHE, pipeline.REFERENCE_CACHE)
    job_ref = ray.put(job)  # shipped once; every task gets it by reference
    memory = options.memory_bytes or int(loaded.n_params * MEMORY_PER_WEIGHT_BYTES)
    task = ray.remote(measure_task)
    pending = {task.options(num_cpus=options.num_cpus, num_gpus=options.num_gpus, memory=memory,
                            max_retries=options.max_retries, retry_exceptions=False,
                            name=f"aptq {point_plan.point.name}").remote(job_ref, key): key
               for key, point_plan in todo.items()}
    try:
        tally.report(len(pending))
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_SECONDS)
            for ref in ready:
                key = pending.pop(ref)
                try:
                    row = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    failures[key] = failure_message(exc)
                    tally.failed += 1
                    continue
                if history.find_run(store, key) is None:  # else another process stored the same run meanwhile
                    history.record_run(store, row)
                stored[key] = replace(history.find_run(store, key), cached=False)
                tally.done += 1
            tally.report(len(pending))
    finally:
        for ref in pending if ray.is_initialized() else ():  # left only when interrupted: Ctrl-C or Cancel
            ray.cancel(ref, force=True)
