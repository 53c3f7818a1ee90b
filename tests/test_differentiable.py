"""differentiable=True: gradients flow through several steps, checked with
torch.autograd.gradcheck in float64 the way torch's own test of differentiable optimizers does
it (a function that builds the optimizer from tensors requiring grad, sets its state, steps,
and returns the params and state), here through several steps and with the hyperparameters as
inputs too: the QH terms (nu, nus), the bias correction (betas), lr and momentum.

gradcheck compares autograd's Jacobian with finite differences of the same function; that the
function is the right one (the recorded step computes the ordinary trajectory) is checked
against qhoptim 1.1.0.
"""

import pytest
import qhoptim.pyt as oracle
import torch
from torch.autograd import gradcheck

import qhfast
from helpers import Problem, max_relative_error

STEPS = 3
N = 5
FLAGS = [pytest.param(dict(foreach=False), id="per_tensor"),
         pytest.param(dict(foreach=True), id="foreach"),
         pytest.param(dict(capturable=True), id="capturable")]

#: name -> (class, tensor hyperparameters (name: value), float keyword arguments, moments)
CASES = {
    "QHM-grad-decay": (qhfast.QHM, dict(lr=0.3, momentum=0.8, nu=0.7),
                       dict(weight_decay=0.1), ("momentum_buffer",)),
    "QHM-direct-decay": (qhfast.QHM, dict(lr=0.3, momentum=0.8, nu=1.3),
                         dict(weight_decay=0.1, weight_decay_type="direct", maximize=True),
                         ("momentum_buffer",)),
    "QHAdam": (qhfast.QHAdam, dict(lr=0.1, betas=(0.9, 0.99), nus=(0.7, 0.8)),
               dict(weight_decay=0.1, eps=1e-3), ("exp_avg", "exp_avg_sq")),
    "QHAdamW": (qhfast.QHAdamW, dict(lr=0.1, betas=(0.8, 0.95), nus=(0.6, 1.0)),
                dict(weight_decay=0.2, eps=1e-3), ("exp_avg", "exp_avg_sq")),
}


def _inputs(case, warm):
    """The gradcheck inputs: the initial param, a gradient-noise scale, the moments (if the
    state starts warm), the tensor hyperparameters flattened; all float64, requiring grad."""
    _, hyper, _, moments = CASES[case]
    gen = torch.Generator().manual_seed(0)
    leaf = lambda t: t.to(torch.float64).requires_grad_()  # noqa: E731
    values = [leaf(torch.randn(N, generator=gen)), leaf(torch.rand(N, generator=gen) + 0.5)]
    if warm:
        values += [leaf(torch.rand(N, generator=gen) + (0.1 if key == "exp_avg_sq" else -0.5))
                   for key in moments]
    for value in hyper.values():
        values += [leaf(torch.tensor(v)) for v in (value if isinstance(value, tuple) else (value,))]
    return values


def _unrolled(case, warm, flags):
    """A function of the inputs: STEPS steps from a clone of the param, each with the gradient
    c·θ + scale·noise_t (c > 0: a quadratic; it depends on θ, so every step feeds the next).
    Returns the param and the moments after the last step."""
    cls, hyper, floats, moments = CASES[case]
    gen = torch.Generator().manual_seed(1)
    curvature = torch.rand(N, generator=gen, dtype=torch.float64) + 0.5
    noise = [torch.randn(N, generator=gen, dtype=torch.float64) for _ in range(STEPS)]

    def fn(p0, scale, *rest):
        rest = list(rest)
        state = {key: rest.pop(0).clone() for key in moments} if warm else {}
        kwargs = {}
        for name, value in hyper.items():
            kwargs[name] = tuple(rest.pop(0) for _ in value) if isinstance(value, tuple) else rest.pop(0)
        p = p0.clone()
        optimizer = cls([p], **kwargs, **floats, **flags, differentiable=True)
        if warm:  # counters as after a few steps: their bias correction is under way
            counters = {k: torch.tensor(w, dtype=torch.float64)
                        for k, w in (("beta1_weight", 2.5), ("beta2_weight", 3.5))}
            optimizer.state[p].update({k: v for k, v in counters.items() if k in cls._counter_keys},
                                      **state)
        for t in range(STEPS):
            p.grad = curvature * p + scale * noise[t]
            optimizer.step()
        return (p, *(optimizer.state[p][key] for key in moments))

    return fn


@pytest.mark.parametrize("warm", [False, True], ids=["fresh_state", "warm_state"])
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("case", CASES)
def test_gradcheck_through_several_steps(case, flags, warm):
    assert gradcheck(_unrolled(case, warm, flags), _inputs(case, warm))


@pytest.mark.parametrize("case", CASES)
def test_the_gradient_reaches_every_input(case):
    """Each input's gradient is nonzero: gradcheck would also pass on a function that ignored
    an input (both Jacobians zero), e.g. a hyperparameter read as a float."""
    inputs = _inputs(case, warm=True)
    outputs = _unrolled(case, True, {})(*inputs)
    torch.autograd.backward([o.sum() for o in outputs])
    for i, x in enumerate(inputs):
        assert x.grad is not None and x.grad.abs().sum() > 0, i


ORACLE = {
    "QHM": (oracle.QHM, qhfast.QHM, dict(lr=0.5, momentum=0.9, nu=0.7, weight_decay=0.05)),
    "QHAdam": (oracle.QHAdam, qhfast.QHAdam, dict(lr=0.01, betas=(0.95, 0.998), nus=(0.7, 0.9),
                                                  weight_decay=0.1)),
    "QHAdamW": (oracle.QHAdamW, qhfast.QHAdamW, dict(lr=0.01, nus=(0.7, 0.9), weight_decay=0.1)),
}


# the problem's intermittent parameter has no gradient on some steps: reading the .grad of a
# non-leaf tensor that has none warns
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("name", ORACLE)
def test_the_recorded_trajectory_is_qhoptims(name, flags):
    """100 recorded steps (the graph kept through all of them) equal qhoptim's to 1e-12, and
    the initial values get a gradient through the whole run."""
    oracle_cls, qhfast_cls, kwargs = ORACLE[name]
    problem = Problem()
    expected = problem.params()
    reference = oracle_cls(expected, **kwargs)
    leaves = problem.params()
    params = [x.clone() for x in leaves]
    optimizer = qhfast_cls(params, **kwargs, **flags, differentiable=True)
    for t in range(100):
        problem.set_grads(expected, t)
        reference.step()
        problem.set_grads(params, t)
        optimizer.step()
    assert max_relative_error(Problem().init, [p.detach() for p in expected]) > 1e-2
    assert max_relative_error([p.detach() for p in expected], [p.detach() for p in params]) < 1e-12
    sum(p.sum() for p in params).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)


def test_a_complex_param_is_differentiable():
    """Complex params step on real views, recorded too (gradcheck on complex inputs)."""
    noise = torch.randn(3, dtype=torch.complex128, generator=torch.Generator().manual_seed(2))

    def fn(p0, lr):
        p = p0.clone()
        optimizer = qhfast.QHAdam([p], lr=lr, nus=(0.7, 0.9), differentiable=True)
        for _ in range(STEPS):
            p.grad = 0.5 * p + noise
            optimizer.step()
        return torch.view_as_real(p)

    p0 = torch.randn(3, dtype=torch.complex128, requires_grad=True)
    assert gradcheck(fn, (p0, torch.tensor(0.1, dtype=torch.float64, requires_grad=True)))


def test_a_leaf_param_that_requires_grad_raises_and_changes_nothing():
    p = torch.ones(3, requires_grad=True)
    optimizer = qhfast.QHAdam([p], differentiable=True)
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="a leaf tensor that requires grad; step a non-leaf copy"):
        optimizer.step()
    assert not optimizer.state and torch.equal(p, torch.ones(3))


def test_recording_is_off_without_differentiable():
    """The ordinary step records nothing, even inside torch.enable_grad."""
    p = torch.ones(3, requires_grad=True)
    optimizer = qhfast.QHAdam([p], lr=torch.tensor(0.1, requires_grad=True))
    p.grad = torch.ones(3, requires_grad=True)
    with torch.enable_grad():
        optimizer.step()
    assert optimizer.state[p]["exp_avg"].grad_fn is None and p.grad_fn is None
