"""The stored analysis the dashboard's page tests open: a tiny llama, analysed once per test module."""

from __future__ import annotations

from pathlib import Path

from aptq.data import load_corpus
from aptq.models import load_model
from aptq.sensitivity import analyze
from aptq.store import Store
from ui.session import AnalysisRequest


def analyzed_tiny_llama(tmp_path_factory, tiny_model_dir) -> tuple[Path, str]:
    """A store with a complete analysis of the tiny llama at the dashboard tests' settings (4 × 64, groups of 64),
    and the model's directory: the usual `analyzed` fixture of a page-test module."""
    request = AnalysisRequest(samples=4, seqlen=64, group_size=64)
    model = str(tiny_model_dir("llama"))
    path = tmp_path_factory.mktemp("analyzed") / "store.duckdb"
    analyze(load_model(model, device="cpu"), load_corpus("brown"), request.sampling, request.settings,
            store=Store(path))
    return path, model
