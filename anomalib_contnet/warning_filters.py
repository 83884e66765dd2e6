"""Silence the third-party messages that users of this package cannot act on, each matched by its exact text.

Only the package's own entry points install these filters (the ``anomalib-contnet`` command, so the demo,
and the benchmark's worker processes); importing the package changes no filter. Each entry was seen in the
output of ``anomalib-contnet demo --tiny`` or ``benchmark`` with anomalib 2.7, timm 1.0, Lightning 2.6 and
torch 2.14. A message that differs in any word (a newer version saying something new) still shows. Only the
standard library is imported here, so the filters can be in place before anything else loads.
"""

from __future__ import annotations

import logging
import re
import warnings

__all__ = ["KNOWN_WARNINGS", "LIGHTNING_TIPS", "RANK_ZERO_LOGGERS", "install_warning_filters"]

KNOWN_WARNINGS: dict[str, type[Warning]] = {
    # anomalib 2.7 imports the old timm path when anomalib.models loads.
    "Importing from timm.models.layers is deprecated, please import via timm.layers": FutureWarning,
    # anomalib's own Dinomaly model imports it when anomalib.models loads.
    "The anomalib.models.components.dinov2 package is deprecated and will be removed in a future release. "
    "Please use the timm-based feature extractor instead: "
    "anomalib.models.components.feature_extractors.TimmFeatureExtractor": FutureWarning,
    # Lightning 2.6 uses a torch 2.14 class that torch has deprecated, on every batch it moves.
    "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` "
    "instead.": FutureWarning,
    # ConTNetPaDiM is fitted without gradients, like anomalib's Padim: there is nothing to optimise.
    "`LightningModule.configure_optimizers` returned `None`, this fit will run with no optimizer": UserWarning,
    # The frozen backbone stays in eval mode on purpose (<n>: a number that varies).
    "Found <n> module(s) in eval mode at the start of training. This may lead to unexpected behavior during "
    "training. If this is intentional, you can ignore this warning.": UserWarning,
    # The benchmark fits on the training images alone; it scores the test images itself, on raw scores.
    "You defined a `validation_step` but have no `val_dataloader`. Skipping val loop.": UserWarning,
    # anomalib's predict builds its DataLoader with pin_memory=True, also on CPU-only machines.
    "'pin_memory' argument is set as true but no accelerator is found, then device pinned memory won't be used": (
        UserWarning
    ),
}
"""Warnings by their whole text; ``<n>`` stands for a number."""

LIGHTNING_TIPS = frozenset(
    {
        "💡 Tip: For seamless cloud logging and experiment tracking, try installing "
        "[litlogger](https://pypi.org/project/litlogger/) to enable LitLogger, which logs metrics and artifacts "
        "automatically to the Lightning Experiments platform.",
        "💡 Tip: For seamless cloud uploads and versioning, try installing "
        "[litmodels](https://pypi.org/project/litmodels/) to enable LitModelCheckpoint, which syncs "
        "automatically with the Lightning model registry.",
        # Set-up reports of every Trainer that say nothing about this run a user could change:
        "GPU available: False, used: False",
        "TPU available: False, using: 0 TPU cores",
        "`Trainer(val_check_interval=1.0)` was configured so validation will run at the end of the training epoch..",
        "`Trainer.fit` stopped: `max_epochs=1` reached.",
    }
)
"""Lightning's advertising tips and set-up reports, logged at INFO level on every Trainer set-up or fit."""

RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "pytorch_lightning.utilities.rank_zero",
)
"""Lightning logs through ``lightning_utilities``' rank-zero logger, which each of these modules replaces with
its own when imported: which one is active depends on import order."""


def _drop_lightning_tips(record: logging.LogRecord) -> bool:
    return record.getMessage() not in LIGHTNING_TIPS


def install_warning_filters() -> None:
    """Ignore :data:`KNOWN_WARNINGS` and drop :data:`LIGHTNING_TIPS` (idempotent)."""
    for text, category in KNOWN_WARNINGS.items():
        warnings.filterwarnings("ignore", re.escape(text).replace("<n>", r"\d+") + r"\Z", category)
    for logger_name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(logger_name)
        if _drop_lightning_tips not in logger.filters:
            logger.addFilter(_drop_lightning_tips)
