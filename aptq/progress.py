"""Progress reporting and cancellation shared by the CLI (tqdm) and the dashboard (st.progress).

Long work takes a `Progress` callback `(done, total, message)`; raising `Cancelled` from it stops the work cleanly,
after whatever was already finished has been persisted.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int, str], None]


class Cancelled(Exception):
    """Raised by a progress callback to stop long work; results persisted so far are kept."""


def no_progress(done: int, total: int, message: str) -> None:
    """The default callback: report nothing."""


def tqdm_progress(description: str) -> tuple[Progress, Callable[[], None]]:
    """A callback drawing a tqdm bar, and a function that closes the bar."""
    from tqdm import tqdm

    bar = tqdm(desc=description, unit="step", dynamic_ncols=True)

    def update(done: int, total: int, message: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(message, refresh=False)
        bar.refresh()

    return update, bar.close
