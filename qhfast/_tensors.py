"""The tensors a step works on, as the optimizers and the kernels' orchestration
(``qhfast._fused``) both see them: DTensor parameters by their local shards, parameters
grouped into (device, dtype) buckets, and what GradScaler hands to ``step()``. Imports nothing
else of qhfast, so ``_base`` and ``_fused`` both import it and not each other's internals."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["AmpArgs", "DTensor", "Partial", "local", "shard_like", "buckets", "capturing"]


class AmpArgs(NamedTuple):
    """What torch.amp.GradScaler hands to step(): its scale (to divide the gradients by) and
    found_inf (nonzero: skip the step). Either may be None."""

    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None


if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor, Partial
else:  # a torch build without distributed support has no DTensor
    DTensor = Partial = ()  # type: ignore[assignment,misc]


def local(t: Tensor) -> Tensor:
    """A DTensor's local shard (a view of its storage, so in-place updates land in it), else t.

    The update runs on local shards: elementwise rules need no communication, and this sidesteps
    DTensor's gaps (no sharding rule for ``_foreach_copy_``, no mixed Tensor/DTensor lists)."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_like(local_shard: Tensor, like: Tensor, shape: Sequence[int]) -> Tensor:
    """``local_shard`` as this rank's shard of a DTensor of global ``shape`` (contiguous), on
    ``like``'s mesh with its placements; ``local_shard`` itself where ``like`` is no DTensor.
    The caller makes the shards line up: no communication checks them."""
    if not isinstance(like, DTensor):
        return local_shard
    strides = [1] * len(shape)
    for d in reversed(range(len(shape) - 1)):
        strides[d] = strides[d + 1] * max(shape[d + 1], 1)
    return DTensor.from_local(local_shard, like.device_mesh, like.placements, run_check=False,
                              shape=torch.Size(shape), stride=tuple(strides))


def buckets(params: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    """``params`` by (device, dtype), in their order: what one foreach call or one kernel
    launch takes."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in params:
        by_kind.setdefault((p.device, p.dtype), []).append(p)
    return by_kind


def flat_format(t: Tensor) -> torch.memory_format | None:
    """The memory format in which ``t``'s elements lie as one dense run, which a flat pass
    (the kernels') meets once each: contiguous, or channels_last (4-D) / channels_last_3d
    (5-D), a CNN's conv weights after ``model.to(memory_format=...)``; None for another
    layout."""
    if t.is_contiguous():
        return torch.contiguous_format
    for layout, dim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if t.dim() == dim and t.is_contiguous(memory_format=layout):
            return layout
    return None


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
