"""A small dependency-free progress bar for the trainer (stderr by default).

On a terminal it redraws one line in place (``\\r``) at most every ``min_interval`` seconds;
elsewhere (CI logs, files) it stays compact: one line at most every ``plain_interval`` seconds
and one line when closed.

Example::

    bar = ProgressBar(total=352, desc="epoch 1")
    for batch in loader:
        ...
        bar.update(1, loss=0.12, wbits=3.9, lr=2e-3)
    bar.close(acc=91.2)
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """Progress over ``total`` items with ``key=value`` fields.

    Args:
        total: number of items expected (None when unknown).
        desc: prefix text.
        file: stream to write to (default ``sys.stderr``).
        enabled: False makes every method a no-op (e.g. on ranks other than 0).
        width: bar width in characters (terminal mode).
        min_interval: seconds between redraws on a terminal.
        plain_interval: seconds between lines when the stream is not a terminal.
    """

    def __init__(self, total: Optional[int], desc: str = "", *, file: Optional[TextIO] = None,
                 enabled: bool = True, width: int = 24, min_interval: float = 0.1,
                 plain_interval: float = 30.0):
        if total is not None and (not isinstance(total, int) or total < 0):
            raise ValueError(f"ProgressBar: total must be a non-negative int or None, got {total!r}")
        self.total = total
        self.desc = desc
        self.file = file if file is not None else sys.stderr
        self.enabled = enabled
        self.width = width
        self.min_interval = min_interval
        self.plain_interval = plain_interval
        self.n = 0
        self.fields: dict = {}
        self.start = time.monotonic()
        self._closed = False
        isatty = getattr(self.file, "isatty", None)
        self.tty = bool(isatty and isatty())
        # A terminal shows the bar at once; a log gets its first line after plain_interval.
        self._last_draw = -float("inf") if self.tty else self.start

    def line(self) -> str:
        """The current status line (without newline or carriage return)."""
        elapsed = time.monotonic() - self.start
        parts = [self.desc] if self.desc else []
        if self.total:
            frac = min(1.0, self.n / self.total)
            if self.tty:
                filled = int(round(frac * self.width))
                parts.append("[" + "#" * filled + "." * (self.width - filled) + "]")
            parts.append(f"{self.n}/{self.total}")
            eta = elapsed / self.n * (self.total - self.n) if self.n else 0.0
            parts.append(f"{_fmt_time(elapsed)}<{_fmt_time(eta)}")
        else:
            parts.append(f"{self.n} {_fmt_time(elapsed)}")
        parts.extend(f"{k}={_fmt(v)}" for k, v in self.fields.items())
        return " ".join(parts)

    def _draw(self, final: bool = False):
        if self.tty:
            text = "\r" + self.line() + "\x1b[K" + ("\n" if final else "")
        else:
            text = self.line() + "\n"
        self.file.write(text)
        self.file.flush()
        self._last_draw = time.monotonic()

    def update(self, n: int = 1, **fields) -> None:
        """Advance by ``n`` items and replace the shown fields given as keywords."""
        if not self.enabled or self._closed:
            return
        self.n += n
        self.fields.update(fields)
        interval = self.min_interval if self.tty else self.plain_interval
        if time.monotonic() - self._last_draw >= interval:
            self._draw()

    def close(self, **fields) -> None:
        """Draw the final line (always, in both modes) and stop."""
        if not self.enabled or self._closed:
            return
        self.fields.update(fields)
        self._draw(final=True)
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
