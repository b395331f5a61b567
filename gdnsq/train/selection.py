"""Which epoch a run keeps, and when it stops early (METHOD Part B §4.6).

* Selection: among validated epochs where the student is converged, the best validation top-1
  (the first epoch reaching it); without a validation loader, the latest converged epoch.
* Early stopping: once the hold after the first convergence is over, every validation whose
  score (top-1 when converged, else 0, as the authors' ``ns_Accuracy_top1``) does not beat the
  best score so far by more than ``min_delta`` counts; ``patience`` such validations stop.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from .checkpoint import BEST, LAST, read_on_main


@dataclass
class Selection:
    """Selection and early-stopping state of a run (all of it goes into ``checkpoint_last.pt``)."""

    best_val_top1: Optional[float] = None  # best converged val top-1
    best_epoch: Optional[int] = None
    es_best: Optional[float] = None        # early-stopping reference score
    bad_validations: int = 0

    def observe(self, epoch: int, *, converged: bool, held: bool, val_top1: Optional[float],
                validated: bool, has_validation: bool, min_delta: float) -> bool:
        """Record one epoch end; True when this epoch becomes the selected one.

        ``validated``: a full validation ran this epoch (``val_top1`` None then means no labels);
        ``has_validation``: the run has a validation loader at all.
        """
        if not has_validation:
            if converged:
                self.best_epoch = epoch
            return converged
        if not validated:
            return False
        top1 = val_top1 if val_top1 is not None else 0.0
        selected = converged and (self.best_val_top1 is None or top1 > self.best_val_top1)
        if selected:
            self.best_val_top1, self.best_epoch = top1, epoch
        if held:
            score = top1 if converged else 0.0
            if self.es_best is None or score > self.es_best + min_delta:
                self.es_best = score
                self.bad_validations = 0
            else:
                self.bad_validations += 1
        return selected

    def patience_spent(self, patience: int) -> bool:
        """True when ``patience`` validations without improvement have been counted."""
        return self.bad_validations >= patience

    def state_dict(self) -> dict:
        return {"best_val_top1": self.best_val_top1, "best_epoch": self.best_epoch,
                "es_best": self.es_best, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict) -> None:
        self.best_val_top1, self.best_epoch = state["best_val_top1"], state["best_epoch"]
        self.es_best, self.bad_validations = state["es_best"], state["bad_validations"]


@dataclass(frozen=True)
class Selected:
    """The checkpoint a report and ``Trainer.test`` use: ``checkpoint_best.pt`` (the best
    converged epoch) when some epoch converged, else ``checkpoint_last.pt`` (the last epoch,
    not converged); every field None before the first epoch."""

    epoch: Optional[int]
    val_top1: Optional[float]
    file: Optional[str]
    realised_bits: Optional[dict]  # of the best checkpoint; None for the last

    @property
    def converged(self) -> bool:
        return self.file == BEST

    def describe(self) -> str:
        if self.file is None:
            return "nothing selected (no epoch run)"
        val = "-" if self.val_top1 is None else f"{self.val_top1:.2f} %"
        if self.converged:
            return f"selected epoch {self.epoch} (converged; val top-1 {val}; {BEST})"
        return f"no converged epoch: the last epoch {self.epoch} stands in (not converged; val top-1 {val}; {LAST})"


def selected_checkpoint(out_dir: str, epoch: int, last_val: Optional[dict]) -> Selected:
    """The :class:`Selected` checkpoint of the run in ``out_dir`` after ``epoch`` epochs
    (``last_val``: the trainer's last validation record); rank 0 reads the file."""
    best = read_on_main(os.path.join(out_dir, BEST), "best", fields=("epoch", "val_top1", "realised_bits"))
    if best is not None:
        return Selected(best["epoch"], best["val_top1"], BEST, best["realised_bits"])
    if epoch:
        val_top1 = last_val["top1"] if last_val and last_val["epoch"] == epoch else None
        return Selected(epoch, val_top1, LAST, None)
    return Selected(None, None, None, None)
