"""CUDA paths stepped on fake CUDA tensors, on this CPU build of torch.

``FakeTensorMode`` makes ``device="cuda"`` tensors that carry devices, dtypes and shapes but no
data: an op that mixes devices raises, and a read of a value on the host
(``aten._local_scalar_dense``: ``.item()``, ``float(t)``, a Scalar overload given a 0-d tensor)
raises too. ``_HostReads``, pushed inside it, records those reads instead (and stands in for
the few ops a CPU build cannot run on fake CUDA tensors: random draws, and ``copy_`` between
dtypes, which this build refuses before dispatch: ``_DtypeCopies`` steps in there), so a whole
optimizer step runs and says what it read on the host.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import qhfast

_RANDOM_OPS = {"randint_like", "rand_like", "randn_like", "random_", "uniform_", "normal_",
               "bernoulli_", "exponential_"}


class _HostReads(TorchDispatchMode):
    """Records each host read of a tensor value (and answers 0) under a FakeTensorMode."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[torch.device] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(args[0].device)
            return 0.0
        name = func.overloadpacket.__name__
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
