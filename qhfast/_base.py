"""Machinery shared by every qhfast optimizer.

An optimizer subclass supplies its hyperparameter checks (``_validate_group``), the state a
parameter starts with (``_init_param_state``), its update rule on lists of tensors
(``_update``) and, if it counts steps, the step-dependent factors (``_step_factors``).
Everything else lives here once:

* flags in the torch.optim style (``foreach``, ``fused``, ``maximize``, ``capturable``,
  ``differentiable``) and the precision options ``low_precision`` and ``state_dtype``;
* validation, done before anything is mutated, so a step that raises changes nothing;
* grouping of parameters by (device, dtype) for the foreach path, and the per-tensor loop;
* the orchestration of low-precision parameters and state (the machinery: ``_precision``);
* DTensor parameters (FSDP2): the update runs on local shards, state is sharded like them;
* ``state_dict`` loading that keeps fp32 state fp32 (torch's base class would cast it to the
  parameter's dtype) and never aliases the caller's tensors.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT, _default_to_fused_or_foreach, required

from . import _differentiable as differentiable
from . import _fused
from . import _precision as precision
from . import _quantize as quantize
from ._tensors import AmpArgs, DTensor, Partial, capturing, flat_format
from ._tensors import buckets as _buckets
from ._tensors import local as _local
from ._precision import compute_dtype

__all__ = ["QHOptimizer", "prepare_grads"]

#: a hyperparameter or factor: a Python float, or a 0-d tensor
Scalar = float | Tensor


# --------------------------------------------------------------------------------------------
# validation helpers: every message names the argument and its valid range


def _is_number(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1 and not value.is_complex()
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python number it holds, a numpy array as a tuple of them, and a
    tuple or list of numpy scalars as one of Python numbers (qhoptim and torch.optim take
    ``lr=np.float32(1e-3)`` or ``betas=np.array([0.9, 0.999])``; Python numbers keep float64
    arithmetic, and a checkpoint loadable with ``weights_only=True``); anything else as is."""
    if type(value).__module__ == "numpy":
        value = value.tolist()
        return tuple(value) if isinstance(value, list) else value
    if isinstance(value, (tuple, list)) and any(type(v).__module__ == "numpy" for v in value):
        return type(value)(_plain(v) for v in value)
    return value


#: hyperparameters the update takes as Python floats (the tensor ones: ``_tensor_hyperparameters``)
_FLOAT_HYPERPARAMETERS = ("eps", "weight_decay")


def _plain_group(group: dict[str, Any]) -> dict[str, Any]:
    """``group`` with its options and hyperparameters made :func:`_plain` (in place), and a
    1-element tensor given for a float hyperparameter read once, here: the step would read it
    on the host each time (a sync, and an error inside CUDA graph capture). One that requires
    grad (``differentiable=True``) stays a tensor."""
    for key, value in group.items():
        if key == "params":
            continue
        if (key in _FLOAT_HYPERPARAMETERS and isinstance(value, Tensor) and value.numel() == 1
                and not value.requires_grad and not value.is_complex()):
            value = value.item()
        group[key] = _plain(value)
    return group


def _unread(value: Any) -> Any:
    """A 1-element real tensor (alone or in a pair) as 0.0; anything else as it is."""
    if isinstance(value, (tuple, list)):
        return type(value)(_unread(v) for v in value)
    return 0.0 if isinstance(value, Tensor) and _is_number(value) else value


def _same_objects(last: list, values: list) -> bool:
    """Whether ``values`` are the objects in ``last`` (a list's: its elements)."""
    return len(last) == len(values) and all(
        a is b or (type(a) is list and type(b) is list and len(a) == len(b)
                   and all(map(operator.is_, a, b)))
        for a, b in zip(last, values))


def _as_float(value: Scalar) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def check_number(value: Any, label: str, name: str, valid: str, ok: Callable[[float], bool]):
    """Raise unless ``value`` is a real number (or 1-element tensor) with ``ok(value)``.

    ``label`` is torch's wording ("learning rate"), ``name`` the argument, ``valid`` its range.
    """
    if type(value) is float and math.isfinite(value) and ok(value):
        return  # (the usual case, checked at every step: quickly)
    if isinstance(value, Tensor) and value.numel() != 1:
        raise ValueError(
            f"Invalid {label}: a tensor {name} must have exactly one element, "
            f"got shape {tuple(value.shape)}"
        )
    if not _is_number(value):
        raise TypeError(
            f"Invalid {label}: {name} must be a float or a 1-element tensor, "
            f"got {type(value).__name__}"
        )
    number = _as_float(value)
    if not (math.isfinite(number) and ok(number)):
        raise ValueError(f"Invalid {label}: {number} ({name} must be {valid})")


def check_nonnegative(value: Any, label: str, name: str) -> None:
    check_number(value, label, name, "a finite number >= 0", lambda x: x >= 0.0)


def check_finite(value: Any, label: str, name: str) -> None:
    check_number(value, label, name, "a finite number", lambda x: True)


def check_pair(value: Any, name: str, valid: str) -> None:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"Invalid {name} value: {value!r} ({name} must be a pair of {valid})")


def _is_bool(value: Any) -> bool:
    """A bool, or numpy's (the constructor makes it one; one set between steps stays)."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy"
                                       and type(value).__name__ in ("bool", "bool_"))


def check_flag(value: Any, name: str, allow_none: bool = False) -> None:
    if not (_is_bool(value) or (allow_none and value is None)):
        choices = "True, False or None" if allow_none else "True or False"
        raise TypeError(f"Invalid {name} value: {value!r} ({name} must be {choices})")


def _check_flags(group: dict[str, Any]) -> None:
    """Raise unless the group's flags are booleans (``foreach`` and ``fused`` may be None),
    ``fused`` and ``foreach`` not both True."""
    check_flag(group["foreach"], "foreach", allow_none=True)
    check_flag(group["fused"], "fused", allow_none=True)
    if group["fused"] and group["foreach"]:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    for name in ("maximize", "capturable", "differentiable"):
        check_flag(group[name], name)


# --------------------------------------------------------------------------------------------
# foreach ops whose scalar is a float or a 0-d tensor
#
# The update rules are written once with these. A float scalar takes torch's Scalar overloads
# (the fast eager path); a 0-d tensor on the tensors' device (a tensor hyperparameter, a
# step-dependent factor of the capturable path, GradScaler's skip factor) takes tensor
# overloads, never read on the host.


def maybe_nonzero(value: Scalar) -> bool:
    """False only for a float that is exactly 0 (a tensor's value is not read)."""
    return isinstance(value, Tensor) or value != 0.0


def foreach_add_scaled_(xs: list[Tensor], ys: list[Tensor], scale: Scalar) -> None:
    """xs += scale·ys."""
    if isinstance(scale, Tensor):
        torch._foreach_add_(xs, torch._foreach_mul(ys, scale))
    else:
        torch._foreach_add_(xs, ys, alpha=scale)


def foreach_lerp_(xs: list[Tensor], ys: list[Tensor], weight: Scalar | Sequence[Scalar]) -> None:
    """xs += weight·(ys - xs); ``weight`` one scalar or one per tensor.

    Tensor weights take ``xs ← (1 - w)·xs + w·ys`` (``mul_`` + ``addcmul_``): torch has no
    single-tensor overload of ``_foreach_lerp_``, and dynamo's lerp polyfill rejects weight lists.
    """
    if isinstance(weight, Tensor):
        weight = [weight] * len(xs)
    if isinstance(weight, (list, tuple)) and isinstance(weight[0], Tensor):
        one_minus_weight = torch._foreach_neg(weight)
        torch._foreach_add_(one_minus_weight, 1.0)
        torch._foreach_mul_(xs, one_minus_weight)
        torch._foreach_addcmul_(xs, ys, list(weight))
    else:
        torch._foreach_lerp_(xs, ys, weight)


def foreach_addcmul_(xs: list[Tensor], a: list[Tensor], b: list[Tensor], scale: Scalar) -> None:
    """xs += scale·a·b."""
    if isinstance(scale, Tensor):
        torch._foreach_addcmul_(xs, a, torch._foreach_mul(b, scale))
    else:
        torch._foreach_addcmul_(xs, a, b, value=scale)


def foreach_addcdiv_(xs: list[Tensor], num: list[Tensor], den: list[Tensor], scale: Scalar) -> None:
    """xs += scale·num/den."""
    if isinstance(scale, Tensor):
        torch._foreach_addcdiv_(xs, torch._foreach_mul(num, scale), den)
    else:
        torch._foreach_addcdiv_(xs, num, den, value=scale)


# --------------------------------------------------------------------------------------------
# the working gradient


def prepare_grads(
    grads: list[Tensor],
    params: list[Tensor],
    *,
    maximize: bool,
    weight_decay: float,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> list[Tensor]:
    """Return the gradients the update uses, ``d = ±g/grad_scale + weight_decay·θ``, in
    ``params``' dtype.

    ``grad_scale`` (GradScaler's scale, a 0-d tensor) is divided out here, so fp16 gradients
    are unscaled in the compute dtype. With ``found_inf`` given (the caller multiplies every
    update by ``1 - found_inf``), a skipped step's gradients become 0 entirely: 0·inf is NaN,
    and so is 0 times the square of a finite gradient above about 1.8e19 (it overflows).
    The caller's gradients are never modified: a new list is made whenever anything changes.
    """
    dtype = params[0].dtype
    owned = any(g.dtype != dtype for g in grads)
    if owned:  # (all copies: the ops below then work in place on the whole list)
        grads = [g.to(dtype) if g.dtype != dtype else g.clone() for g in grads]
    sign = -1.0 if maximize else 1.0
    if grad_scale is not None:
        factor: Scalar = grad_scale.to(device=params[0].device, dtype=dtype).reciprocal() * sign
    else:
        factor = sign
    if found_inf is not None:  # times 0 on a skipped step (its infs become NaNs, zeroed below)
        factor = (1.0 - found_inf.to(device=params[0].device, dtype=dtype)) * factor
    if isinstance(factor, Tensor) or factor != 1.0:
        if owned:
            torch._foreach_mul_(grads, factor)
        else:
            grads = torch._foreach_mul(grads, factor)
            owned = True
    if found_inf is not None:  # (factor is a tensor then: grads are copies)
        for g in grads:
            torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
    if weight_decay != 0.0:
        if owned:
            torch._foreach_add_(grads, params, alpha=weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    return grads


# --------------------------------------------------------------------------------------------
# the base class


#: the devices ``fused=True`` has a step for: the C kernel (or the compiled group step) on the
#: CPU, qhfast's Triton kernel on CUDA (where triton is installed), the group's step compiled
#: by inductor elsewhere (Triton on XPU, Metal on MPS)
FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps")


class QHOptimizer(Optimizer):
    """Base of QHM and QHAdam: flags, validation, grouping, fp32 masters, state_dict handling.

    Keyword-only options shared by every qhfast optimizer:

    * ``foreach`` (bool or None): run the update with ``torch._foreach_*`` ops over all
      tensors of a (device, dtype) bucket at once. ``None`` picks torch's default: foreach when
      every parameter is on an accelerator, else a per-tensor loop (on the CPU torch's foreach
      kernels are a loop anyway, and one tensor at a time stays in cache); under
      ``torch.compile`` it picks foreach (inductor fuses either way, and one op per list traces
      and compiles faster). Both paths compute the same function.
    * ``maximize`` (bool): ascend instead of descend.
    * ``capturable`` (bool): keep step counters on the parameter's device and compute the
      step-dependent factors there, so the step makes no host-device sync and can be captured
      in a CUDA graph.
    * ``fused`` (bool or None): each param group's update in one pass over memory (reads and
      writes each element of params, gradients and state once per step): on the CPU the C
      kernel (``fused=None`` groups take it too), on CUDA the Triton kernel, elsewhere (and
      for what the kernels do not take) the group's eager step compiled by ``torch.compile``
      at its first step, again only if which parameters have gradients changes or a
      hyperparameter other than lr, momentum and betas changes. See ``qhfast._fused``. Step
      counters live on the parameters' device, as with ``capturable``. Not with
      ``foreach=True``; inside a ``torch.compile``d step it changes nothing (the step is
      compiled anyway).
    * ``differentiable`` (bool): the step runs with autograd recording (as torch.optim's
      ``differentiable=True``), so gradients flow through it to the parameters' values before
      it, their gradients, the state, and tensor hyperparameters that require grad (a learned
      lr, betas, nus): for meta-learning and learned optimizers. Parameters stepped this way
      must not be leaves that require grad (in-place updates of those are refused by
      autograd: step a clone). Tensor hyperparameters stay tensors and the step counters live
      on the parameters' device, in their dtype, as with ``capturable``; ``foreach=None``
      picks the per-tensor path, as torch does (``foreach=True`` works too). Not with
      ``fused=True`` (RuntimeError, as torch), bf16/fp16 parameters or ``state_dtype`` (their
      rounding, stochastic or to the nearest, is not differentiable; ValueError).
    * ``low_precision`` (str, default ``"master"``): where a bf16/fp16 parameter's exact fp32
      update result is kept between steps (the update always computes in fp32):

      - ``"master"``: an fp32 master copy (4 extra bytes per element), rounded to the parameter
        once per step;
      - ``"kahan"``: a compensation buffer in the parameter's dtype (2 bytes per element for
        bf16) holding what rounding the parameter lost (compensated summation);
      - ``"stochastic"``: nothing; the result is rounded to the parameter stochastically
        (unbiased), drawing from torch's default generator of the parameter's device;
      - ``"nearest"``: nothing; rounded to nearest, so an update below half an ulp is lost (a
        bf16 weight at 1.0 stops moving once an update is below about 2e-3).

      fp32 and fp64 parameters ignore it (they are their own master). See ``qhfast._precision``.
    * ``state_dtype`` (None, ``torch.bfloat16`` or ``"8bit"``): None stores the moments in the
      compute dtype (fp32 for bf16/fp16 parameters); ``torch.bfloat16`` stores them in bf16,
      also for fp32 parameters, written with stochastic rounding so they neither freeze nor
      drift; ``"8bit"`` stores those of tensors of two or more dimensions and 4096 elements or
      more as 8-bit codes with an fp32 scale per block of 256, also written with stochastic
      rounding (see ``qhfast._quantize``; a complex parameter's as codes of its real and
      imaginary parts; a DTensor parameter's sharded like it, which needs it sharded along
      dim 0 only, with rows of whole blocks). The arithmetic stays in the compute dtype.
    * ``master_weights`` (bool or None): qhfast 0.1.0's flag, kept working: True is
      ``low_precision="master"``, False is ``"nearest"``; a contradiction raises ValueError.

    Complex parameters (complex64, complex128) are optimized as torch.optim optimizes them: the
    update runs on ``torch.view_as_real`` views (real and imaginary parts as independent
    coordinates, so QHAdam's second moment is per part), and their moments are stored complex,
    shaped like the parameter (8-bit codes: shaped like its real view, a code per part).
    """

    #: per-parameter moments, stored in ``state_dtype``
    _buffer_keys: tuple[str, ...] = ()
    #: those that are never negative (a second moment): 8-bit state codes them on its own map
    _nonnegative_buffer_keys: tuple[str, ...] = ()
    #: per-parameter scalar state (step counts, normalizers): 0-d float64 tensors on the CPU,
    #: or 0-d tensors in the compute dtype on the parameter's device when capturable (or
    #: differentiable)
    _counter_keys: tuple[str, ...] = ()
    #: group entries that may be 0-d tensors (or pairs of them)
    _tensor_hyperparameters: tuple[str, ...] = ()
    #: those torch's schedulers change during training (lr, and momentum or betas[0] under
    #: OneCycleLR/CyclicLR): the fused step takes them as tensors, so a change does not
    #: recompile; the others it takes as constants (a change recompiles, a smaller graph)
    _scheduled_hyperparameters: tuple[str, ...] = ()
    #: the kernels' name for the update (``"qhadam"``, ``"qhm"``: the functions of
    #: qhfast/kernels/cpu_kernel.c and triton_kernel.py) with :meth:`_kernel_hyperparameters`
    #: what they take; None: no kernel
    _kernel: str | None = None
    #: torch.amp.GradScaler hands over ``grad_scale`` and ``found_inf`` instead of unscaling
    #: the gradients itself (which refuses fp16 gradients) and reading found_inf on the host
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        *,
        foreach: bool | None,
        maximize: bool,
        capturable: bool,
        differentiable: bool,
        fused: bool | None,
        low_precision: str = "master",
        state_dtype: torch.dtype | str | None = None,
        master_weights: bool | None = None,
    ) -> None:
        defaults = _plain_group(dict(
            defaults,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        ))
        _check_flags(defaults)
        defaults.update(
            low_precision=precision.resolve_low_precision(low_precision, master_weights),
            state_dtype=state_dtype,
        )
        if not any(isinstance(value, type(required)) for value in defaults.values()):
            self._check_group(defaults)  # else each group is checked with what it gives
        #: the (low_precision, state_dtype) each group's state was last made for, by the group's
        #: index (not id(group): dynamo before torch 2.13 cannot trace id() of a dict)
        self._precision_made: dict[int, tuple[str, torch.dtype | None]] = {}
        #: by id, each param with a master: where, at which version and in which dtype its
        #: last step left it
        #: (qhfast._precision.sync_masters; the param groups hold the params, so ids stay)
        self._stepped_params: dict[int, tuple] = {}
        #: by group index, the dtypes of the group's params when it last stepped
        self._param_dtypes: dict[int, list[torch.dtype]] = {}
        #: by id, each group and its values when a step last checked them
        self._checked_values: dict[int, tuple[dict[str, Any], list]] = {}
        super().__init__(params, defaults)

    # ---- what a subclass provides ------------------------------------------------------------

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError/TypeError if a hyperparameter of ``group`` is out of range."""
        raise NotImplementedError

    def _init_param_state(self, state: dict[str, Any], like: Tensor, group: dict[str, Any]) -> None:
        """Create the per-parameter state; ``like`` is a zero tensor in the compute dtype."""
        raise NotImplementedError

    def _step_factors(
        self, group: dict[str, Any], states: list[dict[str, Any]], hyper: dict[str, Any], amp: AmpArgs
    ) -> dict[str, list]:
        """Advance the step counters of a bucket's tensors, once per step for all of them, and
        return the step-dependent factors the update needs, one list entry per tensor (the
        per-tensor path hands each tensor its slice). None by default."""
        return {}

    def _kernel_hyperparameters(self, group: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """What the fused kernels take of ``group``: its hyperparameters by the kernels' names
        (floats or 0-d tensors) and the kind of weight decay (0 none, 1 added to the gradient,
        2 decoupled)."""
        raise NotImplementedError

    def _update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        hyper: dict[str, Any],
        factors: dict[str, list],
        amp: AmpArgs,
    ) -> None:
        """Apply the update rule to ``params`` (compute dtype) given the raw ``grads``.

        ``hyper`` holds the group's ``_tensor_hyperparameters``: floats on the float path; on the
        device path tensors stay 0-d tensors on the params' device (floats stay floats).
        ``factors`` is what ``_step_factors`` returned for these tensors.
        """
        raise NotImplementedError

    # ---- param groups ------------------------------------------------------------------------

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError/TypeError if an option or hyperparameter of ``group`` is invalid."""
        self._check_options(group)
        self._validate_group(group)

    def _check_options(self, group: dict[str, Any]) -> None:
        """Raise ValueError/TypeError/RuntimeError if ``group``'s flags and precision options
        are invalid, alone or together (what a step checks: it reads no hyperparameter)."""
        _check_flags(group)
        precision.check_precision_options(group)
        if group["differentiable"]:
            if group["fused"]:
                raise RuntimeError("`fused` does not support `differentiable`")
            if group["state_dtype"] is not None:
                raise ValueError(
                    f"Invalid state_dtype value: {group['state_dtype']!r} with "
                    "differentiable=True (state_dtype must be None: bf16 and 8-bit moments are "
                    "written with stochastic rounding, which autograd cannot differentiate)"
                )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = precision.upgrade_group(
            _plain_group({k: v for k, v in param_group.items() if k != "params"}))
        for key, value in self.defaults.items():
            merged.setdefault(key, value)
            if isinstance(merged[key], type(required)):  # neither constructor nor group gave it
                # (by type: a pickled or deep-copied optimizer holds a copy of the sentinel)
                raise ValueError("parameter group didn't specify a value of required "
                                 f"optimization parameter {key} ({type(self).__name__} takes "
                                 "it in the constructor or in every param group)")
        self._check_group(merged)
        precision.upgrade_group(_plain_group(param_group))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        in_backward = getattr(self, "_stepping_in_backward", None)
        try:
            for p in group["params"]:
                if p.requires_grad or p.is_floating_point() or p.is_complex():
                    self._check_param(p, group)  # (an integer one, frozen, never steps: as
                    # torch.optim, it is let be; one given a gradient raises at the step)
            if in_backward is not None:
                in_backward.check(group)
        except (TypeError, ValueError, RuntimeError):
            self.param_groups.pop()
            raise
        if in_backward is not None:  # qhfast.step_in_backward is active: hook these too
            in_backward.hook(group["params"])

    def _check_param(self, p: Tensor, group: dict[str, Any]) -> None:
        """Raise TypeError/ValueError unless ``group``'s options can update ``p``."""
        if p.dtype not in PARAM_DTYPES:
            raise TypeError(
                f"{type(self).__name__} only optimizes floating-point tensors of dtype "
                "float16, bfloat16, float32 or float64 (or complex64/complex128), got a "
                f"parameter of dtype {p.dtype}"
            )
        if group["differentiable"] and p.dtype in precision.LOW_PRECISION_DTYPES:
            raise ValueError(
                f"{type(self).__name__} with differentiable=True needs float32, float64 or "
                f"complex parameters, got a parameter of dtype {p.dtype} (its update is rounded "
                "to it, as low_precision says, which autograd cannot differentiate)"
            )
        if group["fused"] and p.device.type not in FUSED_DEVICES:
            raise RuntimeError(
                f"{type(self).__name__} with fused=True needs parameters on a device it has a "
                f"fused step for ({', '.join(FUSED_DEVICES)}), got a parameter on "
                f"{p.device.type}; use fused=None (the default) or foreach"
            )
        self._check_sharding(p, group)
        if p.is_complex() and group["state_dtype"] is not None and not isinstance(
                group["state_dtype"], str):
            raise ValueError(
                f"Invalid state_dtype value: {group['state_dtype']} for a {p.dtype} parameter "
                "(state_dtype must be None or \"8bit\": torch has no complex bf16)"
            )

    def _check_sharding(self, p: Tensor, group: dict[str, Any]) -> None:
        """Raise ValueError where ``group``'s 8-bit moments of DTensor ``p`` could not be
        sharded like it (:func:`qhfast._quantize.sharding_problem`)."""
        problem = quantize.sharding_problem(p) if isinstance(group["state_dtype"], str) else None
        if problem:
            raise ValueError(
                f"Invalid state_dtype value: {group['state_dtype']!r} for a DTensor parameter "
                f"of shape {tuple(p.shape)}: {problem}. Put it in a param group of its own with "
                "state_dtype=None or torch.bfloat16"
            )

    def _check_changed_options(self) -> None:
        """Raise before anything changes where a group's flags are not booleans (set in
        ``param_groups`` after construction: ``maximize="False"`` would ascend), or where its
        precision options changed since its state was made (or it has not stepped) and are not
        valid (a typo would otherwise drop the fp32 masters) or do not suit one of its
        parameters (each is checked per dtype and device when it steps; whether 8-bit moments
        shard depends on each one's shape and layout)."""
        for index, group in enumerate(self.param_groups):
            self._check_group_at_a_step(group)
            if self._precision_made.get(index) != _precision_options(group):
                self._check_options(group)
                self._check_group_sharding(group)

    def _check_group_at_a_step(self, group: dict[str, Any]) -> None:
        """Raise where ``group``'s flags or hyperparameters, as set in ``param_groups`` between
        steps, are not valid (``lr="0.1"`` raised half-way through the step, after other groups
        had stepped; ``betas=(1.5, 0.999)`` was used): checked whenever one of its values is not
        the object last checked (a few identity comparisons otherwise). A 1-element tensor of
        ``_tensor_hyperparameters`` is checked for its type and shape only, its value where it
        is given (constructor, ``add_param_group``, ``load_state_dict``): reading it would be a
        host read (a sync, and an error inside CUDA graph capture). In a step being compiled,
        the flags only: dynamo traces no ``math.isfinite`` of a float it made symbolic."""
        if torch.compiler.is_compiling():
            self._check_step_flags(group)
            return
        values = [value for key, value in group.items() if key != "params"]
        last = self._checked_values.get(id(group))
        if last is not None and last[0] is group and _same_objects(last[1], values):
            return
        checked = dict(group)
        for key in self._tensor_hyperparameters:
            checked[key] = _unread(_plain(group[key]))
        for key in _FLOAT_HYPERPARAMETERS:
            if key in group:
                checked[key] = _plain(group[key])
        self._validate_group(checked)
        # a list's elements are compared (it may change in place), not the list
        self._checked_values[id(group)] = (group, [list(v) if type(v) is list else v
                                                   for v in values])

    def _check_step_flags(self, group: dict[str, Any]) -> None:
        """Raise TypeError/ValueError where a switch of ``group`` set in ``param_groups``
        between steps is not one of its values (a string "False" is true): the flags, and a
        subclass's own (QHAdam's ``decouple_weight_decay``, QHM's ``weight_decay_type``).
        Checked at every step: a few comparisons a group."""
        _check_flags(group)

    def _check_group_sharding(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            self._check_sharding(p, group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            precision.upgrade_group(group)
            group.setdefault("low_precision", "master")
            group.setdefault("state_dtype", None)
        self._precision_made = {}
        self._stepped_params = {}
        self._param_dtypes = {}
        self._checked_values = {}

    @property
    def _opt_called(self) -> bool:
        """Whether a step has run, as torch's LR schedulers ask before warning that their
        ``step()`` came first. Their wrapper of ``optimizer.step`` sets it, but a step compiled
        before the scheduler was made (the README's pattern) runs without the wrapper, and
        dynamo drops attribute writes on an optimizer: state made by a step shows it ran."""
        return self.__dict__.get("_opt_called_flag", False) or any(
            len(s) for s in self.state.values())

    @_opt_called.setter
    def _opt_called(self, value: bool) -> None:
        self.__dict__["_opt_called_flag"] = bool(value)

    # ---- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
        """
        in_backward = getattr(self, "_stepping_in_backward", None)
        if in_backward is not None:
            raise RuntimeError(in_backward.step_error(self))
        self._accelerator_graph_capture_health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Check every group before touching any tensor: a step that raises changes nothing.
        checked = [self._params_with_grads(group, index)
                   for index, group in enumerate(self.param_groups)]
        with_grads = [params for params, _ in checked]
        sparse_grads = [sparse for _, sparse in checked]
        self._check_changed_options()
        # Set by torch.amp.GradScaler.step (see _step_supports_amp_scaling).
        grad_scale = _amp_scalar(getattr(self, "grad_scale", None), "grad_scale")
        found_inf = _amp_scalar(getattr(self, "found_inf", None), "found_inf")
        sync_free = not any(sparse_grads) and all(
            self._device_path(group) for group, params in zip(self.param_groups, with_grads) if params
        )
        if found_inf is not None and not sync_free:
            # CPU step counters cannot be advanced conditionally on a device value: read it.
            if found_inf.item() != 0.0:
                return loss
            found_inf = None
        for index, (group, params, sparse) in enumerate(
                zip(self.param_groups, with_grads, sparse_grads)):
            if sparse:
                self._step_sparse(index, group, sparse, AmpArgs(grad_scale, found_inf))
            if not params:
                continue
            if group["differentiable"]:  # autograd records the step, see qhfast._differentiable
                with differentiable.recording():
                    self._step_params(index, group, params, AmpArgs(grad_scale, found_inf))
            else:
                self._step_params(index, group, params, AmpArgs(grad_scale, found_inf))
        return loss

    def _step_params(self, index: int, group: dict[str, Any], params: list[Tensor],
                     amp: AmpArgs) -> None:
        """Step ``params`` of ``group`` (``param_groups[index]``, checked by
        ``_params_with_grads``): make what state is missing, then update them, with the fused
        kernel or the group's compiled step where they serve. ``step()`` calls it once per
        group; :func:`qhfast.step_in_backward` once per parameter."""
        states = self._states_for_step(index, group, params)
        if group["differentiable"]:  # what earlier steps saved for backward stays unchanged
            differentiable.fresh_buffers(states, self._buffer_keys)
        # masters follow writes to their params from outside (not seen by a traced or
        # captured step, which runs no Python)
        masters = group["low_precision"] == "master" and not (
            torch.compiler.is_compiling() or capturing())
        if masters:
            precision.sync_masters(params, states, self._stepped_params)
        buckets, left = _fused.kernel_buckets(self, index, group, params, states)
        if left:  # first: where it raises (a compile), nothing has changed
            if len(left) != len(params):  # a kernel steps the others
                states = [self.state[p] for p in left]
            if (group["fused"] and not torch.compiler.is_compiling()
                    and _fused.traceable_grads(left)):
                _fused.compiled_group_step(self, group, left, amp)
            else:
                self._step_group(group, left, amp)
            if masters:
                precision.mark_stepped(left, states, self._stepped_params)
        if buckets:
            copied = _fused.run_kernels(self, group, buckets, amp)
            if masters and copied:  # their copy-back is the step's write, not an outside one
                precision.mark_stepped(copied, [self.state[p] for p in copied],
                                       self._stepped_params)

    def _params_with_grads(self, group: dict[str, Any], index: int | None = None
                           ) -> tuple[list[Tensor], list[Tensor]]:
        """The params of ``group`` that have a gradient, dense and sparse, checked (and the
        group's options with them) before anything changes. Where a param's dtype changed
        since the group's last step (``index``: its place in ``param_groups``; None: not
        known), a model or a layer converted, every param's state is checked against its
        dtype: what does not fit is converted at the next step, before any group updates."""
        params, sparse = [], []
        checked = set()  # what _check_param says depends on the dtype and device (and the group)
        differentiable = group["differentiable"]
        dtypes = [p.dtype for p in group["params"]]
        if index is None or self._param_dtypes.get(index) != dtypes:
            for p in group["params"]:  # (with a gradient or not: its state is converted)
                state = self.state.get(p)
                if state and not precision.state_fits(state, p, group, self._buffer_keys):
                    # converted since its state was made: every group's state is converted
                    # at its next step, before it updates
                    self._precision_made.clear()
                    break
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                self._check_sparse(p, group)
                sparse.append(p)
                continue
            if not (type(grad) is Tensor and type(p) in _PLAIN_PARAM_TYPES):
                _check_distributed_grad(p, type(self).__name__)
            kind = (p.dtype, p.device.type)
            if kind not in checked:
                self._check_param(p, group)  # options may have changed since add_param_group
                checked.add(kind)
            if differentiable and p.is_leaf and p.requires_grad:
                raise RuntimeError(
                    f"{type(self).__name__} with differentiable=True updates its parameters in "
                    "place with autograd recording, which autograd refuses for a leaf tensor that "
                    "requires grad; step a non-leaf copy of it (e.g. p = p0.clone())"
                )
            params.append(p)
        if group["capturable"] and params:
            devices = {p.device for p in params}
            for name in self._tensor_hyperparameters:
                for value in _flatten(group[name]):
                    if isinstance(value, Tensor) and {value.device} != devices:
                        raise RuntimeError(
                            f"{type(self).__name__} with capturable=True needs tensor "
                            f"hyperparameters on the parameters' device: {name} is on "
                            f"{value.device}, the parameters on {', '.join(map(str, devices))}"
                        )
        if index is not None:
            self._param_dtypes[index] = dtypes
        return params, sparse

    def _check_sparse(self, p: Tensor, group: dict[str, Any]) -> None:
        """Raise RuntimeError unless ``group`` can step ``p`` from a sparse gradient (see
        :meth:`_sparse_update`): an fp32/fp64 parameter, its moments in fp32/fp64, on the
        per-tensor path."""
        name = type(self).__name__
        if self._sparse_update is None:
            raise RuntimeError(f"{name} does not support sparse gradients")
        problems = [f"{flag}=True" for flag in ("capturable", "differentiable", "fused")
                    if group[flag]]
        if group["state_dtype"] is not None:
            problems.append(f"state_dtype={group['state_dtype']!r}")
        if p.dtype not in (torch.float32, torch.float64) or isinstance(p, DTensor):
            problems.append(f"a {'DTensor ' if isinstance(p, DTensor) else ''}parameter of "
                            f"dtype {p.dtype}")
        if problems:
            raise RuntimeError(
                f"{name} takes sparse gradients (as torch.optim.SGD) for float32/float64 "
                "parameters with state_dtype=None, without capturable, differentiable or "
                f"fused=True; got {', '.join(problems)}")

    #: the update of params whose gradients are sparse (``group, params, states, amp``), one
    #: tensor at a time; None: sparse gradients are refused
    _sparse_update: Callable[..., None] | None = None

    def _step_sparse(self, index: int, group: dict[str, Any], params: list[Tensor],
                     amp: AmpArgs) -> None:
        """Step ``params`` of ``group``, whose gradients are sparse (checked by
        :meth:`_check_sparse`)."""
        self._sparse_update(group, params, self._states_for_step(index, group, params), amp)

    def _states_for_step(self, index: int, group: dict[str, Any],
                         params: list[Tensor]) -> list[dict[str, Any]]:
        """The states of ``params`` (of ``group``, ``param_groups[index]``) as a step needs
        them: the group's state converted first where its options changed or a param was
        converted (a step's conversion: masters take outside writes first), and what is
        missing made."""
        if self._precision_made.get(index) != _precision_options(group):
            self._reconcile_precision(index, group, sync_masters=True)
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if len(state) == 0:
                self._init_state(p, group)
        return states

    def _step_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        amp: AmpArgs,
        hyperparameters: dict[str, Any] | None = None,
    ) -> None:
        """Update ``params`` (those of ``group`` with a gradient, their state made).
        ``hyperparameters`` replaces the group's tensor hyperparameters if given."""
        hyperparameters = group if hyperparameters is None else hyperparameters
        foreach = group["foreach"]
        if foreach is None:  # under torch.compile, one traced op per list compiles faster
            foreach = torch.compiler.is_compiling() or _default_to_fused_or_foreach(
                [_local(p) for p in params], differentiable=group["differentiable"]
            )[1]
        device_path = self._device_path(group)
        for bucket in _buckets(params).values():
            device, dtype = bucket[0].device, compute_dtype(bucket[0])
            hyper = {
                name: _as_scalar(hyperparameters[name], device, dtype, device_path)
                for name in self._tensor_hyperparameters
            }
            states = [self.state[p] for p in bucket]
            if isinstance(bucket[0], DTensor):
                states = [{k: _local(v) for k, v in s.items()} for s in states]
            factors = self._step_factors(group, states, hyper, amp)
            spans = [(0, len(bucket))] if foreach else _cache_sized_spans(bucket)
            for start, stop in spans:
                part = {name: values[start:stop] for name, values in factors.items()}
                self._step_chunk(group, bucket[start:stop], states[start:stop], hyper, part, amp)

    def _step_chunk(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        states: list[dict[str, Any]],
        hyper: dict[str, Any],
        factors: dict[str, list],
        amp: AmpArgs,
    ) -> None:
        """Update tensors of one device and dtype, on local shards for DTensors, in the compute
        dtype: low-precision parameters and moments are read and written back as the group's
        ``low_precision`` and ``state_dtype`` say (see ``qhfast._precision``)."""
        grads = [_local(p.grad) for p in params]
        params = [_local(p) for p in params]
        if params[0].is_complex():
            params, grads, states = _view_as_real(params, grads, states, self._buffer_keys)
        mode = group["low_precision"]
        work_params = precision.working_params(params, states, mode)
        keys, nonnegative = self._buffer_keys, self._nonnegative_buffer_keys
        eight_bit = isinstance(group["state_dtype"], str)  # its chunks mix codes and fp32
        work_states = precision.working_buffers(states, keys, work_params[0].dtype, nonnegative,
                                                eight_bit)
        self._update(group, work_params, grads, work_states, hyper, factors, amp)
        precision.store_buffers(states, work_states, keys, nonnegative, amp.found_inf, eight_bit)
        precision.store_params(params, states, work_params, mode, amp.found_inf)

    @staticmethod
    def _device_path(group: dict[str, Any]) -> bool:
        """Whether the step-dependent factors are computed as tensors where the counters live
        (no host read): counters on the device, or a step being compiled."""
        return _counters_on_device(group) or torch.compiler.is_compiling()

    def _state_changed(self) -> None:
        """qhfast made or replaced state tensors: the fused CPU kernel's plans (qhfast._fused)
        are made again at the next step, every tensor checked."""
        if not torch.compiler.is_compiling():  # a traced step does not run the kernel
            _fused.drop_kernel_plans(self)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        self._state_changed()
        state = self.state[p]
        precision.init_precision_state(state, p, group["low_precision"])
        for key in self._counter_keys:
            state[key] = self._new_counter(p, group)
        dtype = precision.buffer_dtype(p, group)
        # 8-bit codes of a complex parameter: one per part of its real view
        shaped_like = torch.view_as_real(p) if dtype == torch.uint8 and p.is_complex() else p
        # (8-bit codes in the elements' order, as their blocks: contiguous)
        like = torch.zeros_like(shaped_like, dtype=dtype, memory_format=(
            torch.contiguous_format if dtype == torch.uint8 else torch.preserve_format))
        self._init_param_state(state, like, group)
        for key in self._buffer_keys:
            if state[key].dtype == torch.uint8:  # 8-bit codes: their block scales
                state[key + quantize.SCALE_SUFFIX] = quantize.new_scales(state[key])

    def _reconcile_precision(self, index: int, group: dict[str, Any],
                             sync_masters: bool = False) -> None:
        """Convert the state of ``group``'s (``param_groups[index]``) params to its
        ``low_precision`` and ``state_dtype`` (a loaded checkpoint, or options changed between
        steps); see
        :func:`qhfast._precision.reconcile_state`."""
        self._check_options(group)  # (step() checks every group first; not every caller:
        self._check_group_sharding(group)  # step_in_backward steps a param at a time)
        self._state_changed()
        if sync_masters and not (torch.compiler.is_compiling() or capturing()):
            # at a step (not a load: a loaded master is the checkpoint's), a master of a param
            # this optimizer stepped first takes what was written to the param from outside
            # since, as a "master" step would: its value is what the conversion keeps (a
            # switch to "kahan" would otherwise undo the write through the compensation)
            with_masters = [p for p in group["params"] if id(p) in self._stepped_params
                            and precision.MASTER_KEY in self.state.get(p, ())]
            precision.sync_masters(with_masters, [self.state[p] for p in with_masters],
                                   self._stepped_params)
        for p in group["params"]:
            state = self.state.get(p)
            if state:
                precision.reconcile_state(state, p, group["low_precision"],
                                          precision.buffer_dtype(p, group), self._buffer_keys,
                                          self._nonnegative_buffer_keys)
                dtype, device = _counter_kind(p, group)  # (a param converted to fp64)
                for key in self._counter_keys:
                    if isinstance(state.get(key), Tensor):
                        state[key] = state[key].to(dtype=dtype, device=device)
        self._precision_made[index] = _precision_options(group)

    def _new_counter(self, p: Tensor, group: dict[str, Any], value: float = 0.0) -> Tensor:
        """A 0-d counter: float64 on the CPU (the arithmetic of Python floats, read without a
        device sync), or in the compute dtype on ``p``'s device when capturable or
        differentiable, or fused on an accelerator (its kernel reads the counters there). On a
        device it is filled there (``torch.tensor(value, device=...)`` copies from host memory,
        a sync); on the CPU made by ``torch.tensor``, whose value a FakeTensorMode knows (a
        memory estimate's step reads CPU counters, as every CPU step does)."""
        dtype, device = _counter_kind(p, group)
        if device.type == "cpu":
            return torch.tensor(value, dtype=dtype)
        return torch.full((), value, dtype=dtype, device=device)

    # ---- state_dict --------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by this optimizer, by torch.optim's conventions, or by qhoptim.

        Unlike torch's base class, fp32 state of bf16/fp16 parameters (masters, moments) stays
        fp32, and the loaded state never shares storage with ``state_dict``'s tensors; the
        moments of a contiguous parameter are contiguous, 8-bit scales fp32, whatever the
        checkpoint's were. The dict passed in is not modified. The groups as
        they will be, and every saved state entry, are checked first, as the constructor
        checks; a load that raises changes nothing. Load pre-hooks see the dict first, and
        what they return is what is loaded; post-hooks run once the state is in place.

        The hyperparameters come from the checkpoint, as in torch.optim (one it lacks: this
        optimizer's default), but each group keeps this optimizer's ``low_precision`` and
        ``state_dtype``: the loaded state is converted to them (master to kahan:
        ``c = master - param``; kahan to master: ``master = param + c``; moments cast to
        ``state_dtype``), see :func:`qhfast._precision.reconcile_state`.
        """
        pre_hooks = self._optimizer_load_state_dict_pre_hooks
        post_hooks = self._optimizer_load_state_dict_post_hooks
        state_dict = state_dict.copy()
        for hook in pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = [_plain_group(dict(group)) for group in state_dict["param_groups"]]
        state_dict["param_groups"] = saved_groups
        for group, saved_group in zip(self.param_groups, saved_groups):
            saved_group = precision.upgrade_group(dict(saved_group))
            # the saved options must be valid ones, though the group keeps its own
            precision.check_precision_options({**self.defaults, **saved_group})
            loaded = {**saved_group, "low_precision": group["low_precision"],
                      "state_dtype": group["state_dtype"]}
            for key, value in self.defaults.items():
                if key not in loaded and isinstance(value, type(required)):
                    raise ValueError(f"{type(self).__name__}.load_state_dict: a param group "
                                     f"of the checkpoint has no {key!r}, which has no default")
            self._check_group({**self.defaults, **loaded})
            in_backward = getattr(self, "_stepping_in_backward", None)
            if in_backward is not None:  # (as add_param_group checks a group added then)
                in_backward.check({**self.defaults, **loaded})
        saved_ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        coded = {i for g in saved_groups if g.get("state_dtype") == "8bit" for i in g["params"]}
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            self._check_saved_state(saved_id, p, saved, saved_id in coded)
            if isinstance(p, DTensor) and any(
                isinstance(v, Tensor) and v.dim() > 0 and not isinstance(v, DTensor)
                for v in saved.values()
            ):
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict got full tensors for sharded (DTensor) "
                    "parameters; load a full state dict with "
                    "torch.distributed.checkpoint.state_dict.set_optimizer_state_dict"
                )
        before = (self.state, self.param_groups, dict(self._precision_made))
        options = [_precision_options(group) for group in self.param_groups]
        # torch's base class runs no hooks here: the pre-hooks ran above, the post-hooks run
        # below, once qhfast's own state is in place
        self._optimizer_load_state_dict_pre_hooks = type(pre_hooks)()
        self._optimizer_load_state_dict_post_hooks = type(post_hooks)()
        try:
            super().load_state_dict(state_dict)
            self._restore_state(state_dict, saved_ids, params, options)
        except BaseException:
            self.state, self.param_groups, self._precision_made = before
            self._state_changed()
            raise
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        for hook in post_hooks.values():
            hook(self)

    def _restore_state(self, state_dict: dict[str, Any], saved_ids: list[Any],
                       params: list[Tensor], options: list[tuple]) -> None:
        """After torch's base class loaded ``state_dict`` (checked): the groups' precision
        ``options`` from before and any default the checkpoint lacks, the state from the saved
        entries (not the base class's copies cast to the params' dtypes), converted to the
        options."""
        for group, (mode, dtype) in zip(self.param_groups, options):
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group["low_precision"], group["state_dtype"] = mode, dtype
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            group = group_of[id(p)]
            self.state[p] = {k: self._restore_value(p, k, v, group) for k, v in saved.items()}
        for index, group in enumerate(self.param_groups):
            self._reconcile_precision(index, group)

    def _check_saved_state(self, saved_id: Any, p: Tensor, saved: dict[str, Any],
                           coded: bool = False) -> None:
        """Raise ValueError unless ``saved`` (a parameter's entry of a checkpoint) is state this
        optimizer can step from: empty, or every counter a number and every moment a tensor,
        complex where ``p`` is (8-bit codes: uint8), shaped like ``p`` (codes: like its real
        view if complex) and codes with a scale per block. A checkpoint of another model or
        optimizer would otherwise broadcast or fail deep inside a step. ``coded``: the
        checkpoint's group keeps 8-bit moments, so ``p``'s moments (if it has 8-bit ones)
        must be codes with scales: torch.distributed.checkpoint loads into the tensors this
        optimizer has, and into fp32 or bf16 moments it casts the codes to their numbers."""
        def refuse(key: str, problem: str) -> None:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: {key!r} of parameter {saved_id} "
                f"{problem}; is the checkpoint this model's, and this optimizer's?")

        if not saved:
            return
        for key in (*self._counter_keys, *self._buffer_keys):
            if key not in saved:
                refuse(key, f"is missing (the entry has {sorted(map(str, saved))})")
        for key in self._counter_keys:
            if not _is_number(saved[key]):
                refuse(key, f"is {saved[key]!r}, not a number (a step counter)")
        for key in (*self._buffer_keys, precision.MASTER_KEY, precision.COMPENSATION_KEY,
                    *(k + quantize.SCALE_SUFFIX for k in self._buffer_keys)):
            value = saved.get(key)
            if key in saved and not (isinstance(value, Tensor) and (
                    value.is_floating_point() or value.is_complex()
                    or (value.dtype == torch.uint8 and key in self._buffer_keys))):
                found = value.dtype if isinstance(value, Tensor) else type(value).__name__
                refuse(key, f"is {found}, not a floating-point tensor")
        for key in self._buffer_keys:
            value = saved[key]
            codes = value.dtype == torch.uint8
            if coded and not codes and quantize.quantizes(p) and (
                    key + quantize.SCALE_SUFFIX not in saved):
                refuse(key, f"is {value.dtype} without scales where the checkpoint's group keeps "
                            "8-bit codes (state_dtype='8bit'): torch.distributed.checkpoint "
                            "loads into this optimizer's moments and casts codes to numbers "
                            "there. Load it with state_dtype=\"8bit\", then set the group's "
                            "state_dtype (the next step converts)")
            shape = quantize.codes_shape(p) if codes else tuple(p.shape)
            scales = saved.get(key + quantize.SCALE_SUFFIX)
            if not codes and value.is_complex() != p.is_complex():
                refuse(key, f"is {value.dtype} for a {p.dtype} parameter")
            elif tuple(value.shape) != shape:
                refuse(key, f"is shaped {tuple(value.shape)}, the parameter's needs {shape}")
            elif codes and (scales is None or scales.numel() != quantize.blocks(value.numel())):
                found = "none" if scales is None else scales.numel()
                refuse(key, f"holds 8-bit codes with {found} scales in "
                            f"{key + quantize.SCALE_SUFFIX!r}, not "
                            f"{quantize.blocks(value.numel())} (one per block)")
            elif codes and isinstance(p, DTensor) and (
                    tuple(scales.shape) != quantize.scale_shape(shape)):
                # flat scales (qhfast before 2026-12) split as the rows are not: load them
                # into one process, where they are reshaped, and save again
                refuse(key, f"holds scales shaped {tuple(scales.shape)}, which a sharded "
                            f"parameter needs shaped {quantize.scale_shape(shape)} (flat scales "
                            "of an earlier qhfast load into a single-process optimizer)")

    def _restore_value(self, p: Tensor, key: str, value: Any, group: dict[str, Any]) -> Any:
        """A saved state entry on ``p``'s device, its own copy; dtypes are then set by
        :meth:`_reconcile_precision` (torch's base class would cast them to ``p``'s). Scales
        are fp32 (the kernels read no other), and tensors shaped like ``p`` are laid out as it
        is where the kernels read them so (contiguous, or channels_last but for 8-bit codes),
        whatever the saving model's layout was."""
        if key in self._counter_keys:
            return self._new_counter(p, group, _as_float(value))
        if not isinstance(value, Tensor):
            return value
        if key.endswith(quantize.SCALE_SUFFIX):
            return value.to(device=p.device, dtype=torch.float32, copy=True)
        value = value.to(device=p.device, copy=True)
        if isinstance(p, DTensor) or isinstance(value, DTensor):
            return value
        like = torch.view_as_real(p) if value.dtype == torch.uint8 and p.is_complex() else p
        layout = flat_format(like)
        if value.shape != like.shape or layout is None or (
                value.dtype == torch.uint8 and layout is not torch.contiguous_format):
            return value
        return value.contiguous(memory_format=layout)


def _counter_kind(p: Tensor, group: dict[str, Any]) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of ``p``'s step counters under ``group``
    (:meth:`QHOptimizer._new_counter`)."""
    if (group["capturable"] or group["differentiable"]
            or (group["fused"] and p.device.type != "cpu")):
        return compute_dtype(p), p.device
    return torch.float64, torch.device("cpu")


def _precision_options(group: dict[str, Any]) -> tuple[str, torch.dtype | None]:
    return group["low_precision"], group["state_dtype"]


def _counters_on_device(group: dict[str, Any]) -> bool:
    """Whether the group's step counters live on the parameters' device (read by no host);
    differentiable steps compute their factors there too, as tensors autograd can follow."""
    return bool(group["capturable"] or group["fused"] or group["differentiable"])


def _amp_scalar(value: Tensor | None, name: str) -> Tensor | None:
    """GradScaler's ``grad_scale`` or ``found_inf`` as a 0-d tensor: a 1-element one of any
    shape (GradScaler's own are ``(1,)``, as torch's fused optimizers accept) is viewed as 0-d,
    with no copy and no host read; anything else raises ``ValueError`` before the step."""
    if value is None:
        return None
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"optimizer.{name} must be a tensor of one element (GradScaler's "
                         f"scale or found_inf), got {shape}")
    return value.reshape(())


def _flatten(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _as_scalar(value: Any, device: torch.device, dtype: torch.dtype, device_path: bool) -> Any:
    """A hyperparameter as the update takes it: floats stay floats; a tensor becomes a float on
    the float path (a host read, free for a CPU tensor) or a 0-d tensor on the params' device in
    their compute dtype on the device path. Pairs are converted element-wise."""
    value = _plain(value)  # (a numpy array set in param_groups between steps)
    if isinstance(value, (tuple, list)):
        return tuple(_as_scalar(v, device, dtype, device_path) for v in value)
    if not isinstance(value, Tensor):
        return value if isinstance(value, float) else float(value)  # (an int, a numpy number)
    if device_path:
        return value.reshape(()).to(device=device, dtype=dtype)
    return float(value.item())


#: the types of a param that is certainly not a DTensor (a fast path of the per-step checks)
_PLAIN_PARAM_TYPES = frozenset({Tensor, torch.nn.Parameter})


def _check_distributed_grad(p: Tensor, name: str) -> None:
    """A DTensor param needs a DTensor grad laid out like it, else local shards do not line up."""
    if isinstance(p, DTensor) != isinstance(p.grad, DTensor):
        raise RuntimeError(
            f"{name} got a {type(p).__name__} parameter with a {type(p.grad).__name__} gradient; "
            "a DTensor parameter needs a DTensor gradient and a plain one a plain one"
        )
    if not isinstance(p, DTensor):
        return
    grad = p.grad
    if any(isinstance(placement, Partial) for placement in grad.placements):
        raise RuntimeError(f"{name}: a Partial (not yet reduced) gradient cannot be applied")
    if grad.device_mesh != p.device_mesh or grad.placements != p.placements:
        raise RuntimeError(
            f"{name}: a gradient laid out as {grad.placements} on {grad.device_mesh} does not "
            f"match its parameter's {p.placements} on {p.device_mesh}"
        )


#: the complex dtypes qhfast optimizes (as real pairs; torch has no complex bf16)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)
#: the dtypes qhfast optimizes (not float8: torch has no arithmetic for it)
PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, *COMPLEX_DTYPES)


def _view_as_real(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], keys: Sequence[str]
) -> tuple[list[Tensor], list[Tensor], list[dict[str, Any]]]:
    """A chunk of complex tensors as ``torch.view_as_real`` views (a trailing dimension of 2:
    the real and imaginary parts), as torch.optim updates complex parameters: every rule is
    elementwise, so it runs on the parts unchanged and writes through the views. The moments
    (``keys``) are viewed in copies of the state dicts (8-bit codes are stored as the parts'
    already); counters stay as they are. A lazily conjugated gradient (autograd gives one
    where the forward used ``z.conj()``) is resolved into a copy first."""
    return (
        [torch.view_as_real(p) for p in params],
        [torch.view_as_real(g.resolve_conj()) for g in grads],
        [{**s, **{k: torch.view_as_real(s[k]) for k in keys if s[k].is_complex()}}
         for s in states],
    )


#: the per-tensor path's unit of work, in elements: a tensor this large or larger is updated
#: alone; smaller neighbours are updated together up to this size (their parameters, gradients
#: and state then still fit in a core's L2 cache), one list op per op instead of one per tensor
CACHE_SIZED_CHUNK = 1 << 15


def _cache_sized_spans(params: Sequence[Tensor]) -> list[tuple[int, int]]:
    """Split ``params`` into runs [start, stop) of consecutive tensors of at most
    ``CACHE_SIZED_CHUNK`` elements in all (a larger tensor is a run of its own)."""
    spans = []
    start, size = 0, 0
    for i, p in enumerate(params):
        numel = _local(p).numel()
        if i > start and size + numel > CACHE_SIZED_CHUNK:
            spans.append((start, i))
            start, size = i, 0
        size += numel
    spans.append((start, len(params)))
    return spans
