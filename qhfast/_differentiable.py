"""differentiable=True: the step recorded by autograd, so gradients flow through it.

The update rules are written once, with ``torch._foreach_*`` ops updating tensors in place. Two
things stand between them and autograd, and this module handles both, so the rules stay as they
are:

* torch's foreach ops save every input for the backward pass (their derivatives are generated
  per op, and keep all operands), and an input that the step later updates in place (a
  parameter, a moment) then fails the backward pass's version check. While the step records,
  :class:`PerTensorOps` runs each foreach call as the per-tensor torch ops it stands for, which
  save only what their derivatives need (as torch's own differentiable optimizers use the
  per-tensor path).
* A moment that one step reads where autograd saves it (QHAdam's ``exp_avg`` in the numerator)
  is updated in place by the next step. :func:`fresh_buffers` gives each step clones of the
  moments, stored in the state in place of the old ones, so what an earlier step saved is never
  written again (torch's Adam clones ``exp_avg`` for the same reason).

Counters are advanced in place (autograd keeps what their in-place products need); the
parameters are updated in place, as torch.optim does, so they must not be leaves that require
grad (step a clone), and what the user's code saved of them must not be needed afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["PerTensorOps", "fresh_buffers", "recording"]

#: foreach ops whose per-tensor form takes the trailing scalar as ``value=``
_VALUE_KEYWORD = ("addcmul", "addcdiv")
_PREFIX = "_foreach_"


def _at(value: Any, i: int) -> Any:
    """The i-th element of a list argument; any other argument is shared by every tensor."""
    return value[i] if isinstance(value, (list, tuple)) else value


class PerTensorOps(TorchFunctionMode):
    """Run ``torch._foreach_<op>(xs, ...)`` as ``torch.<op>(x, ...)`` per tensor (and
    ``_foreach_<op>_`` as ``x.<op>_(...)``), list arguments taken element by element; every
    other torch call runs unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not name.startswith(_PREFIX):
            return func(*args, **kwargs)
        op = name[len(_PREFIX):]
        in_place = op.endswith("_")
        base = op.rstrip("_")
        results = []
        for i in range(len(args[0])):
            operands = [_at(a, i) for a in args]
            keywords = {k: _at(v, i) for k, v in kwargs.items()}
            if base in _VALUE_KEYWORD and len(operands) == 4:
                keywords["value"] = operands.pop()
            if in_place:
                getattr(operands[0], op)(*operands[1:], **keywords)
            else:
                results.append(getattr(torch, base)(*operands, **keywords))
        return None if in_place else results


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """Autograd records what runs inside (also under ``torch.no_grad``), foreach ops per tensor."""
    with torch.enable_grad(), PerTensorOps():
        yield


def fresh_buffers(states: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
    """Replace each state's moments (``keys``) by clones, in the state dicts themselves."""
    for state in states:
        for key in keys:
            state[key] = state[key].clone()
