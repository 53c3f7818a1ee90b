"""QHAdam and QHAdamW (Ma & Yarats, ICLR 2019)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from . import convert
from ._base import (
    AmpArgs,
    QHOptimizer,
    Scalar,
    _is_bool,
    check_finite,
    check_nonnegative,
    check_number,
    check_pair,
    foreach_addcdiv_,
    foreach_addcmul_,
    foreach_lerp_,
    maybe_nonzero,
    prepare_grads,
)

__all__ = ["QHAdam", "QHAdamW", "qhadam"]


def advance_debias_weights(
    weights: list[Tensor], beta: Scalar, on_device: bool, keep: Tensor | None = None
) -> list[float] | list[Tensor]:
    r"""Advance the bias-correction normalizers :math:`w \leftarrow 1 + \beta w` and return the
    lerp fractions :math:`1/w`.

    :math:`w_t = \sum_{i \le t} \prod_{i < j \le t} \beta_j` is the total weight of the
    t gradients in the moving average (:math:`(1 - \beta^t)/(1 - \beta)` for a constant
    :math:`\beta`), so ``x̂ ← x̂ + (y - x̂)/w`` keeps ``x̂`` the bias-corrected average even when
    a scheduler changes :math:`\beta` (qhoptim's recursion, exactly).

    Off the device (``on_device`` False: CPU counters, float betas) the fractions are floats,
    read with one host copy for the whole list. On the device they are 0-d tensors computed
    where the counters live, with no host read; ``keep`` (0 or 1) then makes a skipped step
    leave the counters alone and return fractions 0.
    """
    if keep is None:
        torch._foreach_mul_(weights, beta)
        torch._foreach_add_(weights, 1.0)
        if on_device:
            return torch._foreach_reciprocal(weights)  # weights >= 1: finite
        return [1.0 / w for w in torch.stack(weights).tolist()]
    # a skipped step keeps the old weights, which are 0 before the first step taken: the
    # fractions come from the advanced ones, times keep, never 1/0
    advanced = torch._foreach_mul(weights, beta)
    torch._foreach_add_(advanced, 1.0)
    fractions = torch._foreach_reciprocal(advanced)  # advanced >= 1: finite
    foreach_lerp_(weights, advanced, keep)
    torch._foreach_mul_(fractions, keep)
    return fractions


def qhadam_step_fractions(
    beta1_weights: list[Tensor],
    beta2_weights: list[Tensor],
    *,
    betas: tuple[Scalar, Scalar],
    capturable: bool = False,
    found_inf: Tensor | None = None,
) -> tuple[list, list]:
    """Advance both normalizers of every tensor (see :func:`advance_debias_weights`) and return
    the moments' lerp fractions: floats on the CPU counters' float path, else 0-d tensors.

    Done once per step for all of a group's tensors, also when the update then runs one tensor
    at a time: a few list ops instead of a few ops per tensor.
    """
    # step-dependent factors as tensors where the counters live: capturable, tensor betas, or a
    # possible skip (found_inf), which must leave the counters as they were without a host read
    on_device = capturable or found_inf is not None or any(isinstance(b, Tensor) for b in betas)
    keep = None if found_inf is None else 1.0 - found_inf.to(beta1_weights[0].dtype)
    return (advance_debias_weights(beta1_weights, betas[0], on_device, keep),
            advance_debias_weights(beta2_weights, betas[1], on_device, keep))


def qhadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    beta1_weights: list[Tensor],
    beta2_weights: list[Tensor],
    *,
    lr: Scalar,
    betas: tuple[Scalar, Scalar],
    nus: tuple[Scalar, Scalar],
    eps: float,
    weight_decay: float = 0.0,
    decouple_weight_decay: bool = False,
    maximize: bool = False,
    capturable: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    r"""Functional QHAdam: update ``params``, the moments and their normalizers in place.

    .. math::
        d &\leftarrow \pm\nabla + \lambda\theta \quad (\text{coupled}) \qquad
        \theta \leftarrow (1 - \alpha\lambda)\,\theta \quad (\text{decoupled}) \\
        \hat m &\leftarrow \text{bias-corrected EMA}_{\beta_1}(d) \qquad
        \hat v \leftarrow \text{bias-corrected EMA}_{\beta_2}(d^2) \\
        \theta &\leftarrow \theta - \alpha\,
            \frac{(1 - \nu_1)\, d + \nu_1 \hat m}{\sqrt{(1 - \nu_2)\, d^2 + \nu_2 \hat v} + \epsilon}

    ``exp_avgs``/``exp_avg_sqs`` hold the bias-corrected :math:`\hat m, \hat v` and
    ``beta1_weights``/``beta2_weights`` their normalizers (see :func:`advance_debias_weights`), as
    qhoptim stores them, per parameter: a parameter that first gets a gradient late starts its
    own bias correction. ``grads`` are never modified.

    ``lr``, ``betas`` and ``nus`` are floats or 0-d tensors on the params' device. With
    ``capturable`` the normalizers live on the params' device and nothing is read on the host.
    ``grad_scale`` divides the gradients; a nonzero ``found_inf`` (a 0-d tensor where the
    normalizers live) makes the call change nothing, without a host read.
    """
    if not params:
        return
    fractions = qhadam_step_fractions(beta1_weights, beta2_weights, betas=betas,
                                      capturable=capturable, found_inf=found_inf)
    qhadam_apply(params, grads, exp_avgs, exp_avg_sqs, *fractions, lr=lr, nus=nus, eps=eps,
                 weight_decay=weight_decay, decouple_weight_decay=decouple_weight_decay,
                 maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)


def qhadam_apply(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    beta1_fractions: list[float] | list[Tensor],
    beta2_fractions: list[float] | list[Tensor],
    *,
    lr: Scalar,
    nus: tuple[Scalar, Scalar],
    eps: float,
    weight_decay: float,
    decouple_weight_decay: bool,
    maximize: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """:func:`qhadam` once the fractions are known (from :func:`qhadam_step_fractions`)."""
    nu1, nu2 = nus
    keep = None if found_inf is None else 1.0 - found_inf.to(params[0].dtype)
    if keep is not None:
        lr = lr * keep
    if weight_decay != 0.0 and decouple_weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    coupled_decay = 0.0 if decouple_weight_decay else weight_decay
    d = prepare_grads(grads, params, maximize=maximize, weight_decay=coupled_decay,
                      grad_scale=grad_scale, found_inf=found_inf)

    foreach_lerp_(exp_avgs, d, beta1_fractions)
    if isinstance(beta2_fractions[0], Tensor):  # 0-d tensor fractions: a d² temporary, a lerp
        foreach_lerp_(exp_avg_sqs, torch._foreach_mul(d, d), beta2_fractions)
    else:  # float fractions: in place, v ← (1 - w)·v + w·d², no temporary
        torch._foreach_mul_(exp_avg_sqs, [1.0 - w for w in beta2_fractions])
        torch._foreach_addcmul_(exp_avg_sqs, d, d, beta2_fractions)
    if isinstance(nu2, float) and nu2 == 1.0:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    else:
        denom = torch._foreach_mul(exp_avg_sqs, nu2)
        foreach_addcmul_(denom, d, d, 1.0 - nu2)
        torch._foreach_sqrt_(denom)
    # recorded by autograd (differentiable=True), the square root's result is saved for the
    # backward pass: the additions then make a new list instead of writing to it
    recording = torch.is_grad_enabled()
    if eps != 0.0:
        if recording:
            denom = torch._foreach_add(denom, eps)
        else:
            torch._foreach_add_(denom, eps)
    if found_inf is not None:  # a skipped step must not compute 0/0 (eps = 0, no history)
        skip = found_inf.to(params[0].dtype)
        # alpha selects the Tensor overload: without it a 0-d tensor binds to the Scalar one,
        # which reads its value on the host (a sync; an error inside CUDA-graph capture)
        if recording:
            denom = torch._foreach_add(denom, skip, alpha=1.0)
        else:
            torch._foreach_add_(denom, skip, alpha=1.0)

    if maybe_nonzero(nu1):
        foreach_addcdiv_(params, exp_avgs, denom, -lr * nu1)
    if isinstance(nu1, Tensor) or nu1 != 1.0:
        foreach_addcdiv_(params, d, denom, -lr * (1.0 - nu1))


class QHAdam(QHOptimizer):
    r"""QHAdam, Ma & Yarats (ICLR 2019).

    With learning rate :math:`\alpha`, betas :math:`(\beta_1, \beta_2)`, immediate discounts
    :math:`(\nu_1, \nu_2)`, and bias-corrected moving averages :math:`\hat m` of the gradient
    :math:`d` (with :math:`\beta_1`) and :math:`\hat v` of :math:`d^2` (with :math:`\beta_2`):

    .. math::
        \theta_{t+1} \leftarrow \theta_t - \alpha\,
            \frac{(1 - \nu_1)\, d_t + \nu_1 \hat m_{t+1}}
                 {\sqrt{(1 - \nu_2)\, d_t^2 + \nu_2 \hat v_{t+1}} + \epsilon}

    ``nus=(1, 1)`` is Adam exactly (AdamW with decoupled decay); ``QHAdam.from_nadam`` gives
    NAdam approximately. Coupled weight decay adds :math:`\lambda\theta` to :math:`d`;
    decoupled decay (``decouple_weight_decay=True``, or :class:`QHAdamW`) first multiplies
    :math:`\theta` by :math:`1 - \alpha\lambda`, as :class:`torch.optim.AdamW` does.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate :math:`\alpha`, a finite number >= 0 (default 1e-3).
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1) (default (0.9, 0.999)).
        nus: :math:`(\nu_1, \nu_2)`, two finite numbers (default (1.0, 1.0)); values outside
            [0, 1] are accepted, as conversions produce them.
        weight_decay: :math:`\lambda` >= 0 (default 0).
        decouple_weight_decay: decoupled (AdamW-style) decay if True (default False).
        eps: added to the denominator, outside the square root, >= 0 (default 1e-8).
        foreach, maximize, capturable, differentiable, fused, low_precision, state_dtype,
            master_weights: see :class:`qhfast._base.QHOptimizer`.

    Same constructor and classmethod as ``qhoptim.pyt.QHAdam``; unlike it, ``p.grad`` is never
    modified. State per parameter, named as qhoptim names it so its checkpoints load unchanged:
    ``exp_avg`` and ``exp_avg_sq`` (the bias-corrected moments), ``beta1_weight`` and
    ``beta2_weight`` (their normalizers, 0-d tensors that count the steps: with constant betas
    :math:`w = (1 - \beta^t)/(1 - \beta)`); the moments are stored in ``state_dtype``. bf16/fp16
    parameters also have ``master_param`` or ``kahan_compensation`` as ``low_precision`` says.

    Example:
        >>> optimizer = QHAdam(model.parameters(), lr=3e-4, nus=(0.8, 1.0), betas=(0.99, 0.999))
        >>> optimizer.zero_grad()
        >>> loss_fn(model(input), target).backward()
        >>> optimizer.step()
    """

    _counter_keys = ("beta1_weight", "beta2_weight")
    _kernel = "qhadam"
    _buffer_keys = ("exp_avg", "exp_avg_sq")
    _nonnegative_buffer_keys = ("exp_avg_sq",)
    _tensor_hyperparameters = ("lr", "betas", "nus")
    _scheduled_hyperparameters = ("lr", "betas")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        nus: tuple[float, float] = (1.0, 1.0),
        weight_decay: float = 0.0,
        decouple_weight_decay: bool = False,
        eps: float = 1e-8,
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
        defaults = dict(
            lr=lr,
            betas=betas,
            nus=nus,
            weight_decay=weight_decay,
            decouple_weight_decay=decouple_weight_decay,
            eps=eps,
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
        check_nonnegative(group["eps"], "epsilon value", "eps")
        check_pair(group["betas"], "betas", "numbers in [0, 1)")
        for i, beta in enumerate(group["betas"]):
            check_number(beta, f"beta parameter at index {i}", f"betas[{i}]", "in [0, 1)",
                         lambda x: 0.0 <= x < 1.0)
        check_pair(group["nus"], "nus", "finite numbers")
        for i, nu in enumerate(group["nus"]):
            check_finite(nu, f"nu parameter at index {i}", f"nus[{i}]")
        check_nonnegative(group["weight_decay"], "weight_decay value", "weight_decay")
        self._check_step_flags(group)

    def _check_step_flags(self, group: dict[str, Any]) -> None:
        super()._check_step_flags(group)
        decouple = group["decouple_weight_decay"]
        if not (_is_bool(decouple) or (isinstance(decouple, int) and decouple in (0, 1))):
            raise TypeError(  # (0 and 1 as qhoptim, which took any truthy value, may have saved)
                f"Invalid decouple_weight_decay value: {decouple!r} (decouple_weight_decay must "
                "be True or False, or 1 or 0)")

    def _init_param_state(self, state: dict[str, Any], like: Tensor, group: dict[str, Any]) -> None:
        state["exp_avg"] = like
        state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)

    def _step_factors(self, group, states, hyper, amp: AmpArgs) -> dict[str, list]:
        beta1_fractions, beta2_fractions = qhadam_step_fractions(
            [s["beta1_weight"] for s in states],
            [s["beta2_weight"] for s in states],
            betas=hyper["betas"],
            capturable=self._device_path(group),
            found_inf=amp.found_inf,
        )
        return {"beta1_fractions": beta1_fractions, "beta2_fractions": beta2_fractions}

    def _kernel_hyperparameters(self, group: dict[str, Any]) -> tuple[dict[str, Any], int]:
        (beta1, beta2), (nu1, nu2) = group["betas"], group["nus"]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, nu1=nu1, nu2=nu2, eps=group["eps"],
                     weight_decay=group["weight_decay"])
        decay = 0 if group["weight_decay"] == 0.0 else 2 if group["decouple_weight_decay"] else 1
        return hyper, decay

    def _update(self, group, params, grads, states, hyper, factors, amp: AmpArgs) -> None:
        qhadam_apply(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            **factors,
            lr=hyper["lr"],
            nus=hyper["nus"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decouple_weight_decay=group["decouple_weight_decay"],
            maximize=group["maximize"],
            grad_scale=amp.grad_scale,
            found_inf=amp.found_inf,
        )

    @classmethod
    def from_nadam(cls, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999)) -> dict[str, Any]:
        """QHAdam hyperparameters approximating NAdam; see :func:`qhfast.convert.from_nadam`."""
        return convert.from_nadam(lr, betas)


class QHAdamW(QHAdam):
    r"""QHAdam with decoupled weight decay (Loshchilov & Hutter, 2019), as
    ``qhoptim.pyt.QHAdamW`` constructs it: :math:`\theta \leftarrow (1 - \alpha\lambda)\theta`
    before the QHAdam update, the decay multiplied by the learning rate as in
    :class:`torch.optim.AdamW`.

    Takes the arguments of :class:`QHAdam`, in the same order; ``decouple_weight_decay`` must
    stay True (use :class:`QHAdam` for coupled decay).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        nus: tuple[float, float] = (1.0, 1.0),
        weight_decay: float = 0.0,
        decouple_weight_decay: bool = True,
        eps: float = 1e-8,
        **kwargs: Any,
    ) -> None:
        if decouple_weight_decay is not True:
            raise ValueError(
                f"Invalid decouple_weight_decay value: {decouple_weight_decay!r} "
                "(QHAdamW always decouples weight decay; use QHAdam for coupled decay)"
            )
        super().__init__(params, lr, betas, nus, weight_decay, True, eps, **kwargs)

    def _check_step_flags(self, group: dict[str, Any]) -> None:
        super()._check_step_flags(group)
        if not group["decouple_weight_decay"]:  # (a group added or loaded, or set since)
            raise ValueError(
                f"Invalid decouple_weight_decay value: {group['decouple_weight_decay']!r} "
                "(QHAdamW always decouples weight decay; use QHAdam for coupled decay)")
