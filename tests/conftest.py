"""Shared fixtures: tiny random models of each supported family (see tests/tiny_models.py).

- `tiny_model(family, **config_overrides)`: an in-memory model in eval mode with eager attention, and its adapter.
- `tiny_model_dir(family)`: the same kind of model saved as an HF directory with a tokenizer (for `load_model`),
  built once per test session and family.
- `at`: a fresh dashboard session (Streamlit's AppTest) on the requesting module's `analyzed` fixture.
- Every tiny model carries the embedded model's tokenizer (a 3.5 MB tokenizer.json, ~0.25 s of CPU a read), and the
  tests call `load_model` hundreds of times: each directory's tokenizer is read once per session (see
  `tokenizers_read_once`); a directory whose files change is read again.

Markers (registered in pyproject.toml): tests/test_browser.py is `browser`; tests that load the embedded model, and
slow ones (measured with `pytest --durations=0`), carry `@pytest.mark.integration` themselves; every other test is
`unit` (`make check` runs those).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from aptq.models import Architecture, architecture_of
from tests.tiny_models import save_tiny_model, tiny_config

APP = Path(__file__).resolve().parent.parent / "app.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name == "test_browser.py":
            item.add_marker(pytest.mark.browser)
        elif item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session", autouse=True)
def tokenizers_read_once():
    """`AutoTokenizer.from_pretrained(directory)` answered from a session cache keyed by the directory and its files'
    names, sizes and modification times (nothing in aptq or the tests changes a loaded tokenizer)."""
    from transformers import AutoTokenizer

    read = AutoTokenizer.from_pretrained.__func__
    cache: dict[tuple, object] = {}

    def from_pretrained(cls, name, *args, **kwargs):
        path = Path(name)
        if args or kwargs or not path.is_dir():
            return read(cls, name, *args, **kwargs)
        stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.iterdir()) if p.is_file())
        key = (str(path.resolve()), stamp)
        if key not in cache:
            cache[key] = read(cls, name)
        return cache[key]

    AutoTokenizer.from_pretrained = classmethod(from_pretrained)
    yield
    AutoTokenizer.from_pretrained = classmethod(read)


def build_tiny_model(family: str, seed: int = 0, **overrides) -> tuple[torch.nn.Module, Architecture]:
    config = tiny_config(family)
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    return model, architecture_of(model.config)


@pytest.fixture
def tiny_model() -> Callable[..., tuple[torch.nn.Module, Architecture]]:
    return build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[[str], Path]:
    saved: dict[str, Path] = {}

    def directory(family: str) -> Path:
        if family not in saved:
            saved[family] = save_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return saved[family]

    return directory


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """A small local text corpus (random sentences over a fixed vocabulary), split by aptq.data's text-file rule."""
    import numpy as np

    from aptq.data import load_corpus

    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    rng = np.random.default_rng(0)
    path.write_text("\n\n".join(" ".join(rng.choice(words, 40)) for _ in range(200)))
    return load_corpus(str(path))


@pytest.fixture
def at(analyzed, tmp_path, monkeypatch):
    """A fresh dashboard session on the model of the module's `analyzed` fixture — (store path, model directory) —
    over a private copy of that store (no analysis_request: a new session opens on the stored analysis)."""
    from streamlit.testing.v1 import AppTest

    source, model = analyzed
    shutil.copy(source, tmp_path / "store.duckdb")
    monkeypatch.setenv("APTQ_STORE", str(tmp_path / "store.duckdb"))
    session = AppTest.from_file(str(APP), default_timeout=60)
    session.session_state["model_source"] = model
    return session
