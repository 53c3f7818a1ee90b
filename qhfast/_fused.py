"""``fused=True``: each param group's update in one pass over memory, and the choice of path.

Three implementations, picked for each bucket of a param group (its params of one device,
dtype and moments' format) at its step (:func:`kernel_buckets`, then
:func:`compiled_group_step` or the eager step for what no kernel takes):

* **the Triton kernel** (``kernels/triton.py``): ``fused=True`` groups on CUDA, in every
  precision mode, with ``capturable`` or not: one launch per bucket over a chunk table of its
  tensors, everything (hyperparameters, GradScaler's scale and found_inf, the random seeds)
  read from device memory, so the step makes no host read. With ``QHFAST_TRITON_ON_CPU=1`` and
  ``TRITON_INTERPRET=1`` in the environment it serves ``fused=True`` CPU groups too, run by
  Triton's interpreter: how the suite checks it without a GPU.
* **the C kernel** (``kernels/cpu_kernel.c``, built and loaded by ``kernels/cpu.py``): CPU
  groups with ``fused=True`` or the defaults (``fused=None, foreach=None``), not capturable
  (it reads found_inf and tensor hyperparameters on the host, free on the CPU): one C call per
  bucket over a chunk table, spread over OpenMP threads, compiled once per combination of
  dtypes and precision mode (about a second, cached on disk).
* **the compiled group step**: everything else with ``fused=True`` (other devices, the
  combinations the kernels lack, no Triton) runs the group's eager step through
  ``torch.compile``.

Both kernels take what a bucket's tensors are by role (:func:`_bucket_tensors` checks them: the
kernels trust what they are given) and keep it in a plan between steps while the params, their
storage and the state tensors stay the same; a step checks and points to the gradients only
(:class:`_GroupPlan`). Their random numbers (stochastic rounding) come from a hash of seeds
drawn each step from torch's default generator of the parameters' device: the same RNG state
gives the same run.
"""

from __future__ import annotations

import operator
import os
import types
import weakref
from typing import Any

import torch
from torch import Tensor

from . import _quantize as quantize
from . import _tensors
from ._precision import COMPENSATION_KEY, LOW_PRECISION_DTYPES, MASTER_KEY
from .kernels import cpu as _cpu
from .kernels import triton as _triton

__all__ = ["kernel_buckets", "run_kernels", "compiled_group_step", "FUSED_INDUCTOR_OPTIONS",
           "CPU_KERNEL", "TRITON_ON_CPU"]

#: whether CPU groups use the C kernel (False: the compiled group step everywhere);
#: ``QHFAST_CPU_KERNEL=0`` in the environment turns it off
CPU_KERNEL = os.environ.get("QHFAST_CPU_KERNEL", "1") != "0"
#: the environment variable that sends ``fused=True`` CPU groups to the Triton kernel, run by
#: Triton's interpreter (only with ``TRITON_INTERPRET=1``): read at each step
TRITON_ON_CPU = "QHFAST_TRITON_ON_CPU"


def kernel_buckets(optimizer: Any, index: int, group: dict[str, Any], params: list[Tensor],
                   states: list[dict[str, Any]]) -> tuple[list["_BucketPlan"], list[Tensor]]:
    """Which of ``params`` (those of ``group``, ``param_groups[index]``, with a gradient; their
    state ``states``, made) a kernel steps: the bucket plans to run (:func:`run_kernels`), and
    the params left for another path. All are left where no kernel serves the group (a traced
    step, which is compiled anyway; a group that asked for another path; no compiler or no
    Triton); else those a kernel does not take (on another device, or tensors it does not
    read: each param's own case, so that one odd tensor does not send its group or its
    bucket to a slower path). The caller steps the left ones first: if that raises, nothing
    has changed."""
    if (torch.compiler.is_compiling() or group["differentiable"]
            or not _served_anywhere(group, params)):
        return [], params
    return _bucket_plans(optimizer, index, group, params, states)


def run_kernels(optimizer: Any, group: dict[str, Any], buckets: list["_BucketPlan"],
                amp: Any) -> list[Tensor]:
    """One step of each bucket plan of ``group`` (:func:`kernel_buckets`); returns the params
    written back from contiguous copies (:meth:`_BucketPlan.run`), which counts as an
    in-place write in their ``_version``."""
    hyper, decay = optimizer._kernel_hyperparameters(group)
    values, copied = None, []
    for bucket in buckets:
        if bucket.backend == "triton":
            bucket.run(hyper, decay=decay, maximize=group["maximize"],
                       grad_scale=amp.grad_scale, found_inf=amp.found_inf)
            continue
        if amp.found_inf is not None and float(amp.found_inf) != 0.0:
            continue  # a skipped step changes nothing (on the CPU the value is read for free)
        if values is None:
            values = {name: float(value) for name, value in hyper.items()}
            scale = None if amp.grad_scale is None else float(amp.grad_scale)
            threads = torch.get_num_threads()
        bucket.run(values, decay=decay, maximize=group["maximize"], grad_scale=scale,
                   threads=threads)
        if bucket.staged is not None:
            copied += bucket.params
    return copied


def _served_anywhere(group: dict[str, Any], params: list[Tensor]) -> bool:
    """Whether a kernel may serve some of ``params``: one of their devices has a backend
    (:func:`_backend`) under the group's options. (The scan past the first param, about 90
    ns a param, runs only where the group's flags let a kernel serve some device.)"""
    if _backend(group, params[0]) is not None:
        return True
    if not (group["fused"] or (group["fused"] is None and group["foreach"] is None)):
        return False  # foreach=True or fused=False: no kernel on any device
    first = params[0].device
    return any(p.device != first and _backend(group, p) is not None for p in params)


def compiled_group_step(optimizer: Any, group: dict[str, Any], params: list[Tensor],
                        amp: Any) -> None:
    """Step ``params`` with the group's step compiled by torch.compile (``fused=True`` where
    no kernel serves)."""
    _compiled_group_step(optimizer, group)(optimizer, group, params, amp)


def traceable_grads(params: list[Tensor]) -> bool:
    """Whether the compiled group step takes the params' gradients: each in its param's dtype
    (dynamo refuses another) and neither a lazy conjugate nor a lazy negation (the graph would
    read their memory as it is). Where not, the group steps eagerly."""
    return not any(p.grad.dtype is not p.dtype or _lazy(p.grad) for p in params)


def _backend(group: dict[str, Any], param: Tensor) -> str | None:
    """Which kernel serves the group: "triton", "cpu" or None."""
    device = _tensors.local(param).device.type
    if group["fused"] and _triton.available() and (
            device == "cuda" or (device == "cpu" and _triton_on_cpu())):
        return "triton"
    default = group["fused"] is None and group["foreach"] is None
    if device == "cpu" and CPU_KERNEL and not group["capturable"] and (group["fused"] or default):
        return "cpu"
    return None


def _triton_on_cpu() -> bool:
    return os.environ.get(TRITON_ON_CPU, "0") not in ("", "0") and _triton.interpreting()


# --------------------------------------------------------------------------------------------
# plans

#: the roles a staged bucket (:meth:`_BucketPlan.run`) copies in and out, besides the gradients
_STAGED_ROLES = ("params", "firsts", "seconds", "extras")


class _BucketPlan:
    """A bucket's kernel plan (a ``kernels.cpu.Plan`` or ``kernels.triton.Plan``) and the
    params it was made for, as given (DTensors or not). ``staged``: where the C kernel steps
    contiguous copies (:meth:`run`), the bucket's tensors of :data:`_STAGED_ROLES` as the
    kernel takes them."""

    def __init__(self, backend: str, kernel: Any, params: list[Tensor], local: bool,
                 staged: dict[str, list] | None = None) -> None:
        self.backend, self.kernel, self.params, self.local = backend, kernel, params, local
        self.staged = staged
        views = [_tensors.local(p) if local else p for p in params]
        self.numels = [_elements(p) for p in views]
        self.layouts = [_layout(p) for p in views]
        self.dtype = params[0].dtype  # a bucket's params share their dtype and device
        self.complex = self.dtype.is_complex

    def point_to_grads(self) -> bool:
        """Point the plan at the params' current gradients, or return False if one is not what
        the kernel reads: in the bucket's dtype (torch's ``grad_dtype`` lets a gradient's
        differ; its device is its param's, as torch's ``grad`` setter and autograd see to),
        laid out as its param (:func:`_layout`), of its param's size, not lazy (:func:`_lazy`).
        The plan was made with the params checked; a param given new storage, or another
        layout, makes a new plan. (Written out: this runs for every gradient at every step.)"""
        grads = [p.grad for p in self.params]
        if self.local:
            grads = [_tensors.local(g) for g in grads]
        dtype = self.dtype
        for g, n, layout in zip(grads, self.numels, self.layouts):
            if (g.dtype is not dtype or g.is_neg() or (self.complex and g.is_conj())
                    or _elements(g) != n
                    or not (g.is_contiguous() if layout is None else g.stride() == layout)):
                return False
        self.kernel.point_to_grads(grads)
        return True

    def run(self, *args: Any, **options: Any) -> None:
        """The bucket's kernel call (its plan's ``run``). A bucket of 8-bit moments with
        params that are not contiguous (channels_last conv weights) is staged: their codes'
        blocks follow the elements' order and the params' memory another, so the C kernel
        steps contiguous copies of the params, gradients and extras (masters,
        compensations; codes laid out as their params, from an older state), which are then
        copied back: three more passes over those tensors, against an eager step many times
        slower."""
        if self.staged is None:
            self.kernel.run(*args, **options)
            return
        copies = {role: [t.contiguous() for t in self.staged[role]]
                  for role in _STAGED_ROLES if self.staged[role][0] is not None}
        # the gradients point_to_grads checked (not kept: the plan keeps no gradient alive)
        grads = [_tensors.local(p.grad) if self.local else p.grad for p in self.params]
        for role, tensors in (*copies.items(), ("grads", [g.contiguous() for g in grads])):
            self.kernel.point_to(role, tensors)
        self.kernel.run(*args, **options)
        for role, tensors in copies.items():
            for original, copy in zip(self.staged[role], tensors):
                if copy is not original:
                    original.copy_(copy)


class _GroupPlan:
    """A group's bucket plans, the params no kernel takes (``refused``), and what they were
    made from. A step reuses them while it gets the same choice of paths (:func:`_paths`), the
    same params (with gradients), the same state tensors (by identity: qhfast makes the plans
    again whenever it makes or replaces state, and a user's replacement changes an identity)
    and the same parameter storage; only the gradients are checked and pointed to again.
    Anything else makes a new plan, checking every tensor."""

    def __init__(self, paths: tuple, params: list[Tensor], states: list[dict[str, Any]],
                 keys: tuple[str, ...], buckets: list[_BucketPlan],
                 refused: list[Tensor]) -> None:
        self.paths, self.params, self.keys = paths, params, keys
        self.buckets, self.refused = buckets, refused
        self.state_tensors = _state_tensors(states, keys)
        self.local = any(isinstance(p, _tensors.DTensor) for p in params)  # their shards' storage
        self.param_pointers = _param_pointers(params, self.local)

    @property
    def backend(self) -> str | None:
        """The backends of its buckets ("cpu", "triton", or both joined by "+"), None where
        there are none."""
        return "+".join(sorted({bucket.backend for bucket in self.buckets})) or None

    def serves(self, paths: tuple, params: list[Tensor], states: list[dict[str, Any]]) -> bool:
        return (paths == self.paths and len(params) == len(self.params)
                and all(map(operator.is_, params, self.params))
                and all(all(map(operator.is_, new, old)) for new, old
                        in zip(_state_tensors(states, self.keys), self.state_tensors))
                and _param_pointers(params, self.local) == self.param_pointers)


def _lazy(grad: Tensor) -> bool:
    """Whether ``grad`` is a lazy negation or conjugate: its memory holds the values before
    it, which the kernels would read."""
    return grad.is_neg() or grad.is_conj()


def _elements(t: Tensor) -> int:
    """Elements the kernel sees: a complex tensor's real and imaginary parts apart."""
    return t.numel() * 2 if t.is_complex() else t.numel()


def _state_tensors(states: list[dict[str, Any]], keys: tuple[str, ...]) -> list[list]:
    return [[s.get(key) for s in states] for key in keys]


def _param_pointers(params: list[Tensor], local: bool) -> list[tuple[int, Any]]:
    """Where each param's elements are, and how they lie (:func:`_layout`: a plan is made for
    one layout; ``p.data = p.data.t()`` keeps the pointer)."""
    if local:
        params = [_tensors.local(p) for p in params]
    return [(p.data_ptr(), _layout(p)) for p in params]


def _layout(p: Tensor) -> tuple[int, ...] | None:
    """How a param's elements lie: None where contiguous, else its strides."""
    return None if p.is_contiguous() else p.stride()


def _laid_out_as(t: Tensor, p: Tensor) -> bool:
    """Whether ``t``'s elements lie in memory as those of ``p`` (a param with a
    ``_tensors.flat_format``) do:
    then a flat pass over both meets the same element of each at the same offset."""
    if p.is_contiguous():
        return t.is_contiguous()
    return t.shape == p.shape and t.stride() == p.stride()


def drop_kernel_plans(optimizer: Any) -> None:
    """Forget the optimizer's kernel plans: its state was made or replaced (a plan would also
    keep the old state tensors alive until the next step)."""
    _PLANS.pop(optimizer, None)


#: per optimizer, each group's last plan, by group index (a param of a larger group stepped
#: alone: by (group index, id of the param), which the plan keeps alive)
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _paths(group: dict[str, Any]) -> tuple:
    """What decides which backend serves each bucket of ``group`` besides its device: the
    group's flags and whether the Triton kernel serves CPU tensors."""
    return group["fused"], group["foreach"], group["capturable"], _triton_on_cpu()


def _bucket_plans(optimizer: Any, index: int, group: dict[str, Any], params: list[Tensor],
                  states: list[dict[str, Any]]) -> tuple[list[_BucketPlan], list[Tensor]]:
    """The bucket plans of the group's step (``param_groups[index]``) that serve it, pointed
    at the gradients, and the params left for another path, in their order: those of buckets
    no kernel takes, and of buckets whose gradients this step are not what the kernel reads.
    From the group's plan when it still serves, else made afresh with every tensor
    checked."""
    plans = _PLANS.setdefault(optimizer, {})
    # a param of a larger group stepped alone (inside backward, qhfast._in_backward) keeps a
    # plan of its own: one per group would be made again for each param at every backward
    alone = len(params) == 1 and len(group["params"]) > 1
    plan_key = (index, id(params[0])) if alone else index
    plan = plans.get(plan_key)
    paths = _paths(group)
    if plan is None or not plan.serves(paths, params, states):
        buckets, refused = _new_bucket_plans(optimizer, group, params, states)
        keys = (*optimizer._buffer_keys, *optimizer._counter_keys, MASTER_KEY, COMPENSATION_KEY,
                *(key + quantize.SCALE_SUFFIX for key in optimizer._buffer_keys))
        plan = plans[plan_key] = _GroupPlan(paths, params, states, keys, buckets, refused)
    served = [bucket for bucket in plan.buckets if bucket.point_to_grads()]
    if len(served) == len(plan.buckets) and not plan.refused:
        return served, []
    left = {id(p) for p in plan.refused}
    for bucket in plan.buckets:
        if bucket not in served:
            left.update(map(id, bucket.params))
    return served, [p for p in params if id(p) in left]


def _new_bucket_plans(optimizer: Any, group: dict[str, Any], params: list[Tensor],
                      states: list[dict[str, Any]]) -> tuple[list[_BucketPlan], list[Tensor]]:
    """The plans of the buckets a kernel serves, each by the backend of its device, and the
    params of the others."""
    state_of = dict(zip(map(id, params), states))
    buckets, refused = [], []
    for bucket in _by_state_dtype(_tensors.buckets(params).values(), state_of,
                                  optimizer._buffer_keys[0]):
        backend = _backend(group, bucket[0])
        tensors = None if backend is None else _bucket_tensors(
            optimizer, group, bucket, [state_of[id(p)] for p in bucket], backend)
        if tensors is None and backend is not None and len(bucket) > 1:
            # the params the kernel takes, as a bucket of their own, the others refused
            fits = {id(p) for p in bucket if _bucket_tensors(
                optimizer, group, [p], [state_of[id(p)]], backend) is not None}
            if fits:
                refused += [p for p in bucket if id(p) not in fits]
                bucket = [p for p in bucket if id(p) in fits]
                tensors = _bucket_tensors(optimizer, group, bucket,
                                          [state_of[id(p)] for p in bucket], backend)
        kernel = None
        staged = None
        if tensors is not None and tensors["firsts"][0].dtype == torch.uint8 and not all(
                t is None or t.is_contiguous() for role in _STAGED_ROLES for t in tensors[role]):
            staged = {role: tensors[role] for role in _STAGED_ROLES}
        if tensors is not None and backend == "triton":
            kernel = _triton.Plan(optimizer._kernel, tensors, group["low_precision"],
                                  _code_maps(tensors))
        elif tensors is not None:
            kernel = _cpu.plan(optimizer._kernel, tensors, group["low_precision"],
                               _code_maps(tensors))
        if kernel is None:
            refused += bucket
            continue
        local = any(isinstance(p, _tensors.DTensor) for p in bucket)
        buckets.append(_BucketPlan(backend, kernel, bucket, local, staged))
    return buckets, refused


def _by_state_dtype(buckets: Any, state_of: dict[int, dict[str, Any]],
                    key: str) -> list[list[Tensor]]:
    """The buckets split by the dtype their moments are stored in (``state_dtype="8bit"``
    keeps the moments of small tensors in the compute dtype): one kernel call per format."""
    split = []
    for bucket in buckets:
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in bucket:
            by_dtype.setdefault(state_of[id(p)][key].dtype, []).append(p)
        split += by_dtype.values()
    return split


def _code_maps(tensors: dict[str, list]) -> tuple | None:
    """The (signed, non-negative) code maps where the bucket's moments are 8-bit codes."""
    if tensors["firsts"][0].dtype != torch.uint8:
        return None
    device = tensors["params"][0].device
    return quantize.code_map(True, device), quantize.code_map(False, device)


_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _bucket_tensors(optimizer: Any, group: dict[str, Any], bucket: list[Tensor],
                    states: list[dict[str, Any]], backend: str) -> dict[str, list] | None:
    """The bucket's tensors by the kernels' roles (``kernels.triton.ROLES``, and the C
    kernel's ``scales1``/``scales2`` of 8-bit moments): local shards of DTensors, real views of
    complex tensors; or None unless every one is what the kernel reads: its dtype, on the
    params' device, of its param's size (a scale per block of 8-bit codes), the params one
    dense run (``_tensors.flat_format``; contiguous where the moments are 8-bit: their blocks
    follow the elements' order) and the others laid out as their param (:func:`_laid_out_as`;
    scales contiguous; 8-bit codes contiguous or laid out as their param: the C kernel steps
    channels_last params with 8-bit moments through contiguous copies,
    :meth:`_BucketPlan.run`; the Triton kernel takes contiguous ones only). The gradients are not checked here: each step checks and points to
    its own (:meth:`_BucketPlan.point_to_grads`), so that one the kernel does not read makes
    its bucket take another path for that step only (a lazy one: its param stands in)."""
    local = any(isinstance(p, _tensors.DTensor) for p in bucket)
    view = _tensors.local if local else (lambda t: t)
    params = [view(p) for p in bucket]
    device, dtype = params[0].device, params[0].dtype
    low = dtype in LOW_PRECISION_DTYPES
    mode = group["low_precision"]
    extra_key = {"master": MASTER_KEY, "kahan": COMPENSATION_KEY}.get(mode) if low else None
    keys = optimizer._buffer_keys
    counters = optimizer._counter_keys
    tensors: dict[str, list] = {
        "params": params,
        "grads": [q if _lazy(view(p.grad)) else view(p.grad) for p, q in zip(bucket, params)],
        "firsts": [view(s[keys[0]]) for s in states],
        "seconds": [view(s[keys[1]]) for s in states] if len(keys) > 1 else [None] * len(bucket),
        "extras": [view(s[extra_key]) for s in states] if extra_key else [None] * len(bucket),
        "weights1": [s[counters[0]] for s in states] if counters else [None] * len(bucket),
        "weights2": [s[counters[1]] for s in states] if counters else [None] * len(bucket),
        "scales1": [view(s.get(keys[0] + quantize.SCALE_SUFFIX)) for s in states],
        "scales2": [view(s.get(keys[-1] + quantize.SCALE_SUFFIX)) if len(keys) > 1 else None
                    for s in states],
    }
    if dtype.is_complex:
        tensors = {role: [t if t is None or not t.is_complex() else torch.view_as_real(t)
                          for t in values] for role, values in tensors.items()}
        dtype = tensors["params"][0].dtype
    if dtype not in _KERNEL_DTYPES:
        return None
    compute = torch.float32 if low else dtype
    buffer_dtype = tensors["firsts"][0].dtype
    eight_bit = buffer_dtype == torch.uint8
    if buffer_dtype not in (compute, torch.bfloat16) and not eight_bit:
        return None
    if not eight_bit:
        tensors["scales1"] = tensors["scales2"] = [None] * len(bucket)
    elif any(t is None for t in tensors["scales1"]) or (
            tensors["seconds"][0] is not None and any(t is None for t in tensors["scales2"])):
        return None
    counter_dtype = tensors["weights1"][0].dtype if counters else None
    if counters and counter_dtype not in (torch.float64, torch.float32):
        return None
    counter_device = device if backend == "triton" else torch.device("cpu")
    expected = {"params": dtype, "firsts": buffer_dtype,
                "seconds": buffer_dtype, "extras": torch.float32 if mode == "master" else dtype,
                "weights1": counter_dtype, "weights2": counter_dtype,
                "scales1": torch.float32, "scales2": torch.float32}
    sizes = [p.numel() for p in tensors["params"]]
    for role, values in tensors.items():
        if values[0] is None or role == "grads":
            continue
        want = expected[role]
        if role.startswith("weights"):
            ok = all(t.dtype == want and t.device == counter_device and t.numel() == 1
                     for t in values)
        elif role.startswith("scales"):
            ok = all(t.dtype == want and t.device == device
                     and t.is_contiguous() and t.numel() == quantize.blocks(n)
                     for t, n in zip(values, sizes))
        elif role == "params":
            ok = all(t.dtype == want and t.device == device
                     and _tensors.flat_format(t) is not None for t in values)
        elif eight_bit and role in _STAGED_ROLES:  # any layout: staged where not contiguous
            ok = all(t.dtype == want and t.device == device and t.shape == p.shape
                     for t, p in zip(values, tensors["params"]))
        else:
            ok = all(t.dtype == want and t.device == device and t.numel() == n
                     and _laid_out_as(t, p) for t, n, p in zip(values, sizes, tensors["params"]))
        if not ok:
            return None
    if eight_bit and backend != "cpu" and not all(
            t is None or t.is_contiguous() for role in _STAGED_ROLES for t in tensors[role]):
        _warn_8bit_layout(type(optimizer).__name__)
        return None
    return tensors


def _warn_8bit_layout(name: str) -> None:
    _cpu._warn(("8bit-layout", name), (
        f"{name} steps the params that are not contiguous (channels_last) and have "
        "state_dtype='8bit' moments with its compiled group step, slower than its Triton "
        "kernel, which quantizes blocks in the elements' order and takes contiguous params "
        "only; keep such a model contiguous, or use state_dtype=torch.bfloat16"))


# --------------------------------------------------------------------------------------------
# the compiled group step (torch.compile)

#: inductor options of the compiled group step. Every tensor's kernel reads the same few 0-d
#: buffers (lr, betas, the GradScaler's found_inf), and inductor tries to fuse each node with up
#: to 64 others that read a buffer it reads: ~180 tensors x ~20 ops made that most of the
#: compile time. Each tensor's own chain of ops (what fuses into its kernel) shares that
#: tensor's buffers, so a few attempts per shared buffer lose nothing.
FUSED_INDUCTOR_OPTIONS = {"max_fusion_buffer_group_pairwise_attempts": 4}

#: each optimizer's compiled group steps, by group index; they go when the optimizer does
_COMPILED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _group_step(optimizer: Any, group: dict[str, Any], params: list[Tensor],
                hyperparameters: dict[str, Any], grad_scale: Tensor | None,
                found_inf: Tensor | None) -> None:
    optimizer._step_group(group, params, _tensors.AmpArgs(grad_scale, found_inf), hyperparameters)


class _CompiledGroupStep:
    """One param group's step, compiled.

    The group's scheduled hyperparameters (lr, momentum/betas) enter the graph as 0-d float64
    tensors on the params' device, refilled when the group's floats change, so a schedule does
    not recompile; the rest are constants of the graph (fewer ops: ν = 1 drops its term). Each
    group compiles its own copy of ``_group_step``'s code: dynamo keeps graphs per code object,
    so groups and optimizers do not share one recompile limit nor test each other's guards.
    """

    def __init__(self, index: int) -> None:
        code = _group_step.__code__.replace(co_name=f"_group_step_{index}")
        self.compiled = torch.compile(
            types.FunctionType(code, _group_step.__globals__, code.co_name),
            fullgraph=True,
            options=FUSED_INDUCTOR_OPTIONS,
        )
        self.scalars: dict[str, tuple[float, Tensor]] = {}

    def __call__(self, optimizer: Any, group: dict[str, Any], params: list[Tensor],
                 amp: Any) -> None:
        device = _tensors.local(params[0]).device
        hyperparameters = {
            name: self._as_tensor(name, group[name], device)
            if name in optimizer._scheduled_hyperparameters else group[name]
            for name in optimizer._tensor_hyperparameters
        }
        self.compiled(optimizer, group, params, hyperparameters, amp.grad_scale, amp.found_inf)

    def _as_tensor(self, key: str, value: Any, device: torch.device) -> Any:
        if isinstance(value, (tuple, list)):
            return tuple(self._as_tensor(f"{key}[{i}]", v, device) for i, v in enumerate(value))
        if isinstance(value, Tensor):
            return value
        cached = self.scalars.get(key)
        if cached is None or cached[1].device != device:
            cached = (value, torch.full((), value, dtype=torch.float64, device=device))
        elif cached[0] != value:
            cached = (value, cached[1].fill_(value))
        self.scalars[key] = cached
        return cached[1]


def _compiled_group_step(optimizer: Any, group: dict[str, Any]) -> _CompiledGroupStep:
    index = next(i for i, g in enumerate(optimizer.param_groups) if g is group)
    steps = _COMPILED_STEPS.setdefault(optimizer, {})
    if index not in steps:
        steps[index] = _CompiledGroupStep(index)
    return steps[index]
