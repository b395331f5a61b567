"""gdnsq.progress.ProgressBar: terminal redraw vs compact log lines."""
import io

import pytest

from gdnsq.progress import ProgressBar


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_terminal_redraws_in_place():
    out = _TTY()
    bar = ProgressBar(4, desc="epoch 1", file=out, min_interval=0.0)
    for i in range(4):
        bar.update(1, loss=0.5 / (i + 1), lr=2e-3)
    bar.close(acc=91.25)
    text = out.getvalue()
    assert text.count("\r") == 5 and text.endswith("\n") and text.count("\n") == 1
    last = text.split("\r")[-1]
    assert "epoch 1" in last and "4/4" in last and "[" + "#" * 24 + "]" in last
    assert "loss=0.125" in last and "lr=2.00e-03" in last and "acc=91.25" in last


def test_log_stream_is_compact():
    out = io.StringIO()
    bar = ProgressBar(1000, desc="epoch 2", file=out, plain_interval=3600)
    for _ in range(1000):
        bar.update(1, loss=1.0)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == [lines[0]] and "1000/1000" in lines[0] and "\r" not in out.getvalue()
    assert "#" not in lines[0]  # no bar drawing in logs


def test_disabled_and_unknown_total():
    out = io.StringIO()
    bar = ProgressBar(10, file=out, enabled=False)
    bar.update(3)
    bar.close()
    assert out.getvalue() == ""
    bar = ProgressBar(None, desc="x", file=out)
    bar.update(5)
    bar.close()
    assert "5 " in out.getvalue()
    with pytest.raises(ValueError, match="total"):
        ProgressBar(-1)
