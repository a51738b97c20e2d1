"""Progress reporting: a rich progress bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

__all__ = ["progress_reporter"]


@contextmanager
def progress_reporter(title: str, *, stream=None):
    """Yield ``report(label, done, total)``; renders a bar on a TTY, else one line per call."""
    stream = stream or sys.stderr
    if stream.isatty():
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                      TextColumn("{task.fields[label]}"), transient=False) as bar:
            task = bar.add_task(title, total=None, label="")

            def report(label: str, done: int, total: int) -> None:
                bar.update(task, completed=done, total=total, label=label)

            yield report
    else:
        t0 = time.perf_counter()

        def report(label: str, done: int, total: int) -> None:
            print(f"{title}: {done}/{total} {label} [{time.perf_counter() - t0:.1f} s]",
                  file=stream, flush=True)

        yield report
