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

import inspect
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule, MemoryBankMixin
from anomalib.visualization import Visualizer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import DataLoader

from anomalib_contnet.models.contnet_padim.anomaly_map import refuse_bad_sigma
from anomalib_contnet.models.contnet_padim.checkpoint import (
    arguments_to_adopt,
    record_arguments,
    refuse_unreadable,
)
from anomalib_contnet.models.contnet_padim.image_files import name_damaged_files, refuse_high_bit_depth
from anomalib_contnet.models.contnet_padim.pre_processor import DEFAULT_IMAGE_SIZE, ConTNetPreProcessor
from anomalib_contnet.models.contnet_padim.sampler_padding import real_samples
from anomalib_contnet.models.contnet_padim.torch_model import NOT_FITTED_MESSAGE, ConTNetPaDiMModel, NotFittedError
from anomalib_contnet.models.staged_export import AtomicExportMixin

__all__ = ["ConTNetPaDiM"]

logger = logging.getLogger(__name__)


def _checked_image_size(image_size: Sequence[int] | None) -> tuple[int, int]:
    """``image_size`` (default 224x224) as two positive integers, else ValueError."""
    size = tuple(image_size or DEFAULT_IMAGE_SIZE)
    if len(size) != 2 or not all(isinstance(side, int) and side > 0 for side in size):
        msg = f"image_size must be (height, width), two positive whole numbers of pixels, got {image_size}"
        raise ValueError(msg)
    return size


def _few_images_message(count: int, dims: int, epsilon: float, per_image: int, shared: bool) -> str:
    """What the scores mean when there are no more training samples per position than feature dimensions."""
    regulariser = "epsilon times the covariance of all training patches" if shared else "epsilon*I"
    measure = "Mahalanobis (under that covariance)" if shared else "Euclidean"
    if count == 1:
        return (
            f"1 training image: the covariance is {regulariser} (epsilon={epsilon}), so the scores are {measure} "
            "distances to that image's features divided by sqrt(epsilon); they rank images, but normal variation "
            "at each position is not modelled. Add normal images for a Gaussian model."
        )
    images = f"{count} training images"
    if per_image > 1:
        images = f"{count // per_image} training images ({count} patches per position with the neighbourhood)"
    return (
        f"{images} for {dims} feature dimensions: the Gaussians span only {count - 1} directions, "
        f"and distances in the other {dims - count + 1} are {measure} divided by sqrt(epsilon={epsilon}), "
        "so epsilon strongly influences the scores. More training images, or n_features below the number of "
        "images, reduce this."
    )


class ConTNetPaDiM(AtomicExportMixin, MemoryBankMixin, AnomalibModule):
    """ConTNet patch features + per-position Gaussians (Dini & Rahtu 2023).

    Args:
        backbone: ``contnet_b`` (the paper's), another ConTNet variant
            (``contnet_ti``, ``contnet_s``, ``contnet_m``) or any timm model name.
        layers: backbone stages to combine (see module docstring).
        pre_trained: fit on the backbone's ImageNet weights (ConTNet's are looked up locally, then
            downloaded; see ``anomalib-contnet weights --help``). They are loaded when a fit starts:
            a fitted checkpoint holds every weight, so testing, predicting and exporting one never
            need the file. ``False`` gives untrained features, useful only for tests.
        weights: local path or URL of backbone weights; overrides the lookup.
        n_features: random subset of embedding channels to keep (all by default).
        feature_seed: seed of that subset.
        epsilon: covariance regulariser ``εI``.
        sigma: anomaly-map smoothing in pixels.
        neighbourhood, shift_tolerance, shared_covariance: the Gaussian head's levers beyond the paper
            (:class:`~anomalib_contnet.models.contnet_padim.gaussian.StreamingGaussian`); 0, the
            paper's head, by default (``False`` for ``shared_covariance``).
            ``configs/model/contnet_padim_best.yaml`` is the best head measured.
        patch_context: ``c``; each patch's embedding also holds the features of the patches within
            ``c`` cells (concatenated, ``(2c + 1)²`` times the channels; zeros beyond the border), as
            Patchcore's and MHPatchcore's 3x3 patches do. 0, the paper's embedding, by default.
        incremental: a fit adds its images to the fitted Gaussians instead of starting
            afresh: ``load_from_checkpoint(path, incremental=True)`` then ``Engine().fit``
            gives the Gaussians of one fit on the earlier and the new images together. Saved
            with the checkpoint like every argument: load with ``incremental=False`` to refit.
        image_size: input size of the default pre-processor (at least the deepest layer's stride).

    Loading a checkpoint (``--ckpt_path``, ``load_from_checkpoint``), the arguments left at their
    defaults take the checkpoint's values and contradicting ones are refused (:mod:`.checkpoint`).
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
        neighbourhood: int = 0,
        shift_tolerance: int = 0,
        shared_covariance: bool = False,
        patch_context: int = 0,
        incremental: bool = False,
        image_size: tuple[int, int] | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        size = _checked_image_size(image_size)
        refuse_bad_sigma(sigma, size)  # before the blur kernel is built: it grows with sigma squared
        model = ConTNetPaDiMModel(  # untrained until a fit starts (on_fit_start): checkpoints hold every weight
            backbone=backbone,
            layers=tuple(layers),
            pre_trained=False,
            n_features=n_features,
            feature_seed=feature_seed,
            epsilon=epsilon,
            sigma=sigma,
            neighbourhood=neighbourhood,
            shift_tolerance=shift_tolerance,
            shared_covariance=shared_covariance,
            patch_context=patch_context,
        )
        model.feature_extractor.refuse_input_size(size)
        if pre_processor is True:
            mean, std = model.feature_extractor.normalization
            pre_processor = self.configure_pre_processor(image_size=size, mean=mean, std=std)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model: ConTNetPaDiMModel = model
        self.incremental = incremental
        self._train_samples_seen = 0
        self._needs_pretrained_weights = pre_trained or weights is not None

    @classmethod
    def configure_pre_processor(
        cls,
        image_size: tuple[int, int] | None = None,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
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
        """Give the datamodule's datasets their damaged-file names (:mod:`.image_files`).

        Lightning calls this on every process before any data loader starts its workers.
        """
        super().setup(stage)
        datamodule = self.trainer.datamodule
        for split in ("train_data", "val_data", "test_data"):
            name_damaged_files(getattr(datamodule, split, None))

    def on_fit_start(self) -> None:
        """Load the backbone's pretrained weights when a fit starts, unless a checkpoint already brought them.

        Lightning restores ``fit --ckpt_path`` before this hook, so continuing a fitted model,
        like testing, predicting or exporting one, never looks for the ImageNet file.
        """
        super().on_fit_start()
        if self._needs_pretrained_weights:
            self.model.feature_extractor.load_pretrained(self.hparams.weights)
            self._needs_pretrained_weights = False

    def on_predict_start(self) -> None:
        """Datasets given to ``Engine.predict`` directly (``anomalib predict --data DIR``) name damaged files too."""
        super().on_predict_start()
        loaders = self.trainer.predict_dataloaders
        for loader in [loaders] if isinstance(loaders, DataLoader) else loaders or ():
            name_damaged_files(loader.dataset)

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
        first, self._train_samples_seen = self._train_samples_seen, self._train_samples_seen + embedding.shape[0]
        keep = real_samples(getattr(self.trainer.train_dataloader, "sampler", None), first, embedding.shape[0])
        self.model.gaussian.update(embedding if keep is None else embedding[keep.to(self.device)])
        return torch.zeros((), device=self.device, requires_grad=True)

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
        images = gaussian.samples_seen // gaussian.samples_per_image
        logger.info("Fitting per-position Gaussians on %d training images.", images)
        gaussian.fit()
        count, dims = int(gaussian.count), gaussian.mean.shape[-1]
        if count <= dims and (self._trainer is None or self.trainer.is_global_zero):
            # Every fit says it, not only the first in a process (Python's default filter would stop a second
            # fit's warning at the same line), while the user's filters still apply: no registry.
            message = _few_images_message(
                count, dims, gaussian.epsilon, gaussian.samples_per_image, gaussian.shared_covariance
            )
            warnings.warn_explicit(message, UserWarning, __file__, inspect.currentframe().f_lineno)

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
        """Mark the checkpoint as ConTNetPaDiM's, in the current format, with the arguments that shape the scores."""
        super().on_save_checkpoint(checkpoint)
        record_arguments(checkpoint, self.hparams)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Make the model the checkpoint's, or refuse the checkpoint with the reason, before any state is loaded.

        Arguments left at their defaults take the checkpoint's values (the model is rebuilt
        for them); one set otherwise must agree (:mod:`.checkpoint`). Another model's
        checkpoint, another format, damaged entries and saved tensors that do not fit
        together are refused. Lightning's strict ``load_state_dict`` then loads the state.
        """
        refuse_unreadable(checkpoint)
        defaults = {name: parameter.default for name, parameter in inspect.signature(ConTNetPaDiM).parameters.items()}
        adopted = arguments_to_adopt(checkpoint, self.hparams, defaults)
        if adopted:
            self._rebuild_with(adopted)
        state_dict = checkpoint["state_dict"]
        self.model.refuse_inconsistent_state(state_dict, prefix="model.")
        prefix = "model.feature_extractor.backbone."
        backbone = {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
        self.model.feature_extractor.match_saved_architecture(backbone)
        if self.incremental and self._trainer is not None:
            self._continue_from(checkpoint)
        super().on_load_checkpoint(checkpoint)
        self._needs_pretrained_weights = False

    def _rebuild_with(self, arguments: Mapping[str, Any]) -> None:
        """Rebuild the torch model with the checkpoint's ``arguments`` (untrained: the checkpoint holds the weights).

        The pre-processor follows the checkpoint through anomalib's own restore of its settings.
        """
        logger.info("Building the checkpoint's model: %s.", ", ".join(f"{k}={v!r}" for k, v in arguments.items()))
        self.hparams.update(arguments)
        shape = set(inspect.signature(ConTNetPaDiMModel).parameters) - {"pre_trained", "weights"}
        model = ConTNetPaDiMModel(**{name: self.hparams[name] for name in shape}, pre_trained=False)
        model.tiler = self.model.tiler
        self.model = model.to(self.model.feature_index.device)

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
