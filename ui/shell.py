"""The frame around every page: navigation with readable names, presentation mode, and the URL that restores a view.
"""

from __future__ import annotations

import streamlit as st

from aptq.share import SharedView, groups_from_text, groups_to_text
from ui.session import AnalysisRequest

PAGES = (("app.py", "Home", "🏠"), ("pages/1_Sensitivity.py", "Sensitivity", "🔍"),
         ("pages/2_Bit_budget.py", "Bit budget", "🎚️"), ("pages/3_Quantize.py", "Quantize", "⚙️"),
         ("pages/4_Trade_offs.py", "Trade-offs", "📈"))
# Metric labels carry the scope of their number ("Average bits (whole model)"): they wrap rather than end in "…".
READABLE_CSS = """<style>
[data-testid="stMetricLabel"], [data-testid="stMetricLabel"] * { white-space: normal !important;
  overflow: visible !important; text-overflow: clip !important; height: auto !important; }
</style>"""
# Larger type needs the whole width: in the centred column the numbers of a row of metrics ended in "…".
PRESENTATION_CSS = """<style>
html, .stApp { font-size: 22px; }
[data-testid="stMainBlockContainer"] { max-width: none; padding-left: 3rem; padding-right: 3rem; }
.stApp h1 { font-size: 2.6rem; } .stApp h2, .stApp h3 { font-size: 1.9rem; }
[data-testid="stMetricValue"] { font-size: 1.7rem; }
[data-testid="stCaptionContainer"] { font-size: 1.05rem; }
</style>"""


def navigate() -> bool:
    """Register the pages (their sidebar names) and run the chosen one; True when it is Home (app.py goes on)."""
    page = st.navigation([st.Page(path, title=title, icon=icon, default=path == "app.py")
                          for path, title, icon in PAGES])
    restore_from_url()
    st.html(READABLE_CSS)
    presentation_toggle()
    if page.url_path:
        try:
            page.run()
        finally:  # after the page, whose widgets may have changed the view (and whose switch clears the URL)
            write_url()
        return False
    return True


def presenting() -> bool:
    """Presentation mode: larger type, and the pages leave out controls a lecture does not need."""
    return bool(st.session_state.get("presentation"))


def presentation_toggle() -> None:
    st.sidebar.toggle("Presentation mode", key="presentation",
                      help="Larger fonts and fewer controls, for a projector.")
    if presenting():
        st.html(PRESENTATION_CSS)


def restore_from_url() -> None:
    """Once per session, before any widget: the view the URL names (model, corpus, analysis and its options, solver,
    error source, unit, width multiples, budget, pins)."""
    if st.session_state.get("url_restored"):
        return
    st.session_state["url_restored"] = True
    view = SharedView.from_params(st.query_params.to_dict())
    if view.model:
        st.session_state["model_source"] = view.model
    if view.corpus:
        st.session_state["corpus_spec"] = view.corpus
    if None not in (view.samples, view.seqlen, view.group):
        st.session_state["analysis_request"] = AnalysisRequest(
            view.samples, view.seqlen, view.group, view.blocks, quantizer_errors=bool(view.quantizer_errors),
            extra_group_sizes=groups_from_text(view.extra_groups), calibrate_unit=bool(view.calibrate))
    if view.solver:
        st.session_state["method"] = view.solver
    # Error source, unit and multiples are offered by the analysis: one it lacks falls back to Bit budget's first
    # choice.
    for key, value in (("error_source", view.errors), ("error_unit", view.unit), ("width_multiples", view.multiples)):
        if value:
            st.session_state[key] = value
    if view.budget is not None:
        st.session_state["budget"] = view.budget
    if view.pins:
        st.session_state["url_pins"] = view.pins  # resolved against the analysis's layers on the Bit budget page


def write_url() -> None:
    """Put this session's view into the address bar (so copying the URL shares it)."""
    state = st.session_state
    request: AnalysisRequest | None = state.get("analysis_request")
    view = SharedView(state.get("model_source"), state.get("corpus_spec"),
                      request.samples if request else None, request.seqlen if request else None,
                      request.group_size if request else None, request.max_blocks if request else None,
                      state.get("method"), state.get("budget"), state.get("pins_text") or None,
                      request.quantizer_errors or None if request else None,
                      groups_to_text(request.extra_group_sizes) if request else None,
                      request.calibrate_unit or None if request else None,
                      state.get("error_source"), state.get("error_unit"),
                      None if state.get("width_multiples") in (None, "none") else state["width_multiples"])
    params = view.to_params()
    if params != st.query_params.to_dict():
        st.query_params.from_dict(params)
