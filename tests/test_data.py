import pytest
import torch

from aptq.data import (
    Corpus,
    Sampling,
    calibration_segments,
    evaluation_windows,
    load_brown,
    load_corpus,
    token_ids,
    tokenizer_fingerprint,
)
from aptq.errors import UserError
from aptq.models import load_model


def test_brown_split_is_fixed_and_disjoint():
    corpus = load_brown()
    assert corpus.description.startswith("Brown corpus") and "407 calibration / 93 evaluation" in corpus.description
    assert corpus.fingerprint == load_brown().fingerprint
    assert "Fulton County Grand Jury" in corpus.calibration  # ca01 is calibration, ca05 evaluation
    assert not set(corpus.evaluation.split("\n\n")) & set(corpus.calibration.split("\n\n"))


def test_calibration_segments_are_seeded():
    ids = torch.arange(10_000)
    a = calibration_segments(ids, Sampling(8, 128, seed=1))
    assert a.shape == (8, 128) and torch.equal(a, calibration_segments(ids, Sampling(8, 128, seed=1)))
    assert not torch.equal(a, calibration_segments(ids, Sampling(8, 128, seed=2)))
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 128)) for row in a)  # contiguous segments
    corpus = Corpus("x", "a", "b", "")
    assert Sampling(8, 128, 1).fingerprint(corpus, "t") != Sampling(8, 128, 2).fingerprint(corpus, "t")


def test_too_short_calibration_text_says_how_many_tokens():
    with pytest.raises(UserError, match="has 100 tokens, fewer than 4 segments × 64 tokens = 256"):
        calibration_segments(torch.arange(100), Sampling(4, 64))


def test_evaluation_windows_are_non_overlapping():
    windows = evaluation_windows(torch.arange(1000), 128, max_tokens=600)
    assert windows.shape == (4, 128) and torch.equal(windows.flatten(), torch.arange(512))
    with pytest.raises(UserError, match="has 100 tokens; a window needs 128"):
        evaluation_windows(torch.arange(100), 128)


def test_text_file_corpus_and_bad_files(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("\n\n".join(f"Paragraph number {i}." for i in range(20)))
    corpus = load_corpus(str(path))
    assert "Paragraph number 19." in corpus.evaluation and "Paragraph number 0." in corpus.calibration
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="is empty"):
        load_corpus(str(tmp_path / "empty.txt"))
    with pytest.raises(UserError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"))


@pytest.mark.integration
def test_token_stream_is_cached_and_stable():
    tokenizer = load_model(device="cpu").tokenizer
    corpus = Corpus("tiny", "hello world. " * 50, "the end. " * 50, "")
    first = token_ids(tokenizer, corpus, "evaluation")
    assert torch.equal(first, token_ids(tokenizer, corpus, "evaluation")) and first.numel() > 50
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(tokenizer)
