"""The tensors a step works on, as the optimizers and the kernels' orchestration
(``qhfast._fused``) both see them: DTensor parameters by their local shards, parameters
grouped into (device, dtype) buckets, and what GradScaler hands to ``step()``. Imports nothing
else of qhfast, so ``_base`` and ``_fused`` both import it and not each other's internals."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["AmpArgs", "DTensor", "Partial", "local", "buckets"]


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


def buckets(params: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    """``params`` by (device, dtype), in their order: what one foreach call or one kernel
    launch takes."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in params:
        by_kind.setdefault((p.device, p.dtype), []).append(p)
    return by_kind
