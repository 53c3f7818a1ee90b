"""torch.compile: the step compiles whole (fullgraph), a scheduler changing a tensor lr causes no
recompile, and the compiled step computes what eager does.

Graph-structure tests use a counting backend (no code generation, fast); one test runs inductor.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

import qhfast
from helpers import OPTIMIZERS, Problem, max_relative_error

TENSOR_LR = {
    "QHM": lambda p, **kw: OPTIMIZERS["QHM"](p, lr=torch.tensor(0.5), **kw),
    "QHAdam": lambda p, **kw: OPTIMIZERS["QHAdam"](p, lr=torch.tensor(0.01), **kw),
    "QHAdamW": lambda p, **kw: OPTIMIZERS["QHAdamW"](p, lr=torch.tensor(0.01), **kw),
}


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _compiled_run(make, dtype, steps, **kwargs):
    """Compile opt.step (before the scheduler wraps it), StepLR halving lr every step. Every
    param gets a gradient every step: a change in which params have one is a new graph."""
    problem = Problem()
    params = problem.params(dtype)
    optimizer = make(params, **kwargs)
    backend = CompileCounter()
    step = torch.compile(optimizer.step, backend=backend, fullgraph=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    frames = []
    for t in range(steps):
        for i, p in enumerate(params):
            p.grad = problem.grad(i, p, t)
        step()
        scheduler.step()
        frames.append(backend.frame_count)
    return frames


# The scheduler wraps opt.step to notice calls; the step compiled before it bypasses the wrapper.
SCHEDULER_WARNING = "ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`"


@pytest.mark.filterwarnings(SCHEDULER_WARNING)
@pytest.mark.parametrize("capturable", [False, True], ids=["default", "capturable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", TENSOR_LR)
def test_fullgraph_and_no_recompile_when_a_tensor_lr_changes(name, dtype, capturable):
    """Two graphs: the first step (which creates the state) and the steady step; then lr
    changes every step and nothing recompiles. fullgraph=True raises on any graph break."""
    frames = _compiled_run(TENSOR_LR[name], dtype, 8, capturable=capturable)
    assert frames == [1] + [2] * 7
    assert sum(counters["graph_break"].values()) == 0


def test_the_recompile_counter_is_live():
    """A change the graph depends on (a flag) does recompile, so the counts above mean what they
    say."""
    problem = Problem()
    params = problem.params(torch.float32)
    optimizer = TENSOR_LR["QHAdam"](params)
    backend = CompileCounter()
    step = torch.compile(optimizer.step, backend=backend, fullgraph=True)
    for t in range(4):
        for i, p in enumerate(params):
            p.grad = problem.grad(i, p, t)
        if t == 3:
            optimizer.param_groups[0]["maximize"] = True
        step()
    assert backend.frame_count == 3


def test_float_hyperparameters_changed_between_compiled_steps_trace():
    """A float hyperparameter set between steps (a hand-written schedule): dynamo makes a
    changed float symbolic, and the step's check of hyperparameters set between steps
    (``math.isfinite``) could not be traced in a fullgraph compile; a compiled step checks the
    flags only."""
    problem = Problem()
    params = problem.params(torch.float32)
    optimizer = TENSOR_LR["QHAdam"](params)
    step = torch.compile(optimizer.step, backend=CompileCounter(), fullgraph=True)
    for t in range(4):
        for i, p in enumerate(params):
            p.grad = problem.grad(i, p, t)
        optimizer.param_groups[0]["eps"] = 1e-8 * (t + 1)
        optimizer.param_groups[0]["nus"] = (0.7 + 0.01 * t, 1.0)
        step()


def test_compiled_train_step_breaks_only_outside_the_optimizer():
    """Compiling a whole train step: dynamo breaks the graph at torch's own zero_grad (marked
    skipped by torch) and at backward(); qhfast's step adds no break and no recompile."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = qhfast.QHAdam(model.parameters(), lr=torch.tensor(0.01), nus=(0.7, 1.0))
    inputs, targets = torch.randn(16, 4), torch.randn(16, 1)

    def train_step():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        return loss

    backend = CompileCounter()
    compiled = torch.compile(train_step, backend=backend)
    for _ in range(3):
        compiled()
    after_warm_up = backend.frame_count
    for _ in range(3):
        compiled()
    assert backend.frame_count == after_warm_up
    reasons = list(counters["graph_break"])
    assert reasons and all("zero_grad" in r or "backward" in r for r in reasons), reasons


def test_inductor_compiled_step_matches_eager():
    """Inductor fuses the fp32 ops (FMA, reordering): each step differs from eager by a few fp32
    ulps, and 40 steps on this contracting problem keep the gap below 1e-5 relative (measured:
    about 1e-7). bf16 params with fp32 masters, the most involved path; eager on the foreach
    path, which the compiled step takes (the per-tensor path rounds the QH numerator in another
    order, and through bf16 params a 1-ulp master difference can flip a rounding and grow).
    Every param has a gradient every step: two graphs (the first step, the steady one). A
    change in which params have one is another graph of the same code; test_fused's
    compiled group step runs such graphs under inductor."""
    results = []
    for compiled in (False, True):
        problem = Problem()
        params = problem.params(torch.bfloat16)
        optimizer = TENSOR_LR["QHAdamW"](params, foreach=None if compiled else True)
        step = torch.compile(optimizer.step, fullgraph=True) if compiled else optimizer.step
        for t in range(40):
            for i, p in enumerate(params):
                p.grad = problem.grad(i, p, t)
            step()
        results.append([optimizer.state[p]["master_param"].clone() for p in params])
    assert max_relative_error(*results) < 1e-5


LEAN_MODES = [pytest.param(dict(low_precision="kahan"), id="kahan"),
              pytest.param(dict(low_precision="stochastic", state_dtype=torch.bfloat16),
                           id="stochastic_bf16_state")]


@pytest.mark.filterwarnings(SCHEDULER_WARNING)
@pytest.mark.parametrize("capturable", [False, True], ids=["default", "capturable"])
@pytest.mark.parametrize("mode", LEAN_MODES)
@pytest.mark.parametrize("name", TENSOR_LR)
def test_lean_precision_modes_compile_whole_and_do_not_recompile(name, mode, capturable):
    """The compensation's arithmetic and the random draws of stochastic rounding trace into
    the graph: no break, and a changing tensor lr recompiles nothing."""
    frames = _compiled_run(TENSOR_LR[name], torch.bfloat16, 8, capturable=capturable, **mode)
    assert frames == [1] + [2] * 7
    assert sum(counters["graph_break"].values()) == 0
