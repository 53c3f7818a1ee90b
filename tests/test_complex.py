"""Complex parameters, optimized as torch.optim does: on ``torch.view_as_real`` views.

References: torch.optim.Adam/AdamW (QHAdam/QHAdamW with nus = (1, 1)) and torch.optim.SGD (QHM
with nu = 1 or nu = beta, lr converted) on the same complex parameters, and qhoptim 1.1.0 on
real tensors holding the (real, imaginary) pairs. float64 (complex128), 1e-12 relative: the same
rules, grouped differently, as in test_oracle.py.
"""

import pytest
import qhoptim.pyt as oracle
import torch
from torch._dynamo.utils import counters

import qhfast
import qhfast._fused
from helpers import PATHS, max_relative_error

#: complex parameter shapes, and one real parameter optimized alongside them
COMPLEX_SHAPES = [(5, 3), (7,), (2, 2)]
REAL_SHAPE = (4,)
STEPS = 200
NOISE = 0.5
FLAGS = PATHS + [pytest.param(dict(capturable=True), id="capturable")]


def _flags(flag):
    return flag if isinstance(flag, dict) else dict(foreach=flag)


class ComplexProblem:
    """The quadratic-plus-cosine problem of helpers.Problem on the real coordinates of complex
    parameters: the gradient of a complex parameter z is that of the real loss with respect to
    (Re z, Im z), in the layout torch's autograd gives it (view_as_real(z.grad))."""

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        shapes = [s + (2,) for s in COMPLEX_SHAPES] + [REAL_SHAPE]
        self.init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        self.hessians, self.offsets = [], []
        for x in self.init:
            n = x.numel()
            q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
            self.hessians.append(q @ torch.diag(torch.linspace(0.1, 1.0, n, dtype=torch.float64)) @ q.T)
            self.offsets.append(torch.randn(n, generator=gen, dtype=torch.float64))

    def params(self, as_real: bool = False) -> list[torch.Tensor]:
        """Complex parameters (and the real one), or all as real tensors of pairs."""
        out = []
        for i, x in enumerate(self.init):
            complex_param = i < len(COMPLEX_SHAPES) and not as_real
            out.append((torch.view_as_complex(x) if complex_param else x).clone().requires_grad_())
        return out

    def set_grads(self, params: list[torch.Tensor], step: int) -> None:
        for i, p in enumerate(params):
            x = (torch.view_as_real(p) if p.is_complex() else p).detach().reshape(-1)
            noise = torch.randn(x.shape, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(1000 * step + i))
            g = (self.hessians[i] @ x + self.offsets[i] - 0.05 * torch.sin(x) + NOISE * noise)
            g = g.reshape(self.init[i].shape)
            # a complex gradient of its own, as autograd makes it (not a view of a real tensor:
            # dynamo cannot fakeify a complex view of a real view, which fused=True would meet)
            p.grad = torch.view_as_complex(g).clone() if p.is_complex() else g


def _run(make, steps=STEPS, as_real=False, problem=None):
    problem = problem or ComplexProblem()
    params = problem.params(as_real)
    optimizer = make(params)
    for t in range(steps):
        problem.set_grads(params, t)
        optimizer.step()
    return optimizer, params


def _real(params):
    return [(torch.view_as_real(p) if p.is_complex() else p).detach().clone() for p in params]


def _assert_close(expected, actual):
    expected, actual = _real(expected), _real(actual)
    assert max_relative_error(ComplexProblem().init, expected) > 1e-2  # the params moved
    assert max_relative_error(expected, actual) < 1e-12


def _assert_state_like_torch(torch_optimizer, qhfast_optimizer, params_torch, params_qhfast, keys):
    """Each moment is stored as torch stores it: complex like its param, the param's shape."""
    for p_torch, p_qhfast in zip(params_torch, params_qhfast):
        for torch_key, qhfast_key in keys.items():
            expected = torch_optimizer.state[p_torch][torch_key]
            actual = qhfast_optimizer.state[p_qhfast][qhfast_key]
            assert actual.dtype == expected.dtype == p_qhfast.dtype
            assert actual.shape == expected.shape == p_qhfast.shape


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_qhadam_with_unit_nus_is_torch_adam_on_complex_params(flag, decoupled):
    """QHAdam stores the bias-corrected moments where torch stores the raw ones, so the moments
    are compared through torch's correction: m̂ = m / (1 - β1^t)."""
    betas, lr, wd = (0.9, 0.99), 0.01, 0.05
    torch_cls, qhfast_cls = (torch.optim.AdamW, qhfast.QHAdamW) if decoupled else (torch.optim.Adam, qhfast.QHAdam)
    torch_opt, expected = _run(lambda p: torch_cls(p, lr=lr, betas=betas, weight_decay=wd))
    qh_opt, actual = _run(lambda p: qhfast_cls(p, lr=lr, betas=betas, weight_decay=wd, **_flags(flag)))
    _assert_close(expected, actual)
    _assert_state_like_torch(torch_opt, qh_opt, expected, actual,
                             {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"})
    correction = 1 - betas[0] ** STEPS
    for p_torch, p_qh in zip(expected, actual):
        m_torch = torch_opt.state[p_torch]["exp_avg"] / correction
        assert max_relative_error(_real([m_torch]), _real([qh_opt.state[p_qh]["exp_avg"]])) < 1e-12


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_qhm_is_torch_sgd_on_complex_params(flag, nesterov):
    """QHM's buffer is dampened: torch SGD with lr η is QHM with lr η/(1-β), ν = 1 (or β for
    Nesterov), and QHM's buffer is (1-β) times torch's."""
    lr, beta, wd = 0.05, 0.9, 0.01
    torch_opt, expected = _run(lambda p: torch.optim.SGD(p, lr=lr, momentum=beta, weight_decay=wd,
                                                          nesterov=nesterov))
    qh_opt, actual = _run(lambda p: qhfast.QHM(p, lr=lr / (1 - beta), momentum=beta,
                                               nu=beta if nesterov else 1.0, weight_decay=wd,
                                               **_flags(flag)))
    _assert_close(expected, actual)
    _assert_state_like_torch(torch_opt, qh_opt, expected, actual,
                             {"momentum_buffer": "momentum_buffer"})
    for p_torch, p_qh in zip(expected, actual):
        buffer = torch_opt.state[p_torch]["momentum_buffer"] * (1 - beta)
        assert max_relative_error(_real([buffer]), _real([qh_opt.state[p_qh]["momentum_buffer"]])) < 1e-12


ORACLE_CASES = [
    pytest.param(oracle.QHM, qhfast.QHM, dict(lr=0.5, momentum=0.9, nu=0.7, weight_decay=0.05), id="QHM"),
    pytest.param(oracle.QHM, qhfast.QHM, dict(lr=0.5, momentum=0.9, nu=0.7, weight_decay=0.05,
                                              weight_decay_type="direct"), id="QHM-direct"),
    pytest.param(oracle.QHAdam, qhfast.QHAdam, dict(lr=0.01, betas=(0.95, 0.998), nus=(0.7, 0.9),
                                                    weight_decay=0.1), id="QHAdam"),
    pytest.param(oracle.QHAdamW, qhfast.QHAdamW, dict(lr=0.01, nus=(0.7, 0.9), weight_decay=0.1),
                 id="QHAdamW"),
]


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("oracle_cls, qhfast_cls, kwargs", ORACLE_CASES)
def test_complex_params_follow_qhoptim_on_their_real_views(oracle_cls, qhfast_cls, kwargs, flag):
    """The QH terms (ν ≠ 1, ν2 ≠ 1) on complex params: qhoptim run on the real pairs."""
    _, expected = _run(lambda p: oracle_cls(p, **kwargs), as_real=True)
    _, actual = _run(lambda p: qhfast_cls(p, **kwargs, **_flags(flag)))
    _assert_close(expected, actual)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "compiled"])
def test_fused_step_on_complex_params(kernel, monkeypatch):
    """fused=True on complex params: the C kernel on their real views (their parts are
    independent elements), or, without it, the compiled step, which views complex chunks as
    real (the same place as the eager paths); against qhoptim on the real views, 1e-12
    (float64; the kernel's one division, inductor's regrouping)."""
    monkeypatch.setattr(qhfast._fused, "CPU_KERNEL", kernel)
    kwargs = dict(lr=0.01, betas=(0.95, 0.998), nus=(0.7, 0.9), weight_decay=0.1)
    _, expected = _run(lambda p: oracle.QHAdam(p, **kwargs), steps=20, as_real=True)
    _, actual = _run(lambda p: qhfast.QHAdam(p, **kwargs, fused=True), steps=20)
    assert max_relative_error(_real(expected), _real(actual)) < 1e-12
    if kernel:
        assert counters["stats"]["unique_graphs"] == 0  # nothing compiled: the kernel ran
    else:
        assert counters["stats"]["unique_graphs"] >= 1  # it did compile


@pytest.mark.parametrize("name", ["QHM", "QHAdam"])
def test_complex_state_dict_round_trip_continues_the_trajectory(name):
    make = {"QHM": lambda p: qhfast.QHM(p, lr=0.5, momentum=0.9, nu=0.7),
            "QHAdam": lambda p: qhfast.QHAdam(p, lr=0.01, nus=(0.7, 0.9))}[name]
    problem = ComplexProblem()
    _, expected = _run(make, steps=20)
    params = problem.params()
    optimizer = make(params)
    for t in range(10):
        problem.set_grads(params, t)
        optimizer.step()
    saved = optimizer.state_dict()
    restored = make(params)
    restored.load_state_dict(saved)
    for p in params[:len(COMPLEX_SHAPES)]:
        for value in restored.state[p].values():
            assert value.dim() == 0 or value.dtype == torch.complex128
    for t in range(10, 20):
        problem.set_grads(params, t)
        restored.step()
    for e, a in zip(expected, params):
        assert torch.equal(e, a)


def test_bf16_state_set_between_steps_for_a_complex_param_raises_and_changes_nothing():
    """(The constructor's errors for complex params are in test_bad_input.py.)"""
    p = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    optimizer = qhfast.QHAdam([p])
    optimizer.param_groups[0]["state_dtype"] = torch.bfloat16
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="state_dtype must be None"):
        optimizer.step()
    assert not optimizer.state and torch.equal(p, torch.zeros_like(p))
