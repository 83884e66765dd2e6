"""Silence the third-party messages that users of this package cannot act on, each matched by its exact text.

Only the package's own entry points install these filters (the ``anomalib-contnet`` command, and so the demo,
and the benchmark's worker processes); importing the package changes no filter. Each entry below was seen in the
output of ``anomalib-contnet demo --tiny``, ``anomalib-contnet`` commands or ``anomalib predict`` with anomalib 2.7,
timm 1.0, Lightning 2.6 and torch 2.14. A message that differs in any word (a newer version saying something new)
still shows. Only the standard library is imported here, so the filters can be in place before anything else loads.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass

__all__ = ["KNOWN_WARNINGS", "LIGHTNING_TIPS", "RANK_ZERO_LOGGERS", "install_warning_filters"]


@dataclass(frozen=True)
class KnownWarning:
    """One warning by its whole text; ``<n>`` stands for a number that varies between runs."""

    text: str
    category: type[Warning]
    reason: str

    def pattern(self) -> str:
        """The regular expression that matches exactly this text, from its start to its end."""
        return re.escape(self.text).replace("<n>", r"\d+") + r"\Z"


KNOWN_WARNINGS: tuple[KnownWarning, ...] = (
    KnownWarning(
        "Importing from timm.models.layers is deprecated, please import via timm.layers",
        FutureWarning,
        "anomalib 2.7 imports the old timm path when anomalib.models loads",
    ),
    KnownWarning(
        "The anomalib.models.components.dinov2 package is deprecated and will be removed in a future release. "
        "Please use the timm-based feature extractor instead: "
        "anomalib.models.components.feature_extractors.TimmFeatureExtractor",
        FutureWarning,
        "anomalib's own Dinomaly model imports it when anomalib.models loads",
    ),
    KnownWarning(
        "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` "
        "instead.",
        FutureWarning,
        "Lightning 2.6 uses a torch 2.14 class that torch has deprecated, on every batch it moves",
    ),
    KnownWarning(
        "`LightningModule.configure_optimizers` returned `None`, this fit will run with no optimizer",
        UserWarning,
        "ConTNetPaDiM is fitted without gradients, like anomalib's Padim: there is nothing to optimise",
    ),
    KnownWarning(
        "Found <n> module(s) in eval mode at the start of training. This may lead to unexpected behavior during "
        "training. If this is intentional, you can ignore this warning.",
        UserWarning,
        "the frozen backbone stays in eval mode on purpose",
    ),
    KnownWarning(
        "'pin_memory' argument is set as true but no accelerator is found, then device pinned memory won't be used",
        UserWarning,
        "anomalib's predict builds its DataLoader with pin_memory=True, also on CPU-only machines",
    ),
)

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
"""Lightning logs the tips through ``lightning_utilities``' rank-zero logger, which each of these modules replaces
with its own when imported: which one is active depends on import order (the demo ends up on
``lightning_fabric``'s, a plain ``import lightning.pytorch`` on ``lightning.pytorch``'s)."""


class _DropExactMessages(logging.Filter):
    """A logger filter that drops records whose formatted message is one of ``messages``."""

    def __init__(self, messages: frozenset[str]) -> None:
        super().__init__()
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.messages


def install_warning_filters() -> None:
    """Ignore :data:`KNOWN_WARNINGS` and drop :data:`LIGHTNING_TIPS` (idempotent)."""
    for known in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=known.pattern(), category=known.category)
    for logger_name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(existing, _DropExactMessages) for existing in logger.filters):
            logger.addFilter(_DropExactMessages(LIGHTNING_TIPS))
