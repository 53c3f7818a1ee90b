"""Functional API: the update rules on lists of tensors, without an Optimizer object.

``qhm(params, grads, momentum_buffers, *, lr, momentum, nu, ...)`` and
``qhadam(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, betas, nus, eps, ...)`` update
their tensors in place with ``torch._foreach_*`` ops (call them under ``torch.no_grad()``, as
with torch's functional optimizers); see each function's docstring for the rule. Precision
handling (fp32 masters) is the optimizer classes' job, not theirs.
"""

from .qhadam import qhadam
from .qhm import qhm

__all__ = ["qhm", "qhadam"]
