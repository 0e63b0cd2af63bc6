"""One progress bar for every long loop: rich, on stderr, so ``--json`` output on stdout stays clean."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["progress_bar", "stderr_console"]

stderr_console = Console(stderr=True, soft_wrap=True)


@contextlib.contextmanager
def progress_bar(total: int, description: str, *, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows a bar with count, rate and ETA on stderr when `enabled`."""
    if not enabled:
        yield lambda n=1: None
        return
    if not stderr_console.is_terminal:  # a log: after 5 s, a plain line every 10 % or 30 s instead of a live bar
        yield _log_lines(total, description)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr_console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


def _log_lines(total: int, description: str) -> Callable[[int], None]:
    started = last = time.monotonic()
    done = 0
    next_share = 0.1

    def advance(n: int = 1) -> None:
        nonlocal done, last, next_share
        done += n
        now = time.monotonic()
        if now - started < 5:  # short jobs stay quiet in logs
            return
        if done >= total or done / max(total, 1) >= next_share or now - last >= 30:
            elapsed = now - started
            eta = elapsed / done * (total - done) if done else 0.0
            stderr_console.print(
                f"{description}: {done}/{total} ({100 * done / max(total, 1):.0f} %) {elapsed:.0f} s, eta {eta:.0f} s",
                highlight=False,
            )
            last = now
            next_share = done / max(total, 1) + 0.1

    return advance
