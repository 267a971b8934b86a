"""What every page needs: the chosen model and corpus (loaded once per server process and shared by sessions), the
analysis settings of this session, and the stored analysis they select (read from the DuckDB store, cached per key).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

import duckdb
import pandas as pd
import streamlit as st

from aptq import analyses, history, timing
from aptq.calibrate import MeasuredMultiples, UnitSettings, unit_settings_for, width_multiple_choices, with_unit
from aptq.data import EMBEDDED_CORPUS, Corpus, Sampling, load_corpus
from aptq.errors import UserError
from aptq.models import EMBEDDED_MODEL, LoadedModel, load_model, model_fingerprint
from aptq.sensitivity import (
    AnalysisSettings,
    analysis_key,
    check_extra_group_sizes,
    default_calibration,
    default_group_size,
)
from aptq.store import Store, default_path

CORPORA = {"brown": "Brown (embedded)", "wikitext2": "WikiText-2 (datasets)", "c4": "C4 (datasets)",
           "file": "a local text file…"}
T = TypeVar("T")


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def cached_model(source: str) -> LoadedModel:
    return load_model(source)


@st.cache_resource(show_spinner="Reading the corpus…", max_entries=4)
def cached_corpus(spec: str) -> Corpus:
    return load_corpus(spec)


def model_source() -> str:
    return st.session_state.get("model_source", EMBEDDED_MODEL)


def corpus_spec() -> str:
    return st.session_state.get("corpus_spec", EMBEDDED_CORPUS)


def _chosen(load: Callable[[str], T], spec: str, what: str) -> T | None:
    """The chosen model or corpus, or None after showing the reason with st.error."""
    try:
        return load(spec)
    except UserError as exc:
        st.error(f"{exc} Choose another {what} on the Home page.")
        return None


def current_model() -> LoadedModel | None:
    """The chosen model, and st.info when the attention-aware path does not apply to it (each page asks once)."""
    loaded = _chosen(cached_model, model_source(), "model")
    if loaded is not None and loaded.attention_unavailable:
        st.info(loaded.attention_unavailable)
    return loaded


def current_corpus() -> Corpus | None:
    return _chosen(cached_corpus, corpus_spec(), "corpus")


def model_and_corpus_or_stop() -> tuple[LoadedModel, Corpus, str]:
    """The chosen model, corpus and model fingerprint; the page stops (st.error has said why) when either fails."""
    loaded, corpus = current_model(), current_corpus()
    if loaded is None or corpus is None:
        st.stop()
    return loaded, corpus, cached_model_fingerprint(model_source())


def checked(check: Callable[[], object]) -> bool:
    """Run an aptq.validate check on what the person typed; False after st.error gave its one sentence."""
    try:
        check()
    except UserError as exc:
        st.error(str(exc))
        return False
    return True


def usable_choice(source: str, spec: str) -> bool:
    """Whether the model and corpus typed on Home load (then they are cached for every page); otherwise st.error
    says why, and the session keeps its previous choice instead of carrying the bad one to every page."""
    return checked(lambda: (cached_corpus(spec), cached_model(source)))


def page_header(title: str) -> None:
    st.set_page_config(page_title=f"{title} · APTQ studio", page_icon="🎚️", layout="wide")
    st.title(title)
    spec = corpus_spec()
    st.caption(f"Model `{model_source()}` · corpus {CORPORA.get(spec, f'`{spec}`')} — change them on the Home page.")


STORE_ERRORS = (UserError, duckdb.Error)


def store_error(exc: Exception) -> None:
    """A busy, unreadable or older-version store as one st.error that names the fix, never a traceback."""
    if isinstance(exc, UserError):
        st.error(str(exc))
    else:
        st.error(f"The cache {default_path()} could not be read ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                 f"it may come from another version of this project: move it away or point APTQ_STORE elsewhere.")


def store_call(action: Callable[[], T]) -> T | None:
    """Run a store operation; None after store_error explained a failure."""
    try:
        return action()
    except STORE_ERRORS as exc:
        store_error(exc)
        return None


# ---- analysis settings of this session --------------------------------------------------------------------------

@dataclass(frozen=True)
class AnalysisRequest:
    """What the Home page's analysis controls choose; together with model and corpus it selects one analysis (and the
    options of `aptq analyze`: --quantizer-errors, --extra-group-sizes, --calibrate-unit)."""

    samples: int
    seqlen: int
    group_size: int
    max_blocks: int | None = None  # None: every block
    seed: int = 0
    quantizer_errors: bool = False
    extra_group_sizes: tuple[int, ...] = ()
    calibrate_unit: bool = False  # then measure the calibrated unit; stored beside the analysis, not in its key

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.samples, self.seqlen, self.seed)

    @property
    def settings(self) -> AnalysisSettings:
        return AnalysisSettings(group_size=self.group_size, max_blocks=self.max_blocks,
                                quantizer_errors=self.quantizer_errors, extra_group_sizes=self.extra_group_sizes)

    @property
    def costs_extra(self) -> bool:
        """Options whose time the analysis ETA does not count (aptq.timing)."""
        return self.quantizer_errors or bool(self.extra_group_sizes) or self.calibrate_unit

    def check(self, loaded: LoadedModel) -> UnitSettings | None:
        """The checks `aptq analyze` makes of these options (the Home page offers no negative group size), before any
        work; the unit calibration's settings when it is asked for."""
        check_extra_group_sizes(loaded, self.settings)
        return unit_settings_for(self.samples, self.settings.bits, self.seed) if self.calibrate_unit else None


@st.cache_data(show_spinner=False, max_entries=8)
def cached_model_fingerprint(source: str) -> str:
    return model_fingerprint(cached_model(source).path)


@st.cache_data(show_spinner="Fingerprinting model and corpus…", max_entries=32)
def cached_analysis_key(source: str, spec: str, request: AnalysisRequest) -> str:
    # Hashing the corpus text and the tokenizer takes tens of ms: done once per choice, not on every rerun.
    return analysis_key(cached_model(source), cached_corpus(spec), request.sampling, request.settings)


def _latest_stored_request(loaded: LoadedModel, corpus: Corpus) -> AnalysisRequest | None:
    """The settings of the newest complete analysis of this model on this corpus, so a new session opens on it."""
    stored = analyses.latest_complete(Store(), cached_model_fingerprint(model_source()), corpus.fingerprint)
    if stored is None:
        return None
    request = AnalysisRequest(stored.n_samples, stored.seqlen, int(stored.settings["group_size"]),
                              stored.settings["max_blocks"], stored.seed,
                              bool(stored.settings.get("quantizer_errors")),
                              tuple(stored.settings.get("extra_group_sizes", ())))
    # Analyses made with settings the dashboard does not offer (e.g. other widths from the CLI) cannot be selected.
    offered = request.settings.key_fields() | {"dtype": stored.settings["dtype"]}
    return request if offered == stored.settings else None


def _default_request(loaded: LoadedModel) -> AnalysisRequest:
    samples, seqlen = default_calibration(loaded.device)
    return AnalysisRequest(samples, min(seqlen, loaded.max_length), default_group_size(loaded.arch))


def analysis_request(loaded: LoadedModel, corpus: Corpus) -> AnalysisRequest:
    """This session's analysis settings: chosen on Home, else the newest stored analysis, else the defaults."""
    request = st.session_state.get("analysis_request")
    if request is None:
        try:
            request = _latest_stored_request(loaded, corpus) or _default_request(loaded)
        except STORE_ERRORS:  # the page's next store read reports it; look again on the next run
            return _default_request(loaded)
        st.session_state["analysis_request"] = request
    return request


# ---- the stored analysis ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Analysis:
    key: str
    layers: pd.DataFrame
    errors: pd.DataFrame
    group_size: int
    description: str
    model_fp: str
    request: AnalysisRequest
    units: pd.DataFrame | None = None  # its calibrated unit (stored_unit), when measured
    widths: pd.DataFrame | None = None  # its measured width multiples (stored_widths), every unit and source

    @property
    def units_offered(self) -> list[str]:
        """The units the allocation can plan in with this analysis: the heuristic one, and the calibrated one once
        measured (Home's "Calibrate the unit", or aptq analyze --calibrate-unit)."""
        return ["heuristic"] + (["calibrated"] if self.units is not None else [])

    def layers_in(self, unit: str) -> pd.DataFrame:
        """The layers table the allocation reads for `unit` (with the measured rates for the calibrated one)."""
        return with_unit(self.layers, self.units) if unit == "calibrated" else self.layers

    def width_multiples_offered(self, unit: str, source: str) -> dict[str, MeasuredMultiples]:
        """The measured width (and grid) multiples a plan in `unit` with `source`'s errors at the analysis's group
        size may charge (aptq sweep --width-multiples measures them), by label."""
        return {} if self.widths is None else width_multiple_choices(self.widths, unit, source, self.group_size)


class _NotStored(LookupError):
    """Raised inside the cached reader so that a missing analysis is not cached (it may be finished later)."""


@st.cache_data(show_spinner="Reading the analysis…", max_entries=16)
def _stored_frames(store_path: str, key: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    frames = analyses.load(Store(store_path), key)
    if frames is None:
        raise _NotStored(key)
    return frames


def stored_analysis(key: str) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    try:
        return _stored_frames(str(default_path()), key)
    except _NotStored:
        return None


@st.cache_data(show_spinner=False, max_entries=16)
def _stored_units(store_path: str, unit_key: str, n_layers: int) -> pd.DataFrame:
    units = analyses.load_units(Store(store_path), unit_key)
    if len(units) < n_layers:  # measured in part (interrupted, or still running): not cached
        raise _NotStored(unit_key)
    return units


def stored_unit(key: str, request: AnalysisRequest, layers: pd.DataFrame) -> pd.DataFrame | None:
    """The calibrated unit of analysis `key` (aptq.calibrate, with the settings `aptq analyze --calibrate-unit` uses
    for the request's seed) when every layer of `layers` has been measured, else None."""
    try:
        return _stored_units(str(default_path()), UnitSettings(seed=request.seed).key(key), len(layers))
    except _NotStored:
        return None


@st.cache_data(show_spinner=False, max_entries=16, ttl=60)  # a sweep may add some while the page is open
def _stored_widths(store_path: str, key: str) -> pd.DataFrame:
    return analyses.load_widths(Store(store_path), key)


def forget_stored_widths() -> None:
    """After a measurement of width multiples: the next read sees them at once, not after the cache's minute."""
    _stored_widths.clear()


def stored_widths(key: str) -> pd.DataFrame | None:
    """The width multiples measured for analysis `key` (aptq.calibrate.calibrate_widths), None when there are none."""
    widths = _stored_widths(str(default_path()), key)
    return widths if len(widths) else None


def requested_analysis(loaded: LoadedModel, corpus: Corpus
                       ) -> tuple[AnalysisRequest, str, tuple[pd.DataFrame, pd.DataFrame] | None]:
    """This session's analysis settings, their key, and the stored analysis they select (None when there is none, or
    after st.error on a store failure)."""
    request = analysis_request(loaded, corpus)
    key = cached_analysis_key(model_source(), corpus_spec(), request)
    return request, key, store_call(lambda: stored_analysis(key))


def analysis_status(key: str) -> dict | None:
    """The analysis row (status, blocks_done, n_blocks, seconds, device), read fresh from the store."""
    record = analyses.status(Store(), key)
    return None if record is None else asdict(record)


def expected_analysis_time(loaded: LoadedModel, request: AnalysisRequest,
                           blocks_done: int) -> timing.AnalysisTime | None:
    """What the blocks still to analyse should take on this device, from the blocks of this model analysed before."""
    rates = analyses.block_seconds_per_token(Store(), cached_model_fingerprint(model_source()), str(loaded.device))
    blocks = min(request.max_blocks or loaded.arch.n_blocks, loaded.arch.n_blocks) - blocks_done
    return timing.expected_analysis_time(rates, blocks, request.samples, request.seqlen)


def describe(loaded: LoadedModel, corpus: Corpus, request: AnalysisRequest) -> str:
    blocks = "all blocks" if request.max_blocks is None else \
        f"first {min(request.max_blocks, loaded.arch.n_blocks)} of {loaded.arch.n_blocks} blocks"
    group = f"group {request.group_size}" if request.group_size else "per-channel"
    options = [*(["errors of GPTQ and attention-aware GPTQ"] if request.quantizer_errors else []),
               *([f"errors also at groups {', '.join(map(str, request.extra_group_sizes))}"]
                 if request.extra_group_sizes else []),
               *(["calibrated unit"] if request.calibrate_unit else [])]
    return (f"{loaded.display_name} on {corpus.name}, {request.samples} × {request.seqlen} calibration tokens "
            f"(seed {request.seed}), {group}, {blocks}" + "".join(f", {option}" for option in options))


def current_analysis() -> Analysis | None:
    """The stored analysis selected by this session's model, corpus and settings; None after st.info/st.error says
    what to do. Reads only the store (cached per analysis key): a slider move does no database or model work."""
    loaded, corpus = current_model(), current_corpus()
    if loaded is None or corpus is None:
        return None
    return analysis_of(loaded, corpus)


def analysis_of(loaded: LoadedModel, corpus: Corpus) -> Analysis | None:
    """current_analysis for a page that has the model and corpus already (and has said what the model lacks)."""
    request = analysis_request(loaded, corpus)
    key = cached_analysis_key(model_source(), corpus_spec(), request)
    try:
        frames = stored_analysis(key)
        status = None if frames else analysis_status(key)
    except STORE_ERRORS as exc:
        store_error(exc)
        return None
    if frames is None:
        if status is None:
            st.info(f"No sensitivity analysis for this model and these settings yet "
                    f"({describe(loaded, corpus, request)}): start one on the Home page.")
        else:
            st.info(f"The analysis stopped after {status['blocks_done']} of {status['n_blocks']} blocks: resume it "
                    f"on the Home page (finished blocks are kept).")
        st.page_link("app.py", label="Go to the Home page", icon="🏠")
        return None
    layers, errors = frames
    units = store_call(lambda: stored_unit(key, request, layers))
    widths = store_call(lambda: stored_widths(key))
    return Analysis(key, layers, errors, request.group_size, describe(loaded, corpus, request),
                    cached_model_fingerprint(model_source()), request, units, widths)


def save_current_plan(name: str, plan: dict, analysis: Analysis) -> str | None:
    """Store the Bit budget page's plan (`st.session_state["plan"]`) under `name`; its key, or None after st.error."""
    meta = {"allocation": plan["method"], "budget": plan["budget"], "group_size": analysis.group_size,
            "request": plan["request"], "summary": plan["summary"] | {"analysis": analysis.key},
            "layer_groups": plan.get("layer_groups", ())}
    return store_call(lambda: history.save_plan(Store(), analysis.model_fp, name, plan["bits"], meta))

