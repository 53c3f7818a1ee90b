"""Independent reference implementations of the optimizers that ``qhfast.convert`` recovers.

Each is written from its paper's definition (not from the conversion formulas) and runs in float64
on a flat parameter vector. Each returns the iterates at which it takes gradients, θ_0..θ_steps,
which are what QHM's iterates must equal. ``grad`` maps a point to the gradient there.

Initial states are the ones that correspond to QHM's zero momentum buffer (see each function).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

Grad = Callable[[Tensor], Tensor]


def accsgd(grad: Grad, w0: Tensor, steps: int, delta: float, kappa: float, xi: float,
           eps: float = 0.7) -> list[Tensor]:
    """AccSGD, Algorithm 1 of Kidambi et al. (ICLR 2018), with the paper's 0.7 generalized to eps.

    The running average starts at the initial point (w̄_0 = w_0), as in the paper.
    """
    long_step = kappa * delta / eps
    a = 1.0 - eps * eps * xi / kappa
    mix = eps / (eps + (1.0 - a))
    w, w_bar = w0.clone(), w0.clone()
    iterates = [w]
    for _ in range(steps):
        g = grad(w)
        w_bar = a * w_bar + (1.0 - a) * (w - long_step * g)
        w = mix * (w - delta * g) + (1.0 - mix) * w_bar
        iterates.append(w)
    return iterates


def synthesized_nesterov(grad: Grad, x0: Tensor, steps: int, alpha: float, beta1: float,
                         beta2: float) -> list[Tensor]:
    """Lessard, Recht and Packard (2016), §6: gradients at y_k = ξ_k + β2 (ξ_k - ξ_{k-1}).

    ξ_{k+1} = ξ_k + β1 (ξ_k - ξ_{k-1}) - α ∇f(y_k), started at rest (ξ_{-1} = ξ_0). Returns y.
    """
    xi_prev, xi = x0.clone(), x0.clone()
    ys = []
    for _ in range(steps + 1):
        y = xi + beta2 * (xi - xi_prev)
        ys.append(y)
        xi_prev, xi = xi, xi + beta1 * (xi - xi_prev) - alpha * grad(y)
    return ys


def robust_momentum(grad: Grad, x0: Tensor, steps: int, l: float, kappa: float,  # noqa: E741
                    rho: float) -> list[Tensor]:
    """Robust Momentum, Cyrus et al. (ACC 2018), eqs. for α, β, γ in terms of (L, κ, ρ).

    x_{k+1} = x_k + β (x_k - x_{k-1}) - α ∇f(y_k), y_k = x_k + γ (x_k - x_{k-1}); x_{-1} = x_0.
    """
    alpha = kappa * (1 - rho) ** 2 * (1 + rho) / l
    beta = kappa * rho**3 / (kappa - 1)
    gamma = rho**3 / ((kappa - 1) * (1 - rho) ** 2 * (1 + rho))
    return synthesized_nesterov(grad, x0, steps, alpha, beta, gamma)


def triple_momentum(grad: Grad, x0: Tensor, steps: int, l: float,  # noqa: E741
                    kappa: float) -> list[Tensor]:
    """Triple Momentum, Van Scoy, Freeman and Lynch (2018), with its own parameter formulas.

    ρ = 1 - 1/√κ, α = (1 + ρ)/L, β = ρ²/(2 - ρ), γ = ρ²/((1 + ρ)(2 - ρ)):
    ξ_{k+1} = (1 + β) ξ_k - β ξ_{k-1} - α ∇f(y_k), y_k = (1 + γ) ξ_k - γ ξ_{k-1}; ξ_{-1} = ξ_0.
    Returns the gradient points y (its output x_k = (1 + δ) ξ_k - δ ξ_{k-1} is not needed).
    """
    rho = 1 - 1 / math.sqrt(kappa)
    alpha, beta = (1 + rho) / l, rho**2 / (2 - rho)
    gamma = rho**2 / ((1 + rho) * (2 - rho))
    xi_prev, xi = x0.clone(), x0.clone()
    ys = []
    for _ in range(steps + 1):
        y = (1 + gamma) * xi - gamma * xi_prev
        ys.append(y)
        xi_prev, xi = xi, (1 + beta) * xi - beta * xi_prev - alpha * grad(y)
    return ys


def two_state(grad: Grad, theta0: Tensor, a0: Tensor, steps: int, h: float, k: float,
              l: float, m: float, q: float, z: float) -> list[Tensor]:  # noqa: E741
    """Ma and Yarats' two-state optimizer, a ← h a + k θ + l ∇ and θ ← m a + q θ + z ∇ at once."""
    a, theta = a0.clone(), theta0.clone()
    iterates = [theta]
    for _ in range(steps):
        g = grad(theta)
        a, theta = h * a + k * theta + l * g, m * a + q * theta + z * g
        iterates.append(theta)
    return iterates


def pid(grad: Grad, theta0: Tensor, steps: int, k_p: float, k_i: float, k_d: float,
        gamma: float) -> list[Tensor]:
    """Discrete PID (Recht 2018): running-sum integral, derivative low-pass filtered by gamma.

    Error e_t = -∇f(θ_t); the control is the next iterate:
    θ_{t+1} = θ_0 + k_p e_t + k_i Σ_{s<=t} e_s + k_d v_t, v_t = γ v_{t-1} + (1 - γ)(e_t - e_{t-1}),
    with e_{-1} = v_{-1} = 0.
    """
    theta = theta0.clone()
    integral = theta0.new_zeros(theta0.shape)
    derivative = theta0.new_zeros(theta0.shape)
    previous_error = theta0.new_zeros(theta0.shape)
    iterates = [theta]
    for _ in range(steps):
        error = -grad(theta)
        integral = integral + error
        derivative = gamma * derivative + (1 - gamma) * (error - previous_error)
        previous_error = error
        theta = theta0 + k_p * error + k_i * integral + k_d * derivative
        iterates.append(theta)
    return iterates
