"""bf16/fp16 parameters: fp32 master copies and fp32 state."""

import io

import pytest
import torch

import qhfast
from helpers import PATHS, OPTIMIZERS, Problem, assert_same, max_relative_error, run

LOW = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_master_update_is_exactly_the_fp32_update(name, dtype, foreach):
    """Given the same (upcast) gradients, the master follows the fp32 optimizer bit for bit,
    and the low-precision param is the master rounded once."""
    problem = Problem()
    params = problem.params(dtype)
    reference = [p.detach().float().requires_grad_() for p in params]
    optimizer = OPTIMIZERS[name](params, weight_decay=0.05, foreach=foreach)
    fp32_optimizer = OPTIMIZERS[name](reference, weight_decay=0.05, foreach=foreach)
    for t in range(30):
        problem.set_grads(params, t)
        for p, r in zip(params, reference):
            r.grad = None if p.grad is None else p.grad.float()
        optimizer.step()
        fp32_optimizer.step()
        for p, r in zip(params, reference):
            if optimizer.state[p]:
                master = optimizer.state[p]["master_param"]
                assert master.dtype == torch.float32
                assert torch.equal(master, r)
                assert torch.equal(p, master.to(dtype))


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_low_precision_run_tracks_the_fp32_run(name, dtype):
    """A whole bf16/fp16 run (gradients computed from the rounded params) stays within
    finfo(dtype).eps (relative to the largest element) of the fp32 run: the stored param alone
    carries a rounding of up to eps/2, and on this contracting problem the gradients evaluated
    at rounded params add a drift below another eps/2 (measured: about 0.4 eps). Without masters
    the updates themselves are rounded each step and the run drifts further."""
    expected = run(lambda p: OPTIMIZERS[name](p), 300, dtype=torch.float32)
    with_masters = run(lambda p: OPTIMIZERS[name](p), 300, dtype=dtype)
    without_masters = run(lambda p: OPTIMIZERS[name](p, master_weights=False), 300, dtype=dtype)
    error = max_relative_error(expected, with_masters)
    assert error < torch.finfo(dtype).eps
    assert error < max_relative_error(expected, without_masters)


@pytest.mark.parametrize("foreach", PATHS)
def test_bf16_small_updates_accumulate(foreach):
    """bf16 param at 1.0, grad 1.0, QHAdam lr=1e-4 for 100 steps: each update (1e-4) is below
    half a bf16 ulp at 1.0 (2^-9), so rounding every step loses it; the master keeps it."""
    def train(make, dtype, **kwargs):
        p = torch.ones(4, dtype=dtype, requires_grad=True)
        optimizer = make([p], lr=1e-4, **kwargs)
        for _ in range(100):
            p.grad = torch.ones_like(p)
            optimizer.step()
        return p.detach(), optimizer

    stuck, _ = train(torch.optim.Adam, torch.bfloat16)
    assert torch.equal(stuck, torch.ones(4, dtype=torch.bfloat16))  # the failure being fixed
    fp32, _ = train(qhfast.QHAdam, torch.float32, foreach=foreach)
    moved, optimizer = train(qhfast.QHAdam, torch.bfloat16, foreach=foreach)
    master = optimizer.state[optimizer.param_groups[0]["params"][0]]["master_param"]
    # fp32 arithmetic of 100 steps of ~1e-4 from 1.0: rounding of at most 100 ulps(1.0) = 6e-6
    assert torch.allclose(master, fp32, rtol=0, atol=1e-5)
    assert torch.equal(moved, fp32.to(torch.bfloat16))
    assert (moved < 1.0).all()
    no_master, _ = train(qhfast.QHAdam, torch.bfloat16, foreach=foreach, master_weights=False)
    assert torch.equal(no_master, stuck)  # the documented trade-off of master_weights=False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_full_precision_params_have_no_master(name, dtype):
    problem = Problem()
    params = problem.params(dtype)
    optimizer = OPTIMIZERS[name](params)
    problem.set_grads(params, 10)
    optimizer.step()
    state = optimizer.state[params[0]]
    assert "master_param" not in state
    buffers = [v for v in state.values() if v.dim() > 0]
    assert all(b.dtype == dtype for b in buffers)
    per_element = sum(b.numel() * b.element_size() for b in buffers) / params[0].numel()
    assert per_element == (1 if name == "QHM" else 2) * torch.finfo(dtype).bits / 8


@pytest.mark.parametrize("master_weights", [True, False])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_low_precision_state_is_fp32(name, master_weights):
    problem = Problem()
    params = problem.params(torch.bfloat16)
    optimizer = OPTIMIZERS[name](params, master_weights=master_weights)
    problem.set_grads(params, 10)
    optimizer.step()
    state = optimizer.state[params[0]]
    assert ("master_param" in state) == master_weights
    assert all(v.dtype in (torch.float32, torch.float64) for v in state.values())
    assert all(v.dtype == torch.float32 for v in state.values() if v.dim() > 0)


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_mixed_precision_group(name, foreach):
    """One group with bf16 and fp32 params (two foreach buckets): each follows its own rule."""
    problem = Problem()
    params = problem.params(torch.float32)
    params[0] = params[0].detach().bfloat16().requires_grad_()
    optimizer = OPTIMIZERS[name](params, foreach=foreach)
    reference = [p.detach().float().requires_grad_() for p in params]
    fp32_optimizer = OPTIMIZERS[name](reference, foreach=foreach)
    for t in range(10):
        problem.set_grads(params, t)
        for p, r in zip(params, reference):
            r.grad = None if p.grad is None else p.grad.float()
        optimizer.step()
        fp32_optimizer.step()
    assert torch.equal(optimizer.state[params[0]]["master_param"], reference[0])
    for p, r in zip(params[1:], reference[1:]):
        assert torch.equal(p, r)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_masters_round_trip_through_state_dict_and_torch_save(name):
    """torch's base load_state_dict casts floating state to the param dtype (bf16 here); qhfast
    keeps masters and moments fp32, bit for bit, and the resumed run equals the original."""
    problem = Problem()
    params = problem.params(torch.bfloat16)
    optimizer = OPTIMIZERS[name](params)
    for t in range(10):
        problem.set_grads(params, t)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    clones = [p.detach().clone().requires_grad_() for p in params]
    restored = OPTIMIZERS[name](clones)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same(restored.state_dict()["state"], optimizer.state_dict()["state"])
    for t in range(10, 20):
        problem.set_grads(params, t)
        problem.set_grads(clones, t)
        optimizer.step()
        restored.step()
    for p, c in zip(params, clones):
        assert torch.equal(p, c)
        assert torch.equal(optimizer.state[p]["master_param"], restored.state[c]["master_param"])
