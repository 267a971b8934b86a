"""The DuckDB store: every number the project measures, keyed by fingerprints so that a repeat is a cache hit.

Where: `data/aptq.duckdb` (under `APTQ_CACHE_DIR` when that is set), or the file named by the environment variable
`APTQ_STORE`, or the `path` given to `Store`.

Concurrency: the dashboard and the CLI may use the same file. DuckDB lets one process at a time open a file, so every
operation opens a short-lived connection and closes it; while another process holds the file, opening is retried for
a few seconds, then a `UserError` says the cache is busy. Long work writes in small transactions (the analysis: one
per block) so that others get their turn in between.

A file that is not a DuckDB database (a torn copy, a stray file) is moved aside to `<name>.corrupt-<timestamp>`, never
deleted, with a warning, and a fresh store is created in its place.

Other modules add their tables the same way: `Store.add_schema(ddl)` with `CREATE TABLE IF NOT EXISTS …`, then
`execute`, `query` and `write_frame` inside `transaction()` where several writes belong together.

SCHEMA
------
models             fingerprint PK (content hash of config + weights), name, family, source, baseline, params,
                   n_blocks, first_seen
calibrations       fingerprint PK (corpus + tokenizer + N + L + seed), corpus, corpus_fingerprint,
                   tokenizer_fingerprint, n_samples (N), seqlen (L), seed
analyses           key PK (model + calibration + settings + METHOD_VERSION), model → models, calibration →
                   calibrations, settings (JSON), method_version, status (running | interrupted | complete),
                   blocks_done, n_blocks, device, started, updated, seconds (model work, summed over runs)
analysis_blocks    (analysis, block) PK, seconds, finished — one row per finished block; resuming starts at the
                   first block without a row
layer_metrics      (analysis, layer) PK, position (order in the model), block, kind, fused, n_params, d_out, d_in,
                   trace_layerwise, trace_attention, trace_lm, trace_lm_se, score_layerwise, score_attention, score,
                   residual_ms (added by ALTER TABLE so that older files keep working)
predicted_errors   (analysis, layer, bits, group_size) PK, err_layerwise, err_attention
"""

from __future__ import annotations

import os
import re
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import duckdb
import pandas as pd

from aptq.errors import UserError
from aptq.models import CACHE_DIR

DEFAULT_PATH = CACHE_DIR / "aptq.duckdb"
BUSY_TIMEOUT = 5.0  # (our choice) seconds to wait for another process before giving up

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    fingerprint VARCHAR PRIMARY KEY, name VARCHAR, family VARCHAR, source VARCHAR, baseline VARCHAR,
    params BIGINT, n_blocks INTEGER, first_seen TIMESTAMP DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS calibrations (
    fingerprint VARCHAR PRIMARY KEY, corpus VARCHAR, corpus_fingerprint VARCHAR, tokenizer_fingerprint VARCHAR,
    n_samples INTEGER, seqlen INTEGER, seed BIGINT);
CREATE TABLE IF NOT EXISTS analyses (
    key VARCHAR PRIMARY KEY, model VARCHAR, calibration VARCHAR, settings JSON, method_version INTEGER,
    status VARCHAR, blocks_done INTEGER, n_blocks INTEGER, device VARCHAR, started TIMESTAMP, updated TIMESTAMP,
    seconds DOUBLE);
CREATE TABLE IF NOT EXISTS analysis_blocks (
    analysis VARCHAR, block INTEGER, seconds DOUBLE, finished TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (analysis, block));
CREATE TABLE IF NOT EXISTS layer_metrics (
    analysis VARCHAR, position INTEGER, layer VARCHAR, block INTEGER, kind VARCHAR, fused VARCHAR,
    n_params BIGINT, d_out INTEGER, d_in INTEGER, trace_layerwise DOUBLE, trace_attention DOUBLE, trace_lm DOUBLE,
    trace_lm_se DOUBLE, score_layerwise DOUBLE, score_attention DOUBLE, score DOUBLE,
    PRIMARY KEY (analysis, layer));
ALTER TABLE layer_metrics ADD COLUMN IF NOT EXISTS residual_ms DOUBLE;
CREATE TABLE IF NOT EXISTS predicted_errors (
    analysis VARCHAR, layer VARCHAR, bits INTEGER, group_size INTEGER, err_layerwise DOUBLE, err_attention DOUBLE,
    PRIMARY KEY (analysis, layer, bits, group_size));
"""

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def default_path() -> Path:
    return Path(os.environ.get("APTQ_STORE") or DEFAULT_PATH)


class Store:
    def __init__(self, path: str | Path | None = None, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.busy_timeout = busy_timeout
        self._schemas = [SCHEMA]

    def add_schema(self, ddl: str) -> None:
        """Register `CREATE TABLE IF NOT EXISTS …` statements, applied on every connection (about 1 ms)."""
        self._schemas.append(ddl)

    # -- connections -----------------------------------------------------------------------------------------------

    def _open(self) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.02
        while True:
            try:
                return duckdb.connect(str(self.path))
            except duckdb.ResourceInUseException as exc:  # another thread of this process is opening the file
                if time.monotonic() >= deadline:
                    raise UserError(f"The cache {self.path} is busy; try again in a moment.") from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
                continue
            except duckdb.IOException as exc:
                message = str(exc)
                if "not a valid DuckDB database" in message:
                    self._move_aside()
                    continue
                if "lock" not in message.lower():
                    raise UserError(f"The cache {self.path} cannot be opened: {message.splitlines()[0]}") from exc
                if time.monotonic() >= deadline:
                    raise UserError(f"The cache {self.path} is busy (used by another process); try again when that "
                                    f"process finishes.") from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.25)

    def _move_aside(self) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            self.path.rename(target)
        except FileNotFoundError:  # another process moved it first
            return
        wal = self.path.with_name(self.path.name + ".wal")
        if wal.exists():
            wal.rename(target.with_name(target.name + ".wal"))
        warnings.warn(f"The cache {self.path} was not a DuckDB database; it was moved to {target} and a fresh "
                      f"cache was started.", stacklevel=4)

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection with the schema in place (even if the file was replaced); closed on exit."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = self._open()
        try:
            for ddl in self._schemas:
                self._apply(con, ddl)
            yield con
        finally:
            con.close()

    def _apply(self, con: duckdb.DuckDBPyConnection, ddl: str) -> None:
        """Run schema DDL; another thread of this process applying it at the same moment is a catalog conflict that
        a retry resolves (the dashboard's background jobs and its pages share the file)."""
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                con.execute(ddl)
                return
            except duckdb.TransactionException:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection inside BEGIN … COMMIT (ROLLBACK on any error)."""
        with self.connect() as con:
            con.begin()
            try:
                yield con
            except BaseException:
                con.rollback()
                raise
            con.commit()

    # -- generic operations ----------------------------------------------------------------------------------------

    def execute(self, sql: str, params: list | tuple | None = None) -> None:
        with self.connect() as con:
            con.execute(sql, params)

    def query(self, sql: str, params: list | tuple | None = None) -> pd.DataFrame:
        with self.connect() as con:
            return con.execute(sql, params).df()

    def write_frame(self, table: str, frame: pd.DataFrame, con: duckdb.DuckDBPyConnection | None = None) -> None:
        """Insert (or replace, by primary key) the rows of `frame` into `table`, matching columns by name."""
        if not _IDENTIFIER.match(table):
            raise ValueError(f"bad table name {table!r}")
        if con is None:
            with self.transaction() as own:
                self.write_frame(table, frame, own)
            return
        con.register("_frame", frame)
        try:
            con.execute(f"INSERT OR REPLACE INTO {table} BY NAME SELECT * FROM _frame")
        finally:
            con.unregister("_frame")

    # -- analyses --------------------------------------------------------------------------------------------------

    def load_analysis(self, key: str) -> tuple[pd.DataFrame, pd.DataFrame] | None:
        """(layers, errors) of a complete analysis, in model order; None when absent or unfinished."""
        with self.connect() as con:
            status = con.execute("SELECT status FROM analyses WHERE key = ?", [key]).fetchone()
            if status is None or status[0] != "complete":
                return None
            layers = con.execute("SELECT * EXCLUDE (analysis, position) FROM layer_metrics WHERE analysis = ? "
                                 "ORDER BY position", [key]).df()
            errors = con.execute("SELECT e.* EXCLUDE (analysis) FROM predicted_errors e JOIN layer_metrics m "
                                 "ON m.analysis = e.analysis AND m.layer = e.layer WHERE e.analysis = ? "
                                 "ORDER BY m.position, e.bits", [key]).df()
        return layers, errors
