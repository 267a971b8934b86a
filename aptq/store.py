"""The DuckDB file that keeps every number the project measures: connections, locking, damaged and foreign files.

Where: `data/aptq.duckdb` (under `APTQ_CACHE_DIR` when that is set), or the file named by the environment variable
`APTQ_STORE`, or the `path` given to `Store`.

Tables belong to the modules that own their data: aptq.analyses (models, calibrations, analyses, analysis_blocks,
layer_metrics, predicted_errors) and aptq.history (plans, runs). Each registers its DDL with `Store.add_schema(ddl)`
(`CREATE TABLE IF NOT EXISTS …`, run by a connection that finds a declared table or column missing) and runs its
queries through `execute`, `query`, `write_frame` or `transaction()`. This module only knows the file and one table
of its own:

aptq_store   created, version — written when this project creates (or first adopts) the file; it is how a DuckDB
             database is recognised as ours

Concurrency: the dashboard and the CLI may use the same file. DuckDB lets one process at a time open a file, so every
operation opens a short-lived connection and closes it; while another process holds the file, opening is retried for
a few seconds, then a `UserError` says the store is busy. Long work writes in small transactions (the analysis: one
per block) so that others get their turn in between.

Files that cannot be used, each said in one sentence:
- a file that is not a DuckDB database and was not written by this project (no DuckDB header, and not the built-in
  default path `data/aptq.duckdb`): refused with a `UserError`, left untouched — most likely a mistyped `--store`;
- a torn or damaged DuckDB file, or any unreadable file at the default path: moved aside to
  `<name>.corrupt-<time>-<random>` (never overwriting: a hard link to a fresh unique name, then the old name removed)
  with a warning, and a fresh store is started in its place;
- a DuckDB database of another application (tables, none of them ours, no `aptq_store`): refused, left untouched;
- a store written by another version of this project (one of our tables lacks a column): refused with a sentence
  that says to move it away.
"""

from __future__ import annotations

import os
import re
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import duckdb
import pandas as pd

from aptq.errors import UserError
from aptq.paths import CACHE_DIR

DEFAULT_PATH = CACHE_DIR / "aptq.duckdb"
BUSY_TIMEOUT = 5.0  # (our choice) seconds to wait for another process before giving up
STORE_VERSION = 1
DUCKDB_MAGIC = b"DUCK"  # bytes 8–11 of every DuckDB database file
MARKER = "aptq_store"
MARKER_SCHEMA = f"CREATE TABLE IF NOT EXISTS {MARKER} (created TIMESTAMP DEFAULT current_timestamp, version INTEGER)"
# Stores written before the marker existed are recognised by these tables (all of this project's, at that time).
UNMARKED_TABLES = frozenset({"models", "calibrations", "analyses", "analysis_blocks", "layer_metrics",
                             "predicted_errors", "plans", "runs"})

# Errors of a damaged file, as opposed to errors of a statement (those stay exceptions: they are bugs). DuckDB reports
# a failed block checksum with its base class and a message that starts "Corrupt database file".
DAMAGE = (duckdb.IOException, duckdb.InternalException, duckdb.FatalException, duckdb.SerializationException)
SETUP_ATTEMPTS = 5  # catalog write conflicts between threads creating the same tables are retried this often
OPEN_ATTEMPTS = 3  # a file that vanished (moved aside by another process) is looked for again this often
# How DuckDB says that the file is held: by another process (its lock) or by another connection of this process.
BUSY_MESSAGES = ("could not set lock", "conflicting lock", "already attached", "unique file handle conflict")
# How DuckDB says that the file's content is unusable; any other failure to open is reported, never acted upon.
UNREADABLE_MESSAGES = ("not a valid duckdb database", "corrupt", "could not read enough bytes")

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def default_path() -> Path:
    return Path(os.environ.get("APTQ_STORE") or DEFAULT_PATH)


@cache
def _declared_columns(ddl: str) -> dict[str, frozenset[str]]:
    """Table → columns that `ddl` creates, learnt by running it on an empty in-memory database."""
    with duckdb.connect(":memory:") as con:
        con.execute(ddl)
        return _columns(con)


def _columns(con: duckdb.DuckDBPyConnection) -> dict[str, frozenset[str]]:
    rows = con.execute("SELECT table_name, column_name FROM information_schema.columns "
                       "WHERE table_schema = 'main'").fetchall()
    tables: dict[str, set[str]] = {}
    for table, column in rows:
        tables.setdefault(table, set()).add(column)
    return {table: frozenset(columns) for table, columns in tables.items()}


def _is_damage(exc: BaseException) -> bool:
    return isinstance(exc, DAMAGE) or (isinstance(exc, duckdb.Error) and "corrupt" in str(exc).lower())


def _has_duckdb_header(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(12)[8:12] == DUCKDB_MAGIC


class Store:
    def __init__(self, path: str | Path | None = None, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.busy_timeout = busy_timeout
        self._schemas: list[str] = []

    def add_schema(self, ddl: str) -> None:
        """Register `CREATE TABLE IF NOT EXISTS …` statements (idempotent); see `_prepare`."""
        if ddl not in self._schemas:
            self._schemas.append(ddl)

    # -- connections -----------------------------------------------------------------------------------------------

    def _open(self) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.02
        failures = 0
        while True:
            try:
                return duckdb.connect(str(self.path))
            except duckdb.Error as exc:  # e.g. "Corrupt database file: computed checksum … does not match"
                message = str(exc)
                busy = any(text in message.lower() for text in BUSY_MESSAGES)
                if busy and time.monotonic() >= deadline:
                    raise UserError(f"The store {self.path} is busy (used by another process); try again when that "
                                    f"process finishes.") from exc
                if busy:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.25)
                    continue
                failures += 1
                unreadable = any(text in message.lower() for text in UNREADABLE_MESSAGES)
                if failures > OPEN_ATTEMPTS or not unreadable:
                    raise UserError(f"The store {self.path} cannot be opened ({message.splitlines()[0]}); check that "
                                    f"its folder exists and is writable.") from exc
                self._unusable(message)

    def _unusable(self, message: str) -> None:
        """A file DuckDB cannot open: move it aside when it is ours (then the caller retries), else refuse."""
        reason = message.splitlines()[0]
        if not self.path.exists():  # moved aside by another process meanwhile, or the folder is not usable
            return
        if self.path.is_dir():
            raise UserError(f"The store {self.path} is a directory; give the path of a DuckDB file.")
        if not (_has_duckdb_header(self.path) or self.path.resolve() == DEFAULT_PATH.resolve()):
            raise UserError(f"{self.path} is not a DuckDB database written by this project ({reason}); it was left "
                            f"untouched: give the path of a store, or of a file that does not exist yet.")
        self._move_aside(reason)

    def _move_aside(self, reason: str) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{uuid.uuid4().hex[:8]}")
        try:
            os.link(self.path, target)  # fails rather than overwrite; the unique name makes a clash unlikely anyway
        except FileNotFoundError:  # another process moved it first
            return
        except OSError:  # a file system without hard links
            os.replace(self.path, target)
        else:
            self.path.unlink(missing_ok=True)
        wal = self.path.with_name(self.path.name + ".wal")
        if wal.exists():
            os.replace(wal, target.with_name(target.name + ".wal"))
        warnings.warn(f"The store {self.path} could not be read ({reason}); it was moved to {target} and a fresh "
                      f"store was started.", stacklevel=5)

    def _check_ours(self, con: duckdb.DuckDBPyConnection, tables: set[str]) -> None:
        """Refuse a database of another application; mark a new (or older, unmarked) store of ours."""
        if MARKER in tables:
            return
        if tables and not tables & UNMARKED_TABLES:
            listed = ", ".join(sorted(tables)[:5])
            raise UserError(f"{self.path} is a DuckDB database of another application (tables {listed}); it was "
                            f"left untouched: give another store path.")
        con.execute(MARKER_SCHEMA)
        con.execute(f"INSERT INTO {MARKER} (version) VALUES (?)", [STORE_VERSION])

    def _missing_columns(self, present: dict[str, frozenset[str]]) -> list[tuple[str, str]]:
        """(table, column) pairs the registered schemas declare and the file lacks (absent tables not counted)."""
        return [(table, column) for ddl in self._schemas for table, columns in _declared_columns(ddl).items()
                for column in sorted(columns - present.get(table, columns))]

    def _prepare(self, con: duckdb.DuckDBPyConnection) -> None:
        """Check that the file is ours and current, and create what is missing. When everything is in place (the
        common case) this only reads the catalog, so that the connections of several threads do not conflict."""
        present = _columns(con)
        self._check_ours(con, set(present))
        declared = [table for ddl in self._schemas for table in _declared_columns(ddl)]
        if all(table in present for table in declared) and not self._missing_columns(present):
            return
        for ddl in self._schemas:  # absent tables, and columns added by newer versions (ALTER … IF NOT EXISTS)
            con.execute(ddl)
        missing = self._missing_columns(_columns(con))
        if missing:
            table, column = missing[0]
            raise UserError(f"The store {self.path} comes from another version of this project (table {table} has no "
                            f"column {column}); move it away or point APTQ_STORE elsewhere.")

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection to a checked store with the schemas in place; closed on exit."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"The folder of the store {self.path} cannot be created ({exc.strerror}).") from exc
        con = self._open()
        try:
            for attempt in range(SETUP_ATTEMPTS):
                try:
                    self._prepare(con)
                    break
                except duckdb.TransactionException:  # another thread of this process created the same table
                    if attempt + 1 == SETUP_ATTEMPTS:
                        raise
                    time.sleep(0.02 * (attempt + 1))
                except duckdb.Error as exc:
                    if _is_damage(exc):
                        raise self.damaged(exc) from exc
                    raise
            yield con
        finally:
            con.close()

    def damaged(self, exc: duckdb.Error) -> UserError:
        """The sentence for a store that opened but failed to read or write."""
        return UserError(f"The store {self.path} could not be read ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0]}); it may be damaged or from another version of this project: "
                         f"move it away or point APTQ_STORE elsewhere.")

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection inside BEGIN … COMMIT (ROLLBACK on any error); a damaged file becomes one `UserError`."""
        with self.connect() as con:
            con.begin()
            try:
                yield con
            except BaseException as exc:
                con.rollback()
                if _is_damage(exc):
                    raise self.damaged(exc) from exc
                raise
            con.commit()

    # -- generic operations ----------------------------------------------------------------------------------------

    def execute(self, sql: str, params: list | tuple | None = None) -> None:
        with self.transaction() as con:
            con.execute(sql, params)

    def query(self, sql: str, params: list | tuple | None = None) -> pd.DataFrame:
        with self.transaction() as con:
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
