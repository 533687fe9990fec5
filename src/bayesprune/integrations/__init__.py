"""Callbacks for other training loops (docs/integrations.md).

``bayesprune.integrations.lightning``: :class:`~bayesprune.integrations.lightning.BMRSPruning`, a
Lightning callback (extra ``[lightning]``).  ``bayesprune.integrations.transformers``:
:class:`~bayesprune.integrations.transformers.BMRSPruningCallback` and
:class:`~bayesprune.integrations.transformers.BMRSTrainer` for the Hugging Face ``Trainer``
(extra ``[transformers]``).  Neither is imported by ``import bayesprune``; each needs its
library only when imported.
"""
