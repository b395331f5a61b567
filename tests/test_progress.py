"""gdnsq.train.progress: tqdm on a terminal, compact newline-terminated lines in logs.

The log-mode cadence is checked on an injected clock (``clock=``), never on wall time."""
import io

from gdnsq.train.progress import close_with, progress_bar


class _TTY(io.StringIO):
    def isatty(self):
        return True


class _Clock:
    """A clock the test advances by hand (seconds)."""

    def __init__(self, start=1000.0):
        self.now = start

    def __call__(self):
        return self.now


def test_terminal_redraws_in_place():
    out = _TTY()
    bar = progress_bar(4, desc="epoch 1", file=out)
    for i in range(4):
        bar.set_postfix(loss=0.5 / (i + 1), refresh=False)
        bar.update(1)
    close_with(bar, acc=91.25)
    text = out.getvalue()
    assert "\r" in text and text.endswith("\n") and text.count("\n") == 1
    last = text.split("\r")[-1]
    assert "epoch 1" in last and "4/4" in last and "acc=91.2" in last


def test_log_stream_is_compact():
    out = io.StringIO()
    clock = _Clock()  # stands still: the interval never passes
    bar = progress_bar(1000, desc="epoch 2", file=out, plain_interval=30, clock=clock)
    for _ in range(1000):
        bar.set_postfix(loss=1.0, refresh=False)
        bar.update(1)
    close_with(bar, acc=50.0)
    lines = out.getvalue().splitlines()
    # no start line, no redraws within the interval: only the closing line, no bar drawing
    assert len(lines) == 1 and "1000/1000" in lines[0] and "acc=50" in lines[0]
    assert "\r" not in out.getvalue() and "#" not in lines[0]


def test_log_stream_cadence():
    """A line as soon as an interval has passed since the last one (the first one interval after
    the start), and one at the close: items 10 s apart with a 25 s interval give lines at 30, 60
    and 90 s (items 3, 6, 9), then the closing line; each whole, none redrawn."""
    out = io.StringIO()
    clock = _Clock()
    bar = progress_bar(10, desc="e", file=out, plain_interval=25, clock=clock)
    for _ in range(10):
        clock.now += 10
        bar.update(1)
    close_with(bar)
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["3/10", "6/10", "9/10", "10/10"], lines
    assert all(line.startswith("e: ") for line in lines) and "\r" not in out.getvalue()
    assert "00:30<" in lines[0] and "01:40<" in lines[-1]  # elapsed on the injected clock


def test_log_stream_line_after_a_stall():
    """A rate that drops still gets its line at the first item after the interval: 64 items/s
    for 40 s (a line at item 1920, 30 s), a 2-minute stall, then one item. (tqdm's adaptive
    ``miniters`` would wait for another 1920 items.)"""
    out = io.StringIO()
    clock = _Clock()
    bar = progress_bar(None, desc="s", file=out, plain_interval=30, clock=clock)
    for _ in range(2560):
        clock.now += 1 / 64  # exact in binary: the 30 s mark falls on item 1920
        bar.update(1)
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["1920/?"]
    clock.now += 120
    bar.update(1)
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["1920/?", "2561/?"]
    close_with(bar)


def test_disabled_and_unknown_total():
    out = io.StringIO()
    bar = progress_bar(10, file=out, enabled=False)
    bar.update(3)
    close_with(bar, a=1)
    assert out.getvalue() == ""
    bar = progress_bar(None, desc="x", file=out)
    bar.update(5)
    close_with(bar)
    assert out.getvalue().startswith("x: 5/?")
