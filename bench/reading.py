"""Results files whose tables a benchmark rewrites while the reading below them, written by hand, stays."""

from __future__ import annotations

READING = "## Reading"  # where the hand-written part of a results file begins


def with_reading(lines: list[str], previous: str) -> str:
    """The file's new text: `lines` (the benchmark's header and tables), then the hand-written reading of `previous`
    (the file's earlier text, "" when there was none) from its first READING heading on."""
    reading = previous[previous.index(READING):] if READING in previous else ""
    return "\n".join(lines) + "\n" + (f"\n{reading.rstrip()}\n" if reading else "")
