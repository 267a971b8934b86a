"""Sensitivity analyses in the store: their tables and every query on them (aptq.sensitivity computes, this module
keeps; as aptq.history keeps plans and runs).

SCHEMA (added to the store by every function here)
------
models             fingerprint PK (content hash of config + weights), name, family, source, baseline, params,
                   n_blocks, first_seen
calibrations       fingerprint PK (corpus + tokenizer + N + L + seed), corpus, corpus_fingerprint,
                   tokenizer_fingerprint, n_samples (N), seqlen (L), seed
analyses           key PK (model + calibration + settings + METHOD_VERSION), model → models, calibration →
                   calibrations, settings (JSON), method_version, status (running | interrupted | complete),
                   blocks_done, n_blocks, device, started, updated, seconds (model work, summed over runs),
                   owner (host:pid:thread of the process computing it while 'running')
analysis_blocks    (analysis, block) PK, seconds, finished — one row per finished block; resuming starts at the
                   first block without a row
layer_metrics      (analysis, layer) PK, position (order in the model), block, kind, fused, n_params, d_out, d_in,
                   trace_layerwise, trace_attention, trace_lm, trace_lm_se, score_layerwise, score_attention, score,
                   residual_ms, tokens (calibration tokens its H came from: fewer for experts), pooled_hessian (an
                   expert that fell back to the block's pooled MLP Hessian)
predicted_errors   (analysis, layer, bits, group_size) PK, err_layerwise, err_attention (round-to-nearest),
                   err_gptq_layerwise, err_gptq_attention, err_aware_layerwise, err_aware_attention (GPTQ and the
                   attention-aware quantizer; NULL unless the analysis setting quantizer_errors was on)
unit_calibrations  (unit, layer) PK, noise_ms[], kl[] (per noise level), kl_rate, kl_rate_se, seconds — the measured
                   cross-layer unit (aptq.calibrate); `unit` digests the analysis key and the calibration settings
width_calibrations (analysis, unit, source, settings, bits) PK, kl, predicted, seconds — the measured width
                   multiples (aptq.calibrate): a uniform plan's held-out KL and its predicted total in `unit` with
                   `source`'s errors; `settings` is the JSON of the quantizer's key fields and the validation share

Columns added after the first release (residual_ms, owner, tokens, pooled_hessian, the quantizer errors) come in by
`ALTER TABLE … ADD COLUMN IF NOT EXISTS`, so older files keep working.

One computation per analysis (our choice: a claim in the analysis row rather than a lock file, so that there is
nothing to clean up beside the store): `claim` marks the row 'running' with the owner's host, pid and thread, in one
transaction — DuckDB lets one process at a time open the file, so two claims cannot interleave. A second process that
finds a live owner gets `Busy` and waits (`wait_while_running`) until the owner marks the row complete or
interrupted, then reuses or resumes it. An owner is live while its process (and, in the same process, its thread)
exists; an owner on another host is trusted until the row has not moved for `REMOTE_STALE` (our choice: we cannot see
its processes). A 'running' row whose owner is gone (kill -9, power loss) reads as 'interrupted' and is resumed by the
next claim.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import pandas as pd

from aptq.progress import Progress
from aptq.store import Store

if TYPE_CHECKING:
    from aptq.calibrate import LayerUnit, WidthCalibration

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
ALTER TABLE analyses ADD COLUMN IF NOT EXISTS owner VARCHAR;
CREATE TABLE IF NOT EXISTS analysis_blocks (
    analysis VARCHAR, block INTEGER, seconds DOUBLE, finished TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (analysis, block));
CREATE TABLE IF NOT EXISTS layer_metrics (
    analysis VARCHAR, position INTEGER, layer VARCHAR, block INTEGER, kind VARCHAR, fused VARCHAR,
    n_params BIGINT, d_out INTEGER, d_in INTEGER, trace_layerwise DOUBLE, trace_attention DOUBLE, trace_lm DOUBLE,
    trace_lm_se DOUBLE, score_layerwise DOUBLE, score_attention DOUBLE, score DOUBLE,
    PRIMARY KEY (analysis, layer));
ALTER TABLE layer_metrics ADD COLUMN IF NOT EXISTS residual_ms DOUBLE;
ALTER TABLE layer_metrics ADD COLUMN IF NOT EXISTS tokens BIGINT;
ALTER TABLE layer_metrics ADD COLUMN IF NOT EXISTS pooled_hessian BOOLEAN;
CREATE TABLE IF NOT EXISTS predicted_errors (
    analysis VARCHAR, layer VARCHAR, bits INTEGER, group_size INTEGER, err_layerwise DOUBLE, err_attention DOUBLE,
    PRIMARY KEY (analysis, layer, bits, group_size));
ALTER TABLE predicted_errors ADD COLUMN IF NOT EXISTS err_gptq_layerwise DOUBLE;
ALTER TABLE predicted_errors ADD COLUMN IF NOT EXISTS err_gptq_attention DOUBLE;
ALTER TABLE predicted_errors ADD COLUMN IF NOT EXISTS err_aware_layerwise DOUBLE;
ALTER TABLE predicted_errors ADD COLUMN IF NOT EXISTS err_aware_attention DOUBLE;
CREATE TABLE IF NOT EXISTS unit_calibrations (
    unit VARCHAR, layer VARCHAR, noise_ms DOUBLE[], kl DOUBLE[], kl_rate DOUBLE, kl_rate_se DOUBLE, seconds DOUBLE,
    PRIMARY KEY (unit, layer));
CREATE TABLE IF NOT EXISTS width_calibrations (
    analysis VARCHAR, unit VARCHAR, source VARCHAR, settings VARCHAR, bits INTEGER, kl DOUBLE, predicted DOUBLE,
    seconds DOUBLE, PRIMARY KEY (analysis, unit, source, settings, bits));
"""
TABLES = ("analysis_blocks", "layer_metrics", "predicted_errors")  # rows keyed by `analysis`
REMOTE_STALE = timedelta(hours=6)
WAIT_POLL = 1.0  # seconds between looks at another process's analysis


@dataclass(frozen=True)
class ModelRecord:
    fingerprint: str
    name: str
    family: str
    source: str
    baseline: str
    params: int
    n_blocks: int


@dataclass(frozen=True)
class CalibrationRecord:
    fingerprint: str
    corpus: str
    corpus_fingerprint: str
    tokenizer_fingerprint: str
    n_samples: int
    seqlen: int
    seed: int


@dataclass(frozen=True)
class AnalysisRecord:
    """What an analysis is: its key, what it measures and how (the settings JSON), on how many blocks."""

    key: str
    model: ModelRecord
    calibration: CalibrationRecord
    settings_json: str
    method_version: int
    n_blocks: int


@dataclass(frozen=True)
class AnalysisStatus:
    """Where an analysis stands; `status` is 'interrupted' for a 'running' row whose owner is gone."""

    status: str
    blocks_done: int
    n_blocks: int
    seconds: float
    device: str
    owner: str | None


@dataclass(frozen=True)
class StoredSettings:
    """The calibration and settings of a stored analysis (for a session that opens on the newest one)."""

    n_samples: int
    seqlen: int
    seed: int
    settings: dict


class Busy(Exception):
    """The analysis is being computed by another live process or thread, named by `owner`."""

    def __init__(self, owner: str) -> None:
        super().__init__(owner)
        self.owner = owner


def _ready(store: Store | None) -> Store:
    store = store or Store()
    store.add_schema(SCHEMA)
    return store


# -- owners ------------------------------------------------------------------------------------------------------

def this_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def owner_alive(owner: str | None, updated: datetime | None) -> bool:
    """Whether the process (and thread) that claimed a row still exists; see the module docstring."""
    if not owner:
        return False
    host, pid, thread = owner.rsplit(":", 2)
    if host != socket.gethostname():
        return updated is not None and datetime.now() - updated < REMOTE_STALE
    if int(pid) != os.getpid():
        return _pid_alive(int(pid))
    return any(t.ident == int(thread) for t in threading.enumerate())


# -- reading -----------------------------------------------------------------------------------------------------

def load(store: Store | None, key: str) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(layers, errors) of a complete analysis, in model order; None when absent or unfinished."""
    with _ready(store).transaction() as con:
        status = con.execute("SELECT status FROM analyses WHERE key = ?", [key]).fetchone()
        if status is None or status[0] != "complete":
            return None
        layers = con.execute("SELECT * EXCLUDE (analysis, position) FROM layer_metrics WHERE analysis = ? "
                             "ORDER BY position", [key]).df()
        errors = con.execute("SELECT e.* EXCLUDE (analysis) FROM predicted_errors e JOIN layer_metrics m "
                             "ON m.analysis = e.analysis AND m.layer = e.layer WHERE e.analysis = ? "
                             "ORDER BY m.position, e.bits", [key]).df()
    layers.attrs["analysis_key"] = key  # what the measurements made from these layers are stored under
    return layers, errors


def _status_row(con, key: str) -> tuple | None:
    return con.execute("SELECT status, blocks_done, n_blocks, seconds, device, owner, updated FROM analyses "
                       "WHERE key = ?", [key]).fetchone()


def _as_status(row: tuple) -> AnalysisStatus:
    status, blocks_done, n_blocks, seconds, device, owner, updated = row
    if status == "running" and not owner_alive(owner, updated):
        status = "interrupted"
    return AnalysisStatus(status, int(blocks_done), int(n_blocks), float(seconds), device, owner)


def status(store: Store | None, key: str) -> AnalysisStatus | None:
    """The analysis's progress, read fresh; None when it was never started."""
    with _ready(store).transaction() as con:
        row = _status_row(con, key)
    return None if row is None else _as_status(row)


def latest_complete(store: Store | None, model_fp: str, corpus_fp: str) -> StoredSettings | None:
    """The calibration and settings of the newest complete analysis of this model on this corpus."""
    rows = _ready(store).query(
        "SELECT a.settings, c.n_samples, c.seqlen, c.seed FROM analyses a JOIN calibrations c "
        "ON a.calibration = c.fingerprint WHERE a.model = ? AND c.corpus_fingerprint = ? AND a.status = 'complete' "
        "ORDER BY a.updated DESC LIMIT 1", [model_fp, corpus_fp])
    if rows.empty:
        return None
    row = rows.iloc[0]
    return StoredSettings(int(row["n_samples"]), int(row["seqlen"]), int(row["seed"]), json.loads(row["settings"]))


def total_block_seconds(store: Store | None) -> float:
    """Seconds of model work over all finished blocks in the store."""
    return float(_ready(store).query("SELECT coalesce(sum(seconds), 0) AS s FROM analysis_blocks")["s"][0])


def block_seconds_per_token(store: Store | None, model_fp: str, device: str) -> list[float]:
    """Seconds per calibration token of every finished block of this model's analyses on `device`."""
    rows = _ready(store).query(
        "SELECT b.seconds / (c.n_samples * c.seqlen) AS rate FROM analysis_blocks b "
        "JOIN analyses a ON b.analysis = a.key JOIN calibrations c ON a.calibration = c.fingerprint "
        "WHERE a.model = ? AND a.device = ? AND b.seconds > 0", [model_fp, device])
    return rows["rate"].tolist()


def whole_model_keys(store: Store | None, model_fp: str) -> list[str]:
    """Keys of this model's complete analyses of every block (no `max_blocks`), newest first."""
    rows = _ready(store).query("SELECT key FROM analyses WHERE model = ? AND status = 'complete' "
                               "AND blocks_done = n_blocks AND settings->>'max_blocks' IS NULL "
                               "ORDER BY updated DESC", [model_fp])
    return rows["key"].tolist()


# -- writing -----------------------------------------------------------------------------------------------------

def claim(store: Store | None, record: AnalysisRecord, device: str, resume: bool) -> set[int] | None:
    """Record model, calibration and the analysis as running under this owner; return the blocks already finished,
    or None when the analysis is complete (another process finished it since the caller looked).

    Raises `Busy` when another live owner is computing it. Without `resume`, stored partial results are discarded first.
    """
    model, calibration = record.model, record.calibration
    with _ready(store).transaction() as con:
        current = _status_row(con, record.key)
        if current is not None and current[0] == "complete":
            return None
        owner = current[5] if current is not None and current[0] == "running" else None
        if owner not in (None, this_owner()) and owner_alive(owner, current[6]):
            raise Busy(owner)
        con.execute("INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, now()) ON CONFLICT DO NOTHING",
                    [model.fingerprint, model.name, model.family, model.source, model.baseline, model.params,
                     model.n_blocks])
        con.execute("INSERT INTO calibrations VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    [calibration.fingerprint, calibration.corpus, calibration.corpus_fingerprint,
                     calibration.tokenizer_fingerprint, calibration.n_samples, calibration.seqlen, calibration.seed])
        if not resume:
            for table in TABLES:
                con.execute(f"DELETE FROM {table} WHERE analysis = ?", [record.key])
            con.execute("DELETE FROM analyses WHERE key = ?", [record.key])
        con.execute("INSERT INTO analyses (key, model, calibration, settings, method_version, status, blocks_done, "
                    "n_blocks, device, started, updated, seconds, owner) VALUES (?, ?, ?, ?, ?, 'running', 0, ?, ?, "
                    "now(), now(), 0, ?) ON CONFLICT (key) DO UPDATE SET status = 'running', device = ?, "
                    "owner = ?, updated = now()",
                    [record.key, model.fingerprint, calibration.fingerprint, record.settings_json,
                     record.method_version, record.n_blocks, device, this_owner(), device, this_owner()])
        done = con.execute("SELECT block FROM analysis_blocks WHERE analysis = ?", [record.key]).fetchall()
    return {block for (block,) in done}


def write_block(store: Store | None, key: str, block: int, layer_records: list[dict], error_records: list[dict],
                seconds: float, position: dict[str, int]) -> None:
    """One finished block: its layer and error rows and its block row, in one transaction."""
    store = _ready(store)
    layers = pd.DataFrame(layer_records).assign(analysis=key)
    layers["position"] = layers["layer"].map(position)
    with store.transaction() as con:
        store.write_frame("layer_metrics", layers, con)
        store.write_frame("predicted_errors", pd.DataFrame(error_records).assign(analysis=key), con)
        con.execute("INSERT OR REPLACE INTO analysis_blocks (analysis, block, seconds) VALUES (?, ?, ?)",
                    [key, block, seconds])
        con.execute("UPDATE analyses SET blocks_done = (SELECT count(*) FROM analysis_blocks WHERE analysis = ?), "
                    "seconds = seconds + ?, updated = now() WHERE key = ?", [key, seconds, key])


def write_unit(store: Store | None, unit_key: str, unit: LayerUnit) -> None:
    """One layer's measured unit (aptq.calibrate), stored as soon as it is measured."""
    row = pd.DataFrame([{"unit": unit_key, **asdict(unit)}]).assign(
        noise_ms=[list(unit.noise_ms)], kl=[list(unit.kl)])
    _ready(store).write_frame("unit_calibrations", row)


def load_units(store: Store | None, unit_key: str) -> pd.DataFrame:
    """layer, noise_ms, kl, kl_rate, kl_rate_se, seconds of every layer measured under `unit_key`."""
    return _ready(store).query("SELECT * EXCLUDE (unit) FROM unit_calibrations WHERE unit = ?", [unit_key])


def write_width(store: Store | None, width: WidthCalibration) -> None:
    """One width's measurement (aptq.calibrate), stored as soon as it is measured."""
    _ready(store).write_frame("width_calibrations", pd.DataFrame([asdict(width)]))


def load_widths(store: Store | None, analysis: str) -> pd.DataFrame:
    """Every width measured for `analysis` (unit, source, settings, bits, kl, predicted, seconds), by width."""
    return _ready(store).query("SELECT * EXCLUDE (analysis) FROM width_calibrations WHERE analysis = ? "
                               "ORDER BY unit, source, settings, bits", [analysis])


def finish(store: Store | None, key: str, final_status: str) -> None:
    """End this owner's computation as 'complete' or 'interrupted' (a row another owner claimed meanwhile stays)."""
    _ready(store).execute("UPDATE analyses SET status = ?, owner = NULL, updated = now() WHERE key = ? "
                          "AND (owner = ? OR owner IS NULL)", [final_status, key, this_owner()])


def wait_while_running(store: Store | None, key: str, owner: str, progress: Progress) -> None:
    """Wait until no live owner computes the analysis, reporting the owner's progress (`Cancelled` stops the wait)."""
    while True:
        current = status(store, key)
        if current is None or current.status != "running":
            return
        progress(current.blocks_done, current.n_blocks,
                 f"waiting for another process ({current.owner or owner}) computing this analysis")
        time.sleep(WAIT_POLL)
