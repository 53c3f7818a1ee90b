"""CUDA paths stepped on fake CUDA tensors, on this CPU build of torch.

``FakeTensorMode`` makes ``device="cuda"`` tensors that carry devices, dtypes and shapes but no
data: an op that mixes devices raises, and a read of a value on the host
(``aten._local_scalar_dense``: ``.item()``, ``float(t)``, a Scalar overload given a 0-d tensor)
raises too. ``_HostReads``, pushed inside it, records those reads instead (and stands in for
the few ops a CPU build cannot run on fake CUDA tensors: random draws, and ``copy_`` between
dtypes, which this build refuses before dispatch: ``_DtypeCopies`` steps in there), so a whole
optimizer step runs and says what it read on the host.
"""

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import qhfast

_RANDOM_OPS = {"randint_like", "rand_like", "randn_like", "random_", "uniform_", "normal_",
               "bernoulli_", "exponential_"}


class _HostReads(TorchDispatchMode):
    """Records each host read of a tensor value under a FakeTensorMode (and answers 0 for a
    CUDA tensor, 1 for a CPU one)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[torch.device] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(args[0].device)
            # a CUDA read here is found_inf (0: no skip); CPU step counters are read by design
            return 0.0 if args[0].device.type == "cuda" else 1.0
        name = func.overloadpacket.__name__
        if name == "randint" and kwargs.get("device") is not None:  # a factory: no input
            return torch.empty(args[-1], dtype=kwargs.get("dtype") or torch.int64,
                               device=kwargs["device"])
        if name in _RANDOM_OPS:  # a CPU build has no CUDA generator: an uninitialized result
            out = torch.empty_like(args[0], dtype=kwargs.get("dtype") or args[0].dtype)
            return args[0] if name.endswith("_") else out
        return func(*args, **kwargs)


class _DtypeCopies(TorchFunctionMode):
    """``copy_`` into a fake CUDA tensor of another dtype: this CPU build refuses it before
    any dispatch mode sees it (a device guard), so it becomes a no-op here."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (func is torch.Tensor.copy_ and args[0].device.type == "cuda"
                and args[0].dtype != args[1].dtype):
            return args[0]
        return func(*args, **(kwargs or {}))


CAPTURABLE = {
    "QHAdam": (qhfast.QHAdam, {}),
    "QHAdamW": (qhfast.QHAdamW, dict(weight_decay=0.1)),
    "QHAdam_coupled_nu2": (qhfast.QHAdam, dict(weight_decay=0.1, nus=(0.7, 0.9))),
    "QHM": (qhfast.QHM, dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.1)),
    "QHM_direct": (qhfast.QHM, dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.1,
                                    weight_decay_type="direct")),
}
PRECISION = {
    "fp32": (torch.float32, {}),
    "bf16_master": (torch.bfloat16, dict(low_precision="master")),
    "fp16_master": (torch.float16, dict(low_precision="master")),
    "bf16_kahan_bf16_state": (torch.bfloat16, dict(low_precision="kahan",
                                                   state_dtype=torch.bfloat16)),
    "bf16_nearest": (torch.bfloat16, dict(low_precision="nearest")),
}


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("precision", PRECISION)
@pytest.mark.parametrize("name", CAPTURABLE)
def test_a_capturable_step_under_a_grad_scaler_reads_nothing_on_the_host(name, precision,
                                                                         tensor_lr):
    """capturable=True with GradScaler's ``grad_scale`` and ``found_inf`` (as the scaler hands
    them to a fused-style optimizer): two steps on fake CUDA tensors read no value on the host,
    and every state tensor lives on the parameter's device. (QHAdam's skip guard once passed
    ``found_inf`` where ``_foreach_add_`` took it as a Scalar: one read per step.)"""
    cls, options = CAPTURABLE[name]
    dtype, precision_options = PRECISION[precision]
    with FakeTensorMode(), _DtypeCopies(), _HostReads() as setup:
        p = torch.empty(10, device="cuda", dtype=dtype).requires_grad_()
        p.grad = torch.empty(10, device="cuda", dtype=dtype)
        if tensor_lr:
            options = dict(options, lr=torch.full((), 0.01, device="cuda"))
        optimizer = cls([p], capturable=True, **options, **precision_options)  # checks lr
        optimizer.grad_scale = torch.full((), 2.0**10, device="cuda")
        optimizer.found_inf = torch.full((), 0.0, device="cuda")
        setup.reads.clear()
        with _HostReads() as stepping:
            optimizer.step()
            optimizer.step()
        assert stepping.reads == []
        assert all(value.device.type == "cuda" for value in optimizer.state[p].values())


OPTIMIZERS = {"QHAdam": (qhfast.QHAdam, {}),
              "QHM": (qhfast.QHM, dict(lr=0.1, momentum=0.9, nu=0.7))}
PATHS = {"default": {}, "foreach": dict(foreach=True), "per_tensor": dict(foreach=False),
         "capturable": dict(capturable=True), "fused": dict(fused=True),
         "fused_capturable": dict(fused=True, capturable=True)}
#: the paths that read nothing on the host and keep their counters on the device
_SYNC_FREE = ("capturable", "fused", "fused_capturable")


class _TritonLaunches:
    """Stands in for the Triton kernel module under fake tensors (which have no data to point
    to): each launch checks that every tensor it gets is on CUDA, on the device made current
    (Triton launches on the current device; this CPU build has no device to make current, so
    ``current`` stands in for it), and records its name."""

    ROWS = 11  # triton_kernel.ROWS: a row per role (kernels.triton.ROLES), sizes and offsets

    def __init__(self) -> None:
        self.launches: list[str] = []
        self.current: torch.device | None = None

    @contextlib.contextmanager
    def device_guard(self, device: torch.device):
        before, self.current = self.current, device
        try:
            yield
        finally:
            self.current = before

    def __getattr__(self, name):
        return _Launcher(self, name)


class _Launcher:
    def __init__(self, module: _TritonLaunches, name: str) -> None:
        self.module, self.name = module, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            # on CUDA, and on one device: the table's (the first argument), the bucket's
            assert tensors and tensors[0].device.type == "cuda", self.name
            assert all(t.device == tensors[0].device for t in tensors), self.name
            assert self.module.current == tensors[0].device, self.name
            self.module.launches.append(self.name)
        return launch


@pytest.fixture
def triton_launches(monkeypatch):
    """The Triton plans of qhfast/kernels/triton.py built and run for real, their launches
    stubbed (_TritonLaunches) and their tensors' addresses made up."""
    from qhfast.kernels import triton as plans
    launches = _TritonLaunches()
    monkeypatch.setattr(plans, "_kernel_module", lambda: launches)
    monkeypatch.setattr(plans, "_addresses", lambda tensors: [id(t) for t in tensors])
    monkeypatch.setattr(plans, "available", lambda: True)
    monkeypatch.setattr(plans, "_device_guard", launches.device_guard)
    return launches
MODES = {
    "fp32": (torch.float32, {}),
    "fp32_bf16_state": (torch.float32, dict(state_dtype=torch.bfloat16)),
    "bf16_master": (torch.bfloat16, dict(low_precision="master")),
    "bf16_kahan": (torch.bfloat16, dict(low_precision="kahan")),
    "bf16_stochastic_bf16_state": (torch.bfloat16, dict(low_precision="stochastic",
                                                        state_dtype=torch.bfloat16)),
    "fp16_nearest": (torch.float16, dict(low_precision="nearest")),
    "complex64": (torch.complex64, {}),
    "fp32_8bit_state": (torch.float32, dict(state_dtype="8bit")),
    "bf16_stochastic_8bit_state": (torch.bfloat16, dict(low_precision="stochastic",
                                                        state_dtype="8bit")),
}


def _shape(mode: str) -> tuple[int, ...]:
    """The test's parameter: one with 8-bit moments (2-D, 4096 elements or more) where the
    mode has them."""
    return (50, 100) if "8bit" in mode else (10,)


@pytest.mark.parametrize("scaler", [False, True], ids=["", "grad_scaler"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_cuda_path_keeps_to_its_device_and_its_host_reads(name, path, mode, scaler,
                                                                triton_launches):
    """Three steps and a state_dict round trip on fake CUDA tensors (an op mixing devices
    would raise), with and without GradScaler's (1,)-shaped grad_scale/found_inf: capturable
    and fused (the Triton kernel, its launches stubbed: every tensor it gets is on CUDA) read
    no CUDA value on the host, the other paths at most found_inf once a step (as torch's
    non-fused optimizers); moments, masters and compensations live on the parameter's device,
    and so do the step counters with capturable or fused (else on the CPU, as torch's). Not
    here: differentiable and step_in_backward (autograd on fake CUDA tensors aborts a CPU
    build)."""
    cls, options = OPTIMIZERS[name]
    dtype, mode_options = MODES[mode]
    options = {**options, **PATHS[path], **mode_options}
    with FakeTensorMode(), _DtypeCopies(), _HostReads():
        p = torch.empty(_shape(mode), device="cuda", dtype=dtype).requires_grad_()
        optimizer = cls([p], **options)
        reads = []
        for _ in range(3):
            p.grad = torch.empty(_shape(mode), device="cuda", dtype=dtype)
            if scaler:
                optimizer.grad_scale = torch.full((1,), 2.0**10, device="cuda")
                optimizer.found_inf = torch.full((1,), 0.0, device="cuda")
            with _HostReads() as stepping:
                optimizer.step()
            reads.append(sum(device.type == "cuda" for device in stepping.reads))
        assert reads == [1 if scaler and path not in _SYNC_FREE else 0] * 3
        launches = {"QHAdam": ["advance_normalizers", "qhadam"], "QHM": ["qhm"]}[name]
        assert triton_launches.launches == (launches * 3 if path.startswith("fused") else [])
        resumed = cls([p], **options)
        resumed.load_state_dict(optimizer.state_dict())
        codes = [v for v in optimizer.state[p].values() if v.dtype == torch.uint8]
        assert len(codes) == ("8bit" in mode) * len(optimizer._buffer_keys)
        for state in (optimizer.state[p], resumed.state[p]):
            for key, value in state.items():
                on_device = value.dim() > 0 or path in _SYNC_FREE
                assert value.device.type == ("cuda" if on_device else "cpu"), key


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_step_inside_backward_keeps_to_its_device(name, mode):
    """qhfast.step_in_backward's per-parameter step on fake CUDA tensors, called as the
    post-accumulate-grad hook calls it (autograd itself cannot run on fake CUDA tensors in a
    CPU build): three steps read no CUDA value on the host (QHAdam's CPU counters, by
    design), the gradient is released, moments,
    masters and compensations live on the parameter's device."""
    cls, options = OPTIMIZERS[name]
    dtype, mode_options = MODES[mode]
    with FakeTensorMode(), _DtypeCopies(), _HostReads():
        p = torch.empty(_shape(mode), device="cuda", dtype=dtype).requires_grad_()
        optimizer = cls([p], **options, **mode_options)
        handle = qhfast.step_in_backward(optimizer)
        for _ in range(3):
            p.grad = torch.empty(_shape(mode), device="cuda", dtype=dtype)
            with _HostReads() as stepping:
                handle._step_param(p)
            assert all(device.type == "cpu" for device in stepping.reads)  # counters only
            assert p.grad is None
        handle.remove()
        for key, value in optimizer.state[p].items():
            assert value.device.type == ("cuda" if value.dim() > 0 else "cpu"), key


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_fused_step_on_a_second_gpu_gets_its_tensors_there(name, triton_launches):
    """Parameters on cuda:1 with GradScaler's tensors and a tensor lr on cuda:0 (the scaler's
    device): every launch gets all its tensors on cuda:1 (copied, as torch's fused optimizers
    copy found_inf per device), and reads nothing on the host."""
    cls, options = OPTIMIZERS[name]
    with FakeTensorMode(), _DtypeCopies(), _HostReads():
        p = torch.empty(10, device="cuda:1").requires_grad_()
        optimizer = cls([p], **{**options, "lr": torch.full((), 0.01, device="cuda:0")},
                        fused=True)
        for _ in range(2):
            p.grad = torch.empty(10, device="cuda:1")
            optimizer.grad_scale = torch.full((1,), 2.0**10, device="cuda:0")
            optimizer.found_inf = torch.full((1,), 0.0, device="cuda:0")
            with _HostReads() as stepping:
                optimizer.step()
            assert stepping.reads == []
        assert triton_launches.launches and all(
            value.device == p.device for value in optimizer.state[p].values())


class _HostCopies(_HostReads):
    """:class:`_HostReads` that also records each copy from host memory to a GPU:
    (non_blocking, whether its source was made with pin_memory=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.pinned: list[torch.Tensor] = []  # (kept alive: their ids stay theirs)
        self.copies: list[tuple[bool, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        source, target = ((args[0], kwargs.get("device")) if name == "_to_copy"
                          else (args[1], args[0].device) if name == "copy_" else (None, None))
        if (source is not None and target is not None and source.device.type == "cpu"
                and torch.device(target).type == "cuda"):
            non_blocking = kwargs.get("non_blocking", len(args) > 2 and args[2])
            self.copies.append((bool(non_blocking), any(source is t for t in self.pinned)))
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if kwargs.get("pin_memory") or (name == "detach" and any(args[0] is t for t in
                                                                 self.pinned)):
            self.pinned.append(out)  # (torch detaches what it pinned)
        return out


@pytest.mark.parametrize("capturable", [False, True], ids=["", "capturable"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_fused_step_copies_its_tables_to_the_gpu_without_a_sync(name, capturable,
                                                                  triton_launches):
    """The Triton plan copies its tables to the GPU when it is made and when the gradients
    move (``zero_grad()`` drops them, backward makes new ones where the allocator says):
    asynchronously, from pinned memory. From pageable memory torch's copy makes the host wait
    for the device, every step whose gradients moved, and CUDA graph capture refuses it."""
    cls, options = OPTIMIZERS[name]
    with FakeTensorMode(), _DtypeCopies(), _HostReads():
        p = torch.empty(10, device="cuda").requires_grad_()
        optimizer = cls([p], **options, fused=True, capturable=capturable)
        grads = []  # kept: the fake addresses are ids, which a freed tensor's successor reuses
        with _HostCopies() as copying:
            for _ in range(3):
                p.grad = torch.empty(10, device="cuda")
                grads.append(p.grad)
                optimizer.step()
        assert len(copying.copies) == 4  # the plan's two tables, then the moved gradients'
        assert all(copy == (True, True) for copy in copying.copies), copying.copies


@pytest.mark.parametrize("path", ["capturable", "fused", "fused_capturable"])
def test_tensor_eps_and_weight_decay_are_read_once_not_at_each_step(path, triton_launches):
    """eps and weight_decay given as 1-element CUDA tensors (the constructor takes them) are
    read once when the group is made: the update takes them as floats, and read at each step
    they were a host read on the sync-free paths (an error inside CUDA graph capture)."""
    with FakeTensorMode(), _DtypeCopies(), _HostReads():
        p = torch.empty(10, device="cuda").requires_grad_()
        optimizer = qhfast.QHAdamW([p], eps=torch.full((), 1e-8, device="cuda"),
                                   weight_decay=torch.full((), 0.1, device="cuda"),
                                   **PATHS[path])
        optimizer.add_param_group({"params": [torch.empty(10, device="cuda").requires_grad_()],
                                   "weight_decay": torch.full((1,), 0.1, device="cuda")})
        assert all(not isinstance(group[key], torch.Tensor) for group in optimizer.param_groups
                   for key in ("eps", "weight_decay"))
        for _ in range(2):
            for group in optimizer.param_groups:
                group["params"][0].grad = torch.empty(10, device="cuda")
            with _HostReads() as stepping:
                optimizer.step()
            assert stepping.reads == []
