"""What every page needs: the chosen model and corpus, loaded once per server process and shared by sessions."""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from aptq.data import EMBEDDED_CORPUS, Corpus, load_corpus
from aptq.errors import UserError
from aptq.models import EMBEDDED_MODEL, LoadedModel, load_model
from aptq.progress import Progress

CORPORA = {"brown": "Brown (embedded)", "wikitext2": "WikiText-2 (datasets)", "c4": "C4 (datasets)",
           "file": "a local text file…"}


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


def current_model() -> LoadedModel | None:
    """The chosen model, or None after showing the reason with st.error."""
    try:
        return cached_model(model_source())
    except UserError as exc:
        st.error(f"{exc}")
        return None


def current_corpus() -> Corpus | None:
    try:
        return cached_corpus(corpus_spec())
    except UserError as exc:
        st.error(f"{exc}")
        return None


def progress_bar(label: str) -> tuple[Progress, Callable[[], None]]:
    """A Progress callback drawing st.progress, and a function that removes the bar."""
    bar = st.progress(0.0, text=label)

    def update(done: int, total: int, message: str) -> None:
        bar.progress(min(1.0, done / max(total, 1)), text=f"{label}: {done}/{total} {message}")

    return update, bar.empty
