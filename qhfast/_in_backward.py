r"""The optimizer step inside backward: each parameter steps as soon as its gradient is ready.

A training step normally holds every gradient at once: ``backward()`` writes them all, then
``step()`` reads them. For a large model they cost as much memory as the parameters. Stepping
each parameter from a post-accumulate-grad hook (``Tensor.register_post_accumulate_grad_hook``,
the pattern torch documents for this) and then freeing its gradient keeps about one gradient
alive at a time::

    optimizer = qhfast.QHAdamW(model.parameters(), lr=3e-4, nus=(0.7, 1.0))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1000)
    handle = qhfast.step_in_backward(optimizer)
    for x, y in data:
        loss_fn(model(x), y).backward()   # steps every parameter; their .grad are None after
        scheduler.step()                  # changes group["lr"], read by the next backward
    handle.remove()                       # back to optimizer.step()

It is the same optimizer: its param groups, hyperparameters, schedulers, ``state_dict`` and
``load_state_dict`` work as usual, and each parameter's update is the one ``step()`` would have
made (its group's hyperparameters, its state created at its first gradient, QHAdam's step
counters per parameter): on the per-tensor path the trajectory is bit for bit that of
``backward(); step(); zero_grad()``.

The rules:

* After a parameter steps, its ``p.grad`` is set to None: freeing it is the point. This is the
  one place qhfast touches a gradient.
* While the handle is active, ``optimizer.step()`` raises RuntimeError (the parameters already
  stepped; a second update would be wrong). ``handle.remove()`` (or leaving the ``with`` block)
  restores it.
* Each ``backward()`` is one step. So these cannot combine with it, and need the ordinary
  ``step()``: gradient accumulation over micro-batches (each micro-batch would step; sum the
  micro-batch losses into one ``backward()`` if they fit, else use ``step()``); gradient
  clipping by the global norm (``clip_grad_norm_`` needs every gradient before any step;
  there are none left to clip); ``torch.amp.GradScaler`` (its inf/NaN check and unscaling run
  after backward, when the parameters have already stepped with scaled gradients: fp16
  training needs ``step()``; bf16 autocast needs no scaler). ``scaler.step(optimizer)`` raises
  through ``step()``'s error.
* The optimizer's step pre/post hooks (``register_step_pre_hook``) do not run: there is no
  ``step()`` call.
* Not with ``fused=True`` (its compiled step is one graph per param group; per parameter it
  would compile once per parameter shape) nor ``differentiable=True`` (a step inside the
  backward pass cannot itself be differentiated): both raise ValueError, also for a group
  added later with ``add_param_group`` (whose parameters are hooked too).
* Not with DDP: a gradient is ready for the step only once it is reduced across ranks,
  and the hooks fire at its local accumulation (the ranks then drift apart, silently). Nor,
  untested, with FSDP2 (a review saw torch 2.13 call the hooks on the sharded parameters
  after its reduce-scatter, and the steps equal a single process's; not checked on other
  versions). Single-process models and tensor-parallel DTensor parameters (whose gradients
  autograd accumulates already reduced) work.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ._base import AmpArgs, QHOptimizer

__all__ = ["StepInBackward", "step_in_backward"]


def step_in_backward(optimizer: QHOptimizer) -> StepInBackward:
    """Make ``optimizer`` step each of its parameters inside ``backward()``, as soon as the
    parameter's gradient is accumulated, then set its ``.grad`` to None.

    Returns a handle: ``handle.remove()`` (or the end of a ``with`` block) undoes it. While it
    is active, ``optimizer.step()`` raises RuntimeError. See :mod:`qhfast._in_backward` for
    what combines with it and what needs the ordinary step.
    """
    return StepInBackward(optimizer)


def check_group(optimizer: QHOptimizer, group: dict[str, Any]) -> None:
    """Raise ValueError if ``group``'s options cannot step inside backward."""
    for flag, why in (("fused", "its compiled step is one graph per param group"),
                      ("differentiable", "a step inside backward cannot be differentiated")):
        if group[flag]:
            raise ValueError(
                f"step_in_backward does not support {type(optimizer).__name__} with "
                f"{flag}=True ({why}); use {flag}=False"
            )


class StepInBackward:
    """The handle of :func:`step_in_backward`: the hooks on the optimizer's parameters."""

    def __init__(self, optimizer: QHOptimizer) -> None:
        if not isinstance(optimizer, QHOptimizer):
            raise TypeError(
                "step_in_backward needs a qhfast optimizer (QHM, QHAdam, QHAdamW), got "
                f"{type(optimizer).__name__}"
            )
        for group in optimizer.param_groups:
            check_group(optimizer, group)
        if getattr(optimizer, "_stepping_in_backward", None) is not None:
            raise RuntimeError(f"step_in_backward is already active for this "
                               f"{type(optimizer).__name__}; remove the first handle before "
                               "making another")
        self.optimizer = optimizer
        self._where: dict[int, tuple[int, int]] = {}
        self._hooks: list[RemovableHandle] = []
        for group in optimizer.param_groups:
            self.hook(group["params"])
        optimizer._stepping_in_backward = self

    def check(self, group: dict[str, Any]) -> None:
        """Raise ValueError if ``group`` (being added to the optimizer) cannot step inside
        backward."""
        check_group(self.optimizer, group)

    def hook(self, params: list[Tensor]) -> None:
        """Step ``params`` (of one of the optimizer's groups) inside backward from now on;
        ``QHOptimizer.add_param_group`` calls it for a group added while the handle is active.
        A frozen param (``requires_grad`` False: no gradient, as ``step()`` skips it) gets no
        hook."""
        self._hooks.extend(p.register_post_accumulate_grad_hook(self._step_param)
                           for p in params if p.requires_grad)

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def remove(self) -> None:
        """Remove the hooks: backward() no longer steps, optimizer.step() works again."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if getattr(self.optimizer, "_stepping_in_backward", None) is self:
            self.optimizer._stepping_in_backward = None

    def __enter__(self) -> StepInBackward:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.remove()

    def step_error(self, optimizer: QHOptimizer) -> str:
        return (
            f"{type(optimizer).__name__}.step() called while qhfast.step_in_backward is active: "
            "every parameter already stepped inside backward() (a GradScaler, gradient clipping "
            "or gradient accumulation need the ordinary step; torch.distributed.checkpoint's "
            "get/set_optimizer_state_dict call step() on an optimizer without state: load "
            "before making the handle); call handle.remove() to step with optimizer.step() "
            "again"
        )

    # ---- the hook ----------------------------------------------------------------------------

    def _index(self) -> None:
        """Where each parameter sits: (group index, position). Indices, not the group dicts:
        ``load_state_dict`` replaces the dicts (same order), and a scheduler edits them."""
        self._where = {
            id(p): (g, i)
            for g, group in enumerate(self.optimizer.param_groups)
            for i, p in enumerate(group["params"])
        }

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        groups = self.optimizer.param_groups
        where = self._where.get(id(p))
        if where is None or where[0] >= len(groups) or where[1] >= len(groups[where[0]]["params"]) \
                or groups[where[0]]["params"][where[1]] is not p:
            self._index()  # the groups were rebuilt (or reordered)
            where = self._where.get(id(p))
            if where is None:
                raise RuntimeError("step_in_backward: a hooked parameter is no longer in the "
                                   f"{type(self.optimizer).__name__}'s param groups")
        return groups[where[0]]

    @torch.no_grad()
    def _step_param(self, p: Tensor) -> None:
        optimizer = self.optimizer
        group = self._group_of(p)
        optimizer._check_group_at_a_step(group)  # (flags, hyperparameters: as step() does)
        # the checks step() makes (sparse, DTensor layout, dtype, options), for this one
        params, sparse = optimizer._params_with_grads({**group, "params": [p]})
        if params or sparse:
            index = next(i for i, g in enumerate(optimizer.param_groups) if g is group)
            if sparse:
                optimizer._step_sparse(index, group, sparse, AmpArgs())
            else:
                optimizer._step_params(index, group, params, AmpArgs())
        p.grad = None
        # what torch's LR schedulers look for to know that the optimizer has stepped
        optimizer._opt_called = True  # type: ignore[attr-defined]
