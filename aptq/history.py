"""Saved plans and quantization runs in the store, and how far the predicted errors can be trusted.

SCHEMA (added to the store by every function here, as aptq.analyses adds the analysis tables)
------
plans   key PK (model + plan + group size (+ layer groups)), model → models, name, allocation (solver, "uniform",
        "manual" …), budget, group_size, request (JSON: the allocation request), plan (JSON: layer → bits), summary
        (JSON: aptq.allocate.summarize), created, layer_groups (JSON: layer → group size where it is not group_size,
        for plans of (bits, group size) pairs; NULL otherwise)
runs    key PK (model + calibration + plan + quantization settings + evaluation + PIPELINE_VERSION), created,
        model → models, model_name, corpus, eval_seqlen, eval_tokens, calibration → calibrations (NULL for RTN),
        method (rtn | gptq | attention), group_size, settings (JSON), plan (JSON), plan_key, plan_name,
        allocation, budget, analysis (the analysis whose errors predicted this plan, if any), avg_bits,
        effective_bits, size_mb, the two predicted errors (aptq.allocate.PREDICTED_ERRORS), perplexity, kl, top1,
        fp_perplexity, quant_seconds, eval_seconds, device, notes (fallbacks and warnings),
        coverage (aptq.coverage: the layers the plan decides, e.g. "blocks 0–3 of 30"), covered_avg_bits,
        covered_effective_bits (over those layers; avg_bits/effective_bits are over the whole model),
        label and tag (a person's name and tag for the run), completions (JSON: aptq.teaching samples),
        error_source (rtn | gptq | attention) and error_unit (heuristic | calibrated): whose predicted errors, in
        which unit, the run's predicted totals are (for knapsack plans, aptq.choices.ERROR_SOLVERS, also what
        chose the plan); NULL for runs without a prediction (a plan file) and in rows stored before these columns;
        nll_se, kl_se, top1_se: standard errors of the mean NLL, KL and top-1 over the evaluation windows
        (aptq.evaluate; the bands of the Trade-offs page), NULL in rows stored before them
baselines  (model, corpus, eval_seqlen, eval_tokens) PK, perplexity, tokens_per_second, created: full-precision
        perplexity measured on the Home page

A run row is written once, in one statement, after the model has been quantized and evaluated: there is never a
half-written row. `RunRecord` is that row as a typed record (what aptq.pipeline.run_plan returns).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from datetime import datetime

import pandas as pd
from scipy.stats import spearmanr

from aptq.allocate import PREDICTED_ERROR_ATTENTION, PREDICTED_ERROR_LAYERWISE, PREDICTED_ERRORS
from aptq.data import digest
from aptq.store import Store

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS plans (
    key VARCHAR PRIMARY KEY, model VARCHAR, name VARCHAR, allocation VARCHAR, budget DOUBLE, group_size INTEGER,
    request JSON, plan JSON, summary JSON, created TIMESTAMP DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS runs (
    key VARCHAR PRIMARY KEY, created TIMESTAMP DEFAULT current_timestamp, model VARCHAR, model_name VARCHAR,
    corpus VARCHAR, eval_seqlen INTEGER, eval_tokens BIGINT, calibration VARCHAR, method VARCHAR,
    group_size INTEGER, settings JSON, plan JSON, plan_key VARCHAR, plan_name VARCHAR, allocation VARCHAR,
    budget DOUBLE, analysis VARCHAR, avg_bits DOUBLE, effective_bits DOUBLE, size_mb DOUBLE,
    {PREDICTED_ERROR_ATTENTION} DOUBLE, {PREDICTED_ERROR_LAYERWISE} DOUBLE, perplexity DOUBLE, kl DOUBLE, top1 DOUBLE,
    fp_perplexity DOUBLE, quant_seconds DOUBLE, eval_seconds DOUBLE, device VARCHAR, notes VARCHAR);
ALTER TABLE plans ADD COLUMN IF NOT EXISTS layer_groups JSON;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS coverage VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS covered_avg_bits DOUBLE;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS covered_effective_bits DOUBLE;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS label VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS tag VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS completions JSON;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS error_source VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS error_unit VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS nll_se DOUBLE;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS kl_se DOUBLE;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS top1_se DOUBLE;
CREATE TABLE IF NOT EXISTS baselines (
    model VARCHAR, corpus VARCHAR, eval_seqlen INTEGER, eval_tokens BIGINT, perplexity DOUBLE,
    tokens_per_second DOUBLE, created TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (model, corpus, eval_seqlen, eval_tokens));
"""


@dataclass(frozen=True)
class RunRecord:
    """One row of the runs table (the columns of SCHEMA), and how the call that returned it came by it."""

    key: str
    model: str  # model fingerprint
    model_name: str
    corpus: str
    eval_seqlen: int
    eval_tokens: int
    calibration: str | None  # calibration fingerprint; None for RTN (no data)
    method: str  # a quantizer of aptq.choices.QUANTIZERS
    group_size: int
    settings: str  # JSON: the quantization settings that make the key, and the calibration sampling
    plan: str  # JSON: layer → bits (plan_json), complete
    plan_key: str
    plan_name: str | None
    allocation: str
    budget: float | None
    analysis: str | None  # the analysis whose errors predicted this plan
    avg_bits: float  # over the whole model
    effective_bits: float
    size_mb: float
    predicted_error_attention: float | None  # aptq.allocate.PREDICTED_ERRORS, when the plan came with a prediction
    predicted_error_layerwise: float | None
    perplexity: float
    kl: float
    top1: float
    fp_perplexity: float
    quant_seconds: float
    eval_seconds: float
    device: str
    notes: str | None  # fallbacks and warnings
    # The layers the plan decides (aptq.coverage) and the bits over them; None in rows stored before coverage was
    # recorded (aptq.coverage.fill_coverage derives them).
    coverage: str | None
    covered_avg_bits: float | None
    covered_effective_bits: float | None
    completions: str | None = None  # JSON: aptq.teaching samples
    label: str | None = None  # a person's name for the run
    tag: str | None = None
    error_source: str | None = None  # predicted_with: whose predicted errors the totals above are, None without any
    error_unit: str | None = None  # … and their unit
    # Standard errors over the evaluation windows (aptq.evaluate.Evaluation); None in rows stored before them.
    nll_se: float | None = None
    kl_se: float | None = None
    top1_se: float | None = None
    created: datetime | None = None  # set by the store
    # Not stored: how this call came by the run.
    cached: bool = False  # it was stored before: no quantization or evaluation was done
    export_dir: str | None = None  # where this call exported it

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        """The runs table's columns."""
        return tuple(f.name for f in fields(cls) if f.name not in ("cached", "export_dir"))

    @classmethod
    def from_row(cls, row: Mapping) -> RunRecord:
        """The record of a row read from the store (missing values, NaN included, become None)."""
        return cls(**{name: _plain(row[name]) for name in cls.columns() if name in row})

    def row(self) -> dict:
        """The stored columns (`created` left to the store)."""
        return {name: getattr(self, name) for name in self.columns() if name != "created"}

    def as_dict(self) -> dict:
        return asdict(self)


def _plain(value):
    """A value read from a DataFrame as a plain Python value: None for missing, numpy scalars unwrapped."""
    if value is None or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    return value.item() if hasattr(value, "item") else value


def plan_json(plan: dict[str, int]) -> str:
    """The canonical text of a plan (sorted names), used in keys and stored as is."""
    return json.dumps({name: int(bits) for name, bits in sorted(plan.items())}, sort_keys=True)


def plan_key(model_fp: str, plan: dict[str, int], group_size: int,
             layer_groups: tuple[tuple[str, int], ...] = ()) -> str:
    """The key of a plan of widths at `group_size`, with the layers whose group differs (pair candidates) apart."""
    return digest(model_fp, plan_json(plan), str(group_size), *([json.dumps(layer_groups)] if layer_groups else []))


def _ready(store: Store | None) -> Store:
    store = store or Store()
    store.add_schema(SCHEMA)
    return store


def save_plan(store: Store | None, model_fp: str, name: str, plan: dict[str, int], meta: dict) -> str:
    """Store a plan under `name` (a plan saved again under a new name keeps the newer name); return its key."""
    store = _ready(store)
    group_size = int(meta.get("group_size", 0))
    layer_groups = tuple(meta.get("layer_groups", ()))
    key = plan_key(model_fp, plan, group_size, layer_groups)
    store.execute("INSERT OR REPLACE INTO plans (key, model, name, allocation, budget, group_size, request, plan, "
                  "summary, layer_groups) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  [key, model_fp, name, meta.get("allocation", "manual"), meta.get("budget"), group_size,
                   json.dumps(meta.get("request", {}), default=str), plan_json(plan),
                   json.dumps(meta.get("summary", {}), default=str),
                   json.dumps(dict(layer_groups)) if layer_groups else None])
    return key


def stored_plans(store: Store | None = None, model_fp: str | None = None) -> pd.DataFrame:
    """Saved plans, newest first (all models unless `model_fp`)."""
    store = _ready(store)
    where, params = ("WHERE model = ?", [model_fp]) if model_fp else ("", [])
    return store.query(f"SELECT * FROM plans {where} ORDER BY created DESC", params)


def stored_runs(store: Store | None = None, model_fp: str | None = None) -> pd.DataFrame:
    """Quantization runs, newest first (all models unless `model_fp`), with their `quantizer` (quantizer_names)."""
    store = _ready(store)
    where, params = ("WHERE model = ?", [model_fp]) if model_fp else ("", [])
    runs = store.query(f"SELECT * FROM runs {where} ORDER BY created DESC", params)
    return runs.assign(quantizer=quantizer_names(runs))


def quantizer_names(runs: pd.DataFrame) -> pd.Series:
    """Each run's quantizer as tables and charts name it: its method, with the block refinement's steps where the run
    had one (aptq.blockwise: it moves the results as much as a change of method does, so its runs are drawn and
    ranked apart). Without a `settings` column (runs made up in tests), the method alone."""
    settings = runs["settings"] if "settings" in runs else [None] * len(runs)
    steps = [json.loads(text).get("block", {}).get("iterations", 0) if isinstance(text, str) else 0
             for text in settings]
    return pd.Series([f"{method} + {n} refinement steps" if n else str(method)
                      for method, n in zip(runs["method"], steps)], index=runs.index, dtype=object)


def find_run(store: Store | None, key: str) -> RunRecord | None:
    store = _ready(store)
    rows = store.query("SELECT * FROM runs WHERE key = ?", [key])
    return None if rows.empty else RunRecord.from_row(rows.iloc[0].to_dict())


def record_run(store: Store | None, record: RunRecord) -> None:
    """Write one finished run (one statement: all or nothing)."""
    store = _ready(store)
    store.write_frame("runs", pd.DataFrame([record.row()]))


def predicted_with(meta: Mapping) -> dict[str, str | None]:
    """The runs table's error_source and error_unit for a plan's `meta`: whose predicted errors, in which unit, its
    predicted totals are (for a knapsack plan also what chose it); None for a plan without a prediction."""
    predicted = meta.get(PREDICTED_ERROR_ATTENTION) is not None
    return {name: meta.get(name) if predicted else None for name in ("error_source", "error_unit")}


def set_prediction(store: Store | None, key: str, meta: dict) -> RunRecord:
    """Give a stored run the name, allocation, analysis, predicted errors and their source and unit (predicted_with)
    of `meta` (the latest prediction of its plan, e.g. from a newer analysis); return the row."""
    store = _ready(store)
    predicted = ", ".join(f"{name} = ?" for name in (*PREDICTED_ERRORS, "error_source", "error_unit"))
    store.execute("UPDATE runs SET plan_name = coalesce(?, plan_name), allocation = coalesce(?, allocation), "
                  f"budget = coalesce(?, budget), analysis = ?, {predicted} WHERE key = ?",
                  [meta.get("name"), meta.get("allocation"), meta.get("budget"), meta.get("analysis"),
                   *(meta.get(name) for name in PREDICTED_ERRORS), *predicted_with(meta).values(), key])
    return find_run(store, key)


def trust(runs: pd.DataFrame) -> pd.DataFrame:
    """Per quantizer (quantizer_names) and per source and unit of the predictions (predicted totals in different units
    do not rank together): Spearman rank correlation of the predicted total error with the measured KL and perplexity,
    over the runs that carry a prediction (one model and evaluation protocol at a time)."""
    rows = []
    usable = runs.dropna(subset=[PREDICTED_ERROR_ATTENTION, "kl"])
    made = usable.reindex(columns=["error_source", "error_unit"]).astype("string")
    labels = (made["error_source"] + " errors, " + made["error_unit"] + " unit").fillna("not recorded")
    for (quantizer, label), of_method in usable.groupby([quantizer_names(usable), labels]):
        row = {"quantizer": quantizer, "predicted_with": label, "runs": len(of_method)}
        for predicted, metric in PREDICTED_ERRORS.items():
            for measured in ("kl", "perplexity"):
                value = spearmanr(of_method[predicted], of_method[measured]).statistic if len(of_method) >= 3 \
                    else float("nan")
                row[f"spearman_{metric.removeprefix('err_')}_{measured}"] = value
        rows.append(row)
    return pd.DataFrame(rows)


# ---- runs a person manages: names, tags, deletion, filtering, export ------------------------------------------------

def label_run(store: Store | None, key: str, label: str | None = None, tag: str | None = None) -> None:
    """Give a run a name and a tag (None or blank clears them)."""
    store = _ready(store)
    store.execute("UPDATE runs SET label = ?, tag = ? WHERE key = ?",
                  [(label or "").strip() or None, (tag or "").strip() or None, key])


def delete_runs(store: Store | None, keys: list[str]) -> int:
    """Delete runs by key; the number deleted."""
    store = _ready(store)
    with store.transaction() as con:
        before = con.execute("SELECT count(*) FROM runs").fetchone()[0]
        con.execute("DELETE FROM runs WHERE list_contains(?, key)", [list(keys)])
        return before - con.execute("SELECT count(*) FROM runs").fetchone()[0]


def filter_runs(runs: pd.DataFrame, text: str = "", tag: str | None = None) -> pd.DataFrame:
    """Runs whose label, plan name, allocation, quantizer (e.g. "refinement"), tag or coverage contains `text`
    (case-insensitive), and whose tag is `tag` when one is given."""
    chosen = runs
    if tag:
        chosen = chosen[chosen["tag"] == tag]
    if text.strip():
        fields = ["label", "plan_name", "allocation", "method", "quantizer", "tag", "coverage"]
        haystack = chosen[[f for f in fields if f in chosen]].astype("string").fillna("").agg(" ".join, axis=1)
        chosen = chosen[haystack.str.contains(text.strip(), case=False, regex=False)]
    return chosen


def runs_csv(runs: pd.DataFrame) -> str:
    """The runs table as CSV (plans and completions left out: they are long JSON)."""
    return runs.drop(columns=[c for c in ("plan", "completions") if c in runs]).to_csv(index=False)


def record_baseline(store: Store | None, model_fp: str, corpus: str, seqlen: int, tokens: int, perplexity: float,
                    tokens_per_second: float) -> None:
    """Store a full-precision perplexity (one row per model and protocol; a remeasurement replaces it)."""
    store = _ready(store)
    store.write_frame("baselines", pd.DataFrame([{"model": model_fp, "corpus": corpus, "eval_seqlen": seqlen,
                                                  "eval_tokens": tokens, "perplexity": perplexity,
                                                  "tokens_per_second": tokens_per_second}]))


def stored_baselines(store: Store | None, model_fp: str) -> pd.DataFrame:
    """The model's full-precision perplexities, newest first."""
    store = _ready(store)
    return store.query("SELECT * FROM baselines WHERE model = ? ORDER BY created DESC", [model_fp])
