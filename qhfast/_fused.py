"""``fused=True``: each param group's update in one pass over memory.

Two implementations, picked per param group at its step:

* **the CPU kernel** (``_cpu_kernel.c``): one C function per optimizer, called through
  ``ctypes`` on a chunk table of a bucket's tensors and spread over OpenMP threads (the
  multi-tensor-apply design of torch's fused kernels). It is compiled once per combination of
  dtypes and precision mode (about a second, cached on disk), whatever the number or shapes of
  the tensors, so a 200-tensor group costs what a 2-tensor one does. It serves CPU groups
  whose tensors are contiguous: fp32/fp64 parameters, bf16 parameters in every
  ``low_precision`` mode and fp16 parameters with ``"master"`` or ``"nearest"``, moments in
  the compute dtype or bf16.
* **the compiled group step**: everything else (CUDA, where inductor emits Triton; the
  combinations the kernel lacks) runs the group's eager step through ``torch.compile``.

The kernel's random numbers (stochastic rounding) come from a hash of a seed drawn each step
from torch's default CPU generator: the same RNG state gives the same run.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
import types
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import _base
from ._precision import COMPENSATION_KEY, MASTER_KEY

__all__ = ["fused_group_step", "FUSED_INDUCTOR_OPTIONS", "CPU_KERNEL"]

#: whether CPU groups use the C kernel (False: the compiled group step everywhere);
#: ``QHFAST_CPU_KERNEL=0`` in the environment turns it off
CPU_KERNEL = os.environ.get("QHFAST_CPU_KERNEL", "1") != "0"


def fused_group_step(optimizer: Any, group: dict[str, Any], params: list[Tensor],
                     amp: Any) -> None:
    """Update ``params`` (those of ``group`` with a gradient, their state made) in one pass."""
    if CPU_KERNEL:
        calls = _kernel_calls(optimizer, group, params)
        if calls is not None:
            _run_kernel(optimizer, group, calls, amp)
            return
    _compiled_group_step(optimizer, group)(optimizer, group, params, amp)


# --------------------------------------------------------------------------------------------
# the CPU kernel

_SOURCE = Path(__file__).with_name("_cpu_kernel.c")
_REAL = {torch.float32: "float", torch.float64: "double", torch.bfloat16: "float",
         torch.float16: "float"}
_PARAM = {torch.float32: 0, torch.float64: 0, torch.bfloat16: 1, torch.float16: 2}
_MODE = {"master": 1, "kahan": 2, "stochastic": 3, "nearest": 4}
_COUNTER = {torch.float64: "double", torch.float32: "float"}
#: the modes that draw random numbers (besides bf16 moments)
_RANDOM_MODES = ("kahan", "stochastic")

_libraries: dict[tuple, ctypes.CDLL] = {}
_compile_lock = threading.Lock()
#: how many kernel variants this process has compiled or loaded (tests read it)
builds = 0


def _cache_dir() -> Path:
    root = os.environ.get("QHFAST_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qhfast")
    return Path(root)


def _library(variant: tuple) -> ctypes.CDLL | None:
    """The compiled kernel for ``variant`` (REAL, PARAM, MODE, STATE, COUNTER): loaded from the
    disk cache or compiled (``cc``, about a second); None, with a warning, if it cannot be."""
    library = _libraries.get(variant)
    if library is not None:
        return library
    with _compile_lock:
        if variant in _libraries:
            return _libraries[variant]
        real, param, mode, state, counter = variant
        defines = [f"-DREAL={real}", f"-DPARAM={param}", f"-DMODE={mode}", f"-DSTATE={state}",
                   f"-DCOUNTER={counter}"]
        compiler = os.environ.get("CC", "cc")
        flags = ["-O3", "-march=native", "-std=gnu11", "-fopenmp", "-ffp-contract=off",
                 "-fno-math-errno", "-fPIC", "-shared"]
        source = _SOURCE.read_bytes()
        key = hashlib.sha256(b"\0".join([source, " ".join(defines + flags).encode(),
                                         compiler.encode(), platform.machine().encode(),
                                         _cpu_model().encode()])).hexdigest()[:24]
        path = _cache_dir() / f"qhfast_cpu_kernel_{key}.so"
        try:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
                    built = Path(scratch) / path.name
                    subprocess.run([compiler, *flags, *defines, str(_SOURCE), "-o", str(built),
                                    "-lm"], check=True, capture_output=True, text=True)
                    os.replace(built, path)
            library = ctypes.CDLL(str(path))
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", "") or str(error)
            warnings.warn(f"qhfast could not build its fused CPU kernel ({detail.strip()[:500]}); "
                          "fused=True falls back to torch.compile", RuntimeWarning, stacklevel=4)
            _libraries[variant] = None  # type: ignore[assignment]
            return None
        _declare(library)
        global builds
        builds += 1
        _libraries[variant] = library
        return library


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _declare(library: ctypes.CDLL) -> None:
    p, i64p, d, i, u32 = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_double,
                          ctypes.c_int, ctypes.c_uint32)
    pp = ctypes.POINTER(ctypes.c_void_p)
    library.qhadam_step.argtypes = [i, i64p, pp, pp, pp, pp, pp, pp, pp,
                                    d, d, d, d, d, d, d, i, d, u32, i]
    library.qhadam_step.restype = None
    library.qhm_step.argtypes = [i, i64p, pp, pp, pp, pp, d, d, d, d, i, d, u32, i]
    library.qhm_step.restype = None


class _KernelCall:
    """One bucket's tensors, as the kernel takes them."""

    def __init__(self, library: ctypes.CDLL, params: list[Tensor], grads: list[Tensor],
                 states: list[dict[str, Any]], random: bool) -> None:
        self.library, self.params, self.grads, self.states = library, params, grads, states
        self.random = random


def _kernel_calls(optimizer: Any, group: dict[str, Any],
                  params: list[Tensor]) -> list[_KernelCall] | None:
    """The kernel calls of the group's step, one per bucket, or None if the kernel does not
    serve this group (a tensor off the CPU or not contiguous, an unsupported combination)."""
    kernel = getattr(optimizer, "_cpu_kernel", None)
    if kernel is None or group["differentiable"]:
        return None
    mode = group["low_precision"]
    calls = []
    for bucket in _base._buckets(params).values():
        locals_ = [_base._local(p) for p in bucket]
        dtype = locals_[0].dtype
        if locals_[0].device.type != "cpu" or dtype not in _PARAM:
            return None
        if dtype == torch.float16 and mode in _RANDOM_MODES:
            return None
        grads = [_base._local(p.grad) for p in bucket]
        states = [{k: _base._local(v) for k, v in optimizer.state[p].items()} for p in bucket]
        first = states[0]
        buffer_dtype = first[optimizer._buffer_keys[0]].dtype
        if buffer_dtype not in (_REAL_DTYPE[_REAL[dtype]], torch.bfloat16):
            return None
        tensors = [*locals_, *grads, *(v for s in states for v in s.values() if v.dim() > 0)]
        if not all(t.is_contiguous() and t.device.type == "cpu" for t in tensors):
            return None
        if any(g.dtype != dtype for g in grads):
            return None
        low = dtype in (torch.bfloat16, torch.float16)
        counter = "double"
        if optimizer._counter_keys:
            counter = _COUNTER.get(first[optimizer._counter_keys[0]].dtype)
            if counter is None or first[optimizer._counter_keys[0]].device.type != "cpu":
                return None
        variant = (_REAL[dtype], _PARAM[dtype], _MODE[mode] if low else 0,
                   int(buffer_dtype == torch.bfloat16), counter)
        library = _library(variant)
        if library is None:
            return None
        random = buffer_dtype == torch.bfloat16 or (low and mode in _RANDOM_MODES)
        calls.append(_KernelCall(library, locals_, grads, states, random))
    return calls


_REAL_DTYPE = {"float": torch.float32, "double": torch.float64}


def _pointers(tensors: list[Tensor | None]) -> Any:
    return (ctypes.c_void_p * len(tensors))(*[0 if t is None else t.data_ptr() for t in tensors])


def _run_kernel(optimizer: Any, group: dict[str, Any], calls: list[_KernelCall], amp: Any) -> None:
    factor = -1.0 if group["maximize"] else 1.0
    if amp.found_inf is not None and float(amp.found_inf) != 0.0:
        return  # a skipped step changes nothing (on the CPU the value is read for free)
    if amp.grad_scale is not None:
        factor /= float(amp.grad_scale)
    value = {name: _hyper(group[name]) for name in optimizer._tensor_hyperparameters}
    threads = torch.get_num_threads()
    for call in calls:
        n = len(call.params)
        sizes = (ctypes.c_int64 * n)(*[p.numel() for p in call.params])
        extras = _pointers([s.get(MASTER_KEY, s.get(COMPENSATION_KEY)) for s in call.states])
        seed = int(torch.randint(0, 1 << 32, (), dtype=torch.int64)) if call.random else 0
        params, grads = _pointers(call.params), _pointers(call.grads)
        if optimizer._cpu_kernel == "qhadam":
            (beta1, beta2), (nu1, nu2) = value["betas"], value["nus"]
            call.library.qhadam_step(
                n, sizes, params, grads,
                _pointers([s["exp_avg"] for s in call.states]),
                _pointers([s["exp_avg_sq"] for s in call.states]), extras,
                _pointers([s["beta1_weight"] for s in call.states]),
                _pointers([s["beta2_weight"] for s in call.states]),
                beta1, beta2, value["lr"], nu1, nu2, float(group["eps"]),
                float(group["weight_decay"]), int(group["decouple_weight_decay"]), factor, seed,
                threads)
        else:
            call.library.qhm_step(
                n, sizes, params, grads, _pointers([s["momentum_buffer"] for s in call.states]),
                extras, value["lr"], value["momentum"], value["nu"], float(group["weight_decay"]),
                int(group["weight_decay_type"] == "direct"), factor, seed, threads)


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
