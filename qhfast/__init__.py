"""qhfast: quasi-hyperbolic optimizers (QHM, QHAdam, QHAdamW) for modern PyTorch.

A drop-in replacement for ``qhoptim.pyt`` (same constructors, classmethods and trajectories)
with foreach, per-tensor and compiled paths, memory-lean precision modes for bf16/fp16 parameters
(fp32 masters, Kahan compensation, stochastic rounding, bf16 state), and torch.optim's
flags and state_dict conventions. ``qhfast.functional`` holds the update rules as functions and
``qhfast.convert`` the hyperparameter recoveries. ``qhfast.step_in_backward(optimizer)`` steps
each parameter inside ``backward()`` and frees its gradient (gradient release).
"""

from . import convert, functional
from ._in_backward import StepInBackward, step_in_backward
from .qhadam import QHAdam, QHAdamW
from .qhm import QHM

__all__ = ["QHM", "QHAdam", "QHAdamW", "StepInBackward", "convert", "functional",
           "step_in_backward"]
__version__ = "0.1.0"
