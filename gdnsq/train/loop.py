"""The training-epoch loop shared by :class:`gdnsq.Trainer` (GDNSQ distillation) and
``gdnsq train-fp`` (the FP teacher): one place that runs the optimizer step per batch, keeps
the epoch's running means and drives the progress bar.

Example::

    def step(batch):                       # one optimizer step
        ...
        return {"loss": loss.item()}, None  # (epoch metrics, extra bar fields or None)

    bar = progress_bar(len(loader), desc="epoch 1")
    means = train_epoch(loader, step, bar, show_means=True)   # {"loss": mean, "batches": n}
    close_with(bar, **means)
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple


def train_epoch(loader, step: Callable[[object], Tuple[dict, Optional[dict]]], bar, *,
                show_means: bool = False, what: str = "train_loader") -> dict:
    """Call ``step(batch)`` for every batch of ``loader`` and return the epoch's means.

    Args:
        loader: any iterable of batches.
        step: runs one optimizer step on a batch and returns ``(metrics, shown)``: ``metrics``
            a dict of floats averaged over the epoch's batches; ``shown`` None or a dict of
            fields for the progress bar (None keeps the fields it shows).
        bar: a tqdm bar (:func:`gdnsq.train.progress.progress_bar`), advanced once per batch and left
            open for the caller to close with the epoch's summary.
        show_means: show the running means of ``metrics`` (with ``shown`` added) on the bar.
        what: the loader's name in the error raised when it yields no batch.

    Returns ``{name: mean over batches, ..., "batches": number of batches}``.
    Raises ValueError when ``loader`` yields no batch.
    """
    sums: dict = {}
    n_batches = 0
    for batch in loader:
        metrics, shown = step(batch)
        n_batches += 1
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
        if show_means:
            bar.set_postfix({k: v / n_batches for k, v in sums.items()} | (shown or {}), refresh=False)
        elif shown:
            bar.set_postfix(shown, refresh=False)
        bar.update(1)
    if n_batches == 0:
        raise ValueError(f"{what} produced no batches")
    return {k: v / n_batches for k, v in sums.items()} | {"batches": n_batches}
