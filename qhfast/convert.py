r"""Hyperparameter recoveries: other optimizers expressed as QHM or QHAdam.

Each ``from_*`` function takes another algorithm's hyperparameters and returns the keyword
arguments of :class:`qhfast.QHM` (``{"lr", "momentum", "nu"}``) or :class:`qhfast.QHAdam`
(``{"lr", "betas", "nus"}``) under which QHM/QHAdam runs that algorithm; :func:`to_sgd` goes the
other way. The optimizer classes expose qhoptim's recoveries as classmethods
(``QHM.from_accsgd(...)``, ``QHAdam.from_nadam(...)``), which delegate here.

**What "recovers" means.** QHM with lr :math:`\alpha`, momentum :math:`\beta` and immediate
discount :math:`\nu` keeps a dampened buffer :math:`g` that starts at zero::

    g_{t+1} = β g_t + (1 - β) ∇_t
    θ_{t+1} = θ_t - α [(1 - ν) ∇_t + ν g_{t+1}]

where ∇_t is the gradient at θ_t. Eliminating g gives, for t >= 0::

    θ_{t+2} = (1 + β) θ_{t+1} - β θ_t - α (1 - νβ) ∇_{t+1} + αβ (1 - ν) ∇_t
    θ_1     = θ_0 - α (1 - νβ) ∇_0

A linear method with one auxiliary state is recovered when its iterates obey this same recursion
with the same θ_1. Then both produce the *same iterates* θ_t (the points where gradients are taken)
from the same θ_0 for *any* gradient sequence (so also with stochastic gradients).
Each function below states the recovered algorithm's recursion and the initial state of its
auxiliary variable that corresponds to QHM's zero buffer. The characteristic polynomial of QHM's
recursion is (x - 1)(x - β): a method is QHM-representable only if it has the root 1 (it stands
still where the gradient is zero); :func:`from_two_state_optimizer` checks this.

**Validation.** Every argument is checked; an invalid one raises
``ValueError("Invalid <name>: <value> (<valid range>)")`` where qhoptim returned nonsense or raised
ZeroDivisionError / a math domain error (a non-number raises TypeError).

**Differences from qhoptim 1.1.0** (``qhoptim.common.param_conv``): the formulas are qhoptim's,
except that :func:`from_two_state_optimizer` computes ν (and β) so that the two-state optimizer's
trajectory is reproduced for every representable system; qhoptim's ν is right only when q = 1 or
m·l = h·z. The conversions :func:`from_sgd`, :func:`to_sgd` and :func:`from_adam` are new.

References:
    Ma and Yarats, *Quasi-hyperbolic momentum and Adam for deep learning*, ICLR 2019,
    https://arxiv.org/abs/1810.06801 (QHM, QHAdam, the recoveries).
"""

from __future__ import annotations

import math
import numbers

from torch import Tensor

__all__ = [
    "from_accsgd",
    "from_adam",
    "from_nadam",
    "from_pid",
    "from_robust_momentum",
    "from_sgd",
    "from_synthesized_nesterov",
    "from_two_state_optimizer",
    "to_sgd",
]

#: |(1 - h)(1 - q) - k·m| below this, relative to the size of the terms, counts as a unit root
_UNIT_ROOT_RTOL = 1e-9


# --------------------------------------------------------------------------------------------
# validation


def _invalid(name: str, value: object, rule: str) -> ValueError:
    return ValueError(f"Invalid {name}: {value} ({rule})")


def _finite(name: str, value: float) -> float:
    """``value`` (a real number or 1-element tensor) as a float; raises unless it is finite."""
    if not (isinstance(value, numbers.Real) or (isinstance(value, Tensor) and value.numel() == 1)):
        raise TypeError(f"Invalid {name}: {value!r} (must be a real number)")
    number = float(value)
    if not math.isfinite(number):
        raise _invalid(name, number, "must be finite")
    return number


def _require(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise _invalid(name, value, rule)


def _nonnegative(name: str, value: float) -> float:
    number = _finite(name, value)
    _require(number >= 0.0, name, number, "must be >= 0")
    return number


def _beta_pair(betas: tuple[float, float]) -> tuple[float, float]:
    _require(isinstance(betas, (tuple, list)) and len(betas) == 2, "betas", betas,
             "must be a pair (beta1, beta2)")
    pair = tuple(_finite(f"betas[{i}]", beta) for i, beta in enumerate(betas))
    for i, beta in enumerate(pair):
        _require(0.0 <= beta < 1.0, f"betas[{i}]", beta, "must be in [0, 1)")
    return pair  # type: ignore[return-value]


def _qhm(lr: float, momentum: float, nu: float) -> dict[str, float]:
    """QHM's hyperparameters, or ValueError where the inputs give ones its constructor
    refuses (so the conversion, not the constructor after it, names the problem)."""
    params = {"lr": lr, "momentum": momentum, "nu": nu}
    _require(all(math.isfinite(v) for v in params.values()), "conversion", params,
             "the QHM hyperparameters must be finite")
    _require(lr >= 0.0 and momentum >= 0.0, "conversion", params,
             "these inputs give no QHM: it needs lr >= 0 and momentum >= 0")
    return params


# --------------------------------------------------------------------------------------------
# QHM recoveries (qhoptim's classmethods)


def from_pid(k_p: float, k_i: float, k_d: float) -> dict[str, float]:
    r"""QHM hyperparameters of a PID-controller optimizer (Recht, 2018).

    Returns ``lr = k_i``, ``nu = k_p² / (k_i·k_d)``, ``momentum = k_d / (k_d - k_p)``
    (qhoptim's formulas).

    The recovered algorithm, derived by matching transfer functions, is the discrete PID
    controller of Recht's post (a running-sum integral and a low-pass filtered finite-difference
    derivative) driven by the error e_t = -∇f(θ_t), whose output is the next iterate::

        v_t     = γ v_{t-1} + (1 - γ)(e_t - e_{t-1}),          e_{-1} = v_{-1} = 0
        θ_{t+1} = θ_0 + k_p e_t + k_i Σ_{s<=t} e_s + k_d v_t

    with the derivative filter tied to the gains, γ = k_d / (k_d - k_p) (= QHM's momentum). In
    z-transforms, QHM maps e_t to θ_{t+1} - θ_0 through α/(1 - z⁻¹) - αβν/(1 - βz⁻¹), this PID
    through k_i/(1 - z⁻¹) + k_p + k_d(1 - γ)/γ - k_d(1 - γ)²/γ/(1 - γz⁻¹); the two agree exactly
    when the constant term k_p + k_d(1 - γ)/γ vanishes, and for any other filter constant the PID
    is not a QHM. ``k_p = 0`` gives γ = 1, nu = 0: pure integral control, which is gradient
    descent with step k_i.

    Recht's PID has γ as a fourth, free parameter; the form above, with γ fixed by the gains, is
    derived here from qhoptim's formulas (e.g. ``k_p=-0.1, k_i=1, k_d=3`` gives γ ≈ 0.968). It
    could not be checked against the optimizer Ma and Yarats had in mind (their appendix).

    Raises:
        ValueError: a non-finite gain, ``k_i <= 0``, ``k_d == 0``, ``k_d == k_p``, or gains
            whose momentum is negative (k_p beyond k_d, on its side of 0). Momentum 1 and
            above (k_p and k_d of the same sign, |k_p| < |k_d|) are returned, as qhoptim
            returns them, and QHM takes them.

    Reference: B. Recht, *The best things in life are model free* (2018),
    http://www.argmin.net/2018/04/19/pid/
    """
    k_p, k_i, k_d = _finite("k_p", k_p), _finite("k_i", k_i), _finite("k_d", k_d)
    _require(k_i > 0.0, "k_i", k_i, "must be > 0 (QHM's lr)")
    _require(k_d != 0.0, "k_d", k_d, "must be nonzero")
    _require(k_d != k_p, "k_d", k_d, f"must differ from k_p = {k_p}")
    momentum = k_d / (k_d - k_p)
    _require(momentum >= 0.0, "k_d", k_d,
             f"with k_p = {k_p} gives momentum k_d/(k_d - k_p) = {momentum}, which QHM needs "
             ">= 0: k_p not beyond k_d on its side of 0")
    return _qhm(lr=k_i, momentum=momentum, nu=k_p * k_p / (k_i * k_d))


def from_synthesized_nesterov(alpha: float, beta1: float, beta2: float) -> dict[str, float]:
    r"""QHM hyperparameters of the synthesized Nesterov method (Lessard et al., 2016, §6).

    The method, with gradients taken at y::

        ξ_{k+1} = ξ_k + β1 (ξ_k - ξ_{k-1}) - α ∇f(y_k)
        y_k     = ξ_k + β2 (ξ_k - ξ_{k-1})

    Its y iterates are QHM's θ iterates for ``lr = alpha / (1 - beta1)``, ``momentum = beta1``,
    ``nu = 1 - beta2 (1 - beta1) / beta1``, when it starts at rest (ξ_{-1} = ξ_0, so
    y_0 = ξ_0 = θ_0).
    Derivation: y obeys y_{k+1} = (1 + β1) y_k - β1 y_{k-1} - α(1 + β2) ∇_k + αβ2 ∇_{k-1}; match
    α(1 + β2) = lr (1 - νβ) and αβ2 = lr β(1 - ν). β2 = 0 is heavy ball (nu = 1), β2 = β1 Nesterov's
    method (nu = β1).

    Raises:
        ValueError: ``alpha < 0``, ``beta1`` outside (0, 1), or a non-finite argument.

    Reference: Lessard, Recht and Packard, *Analysis and design of optimization algorithms via
    integral quadratic constraints*, SIAM J. Optim. 2016, https://arxiv.org/abs/1408.3595
    """
    alpha = _nonnegative("alpha", alpha)
    beta1, beta2 = _finite("beta1", beta1), _finite("beta2", beta2)
    _require(0.0 < beta1 < 1.0, "beta1", beta1, "must be in (0, 1)")
    return _synthesized_nesterov(alpha, beta1, beta2)


def _synthesized_nesterov(alpha: float, beta1: float, beta2: float) -> dict[str, float]:
    return _qhm(lr=alpha / (1.0 - beta1), momentum=beta1, nu=1.0 - beta2 * (1.0 - beta1) / beta1)


def from_robust_momentum(
    l: float, kappa: float, rho: float | None = None  # noqa: E741
) -> dict[str, float]:
    r"""QHM hyperparameters of Robust Momentum (Cyrus et al., 2018) or Triple Momentum.

    For an L-smooth, μ-strongly convex f (``l`` = L, ``kappa`` = L/μ) and a target rate ρ, Robust
    Momentum is the synthesized Nesterov method (:func:`from_synthesized_nesterov`) with::

        α  = κ (1 - ρ)² (1 + ρ) / L
        β1 = κ ρ³ / (κ - 1)
        β2 = ρ³ / ((κ - 1)(1 - ρ)² (1 + ρ))

    Cyrus et al. take ρ in [1 - 1/√κ, 1 - 1/κ]; on quadratics with spectrum in [μ, L] its linear
    rate is exactly ρ. ``rho=None`` means ρ = 1 - 1/√κ, which gives Triple Momentum (Van Scoy et
    al., 2018): α = (1 + ρ)/L, β1 = ρ²/(2 - ρ), β2 = ρ²/((1 + ρ)(2 - ρ)), whose gradient points
    y_k are recovered (its output x_k = ξ_k + ρ²/(1 - ρ²)(ξ_k - ξ_{k-1}) is a third sequence). Start
    at rest (ξ_{-1} = ξ_0).

    Raises:
        ValueError: ``l <= 0``, ``kappa <= 1``, a non-finite argument, or ``rho`` outside
            (0, (1 - 1/κ)^(1/3)), beyond which β1 >= 1 (no QHM momentum).

    References: Cyrus, Hu, Van Scoy and Lessard, *A robust accelerated optimization algorithm for
    strongly convex functions*, ACC 2018, https://arxiv.org/abs/1710.04753; Van Scoy, Freeman and
    Lynch, *The fastest known globally convergent first-order method for minimizing strongly
    convex functions*, IEEE Control Systems Letters 2018.
    """
    l, kappa = _finite("l", l), _finite("kappa", kappa)  # noqa: E741
    _require(l > 0.0, "l", l, "must be > 0")
    _require(kappa > 1.0, "kappa", kappa, "must be > 1")
    if rho is None:
        rho = 1.0 - 1.0 / math.sqrt(kappa)
    rho = _finite("rho", rho)
    rho_max = (1.0 - 1.0 / kappa) ** (1.0 / 3.0)
    _require(0.0 < rho < rho_max, "rho", rho,
             f"must be in (0, (1 - 1/kappa)**(1/3)) = (0, {rho_max})")
    alpha = kappa * (1.0 - rho) ** 2 * (1.0 + rho) / l
    beta1 = kappa * rho**3 / (kappa - 1.0)
    beta2 = rho**3 / ((kappa - 1.0) * (1.0 - rho) ** 2 * (1.0 + rho))
    return _synthesized_nesterov(alpha, beta1, beta2)


def from_accsgd(delta: float, kappa: float, xi: float, eps: float = 0.7) -> dict[str, float]:
    r"""QHM hyperparameters of AccSGD (Kidambi et al., 2018, Algorithm 1).

    AccSGD with short step δ, long step parameter κ, statistical advantage parameter ξ and the
    constant ε (0.7 in the paper), with a = 1 - ε²ξ/κ and running average w̄_0 = w_0::

        w̄_{t+1} = a w̄_t + (1 - a)(w_t - (κδ/ε) ∇f(w_t))
        w_{t+1} = ε/(ε + 1 - a) (w_t - δ ∇f(w_t)) + (1 - a)/(ε + 1 - a) w̄_{t+1}

    Its iterates w_t are QHM's θ_t (from θ_0 = w_0) for::

        lr = δ ε (1 + ξ) / (1 + ε),   nu = (εξ - 1) / (ε (1 + ξ)),   momentum = (κ - ε²ξ) / (κ + εξ)

    (a two-state optimizer, see :func:`from_two_state_optimizer`; w̄_0 = w_0 is the state that
    matches QHM's zero buffer).

    Raises:
        ValueError: ``delta < 0``, ``kappa <= 0``, ``eps`` outside (0, 1), ``xi`` outside
            [0, kappa/eps²] (momentum would leave [0, 1]), or a non-finite argument. The paper
            uses κ >= 1 and ξ <= √κ; ξ = 0 (as qhoptim takes it) gives momentum 1, a buffer
            that stays zero: SGD with step δ, as AccSGD is then.

    Reference: Kidambi, Netrapalli, Jain and Kakade, *On the insufficiency of existing momentum
    schemes for stochastic optimization*, ICLR 2018, https://arxiv.org/abs/1803.05591
    """
    delta = _nonnegative("delta", delta)
    kappa, xi, eps = _finite("kappa", kappa), _finite("xi", xi), _finite("eps", eps)
    _require(kappa > 0.0, "kappa", kappa, "must be > 0")
    _require(0.0 < eps < 1.0, "eps", eps, "must be in (0, 1)")
    xi_max = kappa / eps**2
    _require(0.0 <= xi <= xi_max, "xi", xi, f"must be in [0, kappa / eps**2] = [0, {xi_max}]")
    return _qhm(
        lr=delta * eps * (1.0 + xi) / (1.0 + eps),
        momentum=(kappa - eps * eps * xi) / (kappa + eps * xi),
        nu=(eps * xi - 1.0) / (eps * (1.0 + xi)),
    )


def from_two_state_optimizer(
    h: float, k: float, l: float, m: float, q: float, z: float  # noqa: E741
) -> dict[str, float]:
    r"""QHM hyperparameters of a linear two-state optimizer ("TSO" in Ma and Yarats, 2019).

    The optimizer::

        a_{t+1} = h a_t + k θ_t + l ∇_t
        θ_{t+1} = m a_t + q θ_t + z ∇_t

    Eliminating a gives θ_{t+2} = (h + q) θ_{t+1} - (hq - km) θ_t + z ∇_{t+1} + (ml - hz) ∇_t.
    Matching QHM's recursion (module docstring) term by term requires and gives:

    * a characteristic root at 1: (1 - h)(1 - q) = k·m (checked to a relative 1e-9);
    * ``momentum = h + q - 1``, the other root;
    * ``lr = -(m·l + (1 - h)·z) / (2 - h - q)``;
    * ``nu = (m·l + (q - 1)·z) / (momentum · (m·l + (1 - h)·z))``.

    The iterates θ_t then equal QHM's from θ_0 when the TSO starts from a state with
    m·a_0 = (1 - q)·θ_0 (for q = 1: a_0 = 0, or any a_0 if m = 0); from another a_0 the TSO is QHM
    started with a nonzero buffer.

    Differs from qhoptim: qhoptim returns ν = 2m(lq - kz)/ξ with ξ = (h - q - φ)(lm - hz) +
    2m(lq - kz), φ = √((h - q)² + 4km). With a unit root, ξ = 2β(ml + (1 - h)z) and its numerator
    m(lq - kz) is the one above minus (1 - q)(m·l - h·z): qhoptim's ν is right only if q = 1 or
    m·l = h·z. AccSGD written as a TSO (q ≠ 1), for one, gets a wrong ν from qhoptim (and so
    a different trajectory). qhoptim's momentum (h + q - φ)/2, the smaller root, is also wrong when
    the non-unit root exceeds 1. lr is the same.

    Raises:
        ValueError: a non-finite coefficient; no characteristic root at 1; a double root at 1
            (h + q = 2: qhoptim's φ = 0; a QHM then only if it is plain SGD); a zero second root
            (h + q = 1: qhoptim's ψ = 0; ν is then undetermined, plain SGD if m·l = h·z, else not
            a QHM); or lr = 0 (qhoptim's ξ = 0), where the gradient does not move θ through a QHM.

    Reference: Ma and Yarats (2019), https://arxiv.org/abs/1810.06801
    """
    h, k, l, m, q, z = (  # noqa: E741
        _finite(name, value) for name, value in zip("hklmqz", (h, k, l, m, q, z))
    )
    unit_root_gap = (1.0 - h) * (1.0 - q) - k * m
    scale = max(1.0, abs((1.0 - h) * (1.0 - q)), abs(k * m))
    _require(
        abs(unit_root_gap) <= _UNIT_ROOT_RTOL * scale, "two-state optimizer",
        f"(1 - h)*(1 - q) - k*m = {unit_root_gap}",
        "must be 0: QHM's recursion has the characteristic root 1",
    )
    momentum = h + q - 1.0
    _require(momentum != 1.0, "two-state optimizer", f"h + q = {h + q}",
             "must not be 2: a double characteristic root at 1 is not a QHM")
    _require(momentum != 0.0, "two-state optimizer", f"h + q = {h + q}",
             "must not be 1: the second characteristic root h + q - 1 would be 0; "
             "if m*l == h*z this is plain SGD, QHM(lr=-z, momentum=0, nu=0)")
    step = m * l + (1.0 - h) * z
    _require(step != 0.0, "two-state optimizer", f"m*l + (1 - h)*z = {step}",
             "must be nonzero: QHM's lr would be 0")
    return _qhm(
        lr=-step / (1.0 - momentum),
        momentum=momentum,
        nu=(m * l + (q - 1.0) * z) / (momentum * step),
    )


# --------------------------------------------------------------------------------------------
# QHAdam recoveries


def from_nadam(lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999)) -> dict[str, object]:
    r"""QHAdam hyperparameters approximating NAdam (Dozat, 2016): ``nus = (beta1, 1)``.

    QHAdam with ν1 = β1, ν2 = 1 steps by -lr·[(1 - β1)∇_t + β1 m̂_t] / (√v̂_t + ε), with m̂_t, v̂_t
    Adam's bias-corrected moments. NAdam with a constant momentum μ_t = β1
    (``torch.optim.NAdam(momentum_decay=float("inf"))``, Dozat's algorithm without the warm-up
    schedule) steps by -lr·[(1 - β1)/(1 - β1^t)·∇_t + β1/(1 - β1^{t+1})·m_t] / (√v̂_t + ε), m_t the
    uncorrected first moment. NAdam's step minus QHAdam's is::

        -lr (1 - β1) β1^t [∇_t / (1 - β1^t) - β1 m̂_t / (1 - β1^{t+1})] / (√v̂_t + ε)

    which vanishes geometrically (on the first step NAdam's step is (1 + 2β1)/(1 + β1) times
    QHAdam's). torch's default ``momentum_decay=4e-3`` ramps μ_t up from β1/2 over thousands of
    steps, which no QHAdam reproduces.

    Raises:
        ValueError: ``lr < 0``, a beta outside [0, 1), or a non-finite argument.

    Reference: T. Dozat, *Incorporating Nesterov momentum into Adam*, ICLR 2016 workshop.
    """
    lr, (beta1, beta2) = _nonnegative("lr", lr), _beta_pair(betas)
    return {"lr": lr, "betas": (beta1, beta2), "nus": (beta1, 1.0)}


def from_adam(lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999)) -> dict[str, object]:
    r"""QHAdam hyperparameters of Adam: the same ``lr`` and ``betas``, ``nus = (1, 1)``.

    Exact: QHAdam with ν1 = ν2 = 1 is Adam (``torch.optim.Adam``; pass the same ``eps`` and
    coupled ``weight_decay``). AdamW (``torch.optim.AdamW``) is :class:`qhfast.QHAdamW` with these
    keyword arguments plus the same ``weight_decay`` (decoupled, θ ← θ(1 - lr·λ)).

    Raises:
        ValueError: ``lr < 0``, a beta outside [0, 1), or a non-finite argument.
    """
    lr, pair = _nonnegative("lr", lr), _beta_pair(betas)
    return {"lr": lr, "betas": pair, "nus": (1.0, 1.0)}


# --------------------------------------------------------------------------------------------
# torch.optim.SGD


def from_sgd(
    lr: float, momentum: float = 0.0, nesterov: bool = False, dampening: float = 0.0
) -> dict[str, float]:
    r"""QHM hyperparameters that reproduce ``torch.optim.SGD`` exactly.

    SGD keeps an undampened buffer b_t = μ b_{t-1} + ∇_t (b_1 = ∇_1) and steps by -lr·b_t, or
    -lr·(∇_t + μ b_t) with ``nesterov``. QHM's buffer is (1 - μ) b_t, so:

    * ``momentum == 0``: ``lr``, momentum 0, nu 0 (plain SGD; dampening is ignored, as by torch);
    * momentum μ in (0, 1): ``lr / (1 - μ)``, momentum μ, nu 1 (heavy ball), or nu μ with
      ``nesterov`` (Nesterov momentum).

    Raises:
        ValueError: ``lr < 0``; ``momentum`` outside [0, 1) (with μ >= 1 QHM's buffer gets no or
            negative weight); ``dampening != 0`` with momentum (torch does not dampen the first
            gradient but QHM does, so no QHM matches); ``nesterov`` without momentum or with
            dampening (torch rejects it too); a non-finite argument.
    """
    lr, momentum, dampening = (
        _nonnegative("lr", lr), _finite("momentum", momentum), _finite("dampening", dampening)
    )
    _require(0.0 <= momentum < 1.0, "momentum", momentum, "must be in [0, 1)")
    _require(not nesterov or (momentum > 0.0 and dampening == 0.0), "nesterov", nesterov,
             "Nesterov momentum requires a momentum and zero dampening")
    if momentum == 0.0:
        return _qhm(lr=lr, momentum=0.0, nu=0.0)
    _require(dampening == 0.0, "dampening", dampening,
             "must be 0 when momentum > 0: torch.optim.SGD does not dampen the first gradient, "
             "QHM does")
    return _qhm(lr=lr / (1.0 - momentum), momentum=momentum, nu=momentum if nesterov else 1.0)


def to_sgd(lr: float, momentum: float, nu: float) -> dict[str, object]:
    r"""``torch.optim.SGD`` keyword arguments that reproduce QHM, where SGD can.

    QHM(α, β, ν) is SGD exactly for ν = 0 or β = 0 (``lr = α``, no momentum), ν = 1 (heavy ball,
    ``lr = α(1 - β)``, ``momentum = β``) and ν = β (the same with ``nesterov=True``). Returns
    ``{"lr", "momentum", "nesterov", "dampening"}`` (dampening always 0); inverse of
    :func:`from_sgd`.

    ``nu`` is taken for 1 or ``momentum`` within :data:`_SAME_NU` of it (relative): a
    conversion's rounding (``from_two_state_optimizer`` of a heavy ball gives
    ν = 1 + 2.2e-16).

    Raises:
        ValueError: ``lr < 0``, ``momentum`` outside [0, 1), a non-finite argument, or any other
            ``nu`` (a QH average of the gradient and the momentum buffer has no SGD form).
    """
    lr, momentum, nu = _nonnegative("lr", lr), _finite("momentum", momentum), _finite("nu", nu)
    _require(0.0 <= momentum < 1.0, "momentum", momentum, "must be in [0, 1)")
    if momentum == 0.0 or nu == 0.0:
        return {"lr": lr, "momentum": 0.0, "nesterov": False, "dampening": 0.0}
    heavy_ball = math.isclose(nu, 1.0, rel_tol=_SAME_NU)
    _require(heavy_ball or math.isclose(nu, momentum, rel_tol=_SAME_NU), "nu", nu,
             f"must be 0, 1 or momentum = {momentum} for torch.optim.SGD to reproduce QHM")
    return {
        "lr": lr * (1.0 - momentum), "momentum": momentum, "nesterov": not heavy_ball,
        "dampening": 0.0,
    }


#: how close (relative, ten ulps) :func:`to_sgd` takes a ``nu`` to be 1 or ``momentum``
_SAME_NU = 10 * 2.0**-52
