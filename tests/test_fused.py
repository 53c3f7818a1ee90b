"""fused=True: each group's step runs as one torch.compile'd (inductor) function.

Each test compiles small graphs (4 tensors); a few seconds each on a CPU.
"""

import gc
import weakref

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from helpers import OPTIMIZERS, Problem, assert_same, max_relative_error, run, snapshot


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fused_computes_the_eager_trajectory(name):
    """float64, 1e-12 relative (as for the capturable path: the counters are float64 device
    tensors, and inductor only regroups float64 operations). The problem's intermittent
    gradient changes which params have one, so the group recompiles and both graphs run."""
    expected = run(lambda p: OPTIMIZERS[name](p, foreach=False), 40)
    actual = run(lambda p: OPTIMIZERS[name](p, fused=True), 40)
    assert max_relative_error(expected, actual) < 1e-12
    assert counters["stats"]["unique_graphs"] >= 2  # it did compile


def _trajectory(fused: bool, steps: int, change) -> list[torch.Tensor]:
    """QHAdam on the problem, every parameter with a gradient each step (one graph);
    ``change(t, group)`` edits the param group before step t, as a scheduler would."""
    problem = Problem()
    params = problem.params()
    optimizer = OPTIMIZERS["QHAdam"](params, fused=fused)
    for t in range(steps):
        for i, p in enumerate(params):
            p.grad = problem.grad(i, p, t)
        change(t, optimizer.param_groups[0])
        optimizer.step()
    return [p.detach().clone() for p in params]


def test_a_float_lr_schedule_neither_recompiles_nor_is_baked_in():
    """The float lr halves every step (what StepLR does to the group): one graph for the whole
    run, and the trajectory is the eager one (a constant baked into the graph would differ)."""

    def halve(t, group):
        group["lr"] = 0.01 * 0.5**t

    expected = _trajectory(False, 6, halve)
    actual = _trajectory(True, 6, halve)
    assert counters["stats"]["unique_graphs"] == 1
    assert max_relative_error(expected, actual) < 1e-12


def test_bf16_params_with_masters():
    """bf16 params: the fused step updates the fp32 masters as the eager foreach path does and
    writes each param as its master rounded to bf16. Masters: 1e-5 relative after 20 steps,
    fp32 rounding regrouped by inductor (~1e-7 per op) accumulating over the steps."""
    problem = Problem()
    results = []
    for fused in (False, True):
        params = problem.params(torch.bfloat16)
        optimizer = OPTIMIZERS["QHAdamW"](params, fused=fused, foreach=None if fused else True)
        for t in range(20):
            problem.set_grads(params, t)
            optimizer.step()
        masters = [optimizer.state[p]["master_param"] for p in params]
        for p, master in zip(params, masters):
            assert torch.equal(p, master.to(torch.bfloat16))
        results.append(masters)
    assert max_relative_error(*results) < 1e-5


def test_an_inf_gradient_under_a_grad_scaler_skips_the_step():
    problem = Problem()
    params = problem.params(torch.float16)
    optimizer = OPTIMIZERS["QHAdam"](params, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def backward(t, poison=False):
        optimizer.zero_grad()
        loss = sum((problem.grad(i, p, t).float() * p.float()).sum() for i, p in enumerate(params))
        if poison:
            loss = loss + params[0].float().sum() * float("inf")
        scaler.scale(loss).backward()

    for t in range(3):
        backward(t)
        scaler.step(optimizer)
        scaler.update()
    backward(3, poison=True)
    before = snapshot(optimizer, params)
    scaler.step(optimizer)
    assert_same(snapshot(optimizer, params), before)
    scaler.update()
    assert scaler.get_scale() == 2.0**9


def test_state_dict_moves_between_fused_and_eager():
    """A fused optimizer's checkpoint resumes in an eager one (and back) on the same path."""
    problem = Problem()
    params = problem.params()
    optimizer = OPTIMIZERS["QHAdam"](params, fused=True)
    for t in range(5):
        problem.set_grads(params, t)
        optimizer.step()
    saved = optimizer.state_dict()
    start = [p.detach().clone() for p in params]
    finals = []
    for fused in (True, False):
        resumed = [x.clone().requires_grad_() for x in start]
        other = OPTIMIZERS["QHAdam"](resumed, fused=fused)
        other.load_state_dict(saved)
        for t in range(5, 10):
            problem.set_grads(resumed, t)
            other.step()
        finals.append([p.detach() for p in resumed])
    assert max_relative_error(*finals) < 1e-12


def test_the_compiled_steps_do_not_keep_the_optimizer_alive():
    problem = Problem()
    params = problem.params()
    optimizer = OPTIMIZERS["QHM"](params, fused=True)
    problem.set_grads(params, 0)
    optimizer.step()
    alive = weakref.ref(optimizer)
    del optimizer
    gc.collect()
    assert alive() is None


def test_fused_inside_a_compiled_step_is_the_compiled_step():
    """torch.compile(opt.step) of a fused optimizer traces the step once (no nested compile of
    the group function) and computes the eager trajectory."""
    from torch._dynamo.testing import CompileCounter

    problem = Problem()
    expected = run(lambda p: OPTIMIZERS["QHM"](p, foreach=False), 6, problem)
    params = problem.params()
    optimizer = OPTIMIZERS["QHM"](params, fused=True)
    backend = CompileCounter()
    step = torch.compile(optimizer.step, backend=backend, fullgraph=True)
    for t in range(6):
        problem.set_grads(params, t)
        step()
    assert max_relative_error(expected, [p.detach() for p in params]) < 1e-12
    assert 0 < backend.frame_count <= 3  # the step's own graphs (which params have grads)
    assert counters["stats"]["unique_graphs"] == backend.frame_count


def test_betas_schedules_do_not_recompile_and_a_nus_change_does():
    """betas (cycled by OneCycleLR) enter the graph as tensors like lr: no recompile; nus are
    constants of the graph (a smaller graph), so changing them recompiles once. Either way the
    trajectory is the eager one with the same changes."""

    def change(t, group):
        if t == 3:
            group["nus"] = (0.5, 0.9)
        if t >= 4:
            group["betas"] = (0.9 - 0.02 * t, 0.99)

    expected = _trajectory(False, 8, change)
    actual = _trajectory(True, 8, change)
    assert counters["stats"]["unique_graphs"] == 2
    assert max_relative_error(expected, actual) < 1e-12


def test_lean_precision_modes_fused():
    """fused=True with bf16 params: kahan (with bf16 moments) and stochastic rounding (with bf16
    moments) compile into the group step. Each tracks the eager fp32 run within the bounds of
    test_low_precision_modes.test_each_mode_tracks_the_fp32_run (2 and 8 bf16 eps over 300
    steps; here 30), keeps the state its mode promises, and a run is reproducible from the RNG
    state (inductor seeds its random numbers from torch's generator)."""
    problem = Problem()

    def final(dtype, **options):
        torch.manual_seed(0)
        params = problem.params(dtype)
        optimizer = OPTIMIZERS["QHAdamW"](params, **options)
        for t in range(30):
            for i, p in enumerate(params):  # every param every step: one graph
                p.grad = problem.grad(i, p, t)
            optimizer.step()
        return [p.detach().clone() for p in params], optimizer

    expected, _ = final(torch.float32)
    eps = torch.finfo(torch.bfloat16).eps
    kahan, optimizer = final(torch.bfloat16, fused=True, low_precision="kahan",
                             state_dtype=torch.bfloat16)
    assert max_relative_error(expected, kahan) < 2 * eps
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert {k: v.dtype for k, v in state.items() if v.dim() > 0} == {
        "kahan_compensation": torch.bfloat16, "exp_avg": torch.bfloat16,
        "exp_avg_sq": torch.bfloat16}
    assert state["kahan_compensation"].any()
    stochastic, _ = final(torch.bfloat16, fused=True, low_precision="stochastic",
                          state_dtype=torch.bfloat16)
    assert max_relative_error(expected, stochastic) < 8 * eps
    again, _ = final(torch.bfloat16, fused=True, low_precision="stochastic",
                     state_dtype=torch.bfloat16)
    for a, b in zip(stochastic, again):
        assert torch.equal(a, b)


def test_a_skipped_grad_scaler_step_changes_nothing_in_a_fused_kahan_step():
    problem = Problem()
    params = problem.params(torch.float16)
    optimizer = OPTIMIZERS["QHAdam"](params, fused=True, low_precision="kahan",
                                     state_dtype=torch.bfloat16)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def backward(t, poison=False):
        optimizer.zero_grad()
        loss = sum((problem.grad(i, p, t).float() * p.float()).sum() for i, p in enumerate(params))
        if poison:
            loss = loss + params[0].float().sum() * float("inf")
        scaler.scale(loss).backward()

    for t in range(3):
        backward(t)
        scaler.step(optimizer)
        scaler.update()
    backward(3, poison=True)
    before = snapshot(optimizer, params)
    scaler.step(optimizer)
    assert_same(snapshot(optimizer, params), before)
