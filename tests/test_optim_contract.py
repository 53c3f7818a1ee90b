"""The torch.optim behaviours users rely on, for every qhfast optimizer."""

import copy
import io

import expecttest
import pytest
import qhoptim.pyt as oracle
import torch

import qhfast
from helpers import PATHS, OPTIMIZERS, Problem, assert_same, max_relative_error, snapshot



def _steps(optimizer, params, problem, start, count):
    for t in range(start, start + count):
        problem.set_grads(params, t)
        optimizer.step()


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_zero_grads_are_a_no_op(name, foreach):
    params = Problem().params(torch.float32)
    before = [p.detach().clone() for p in params]
    optimizer = OPTIMIZERS[name](params, weight_decay=0.0, foreach=foreach)
    for _ in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
    for b, p in zip(before, params):
        assert torch.equal(b, p)


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_params_without_grads_are_skipped_and_get_no_state(name, foreach):
    problem = Problem()
    params = problem.params()
    untouched = params[2].detach().clone()
    optimizer = OPTIMIZERS[name](params, foreach=foreach)
    for t in range(5):
        problem.set_grads(params, t)
        params[2].grad = None
        optimizer.step()
    assert torch.equal(params[2], untouched)
    assert len(optimizer.state[params[2]]) == 0
    assert not torch.equal(params[0], problem.params()[0])


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_param_group_lr_isolation(name, foreach):
    """A group with lr=1e-28 stays bit-identical while the other group trains."""
    problem = Problem()
    params = problem.params(torch.float32)
    frozen = [p.detach().clone() for p in params[2:]]
    optimizer = OPTIMIZERS[name](
        [{"params": params[:2]}, {"params": params[2:], "lr": 1e-28}], foreach=foreach
    )
    _steps(optimizer, params, problem, 0, 10)
    for f, p in zip(frozen, params[2:]):
        assert torch.equal(f, p)
    assert not torch.equal(params[0], problem.params(torch.float32)[0])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_determinism(name):
    """Load a state_dict into a fresh optimizer over a copy of the params: the next 10 steps
    are bitwise identical to the original's."""
    problem = Problem()
    params = problem.params()
    optimizer = OPTIMIZERS[name](params)
    _steps(optimizer, params, problem, 0, 10)
    clones = [p.detach().clone().requires_grad_() for p in params]
    restored = OPTIMIZERS[name](clones)
    restored.load_state_dict(optimizer.state_dict())
    _steps(optimizer, params, problem, 10, 10)
    _steps(restored, clones, problem, 10, 10)
    assert_same(snapshot(optimizer, params), snapshot(restored, clones))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_load_state_dict_does_not_alias_or_modify_the_saved_dict(name):
    problem = Problem()
    params = problem.params()
    optimizer = OPTIMIZERS[name](params)
    _steps(optimizer, params, problem, 0, 5)
    saved = copy.deepcopy(optimizer.state_dict())
    reference = copy.deepcopy(saved)
    optimizer.load_state_dict(saved)
    _steps(optimizer, params, problem, 5, 5)
    assert_same(saved, reference)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_load_state_dict_without_newer_flags(name):
    """A state_dict from before the torch-style flags existed (or from qhoptim) loads, and the
    groups get the flags' defaults."""
    problem = Problem()
    params = problem.params()
    optimizer = OPTIMIZERS[name](params)
    _steps(optimizer, params, problem, 0, 5)
    saved = copy.deepcopy(optimizer.state_dict())
    for group in saved["param_groups"]:
        for flag in ("foreach", "fused", "maximize", "capturable", "differentiable",
                     "low_precision", "state_dtype"):
            del group[flag]
    restored = OPTIMIZERS[name](params, fused=True, maximize=True)
    restored.load_state_dict(saved)
    group = restored.param_groups[0]
    assert group["foreach"] is None and group["fused"] is None and group["maximize"] is False
    assert group["low_precision"] == "master" and group["state_dtype"] is None
    assert group["capturable"] is False
    _steps(restored, params, problem, 5, 2)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_weights_only_save_and_load(name):
    problem = Problem()
    params = problem.params()
    optimizer = OPTIMIZERS[name](params)
    _steps(optimizer, params, problem, 0, 5)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    restored = OPTIMIZERS[name]([p.detach().clone().requires_grad_() for p in params])
    restored.load_state_dict(loaded)
    assert_same(restored.state_dict()["state"], optimizer.state_dict()["state"])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_deepcopy(name):
    problem = Problem()
    params = problem.params()
    optimizer = OPTIMIZERS[name](params)
    _steps(optimizer, params, problem, 0, 3)
    duplicate = copy.deepcopy(optimizer)
    assert type(duplicate) is type(optimizer)
    assert_same(duplicate.state_dict(), optimizer.state_dict())
    copied_params = duplicate.param_groups[0]["params"]
    assert copied_params[0] is not params[0] and torch.equal(copied_params[0], params[0])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_hooks_run(name):
    params = Problem().params()
    optimizer = OPTIMIZERS[name](params)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert calls == ["pre", "post"]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_closure_is_called_with_grad_enabled_and_its_loss_returned(name):
    params = Problem().params()
    optimizer = OPTIMIZERS[name](params)

    def closure():
        optimizer.zero_grad()
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss.requires_grad and params[0].grad is not None


@pytest.mark.parametrize(
    "make_scheduler",
    [
        pytest.param(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5), id="StepLR"),
        pytest.param(lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=60), id="OneCycleLR"),
    ],
)
@pytest.mark.parametrize(
    "pair",
    [
        pytest.param((oracle.QHM, qhfast.QHM, dict(lr=0.5, momentum=0.9, nu=0.7)), id="QHM"),
        pytest.param((oracle.QHAdam, qhfast.QHAdam, dict(lr=0.01, nus=(0.7, 1.0))), id="QHAdam"),
    ],
)
def test_lr_schedulers_drive_the_same_trajectory_as_qhoptim(pair, make_scheduler):
    """StepLR and OneCycleLR (which also cycles momentum / betas[0]) change the hyperparameters
    the step uses; qhoptim under the same scheduler is the reference."""
    oracle_cls, qhfast_cls, kwargs = pair
    problem = Problem()
    results = []
    for cls in (oracle_cls, qhfast_cls):
        params = problem.params()
        optimizer = cls(params, **kwargs)
        scheduler = make_scheduler(optimizer)
        lrs = set()
        for t in range(60):
            problem.set_grads(params, t)
            optimizer.step()
            scheduler.step()
            lrs.add(optimizer.param_groups[0]["lr"])
        assert len(lrs) > 5
        results.append([p.detach() for p in params])
    assert max_relative_error(*results) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_grads_are_never_modified(name, foreach, dtype):
    """qhoptim adds the coupled decay into p.grad; qhfast leaves the user's gradient alone,
    also with maximize and upcasting."""
    problem = Problem()
    params = problem.params(dtype)
    optimizer = OPTIMIZERS[name](params, weight_decay=0.1, maximize=True, foreach=foreach)
    for t in range(3):
        problem.set_grads(params, t)
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        optimizer.step()
        for g, p in zip(grads, params):
            assert (g is None and p.grad is None) or torch.equal(g, p.grad)


def test_the_cpu_default_is_the_kernel_and_foreach_false_is_per_tensor(monkeypatch):
    """With no path flags a CPU group takes the fused CPU kernel (no eager chunk runs).
    ``fused=False`` (or the kernel switched off) gives torch's rule: foreach by default only
    when every param is on an accelerator, so per-tensor on the CPU, where tensors are updated
    alone or, small ones, with neighbours up to CACHE_SIZED_CHUNK elements (16 in the tests:
    the problem's 15, 7, 8 and 4 elements make [15], [7, 8], [4]); ``foreach=True`` is one
    chunk."""
    import qhfast._fused

    params = Problem().params()
    optimizer = qhfast.QHAdam(params)
    chunks = []
    original = qhfast.QHAdam._step_chunk
    monkeypatch.setattr(
        qhfast.QHAdam, "_step_chunk",
        lambda self, g, ps, *args: chunks.append(len(ps)) or original(self, g, ps, *args),
    )
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    optimizer.step()
    assert chunks == [] and not any(torch.equal(b, p) for b, p in zip(before, params))
    for flags, expected in ((dict(fused=False), [1, 2, 1]), (dict(foreach=False), [1, 2, 1]),
                            (dict(foreach=True), [len(params)])):
        group = optimizer.param_groups[0]
        group["fused"], group["foreach"] = flags.get("fused"), flags.get("foreach")
        chunks.clear()
        optimizer.step()
        assert chunks == expected, flags
    monkeypatch.setattr(qhfast._fused, "CPU_KERNEL", False)
    group["fused"] = group["foreach"] = None
    chunks.clear()
    optimizer.step()
    assert chunks == [1, 2, 1]


def test_step_counters_are_cpu_float64_tensors():
    """QHAdam's per-parameter step counters (the bias-correction normalizers) are 0-d float64
    tensors on the CPU without capturable: qhoptim's float arithmetic, read without a sync."""
    params = Problem().params(torch.float32)
    optimizer = qhfast.QHAdam(params, betas=(0.5, 0.25))
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    optimizer.step()
    state = optimizer.state[params[0]]
    for key, beta in (("beta1_weight", 0.5), ("beta2_weight", 0.25)):
        counter = state[key]
        assert counter.shape == () and counter.dtype == torch.float64 and counter.device.type == "cpu"
        assert counter.item() == 1.0 + beta


class TestRepr(expecttest.TestCase):
    def test_qhadamw_repr(self):
        optimizer = qhfast.QHAdamW([torch.zeros(2, requires_grad=True)], lr=3e-4, nus=(0.7, 1.0))
        self.assertIsInstance(optimizer, qhfast.QHAdam)
        self.assertExpectedInline(repr(optimizer), """\
QHAdamW (
Parameter Group 0
    betas: (0.9, 0.999)
    capturable: False
    decouple_weight_decay: True
    differentiable: False
    eps: 1e-08
    foreach: None
    fused: None
    low_precision: master
    lr: 0.0003
    maximize: False
    nus: (0.7, 1.0)
    state_dtype: None
    weight_decay: 0.0
)""")

    def test_qhm_repr(self):
        optimizer = qhfast.QHM([torch.zeros(2, requires_grad=True)], lr=1.0, momentum=0.999, nu=0.7)
        self.assertExpectedInline(repr(optimizer), """\
QHM (
Parameter Group 0
    capturable: False
    differentiable: False
    foreach: None
    fused: None
    low_precision: master
    lr: 1.0
    maximize: False
    momentum: 0.999
    nu: 0.7
    state_dtype: None
    weight_decay: 0.0
    weight_decay_type: grad
)""")


def test_per_tensor_chunks_keep_large_tensors_alone_and_group_small_neighbours(monkeypatch):
    import qhfast._base as base

    monkeypatch.setattr(base, "CACHE_SIZED_CHUNK", 1 << 15)
    sizes = [1 << 20, 384, 384, 1536, 1 << 15, 100, 1 << 14, 1 << 14, 1]
    spans = base._cache_sized_spans([torch.empty(n) for n in sizes])
    assert spans == [(0, 1), (1, 4), (4, 5), (5, 7), (7, 9)]
    assert base._cache_sized_spans([torch.empty(3)]) == [(0, 1)]
