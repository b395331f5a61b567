"""Progress bars for the trainer and the CLI: :mod:`tqdm` on stderr with a log-friendly mode.

On a terminal the bar redraws in place (tqdm's default, at most every 0.1 s). When the stream
is not a terminal (CI logs, ``2> file``) each refresh is one plain line, at most one every
``plain_interval`` seconds (30 by default, the first one only after that long), plus one line
when the bar is closed, so a log holds one line per epoch plus one per half minute.

Example::

    bar = progress_bar(352, desc="epoch 1")
    for batch in loader:
        ...
        bar.update(1)
        bar.set_postfix(loss=0.12, lr=2e-3, refresh=False)
    close_with(bar, acc=91.2)
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, TextIO

from tqdm import tqdm

PLAIN_INTERVAL = 30.0  # seconds between lines when the stream is not a terminal
# log lines carry the counts, times and fields but no bar drawing
_LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _LineStream:
    """Turns tqdm's carriage-return redraws into one newline-terminated line per refresh."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _Bar(tqdm):
    """tqdm whose ``close`` always prints the final line, also when a ``delay`` (the log mode's
    first-line delay) kept it from ever being drawn, and that reads the time from ``clock``
    (a callable returning seconds; ``time.time`` when None)."""

    def __init__(self, *args, clock: Optional[Callable[[], float]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if clock is not None:
            # tqdm reads every time through self._time; restart its counters on the new clock
            self._time = clock
            self.start_t = self.last_print_t = clock()

    def close(self):
        if not getattr(self, "disable", True):
            self.delay = 0
        super().close()


def progress_bar(total: Optional[int], desc: str = "", *, enabled: bool = True,
                 file: Optional[TextIO] = None, plain_interval: float = PLAIN_INTERVAL,
                 clock: Optional[Callable[[], float]] = None) -> tqdm:
    """A tqdm bar over ``total`` items (None: unknown) written to ``file`` (default stderr).

    ``enabled=False`` gives a silent bar (other ranks, ``--json``). Not a terminal: plain
    lines at most every ``plain_interval`` seconds and one at :func:`close_with`. ``clock``
    (seconds, default ``time.time``) is the time the bar reads, for tests."""
    stream = file if file is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    tty = bool(isatty and isatty())
    if tty:
        return _Bar(total=total, desc=desc, file=stream, disable=not enabled, dynamic_ncols=True,
                    mininterval=0.1, clock=clock)
    # miniters=1: every update compares the time with the last line, so a line is due as soon
    # as plain_interval has passed, whatever the rate (tqdm's adaptive miniters would need its
    # monitor thread to catch a rate that drops)
    return _Bar(total=total, desc=desc, file=_LineStream(stream), disable=not enabled, ascii=True,
                bar_format=_LOG_FORMAT, mininterval=plain_interval, maxinterval=plain_interval,
                miniters=1, delay=plain_interval, clock=clock)


def close_with(bar: tqdm, **fields) -> None:
    """Show ``fields`` (e.g. the epoch's validation accuracy) as the bar's postfix and close it."""
    if fields:
        bar.set_postfix(fields, refresh=False)
    bar.close()
