"""The Triton kernel (``triton_kernel.py``): its tables and its launches.

A :class:`Plan` is built from one bucket's tensors (one device, one parameter dtype), by role,
and run each step: it keeps the bucket's addresses and chunk table on the device, points the
table at the step's gradients when they moved, and launches QHAdam's normalizer update and the
element kernel (QHM: the element kernel alone). Nothing in a launch is read on the host, so a
step can be captured in a CUDA graph. This module knows nothing of optimizers: the
orchestration (``qhfast._fused``) checks the tensors and passes the hyperparameters as 0-d
tensors on the device.

Triton is imported at the first plan (``@triton.jit`` reads ``TRITON_INTERPRET`` then): with
``TRITON_INTERPRET=1`` the kernels run on CPU tensors in Triton's interpreter, which is how the
suite checks them on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch
from torch import Tensor

from .._tensors import capturing

__all__ = ["Plan", "available", "interpreting", "CHUNK", "BLOCK", "ROLES"]

#: elements of one program's chunk, and of one pass of its loop
CHUNK = 32768
BLOCK = 1024
#: the tensors a plan takes, by role (``extras``: the fp32 master or the 16-bit compensation;
#: ``weights1``/``weights2``: QHAdam's normalizers; ``scales1``/``scales2``: the block scales
#: of 8-bit moments)
ROLES = ("params", "grads", "firsts", "seconds", "extras", "weights1", "weights2", "scales1",
         "scales2")
#: the modes of 16-bit parameters, as the kernel numbers them
MODES = {"master": 1, "kahan": 2, "stochastic": 3, "nearest": 4}
_PARAM_FORMATS = {torch.float32: 0, torch.float64: 0, torch.bfloat16: 1, torch.float16: 2}


def available() -> bool:
    """Whether triton can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _kernel_module() -> ModuleType:
    return importlib.import_module(".triton_kernel", __package__)


def _addresses(tensors: list[Tensor | None]) -> list[int]:
    return [0 if t is None else t.data_ptr() for t in tensors]


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """``device`` made the current device: Triton launches on the current device, so a bucket
    on another GPU than the current one would run on the wrong one (torch's fused optimizers
    take the same guard from their tensors)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class Plan:
    """One bucket's kernel launches.

    ``tensors`` maps each of :data:`ROLES` to one entry per tensor (None where a role is unused:
    QHM has no second moment nor normalizers, fp32 parameters no extras), each one flat run of
    elements (contiguous, or a channels_last param with its gradient and state alike), on
    one device, of one size per tensor (normalizers: one element). ``kind`` is ``"qhadam"`` or
    ``"qhm"``; ``mode`` the ``low_precision`` mode of 16-bit parameters (ignored otherwise).
    The moments' dtype says whether they are bf16 or 8-bit codes (uint8: ``code_maps`` are the
    signed and the non-negative ``_quantize.CodeMap``, on the device); the normalizers' whether
    they count in fp64.
    """

    def __init__(self, kind: str, tensors: dict[str, list[Tensor | None]], mode: str,
                 code_maps: tuple | None = None) -> None:
        self.kind = kind
        kernels = _kernel_module()
        params = tensors["params"]
        self.device = params[0].device
        self.n = len(params)
        sizes = [p.numel() for p in params]
        offsets, total = [], 0
        for size in sizes:
            offsets.append(total)
            total += size
        rows = [_addresses(tensors.get(role) or [None] * self.n) for role in ROLES]
        self.host_table = torch.tensor([*rows, sizes, offsets], dtype=torch.int64)
        assert self.host_table.shape[0] == kernels.ROWS
        #: the pinned host copies behind the device tables copied during a CUDA graph's
        #: capture: its replays copy from them again, so they are kept as long as the plan
        self._captured_sources: list[Tensor] = []
        self.table = self._to_device(self.host_table)
        self.grad_addresses = rows[ROLES.index("grads")]
        #: whether every element tensor's address is 16-byte aligned (the kernel then uses
        #: vector accesses): torch's allocators align their blocks, views need not be
        self.aligned = all(a % 16 == 0 for role, row in zip(ROLES, rows)
                           if not role.startswith("weights") for a in row)
        starts = [(t, s) for t, size in enumerate(sizes) for s in range(0, size, CHUNK)]
        self.n_chunks = len(starts)
        self.chunks = self._to_device(torch.tensor(
            [[t for t, _ in starts], [s for _, s in starts]], dtype=torch.int64).reshape(2, -1))
        param_dtype = params[0].dtype
        moments = tensors["firsts"][0]
        weights = tensors["weights1"]
        self.flags = dict(
            REAL64=param_dtype == torch.float64,
            PARAM=_PARAM_FORMATS[param_dtype],
            MODE=MODES[mode] if param_dtype in (torch.bfloat16, torch.float16) else 0,
            STATE={torch.bfloat16: 1, torch.uint8: 2}.get(moments.dtype, 0),
        )
        #: the code maps' tables as the kernel reads them: values and binades (the steps' fp32
        #: bits with the first code in the low 8 bits), signed then non-negative
        self.maps = [self.table] * 4
        self.map_lasts = dict(SIGNED_LAST=0, NONNEGATIVE_LAST=0)
        if self.flags["STATE"] == 2:
            self.maps = [table for m in code_maps
                         for table in (m.values, m.steps.view(torch.int32) | m.first_code)]
            self.map_lasts = dict(SIGNED_LAST=code_maps[0].binades + 1,
                                  NONNEGATIVE_LAST=code_maps[1].binades + 1)
        self.needs_random = bool(self.flags["STATE"] or self.flags["MODE"] in (2, 3))
        #: the float hyperparameters' device copies, by name: [value, 0-d tensor]
        self.scalars: dict[str, list] = {}
        self.counter64 = bool(weights and weights[0] is not None
                              and weights[0].dtype == torch.float64)

    def _on_device(self, name: str, value: float | Tensor) -> Tensor:
        if isinstance(value, Tensor):
            return value if value.device == self.device else value.to(self.device, non_blocking=True)
        cached = self.scalars.get(name)
        if cached is None:
            cached = self.scalars[name] = [value, torch.full((), value, dtype=torch.float64,
                                                             device=self.device)]
        elif cached[0] != value:
            cached[1].fill_(value)
            cached[0] = value
        return cached[1]

    def _to_device(self, host: Tensor) -> Tensor:
        """A copy of CPU tensor ``host`` on the plan's device, made without a host-device sync:
        on a GPU, through pinned memory and asynchronously (from pageable memory torch's copy
        makes the host wait for the device, and CUDA graph capture refuses it). The pinned
        source is not reused before the copy has run (torch's pinned-memory allocator waits
        for the copy); one copied during a capture is kept (:attr:`_captured_sources`)."""
        if self.device.type != "cuda":
            return host.to(self.device)
        pinned = torch.empty_like(host, pin_memory=True).copy_(host)
        if capturing():
            self._captured_sources.append(pinned)
        return pinned.to(self.device, non_blocking=True)

    def point_to_grads(self, grads: list[Tensor]) -> None:
        """Point the table at the step's gradients (same sizes and dtypes as the plan's, checked
        by the caller): the table copied to the device again only when one moved (not in a
        CUDA graph's replays, whose gradients stay where capture found them), without a
        host-device sync (:meth:`_to_device`)."""
        addresses = _addresses(grads)
        if addresses != self.grad_addresses:
            self.host_table[ROLES.index("grads")] = torch.tensor(addresses, dtype=torch.int64)
            self.aligned = self.aligned and all(a % 16 == 0 for a in addresses)
            self.table = self._to_device(self.host_table)
            self.grad_addresses = addresses

    def run(self, hyper: dict[str, float | Tensor], *, decay: int, maximize: bool,
            grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """Launch the step. ``hyper``: lr, eps, weight_decay, and beta1, beta2, nu1, nu2 for
        QHAdam, momentum, nu for QHM: 0-d tensors (read by the kernel where they are, so a
        change in place is seen by a replayed CUDA graph) or floats (kept in 0-d fp64 tensors
        on the device, refilled when they change). ``decay``: 0 none, 1 coupled (added to the
        gradient), 2 decoupled (θ scaled first). ``grad_scale``/``found_inf``: GradScaler's,
        on the device; a nonzero found_inf makes the launch change nothing."""
        kernels = _kernel_module()
        hyper = {name: self._on_device(name, value) for name, value in hyper.items()}
        dummy = self.table
        flags = dict(self.flags, DECAY=decay, MAXIMIZE=bool(maximize),
                     HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
                     NEEDS_RANDOM=self.needs_random, ALIGNED=self.aligned, CHUNK=CHUNK,
                     BLOCK=BLOCK, **self.map_lasts)
        # (GradScaler's tensors live on its device: another GPU's are copied, as torch's fused
        # optimizers do)
        grad_scale = dummy if grad_scale is None else self._on_device("grad_scale", grad_scale)
        found = dummy if found_inf is None else self._on_device("found_inf", found_inf)
        seeds = (torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64,
                               device=self.device) if self.needs_random else dummy)
        options = dict(num_warps=4, enable_fp_fusion=False)
        with _device_guard(self.device):
            if self.kind == "qhadam":
                kernels.advance_normalizers[(triton_cdiv(self.n, BLOCK),)](
                    self.table, self.n, hyper["beta1"], hyper["beta2"], found,
                    COUNTER64=self.counter64, HAS_FOUND_INF=found_inf is not None, BLOCK=BLOCK,
                    **options)
                if self.n_chunks:
                    kernels.qhadam[(self.n_chunks,)](
                        self.table, self.chunks, self.n_chunks, self.n, hyper["lr"],
                        hyper["nu1"], hyper["nu2"], hyper["eps"], hyper["weight_decay"],
                        grad_scale, found, seeds, *self.maps, COUNTER64=self.counter64, **flags,
                        **options)
            elif self.n_chunks:
                kernels.qhm[(self.n_chunks,)](
                    self.table, self.chunks, self.n_chunks, self.n, hyper["lr"],
                    hyper["momentum"], hyper["nu"], hyper["weight_decay"], grad_scale, found,
                    seeds, *self.maps, **flags, **options)


def triton_cdiv(a: int, b: int) -> int:
    return max(1, -(-a // b))
