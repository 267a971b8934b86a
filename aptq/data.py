"""Corpora, calibration segments, evaluation windows and their fingerprints.

Corpora: the embedded Brown corpus (data/brown.jsonl.gz, see data/BROWN.md), WikiText-2 and C4 through `datasets`
(hub, local cache, or a directory saved with `save_to_disk`), and any local UTF-8 text file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from aptq import validate
from aptq.errors import UserError
from aptq.paths import CACHE_DIR, DATA_DIR

EMBEDDED_CORPUS = "brown"
BROWN_FILE = DATA_DIR / "brown.jsonl.gz"
TOKEN_CACHE = CACHE_DIR / "cache" / "tokens"
# Brown split (documented in data/BROWN.md): every document whose two-digit number is a multiple of 5 is evaluation.
BROWN_EVAL_EVERY = 5
# Local text files: the last tenth of the paragraphs is evaluation (our choice).
TEXT_EVAL_FRACTION = 0.1


@dataclass(frozen=True)
class Corpus:
    name: str
    calibration: str
    evaluation: str
    description: str

    @property
    def fingerprint(self) -> str:
        return digest(self.name, self.calibration, self.evaluation)

    def text(self, split: str) -> str:
        if split not in ("calibration", "evaluation"):
            raise ValueError(f"unknown split {split!r}")
        return self.calibration if split == "calibration" else self.evaluation


def digest(*parts: str) -> str:
    """A short content hash of the parts: the fingerprints and cache keys of the whole project."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def load_brown() -> Corpus:
    if not BROWN_FILE.is_file():
        raise UserError(f"The embedded corpus {BROWN_FILE} is missing; restore it from git "
                        f"(or rebuild it with scripts/convert_brown.py).")
    with gzip.open(BROWN_FILE, "rt", encoding="utf-8") as handle:
        documents = [json.loads(line) for line in handle]
    calibration, evaluation = [], []
    for doc in documents:
        (evaluation if int(doc["id"][2:]) % BROWN_EVAL_EVERY == 0 else calibration).append(doc["text"])
    return Corpus("brown", "\n\n".join(calibration), "\n\n".join(evaluation),
                  f"Brown corpus (1961 American English, 500 documents): {len(calibration)} calibration / "
                  f"{len(evaluation)} evaluation documents")


def load_text_file(path: Path) -> Corpus:
    if not path.is_file():
        raise UserError(f"Corpus file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"Corpus file {path} is not UTF-8 text.") from exc
    except OSError as exc:
        raise UserError(f"Corpus file {path} cannot be read ({exc.strerror}).") from exc
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise UserError(f"Corpus file {path} is empty.")
    cut = max(1, int(len(paragraphs) * (1 - TEXT_EVAL_FRACTION))) if len(paragraphs) > 1 else 1
    calibration, evaluation = paragraphs[:cut], paragraphs[cut:] or paragraphs
    return Corpus(f"file:{path.name}", "\n\n".join(calibration), "\n\n".join(evaluation),
                  f"text file {path} ({len(paragraphs)} paragraphs; last {TEXT_EVAL_FRACTION:.0%} for evaluation)")


def _load_dataset(*args, **kwargs):
    try:
        import datasets
    except ImportError as exc:
        raise UserError("The `datasets` package is needed for this corpus; install requirements.txt.") from exc
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:
        raise UserError(f"Dataset {args[0]!r} is not reachable and not in the local cache "
                        f"({type(exc).__name__}); use a local text file or the embedded corpus 'brown'.") from exc


def load_wikitext2() -> Corpus:
    # GPTQ protocol: calibrate on train, evaluate on test, each split joined with blank lines.
    data = _load_dataset("wikitext", "wikitext-2-raw-v1")
    return Corpus("wikitext2", "\n\n".join(data["train"]["text"]), "\n\n".join(data["test"]["text"]),
                  "WikiText-2 (raw): train for calibration, test for evaluation")


def load_c4() -> Corpus:
    files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
    data = _load_dataset("allenai/c4", data_files=files)
    # GPTQ protocol: the validation shard's first 1100 documents form the evaluation text.
    return Corpus("c4", "\n\n".join(data["train"]["text"][:20000]), " ".join(data["validation"]["text"][:1100]),
                  "C4 (en): first train shard for calibration, first 1100 validation documents for evaluation")


def load_saved_dataset(path: Path) -> Corpus:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
        splits = list(data.keys())
    except Exception as exc:  # datasets raises many kinds of errors on a damaged or foreign directory
        raise UserError(f"The dataset at {path} cannot be read as a saved DatasetDict ({type(exc).__name__}).") from exc
    train = next((s for s in ("train", "calibration") if s in splits), None)
    test = next((s for s in ("test", "validation", "evaluation") if s in splits), None)
    if train is None or test is None:
        raise UserError(f"The dataset at {path} needs a train and a test/validation split; it has {splits}.")
    if "text" not in data[train].column_names or "text" not in data[test].column_names:
        raise UserError(f"The dataset at {path} needs a 'text' column in its {train} and {test} splits.")
    return Corpus(f"saved:{path.name}", "\n\n".join(data[train]["text"]), "\n\n".join(data[test]["text"]),
                  f"saved dataset {path}: {train} for calibration, {test} for evaluation")


def load_corpus(spec: str = EMBEDDED_CORPUS) -> Corpus:
    """`brown` (embedded), `wikitext2`, `c4`, a saved `datasets` directory, or a UTF-8 text file."""
    named = {"brown": load_brown, "wikitext2": load_wikitext2, "c4": load_c4}
    if spec in named:
        return named[spec]()
    validate.corpus_source(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_saved_dataset(path)
    if path.suffix in (".txt", ".md", ".text") or path.exists():
        return load_text_file(path)
    raise UserError(f"Unknown corpus {spec!r}: use brown, wikitext2, c4, a text file or a saved dataset directory.")


# ---------------------------------------------------------------------------------------------------------------
# Tokens


_TOKENIZER_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the whole tokenizer, remembered per tokenizer object (serialising a 49k-token vocabulary takes about
    50 ms, and every run and split asks; nothing here changes a tokenizer once it is loaded)."""
    known = _TOKENIZER_FINGERPRINTS.get(tokenizer)
    if known is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        content = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
        known = _TOKENIZER_FINGERPRINTS[tokenizer] = digest(type(tokenizer).__name__, content)
    return known


def token_ids(tokenizer, corpus: Corpus, split: str) -> torch.Tensor:
    """The split's text as one 1-D stream of token ids, cached on disk by tokenizer and text fingerprints."""
    text = corpus.text(split)
    if not text.strip():
        raise UserError(f"The {split} split of corpus {corpus.name!r} is empty.")
    cache = TOKEN_CACHE / f"{tokenizer_fingerprint(tokenizer)}-{corpus.fingerprint}-{split}.pt"
    if cache.is_file():
        try:
            return torch.load(cache)
        except Exception:
            cache.unlink()  # a torn write from an interrupted run: recompute
    # Long texts are encoded in pieces so the tokenizer never warns about the model's maximum length.
    pieces = text.split("\n\n")
    ids: list[int] = []
    for start in range(0, len(pieces), 256):
        chunk = "\n\n".join(pieces[start:start + 256]) + ("\n\n" if start + 256 < len(pieces) else "")
        ids.extend(tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"])
    tensor = torch.tensor(ids, dtype=torch.long)
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(f".{os.getpid()}.partial")  # one per process: concurrent writers
    torch.save(tensor, partial)
    partial.replace(cache)
    return tensor


@dataclass(frozen=True)
class Sampling:
    """N random calibration segments of L tokens drawn with a seed (GPTQ style: uniform random start positions)."""

    n_samples: int
    seqlen: int
    seed: int = 0

    def fingerprint(self, corpus: Corpus, tokenizer_fp: str) -> str:
        return digest(corpus.fingerprint, tokenizer_fp, str(self.n_samples), str(self.seqlen), str(self.seed))


def calibration_segments(ids: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    if sampling.n_samples < 1 or sampling.seqlen < 2:
        raise UserError("Calibration needs at least 1 segment of at least 2 tokens.")
    needed = sampling.n_samples * sampling.seqlen
    if ids.numel() < needed:
        raise UserError(f"The calibration text has {ids.numel()} tokens, fewer than {sampling.n_samples} segments × "
                        f"{sampling.seqlen} tokens = {needed}; lower the number of segments or their length, or use "
                        f"a larger corpus.")
    generator = torch.Generator().manual_seed(sampling.seed)
    starts = torch.randint(0, ids.numel() - sampling.seqlen + 1, (sampling.n_samples,), generator=generator)
    return torch.stack([ids[s:s + sampling.seqlen] for s in starts.tolist()])


def evaluation_windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens from the start of the stream (the GPTQ perplexity protocol)."""
    if seqlen < 2:
        raise UserError("The evaluation window must hold at least 2 tokens.")
    n_windows = ids.numel() // seqlen
    if max_tokens is not None:
        n_windows = min(n_windows, max_tokens // seqlen)
    if n_windows < 1:
        raise UserError(f"The evaluation text has {ids.numel()} tokens; a window needs {seqlen} "
                        f"(and --tokens {max_tokens} allows {0 if max_tokens is None else max_tokens // seqlen}): "
                        f"use a shorter window, more tokens or a larger corpus.")
    return ids[: n_windows * seqlen].view(n_windows, seqlen)
