r"""Functional API: the update rules on lists of tensors, without an Optimizer object.

``qhm(params, grads, momentum_buffers, *, lr, momentum, nu, ...)`` and
``qhadam(params, grads, exp_avgs, exp_avg_sqs, beta1_weights, beta2_weights, *, lr, betas, nus,
eps, ...)`` update their tensors in place with ``torch._foreach_*`` ops (call them under
``torch.no_grad()``, as with torch's functional optimizers); see each function's docstring for
the rule. QHAdam's ``beta1_weights``/``beta2_weights`` are its bias-correction normalizers, one
0-d tensor per parameter (fp64 on the CPU; with ``capturable``, in the compute dtype on the
params' device), zero before the first step and advanced by each call,
:math:`w \leftarrow 1 + \beta w`, as the optimizer's state keeps them (not step counts).
Precision handling (fp32 masters) is the optimizer classes' job, not theirs. Hyperparameters
are not range-checked here (torch's functional optimizers do not check them either); QHM's
``weight_decay_type`` is.
"""

from .qhadam import qhadam
from .qhm import qhm

__all__ = ["qhm", "qhadam"]
