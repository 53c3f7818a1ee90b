"""Optimizer step time and memory: qhfast against torch.optim and qhoptim on one parameter set.

Used by ``python -m perf`` (the table) and ``perf/compare.py`` (A/B runs).

The parameter set is shaped like a small transformer (width 384, 11 blocks of attention and MLP
weights, biases and norms, plus an embedding: ~21M params in 179 tensors). Gradients are random
and set once; every optimizer takes warm-up steps (state creation) and then each timed step is
timed alone. Machines drift (a shared CPU, the allocator, page placement), so the whole table is
measured in rounds, each round timing every row once, and a row's statistics pool its rounds.
Eager rows get freshly made tensors each round; compiled (``fused=True``) and CUDA-graph rows
are built once, in the first round, and reused, so their one-off cost is paid once and reported.

QH rows use the paper's recommended settings (QHM ``nu=0.7, momentum=0.999``; QHAdam
``nus=(0.7, 1.0), betas=(0.995, 0.999)``), so the quasi-hyperbolic term is paid for;
``QHAdam nus=(1,1)`` is plain Adam through qhfast.

qhfast rows come in precision variants (``PRECISION_VARIANTS``), named after the dtype: fp32
parameters (and QHAdam with bf16 moments, ``fp32 bf16-state``), and bf16 parameters with each
``low_precision`` mode (``master``, ``kahan``, ``stochastic``, ``nearest``), ``+bf16-state``
where the moments are stored in bf16 (``state_dtype=torch.bfloat16``); fp16 parameters in
the same modes. State per bf16 (or fp16) parameter element, QHAdam / QHM: master 12 / 8 bytes,
kahan 10 / 6, kahan+bf16-state 6 / 4, stochastic 8 / 4, stochastic+bf16-state 4 / 2, nearest
8 / 4. ``8bit-state`` (``state_dtype="8bit"``, fp32 parameters and bf16 "stochastic"): a byte
per moment and an fp32 scale per 256 elements (2.03 / 1.02 bytes) for tensors of two or more
dimensions and 4096 elements or more, fp32 moments for the rest (norms and biases).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

import qhfast
from qhfast._precision import MASTER_KEY

WIDTH = 384


def transformer_shapes(blocks: int, width: int = WIDTH, vocab: int = 4096) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, width)]
    for _ in range(blocks):
        shapes += [
            (width,), (width,),  # attention norm
            (3 * width, width), (3 * width,),  # qkv
            (width, width), (width,),  # attention output
            (width,), (width,),  # mlp norm
            (4 * width, width), (4 * width,),  # mlp up
            (width, 4 * width), (width,),  # mlp down
            (width,), (width,), (width,), (width,),  # extra per-block scales/shifts
        ]
    return shapes + [(width,), (width,)]


def make_params(shapes, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen).mul_(0.02).to(device=device, dtype=dtype)
        p.requires_grad_()
        p.grad = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        params.append(p)
    return params


# --------------------------------------------------------------------------------------------
# the rows


@dataclass
class Row:
    name: str
    dtype: torch.dtype
    #: None: the package the row needs is not installed (the table says so: ``missing``)
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None
    #: built once and reused across rounds (compiled or captured: a one-off cost)
    once: bool = False
    #: capture the step in a CUDA graph and time its replay
    graph: bool = False
    #: what the table says where ``make`` is None
    missing: str = ""


QHM_SETTINGS = dict(lr=1.0, momentum=0.999, nu=0.7)
QHADAM_SETTINGS = dict(lr=1e-3, betas=(0.995, 0.999), nus=(0.7, 1.0))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # torch's rows


#: what a row whose package is missing says in the table
MISSING = "not installed: pip install -e \".[perf]\""


#: the peers' 8-bit AdamW: row name -> the package that has it (neither is a dependency)
PEER_8BIT = {"bitsandbytes AdamW8bit": "bitsandbytes", "torchao AdamW8bit": "torchao"}


def peer_8bit_classes() -> dict[str, type | None]:
    """The 8-bit AdamW classes of :data:`PEER_8BIT`, None where the package is missing."""
    classes: dict[str, type | None] = dict.fromkeys(PEER_8BIT)
    try:
        import bitsandbytes

        classes["bitsandbytes AdamW8bit"] = bitsandbytes.optim.AdamW8bit
    except ImportError:
        pass
    try:
        try:
            from torchao.optim import AdamW8bit
        except ImportError:  # torchao before 0.11
            from torchao.prototype.low_bit_optim import AdamW8bit
        classes["torchao AdamW8bit"] = AdamW8bit
    except ImportError:
        pass
    return classes


def peer_8bit_rows() -> list[Row]:
    """A row per peer 8-bit AdamW (fp32 parameters, weight decay 0.01), whose table entry says
    how to install it where it is missing."""
    return [Row(f"{name} fp32", torch.float32,
                None if cls is None else (lambda p, c=cls: c(p, lr=1e-3, weight_decay=0.01)),
                missing=f"not installed: pip install {PEER_8BIT[name]}")
            for name, cls in peer_8bit_classes().items()]


def qhoptim_classes() -> dict[str, type]:
    try:
        import qhoptim.pyt
    except ImportError:
        return {}
    return {"QHM": qhoptim.pyt.QHM, "QHAdam": qhoptim.pyt.QHAdam}


#: the precision variants of the qhfast rows: (tag, parameter dtype, options). The tag names
#: the parameter dtype, then for bf16 parameters the ``low_precision`` mode, then
#: "+bf16-state" (or "bf16-state" for fp32 parameters) for ``state_dtype=torch.bfloat16``, or
#: "8bit-state" for ``state_dtype="8bit"``
PRECISION_VARIANTS: tuple[tuple[str, torch.dtype, dict], ...] = (
    ("fp32", torch.float32, {}),
    ("fp32 bf16-state", torch.float32, dict(state_dtype=torch.bfloat16)),
    ("bf16 master", torch.bfloat16, dict(low_precision="master")),
    ("bf16 kahan", torch.bfloat16, dict(low_precision="kahan")),
    ("bf16 kahan+bf16-state", torch.bfloat16, dict(low_precision="kahan", state_dtype=torch.bfloat16)),
    ("bf16 stochastic", torch.bfloat16, dict(low_precision="stochastic")),
    ("bf16 stochastic+bf16-state", torch.bfloat16,
     dict(low_precision="stochastic", state_dtype=torch.bfloat16)),
    ("bf16 nearest", torch.bfloat16, dict(low_precision="nearest")),
    ("fp16 master", torch.float16, dict(low_precision="master")),
    ("fp16 kahan", torch.float16, dict(low_precision="kahan")),
    ("fp16 kahan+bf16-state", torch.float16, dict(low_precision="kahan", state_dtype=torch.bfloat16)),
    ("fp16 stochastic", torch.float16, dict(low_precision="stochastic")),
    ("fp16 stochastic+bf16-state", torch.float16,
     dict(low_precision="stochastic", state_dtype=torch.bfloat16)),
    ("fp16 nearest", torch.float16, dict(low_precision="nearest")),
    ("fp32 8bit-state", torch.float32, dict(state_dtype="8bit")),
    ("bf16 stochastic+8bit-state", torch.bfloat16,
     dict(low_precision="stochastic", state_dtype="8bit")),
)
#: variants with QHAdam rows only (QHM's state is one momentum buffer: fp32 with bf16 state
#: says nothing the QHAdam row does not)
QHADAM_ONLY = ("fp32 bf16-state",)

#: the variants with CUDA graph rows (on a GPU): the default and the two leanest
GRAPHED_VARIANTS = ("fp32", "bf16 master", "bf16 kahan+bf16-state", "bf16 stochastic+bf16-state")

#: the CUDA fused rows measured unless ``every_fused`` (on a GPU each is the Triton kernel,
#: compiled per variant in seconds, or where it does not serve the group, inductor's compile
#: of the step, about a minute; on the CPU the fused step is qhfast's C kernel, built in a
#: second): the defaults, and the leanest with 8-bit moments
DEFAULT_FUSED = ("QHM fp32", "QHAdam fp32", "QHAdam bf16 master", "QHAdam bf16 nearest",
                 "QHAdam fp32 8bit-state", "QHAdam bf16 stochastic+8bit-state")

#: the rows of the quick table (``python -m perf`` with no flags): what a user choosing an
#: optimizer asks first, qhfast's default and fused paths against torch's and qhoptim
QUICK_ROWS = (
    "qhfast QHM fp32 (default)", "qhfast QHM fp32 fused",
    "qhfast QHAdam fp32 (default)", "qhfast QHAdam fp32 fused",
    "qhfast QHAdam bf16 master (default)", "qhfast QHAdam bf16 master fused",
    "qhfast QHAdam bf16 stochastic+bf16-state (default)",
    "torch SGD momentum fp32 loop (default)", "torch SGD momentum fp32 fused",
    "torch Adam fp32 loop (default)", "torch Adam fp32 fused",
    "torch Adam bf16 loop (default)", "torch Adam bf16 fused",
    # on a GPU the defaults are foreach (qhfast's and torch's)
    "qhfast QHM fp32 foreach (default)", "qhfast QHAdam fp32 foreach (default)",
    "qhfast QHAdam bf16 master foreach (default)",
    "qhfast QHAdam bf16 stochastic+bf16-state foreach (default)",
    "torch SGD momentum fp32 foreach (default)", "torch Adam fp32 foreach (default)",
    "torch Adam bf16 foreach (default)",
    "torch Adam fp32 loop", "torch SGD momentum fp32 loop",
    "qhfast QHM fp32 CUDA graph", "qhfast QHAdam fp32 CUDA graph", "torch Adam fp32 fused CUDA graph",
    "qhoptim 1.1.0 QHM fp32", "qhoptim 1.1.0 QHAdam fp32",
)


def fp32_twin(name: str) -> str:
    """The row with fp32 parameters and state on the same path as ``name`` (the row whose
    effective bandwidth a precision variant is measured against): its dtype tag replaced."""
    tags = sorted({tag for tag, _, _ in PRECISION_VARIANTS} | set(DTYPES), key=len, reverse=True)
    for tag in tags:
        if f" {tag} " in f"{name} ":
            return f"{name} ".replace(f" {tag} ", " fp32 ", 1).rstrip()
    return name


def fix_malloc_placement() -> str:
    """Keep glibc's allocator from deciding a comparison. After a large tensor is freed, glibc
    raises its mmap threshold and serves later tensors from the heap, one after another at
    addresses that coincide modulo 2 MiB, where the same streaming step runs ~40% slower (the
    bytes issue measured it); which rows got such tensors would then depend on the order of the
    rows. A fixed threshold (64 KiB, as ``MALLOC_MMAP_THRESHOLD_=65536`` would set) gives every
    large tensor its own mapping. Returns what was done, for the results."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = libc.mallopt(-3, 65536) == 1  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        done = False
    return ("glibc's mmap threshold fixed at 64 KiB (mallopt, as MALLOC_MMAP_THRESHOLD_=65536)"
            if done else "the allocator as it is (no glibc mallopt)")


def rows(device: str, fused: bool = True, every_fused: bool = False, full: bool = True) -> list[Row]:
    """The rows of the table (``full``: every one, else ``QUICK_ROWS``). ``(default)`` marks
    each library's default path (no ``foreach`` or ``fused`` flag: qhfast's is its C kernel on
    the CPU, foreach on a GPU); the precision variant is named before it."""
    accelerator = device != "cpu"
    qhfast_modes = [("(default)", {}), ("per-tensor", dict(foreach=False)),
                    ("foreach", dict(foreach=True))]
    if accelerator:  # the default is foreach: no row of its own
        qhfast_modes = [("per-tensor", dict(foreach=False)), ("foreach (default)", dict(foreach=True))]
    if fused:
        qhfast_modes.append(("fused", dict(fused=True)))
    table: list[Row] = []
    for tag, dtype, options in PRECISION_VARIANTS:
        for mode, flags in qhfast_modes:
            suffix = f"{tag} {mode}"
            once = "fused" in flags
            if tag not in QHADAM_ONLY:
                table.append(Row(f"qhfast QHM {suffix}", dtype, once=once,
                                 make=lambda p, k={**QHM_SETTINGS, **flags, **options}: qhfast.QHM(p, **k)))
            table.append(Row(f"qhfast QHAdam {suffix}", dtype, once=once,
                             make=lambda p, k={**QHADAM_SETTINGS, **flags, **options}: qhfast.QHAdam(p, **k)))
            if tag == "fp32":
                table.append(Row(f"qhfast QHAdamW {suffix}", dtype, once=once,
                                 make=lambda p, k={**QHADAM_SETTINGS, **flags}: qhfast.QHAdamW(
                                     p, weight_decay=0.01, **k)))
            if tag == "fp32" and "default" in mode:
                table.append(Row(f"qhfast QHAdam nus=(1,1) {suffix}", dtype,
                                 make=lambda p, k=flags: qhfast.QHAdam(p, lr=1e-3, **k)))
    for tag, dtype in DTYPES.items():
        for mode, flags in (("loop", dict(foreach=False)), ("foreach", dict(foreach=True)),
                            ("fused", dict(fused=True))):
            default = " (default)" if flags.get("foreach") == accelerator else ""
            table.append(Row(f"torch SGD momentum {tag} {mode}{default}", dtype,
                             lambda p, k=flags: torch.optim.SGD(p, lr=0.1, momentum=0.9, **k)))
            table.append(Row(f"torch Adam {tag} {mode}{default}", dtype,
                             lambda p, k=flags: torch.optim.Adam(p, lr=1e-3, **k)))
            table.append(Row(f"torch AdamW {tag} {mode}{default}", dtype,
                             lambda p, k=flags: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, **k)))
    if device == "cuda":
        for tag, dtype, options in PRECISION_VARIANTS:
            if tag not in GRAPHED_VARIANTS:
                continue
            table.append(Row(f"qhfast QHM {tag} CUDA graph", dtype, once=True, graph=True,
                             make=lambda p, k={**QHM_SETTINGS, **options}: qhfast.QHM(
                                 p, capturable=True, **k)))
            table.append(Row(f"qhfast QHAdam {tag} CUDA graph", dtype, once=True, graph=True,
                             make=lambda p, k={**QHADAM_SETTINGS, **options}: qhfast.QHAdam(
                                 p, capturable=True, **k)))
        table.append(Row("torch Adam fp32 fused CUDA graph", torch.float32, once=True, graph=True,
                         make=lambda p: torch.optim.Adam(p, lr=1e-3, fused=True, capturable=True)))
    if accelerator and fused and not every_fused:
        table = [row for row in table if not row.once or row.graph
                 or any(row.name == f"qhfast {kind} fused" for kind in DEFAULT_FUSED)]
    oracle = qhoptim_classes()
    for name, settings in (("QHM", QHM_SETTINGS), ("QHAdam", QHADAM_SETTINGS)):
        table.append(Row(f"qhoptim 1.1.0 {name} fp32", torch.float32,
                         (lambda p, c=oracle[name], k=settings: c(p, **k)) if oracle else None))
    table += peer_8bit_rows()
    if not full:
        table = [row for row in table if row.name in QUICK_ROWS]
    return table


# --------------------------------------------------------------------------------------------
# measuring


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step: Callable[[], object], steps: int, warmup: int, device: str) -> list[float]:
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def graphed(step: Callable[[], object]) -> Callable[[], object]:
    """The step captured in a CUDA graph (after warm-up steps on a side stream): its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def parameter_count(optimizer: torch.optim.Optimizer) -> int:
    return sum(p.numel() for g in optimizer.param_groups for p in g["params"])


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Optimizer state (moments, masters, compensations, counters) in bytes per parameter
    element, exact: the storages behind the state's tensors, each once (a tensor subclass,
    as torchao's 8-bit state, counted by the tensors it holds; a table that several states
    share, as bitsandbytes' code maps, once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) for t in _plain_tensors(v)}
    return sum(storages.values()) / parameter_count(optimizer)


def _plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold ``tensor``'s data: itself, or those inside a tensor
    subclass (torchao's 8-bit state: codes and scales inside a tensor of the logical dtype)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not is_traceable_wrapper_subclass(tensor):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [t for name in names for t in _plain_tensors(getattr(tensor, name))]


def _bytes(tensor: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in _plain_tensors(tensor))


def traffic_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Bytes a step must move per parameter element, at the least: read the gradient, read and
    write every state tensor in its own dtype (moments, an fp32 master, a Kahan compensation),
    write the parameter, and read it too unless an fp32 master stands in for it (modes without
    a master, "kahan", "stochastic" and "nearest", read it). Random bits for stochastic
    rounding are made, not moved: a fused kernel draws them in registers. 0-d counters are
    negligible and left out."""
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            tensors = [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
            param_passes = 1 if MASTER_KEY in state else 2
            total += p.grad.numel() * p.grad.element_size() + param_passes * p.numel() * p.element_size()
            total += 2 * sum(_bytes(v) for v in tensors)
    return total / parameter_count(optimizer)


def peak_step_bytes(step: Callable[[], object], device: str) -> int | None:
    """The most memory one step holds at once beyond what existed before it (temporaries): the
    CUDA allocator's peak on a GPU; on a CPU, the running sum of the profiler's allocation
    events (None where this torch's profiler does not expose them)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        tree = prof.profiler.kineto_results.experimental_event_tree()
    except (ImportError, AttributeError, RuntimeError):
        return None
    sizes = []
    pending = list(tree)
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        if node.tag == _EventType.Allocation:
            sizes.append((node.start_time_ns, node.typed[1].alloc_size))
    held = peak = 0
    for _, size in sorted(sizes):
        held += size
        peak = max(peak, held)
    return peak


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ side prints a line per start and stop)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class StreamBandwidth:
    """Memory bandwidth in GB/s from two streams over buffers far larger than any cache:
    ``copy`` (dst ← src: 2 bytes moved per byte) and ``update`` (x ← x + y: 3 per byte, the
    read-modify-write pattern of an optimizer step). A copy's destination costs the CPU a hidden
    read (write-allocate), so the update stream is often the faster of the two. The buffers are
    made once; ``measure`` is cheap enough to run next to every row (a shared machine's
    bandwidth drifts within a run)."""

    def __init__(self, device: str, megabytes: int = 256) -> None:
        self.device = device
        self.n = megabytes * 2**20 // 4
        self.src = torch.ones(self.n, device=device)
        self.dst = torch.zeros(self.n, device=device)

    def measure(self, repeats: int = 5) -> dict[str, float]:
        result = {}
        for name, op, passes in (("copy", lambda: self.dst.copy_(self.src), 2),
                                 ("update", lambda: self.dst.add_(self.src), 3)):
            times = time_steps(op, repeats, 1, self.device)
            result[name] = passes * self.n * 4 / statistics.median(times) / 1e9
        return result


@dataclass
class Measurement:
    times: list[float] = field(default_factory=list)
    state_bytes: float = 0.0
    traffic_bytes: float = 0.0
    peak_bytes: float | None = None
    compile_seconds: float | None = None
    #: the floor's bandwidth (GB/s, the faster stream) measured just before each of its rounds
    bandwidths: list[float] = field(default_factory=list)
    #: why the row was not measured (its package is missing), else None
    missing: str | None = None


class Runner:
    """Times rows round by round; keeps the optimizers of ``once`` rows between rounds."""

    def __init__(self, shapes, device: str, steps: int, warmup: int) -> None:
        self.shapes, self.device, self.steps, self.warmup = shapes, device, steps, warmup
        self.streams = StreamBandwidth(device)
        #: every stream measurement of the run, by stream
        self.stream_samples: dict[str, list[float]] = {"copy": [], "update": []}
        self.kept: dict[str, tuple[list[torch.Tensor], torch.optim.Optimizer, Callable]] = {}
        self.results: dict[str, Measurement] = {}

    def measure(self, row: Row) -> Measurement:
        result = self.results.setdefault(row.name, Measurement())
        if row.make is None:
            result.missing = row.missing or MISSING
            return result
        streams = self.streams.measure()
        for name, value in streams.items():
            self.stream_samples[name].append(value)
        result.bandwidths.append(max(streams.values()))
        if row.name in self.kept:
            params, optimizer, step = self.kept[row.name]
            warmup = 2
        else:
            params = make_params(self.shapes, row.dtype, self.device)
            optimizer = row.make(params)
            step = optimizer.step
            warmup = self.warmup
            if row.once:  # the first step compiles (or captures): time it alone
                synchronize(self.device)
                start = time.perf_counter()
                step()
                if row.graph:
                    step = graphed(step)
                    step()
                synchronize(self.device)
                result.compile_seconds = time.perf_counter() - start
                self.kept[row.name] = (params, optimizer, step)
        first = not result.times
        result.times += time_steps(step, self.steps, warmup, self.device)
        if first:
            peak = None if row.graph else peak_step_bytes(step, self.device)
            result.peak_bytes = None if peak is None else peak / parameter_count(optimizer)
            result.state_bytes = state_bytes_per_param(optimizer)
            result.traffic_bytes = traffic_bytes_per_param(optimizer)
        return result


def quartiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) < 2:
        return times[0], times[0], times[0]
    q1, median, q3 = statistics.quantiles(times, n=4)
    return q1, median, q3
