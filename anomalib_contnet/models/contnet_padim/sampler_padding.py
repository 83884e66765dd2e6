"""Which samples of a distributed training batch are real, and which are DistributedSampler's padding.

The sampler repeats samples so that every process gets as many; fitted into the Gaussians,
the repeats would count some images twice. They sit past the dataset's length in the
sampler's interleaved order, where a process's k-th sample is number ``rank + k * world_size``.
"""

from __future__ import annotations

import torch
from torch.utils.data import DistributedSampler, Sampler

__all__ = ["real_samples"]


def real_samples(sampler: Sampler | None, first: int, batch_size: int) -> torch.Tensor | None:
    """Mask of the real samples among this process's samples ``first .. first + batch_size - 1``.

    None when nothing is padded (no DistributedSampler, ``drop_last``, or a batch of real samples only).
    """
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    positions = sampler.rank + sampler.num_replicas * torch.arange(first, first + batch_size)
    keep = positions < len(sampler.dataset)  # type: ignore[arg-type]
    return None if bool(keep.all()) else keep
