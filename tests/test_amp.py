"""torch.amp.GradScaler: qhfast takes grad_scale/found_inf (``_step_supports_amp_scaling``),
unscales inside the update (fp16 gradients included) and skips a step with an inf gradient
without changing anything."""

import pytest
import torch

from helpers import OPTIMIZERS, PATHS, Problem, assert_same, max_relative_error, snapshot

LOW = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
CAPTURABLE = [pytest.param(False, id="float_path"), pytest.param(True, id="device_path")]


def _backward(params, problem, step, scaler=None, poison=False):
    """loss = Σ <g_i, p_i> with the problem's gradient g_i, so p.grad = g (times the scale)."""
    loss = sum((problem.grad(i, p, step).float() * p.float()).sum() for i, p in enumerate(params))
    if poison:
        loss = loss + params[0].float().sum() * float("inf")
    (scaler.scale(loss) if scaler is not None else loss).backward()


@pytest.mark.parametrize("capturable", CAPTURABLE)
@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_inf_gradient_skips_the_step_and_halves_the_scale(name, dtype, foreach, capturable):
    problem = Problem()
    params = problem.params(dtype)
    optimizer = OPTIMIZERS[name](params, foreach=foreach, capturable=capturable)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for t in range(3):  # state exists before the bad step
        optimizer.zero_grad()
        _backward(params, problem, t, scaler)
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad()
    _backward(params, problem, 3, scaler, poison=True)
    assert not params[0].grad.isfinite().all()
    before = snapshot(optimizer, params)
    scaler.step(optimizer)
    assert_same(snapshot(optimizer, params), before)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    optimizer.zero_grad()  # and training goes on
    _backward(params, problem, 4, scaler)
    scaler.step(optimizer)
    assert not torch.equal(params[0], before["params"][0])


@pytest.mark.parametrize("capturable", CAPTURABLE)
@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_skipped_step_with_a_finite_gradient_whose_square_overflows_changes_nothing(
        name, foreach, capturable):
    """The sync-free paths skip a step arithmetically (every update times 1 - found_inf): one
    param's inf must not let another's finite 1e20 gradient in, whose square overflows fp32 and
    times 0 would be NaN (it was, in the moments and the params, on the device path)."""
    params = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))]
    optimizer = OPTIMIZERS[name](params, foreach=foreach, capturable=capturable)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    scaler.scale(torch.ones(()))  # (makes the scale tensor)
    for p in params:
        p.grad = torch.ones(4)
    scaler.step(optimizer)
    scaler.update()
    params[0].grad = torch.tensor([float("inf"), 1.0, 1.0, 1.0])
    params[1].grad = torch.full((4,), 1e20)
    before = snapshot(optimizer, params)
    scaler.step(optimizer)
    assert_same(snapshot(optimizer, params), before)


def _fp32_values(optimizer, params):
    """The fp32 values the update produced: masters for bf16/fp16 params, else the params."""
    return [optimizer.state[p].get("master_param", p).detach().clone() for p in params]


@pytest.mark.parametrize("capturable", CAPTURABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_scaled_trajectory_equals_the_unscaled_one(name, dtype, capturable):
    """Loss scaling by a power of two is exact in autograd (the scale stays below overflow here:
    no step is skipped) and the update multiplies by its exact reciprocal. On the float path the
    trajectories are identical bit for bit. On the device path the skip factor (1 - found_inf)
    turns float coefficients into 0-d tensors (a multiply then an add where the float path adds
    with alpha in one rounding), so the runs differ by a few fp32 ulps per step: 1e-5 relative
    over 20 steps of this contracting problem is far above that and far below a real error."""
    problem = Problem()
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=5)):
        params = problem.params(dtype)
        optimizer = OPTIMIZERS[name](params, capturable=capturable)
        for t in range(20):
            optimizer.zero_grad()
            _backward(params, problem, t, scaler)
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
        results.append(_fp32_values(optimizer, params))
    assert scaler.get_scale() == 2.0**12  # grew 4 times, never backed off: no skipped step
    if capturable:
        assert max_relative_error(*results) < 1e-5
    else:
        assert_same(results[0], results[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_unscale_then_clip_then_step(name, dtype):
    """scaler.unscale_(opt) before clipping still works: the step then gets found_inf and no
    grad_scale (torch refuses fp16 gradients in unscale_ itself, whatever the optimizer)."""
    problem = Problem()
    results = []
    for use_scaler in (False, True):
        params = problem.params(dtype)
        optimizer = OPTIMIZERS[name](params)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=use_scaler)
        for t in range(10):
            optimizer.zero_grad()
            _backward(params, problem, t, scaler)
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
            scaler.step(optimizer)
            scaler.update()
        results.append(snapshot(optimizer, params)["params"])
    assert_same(results[0], results[1])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_device_path_reads_no_value_on_the_host_under_a_grad_scaler(name, monkeypatch):
    """capturable=True: neither the unscale nor the skip reads a tensor on the host."""
    problem = Problem()
    params = problem.params(torch.float16)
    optimizer = OPTIMIZERS[name](params, capturable=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # fp16 gradients of ~10 fit

    def host_read(*args, **kwargs):
        raise AssertionError("host read of a tensor value inside step()")

    def forbid(*args):
        for method in ("item", "tolist", "__float__", "__int__", "__bool__"):
            monkeypatch.setattr(torch.Tensor, method, host_read)

    optimizer.register_step_pre_hook(forbid)
    optimizer.register_step_post_hook(lambda *args: monkeypatch.undo())
    for poison in (False, True):
        optimizer.zero_grad()
        _backward(params, problem, 0, scaler, poison=poison)
        scaler.step(optimizer)
        scaler.update()
    assert scaler.get_scale() == 2.0**9  # one skipped step


def test_fp16_gradients_are_unscaled_in_fp32():
    """torch's own unscale_ refuses fp16 gradients; the hand-off unscales them in the fp32
    compute dtype, so a scaled fp16 gradient near fp16's max still gives the right update."""

    def scaled_backward(param, scaler):
        param.grad = None
        scaler.scale((param.float() * torch.tensor([1.0, 2.0, 3.0])).sum()).backward()

    param = torch.zeros(3, dtype=torch.float16, requires_grad=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    scaled_backward(param, scaler)
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(torch.optim.SGD([param], lr=1.0))  # what torch's optimizers get

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    optimizer = OPTIMIZERS["QHM"]([param], lr=1.0, momentum=0.0, nu=0.0)
    scaled_backward(param, scaler)
    assert param.grad.dtype == torch.float16 and param.grad[2].item() == 3.0 * 2.0**14
    scaler.step(optimizer)
    assert torch.equal(param, torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float16))


@pytest.mark.parametrize("found", [0.0, 1.0])
def test_functional_qhadam_with_found_inf_on_cpu_counters(found):
    """The functional API alone: found_inf with CPU counters and capturable=False still skips
    exactly (the counters take the device-side path), and found_inf = 0 is a normal step."""
    from qhfast.functional import qhadam

    problem = Problem()
    params = problem.params()
    grads = [problem.grad(i, p, 0) for i, p in enumerate(params)]
    state = [[torch.full_like(p, 0.1) for p in params], [torch.full_like(p, 0.2) for p in params],
             [torch.tensor(2.0, dtype=torch.float64) for _ in params],
             [torch.tensor(2.0, dtype=torch.float64) for _ in params]]
    before = [[t.clone() for t in ts] for ts in [params] + state]
    with torch.no_grad():  # the functional API updates params in place, as torch's does
        qhadam(params, grads, *state, lr=0.01, betas=(0.9, 0.99), nus=(0.7, 1.0), eps=1e-8,
               found_inf=torch.tensor(found))
    after = [params] + state
    changed = [not all(torch.equal(a, b) for a, b in zip(xs, ys)) for xs, ys in zip(after, before)]
    assert changed == ([False] * 5 if found else [True] * 5)


@pytest.mark.parametrize(
    "mode", [{}, {"capturable": True}, {"fused": True}], ids=["float_path", "device_path", "fused"]
)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_skipped_first_step_leaves_a_fresh_optimizer(name, mode):
    """fp16 training often skips its very first step (the initial scale overflows). Before any
    step QHAdam's normalizers are 0: the skip must not compute 1/0 (0·inf is NaN). After the
    skip, training goes on exactly as if the poisoned step had never been taken."""
    problem = Problem()
    runs = []
    for poisoned_first in (True, False):
        params = problem.params(torch.float32)
        optimizer = OPTIMIZERS[name](params, **mode)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        if poisoned_first:
            _backward(params, problem, 0, scaler, poison=True)
            start = [p.detach().clone() for p in params]
            scaler.step(optimizer)
            scaler.update()
            assert scaler.get_scale() == 2.0**9
            assert_same([p.detach() for p in params], start)
            for state in optimizer.state.values():
                for value in state.values():
                    assert not value.any(), state  # moments and normalizers still 0
        for t in range(1, 4):
            optimizer.zero_grad()
            _backward(params, problem, t, scaler)
            scaler.step(optimizer)
            scaler.update()
        runs.append([p.detach().clone() for p in params])
    assert_same(runs[0], runs[1])


@pytest.mark.parametrize("capturable", [False, True], ids=["float_path", "device_path"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_grad_scale_and_found_inf_of_shape_1_are_taken_as_0_d(name, capturable):
    """GradScaler's tensors are of shape (1,), and torch's fused optimizers take those: the
    same steps with (1,)-shaped and 0-d grad_scale/found_inf land on the same bits. A tensor of
    two elements raises ValueError naming it and changes nothing."""
    finals = []
    for shape in ((), (1,)):
        problem = Problem()
        params = problem.params(torch.float32)
        optimizer = OPTIMIZERS[name](params, capturable=capturable)
        for t, skip in enumerate((0.0, 1.0, 0.0)):
            problem.set_grads(params, t)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(8.0)
            optimizer.grad_scale = torch.full(shape, 8.0)
            optimizer.found_inf = torch.full(shape, skip)
            optimizer.step()
        finals.append(snapshot(optimizer, params))
    assert_same(finals[0], finals[1])
    optimizer.grad_scale = torch.full((2,), 8.0)
    with pytest.raises(ValueError, match="grad_scale must be a tensor of one element"):
        optimizer.step()
    assert_same(snapshot(optimizer, params), finals[1])
