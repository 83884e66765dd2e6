"""ConTNetPaDiM: Dini & Rahtu (VISAPP 2023) as an anomalib model.

A frozen ImageNet ConTNet-B gives patch features from its third and fourth stages;
one Gaussian per patch position is fitted on normal images; the Mahalanobis
distance of a test patch is its anomaly score, upsampled bilinearly and smoothed
(sigma 4); the image score is the maximum. The choices the paper leaves open are
the constructor's arguments (README, "What the implementation decides").

Unlike anomalib's Padim, no training embedding is stored, each Gaussian is kept at
its exact size (:mod:`.gaussian`), a fitted model can take more images
(``incremental``), and distributed fitting (DDP) merges the statistics exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule, MemoryBankMixin
from anomalib.visualization import Visualizer
from lightning.pytorch import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from PIL import Image
from torch import nn
from torch.utils.data import DistributedSampler

from anomalib_contnet.checkpoints import non_finite_counts
from anomalib_contnet.models.contnet_padim.feature_extractor import IMAGENET_MEAN, IMAGENET_STD
from anomalib_contnet.models.contnet_padim.pre_processor import ConTNetPreProcessor
from anomalib_contnet.models.contnet_padim.torch_model import NOT_FITTED_MESSAGE, ConTNetPaDiMModel, NotFittedError
from anomalib_contnet.models.staged_export import AtomicExportMixin

__all__ = ["ConTNetPaDiM"]

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = (224, 224)

FORMAT_KEY = "anomalib_contnet_format_version"
"""Top-level checkpoint entry that only ConTNetPaDiM checkpoints have: another model's checkpoint is refused by name."""
FORMAT_VERSION = 3
"""What the saved state means (3: mean, principal directions, variances, count); other versions are refused."""

HIGH_BIT_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
"""Pillow modes of one-channel images with more than 8 bits (16-bit PNG/TIFF, 32-bit integer or float).

anomalib reads every image with ``Image.convert("RGB")``, which clips these values
at 255 instead of scaling them: a 16-bit image becomes almost uniformly white, and
the model would score that. 16-bit colour PNGs are not affected (Pillow reduces
them to 8 bits per channel correctly).
"""


def refuse_high_bit_depth(paths: Iterable[str] | None) -> None:
    """Raise ValueError naming the files that anomalib would clip to white (it reads only their headers)."""
    clipped = []
    for path in paths or ():  # None: a batch built from tensors, not files
        with Image.open(path) as image:
            if image.mode in HIGH_BIT_DEPTH_MODES:
                clipped.append(f"{path} (mode {image.mode})")
    if clipped:
        msg = (
            "one-channel images with more than 8 bits per pixel: anomalib reads images with Pillow's "
            "convert('RGB'), which clips such values at 255 instead of scaling them, so the model would see an "
            "almost white image. Convert them to 8 bits first (16-bit: divide by 257; float: scale to 0..255): "
            + ", ".join(clipped)
        )
        raise ValueError(msg)


class ConTNetPaDiM(AtomicExportMixin, MemoryBankMixin, AnomalibModule):
    """ConTNet patch features + per-position Gaussians (Dini & Rahtu 2023).

    Args:
        backbone: ``contnet_b`` (the paper's), another ConTNet variant
            (``contnet_ti``, ``contnet_s``, ``contnet_m``) or any timm model name.
        layers: backbone stages to combine (see module docstring).
        pre_trained: use ImageNet weights (ConTNet weights are looked up locally,
            then downloaded; see ``anomalib-contnet weights --help``). ``False``
            gives untrained features, useful only for tests.
        weights: local path or URL of backbone weights; overrides the lookup.
        n_features: random subset of embedding channels to keep (all by default).
        feature_seed: seed of that subset.
        epsilon: covariance regulariser ``εI``.
        sigma: anomaly-map smoothing in pixels.
        incremental: a fit adds its images to the fitted Gaussians instead of starting
            afresh: ``load_from_checkpoint(path, incremental=True)`` then ``Engine().fit``
            gives the Gaussians of one fit on the earlier and the new images together. Saved
            with the checkpoint like every argument: load with ``incremental=False`` to refit.
        image_size: input size of the default pre-processor (at least 32 px; multiples of 224 need no padding).
        pre_processor, post_processor, evaluator, visualizer: anomalib components,
            ``True`` for the defaults.

    Example:
        >>> from anomalib.engine import Engine
        >>> from anomalib.data import MVTecAD
        >>> model = ConTNetPaDiM()
        >>> Engine().train(model=model, datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP
    """

    def __init__(
        self,
        backbone: str = "contnet_b",
        layers: Sequence[str] = ("layer3", "layer4"),
        pre_trained: bool = True,
        weights: str | None = None,
        n_features: int | None = None,
        feature_seed: int = 0,
        epsilon: float = 0.01,
        sigma: float = 4.0,
        incremental: bool = False,
        image_size: tuple[int, int] | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        model = ConTNetPaDiMModel(
            backbone=backbone,
            layers=tuple(layers),
            pre_trained=pre_trained,
            weights=weights,
            n_features=n_features,
            feature_seed=feature_seed,
            epsilon=epsilon,
            sigma=sigma,
        )
        if pre_processor is True:
            mean, std = model.feature_extractor.normalization
            pre_processor = self.configure_pre_processor(image_size=image_size, mean=mean, std=std)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model: ConTNetPaDiMModel = model
        self.incremental = incremental
        self._train_samples_seen = 0
        self._backbone_weights_in_place = not model.feature_extractor.wants_pretrained

    @classmethod
    def configure_pre_processor(
        cls,
        image_size: tuple[int, int] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> ConTNetPreProcessor:
        """Resize to ``image_size`` (224x224 by default, the paper's), antialiased on every path, and normalise.

        See :mod:`~anomalib_contnet.models.contnet_padim.pre_processor` for why anomalib's own resize is replaced.
        """
        return ConTNetPreProcessor(image_size or DEFAULT_IMAGE_SIZE, mean=mean, std=std)

    @staticmethod
    def configure_optimizers() -> None:
        """Nothing is optimised: the backbone is frozen and the Gaussians are estimated in closed form."""
        return

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """One pass over the training data; devices and strategy are left to the user (DDP is supported)."""
        return {"max_epochs": 1, "val_check_interval": 1.0, "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """Trained on normal images only."""
        return LearningType.ONE_CLASS

    def setup(self, stage: str) -> None:
        """Load the backbone's pretrained weights when a fit starts, and only then.

        A trained checkpoint holds every backbone weight, so testing, predicting or exporting
        one never looks for the ImageNet file (gone, or a URL on an offline machine). Lightning
        calls this on every process before DDP wraps the model and before a checkpoint is restored.
        """
        super().setup(stage)
        if stage != TrainerFn.FITTING or self._backbone_weights_in_place:
            return
        extractor = self.model.feature_extractor
        extractor.load_pretrained()
        self._backbone_weights_in_place = True
        if extractor.shortcut is not None:  # ConTNet: saved with the checkpoint, which network was fitted
            self.hparams["shortcut"] = extractor.shortcut

    def configure_callbacks(self) -> list[Callback]:
        """The component callbacks of anomalib, less those the trainer already holds from an earlier stage.

        Returned again, Lightning would replace them by themselves and log that they
        "will override existing callbacks" at every ``Engine.test``/``predict`` after a fit.
        """
        attached = self._trainer.callbacks if self._trainer is not None else []
        return [callback for callback in super().configure_callbacks() if all(callback is not a for a in attached)]

    def on_train_epoch_start(self) -> None:
        """Start a fit: from scratch, or (``incremental``) from the fitted Gaussians' statistics.

        Fitting an already fitted model (a second ``engine.fit``) must fit the new
        data, so the fitted flag is cleared here; otherwise the memory-bank hooks
        would skip :meth:`fit` and keep the old Gaussians without a word.
        """
        super().on_train_epoch_start()
        self._train_samples_seen = 0
        self.model.gaussian.reset_statistics(continue_from_fit=self.incremental)
        self._is_fitted = torch.tensor([False], device=self.device)

    def training_step(self, batch: Batch, *args, **kwargs) -> torch.Tensor:  # noqa: ARG002 (Lightning signature)
        """Add the batch's patch embeddings to the running Gaussian statistics (NaN/Inf features are refused).

        The constant placeholder loss lets Lightning's loop advance the global step, which
        anomalib's checkpoint callback waits for, and DDP have a step output.
        """
        refuse_high_bit_depth(batch.image_path)
        embedding = self.model.extract_embedding(batch.image)
        self.model.raise_if_non_finite(embedding, "features of training images")
        keep = self._not_padding(embedding.shape[0])
        self.model.gaussian.update(embedding if keep is None else embedding[keep])
        return torch.zeros((), device=self.device, requires_grad=True)

    def _not_padding(self, batch_size: int) -> torch.Tensor | None:
        """Mask of the samples that are not DistributedSampler padding, or None when nothing is padded.

        The sampler repeats samples so that every process gets as many, which would bias the
        Gaussian; the repeats sit past the dataset length in its interleaved order, where this
        process's k-th sample is at ``rank + k * world_size``.
        """
        first = self._train_samples_seen
        self._train_samples_seen += batch_size
        trainer = self._trainer
        loader = trainer.train_dataloader if trainer is not None else None
        sampler = getattr(loader, "sampler", None)
        if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
            return None
        dataset_length = len(sampler.dataset)  # type: ignore[arg-type]
        positions = sampler.rank + sampler.num_replicas * torch.arange(first, first + batch_size)
        keep = positions < dataset_length
        return None if bool(keep.all()) else keep.to(self.device)

    def fit(self) -> None:
        """Turn the statistics of all training batches (of all processes) into the Gaussians.

        Outside training (anomalib's memory-bank hooks call this before validation too),
        without statistics, a fitted Gaussian is kept and an unfitted one is reported as such.
        """
        gaussian = self.model.gaussian
        fitting = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        if gaussian.samples_seen == 0 and not fitting:
            if gaussian.is_fitted:
                return
            raise NotFittedError(NOT_FITTED_MESSAGE)
        logger.info("Fitting per-position Gaussians on %d training images.", gaussian.samples_seen)
        gaussian.fit()

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:  # noqa: ARG002
        """Predict a batch: validation (the post-processor learns thresholds there), test and prediction alike.

        Files anomalib would clip to white (16-bit one-channel) are refused first; reading
        their headers is cheap beside the backbone.
        """
        refuse_high_bit_depth(batch.image_path)
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    test_step = predict_step = validation_step

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Mark the checkpoint as ConTNetPaDiM's, in the current format."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[FORMAT_KEY] = FORMAT_VERSION

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, with the reason, another model's checkpoint, another format, or damaged (NaN/Inf) entries.

        Runs before any state is loaded (Lightning's strict ``load_state_dict`` then checks
        names and shapes), so a refused checkpoint leaves the model as it was.
        """
        version = checkpoint.get(FORMAT_KEY)
        if version is None:
            msg = (
                f"not a ConTNetPaDiM checkpoint: it lacks the {FORMAT_KEY!r} entry every ConTNetPaDiM checkpoint "
                "has. It was written by another model (for example anomalib's Padim, or a backbone weights file, "
                "which is passed as weights=<file>); load it with the class that wrote it."
            )
            raise ValueError(msg)
        if version != FORMAT_VERSION:
            msg = (
                f"this checkpoint has {FORMAT_KEY}={version!r}; this anomalib-contnet reads format {FORMAT_VERSION}. "
                "Load it with the anomalib-contnet version that wrote it, or refit."
            )
            raise ValueError(msg)
        state_dict = checkpoint["state_dict"]
        damaged = [key for key, value in state_dict.items() if not torch.is_tensor(value)]
        damaged += list(non_finite_counts(state_dict, prefix="model."))  # would load silently and score NaN
        if damaged:
            msg = (
                "this checkpoint holds NaN/Inf values (which would give NaN anomaly maps and scores) or entries "
                "that are not tensors; the file is damaged or was saved from a model that diverged. Use an intact "
                f"checkpoint or refit: {len(damaged)} entries, first {damaged[:3]}"
            )
            raise ValueError(msg)
        prefix = "model.feature_extractor.backbone."
        backbone = {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
        self.model.feature_extractor.match_saved_architecture(backbone)
        if self.incremental and self._trainer is not None:
            self._continue_from(checkpoint)
        super().on_load_checkpoint(checkpoint)
        self._backbone_weights_in_place = True

    def _continue_from(self, checkpoint: dict[str, Any]) -> None:
        """Let ``fit --ckpt_path`` add images to the checkpoint's Gaussians; refuse reloading them over a newer fit.

        Without the loops' progress Lightning runs a new epoch instead of resuming the finished
        one. ``anomalib train --ckpt_path`` would test the old checkpoint's Gaussians as the new model's.
        """
        if self.trainer.state.fn == TrainerFn.FITTING:
            checkpoint.pop("loops", None)
            return
        saved_count = int(checkpoint["state_dict"].get("model.gaussian.count", 0))
        if self.model.gaussian.is_fitted and saved_count < int(self.model.gaussian.count):
            msg = (
                f"this checkpoint holds Gaussians of {saved_count} images, but the model was just fitted incrementally "
                f"on {int(self.model.gaussian.count)}: loading it would evaluate the earlier model. The incremental "
                "fit's own checkpoint is saved; fit with `anomalib fit ... --ckpt_path <old>`, then test with "
                "`anomalib test --ckpt_path <new checkpoint>`."
            )
            raise ValueError(msg)

    def to_torch(self, *args: Any, **kwargs: Any) -> Path:
        """Export as a pickled module, refusing an unfitted model (which could only fail where it is deployed)."""
        if not self.model.gaussian.is_fitted:
            raise NotFittedError(NOT_FITTED_MESSAGE)
        return super().to_torch(*args, **kwargs)
