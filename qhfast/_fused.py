"""``fused=True``: each param group's update in one pass over memory.

Two implementations, picked per param group at its step:

* **the CPU kernel** (``kernels/cpu_kernel.c``, built and loaded by ``kernels/cpu.py``): one C function per optimizer, called through
  ``ctypes`` on a chunk table of a bucket's tensors and spread over OpenMP threads (the
  multi-tensor-apply design of torch's fused kernels). It is compiled once per combination of
  dtypes and precision mode (about a second, cached on disk), whatever the number or shapes of
  the tensors, so a 200-tensor group costs what a 2-tensor one does. It serves CPU groups
  whose tensors are contiguous: fp32/fp64 parameters and bf16/fp16 parameters in every
  ``low_precision`` mode, moments in the compute dtype or bf16. Each group's calls (their pointer tables) are kept between steps
  while the params, their storage and the state tensors stay the same; a step checks and points
  to the gradients only (``_KernelPlan``).
* **the compiled group step**: everything else (CUDA, where inductor emits Triton; the
  combinations the kernel lacks) runs the group's eager step through ``torch.compile``.

The kernel's random numbers (stochastic rounding) come from a hash of seeds drawn each step
from torch's default CPU generator: the same RNG state gives the same run.
"""

from __future__ import annotations

import array
import ctypes
import os
import operator
import types
import weakref
from typing import Any

import torch
from torch import Tensor

from . import _base
from ._precision import COMPENSATION_KEY, MASTER_KEY
from .kernels import cpu as _cpu

__all__ = ["kernel_step", "compiled_group_step", "FUSED_INDUCTOR_OPTIONS", "CPU_KERNEL"]

#: whether CPU groups use the C kernel (False: the compiled group step everywhere);
#: ``QHFAST_CPU_KERNEL=0`` in the environment turns it off
CPU_KERNEL = os.environ.get("QHFAST_CPU_KERNEL", "1") != "0"


def kernel_step(optimizer: Any, index: int, group: dict[str, Any], params: list[Tensor],
                states: list[dict[str, Any]], amp: Any) -> bool:
    """Step ``params`` (those of ``group``, ``param_groups[index]``, with a gradient; their
    state ``states``, made) with the CPU
    kernel and return True, or return False (nothing done) where it does not serve: a group
    that asked for another path (``fused=False``, a ``foreach`` choice), a traced step (under
    torch.compile the step is compiled anyway), tensors off the CPU or not contiguous, an
    unsupported combination, no compiler, ``capturable=True`` (the kernel reads GradScaler's
    found_inf and tensor hyperparameters on the host). ``fused=None`` groups take it too: it
    is the fastest CPU path; where it cannot be built (a ``RuntimeWarning`` once per process,
    see ``kernels/cpu.py``) they take the eager path."""
    fused = group["fused"]
    if not CPU_KERNEL or torch.compiler.is_compiling():
        return False
    if not (fused or (fused is None and group["foreach"] is None)):
        return False
    calls = _kernel_calls(optimizer, index, group, params, states)
    if calls is None:
        return False
    _run_kernel(optimizer, group, calls, amp)
    return True


def compiled_group_step(optimizer: Any, group: dict[str, Any], params: list[Tensor],
                        amp: Any) -> None:
    """Step ``params`` with the group's step compiled by torch.compile (``fused=True`` where
    the kernel does not serve)."""
    _compiled_group_step(optimizer, group)(optimizer, group, params, amp)


# --------------------------------------------------------------------------------------------
# the CPU kernel

_REAL = {torch.float32: "float", torch.float64: "double", torch.bfloat16: "float",
         torch.float16: "float"}
_PARAM = {torch.float32: 0, torch.float64: 0, torch.bfloat16: 1, torch.float16: 2}
_MODE = {"master": 1, "kahan": 2, "stochastic": 3, "nearest": 4}
_COUNTER = {torch.float64: "double", torch.float32: "float"}
#: the modes that draw random numbers (besides bf16 moments)
_RANDOM_MODES = ("kahan", "stochastic")

class _KernelCall:
    """One bucket's tensors, as the kernel takes them: the pointer arrays of the parameters,
    gradients (refilled each step), moments, masters or compensations and counters, and the
    sizes."""

    def __init__(self, library: ctypes.CDLL, params: list[Tensor], sizes: list[int],
                 tensors: dict[str, list], random: bool, local: bool, extras: bool) -> None:
        self.library, self.random, self.n, self.extras = library, random, len(params), extras
        self.params, self.local = params, local  # the bucket's params as given (DTensor or not)
        self.numels = sizes
        self.sizes = (ctypes.c_int64 * self.n)(*sizes)
        self.pointers = {key: _Pointers(values) for key, values in tensors.items()}

    def point_to_grads(self) -> bool:
        """Point the call at the params' current gradients, or return False if one is not what
        the kernel reads: contiguous, of its param's size. (A gradient's dtype and device are
        its param's: torch's ``grad`` setter and autograd see to that, and the plan was made
        with the params checked; a param given new storage makes a new plan.)"""
        grads = [p.grad for p in self.params]
        if self.local:
            grads = [_base._local(g) for g in grads]
        if not all(g.is_contiguous() and g.numel() == n for g, n in zip(grads, self.numels)):
            return False
        self.pointers["grads"] = _Pointers(grads)
        return True


class _KernelPlan:
    """A group's kernel calls and what they were made from. A step reuses them while it gets
    the same params (with gradients), the same state tensors (by identity: qhfast makes the
    plans again whenever it makes or replaces state, and a user's replacement changes an
    identity) and the same parameter storage; only the gradients are checked and pointed to
    again. Anything else makes a new plan, checking every tensor."""

    def __init__(self, params: list[Tensor], states: list[dict[str, Any]], keys: tuple[str, ...],
                 calls: list[_KernelCall]) -> None:
        self.params, self.keys, self.calls = params, keys, calls
        self.state_tensors = _state_tensors(states, keys)
        self.local = any(call.local for call in calls)  # DTensors: their shards' storage
        self.param_pointers = _param_pointers(params, self.local)

    def serves(self, params: list[Tensor], states: list[dict[str, Any]]) -> bool:
        return (len(params) == len(self.params) and all(map(operator.is_, params, self.params))
                and all(all(map(operator.is_, new, old)) for new, old
                        in zip(_state_tensors(states, self.keys), self.state_tensors))
                and _param_pointers(params, self.local) == self.param_pointers)


def _state_tensors(states: list[dict[str, Any]], keys: tuple[str, ...]) -> list[list]:
    return [[s.get(key) for s in states] for key in keys]


def _param_pointers(params: list[Tensor], local: bool) -> list[int]:
    if local:
        return [_base._local(p).data_ptr() for p in params]
    return [p.data_ptr() for p in params]


def drop_kernel_plans(optimizer: Any) -> None:
    """Forget the optimizer's kernel plans: its state was made or replaced (a plan would also
    keep the old state tensors alive until the next step)."""
    _PLANS.pop(optimizer, None)


#: per optimizer, each group's last kernel plan, by group index
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _kernel_calls(optimizer: Any, index: int, group: dict[str, Any], params: list[Tensor],
                  states: list[dict[str, Any]]) -> list[_KernelCall] | None:
    """The kernel calls of the group's step (``param_groups[index]``), one per bucket, or None
    if the kernel does not serve this group: from the group's plan when it still serves (the
    gradients checked), else made afresh with every tensor checked."""
    kernel = getattr(optimizer, "_cpu_kernel", None)
    if kernel is None or group["differentiable"] or group["capturable"]:
        return None  # capturable: the kernel reads found_inf and tensor hyperparameters
    plans = _PLANS.setdefault(optimizer, {})
    plan = plans.get(index)
    if plan is None or not plan.serves(params, states):
        calls = _new_kernel_calls(optimizer, group, params, states)
        if calls is None:
            plans.pop(index, None)
            return None
        keys = (*optimizer._buffer_keys, *optimizer._counter_keys)
        extra_key = {"master": MASTER_KEY, "kahan": COMPENSATION_KEY}.get(group["low_precision"])
        if extra_key and any(call.extras for call in calls):
            keys += (extra_key,)
        plan = plans[index] = _KernelPlan(params, states, keys, calls)
    for call in plan.calls:
        if not call.point_to_grads():
            return None
    return plan.calls


def _new_kernel_calls(optimizer: Any, group: dict[str, Any], params: list[Tensor],
                      states: list[dict[str, Any]]) -> list[_KernelCall] | None:
    """The kernel calls of the group's step with every tensor checked (device, dtype, size,
    layout: the kernel trusts what it is given), or None if the kernel does not serve it."""
    mode = group["low_precision"]
    state_of = dict(zip(map(id, params), states))
    calls = []
    for bucket in _base._buckets(params).values():
        local = _base._local if any(isinstance(p, _base.DTensor) for p in bucket) else None
        if local is not None:
            bucket_params = [local(p) for p in bucket]
            grads = [local(p.grad) for p in bucket]
        else:
            bucket_params, grads = bucket, [p.grad for p in bucket]
        dtype = bucket_params[0].dtype
        if bucket_params[0].device.type != "cpu" or dtype not in _PARAM:
            return None
        low = dtype in (torch.bfloat16, torch.float16)
        bucket_states = [state_of[id(p)] for p in bucket]
        tensors: dict[str, list] = {"grads": grads}
        for key in (*optimizer._buffer_keys, *optimizer._counter_keys):
            tensors[key] = [s[key] for s in bucket_states]
        extra_key = {"master": MASTER_KEY, "kahan": COMPENSATION_KEY}.get(mode) if low else None
        tensors["extras"] = ([s[extra_key] for s in bucket_states] if extra_key
                             else [None] * len(bucket_states))
        if local is not None:
            tensors = {key: [None if t is None else local(t) for t in values]
                       for key, values in tensors.items()}
        buffer_dtype = tensors[optimizer._buffer_keys[0]][0].dtype
        if buffer_dtype not in (_REAL_DTYPE[_REAL[dtype]], torch.bfloat16):
            return None
        expected = {"params": dtype, "grads": dtype,
                    "extras": torch.float32 if mode == "master" else dtype}
        expected.update({key: buffer_dtype for key in optimizer._buffer_keys})
        counter = "double"
        if optimizer._counter_keys:
            counter_dtype = tensors[optimizer._counter_keys[0]][0].dtype
            counter = _COUNTER.get(counter_dtype)
            if counter is None:
                return None
            expected.update({key: counter_dtype for key in optimizer._counter_keys})
        sizes = [p.numel() for p in bucket_params]
        tensors["params"] = bucket_params
        for key, values in tensors.items():
            if key == "extras" and extra_key is None:
                continue
            want, elements = expected[key], key not in optimizer._counter_keys
            if not all(t.dtype == want and t.is_cpu and t.is_contiguous()
                       and t.numel() == (n if elements else 1)
                       for t, n in zip(values, sizes)):
                return None
        variant = (_REAL[dtype], _PARAM[dtype], _MODE[mode] if low else 0,
                   int(buffer_dtype == torch.bfloat16), counter)
        library = _cpu.load(variant)
        if library is None:
            return None
        random = buffer_dtype == torch.bfloat16 or (low and mode in _RANDOM_MODES)
        calls.append(_KernelCall(library, bucket, sizes, tensors, random, local is not None,
                                 extra_key is not None))
    return calls


_REAL_DTYPE = {"float": torch.float32, "double": torch.float64}


_POINTER_CODE = "Q" if ctypes.sizeof(ctypes.c_void_p) == 8 else "I"  # array's code for void *


class _Pointers:
    """An array of the tensors' data pointers (0 for None) for a ``void **`` argument:
    ``address`` is what the kernel gets, valid while this object lives."""

    __slots__ = ("array", "address")

    def __init__(self, tensors: list[Tensor | None]) -> None:
        self.array = array.array(_POINTER_CODE, [0 if t is None else t.data_ptr() for t in tensors])
        self.address = self.array.buffer_info()[0]


def _run_kernel(optimizer: Any, group: dict[str, Any], calls: list[_KernelCall], amp: Any) -> None:
    factor = -1.0 if group["maximize"] else 1.0
    if amp.found_inf is not None and float(amp.found_inf) != 0.0:
        return  # a skipped step changes nothing (on the CPU the value is read for free)
    if amp.grad_scale is not None:
        factor /= float(amp.grad_scale)
    value = {name: _hyper(group[name]) for name in optimizer._tensor_hyperparameters}
    threads = torch.get_num_threads()
    for call in calls:
        seed = _draw_seeds() if call.random else 0
        pointer = {key: pointers.address for key, pointers in call.pointers.items()}
        if optimizer._cpu_kernel == "qhadam":
            (beta1, beta2), (nu1, nu2) = value["betas"], value["nus"]
            call.library.qhadam_step(
                call.n, call.sizes, pointer["params"], pointer["grads"], pointer["exp_avg"],
                pointer["exp_avg_sq"], pointer["extras"], pointer["beta1_weight"],
                pointer["beta2_weight"], beta1, beta2, value["lr"], nu1, nu2,
                float(group["eps"]), float(group["weight_decay"]),
                int(group["decouple_weight_decay"]), factor, seed, threads)
        else:
            call.library.qhm_step(
                call.n, call.sizes, pointer["params"], pointer["grads"],
                pointer["momentum_buffer"], pointer["extras"], value["lr"], value["momentum"],
                value["nu"], float(group["weight_decay"]),
                int(group["weight_decay_type"] == "direct"), factor, seed, threads)


def _draw_seeds() -> int:
    """64 random bits from torch's default CPU generator: the kernel's two 32-bit seeds."""
    return int(torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64)) & ((1 << 64) - 1)


def _hyper(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return tuple(_hyper(v) for v in value)
    return float(value)


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
    optimizer._step_group(group, params, _base.AmpArgs(grad_scale, found_inf), hyperparameters)


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
        device = _base._local(params[0]).device
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
            cached = (value, torch.tensor(value, dtype=torch.float64, device=device))
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
