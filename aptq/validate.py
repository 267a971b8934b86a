"""Arguments and paths checked before any work starts, shared by the command line and the dashboard.

Each function returns the value to use or raises `UserError` with one sentence that names the fix. The module imports
neither torch nor transformers at import time, so `python -m aptq --help` and argument errors answer at once; the few
checks that need them (device, vocabulary) import them inside.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from aptq.choices import EMBEDDED_MODEL, NAMED_CORPORA
from aptq.errors import UserError

MIN_BITS, MAX_BITS = 2, 8  # the integer grids aptq.quantizer implements
MAX_SEED = 2**32 - 1  # (our choice) the range every generator we seed accepts (numpy's is the narrowest)


def at_least(value: int, low: int, what: str) -> int:
    if value < low:
        raise UserError(f"{what} must be at least {low}, got {value}.")
    return value


def seed(value: int, what: str = "The seed") -> int:
    if not 0 <= value <= MAX_SEED:
        raise UserError(f"{what} must be between 0 and {MAX_SEED}, got {value}.")
    return value


def bit_widths(values: Iterable[int], what: str) -> tuple[int, ...]:
    """A non-empty set of widths the quantizer implements, sorted."""
    widths = tuple(sorted(set(values)))
    if not widths:
        raise UserError(f"{what} is empty; give at least one width between {MIN_BITS} and {MAX_BITS} bits.")
    outside = [w for w in widths if not MIN_BITS <= w <= MAX_BITS]
    if outside:
        raise UserError(f"{what}: {outside[0]} bits is not a width the quantizer has; use {MIN_BITS} to {MAX_BITS}.")
    return widths


MAX_BUDGETS = 1000  # (our choice) more points would take days: a step like 0.0001 is a typo


def parse_budgets(text: str) -> list[float]:
    """"2.5:4.5:0.25" (start:stop:step, inclusive) or "3,3.5,4"."""
    try:
        if ":" in text:
            start, stop, step = (float(part) for part in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            span = (stop - start) / step
            if not math.isfinite(span) or span >= MAX_BUDGETS:
                raise UserError(f"Budgets {text!r} make more than {MAX_BUDGETS} points; use a larger step.")
            return [round(start + i * step, 6) for i in range(math.floor(span + 1e-9) + 1)]
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"Budgets must be start:stop:step (e.g. 2.5:4.5:0.25) or a list like 3,3.5,4; got {text!r}."
                        ) from None


def budgets(values: Iterable[float], candidates: tuple[int, ...]) -> list[float]:
    """Average-bit budgets a plan over `candidates` can meet: finite, between the narrowest and widest candidate."""
    chosen = list(values)
    if not chosen:
        raise UserError("No budget given; use start:stop:step (e.g. 2.5:4.5:0.25) or a list like 3,3.5,4.")
    low, high = min(candidates), max(candidates)
    for budget in chosen:
        if not math.isfinite(budget) or not low <= budget <= high:
            raise UserError(f"The budget {budget:g} bits is outside the candidate widths' range {low}–{high}; "
                            f"choose budgets in that range or other candidates.")
    return chosen


def group_size(value: int) -> int:
    if value < 0:
        raise UserError(f"The group size must be 0 (per output channel) or a positive number of columns, got {value}.")
    return value


def within_context(seqlen: int, max_length: int, what: str) -> int:
    """Positions past the trained context are garbage for RoPE models and an IndexError for learned positions."""
    if seqlen > max_length:
        raise UserError(f"{what} of {seqlen} tokens is longer than the model's context of {max_length} tokens; "
                        f"use {max_length} or less.")
    return seqlen


def block_count(max_blocks: int | None, n_blocks: int) -> int | None:
    if max_blocks is not None and not 1 <= max_blocks <= n_blocks:
        raise UserError(f"The model has {n_blocks} blocks; the blocks to analyze (--max-blocks) must be 1 to "
                        f"{n_blocks}, got {max_blocks}.")
    return max_blocks


def model_source(spec: str, what: str = "--model") -> str:
    if not spec.strip():
        raise UserError(f"{what} is empty; give a hub id, a local model directory, a .gguf file or {EMBEDDED_MODEL}.")
    return spec


def device(spec: str | None) -> str | None:
    """`cpu`, `cuda` or `cuda:N` (present on this machine), `mps` where available; None = the default device."""
    if spec is None:
        return None
    import torch

    try:
        chosen = torch.device(spec)
    except (RuntimeError, TypeError):
        raise UserError(f"Unknown device {spec!r}; use cpu or cuda (cuda:N for a particular GPU).") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"Device {spec!r} was asked for, but this machine has no usable CUDA GPU; use cpu.")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise UserError(f"Device {spec!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    elif chosen.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"Device {spec!r} is not available on this machine; use cpu.")
    elif chosen.type != "cpu":
        raise UserError(f"Device {spec!r} is not supported; use cpu or cuda.")
    return str(chosen)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(directory: Path) -> bool:
    """Whether a new entry can be made in `directory` (tried for real: permissions, read-only mounts, quotas)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".aptq-write-check-", dir=directory))
    except OSError:
        return False
    return True


def export_target(path: str | Path, overwrite: bool, keep: Iterable[str | Path] = ()) -> Path:
    """The export directory, checked before quantizing: it can be created here (or, with `overwrite`, an existing
    directory replaced); never the current directory or one above it, nor one holding a path in `keep` (the model
    read, the store)."""
    if not str(path).strip():
        raise UserError("The export directory is empty; name a new directory.")
    target = Path(path).expanduser()
    resolved = target.resolve()
    here = Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise UserError(f"Refusing to export into {path}: it is the current directory or one above it, which an "
                        f"export replaces; name a new directory.")
    for kept in keep:
        kept = Path(kept).expanduser().resolve()
        if kept == resolved or resolved in kept.parents:
            raise UserError(f"Refusing to export into {path}: it holds {kept}, which this run reads; name another "
                            f"directory.")
    if target.exists() and not target.is_dir():
        raise UserError(f"The export target {path} is a file, not a directory; name a new directory.")
    if target.is_dir() and not overwrite:
        raise UserError(f"The export directory {path} already exists; choose another one or allow overwriting it.")
    staging = resolved.with_name(resolved.name + ".partial")  # aptq.export writes there first
    if staging.exists() and not staging.is_dir():
        raise UserError(f"{staging} is a file in the way of the export; move it or name another directory.")
    existing = _nearest_existing(resolved.parent)
    if not existing.is_dir():
        raise UserError(f"The export directory {path} cannot be created: {existing} is a file.")
    if not _writable(existing):
        raise UserError(f"The export directory {path} cannot be created: {existing} is not writable.")
    return target


def store_path(path: str | Path) -> Path:
    """The DuckDB file's path can hold a file: not a directory, no file in place of a parent directory."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise UserError(f"The store {path} is a directory; name a DuckDB file (e.g. {target / 'aptq.duckdb'}).")
    existing = _nearest_existing(target.resolve().parent)
    if not existing.is_dir():
        raise UserError(f"The store {path} cannot be created: {existing} is a file, not a directory.")
    return target


def corpus_source(spec: str) -> None:
    """A corpus named by path is a readable regular file or a directory written by `DatasetDict.save_to_disk`."""
    if spec in NAMED_CORPORA:
        return
    if not spec.strip():
        raise UserError(f"No corpus given; use {', '.join(NAMED_CORPORA)}, a text file or a saved dataset directory.")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "dataset_dict.json").is_file():
            raise UserError(f"The corpus {spec} is a directory but not a dataset saved with `datasets` "
                            f"(no dataset_dict.json); give a UTF-8 text file instead.")
    elif path.exists() and not path.is_file():
        raise UserError(f"The corpus {spec} is not a regular file; give a UTF-8 text file.")
    elif path.is_file() and not os.access(path, os.R_OK):
        raise UserError(f"The corpus file {spec} is not readable (permissions).")


def weights_complete(path: Path, missing: list[str], unexpected: list[str]) -> None:
    """Tensors the config expects but the files lack would be left random, and extra ones mean another model."""
    for names, what in ((missing, "lack"), (unexpected, "have unexpected")):
        if names:
            shown = ", ".join(sorted(names)[:3]) + (", …" if len(names) > 3 else "")
            raise UserError(f"The weights in {path} {what} {len(names)} tensor(s) for its config ({shown}); they "
                            f"would not be the model's weights.")


def same_vocabulary(model, tokenizer, reference, reference_tokenizer) -> None:
    """KL and top-1 agreement compare distributions over one vocabulary, token by token."""
    from aptq.data import tokenizer_fingerprint

    sizes = (model.get_output_embeddings().weight.shape[0], reference.get_output_embeddings().weight.shape[0])
    if sizes[0] != sizes[1] or tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(reference_tokenizer):
        raise UserError(f"The reference model has another vocabulary ({sizes[1]} output tokens against {sizes[0]}, "
                        f"or another tokenizer); compare models that share one tokenizer.")


def block_refinement(method: str, steps: int) -> None:
    """Block refinement (aptq.blockwise) fits calibration data: not with RTN, which takes none."""
    if method == "rtn" and steps:
        raise UserError("Block refinement fits calibration data, which RTN does not use; choose gptq, attention or "
                        "aespa, or leave the refinement at 0 steps.")
