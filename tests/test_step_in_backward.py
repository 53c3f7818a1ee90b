"""qhfast.step_in_backward: each parameter steps inside backward() and its gradient is freed.

The reference is the ordinary loop on the same optimizer class: zero_grad(), backward(), step(),
scheduler.step(). On the per-tensor and foreach paths on the CPU the trajectories, states and
state_dicts must be equal bit for bit (the same per-tensor kernels, in another order).
"""

import copy
import warnings

import pytest
import torch

import qhfast
from helpers import OPTIMIZERS, PATHS, assert_same

STEPS = 8


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "body": torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)),
        "branch": torch.nn.Linear(6, 3),  # used on some steps only: its counters lag behind
    })
    return model.to(dtype)


def _loss(model, step):
    gen = torch.Generator().manual_seed(step)
    dtype = next(model.parameters()).dtype
    x, y = torch.randn(5, 6, generator=gen).to(dtype), torch.randn(5, 3, generator=gen).to(dtype)
    out = model["body"](x)
    if step % 3 == 1:
        out = out + model["branch"](x)
    return torch.nn.functional.mse_loss(out.float(), y.float())


def _groups(model):
    """Two groups with different hyperparameters (lr, weight decay)."""
    return [{"params": list(model["body"].parameters())},
            {"params": list(model["branch"].parameters()), "lr": 0.003, "weight_decay": 0.2}]


def _train(name, released, foreach=False, dtype=torch.float64, reload_at=None):
    """STEPS steps with a StepLR schedule; at ``reload_at``, the optimizer loads its own
    state_dict (torch rebuilds the param group dicts, which the hooks must follow)."""
    model = _model(dtype)
    optimizer = OPTIMIZERS[name](_groups(model), foreach=foreach)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    handle = qhfast.step_in_backward(optimizer) if released else None
    for t in range(STEPS):
        if t == reload_at:
            optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        if not released:
            optimizer.zero_grad()
        _loss(model, t).backward()
        if not released:
            optimizer.step()
        scheduler.step()
    if handle is not None:
        assert all(p.grad is None for p in model.parameters())
        handle.remove()
    return model, optimizer


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_trajectory_and_state_equal_the_ordinary_step_bitwise(name, foreach):
    with warnings.catch_warnings():  # e.g. the scheduler's "lr_scheduler.step() before optimizer.step()"
        warnings.simplefilter("error")
        expected_model, expected = _train(name, released=False, foreach=foreach)
        actual_model, actual = _train(name, released=True, foreach=foreach)
    assert any(not torch.equal(p, q) for p, q in zip(_model().parameters(), expected_model.parameters()))
    assert_same([p.detach() for p in expected_model.parameters()],
                [p.detach() for p in actual_model.parameters()])
    assert_same(expected.state_dict(), actual.state_dict())


@pytest.mark.parametrize("name", ["QHM", "QHAdamW"])
def test_bf16_params_with_masters_equal_the_ordinary_step_bitwise(name):
    expected_model, expected = _train(name, released=False, dtype=torch.bfloat16)
    actual_model, actual = _train(name, released=True, dtype=torch.bfloat16)
    assert_same([p.detach() for p in expected_model.parameters()],
                [p.detach() for p in actual_model.parameters()])
    assert_same(expected.state_dict(), actual.state_dict())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_load_state_dict_while_active_keeps_stepping_the_loaded_groups(name):
    expected_model, expected = _train(name, released=False, reload_at=4)
    actual_model, actual = _train(name, released=True, reload_at=4)
    assert_same([p.detach() for p in expected_model.parameters()],
                [p.detach() for p in actual_model.parameters()])
    assert_same(expected.state_dict(), actual.state_dict())


def test_a_param_group_added_while_active_is_stepped_inside_backward():
    model = _model()
    optimizer = OPTIMIZERS["QHAdam"](list(model["body"].parameters()))
    reference = OPTIMIZERS["QHAdam"](list(_model()["body"].parameters()))
    with qhfast.step_in_backward(optimizer):
        optimizer.add_param_group({"params": list(model["branch"].parameters()), "lr": 0.003})
        _loss(model, 1).backward()  # step 1 uses the branch
    assert all(p.grad is None for p in model.parameters())
    for p in model["branch"].parameters():
        assert optimizer.state[p]["beta1_weight"] == 1.0
    assert len(reference.param_groups) == 1


def _peak_bytes(fn) -> int:
    """The most memory held at once during fn() beyond what existed before it (the CPU
    profiler's allocation events, as ``python -m perf`` measures a step's peak)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))
    import step_bench

    peak = step_bench.peak_step_bytes(fn, "cpu")
    assert peak is not None, "the CPU profiler gave no allocation events"
    return peak


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_peak_memory_of_forward_backward_step_falls_by_the_gradients(name):
    """16 square fp32 layers of 256 (4 MiB of gradients), a batch of 4 rows (activations of
    a few KiB): the ordinary step holds every gradient when it runs, the released one about
    one layer's. The drop must be at least 80% of the gradients' bytes (15/16 of them is the
    ideal). The state exists before the measured step (a warm-up step), in both runs."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(256, 256, bias=False) for _ in range(16)]
    model = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.Tanh())])
    x = torch.randn(4, 256)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def train_step(optimizer, released):
        loss = model(x).square().mean()
        loss.backward()
        if not released:
            optimizer.step()
            optimizer.zero_grad()

    peaks = {}
    for released in (False, True):
        optimizer = OPTIMIZERS[name](model.parameters())
        handle = qhfast.step_in_backward(optimizer) if released else None
        train_step(optimizer, released)  # warm-up: state made
        peaks[released] = _peak_bytes(lambda: train_step(optimizer, released))
        if handle is not None:
            handle.remove()
    assert peaks[False] > grad_bytes  # the measurement sees the gradients
    print(f"peak {peaks[False]} -> {peaks[True]} bytes, gradients {grad_bytes}: the drop is "
          f"{(peaks[False] - peaks[True]) / grad_bytes:.1%} of them")
    assert peaks[False] - peaks[True] >= 0.8 * grad_bytes, (peaks, grad_bytes)


# --------------------------------------------------------------------------------------------
# what does not combine with it


def test_step_while_active_raises_and_changes_nothing():
    model = _model()
    optimizer = OPTIMIZERS["QHAdam"](model.parameters())
    handle = qhfast.step_in_backward(optimizer)
    _loss(model, 0).backward()
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # as if someone set gradients by hand
    before = copy.deepcopy((list(model.parameters()), optimizer.state_dict()))
    with pytest.raises(RuntimeError, match=r"QHAdam.step\(\) called while qhfast.step_in_backward "
                                           r"is active: every parameter already stepped"):
        optimizer.step()
    assert_same(before, (list(model.parameters()), optimizer.state_dict()))
    handle.remove()
    optimizer.step()  # removed: the ordinary step works again
    assert not torch.equal(before[0][0], next(model.parameters()))


def test_a_bad_option_set_while_active_raises_before_anything_changes():
    """A typo in a group's low_precision, set between steps, is refused inside backward as
    step() refuses it (it dropped the fp32 masters and raised KeyError), a bogus
    state_dtype is not taken for "8bit", and a flag that is not a boolean
    (``maximize="False"`` would ascend) or a bad hyperparameter is refused too."""
    model = _model().bfloat16()
    optimizer = OPTIMIZERS["QHAdam"](model.parameters())
    handle = qhfast.step_in_backward(optimizer)
    _loss(model, 0).backward()
    for key, value, error, message in (
            ("low_precision", "Master", ValueError, "Invalid low_precision value"),
            ("state_dtype", "bogus", ValueError, "Invalid state_dtype value"),
            ("maximize", "False", TypeError, "Invalid maximize value"),
            ("lr", "0.1", TypeError, "Invalid learning rate"),
            ("betas", (1.5, 0.999), ValueError, "Invalid beta parameter at index 0: 1.5")):
        before = copy.deepcopy((list(model.parameters()), optimizer.state_dict()))
        optimizer.param_groups[0][key] = value
        with pytest.raises(error, match=message):
            _loss(model, 1).backward()
        optimizer.param_groups[0][key] = before[1]["param_groups"][0][key]
        assert_same(before, (list(model.parameters()), optimizer.state_dict()))
    handle.remove()


def test_each_param_keeps_its_kernel_plan_from_one_backward_to_the_next(monkeypatch):
    """Each param steps alone inside backward; the C kernel's plans are kept per param, as
    step() keeps one per group. With one per group, each param's step made its group's plan
    again, checking every tensor: at every backward, for every param."""
    import qhfast._fused as fused

    made = []
    new_plans = fused._new_bucket_plans
    monkeypatch.setattr(fused, "_new_bucket_plans",
                        lambda *args: made.append(1) or new_plans(*args))
    model = _model()
    optimizer = OPTIMIZERS["QHAdam"](model.parameters())
    handle = qhfast.step_in_backward(optimizer)
    _loss(model, 1).backward()  # (steps 1, 4, 7 and 10 use every param)
    _loss(model, 4).backward()  # (the first made state, which drops the plans made before)
    assert made  # the kernel serves them
    made.clear()
    _loss(model, 7).backward()
    _loss(model, 10).backward()
    assert not made
    handle.remove()


def test_hyperparameters_are_checked_again_only_when_they_change(monkeypatch):
    """Each param steps alone inside backward, and step() checks every group at every step:
    a group's hyperparameters are checked again only when one of them is another object (a
    list's elements, since it can change in place: betas given as a list were checked at every
    param's step)."""
    model = _model()
    optimizer = OPTIMIZERS["QHAdam"](model.parameters(), betas=[0.9, 0.999])
    checks = []
    validate = optimizer._validate_group
    monkeypatch.setattr(optimizer, "_validate_group", lambda group: checks.append(1) or validate(group))
    handle = qhfast.step_in_backward(optimizer)
    for t in (1, 4):
        _loss(model, t).backward()
    assert len(checks) == 1
    optimizer.param_groups[0]["betas"][0] = 0.8  # in place
    _loss(model, 7).backward()
    assert len(checks) == 2
    handle.remove()


def test_grad_scaler_step_raises_through_step():
    """GradScaler cannot combine with it (documented): the parameters step inside backward,
    before the scaler checks for infs; its step() then raises instead of stepping twice."""
    model = _model(torch.float32)
    optimizer = OPTIMIZERS["QHAdam"](model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    with qhfast.step_in_backward(optimizer):
        scaler.scale(_loss(model, 0)).backward()
        with pytest.raises(RuntimeError, match="step_in_backward is active"):
            scaler.step(optimizer)


def test_bad_uses_raise_clear_errors():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(TypeError, match="step_in_backward needs a qhfast optimizer .*, got SGD"):
        qhfast.step_in_backward(torch.optim.SGD([p], lr=0.1))
    with pytest.raises(ValueError, match=r"does not support QHAdam with fused=True .*; use fused=False"):
        qhfast.step_in_backward(qhfast.QHAdam([p], fused=True))
    with pytest.raises(ValueError, match=r"does not support QHM with differentiable=True"):
        qhfast.step_in_backward(qhfast.QHM([p], lr=0.1, momentum=0.9, nu=0.7, differentiable=True))
    optimizer = qhfast.QHAdam([p])
    handle = qhfast.step_in_backward(optimizer)
    with pytest.raises(RuntimeError, match="already active for this QHAdam"):
        qhfast.step_in_backward(optimizer)
    q = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="fused=True"):
        optimizer.add_param_group({"params": [q], "fused": True})
    assert len(optimizer.param_groups) == 1
    q.sum().backward()  # not hooked: its gradient stays
    assert q.grad is not None and not optimizer.state
    saved = optimizer.state_dict()
    for flag in ("fused", "differentiable"):  # a checkpoint's group as it would be loaded
        with pytest.raises(ValueError, match=f"{flag}=True"):
            optimizer.load_state_dict({**saved, "param_groups": [
                dict(saved["param_groups"][0], **{flag: True})]})
        assert not optimizer.param_groups[0][flag]
    handle.remove()
    assert not handle.active
    qhfast.step_in_backward(optimizer).remove()  # a new handle once the first is gone


def test_frozen_params_are_not_hooked():
    """A frozen param (``requires_grad`` False: a float one of a frozen layer, or an integer
    one) gets no gradient, as step() skips it: the handle leaves it alone, where it raised
    (no hook can be registered on it), also for a group added while active."""
    model = _model()
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    counter = torch.nn.Parameter(torch.tensor([1, 2]), requires_grad=False)
    optimizer = OPTIMIZERS["QHAdam"]([*model.parameters(), frozen, counter])
    handle = qhfast.step_in_backward(optimizer)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(2),
                                                             requires_grad=False)]})
    body = list(model["body"].parameters())  # (the branch is used on some steps only)
    before = [p.detach().clone() for p in body]
    _loss(model, 0).backward()
    assert all(not torch.equal(p, b) for p, b in zip(body, before))
    assert torch.equal(frozen, torch.ones(3)) and torch.equal(counter, torch.tensor([1, 2]))
    handle.remove()
