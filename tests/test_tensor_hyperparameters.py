"""lr, momentum, nu, betas and nus may be 0-d tensors: same trajectory as floats, on both the
float path (CPU tensors are read as floats) and the device path (capturable: kept as tensors)."""

import pytest
import torch

import qhfast
from helpers import PATHS, Problem, max_relative_error, run

def T(value):  # noqa: N802 - float64, so the tensor holds exactly the float's value
    return torch.tensor(value, dtype=torch.float64)

CASES = {
    "QHM": (qhfast.QHM, dict(lr=0.5, momentum=0.9, nu=0.7), dict(lr=T(0.5), momentum=T(0.9), nu=T(0.7))),
    "QHAdam": (
        qhfast.QHAdam,
        dict(lr=0.01, betas=(0.9, 0.99), nus=(0.7, 0.8)),
        dict(lr=T(0.01), betas=(T(0.9), T(0.99)), nus=(T(0.7), T(0.8))),
    ),
    "QHAdamW": (
        qhfast.QHAdamW,
        dict(lr=0.01, nus=(0.7, 1.0), weight_decay=0.1),
        dict(lr=T(0.01), nus=(T(0.7), T(1.0)), weight_decay=0.1),
    ),
}


@pytest.mark.parametrize("capturable", [False, True], ids=["float_path", "device_path"])
@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("name", CASES)
def test_tensor_hyperparameters_give_the_float_trajectory(name, foreach, capturable):
    """float64 tensors, 1e-12 relative: the device path groups the same float64 operations
    differently (e.g. (1-w)·x + w·y instead of lerp)."""
    cls, floats, tensors = CASES[name]
    expected = run(lambda p: cls(p, **floats, foreach=foreach), 300)
    actual = run(lambda p: cls(p, **tensors, foreach=foreach, capturable=capturable), 300)
    assert max_relative_error(expected, actual) < 1e-12


@pytest.mark.parametrize("capturable", [False, True], ids=["float_path", "device_path"])
def test_scheduler_updates_a_tensor_lr_in_place(capturable):
    """torch's schedulers fill_ a tensor lr: the step sees each new value, like a float lr."""
    problem = Problem()
    results = []
    for lr in (0.01, torch.tensor(0.01, dtype=torch.float64)):
        params = problem.params()
        optimizer = qhfast.QHAdam(params, lr=lr, nus=(0.7, 1.0), capturable=capturable)
        lr_object = optimizer.param_groups[0]["lr"]
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        for t in range(30):
            problem.set_grads(params, t)
            optimizer.step()
            scheduler.step()
        if isinstance(lr, torch.Tensor):
            assert optimizer.param_groups[0]["lr"] is lr_object  # updated in place
        assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(0.01 * 0.5**10)
        results.append([p.detach() for p in params])
    assert max_relative_error(*results) < 1e-12


def test_capturable_tensor_hyperparameter_on_another_device_raises_and_changes_nothing():
    """With capturable=True a tensor hyperparameter must live with the params (a CPU value
    would be baked into a CUDA graph). The meta device stands in for another device here."""
    from helpers import assert_same, snapshot

    problem = Problem()
    params = problem.params()
    optimizer = qhfast.QHAdam(params, lr=torch.tensor(0.01), capturable=True)
    optimizer.param_groups[0]["lr"] = torch.tensor(0.01, device="meta")  # set after validation
    problem.set_grads(params, 3)
    tensors = lambda: {k: v for k, v in snapshot(optimizer, params).items() if k != "groups"}  # noqa: E731
    before = tensors()
    with pytest.raises(RuntimeError, match="capturable=True needs tensor hyperparameters on the "
                                           "parameters' device: lr is on meta, the parameters on cpu"):
        optimizer.step()
    assert_same(tensors(), before)
