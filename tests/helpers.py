"""A small random problem shared by the tests, and comparison helpers.

The problem is a strongly convex quadratic per parameter plus a mild smooth nonlinearity,
``f(x) = ½ xᵀHx + bᵀx + 0.05·Σcos(x)``, with the spectrum of H in [0.1, 1], and a seeded noise
term added to each step's gradient, as in minibatch training. Every optimizer setting used in
the tests is stable on it, so two implementations that agree to rounding stay together. (Without
the noise, Adam-like methods with a constant lr end in a chaotic limit cycle around the optimum
that amplifies rounding, and an exact comparison would prove nothing.)
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import qhfast

#: one representative setting of each optimizer; keyword arguments override it
OPTIMIZERS = {
    "QHM": lambda p, **kw: qhfast.QHM(p, **{"lr": 0.5, "momentum": 0.9, "nu": 0.7, **kw}),
    "QHAdam": lambda p, **kw: qhfast.QHAdam(p, **{"lr": 0.01, "nus": (0.7, 1.0), **kw}),
    "QHAdamW": lambda p, **kw: qhfast.QHAdamW(
        p, **{"lr": 0.01, "nus": (0.7, 0.9), "weight_decay": 0.1, **kw}
    ),
}
#: the two update paths, as values of the ``foreach`` flag
PATHS = [pytest.param(False, id="per_tensor"), pytest.param(True, id="foreach")]

SHAPES = [(5, 3), (7,), (2, 2, 2), (4, 1)]
#: the index of the parameter that gets its first gradient late and then misses some steps
INTERMITTENT = 1
#: standard deviation of the per-step gradient noise
NOISE = 0.5


class Problem:
    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float64):
        gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        self.hessians = []
        self.offsets = []
        for s in SHAPES:
            n = torch.Size(s).numel()
            q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
            eig = torch.linspace(0.1, 1.0, n, dtype=torch.float64)
            self.hessians.append(q @ torch.diag(eig) @ q.T)
            self.offsets.append(torch.randn(n, generator=gen, dtype=torch.float64))

    def params(self, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        dtype = dtype or self.dtype
        return [x.to(dtype).clone().requires_grad_() for x in self.init]

    def grad(self, i: int, p: torch.Tensor, step: int) -> torch.Tensor:
        """Noisy gradient at ``p``'s current value, in float64, rounded to p's dtype."""
        x = p.detach().to(torch.float64).reshape(-1)
        noise = torch.randn(
            x.shape, generator=torch.Generator().manual_seed(1000 * step + i), dtype=torch.float64
        )
        g = self.hessians[i] @ x + self.offsets[i] - 0.05 * torch.sin(x) + NOISE * noise
        return g.reshape(p.shape).to(p.dtype)

    def set_grads(self, params: list[torch.Tensor], step: int) -> None:
        for i, p in enumerate(params):
            if i == INTERMITTENT and (step < 5 or step % 3 == 0):
                p.grad = None
            else:
                p.grad = self.grad(i, p, step)


def two_groups(params: list[torch.Tensor], second: dict) -> list[dict]:
    """Params split into two groups; ``second`` overrides hyperparameters of the second."""
    return [{"params": params[:2]}, dict(second, params=params[2:])]


def run(
    make_optimizer: Callable[[list], torch.optim.Optimizer],
    steps: int,
    problem: Problem | None = None,
    dtype: torch.dtype | None = None,
    groups: Callable[[list[torch.Tensor]], list] = lambda ps: ps,
) -> list[torch.Tensor]:
    """Run ``steps`` steps from the problem's initial point; return the final parameters."""
    problem = problem or Problem()
    params = problem.params(dtype)
    optimizer = make_optimizer(groups(params))
    for t in range(steps):
        problem.set_grads(params, t)
        optimizer.step()
    return [p.detach().clone() for p in params]


def max_relative_error(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> float:
    """max over tensors of ‖expected - actual‖∞ / ‖expected‖∞ (complex tensors: over their
    real and imaginary parts)."""
    def real(t: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(t.resolve_conj()).double() if t.is_complex() else t.double()

    return max(
        ((real(e) - real(a)).abs().max() / real(e).abs().max()).item()
        for e, a in zip(expected, actual, strict=True)
    )


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many steps of their floating dtype (fp16, bf16 or fp32, the same for both) lie
    between ``a`` and ``b``, elementwise, as int64: 0 for the same value (+0 and -0 alike), 1 for
    neighbours."""
    bits = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
    assert a.dtype == b.dtype and a.dtype in bits

    def ordinal(x: torch.Tensor) -> torch.Tensor:  # sign-magnitude bits to a monotonic integer
        i = x.contiguous().view(bits[x.dtype]).to(torch.int64)
        magnitude = i & (torch.iinfo(bits[x.dtype]).max)
        return torch.where(i < 0, -magnitude, magnitude)

    return (ordinal(a) - ordinal(b)).abs()


def snapshot(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict:
    """Deep copy of everything a step could change: params, grads, state, hyperparameters."""

    def copy(value):
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v) for v in value)
        return value

    return {
        "params": [copy(p) for p in params],
        "grads": [None if p.grad is None else copy(p.grad) for p in params],
        "state": {i: copy(dict(optimizer.state[p])) for i, p in enumerate(params)},
        "groups": [copy({k: v for k, v in g.items() if k != "params"}) for g in optimizer.param_groups],
    }


def assert_same(a, b) -> None:
    """Bitwise equality of nested snapshots (tensors: same dtype, shape and bits)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert a.layout == b.layout
        if a.is_sparse:
            a, b = a.to_dense(), b.to_dense()
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(
            a.nan_to_num(), b.nan_to_num()
        )
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b or (a != a and b != b)
