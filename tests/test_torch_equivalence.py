"""Special cases of QH equal torch.optim's optimizers, in float64.

QHM's buffer is dampened, so torch SGD momentum with lr η is QHM with lr η/(1-β). Tolerance 1e-12
relative, for the same reason as the oracle tests: the same rule in float64, grouped differently.
"""

import pytest
import torch

import qhfast
from helpers import PATHS, Problem, max_relative_error, run

STEPS = 300
MAXIMIZE = [pytest.param(False, id="minimize"), pytest.param(True, id="maximize")]


def _assert_equivalent(make_torch, make_qhfast, steps=STEPS):
    expected = run(make_torch, steps)
    actual = run(make_qhfast, steps)
    assert max_relative_error(Problem().init, expected) > 1e-2
    assert max_relative_error(expected, actual) < 1e-12


def _steps(maximize):
    """With maximize both optimizers climb the convex problem and grow geometrically; 40 steps
    keep the values finite while still comparing many steps."""
    return 40 if maximize else STEPS


@pytest.mark.parametrize("maximize", MAXIMIZE)
@pytest.mark.parametrize("foreach", PATHS)
def test_qhm_nu1_is_sgd_momentum(foreach, maximize):
    lr, beta, wd = 0.05, 0.9, 0.01
    _assert_equivalent(
        lambda p: torch.optim.SGD(p, lr=lr, momentum=beta, weight_decay=wd, maximize=maximize),
        lambda p: qhfast.QHM(p, lr=lr / (1 - beta), momentum=beta, nu=1.0, weight_decay=wd,
                             maximize=maximize, foreach=foreach),
        _steps(maximize),
    )


@pytest.mark.parametrize("maximize", MAXIMIZE)
@pytest.mark.parametrize("foreach", PATHS)
def test_qhm_nu_beta_is_sgd_nesterov(foreach, maximize):
    lr, beta, wd = 0.05, 0.9, 0.01
    _assert_equivalent(
        lambda p: torch.optim.SGD(p, lr=lr, momentum=beta, nesterov=True, weight_decay=wd,
                                  maximize=maximize),
        lambda p: qhfast.QHM(p, lr=lr / (1 - beta), momentum=beta, nu=beta, weight_decay=wd,
                             maximize=maximize, foreach=foreach),
        _steps(maximize),
    )


@pytest.mark.parametrize("maximize", MAXIMIZE)
@pytest.mark.parametrize("foreach", PATHS)
def test_qhm_nu0_is_sgd(foreach, maximize):
    _assert_equivalent(
        lambda p: torch.optim.SGD(p, lr=0.3, weight_decay=0.01, maximize=maximize),
        lambda p: qhfast.QHM(p, lr=0.3, momentum=0.9, nu=0.0, weight_decay=0.01,
                             maximize=maximize, foreach=foreach),
        _steps(maximize),
    )


@pytest.mark.parametrize("maximize", MAXIMIZE)
@pytest.mark.parametrize("foreach", PATHS)
def test_qhadam_unit_nus_is_adam(foreach, maximize):
    kwargs = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05, maximize=maximize)
    _assert_equivalent(
        lambda p: torch.optim.Adam(p, **kwargs),
        lambda p: qhfast.QHAdam(p, nus=(1.0, 1.0), foreach=foreach, **kwargs),
        _steps(maximize),
    )


@pytest.mark.parametrize("maximize", MAXIMIZE)
@pytest.mark.parametrize("foreach", PATHS)
def test_qhadamw_unit_nus_is_adamw(foreach, maximize):
    kwargs = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, maximize=maximize)
    _assert_equivalent(
        lambda p: torch.optim.AdamW(p, **kwargs),
        lambda p: qhfast.QHAdamW(p, nus=(1.0, 1.0), foreach=foreach, **kwargs),
        _steps(maximize),
    )
