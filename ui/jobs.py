"""Long work (an analysis, a quantization run) in a background thread per job.

Why not inside the script run: any click would interrupt it, and the person could not visit other pages meanwhile.
Here the script only starts a job and draws its progress from a fragment that reruns every second; Cancel sets a flag
that the job's Progress callback turns into `aptq.progress.Cancelled` at the next block, after the finished blocks
are stored. Jobs live in a process-wide registry keyed by what they compute, so a second session asking for the same
work watches the running job instead of starting another. Jobs on one model run one at a time (a per-model lock):
they share the loaded model, and the analysis puts hooks on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from aptq.errors import UserError
from aptq.progress import Cancelled, Progress

log = logging.getLogger(__name__)


@dataclass
class Job:
    key: str
    label: str
    state: str = "queued"  # queued → running → finished | cancelled | failed
    done: int = 0
    total: int = 0
    message: str = "waiting for other work on this model"
    error: str = ""
    result: Any = None
    started: float = field(default_factory=time.monotonic)
    done_since: tuple[int, float] | None = None  # (steps done, time) when the current stage began: ETA from there
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    def progress(self, done: int, total: int, message: str) -> None:
        if self.cancel_requested.is_set():
            raise Cancelled(self.label)
        if self.done_since is None or total != self.total:  # a new stage starts its own clock
            self.done_since = (done, time.monotonic())
        self.done, self.total, self.message = done, total, message

    def cancel(self) -> None:
        self.cancel_requested.set()
        self.message = "cancelling at the end of the current block…"

    def run(self, lock: threading.Lock, work: Callable[[Progress], Any]) -> None:
        with lock:
            self.state = "running"
            try:
                self.progress(0, 0, "starting")
                self.result = work(self.progress)
                self.state = "finished"
            except Cancelled:
                self.state = "cancelled"
            except UserError as exc:
                self.state, self.error = "failed", str(exc)
            except Exception as exc:  # shown as one sentence; the traceback goes to the server log
                log.exception("job %s failed", self.label)
                self.state, self.error = "failed", f"{self.label} failed unexpectedly ({type(exc).__name__}: {exc})."


class _Registry:
    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.guard = threading.Lock()


@st.cache_resource
def _registry() -> _Registry:
    return _Registry()


def find(key: str) -> Job | None:
    return _registry().jobs.get(key)


def start(key: str, label: str, model: str, work: Callable[[Progress], Any]) -> Job:
    """Start `work(progress)` in the background unless the same job is already queued or running; return the job."""
    registry = _registry()
    with registry.guard:
        job = registry.jobs.get(key)
        if job is not None and job.active:
            return job
        job = registry.jobs[key] = Job(key, label)
        lock = registry.locks.setdefault(model, threading.Lock())
    threading.Thread(target=job.run, args=(lock, work), name=f"aptq {label}", daemon=True).start()
    return job


def eta(job: Job) -> str:
    """Time left at the speed measured on this machine since the job started running its steps."""
    if job.state == "queued":
        return " · waiting for other work on this model to finish"
    if job.done_since is None or job.done <= job.done_since[0] or not job.total:
        return " · first step: measuring this machine's speed"
    first_done, first_time = job.done_since
    per_step = (time.monotonic() - first_time) / (job.done - first_done)
    return f" · about {format_seconds(per_step * (job.total - job.done))} left"


def format_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


@st.fragment(run_every=1.0)
def progress_panel(key: str) -> None:
    """Progress bar and Cancel button of a running job; reruns the whole page once the job has ended."""
    job = find(key)
    if job is None or not job.active:
        st.rerun()
    fraction = job.done / job.total if job.total else 0.0
    elapsed = time.monotonic() - job.started
    st.progress(min(fraction, 1.0), text=f"{job.label}: {job.done}/{job.total or '?'} · {job.message} · "
                                         f"{elapsed:.0f} s{eta(job)}")
    st.button("Cancel", key=f"cancel-{key}", on_click=job.cancel, disabled=job.cancel_requested.is_set(),
              help="Stops after the current block; finished blocks are kept and a later start resumes.")


def show(job: Job | None) -> None:
    """The job's progress while it runs, or why it did not finish (the caller shows what a finished job made)."""
    if job is None:
        return
    if job.active:
        progress_panel(job.key)
    elif job.state == "failed":
        st.error(job.error)
    elif job.state == "cancelled":
        st.warning(f"{job.label} was cancelled; finished blocks are kept, and starting again resumes.")
