"""Progress reporting: a rich progress bar on a terminal, periodic log lines in CI and batch logs."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("headlab")


@contextmanager
def progress(
    total: int, description: str, unit: str = "rows", every_s: float = 10.0
) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows ``unit``/s. Rich bar when stdout is a terminal, else a log line every ``every_s``."""
    start = time.perf_counter()
    if sys.stdout.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task(description, total=total, rate="")
            done = 0

            def advance(n: int) -> None:
                nonlocal done
                done += n
                rate = done / max(time.perf_counter() - start, 1e-9)
                bar.update(task, advance=n, rate=f"{rate:,.1f} {unit}/s")

            yield advance
        return
    done, last = 0, start

    def advance(n: int) -> None:
        nonlocal done, last
        done += n
        now = time.perf_counter()
        if now - last >= every_s:
            last = now
            log.info("%s: %d/%d %s (%.1f %s/s)", description, done, total, unit, done / (now - start), unit)

    yield advance
