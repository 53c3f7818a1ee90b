"""qhfast.convert: the recovered algorithms really are QHM / QHAdam.

Proof by trajectories in float64: each algorithm is run from its paper's definition
(``_reference_optimizers``) and QHM/QHAdam with the converted hyperparameters from the same start;
the iterates must agree to 1e-10 relative over 200+ steps (they agree to ~1e-15: the recursions are
identical, only rounding differs). Plus qhoptim's documented values, agreement with
``qhoptim.common.param_conv`` (and the one deliberate difference), hypothesis properties, exact
error messages, and the classmethods.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import expecttest
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from qhoptim.common import param_conv

import _reference_optimizers as ref
from qhfast import QHAdam, QHAdamW, QHM, convert

STEPS = 200
RTOL = 1e-10
DIM = 12
EIGENVALUES = torch.linspace(0.1, 1.0, DIM, dtype=torch.float64)
PROPERTY = settings(max_examples=30, deadline=None)


class Quadratic:
    """f(x) = ½ xᵀHx - bᵀx with H's spectrum ``eigenvalues`` in a random basis."""

    def __init__(self, eigenvalues: torch.Tensor = EIGENVALUES, seed: int = 0,
                 centered: bool = False):
        gen = torch.Generator().manual_seed(seed)
        n = len(eigenvalues)
        basis, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        self.hessian = basis @ torch.diag(eigenvalues) @ basis.T
        self.offset = torch.randn(n, generator=gen, dtype=torch.float64)
        if centered:
            self.offset.zero_()
        self.start = torch.randn(n, generator=gen, dtype=torch.float64)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return self.hessian @ x - self.offset


QUADRATIC = Quadratic()


def run_torch(make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
              grad: ref.Grad, start: torch.Tensor, steps: int = STEPS) -> list[torch.Tensor]:
    """Iterates θ_0..θ_steps of a torch optimizer on one flat parameter."""
    param = start.clone().requires_grad_()
    optimizer = make_optimizer([param])
    iterates = [start.clone()]
    for _ in range(steps):
        param.grad = grad(param.detach())
        optimizer.step()
        iterates.append(param.detach().clone())
    return iterates


def run_qhm(hyperparameters: dict, problem: Quadratic = QUADRATIC,
            steps: int = STEPS) -> list[torch.Tensor]:
    def make(params):
        return QHM(params, **hyperparameters)

    return run_torch(make, problem.grad, problem.start, steps)


def max_relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    assert len(actual) == len(expected)
    return max(((a - e).norm() / e.norm()).item() for a, e in zip(actual, expected))


def qhm_spectral_radius(lr: float, momentum: float, nu: float, eigenvalues=EIGENVALUES) -> float:
    """Largest |root| of QHM's recursion z² - (1 + β - αλ(1 - νβ))z + β(1 - αλ(1 - ν)) on each λ."""
    radius = 0.0
    for lam in eigenvalues.tolist():
        b = 1 + momentum - lr * lam * (1 - nu * momentum)
        c = momentum * (1 - lr * lam * (1 - nu))
        disc = complex(b * b - 4 * c) ** 0.5
        radius = max(radius, abs((b + disc) / 2), abs((b - disc) / 2))
    return radius


def qhoptim_dict(params: param_conv.QHMParams) -> dict[str, float]:
    return {"lr": params.alpha, "momentum": params.beta, "nu": params.nu}


def assert_close_dicts(actual: dict, expected: dict, rel: float = 1e-12) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], rel=rel, abs=rel), key


# --------------------------------------------------------------------------------------------
# documented values and qhoptim


def test_values_documented_by_qhoptim():
    assert_close_dicts(
        convert.from_accsgd(delta=0.1, kappa=1000.0, xi=10.0),
        {"lr": 0.4529411764705882, "nu": 0.7792207792207793, "momentum": 0.9881827209533267},
    )
    assert_close_dicts(
        convert.from_robust_momentum(l=5.0, kappa=15.0),
        {"lr": 0.6191381111436607, "nu": 0.6769702972563527, "momentum": 0.43734650511647066},
    )
    assert_close_dicts(
        convert.from_pid(k_p=-0.1, k_i=1.0, k_d=3.0),
        {"lr": 1.0, "nu": 0.01 / 3.0, "momentum": 0.9677419354838709},
    )
    assert_close_dicts(
        convert.from_two_state_optimizer(h=0.9, k=0.0, l=0.1, m=-0.09, q=1.0, z=-0.01),
        {"lr": 0.1, "nu": 1.0, "momentum": 0.9},
    )


# the last two give momentum 1.034 and 2 (k_p and k_d of one sign), which QHM takes
@pytest.mark.parametrize("args", [(-0.1, 1.0, 3.0), (-0.5, 0.2, 4.0), (0.3, 2.0, -1.0),
                                  (0.1, 1.0, 3.0), (0.5, 1.0, 1.0)])
def test_pid_matches_qhoptim(args):
    assert_close_dicts(convert.from_pid(*args), qhoptim_dict(param_conv.from_pid(*args)))


@pytest.mark.parametrize("args", [(0.1, 0.9, 0.6), (1.0, 0.5, 0.0), (0.02, 0.99, 2.0)])
def test_synthesized_nesterov_matches_qhoptim(args):
    expected = qhoptim_dict(param_conv.from_synthesized_nesterov(*args))
    assert_close_dicts(convert.from_synthesized_nesterov(*args), expected)


@pytest.mark.parametrize(
    "args", [(5.0, 15.0, None), (1.0, 100.0, 0.95), (2.0, 10.0, 0.8), (0.5, 1e4, None)])
def test_robust_momentum_matches_qhoptim(args):
    expected = qhoptim_dict(param_conv.from_robust_momentum(*args))
    assert_close_dicts(convert.from_robust_momentum(*args), expected)


@pytest.mark.parametrize(
    "args", [(0.1, 1000.0, 10.0, 0.7), (0.5, 10.0, 2.0, 0.3), (1.0, 1e4, 100.0, 0.9),
             (0.1, 1000.0, 0.0, 0.7)])  # xi = 0, which qhoptim takes: momentum 1
def test_accsgd_matches_qhoptim(args):
    assert_close_dicts(convert.from_accsgd(*args), qhoptim_dict(param_conv.from_accsgd(*args)))


@pytest.mark.parametrize("coefficients", [
    (0.9, 0.0, 0.1, -0.09, 1.0, -0.01),  # qhoptim's example: QHM(0.1, 0.9, 1) with a = buffer
    (0.7, 0.0, 0.3, -0.2, 1.0, -0.5),
    (0.8, 0.5, 0.2, 0.0, 1.0, -0.3),  # m = 0: plain SGD
])
def test_two_state_matches_qhoptim_when_q_is_one(coefficients):
    expected = qhoptim_dict(param_conv.from_two_state_optimizer(*coefficients))
    actual = convert.from_two_state_optimizer(*coefficients)
    assert_close_dicts(actual, expected, rel=1e-10)


def test_a_conversion_rounded_off_sgd_still_converts_to_sgd():
    """qhoptim's two-state example is a heavy ball; the conversion's rounding gives
    nu = 1 + 2.2e-16, which to_sgd refused (it compared nu to 1 exactly). It is taken as 1, and
    a nu off by more than rounding is still refused."""
    qhm = convert.from_two_state_optimizer(0.9, 0.0, 0.1, -0.09, 1.0, -0.01)
    sgd = convert.to_sgd(**qhm)
    assert (sgd["momentum"], sgd["nesterov"]) == (qhm["momentum"], False)
    assert sgd["lr"] == pytest.approx(0.01, rel=1e-12)
    assert convert.to_sgd(1.0, 0.9, 0.9 * (1 + 4e-16))["nesterov"]
    with pytest.raises(ValueError, match="Invalid nu"):
        convert.to_sgd(1.0, 0.9, 1.0 + 1e-12)


def test_nadam_matches_qhoptim():
    expected = param_conv.from_nadam(3e-4, 0.95, 0.998)
    assert convert.from_nadam(3e-4, (0.95, 0.998)) == {
        "lr": expected.alpha,
        "betas": (expected.beta1, expected.beta2),
        "nus": (expected.nu1, expected.nu2),
    }


# --------------------------------------------------------------------------------------------
# trajectories: each recovered algorithm, from its definition, equals QHM


def test_accsgd_trajectory():
    expected = ref.accsgd(QUADRATIC.grad, QUADRATIC.start, STEPS, delta=0.5, kappa=100.0, xi=5.0)
    assert max_relative_error(run_qhm(convert.from_accsgd(0.5, 100.0, 5.0)), expected) < RTOL


def test_accsgd_trajectory_on_an_mlp():
    """AccSGD on a 2-layer tanh MLP (non-convex, autograd gradients) equals QHM on the module."""
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(32, 5, generator=gen, dtype=torch.float64)
    targets = torch.randn(32, 1, generator=gen, dtype=torch.float64)
    torch.manual_seed(2)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    start = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()

    def grad(theta: torch.Tensor) -> torch.Tensor:
        theta = theta.detach().requires_grad_()
        pieces = theta.split([s.numel() for s in shapes])
        params = {n: piece.view(s) for n, piece, s in zip(names, pieces, shapes)}
        outputs = torch.func.functional_call(model, params, (inputs,))
        return torch.autograd.grad(torch.nn.functional.mse_loss(outputs, targets), theta)[0]

    hyper = dict(delta=0.05, kappa=100.0, xi=5.0)
    expected = ref.accsgd(grad, start, STEPS, **hyper)
    optimizer = QHM(model.parameters(), **convert.from_accsgd(**hyper))
    actual = [start]
    for _ in range(STEPS):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
        actual.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone())
    assert (expected[-1] - expected[0]).norm() > 0.1  # it trained
    assert max_relative_error(actual, expected) < RTOL


@pytest.mark.parametrize("beta2", [0.0, 0.6, 0.9, 1.5])
def test_synthesized_nesterov_trajectory(beta2):
    expected = ref.synthesized_nesterov(QUADRATIC.grad, QUADRATIC.start, STEPS, 0.5, 0.9, beta2)
    actual = run_qhm(convert.from_synthesized_nesterov(0.5, 0.9, beta2))
    assert max_relative_error(actual, expected) < RTOL


@pytest.mark.parametrize("rho", [None, 0.85, 0.95])
def test_robust_and_triple_momentum_trajectory(rho):
    l, kappa = 1.0, 10.0  # noqa: E741  (the quadratic's spectrum is [0.1, 1])
    if rho is None:
        expected = ref.triple_momentum(QUADRATIC.grad, QUADRATIC.start, STEPS, l, kappa)
    else:
        expected = ref.robust_momentum(QUADRATIC.grad, QUADRATIC.start, STEPS, l, kappa, rho)
    actual = run_qhm(convert.from_robust_momentum(l, kappa, rho))
    assert max_relative_error(actual, expected) < RTOL


@pytest.mark.parametrize("kappa, rho", [(100.0, None), (100.0, 0.945), (15.0, None), (15.0, 0.9)])
def test_robust_and_triple_momentum_converge_at_rate_rho(kappa, rho):
    """On a quadratic with spectrum [μ, L] (both ends included), ‖θ_t - θ*‖ shrinks like ρ^t."""
    l = 2.0  # noqa: E741
    expected_rate = 1 - 1 / math.sqrt(kappa) if rho is None else rho
    spectrum = torch.linspace(l / kappa, l, 20, dtype=torch.float64)
    problem = Quadratic(spectrum, seed=3, centered=True)  # θ* = 0
    steps = int(math.log(1e-12) / math.log(expected_rate))  # to ~1e-12 of the start
    iterates = run_qhm(convert.from_robust_momentum(l, kappa, rho), problem, steps)
    late = torch.arange(steps // 2, steps + 1, dtype=torch.float64)
    log_norms = torch.stack([x.norm() for x in iterates[steps // 2:]]).log()
    design = torch.stack([late, torch.ones_like(late)], 1)
    slope = torch.linalg.lstsq(design, log_norms[:, None]).solution[0, 0].item()
    assert slope == pytest.approx(math.log(expected_rate), rel=1e-3)  # measured: ~1e-8


@pytest.mark.parametrize("k_p, k_i, k_d", [(-0.1, 0.5, 3.0), (0.0, 0.3, 2.0), (0.2, 0.4, -1.0)])
def test_pid_trajectory(k_p, k_i, k_d):
    """QHM is the PID of ``ref.pid`` with derivative filter k_d / (k_d - k_p), not another."""
    actual = run_qhm(convert.from_pid(k_p, k_i, k_d))
    gains = (k_p, k_i, k_d)
    matching = ref.pid(QUADRATIC.grad, QUADRATIC.start, STEPS, *gains, gamma=k_d / (k_d - k_p))
    assert max_relative_error(actual, matching) < RTOL
    other = ref.pid(QUADRATIC.grad, QUADRATIC.start, STEPS, *gains, gamma=0.9)
    assert max_relative_error(actual, other) > 0.01


def accsgd_as_two_state(delta: float, kappa: float, xi: float, eps: float) -> tuple[float, ...]:
    """AccSGD's coefficients (h, k, l, m, q, z) with a = the running average w̄ (q ≠ 1)."""
    c = eps * eps * xi / kappa
    h, k, l = 1 - c, c, -c * kappa * delta / eps  # noqa: E741
    m, q = c * (1 - c) / (eps + c), (eps + c * c) / (eps + c)
    z = (-eps * delta + c * l) / (eps + c)
    return h, k, l, m, q, z


def test_two_state_trajectory_and_the_difference_from_qhoptim():
    """AccSGD written as a TSO has q ≠ 1: qhoptim's ν is wrong there, ours reproduces the TSO."""
    coefficients = accsgd_as_two_state(0.5, 100.0, 5.0, 0.7)
    h, k, l, m, q, z = coefficients  # noqa: E741
    assert abs(q - 1) > 0.01 and abs((1 - h) * (1 - q) - k * m) < 1e-15
    # a_0 with m·a_0 = (1 - q)·θ_0: here a_0 = θ_0, AccSGD's w̄_0 = w_0
    start = QUADRATIC.start
    expected = ref.two_state(QUADRATIC.grad, start, start, STEPS, *coefficients)
    accsgd = ref.accsgd(QUADRATIC.grad, start, STEPS, 0.5, 100.0, 5.0)
    assert max_relative_error(expected, accsgd) < 1e-12

    ours = convert.from_two_state_optimizer(*coefficients)
    assert_close_dicts(ours, convert.from_accsgd(0.5, 100.0, 5.0), rel=1e-12)
    assert max_relative_error(run_qhm(ours), expected) < RTOL

    theirs = qhoptim_dict(param_conv.from_two_state_optimizer(*coefficients))
    assert theirs["lr"] == pytest.approx(ours["lr"], rel=1e-12)
    assert theirs["momentum"] == pytest.approx(ours["momentum"], rel=1e-12)
    assert ours["nu"] == pytest.approx(25 / 42, rel=1e-12)
    assert theirs["nu"] == pytest.approx(0.8275, rel=1e-12)
    assert max_relative_error(run_qhm(theirs), expected) > 0.1


def test_two_state_trajectory_on_qhoptims_example():
    coefficients = (0.9, 0.0, 0.1, -0.09, 1.0, -0.01)
    start = QUADRATIC.start
    zero = torch.zeros_like(start)
    expected = ref.two_state(QUADRATIC.grad, start, zero, STEPS, *coefficients)
    actual = run_qhm(convert.from_two_state_optimizer(*coefficients))
    assert max_relative_error(actual, expected) < RTOL


@pytest.fixture
def float64_scalars():
    """torch.optim.NAdam keeps its μ product in the default dtype: make that float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_nadam_difference_is_the_documented_one(float64_scalars):
    """Fed the same gradients, torch's NAdam with constant μ = β1 and QHAdam(from_nadam) differ
    per step by exactly -lr(1-β1)β1^t [g/(1-β1^t) - β1 m̂/(1-β1^{t+1})]/(√v̂+ε), which vanishes."""
    lr, (beta1, beta2), eps = 0.01, (0.9, 0.999), 1e-8
    gen = torch.Generator().manual_seed(4)
    gradients = torch.randn(STEPS, DIM, generator=gen, dtype=torch.float64)

    def steps_of(make):
        stream = iter(gradients)
        iterates = run_torch(make, lambda _: next(stream), QUADRATIC.start)
        return [after - before for before, after in zip(iterates, iterates[1:])]

    nadam = steps_of(lambda ps: torch.optim.NAdam(ps, lr=lr, betas=(beta1, beta2), eps=eps,
                                                  momentum_decay=math.inf))
    qhadam = steps_of(lambda ps: QHAdam(ps, eps=eps, **convert.from_nadam(lr, (beta1, beta2))))
    m = torch.zeros(DIM, dtype=torch.float64)
    v = torch.zeros(DIM, dtype=torch.float64)
    differences = []
    for t, (g, nadam_step, qhadam_step) in enumerate(zip(gradients, nadam, qhadam), start=1):
        m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
        m_hat, denom = m / (1 - beta1**t), (v / (1 - beta2**t)).sqrt() + eps
        bracket = g / (1 - beta1**t) - beta1 * m_hat / (1 - beta1 ** (t + 1))
        documented = -lr * (1 - beta1) * beta1**t * bracket / denom
        difference = nadam_step - qhadam_step
        assert difference == pytest.approx(documented, rel=1e-9, abs=1e-14)
        differences.append(difference.abs().max().item())
    first_step = qhadam[0].abs().max().item()
    first_ratio = (1 + 2 * beta1) / (1 + beta1)
    assert differences[0] == pytest.approx(first_step * (first_ratio - 1), rel=1e-9)
    assert differences[-1] < 1e-8 * differences[0]


def test_nadam_trajectory_difference_is_small_and_shrinks(float64_scalars):
    """In closed loop on a quadratic the gap, set by the first few steps, stays under 1% of the
    distance to the optimum and decays with the trajectories' convergence."""
    problem = QUADRATIC
    optimum = torch.linalg.solve(problem.hessian, problem.offset)
    scale = (problem.start - optimum).norm()
    nadam = run_torch(lambda ps: torch.optim.NAdam(ps, lr=0.05, momentum_decay=math.inf),
                      problem.grad, problem.start, 600)
    qhadam = run_torch(lambda ps: QHAdam(ps, **convert.from_nadam(0.05)),
                       problem.grad, problem.start, 600)
    gaps = [((a - b).norm() / scale).item() for a, b in zip(nadam, qhadam)]
    assert 1e-4 < max(gaps) < 1e-2
    assert gaps[-1] < 1e-3 * max(gaps)


@pytest.mark.parametrize(
    "momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True), (0.5, True)])
def test_sgd_trajectory(momentum, nesterov):
    def make(params):
        return torch.optim.SGD(params, lr=0.1, momentum=momentum, nesterov=nesterov)

    expected = run_torch(make, QUADRATIC.grad, QUADRATIC.start)
    assert max_relative_error(run_qhm(convert.from_sgd(0.1, momentum, nesterov)), expected) < RTOL


def test_adam_and_adamw_trajectories():
    def run(make):
        return run_torch(make, QUADRATIC.grad, QUADRATIC.start)

    adam = run(lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.99)))
    qhadam = run(lambda ps: QHAdam(ps, **convert.from_adam(0.01, (0.8, 0.99))))
    assert max_relative_error(qhadam, adam) < RTOL
    adamw = run(lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1))
    qhadamw = run(lambda ps: QHAdamW(ps, weight_decay=0.1, **convert.from_adam(0.01)))
    assert max_relative_error(qhadamw, adamw) < RTOL


# --------------------------------------------------------------------------------------------
# properties


def assert_stable_qhm_reproduces(hyperparameters: dict, expected: list[torch.Tensor]) -> None:
    assert all(math.isfinite(v) for v in hyperparameters.values())
    assert max_relative_error(run_qhm(hyperparameters), expected) < RTOL


@PROPERTY
@given(alpha=st.floats(0.01, 1.0), beta1=st.floats(0.05, 0.95), beta2=st.floats(0.0, 3.0))
def test_property_synthesized_nesterov(alpha, beta1, beta2):
    hyperparameters = convert.from_synthesized_nesterov(alpha, beta1, beta2)
    assume(qhm_spectral_radius(**hyperparameters) < 1)
    expected = ref.synthesized_nesterov(
        QUADRATIC.grad, QUADRATIC.start, STEPS, alpha, beta1, beta2)
    assert_stable_qhm_reproduces(hyperparameters, expected)


@PROPERTY
@given(delta=st.floats(0.01, 1.0), kappa=st.floats(1.0, 1e4), xi_fraction=st.floats(0.01, 1.0),
       eps=st.floats(0.05, 0.95))
def test_property_accsgd(delta, kappa, xi_fraction, eps):
    xi = xi_fraction * math.sqrt(kappa)
    hyperparameters = convert.from_accsgd(delta, kappa, xi, eps)
    assume(qhm_spectral_radius(**hyperparameters) < 1)
    expected = ref.accsgd(QUADRATIC.grad, QUADRATIC.start, STEPS, delta, kappa, xi, eps)
    assert_stable_qhm_reproduces(hyperparameters, expected)


@PROPERTY
@given(lr=st.floats(0.01, 1.0), momentum=st.floats(0.0, 0.99), nesterov=st.booleans())
def test_property_sgd(lr, momentum, nesterov):
    assume(momentum > 0 or not nesterov)
    hyperparameters = convert.from_sgd(lr, momentum, nesterov)
    assume(qhm_spectral_radius(**hyperparameters) < 1)

    def make(params):
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov)

    assert_stable_qhm_reproduces(hyperparameters, run_torch(make, QUADRATIC.grad, QUADRATIC.start))


@settings(max_examples=50, deadline=None)
@given(lr=st.floats(1e-6, 10.0), momentum=st.floats(0.0, 0.999), nesterov=st.booleans())
def test_property_sgd_round_trip(lr, momentum, nesterov):
    assume(momentum > 0 or not nesterov)
    back = convert.to_sgd(**convert.from_sgd(lr, momentum, nesterov))
    assert (back["momentum"], back["nesterov"], back["dampening"]) == (momentum, nesterov, 0.0)
    assert back["lr"] == pytest.approx(lr, rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(lr=st.floats(1e-6, 10.0), momentum=st.floats(0.0, 0.999),
       nu=st.sampled_from(["0", "1", "momentum"]))
def test_property_qhm_round_trip_through_sgd(lr, momentum, nu):
    qhm = {"lr": lr, "momentum": momentum, "nu": momentum if nu == "momentum" else float(nu)}
    back = convert.from_sgd(**convert.to_sgd(**qhm))
    if momentum == 0 or qhm["nu"] == 0:  # all the same plain SGD
        assert back == {"lr": lr, "momentum": 0.0, "nu": 0.0}
    else:
        assert_close_dicts(back, qhm)


@PROPERTY
@given(lr=st.floats(0.05, 1.0), momentum=st.floats(0.05, 0.95), nu=st.floats(-0.5, 1.5),
       scale=st.floats(0.1, 10.0), shear=st.floats(-2.0, 2.0))
def test_property_two_state_recovers_any_basis_of_qhm(lr, momentum, nu, scale, shear):
    """QHM as a TSO with state a = scale·g + shear·θ (q = 1 + shear·lr·ν·β/scale, not 1 in
    general): from_two_state_optimizer gives back QHM's hyperparameters and the trajectory."""
    h0, l0, m0, z0 = momentum, 1 - momentum, -lr * nu * momentum, -lr * (1 - nu * momentum)
    h = h0 + shear * m0 / scale
    k = shear - h * shear
    l = scale * l0 + shear * z0  # noqa: E741
    m, q = m0 / scale, 1 - m0 * shear / scale
    recovered = convert.from_two_state_optimizer(h, k, l, m, q, z0)
    assert_close_dicts(recovered, {"lr": lr, "momentum": momentum, "nu": nu}, rel=1e-9)
    assume(qhm_spectral_radius(**recovered) < 1)
    start = QUADRATIC.start
    expected = ref.two_state(QUADRATIC.grad, start, shear * start, STEPS, h, k, l, m, q, z0)
    assert_stable_qhm_reproduces(recovered, expected)


# --------------------------------------------------------------------------------------------
# classmethods


def test_classmethods_delegate_to_convert():
    assert QHM.from_pid(-0.1, 1.0, 3.0) == convert.from_pid(-0.1, 1.0, 3.0)
    assert (QHM.from_synthesized_nesterov(0.1, 0.9, 0.6)
            == convert.from_synthesized_nesterov(0.1, 0.9, 0.6))
    assert QHM.from_robust_momentum(5.0, 15.0) == convert.from_robust_momentum(5.0, 15.0)
    assert QHM.from_robust_momentum(5.0, 15.0, 0.8) == convert.from_robust_momentum(5.0, 15.0, 0.8)
    assert QHM.from_accsgd(0.1, 1000.0, 10.0) == convert.from_accsgd(0.1, 1000.0, 10.0)
    assert QHM.from_accsgd(0.1, 1e3, 10.0, eps=0.5) == convert.from_accsgd(0.1, 1e3, 10.0, 0.5)
    tso = (0.9, 0.0, 0.1, -0.09, 1.0, -0.01)
    assert QHM.from_two_state_optimizer(*tso) == convert.from_two_state_optimizer(*tso)
    assert QHAdam.from_nadam() == convert.from_nadam()
    assert QHAdam.from_nadam(1e-2, (0.95, 0.99)) == convert.from_nadam(1e-2, (0.95, 0.99))
    assert QHAdamW.from_nadam(1e-2) == convert.from_nadam(1e-2)


def test_results_construct_optimizers():
    param = torch.zeros(3, requires_grad=True)
    QHM([param], **QHM.from_accsgd(delta=0.1, kappa=1000.0, xi=10.0))
    QHM([param], **convert.from_sgd(0.1, 0.9, nesterov=True))
    QHAdam([param], **QHAdam.from_nadam())
    torch.optim.SGD([param], **convert.to_sgd(1.0, 0.9, 0.9))


# --------------------------------------------------------------------------------------------
# bad input


def error(function: Callable, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        function(*args, **kwargs)
    return str(info.value)


class TestBadInput(expecttest.TestCase):
    def test_pid(self):
        self.assertExpectedInline(
            error(convert.from_pid, -0.1, 0.0, 3.0),
            """Invalid k_i: 0.0 (must be > 0 (QHM's lr))""",
        )
        self.assertExpectedInline(
            error(convert.from_pid, 1.0, -1.0, 3.0),
            """Invalid k_i: -1.0 (must be > 0 (QHM's lr))""",
        )
        self.assertExpectedInline(  # qhoptim returns momentum -0.099, which QHM refuses
            error(convert.from_pid, 10.0, 2.0, 0.9),
            """Invalid k_d: 0.9 (with k_p = 10.0 gives momentum k_d/(k_d - k_p) = -0.09890109890109891, which QHM needs >= 0: k_p not beyond k_d on its side of 0)""",  # noqa: E501
        )
        self.assertExpectedInline(
            error(convert.from_pid, -0.1, 1.0, 0.0),
            """Invalid k_d: 0.0 (must be nonzero)""",
        )
        self.assertExpectedInline(
            error(convert.from_pid, 2.0, 1.0, 2.0),
            """Invalid k_d: 2.0 (must differ from k_p = 2.0)""",
        )
        self.assertExpectedInline(
            error(convert.from_pid, math.nan, 1.0, 2.0),
            """Invalid k_p: nan (must be finite)""",
        )
        self.assertExpectedInline(
            error(convert.from_pid, -1e300, 1e-300, 1.0),
            """Invalid conversion: {'lr': 1e-300, 'momentum': 1e-300, 'nu': inf} (the QHM hyperparameters must be finite)""",  # noqa: E501
        )

    def test_synthesized_nesterov(self):
        self.assertExpectedInline(
            error(convert.from_synthesized_nesterov, 0.1, 0.0, 0.6),
            """Invalid beta1: 0.0 (must be in (0, 1))""",
        )
        self.assertExpectedInline(
            error(convert.from_synthesized_nesterov, 0.1, 1.0, 0.6),
            """Invalid beta1: 1.0 (must be in (0, 1))""",
        )
        self.assertExpectedInline(
            error(convert.from_synthesized_nesterov, -0.1, 0.9, 0.6),
            """Invalid alpha: -0.1 (must be >= 0)""",
        )
        self.assertExpectedInline(
            error(convert.from_synthesized_nesterov, 0.1, 0.9, math.inf),
            """Invalid beta2: inf (must be finite)""",
        )

    def test_robust_momentum(self):
        self.assertExpectedInline(
            error(convert.from_robust_momentum, 5.0, 1.0),
            """Invalid kappa: 1.0 (must be > 1)""",
        )
        self.assertExpectedInline(
            error(convert.from_robust_momentum, 0.0, 15.0),
            """Invalid l: 0.0 (must be > 0)""",
        )
        self.assertExpectedInline(
            error(convert.from_robust_momentum, 5.0, 15.0, 0.0),
            """Invalid rho: 0.0 (must be in (0, (1 - 1/kappa)**(1/3)) = (0, 0.9772648059188251))""",
        )
        self.assertExpectedInline(
            error(convert.from_robust_momentum, 5.0, 15.0, 0.99),
            """Invalid rho: 0.99 (must be in (0, (1 - 1/kappa)**(1/3)) = (0, 0.9772648059188251))""",  # noqa: E501
        )
        self.assertExpectedInline(
            error(convert.from_robust_momentum, 5.0, math.inf),
            """Invalid kappa: inf (must be finite)""",
        )

    def test_accsgd(self):
        self.assertExpectedInline(
            error(convert.from_accsgd, 0.1, 1000.0, 10.0, eps=1.0),
            """Invalid eps: 1.0 (must be in (0, 1))""",
        )
        self.assertExpectedInline(
            error(convert.from_accsgd, 0.1, 1000.0, 10.0, eps=0.0),
            """Invalid eps: 0.0 (must be in (0, 1))""",
        )
        self.assertExpectedInline(
            error(convert.from_accsgd, 0.1, 0.0, 10.0),
            """Invalid kappa: 0.0 (must be > 0)""",
        )
        self.assertExpectedInline(
            error(convert.from_accsgd, 0.1, 1000.0, -1.0),
            """Invalid xi: -1.0 (must be in [0, kappa / eps**2] = [0, 2040.8163265306125])""",
        )
        self.assertExpectedInline(
            error(convert.from_accsgd, 0.1, 10.0, 100.0),
            """Invalid xi: 100.0 (must be in [0, kappa / eps**2] = [0, 20.408163265306126])""",
        )
        self.assertExpectedInline(
            error(convert.from_accsgd, -0.1, 1000.0, 10.0),
            """Invalid delta: -0.1 (must be >= 0)""",
        )
        self.assertExpectedInline(
            error(convert.from_accsgd, math.nan, 1000.0, 10.0),
            """Invalid delta: nan (must be finite)""",
        )

    def test_two_state_optimizer(self):
        self.assertExpectedInline(
            error(convert.from_two_state_optimizer, 0.9, 0.0, 0.1, -0.09, 0.9, -0.01),
            """Invalid two-state optimizer: (1 - h)*(1 - q) - k*m = 0.009999999999999995 (must be 0: QHM's recursion has the characteristic root 1)""",  # noqa: E501
        )
        self.assertExpectedInline(
            error(convert.from_two_state_optimizer, 1.0, 0.0, 0.1, -0.09, 1.0, -0.01),
            """Invalid two-state optimizer: h + q = 2.0 (must not be 2: a double characteristic root at 1 is not a QHM)""",  # noqa: E501
        )
        self.assertExpectedInline(
            error(convert.from_two_state_optimizer, 0.0, 0.0, 0.1, -0.09, 1.0, -0.01),
            """Invalid two-state optimizer: h + q = 1.0 (must not be 1: the second characteristic root h + q - 1 would be 0; if m*l == h*z this is plain SGD, QHM(lr=-z, momentum=0, nu=0))""",  # noqa: E501
        )
        self.assertExpectedInline(
            error(convert.from_two_state_optimizer, 0.9, 0.0, 0.1, 0.0, 1.0, 0.0),
            """Invalid two-state optimizer: m*l + (1 - h)*z = 0.0 (must be nonzero: QHM's lr would be 0)""",  # noqa: E501
        )
        self.assertExpectedInline(
            error(convert.from_two_state_optimizer, 0.9, 0.0, 0.1, -0.09, 1.0, math.nan),
            """Invalid z: nan (must be finite)""",
        )
        self.assertExpectedInline(  # qhoptim returns these; the QHM constructor refuses them
            error(convert.from_two_state_optimizer, 0.5, 0.0, 1.0, 0.0, 1.0, 1.0),
            """Invalid conversion: {'lr': -1.0, 'momentum': 0.5, 'nu': 0.0} (these inputs give no QHM: it needs lr >= 0 and momentum >= 0)""",  # noqa: E501
        )
        self.assertExpectedInline(
            error(convert.from_two_state_optimizer, -0.5, 0.0, 1.0, 1.0, 1.0, -1.0),
            """Invalid conversion: {'lr': 0.3333333333333333, 'momentum': -0.5, 'nu': 4.0} (these inputs give no QHM: it needs lr >= 0 and momentum >= 0)""",  # noqa: E501
        )

    def test_adam_and_nadam(self):
        self.assertExpectedInline(
            error(convert.from_nadam, -1e-3),
            """Invalid lr: -0.001 (must be >= 0)""",
        )
        self.assertExpectedInline(
            error(convert.from_nadam, 1e-3, (1.0, 0.999)),
            """Invalid betas[0]: 1.0 (must be in [0, 1))""",
        )
        self.assertExpectedInline(
            error(convert.from_adam, 1e-3, (0.9, -0.1)),
            """Invalid betas[1]: -0.1 (must be in [0, 1))""",
        )
        self.assertExpectedInline(
            error(convert.from_adam, 1e-3, (0.9,)),
            """Invalid betas: (0.9,) (must be a pair (beta1, beta2))""",
        )

    def test_sgd(self):
        self.assertExpectedInline(
            error(convert.from_sgd, 0.1, 0.9, dampening=0.1),
            """Invalid dampening: 0.1 (must be 0 when momentum > 0: torch.optim.SGD does not dampen the first gradient, QHM does)""",  # noqa: E501
        )
        self.assertExpectedInline(
            error(convert.from_sgd, 0.1, 1.0),
            """Invalid momentum: 1.0 (must be in [0, 1))""",
        )
        self.assertExpectedInline(
            error(convert.from_sgd, 0.1, 0.0, nesterov=True),
            """Invalid nesterov: True (Nesterov momentum requires a momentum and zero dampening)""",
        )
        self.assertExpectedInline(
            error(convert.from_sgd, -0.1),
            """Invalid lr: -0.1 (must be >= 0)""",
        )
        self.assertExpectedInline(
            error(convert.to_sgd, 1.0, 0.9, 0.7),
            """Invalid nu: 0.7 (must be 0, 1 or momentum = 0.9 for torch.optim.SGD to reproduce QHM)""",  # noqa: E501
        )
        self.assertExpectedInline(
            error(convert.to_sgd, 1.0, 1.0, 1.0),
            """Invalid momentum: 1.0 (must be in [0, 1))""",
        )
        self.assertExpectedInline(
            error(convert.to_sgd, 1.0, 0.9, math.inf),
            """Invalid nu: inf (must be finite)""",
        )

    def test_dampening_is_ignored_without_momentum_as_torch_does(self):
        assert convert.from_sgd(0.1, 0.0, dampening=0.5) == {"lr": 0.1, "momentum": 0.0, "nu": 0.0}

    def test_non_numbers(self):
        with pytest.raises(TypeError) as info:
            convert.from_accsgd("0.1", 1000.0, 10.0)
        self.assertExpectedInline(
            str(info.value),
            """Invalid delta: '0.1' (must be a real number)""",
        )
        tensor_delta = torch.tensor(0.1, dtype=torch.float64)
        assert convert.from_accsgd(tensor_delta, 1000, 10) == convert.from_accsgd(0.1, 1e3, 10.0)
