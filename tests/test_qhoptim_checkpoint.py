"""A checkpoint written by qhoptim 1.1.0 loads into qhfast and continues the same trajectory.

qhoptim's QHAdam state holds ``beta1_weight``/``beta2_weight`` as Python floats; qhfast keeps
the same normalizers as tensors, so nothing is approximated: 1e-12 relative, as the oracle tests.
"""

import io

import pytest
import qhoptim.pyt as oracle
import torch

import qhfast
from helpers import PATHS, Problem, max_relative_error

CASES = {
    "QHM": (oracle.QHM, qhfast.QHM, dict(lr=0.5, momentum=0.9, nu=0.7, weight_decay=0.01)),
    "QHAdam": (oracle.QHAdam, qhfast.QHAdam, dict(lr=0.01, betas=(0.9, 0.99), nus=(0.7, 0.9))),
    "QHAdamW": (oracle.QHAdamW, qhfast.QHAdamW, dict(lr=0.01, nus=(0.7, 1.0), weight_decay=0.1)),
}


def _train(optimizer, params, problem, steps):
    for t in steps:
        problem.set_grads(params, t)
        optimizer.step()


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("name", CASES)
def test_qhoptim_checkpoint_continues_the_same_trajectory(name, foreach):
    oracle_cls, qhfast_cls, kwargs = CASES[name]
    problem = Problem()
    params = problem.params()
    original = oracle_cls(params, **kwargs)
    _train(original, params, problem, range(100))  # the intermittent param lags in its state

    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    at_checkpoint = [p.detach().clone() for p in params]
    resumed_params = [p.clone().requires_grad_() for p in at_checkpoint]
    resumed = qhfast_cls(resumed_params, **kwargs, foreach=foreach)
    resumed.load_state_dict(checkpoint)
    _train(original, params, problem, range(100, 300))
    _train(resumed, resumed_params, problem, range(100, 300))

    assert max_relative_error(params, resumed_params) < 1e-12
    # the loaded state mattered: fresh state from the same params ends elsewhere
    fresh_params = [p.clone().requires_grad_() for p in at_checkpoint]
    _train(qhfast_cls(fresh_params, **kwargs), fresh_params, problem, range(100, 300))
    assert max_relative_error(params, fresh_params) > 1e-6


def test_qhoptim_qhadam_state_becomes_tensor_counters():
    problem = Problem()
    params = problem.params()
    original = oracle.QHAdam(params, lr=0.01)
    _train(original, params, problem, range(10))
    resumed = qhfast.QHAdam(params, lr=0.01)
    resumed.load_state_dict(original.state_dict())
    state = resumed.state[params[0]]
    assert set(state) == {"exp_avg", "exp_avg_sq", "beta1_weight", "beta2_weight"}
    assert isinstance(state["beta1_weight"], torch.Tensor)
    assert state["beta1_weight"].item() == original.state[params[0]]["beta1_weight"]
