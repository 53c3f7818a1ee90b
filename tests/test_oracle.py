"""qhfast equals the original qhoptim 1.1.0 (the oracle) in float64.

Tolerance 1e-12 relative: both compute the same rule in float64 with the operations grouped
differently (e.g. one lerp where qhoptim does mul_ then add_), so each step differs by a few
ulps (~1e-16) and, on this contracting problem, 500 steps keep the gap far below 1e-12.
"""

import numpy as np
import pytest
import qhoptim.pyt as oracle
import torch

import qhfast
from helpers import PATHS, INTERMITTENT, Problem, max_relative_error, run, two_groups

STEPS = 500

QHM_CASES = {
    "qh": dict(lr=0.5, momentum=0.9, nu=0.7),
    "sgd_nu0": dict(lr=0.5, momentum=0.9, nu=0.0),
    "momentum_nu1": dict(lr=0.5, momentum=0.8, nu=1.0),
    "nesterov_nu_beta": dict(lr=0.5, momentum=0.9, nu=0.9),
    "grad_decay": dict(lr=0.5, momentum=0.95, nu=0.6, weight_decay=0.05),
    "direct_decay": dict(lr=0.5, momentum=0.9, nu=0.7, weight_decay=0.05, weight_decay_type="direct"),
    "nu_above_one": dict(lr=0.2, momentum=0.5, nu=1.3),
    # qhoptim takes any momentum >= 0 (its from_pid returns some above 1)
    "momentum_above_one": dict(lr=0.1, momentum=1.001, nu=0.7),
}
QHM_SECOND_GROUP = dict(lr=0.3, momentum=0.5, nu=0.4)

QHADAM_CASES = {
    "adam_nus": dict(lr=0.01),
    "qh": dict(lr=0.01, betas=(0.95, 0.998), nus=(0.7, 1.0)),
    "both_nus": dict(lr=0.02, betas=(0.9, 0.99), nus=(0.8, 0.6), eps=1e-6),
    "nu1_zero": dict(lr=0.01, betas=(0.9, 0.999), nus=(0.0, 1.0)),
    "large_eps": dict(lr=0.01, nus=(0.7, 0.9), eps=0.1),
    "coupled_decay": dict(lr=0.01, nus=(0.7, 1.0), weight_decay=0.1),
    "decoupled_decay": dict(lr=0.01, nus=(0.7, 1.0), weight_decay=0.1, decouple_weight_decay=True),
    "beta1_zero": dict(lr=0.01, betas=(0.0, 0.99), nus=(0.5, 1.0)),
    # numpy numbers and arrays, and a decouple_weight_decay of 1: qhoptim takes them
    "numpy_values": dict(lr=np.float64(0.01), betas=np.array([0.9, 0.99]),
                         nus=(np.float64(0.7), np.int64(1)), weight_decay=np.float64(0.1),
                         decouple_weight_decay=1),
}
QHADAM_SECOND_GROUP = dict(lr=0.005, betas=(0.8, 0.95), nus=(0.9, 0.95))


def _compare(oracle_cls, qhfast_cls, kwargs, second, foreach):
    groups = lambda ps: two_groups(ps, second)  # noqa: E731
    expected = run(lambda g: oracle_cls(g, **kwargs), STEPS, groups=groups)
    actual = run(lambda g: qhfast_cls(g, **kwargs, foreach=foreach), STEPS, groups=groups)
    start = Problem().init
    # the problem moves every parameter (otherwise agreement would prove nothing)
    assert max_relative_error(start, expected) > 1e-2
    assert max_relative_error(expected, actual) < 1e-12


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("case", QHM_CASES)
def test_qhm_matches_qhoptim(case, foreach):
    _compare(oracle.QHM, qhfast.QHM, QHM_CASES[case], QHM_SECOND_GROUP, foreach)


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("case", QHADAM_CASES)
def test_qhadam_matches_qhoptim(case, foreach):
    _compare(oracle.QHAdam, qhfast.QHAdam, QHADAM_CASES[case], QHADAM_SECOND_GROUP, foreach)


@pytest.mark.parametrize("foreach", PATHS)
def test_qhadamw_matches_qhoptim(foreach):
    kwargs = dict(lr=0.01, betas=(0.9, 0.99), nus=(0.7, 1.0), weight_decay=0.2)
    _compare(oracle.QHAdamW, qhfast.QHAdamW, kwargs, QHADAM_SECOND_GROUP, foreach)


def test_late_param_starts_its_own_bias_correction():
    """The intermittent param first gets a gradient at step 5: its step count trails."""
    problem = Problem()
    params = problem.params()
    optimizer = qhfast.QHAdam(params, lr=0.01)
    for t in range(10):
        problem.set_grads(params, t)
        optimizer.step()
    beta = 0.9
    weights = [optimizer.state[p]["beta1_weight"].item() for p in params]
    # steps 5..9 minus 6 and 9 (multiples of 3): 3 steps, against 10 for the others
    assert weights[INTERMITTENT] == pytest.approx((1 - beta**3) / (1 - beta), rel=1e-15)
    assert weights[0] == pytest.approx((1 - beta**10) / (1 - beta), rel=1e-15)


@pytest.mark.parametrize("foreach", PATHS)
def test_paths_agree_on_mixed_dtypes(foreach):
    """One group holding float64 and float32 params (two foreach buckets) equals the oracle
    run separately on each dtype."""
    problem = Problem()
    params = problem.params()
    params[1] = params[1].detach().float().requires_grad_()
    optimizer = qhfast.QHAdam(params, lr=0.01, nus=(0.7, 1.0), foreach=foreach)
    reference = [p.detach().clone().requires_grad_() for p in params]
    oracle_opt = oracle.QHAdam(reference, lr=0.01, nus=(0.7, 1.0))
    for t in range(50):
        problem.set_grads(params, t)
        problem.set_grads(reference, t)
        optimizer.step()
        oracle_opt.step()
    assert max_relative_error([reference[1]], [params[1]]) < 1e-5  # float32 param
    others = [0, 2, 3]
    assert max_relative_error([reference[i] for i in others], [params[i] for i in others]) < 1e-12


def _embedding_run(make, sparse, steps=6, scaler=None, in_backward=False):
    """An nn.Embedding (float64) trained on random rows: sparse gradients touch few rows."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(20, 4, sparse=sparse).double()
    optimizer = make(embedding.parameters())
    handle = qhfast.step_in_backward(optimizer) if in_backward else None
    for _ in range(steps):
        if handle is None:
            optimizer.zero_grad()
        loss = (embedding(torch.randint(0, 20, (7,))) ** 2).sum()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if handle is None:
                optimizer.step()
    return embedding.weight.detach()


SPARSE_CASES = {
    "qh": dict(lr=0.1, momentum=0.9, nu=0.7),
    "nu0": dict(lr=0.1, momentum=0.9, nu=0.0),
    "direct_decay": dict(lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.1,
                         weight_decay_type="direct"),
}


@pytest.mark.parametrize("foreach", [None, *PATHS])
@pytest.mark.parametrize("case", SPARSE_CASES)
def test_qhm_with_sparse_gradients_matches_qhoptim(case, foreach):
    """An nn.Embedding(sparse=True): qhoptim's QHM takes its sparse gradients (as
    torch.optim.SGD does), and so does qhfast's, with the same trajectory (the same
    operations: bit for bit)."""
    kwargs = SPARSE_CASES[case]
    expected = _embedding_run(lambda ps: oracle.QHM(ps, **kwargs), sparse=True)
    actual = _embedding_run(lambda ps: qhfast.QHM(ps, **kwargs, foreach=foreach), sparse=True)
    assert max_relative_error(_embedding_run(lambda ps: oracle.QHM(ps, lr=0.0, momentum=0.9,
                                                                   nu=0.7), True), expected) > 1e-2
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("variant", ["coupled_decay", "maximize", "grad_scaler", "in_backward"])
def test_qhm_with_sparse_gradients_equals_it_with_their_dense_copies(variant):
    """What qhoptim cannot do with sparse gradients (coupled decay raises there), and what it
    has not (maximize, GradScaler's scale handed to the step, the step inside backward): each
    equals the run with the same gradients dense, to float64 rounding."""
    kwargs = dict(lr=0.1, momentum=0.9, nu=0.7)
    options = {"coupled_decay": dict(weight_decay=0.1), "maximize": dict(maximize=True)}.get(
        variant, {})
    runs = []
    for sparse in (True, False):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if variant == "grad_scaler" else None
        runs.append(_embedding_run(lambda ps: qhfast.QHM(ps, **kwargs, **options), sparse,
                                   scaler=scaler, in_backward=variant == "in_backward"))
    assert max_relative_error(*runs) < 1e-12
