"""QHM: quasi-hyperbolic momentum (Ma & Yarats, ICLR 2019)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT, required

from . import convert
from ._base import (
    AmpArgs,
    QHOptimizer,
    Scalar,
    _as_scalar,
    check_finite,
    check_nonnegative,
    foreach_add_scaled_,
    foreach_lerp_,
    maybe_nonzero,
    prepare_grads,
)

__all__ = ["QHM", "qhm"]

WEIGHT_DECAY_TYPES = ("grad", "direct")


def check_weight_decay_type(value: Any) -> None:
    if value not in WEIGHT_DECAY_TYPES:
        raise ValueError(f"Invalid weight_decay_type value: {value!r} (weight_decay_type must "
                         "be 'grad' or 'direct')")


def qhm(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: Scalar,
    momentum: Scalar,
    nu: Scalar,
    weight_decay: float = 0.0,
    weight_decay_type: str = "grad",
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    r"""Functional QHM: update ``params`` and ``momentum_buffers`` in place.

    .. math::
        d &\leftarrow \pm\nabla + \lambda\theta \quad (\text{``grad'' decay}) \qquad
        \theta \leftarrow (1 - \alpha\lambda)\,\theta \quad (\text{``direct'' decay}) \\
        g &\leftarrow \beta g + (1 - \beta)\, d \\
        \theta &\leftarrow \theta - \alpha \left[(1 - \nu)\, d + \nu g\right]

    All lists hold tensors of one device; ``params`` and ``momentum_buffers`` share a dtype,
    ``grads`` may be of lower precision (they are upcast) and are never modified. ``lr``,
    ``momentum`` and ``nu`` are floats or 0-d tensors on the params' device. ``grad_scale``
    divides the gradients; a nonzero ``found_inf`` makes the call change nothing (no host read).
    """
    check_weight_decay_type(weight_decay_type)
    if not params:
        return
    keep = None if found_inf is None else 1.0 - found_inf.to(params[0].dtype)
    if keep is not None:
        lr = lr * keep
    if weight_decay != 0.0 and weight_decay_type == "direct":
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    coupled_decay = weight_decay if weight_decay_type == "grad" else 0.0
    d = prepare_grads(grads, params, maximize=maximize, weight_decay=coupled_decay,
                      grad_scale=grad_scale, found_inf=found_inf)
    foreach_lerp_(momentum_buffers, d, (1.0 - momentum) if keep is None else (1.0 - momentum) * keep)
    if maybe_nonzero(nu):
        foreach_add_scaled_(params, momentum_buffers, -lr * nu)
    if isinstance(nu, Tensor) or nu != 1.0:
        foreach_add_scaled_(params, d, -lr * (1.0 - nu))


class QHM(QHOptimizer):
    r"""Quasi-hyperbolic momentum (QHM), Ma & Yarats (ICLR 2019).

    With learning rate :math:`\alpha`, momentum :math:`\beta`, immediate discount :math:`\nu` and
    a dampened momentum buffer :math:`g` that starts at zero:

    .. math::
        g_{t+1} &\leftarrow \beta\, g_t + (1 - \beta)\, d_t \\
        \theta_{t+1} &\leftarrow \theta_t - \alpha \left[(1 - \nu)\, d_t + \nu\, g_{t+1}\right]

    where :math:`d_t` is the gradient (negated with ``maximize``). :math:`\nu = 0` is plain SGD,
    :math:`\nu = 1` is (dampened) momentum, :math:`\nu = \beta` is Nesterov momentum. Because the
    buffer is dampened, plain momentum with learning rate :math:`\eta` corresponds to
    :math:`\alpha = \eta / (1 - \beta)`.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\alpha`, a finite number >= 0 (float or 1-element tensor).
        momentum: :math:`\beta`, a finite number >= 0, as in qhoptim (conversions produce 1
            and above; above 1 the buffer grows with each step).
        nu: :math:`\nu`, any finite number (conversions produce values outside [0, 1]).
        weight_decay: :math:`\lambda` >= 0 (default 0).
        weight_decay_type: ``"grad"`` adds :math:`\lambda\theta` to the gradient, as
            :class:`torch.optim.SGD` does; ``"direct"`` multiplies :math:`\theta` by
            :math:`1 - \alpha\lambda` before the update (default ``"grad"``).
        foreach, maximize, capturable, differentiable, fused, low_precision, state_dtype,
            master_weights: see :class:`qhfast._base.QHOptimizer`.

    Same constructor and classmethods as ``qhoptim.pyt.QHM``; unlike it, ``p.grad`` is never
    modified. State per parameter: ``momentum_buffer`` (in ``state_dtype``), and for bf16/fp16
    parameters ``master_param`` or ``kahan_compensation`` as ``low_precision`` says.

    Example:
        >>> optimizer = QHM(model.parameters(), lr=1.0, nu=0.7, momentum=0.999)
        >>> optimizer.zero_grad()
        >>> loss_fn(model(input), target).backward()
        >>> optimizer.step()
    """

    _buffer_keys = ("momentum_buffer",)
    _kernel = "qhm"
    _tensor_hyperparameters = ("lr", "momentum", "nu")
    _scheduled_hyperparameters = ("lr", "momentum")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = required,
        momentum: float | Tensor = required,
        nu: float | Tensor = required,
        weight_decay: float = 0.0,
        weight_decay_type: str = "grad",
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        low_precision: str = "master",
        state_dtype: torch.dtype | str | None = None,
        master_weights: bool | None = None,
    ) -> None:
        # lr, momentum and nu may instead come in every param group (torch.optim's `required`):
        # a group that has none of its own raises TypeError in add_param_group
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nu=nu,
            weight_decay=weight_decay,
            weight_decay_type=weight_decay_type,
        )
        super().__init__(
            params,
            defaults,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            low_precision=low_precision,
            state_dtype=state_dtype,
            master_weights=master_weights,
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_nonnegative(group["lr"], "learning rate", "lr")
        check_nonnegative(group["momentum"], "momentum value", "momentum")
        check_finite(group["nu"], "nu value", "nu")
        check_nonnegative(group["weight_decay"], "weight_decay value", "weight_decay")
        self._check_step_flags(group)

    def _check_step_flags(self, group: dict[str, Any]) -> None:
        super()._check_step_flags(group)
        check_weight_decay_type(group["weight_decay_type"])

    def _init_param_state(self, state: dict[str, Any], like: Tensor, group: dict[str, Any]) -> None:
        state["momentum_buffer"] = like

    def _kernel_hyperparameters(self, group: dict[str, Any]) -> tuple[dict[str, Any], int]:
        hyper = dict(lr=group["lr"], momentum=group["momentum"], nu=group["nu"],
                     weight_decay=group["weight_decay"])
        decay = (0 if group["weight_decay"] == 0.0
                 else 2 if group["weight_decay_type"] == "direct" else 1)
        return hyper, decay

    def _update(self, group, params, grads, states, hyper, factors, amp: AmpArgs) -> None:
        qhm(
            params,
            grads,
            [s["momentum_buffer"] for s in states],
            **hyper,
            weight_decay=group["weight_decay"],
            weight_decay_type=group["weight_decay_type"],
            maximize=group["maximize"],
            grad_scale=amp.grad_scale,
            found_inf=amp.found_inf,
        )

    def _sparse_update(self, group, params, states, amp: AmpArgs) -> None:
        """:func:`qhm` for sparse gradients (an ``nn.Embedding(sparse=True)``'s), one tensor at
        a time, as qhoptim and torch.optim.SGD take them: the buffer and the parameter stay
        dense, the gradient's term touches its rows alone (coupled decay makes it dense)."""
        lr, momentum, nu = (_as_scalar(group[name], params[0].device, params[0].dtype, False)
                            for name in ("lr", "momentum", "nu"))
        weight_decay = group["weight_decay"]
        for p, state in zip(params, states):
            d = p.grad.to(p.dtype)
            if amp.grad_scale is not None:
                d = d / amp.grad_scale.to(p.dtype)
            if group["maximize"]:
                d = -d
            if weight_decay != 0.0:
                if group["weight_decay_type"] == "grad":
                    d = p.mul(weight_decay).add_(d)
                else:
                    p.mul_(1.0 - lr * weight_decay)
            buffer = state["momentum_buffer"]
            buffer.mul_(momentum).add_(d, alpha=1.0 - momentum)
            if nu != 0.0:
                p.add_(buffer, alpha=-lr * nu)
            if nu != 1.0:
                p.add_(d, alpha=-lr * (1.0 - nu))

    # ---- hyperparameter recoveries (qhoptim's classmethods), see qhfast.convert -------------

    @classmethod
    def from_pid(cls, k_p: float, k_i: float, k_d: float) -> dict[str, float]:
        """QHM hyperparameters of a PID controller optimizer; see :func:`qhfast.convert.from_pid`."""
        return convert.from_pid(k_p, k_i, k_d)

    @classmethod
    def from_synthesized_nesterov(cls, alpha: float, beta1: float, beta2: float) -> dict[str, float]:
        """See :func:`qhfast.convert.from_synthesized_nesterov`."""
        return convert.from_synthesized_nesterov(alpha, beta1, beta2)

    @classmethod
    def from_robust_momentum(cls, l: float, kappa: float, rho: float | None = None) -> dict[str, float]:  # noqa: E741
        """See :func:`qhfast.convert.from_robust_momentum`."""
        return convert.from_robust_momentum(l, kappa, rho)

    @classmethod
    def from_accsgd(cls, delta: float, kappa: float, xi: float, eps: float = 0.7) -> dict[str, float]:
        """See :func:`qhfast.convert.from_accsgd`."""
        return convert.from_accsgd(delta, kappa, xi, eps)

    @classmethod
    def from_two_state_optimizer(
        cls, h: float, k: float, l: float, m: float, q: float, z: float  # noqa: E741
    ) -> dict[str, float]:
        """See :func:`qhfast.convert.from_two_state_optimizer`."""
        return convert.from_two_state_optimizer(h, k, l, m, q, z)
