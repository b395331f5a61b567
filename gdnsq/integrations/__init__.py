"""GDNSQ inside other training frameworks (docs/integrations.md).

* :mod:`gdnsq.integrations.loop`: :class:`GDNSQLoop`, the public pieces (objective, schedule,
  convergence step, teacher) wired for a framework's loop, with one state for its checkpoints;
  torch only.
* :mod:`gdnsq.integrations.huggingface`: ``GDNSQTrainer`` (a ``transformers.Trainer``) and
  ``GDNSQTrainerCallback``; needs ``pip install gdnsq[hf]``.
* :mod:`gdnsq.integrations.lightning`: ``GDNSQLightningCallback``; needs
  ``pip install gdnsq[lightning]``.

This package imports none of them: ``import gdnsq`` and ``import gdnsq.integrations`` work
without ``transformers`` or ``lightning``; import the submodule you use.
"""
