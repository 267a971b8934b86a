"""A Ray cluster of separate node processes on this machine, each started by `ray start` (tests and benchmarks)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from aptq.ray_sweep import import_ray

ray = import_ray()  # if first: in the authentication mode of a `ray start` here, which the nodes below inherit

QUIET = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
START_SECONDS = 180  # a node start takes 30–50 s on two busy cores


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def alive_nodes() -> int:
    return sum(node["Alive"] for node in ray.nodes())


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@contextmanager
def started_nodes(cpus: tuple[int, ...] = (1, 1)) -> Iterator[str]:
    """A head node and one worker node per further entry of `cpus` (each node's CPU count), this process connected
    to them; yields the head's address. Each node is a `ray start --block`, which stops the processes it started
    when it gets SIGTERM; any left after that are killed by their ids, and the temporary directory goes."""
    ray.shutdown()  # a connection made before (e.g. a local cluster of this process)
    port = free_port()
    address = f"127.0.0.1:{port}"
    command = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
               "--disable-usage-stats"]
    temp_dir = tempfile.mkdtemp(prefix="aptq-ray-")  # short: Ray's socket paths inside must stay under 108 bytes

    def start(*arguments: str) -> subprocess.Popen:
        return subprocess.Popen([*command, *arguments], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    nodes = [start("--head", f"--port={port}", f"--num-cpus={cpus[0]}", "--include-dashboard=false",
                   f"--temp-dir={temp_dir}")]
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                ray.init(address=address, **QUIET)
                break
            except (ConnectionError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        nodes += [start(f"--address={address}", f"--num-cpus={count}") for count in cpus[1:]]
        while alive_nodes() < len(cpus):
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {alive_nodes()} of {len(cpus)} Ray nodes started")
            time.sleep(0.5)
        yield address
    finally:
        ray.shutdown()
        descendants = [child for node in nodes for child in _children(node.pid)]
        for node in reversed(nodes):
            node.send_signal(signal.SIGTERM)
            node.wait(60)
        for process in psutil.wait_procs(descendants, timeout=30)[1]:
            os.kill(process.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
