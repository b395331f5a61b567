"""gdnsq.train.loop.train_epoch: the batch loop shared by the Trainer and train-fp."""
import io

import pytest

from gdnsq.train.loop import train_epoch
from gdnsq.train.progress import close_with, progress_bar


def test_means_bar_and_shown_fields():
    out = io.StringIO()
    bar = progress_bar(4, desc="e", file=out, plain_interval=3600)
    seen = []

    def step(batch):
        seen.append(batch)
        return {"loss": float(batch), "acc": 10.0 * batch}, ({"lr": 0.5} if batch == 3 else None)

    means = train_epoch([1, 2, 3, 6], step, bar, show_means=True)
    assert seen == [1, 2, 3, 6] and bar.n == 4
    assert means == {"loss": 3.0, "acc": 30.0, "batches": 4}
    close_with(bar)
    line = out.getvalue().strip()
    assert "4/4" in line and "loss=3" in line and "acc=30" in line  # running means at the end


def test_shown_fields_only_and_empty_loader():
    out = io.StringIO()
    bar = progress_bar(2, desc="e", file=out, plain_interval=3600)
    means = train_epoch([1, 2], lambda b: ({"loss": b}, {"t": 7} if b == 1 else None), bar)
    assert means == {"loss": 1.5, "batches": 2}
    bar.close()
    assert "t=7" in out.getvalue() and "loss" not in out.getvalue()
    with pytest.raises(ValueError, match="my_loader produced no batches"):
        train_epoch([], lambda b: ({}, None), progress_bar(0, enabled=False), what="my_loader")
