"""gdnsq.train.progress: tqdm on a terminal, compact newline-terminated lines in logs."""
import io
import time

from gdnsq.train.progress import close_with, progress_bar


class _TTY(io.StringIO):
    def isatty(self):
        return True


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
    bar = progress_bar(1000, desc="epoch 2", file=out, plain_interval=3600)
    for _ in range(1000):
        bar.set_postfix(loss=1.0, refresh=False)
        bar.update(1)
    close_with(bar, acc=50.0)
    lines = out.getvalue().splitlines()
    # no start line, no redraws within the interval: only the closing line, no bar drawing
    assert len(lines) == 1 and "1000/1000" in lines[0] and "acc=50" in lines[0]
    assert "\r" not in out.getvalue() and "#" not in lines[0]


def test_log_stream_cadence():
    """A line per interval: with a 20 ms interval and ~100 ms of work, a few lines, each whole."""
    out = io.StringIO()
    bar = progress_bar(10, desc="e", file=out, plain_interval=0.02)
    for _ in range(10):
        time.sleep(0.01)
        bar.update(1)
    close_with(bar)
    lines = out.getvalue().splitlines()
    assert 2 <= len(lines) <= 10 and lines[-1].startswith("e: 10/10") and "\r" not in out.getvalue()


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
