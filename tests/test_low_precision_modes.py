"""Memory-lean precision: ``low_precision`` ("master", "kahan", "stochastic", "nearest") and
``state_dtype=torch.bfloat16``, on every path, against fp32 references and statistics."""

import copy
import io

import re

import pytest
import torch

import qhfast
import qhfast._precision as precision
from helpers import OPTIMIZERS, Problem, assert_same, max_relative_error, snapshot

LOW = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
#: the update paths a low-precision mode must work on without torch.compile (the default is
#: the CPU kernel, built with cc)
EAGER_PATHS = [pytest.param({}, id="default_kernel"),
               pytest.param(dict(foreach=False), id="per_tensor"),
               pytest.param(dict(foreach=True), id="foreach"),
               pytest.param(dict(capturable=True), id="capturable")]
MODES = ["master", "kahan", "stochastic", "nearest"]


def _buffer_keys(name):
    return ("momentum_buffer",) if name == "QHM" else ("exp_avg", "exp_avg_sq")


# --------------------------------------------------------------------------------------------
# stochastic rounding itself


def _neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The two values of ``dtype`` around each fp32 ``x`` (equal where x is representable),
    found by nextafter from the value rounded toward zero: independent of the code under test."""
    nearest = x.to(dtype)
    below_or_at = torch.where(nearest.float() <= x, nearest,
                              torch.nextafter(nearest, torch.full_like(nearest, -float("inf"))))
    above = torch.where(below_or_at.float() == x, below_or_at,
                        torch.nextafter(below_or_at, torch.full_like(nearest, float("inf"))))
    return below_or_at, above


@pytest.mark.parametrize("dtype", LOW)
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(dtype):
    """Values spread over many binades (fp16: subnormals included), both signs. Each draw is one
    of the two neighbours; over 2000 draws the mean of each element is within 5 standard errors
    of x (the error of one draw is at most one gap, so its std is at most gap/2)."""
    gen = torch.Generator().manual_seed(0)
    magnitudes = torch.logspace(-6, 3, 256) if dtype == torch.float16 else torch.logspace(-30, 30, 256)
    x = magnitudes * (torch.rand(256, generator=gen) + 0.5)
    x = torch.cat([x, -x])
    low, high = _neighbours(x, dtype)
    draws = 2000
    total = torch.zeros_like(x, dtype=torch.float64)
    torch.manual_seed(1)
    for _ in range(draws):
        out = torch.empty_like(x, dtype=dtype)
        precision.stochastic_round_([out], [x])
        assert ((out == low) | (out == high)).all()
        total += out.double()
    gap = (high.double() - low.double()).abs()
    standard_error = gap / 2 / draws**0.5
    assert ((total / draws - x.double()).abs() <= 5 * standard_error + 1e-300).all()
    assert ((total / draws) != low.double()).any()  # it does round up sometimes


@pytest.mark.parametrize("dtype", LOW)
def test_stochastic_rounding_keeps_representable_values_and_specials(dtype):
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 0.125, float("inf"), -float("inf")]).to(dtype)
    out = torch.empty_like(exact)
    for _ in range(50):
        precision.stochastic_round_([out], [exact.float()])
        assert torch.equal(out, exact) and torch.equal(out.signbit(), exact.signbit())
    out = torch.empty(1, dtype=dtype)
    precision.stochastic_round_([out], [torch.tensor([float("nan")])])
    assert out.isnan().all()


@pytest.mark.parametrize("dtype", LOW)
def test_nearest_value_is_the_cast(dtype):
    """Round-to-nearest-even written as integer/fp32 arithmetic (kahan's split) agrees with
    torch's cast on every binade, subnormals, ties, overflow and specials."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.logspace(-45, 38, 4000) * (torch.rand(4000, generator=gen) + 0.5),
                   torch.tensor([0.0, 65519.0, 65520.0, 1e6, float("inf"), float("nan")])])
    representable = x.to(dtype).float()
    ties = (representable + torch.nextafter(x.to(dtype), torch.tensor(float("inf"), dtype=dtype))
            .float()) / 2  # exactly halfway between two values of dtype
    # NaNs whose low mantissa bits are set (an fp32 gradient's): the rounding must not carry
    # them into the sign or the exponent
    payloads = torch.tensor([0x7FFFFFFF, 0x7FFF8000, 0x7F800001, -0x7FFFFF],
                            dtype=torch.int32).view(torch.float32)
    x = torch.cat([x, ties, -x, -ties, payloads])
    expected = x.to(dtype).float()
    actual = precision.nearest_value(x, dtype)
    assert torch.equal(actual.isnan(), expected.isnan())
    keep = ~expected.isnan()
    assert torch.equal(actual[keep], expected[keep])
    assert torch.equal(actual[keep].signbit(), expected[keep].signbit())


@pytest.mark.parametrize("dtype", LOW)
def test_rounding_survives_torch_compile(dtype):
    """Inductor drops a down-and-up cast pair (x.to(bf16).float() becomes x) unless told to
    emulate precision casts; the rounding must not be written that way, or under a compiled
    step kahan's residual is 0 and stochastic rounding never rounds. Compiled, the nearest
    value is the cast's and stochastic rounding still picks both neighbours, unbiased."""
    torch._dynamo.reset()
    x = torch.full((20000,), 1.0 + 2.0**-12) * torch.tensor([1.0, -3.0]).repeat(10000)
    nearest = torch.compile(lambda v: precision.nearest_value(v, dtype), fullgraph=True)(x)
    assert torch.equal(nearest, x.to(dtype).float())

    def sr(v):
        out = torch.empty_like(v, dtype=dtype)
        precision.stochastic_round_([out], [v])
        return out

    torch.manual_seed(0)
    rounded = torch.compile(sr, fullgraph=True)(x).double()
    low, high = _neighbours(x, dtype)
    assert ((rounded == low.double()) | (rounded == high.double())).all()
    assert (rounded == high.double()).any() and (rounded == low.double()).any()
    # the mean error of 10000 draws of each value: std ≤ gap/2/100; bound 5 std
    for sign in (0, 1):
        error = (rounded[sign::2] - x[sign::2].double()).mean()
        gap = (high[sign] - low[sign]).abs().double()
        assert abs(error) <= 5 * gap / 2 / 100
    torch._dynamo.reset()


def test_stochastic_rounding_is_reproducible_from_the_rng_state():
    x = torch.randn(1000)
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        out = torch.empty(1000, dtype=torch.bfloat16)
        precision.stochastic_round_([out], [x])
        outs.append(out)
    assert torch.equal(*outs)


# --------------------------------------------------------------------------------------------
# memory


STATE_BYTES = {
    # (optimizer, low_precision, state_dtype): state bytes per bf16 parameter element
    ("QHAdam", "master", None): 12, ("QHAdam", "kahan", None): 10,
    ("QHAdam", "kahan", torch.bfloat16): 6, ("QHAdam", "stochastic", torch.bfloat16): 4,
    ("QHAdam", "stochastic", None): 8, ("QHAdam", "nearest", None): 8,
    ("QHAdam", "master", torch.bfloat16): 8,
    ("QHM", "master", None): 8, ("QHM", "kahan", None): 6,
    ("QHM", "kahan", torch.bfloat16): 4, ("QHM", "stochastic", torch.bfloat16): 2,
    ("QHM", "stochastic", None): 4, ("QHM", "nearest", None): 4,
}


@pytest.mark.parametrize("key", STATE_BYTES, ids=lambda k: f"{k[0]}-{k[1]}-{k[2]}")
def test_state_bytes_per_bf16_parameter(key):
    name, mode, state_dtype = key
    problem = Problem()
    params = problem.params(torch.bfloat16)
    optimizer = OPTIMIZERS[name](params, low_precision=mode, state_dtype=state_dtype)
    problem.set_grads(params, 10)
    optimizer.step()
    stepped = [p for p in params if optimizer.state[p]]
    size = sum(v.numel() * v.element_size() for p in stepped for v in optimizer.state[p].values()
               if v.dim() > 0)  # 0-d step counters are per tensor, not per element
    assert size / sum(p.numel() for p in stepped) == STATE_BYTES[key]
    state = optimizer.state[params[0]]
    assert ("master_param" in state) == (mode == "master")
    assert ("kahan_compensation" in state) == (mode == "kahan")
    if mode == "kahan":
        assert state["kahan_compensation"].dtype == torch.bfloat16


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bf16_state_for_fp32_parameters(name):
    problem = Problem()
    params = problem.params(torch.float32)
    optimizer = OPTIMIZERS[name](params, state_dtype=torch.bfloat16, low_precision="kahan")
    problem.set_grads(params, 10)
    optimizer.step()
    state = optimizer.state[params[0]]
    assert {k for k, v in state.items() if v.dim() > 0} == set(_buffer_keys(name))
    assert all(state[k].dtype == torch.bfloat16 for k in _buffer_keys(name))


# --------------------------------------------------------------------------------------------
# exactness of each mechanism, one step at a time, against an fp32 optimizer


@pytest.mark.parametrize("path", EAGER_PATHS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_kahan_step_is_the_fp32_step_on_param_plus_compensation(name, dtype, path):
    """Before each step an fp32 twin is set to θ + c (exact in fp32); after it, θ must be the
    twin's result rounded to nearest, bit for bit, and c one of the two neighbours of the rest.
    The twin gets the same (upcast) gradients, so its moments are the kahan run's, bit for bit."""
    problem = Problem()
    params = problem.params(dtype)
    twins = [p.detach().float().requires_grad_() for p in params]
    optimizer = OPTIMIZERS[name](params, weight_decay=0.05, low_precision="kahan", **path)
    reference = OPTIMIZERS[name](twins, weight_decay=0.05, **path)
    for t in range(25):
        problem.set_grads(params, t)
        for p, r in zip(params, twins):
            r.grad = None if p.grad is None else p.grad.float()
            c = optimizer.state[p].get("kahan_compensation")
            with torch.no_grad():
                r.copy_(p.float() + (0 if c is None else c.float()))
        optimizer.step()
        reference.step()
        for p, r in zip(params, twins):
            if p.grad is None or not optimizer.state[p]:
                continue
            assert torch.equal(p, r.detach().to(dtype))
            c = optimizer.state[p]["kahan_compensation"]
            low, high = _neighbours(r.detach() - p.float(), dtype)  # c is rounded stochastically
            assert ((c == low) | (c == high)).all()
            for key in _buffer_keys(name):
                assert torch.equal(optimizer.state[p][key], reference.state[r][key])
    assert any(optimizer.state[p]["kahan_compensation"].any() for p in params)


@pytest.mark.parametrize("path", EAGER_PATHS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_stochastic_params_and_bf16_state_round_the_fp32_step(name, path):
    """bf16 params, low_precision="stochastic", state_dtype=bf16. Before each step an fp32 twin
    (fp32 state) is set to the bf16 values; after it, every bf16 param and moment must be one
    of the two bf16 neighbours of the twin's fp32 result, and some must have rounded up and
    some down (the rounding is not a fixed direction)."""
    problem = Problem()
    params = problem.params(torch.bfloat16)
    twins = [p.detach().float().requires_grad_() for p in params]
    optimizer = OPTIMIZERS[name](params, low_precision="stochastic",
                                 state_dtype=torch.bfloat16, **path)
    reference = OPTIMIZERS[name](twins, **path)
    directions = set()
    for t in range(20):
        problem.set_grads(params, t)
        with torch.no_grad():
            for p, r in zip(params, twins):
                r.grad = None if p.grad is None else p.grad.float()
                r.copy_(p.float())
                for key in _buffer_keys(name):
                    if optimizer.state[p]:
                        reference.state[r][key].copy_(optimizer.state[p][key].float())
        optimizer.step()
        reference.step()
        for p, r in zip(params, twins):
            if p.grad is None:
                continue
            pairs = [(p, r.detach())] + [(optimizer.state[p][k], reference.state[r][k])
                                         for k in _buffer_keys(name)]
            for stored, exact in pairs:
                low, high = _neighbours(exact, torch.bfloat16)
                assert ((stored == low) | (stored == high)).all()
                inexact = low != high
                directions.update({"down"} if (stored == low)[inexact].any() else set())
                directions.update({"up"} if (stored == high)[inexact].any() else set())
    assert directions == {"up", "down"}


# --------------------------------------------------------------------------------------------
# what each mode is for: small updates accumulate, moments follow the fp32 ones


def _constant_gradient_run(n, steps=2000, **options):
    """bf16 weights at 1.0, QHAdam lr 1e-5, gradient 1: Adam's normalized step is lr (to 1e-8
    relative), so the exact result after 2000 steps is 1 - 0.02 = 0.98."""
    p = torch.ones(n, dtype=torch.bfloat16, requires_grad=True)
    optimizer = qhfast.QHAdam([p], lr=1e-5, **options)
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        optimizer.step()
    return p.detach(), optimizer.state[p]


BF16_ULP_AT_098 = 2.0**-8  # bf16 spacing in [0.5, 1)


@pytest.mark.parametrize("path", EAGER_PATHS)
def test_kahan_accumulates_updates_below_half_an_ulp(path):
    """Each update (1e-5) is 1/390 of the bf16 spacing at 0.98. Every parameter must end within
    one ulp of 0.98. The compensated value θ + c carries the rest: c's stochastic rounding adds
    zero-mean errors of at most c's spacing (2^-17 for |c| < 2^-9), so over 2000 steps each
    element's error has a std of about sqrt(2000)·2^-18 = 1.7e-4: each within 1e-3 (6 std), and
    the mean over 1000 elements within 5e-5 (9 std). Rounding c to nearest instead loses a
    fixed share of each update (measured: θ + c ended at 0.9823, 0.0023 short)."""
    torch.manual_seed(0)
    stuck, _ = _constant_gradient_run(4, low_precision="nearest", **path)
    assert torch.equal(stuck, torch.ones(4, dtype=torch.bfloat16))  # what kahan fixes
    p, state = _constant_gradient_run(1000, low_precision="kahan", **path)
    assert ((p.double() - 0.98).abs() <= BF16_ULP_AT_098).all()
    value = p.double() + state["kahan_compensation"].double()
    assert ((value - 0.98).abs() <= 1e-3).all()
    assert abs(value.mean().item() - 0.98) <= 5e-5


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["fp32_state", "bf16_state"])
@pytest.mark.parametrize("path", EAGER_PATHS)
def test_stochastic_rounding_accumulates_updates_in_expectation(path, state_dtype):
    """10000 bf16 weights at 1.0: each ends at 1 - k·2^-8 with k ~ Binomial-like, mean 5.1 and
    std about 2.3 steps (0.009), so the mean over 10000 elements has a std of about 9e-5; it
    must be within 1e-3 of 0.98 (11 std)."""
    torch.manual_seed(0)
    p, _ = _constant_gradient_run(10_000, low_precision="stochastic", state_dtype=state_dtype,
                                  **path)
    assert abs(p.double().mean().item() - 0.98) < 1e-3
    assert p.unique().numel() > 3  # elements went their own ways


def _second_moment_experiment(dtype, make=None, **options):
    """bf16 (or fp32) params, betas (0.9, 0.999), gradients N(0, 1) for 300 steps, then
    N(0, 0.01²) for 3000: the second moment must decay from ~1 to ~0.05."""
    n = 2048
    p = torch.zeros(n, dtype=dtype, requires_grad=True)
    make = make or (lambda ps: qhfast.QHAdam(ps, lr=1e-4, betas=(0.9, 0.999), **options))
    optimizer = make([p])
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    for t in range(3300):
        p.grad = (torch.randn(n, generator=gen) * (1.0 if t < 300 else 0.01)).to(dtype)
        optimizer.step()
    return optimizer.state[p]["exp_avg_sq"].double()


@pytest.mark.parametrize("path", [{}, dict(foreach=False)], ids=["default_kernel", "per_tensor"])
def test_bf16_second_moment_follows_the_fp32_one(path):
    """The mean of the bf16 second moment within 2x of the fp32 run's (measured: 1.00x), and
    90% of elements within 2x of their fp32 values, on the default path (the CPU kernel, its
    own stochastic rounding) and the per-tensor one. Round-to-nearest state (the same code with
    the rounding swapped) freezes near its value before the drop and fails; so does torch's
    Adam, whose bf16 state is written to nearest. torch's Adam stores the moment without bias
    correction: divided by 1 - 0.999^3300, it is comparable."""
    expected = _second_moment_experiment(torch.float32, foreach=False)
    actual = _second_moment_experiment(torch.bfloat16, state_dtype=torch.bfloat16,
                                       low_precision="stochastic", **path)
    ratio = actual.mean() / expected.mean()
    assert 0.5 < ratio < 2.0
    assert ((actual / expected - 1).abs() < 1.0).double().mean() > 0.9
    torch_adam = _second_moment_experiment(
        torch.bfloat16, make=lambda ps: torch.optim.Adam(ps, lr=1e-4, betas=(0.9, 0.999)))
    assert torch_adam.mean() / (1 - 0.999**3300) / expected.mean() > 2.0


def test_round_to_nearest_moments_fail_the_second_moment_experiment(monkeypatch):
    """The need for unbiased state writes, shown with qhfast's own code path (the eager one,
    whose rounding is swappable): the same run with stochastic rounding replaced by
    round-to-nearest ends more than 2x too large."""
    expected = _second_moment_experiment(torch.float32, foreach=False)
    monkeypatch.setattr(precision, "stochastic_round_",
                        lambda dsts, srcs: torch._foreach_copy_(list(dsts), list(srcs)))
    frozen = _second_moment_experiment(torch.float32, state_dtype=torch.bfloat16, foreach=False)
    assert frozen.mean() / expected.mean() > 2.0


# --------------------------------------------------------------------------------------------
# integrations: GradScaler skip, compile, RNG, state_dict


@pytest.mark.parametrize("mode", ["kahan", "stochastic"])
@pytest.mark.parametrize("capturable", [False, True], ids=["float_path", "device_path"])
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_skipped_grad_scaler_step_changes_nothing(name, dtype, capturable, mode):
    """An inf gradient under torch.amp.GradScaler: params, compensations and bf16 moments keep
    every bit (a kahan param sitting on a rounding tie included)."""
    problem = Problem()
    params = problem.params(dtype)
    optimizer = OPTIMIZERS[name](params, low_precision=mode, state_dtype=torch.bfloat16,
                                 capturable=capturable)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def backward(t, poison=False):
        optimizer.zero_grad()
        loss = sum((problem.grad(i, p, t).float() * p.float()).sum() for i, p in enumerate(params))
        if poison:
            loss = loss + params[0].float().sum() * float("inf")
        scaler.scale(loss).backward()

    for t in range(6):
        backward(t)
        scaler.step(optimizer)
        scaler.update()
    if mode == "kahan":  # put one element of c exactly on a tie: θ + c halfway between values
        p = params[2]
        c = optimizer.state[p]["kahan_compensation"]
        gap = torch.nextafter(p.detach()[0, 0, 0], torch.tensor(float("inf"), dtype=dtype)) - p[0, 0, 0]
        c[0, 0, 0] = gap.float() / 2
    backward(6, poison=True)
    before = snapshot(optimizer, params)
    scaler.step(optimizer)
    assert_same(snapshot(optimizer, params), before)


@pytest.mark.parametrize("mode", ["kahan", "stochastic"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_same_rng_state_same_run_and_state_dict_resumes_bitwise(name, mode):
    problem = Problem()

    def train(params, optimizer, steps):
        for t in steps:
            problem.set_grads(params, t)
            optimizer.step()

    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        params = problem.params(torch.bfloat16)
        optimizer = OPTIMIZERS[name](params, low_precision=mode, state_dtype=torch.bfloat16)
        train(params, optimizer, range(10))
        runs.append((params, optimizer))
    (params, optimizer), (other, _) = runs
    for p, q in zip(params, other):
        assert torch.equal(p, q)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    clones = [p.detach().clone().requires_grad_() for p in params]
    restored = OPTIMIZERS[name](clones, low_precision=mode, state_dtype=torch.bfloat16)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    rng = torch.get_rng_state()
    train(params, optimizer, range(10, 20))
    torch.set_rng_state(rng)
    train(clones, restored, range(10, 20))
    assert_same(restored.state_dict()["state"], optimizer.state_dict()["state"])
    for p, c in zip(params, clones):
        assert torch.equal(p, c)


# --------------------------------------------------------------------------------------------
# checkpoints across modes, and options changed between steps


def _trained(name, mode, state_dtype=None, steps=8):
    problem = Problem()
    params = problem.params(torch.bfloat16)
    optimizer = OPTIMIZERS[name](params, low_precision=mode, state_dtype=state_dtype)
    for t in range(steps):
        problem.set_grads(params, t)
        optimizer.step()
    return problem, params, optimizer


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_master_checkpoint_loads_into_kahan_and_back(name):
    """master → kahan: c = master - θ (rounded to the param dtype); kahan → master:
    master = θ + c. The caller's params and state_dict are not modified."""
    _, params, optimizer = _trained(name, "master")
    saved = optimizer.state_dict()
    reference = copy.deepcopy(saved)
    kahan = OPTIMIZERS[name](params, low_precision="kahan")
    before = [p.detach().clone() for p in params]
    kahan.load_state_dict(saved)
    assert_same(saved, reference)
    for p, b in zip(params, before):
        assert torch.equal(p, b)
        state = kahan.state[p]
        if not state:
            continue
        assert "master_param" not in state
        master = optimizer.state[p]["master_param"]
        assert torch.equal(state["kahan_compensation"], (master - p.float()).to(torch.bfloat16))
    back = OPTIMIZERS[name](params, low_precision="master")
    back.load_state_dict(kahan.state_dict())
    for p in params:
        if back.state[p]:
            c = kahan.state[p]["kahan_compensation"]
            assert torch.equal(back.state[p]["master_param"], p.float() + c.float())
            assert "kahan_compensation" not in back.state[p]


@pytest.mark.parametrize("target", ["stochastic", "nearest"])
@pytest.mark.parametrize("source", ["master", "kahan"])
def test_checkpoint_into_a_mode_without_a_buffer_drops_it(source, target):
    _, params, optimizer = _trained("QHAdam", source)
    other = qhfast.QHAdam(params, low_precision=target)
    other.load_state_dict(optimizer.state_dict())
    state = other.state[params[0]]
    assert "master_param" not in state and "kahan_compensation" not in state
    assert state["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_moments_convert_between_fp32_and_bf16_state(name):
    _, params, optimizer = _trained(name, "master")
    lean = OPTIMIZERS[name](params, state_dtype=torch.bfloat16)
    lean.load_state_dict(optimizer.state_dict())
    full = OPTIMIZERS[name](params)
    full.load_state_dict(lean.state_dict())
    for p in params:
        if not optimizer.state[p]:
            continue
        for key in _buffer_keys(name):
            fp32 = optimizer.state[p][key]
            assert lean.state[p][key].dtype == torch.bfloat16
            assert torch.equal(lean.state[p][key], fp32.to(torch.bfloat16))
            assert full.state[p][key].dtype == torch.float32
            assert torch.equal(full.state[p][key], fp32.to(torch.bfloat16).float())


@pytest.mark.parametrize("master_weights", [True, False])
def test_a_qhfast_010_checkpoint_with_master_weights_loads(master_weights):
    """qhfast 0.1.0 stored ``master_weights`` in each group: the key goes, and the state (a
    master, or none) is converted to the loading optimizer's mode, here kahan."""
    _, params, optimizer = _trained("QHAdam", "master" if master_weights else "nearest")
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:
        del group["low_precision"], group["state_dtype"]
        group["master_weights"] = master_weights
    restored = qhfast.QHAdam(params, low_precision="kahan")
    restored.load_state_dict(saved)
    group = restored.param_groups[0]
    assert "master_weights" not in group
    assert group["low_precision"] == "kahan" and group["state_dtype"] is None
    p = params[0]
    expected = (optimizer.state[p]["master_param"] - p.float()).to(torch.bfloat16) \
        if master_weights else torch.zeros_like(p)
    assert torch.equal(restored.state[p]["kahan_compensation"], expected)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_changing_the_mode_between_steps_converts_the_state(name):
    """A group switched from master to kahan (and bf16 state) between steps carries on from the
    master's value: the next step equals a run loaded from the converted checkpoint."""
    problem, params, optimizer = _trained(name, "master")
    clones = [p.detach().clone().requires_grad_() for p in params]
    loaded = OPTIMIZERS[name](clones, low_precision="kahan", state_dtype=torch.bfloat16)
    loaded.load_state_dict(optimizer.state_dict())
    optimizer.param_groups[0]["low_precision"] = "kahan"
    optimizer.param_groups[0]["state_dtype"] = torch.bfloat16
    torch.manual_seed(0)
    problem.set_grads(params, 8)
    optimizer.step()
    torch.manual_seed(0)
    problem.set_grads(clones, 8)
    loaded.step()
    for p, c in zip(params, clones):
        assert torch.equal(p, c)
    assert_same(optimizer.state_dict()["state"], loaded.state_dict()["state"])


def test_bad_precision_options_in_a_group_or_checkpoint_change_nothing():
    problem = Problem()
    params = problem.params(torch.bfloat16)
    optimizer = qhfast.QHAdam(params[:2])
    problem.set_grads(params, 10)
    optimizer.step()
    before = snapshot(optimizer, params[:2])
    with pytest.raises(ValueError, match="low_precision must be one of"):
        optimizer.add_param_group({"params": params[2:], "low_precision": "fp8"})
    with pytest.raises(ValueError, match="state_dtype must be None, torch.bfloat16 or"):
        optimizer.add_param_group({"params": params[2:], "state_dtype": torch.float16})
    with pytest.raises(ValueError, match="contradicts"):
        optimizer.add_param_group({"params": params[2:], "master_weights": True,
                                   "low_precision": "stochastic"})
    saved = optimizer.state_dict()
    saved["param_groups"][0]["low_precision"] = "kahn"
    with pytest.raises(ValueError, match="Invalid low_precision value: 'kahn'"):
        optimizer.load_state_dict(saved)
    assert_same(snapshot(optimizer, params[:2]), before)
    optimizer.add_param_group({"params": params[2:], "master_weights": False})  # 0.1.0 style
    assert optimizer.param_groups[1]["low_precision"] == "nearest"


@pytest.mark.parametrize("path", [{}, dict(foreach=True)])
def test_a_group_changed_to_bad_precision_options_steps_nothing(path):
    """Options changed in ``param_groups`` between steps are checked by the next step before
    anything changes: a typo in low_precision (the kernel path dropped the fp32 masters and
    raised; foreach ran as "nearest") or in state_dtype (any string was taken for "8bit")."""
    problem = Problem()
    params = problem.params(torch.bfloat16)
    optimizer = qhfast.QHAdam(params, **path)
    problem.set_grads(params, 0)
    optimizer.step()
    problem.set_grads(params, 1)
    before = snapshot(optimizer, params)
    for key, value, message in (
            ("low_precision", "Master", "Invalid low_precision value: 'Master'"),
            ("state_dtype", "bogus", "Invalid state_dtype value: 'bogus'"),
            ("state_dtype", torch.float16, "Invalid state_dtype value: torch.float16")):
        group = optimizer.param_groups[0]
        saved = group[key]
        group[key] = value
        with pytest.raises(ValueError, match=re.escape(message)):
            optimizer.step()
        group[key] = saved
        assert_same(snapshot(optimizer, params), before)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_mode_tracks_the_fp32_run(name):
    """300 steps of the test problem in bf16. master and kahan stay within 2 bf16 eps (relative
    to the largest element) of the fp32 run, as in test_precision: the stored param alone is
    rounded by up to eps/2, and gradients evaluated at rounded params add drift of the same
    order on this contracting problem; kahan with bf16 moments too (measured: 1.2 eps)."""
    problem = Problem()

    def final(dtype, **options):
        torch.manual_seed(0)
        params = problem.params(dtype)
        optimizer = OPTIMIZERS[name](params, **options)
        for t in range(300):
            problem.set_grads(params, t)
            optimizer.step()
        return [p.detach() for p in params]

    expected = final(torch.float32)
    eps = torch.finfo(torch.bfloat16).eps
    for options in (dict(low_precision="master"), dict(low_precision="kahan"),
                    dict(low_precision="kahan", state_dtype=torch.bfloat16)):
        assert max_relative_error(expected, final(torch.bfloat16, **options)) < 2 * eps
    # stochastic rounding moves each param by up to an ulp at random every step, which the
    # contracting problem damps to a stationary spread of a few ulps (measured at this seed:
    # 5.5 eps at most over the three optimizers, with fp32 or bf16 state)
    for state_dtype in (None, torch.bfloat16):
        actual = final(torch.bfloat16, low_precision="stochastic", state_dtype=state_dtype)
        assert max_relative_error(expected, actual) < 8 * eps


@pytest.mark.parametrize("path", EAGER_PATHS)
def test_a_master_takes_what_is_written_to_its_param_from_outside(path):
    """``"master"``: a bf16 parameter written between steps (clamped in place, given new
    storage) keeps the write: its master takes the written value where the parameter differs
    from the master rounded to nearest, and keeps its fp32 bits elsewhere. Before, the next
    step went on from the master and undid the write (a clamp of WGAN's kind, a model's
    load_state_dict). lr = 0, so a step changes nothing else."""
    torch.manual_seed(0)
    p = torch.randn(64, 64).bfloat16().requires_grad_()
    optimizer = qhfast.QHAdam([p], lr=1e-2, **path)
    p.grad = torch.randn(64, 64).bfloat16()
    optimizer.step()
    optimizer.param_groups[0]["lr"] = 0.0
    master = optimizer.state[p]["master_param"]
    assert (master != p.float()).any()  # the master holds more than the bf16 value
    before = master.clone()
    optimizer.step()  # nothing written: the master keeps its fp32 bits
    assert torch.equal(master, before)
    with torch.no_grad():
        p.clamp_(-0.5, 0.5)
    written = p.float() != before.bfloat16().float()
    assert 0 < written.sum() < p.numel()
    optimizer.step()
    master = optimizer.state[p]["master_param"]
    assert torch.equal(master, torch.where(written, p.float(), before))
    before = master.clone()
    p.data = torch.full_like(p, 0.25)  # new storage (elements whose master rounds to 0.25
    written = before.bfloat16().float() != 0.25  # keep it: the write cannot be told apart)
    assert written.sum() > p.numel() // 2
    optimizer.step()
    assert torch.equal(optimizer.state[p]["master_param"], torch.where(written, 0.25, before))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("path", EAGER_PATHS)
def test_a_model_converted_to_another_dtype_between_steps_steps_on(path, dtype):
    """fp32 params converted after a step (``model.double()``, ``.bfloat16()``): their state
    is converted before anything changes, as a checkpoint's is on load (moments to the new
    compute dtype, a master made for bf16). Before, the step raised KeyError midway with the
    params already updated. The step equals that of an optimizer that loaded the state into
    the converted params."""
    torch.manual_seed(0)
    params = [torch.randn(8, 4, requires_grad=True), torch.randn(4, requires_grad=True)]
    optimizer = qhfast.QHAdam(params, **path)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    saved = optimizer.state_dict()
    for p in params:
        p.data = p.data.to(dtype)
    twins = [p.detach().clone().requires_grad_() for p in params]
    twin = qhfast.QHAdam(twins, **path)
    twin.load_state_dict(saved)
    for p, q in zip(params, twins):
        p.grad = torch.randn(p.shape).to(dtype)
        q.grad = p.grad.clone()
    optimizer.step()
    twin.step()
    for p, q in zip(params, twins):
        assert p.dtype == dtype and torch.equal(p, q)


@pytest.mark.parametrize("path", EAGER_PATHS)
def test_one_param_converted_to_a_new_dtype_between_steps_steps_on(path):
    """A middle param of a group converted to bf16 after a step (one layer of a model): its
    state gets a master before anything updates. Before, the step raised KeyError midway,
    with the other params already updated on the eager paths."""
    torch.manual_seed(0)
    params = [torch.randn(8, 4, requires_grad=True) for _ in range(3)]
    optimizer = qhfast.QHAdamW(params, lr=1e-2, **path)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    params[1].data = params[1].data.bfloat16()
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert optimizer.state[params[1]]["master_param"].dtype == torch.float32
    assert not any(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("path", EAGER_PATHS)
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float64, id="fp64")])
def test_a_param_converted_to_the_dtype_of_an_earlier_one_steps_on(path, dtype):
    """[a, b]: fp32 b converted after a step to the dtype of a before it. a's state fits its
    dtype, which hid b's: every later step raised (KeyError 'master_param' for bf16, a dtype
    error for fp64), after advancing a's counters. Now b's state is converted before anything
    updates: the step equals that of an optimizer that loads the state into the converted
    params, bit for bit (the same draws)."""
    torch.manual_seed(0)
    a = torch.randn(8, 4).to(dtype).requires_grad_()
    b = torch.randn(8, 4, requires_grad=True)
    optimizer = qhfast.QHAdamW([a, b], lr=1e-2, **path)
    for p in (a, b):
        p.grad = torch.randn(8, 4).to(p.dtype)
    optimizer.step()
    b.data = b.data.to(dtype)
    twins = [p.detach().clone().requires_grad_() for p in (a, b)]
    loaded = qhfast.QHAdamW(twins, lr=1e-2, **path)
    loaded.load_state_dict(optimizer.state_dict())
    grads = [torch.randn(8, 4).to(dtype) for _ in range(2)]
    for params, stepped in (((a, b), optimizer), (twins, loaded)):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        torch.manual_seed(1)
        stepped.step()
    assert all(torch.equal(p, twin) for p, twin in zip((a, b), twins))
    for key, value in loaded.state[twins[1]].items():
        assert torch.equal(optimizer.state[b][key], value), key


@pytest.mark.parametrize("path", EAGER_PATHS)
def test_a_fp16_model_converted_to_bf16_gets_bf16_compensations(path):
    """``"kahan"`` keeps its compensation in the param's dtype: converted with the model
    between fp16 and bf16, it follows (it kept fp16, which bf16 cannot add exactly, and the C
    kernel then left the bucket to the eager path)."""
    torch.manual_seed(0)
    p = torch.randn(64, 64).half().requires_grad_()
    optimizer = qhfast.QHAdam([p], lr=1e-2, low_precision="kahan", **path)
    p.grad = torch.randn(64, 64).half()
    optimizer.step()
    p.data = p.data.bfloat16()
    p.grad = torch.randn(64, 64).bfloat16()
    optimizer.step()
    assert optimizer.state[p]["kahan_compensation"].dtype == torch.bfloat16


@pytest.mark.parametrize("path", EAGER_PATHS)
@pytest.mark.parametrize("mode", ["kahan", "stochastic", "nearest"])
def test_a_write_before_a_switch_from_master_is_kept(path, mode):
    """A bf16 param written from outside (a model's load_state_dict) and its group switched
    from ``"master"`` to another mode before the next step: the write is kept, as a "master"
    step keeps it. The conversion took the stale master for the param's value, and "kahan"
    then moved the param back through its compensation. lr = 0: nothing else moves."""
    torch.manual_seed(0)
    p = torch.randn(64, 64).bfloat16().requires_grad_()
    optimizer = qhfast.QHAdam([p], lr=1e-2, **path)
    p.grad = torch.randn(64, 64).bfloat16()
    optimizer.step()
    # (an element whose master rounds to 0.5 keeps it: the write cannot be told apart there)
    written = optimizer.state[p]["master_param"].bfloat16() != 0.5
    assert written.sum() > p.numel() - 10
    with torch.no_grad():
        p.fill_(0.5)
    optimizer.param_groups[0].update(low_precision=mode, lr=0.0)
    optimizer.step()
    assert torch.equal(p, torch.full_like(p, 0.5))
    if mode == "kahan":
        assert not optimizer.state[p]["kahan_compensation"][written].any()


def test_a_write_before_a_switch_from_master_is_kept_beside_sparse_gradients():
    """QHM with an fp32 embedding's sparse gradient and a bf16 layer in one group: the sparse
    update runs first, and the group's conversion to "kahan" it starts must take the write to
    the bf16 param too, as the dense step's does."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    weight = torch.randn(4, 4).bfloat16().requires_grad_()
    optimizer = qhfast.QHM([embedding.weight, weight], lr=0.1, momentum=0.9, nu=0.7)
    for _ in range(2):
        optimizer.zero_grad()
        (embedding(torch.tensor([1, 3])).float() @ weight.float()).sum().backward()
        optimizer.step()
    with torch.no_grad():
        weight.fill_(0.5)
    optimizer.param_groups[0].update(low_precision="kahan", lr=0.0)
    optimizer.zero_grad()
    (embedding(torch.tensor([1, 3])).float() @ weight.float()).sum().backward()
    optimizer.step()
    assert torch.equal(weight, torch.full_like(weight, 0.5))


@pytest.mark.parametrize("path", EAGER_PATHS)
@pytest.mark.parametrize("order", ["model_first", "optimizer_first"])
def test_a_resume_loads_the_model_and_the_optimizer_in_either_order(path, order):
    """A fresh model and optimizer (bf16, "master") resumed from their checkpoints go on as
    the run that never stopped, bit for bit, whichever loads first (a loaded master is the
    checkpoint's, not the fresh model's weights)."""
    def train(model, optimizer, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            optimizer.step()

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64).bfloat16()
    optimizer = qhfast.QHAdam(model.parameters(), lr=1e-4, **path)
    train(model, optimizer, 1)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    train(model, optimizer, 2)
    torch.manual_seed(1)
    resumed = torch.nn.Linear(64, 64).bfloat16()
    resumed_optimizer = qhfast.QHAdam(resumed.parameters(), lr=1e-4, **path)
    loads = [lambda: resumed.load_state_dict(saved[0]),
             lambda: resumed_optimizer.load_state_dict(saved[1])]
    for load in loads if order == "model_first" else loads[::-1]:
        load()
    train(resumed, resumed_optimizer, 2)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(optimizer.state[p]["master_param"],
                           resumed_optimizer.state[q]["master_param"])


@pytest.mark.parametrize("path", EAGER_PATHS)
@pytest.mark.parametrize("mode", ["master", "kahan"])
def test_a_param_converted_while_it_has_no_gradient_gets_its_state_converted(path, mode):
    """bf16 b converted to fp32 at a step where it has no gradient (a frozen layer, a skipped
    branch): its master or compensation goes (an fp32 param keeps none), as when it is
    converted with a gradient, and it steps on as an optimizer that loads the state."""
    torch.manual_seed(0)
    a, b = (torch.randn(8, 4).bfloat16().requires_grad_() for _ in range(2))
    optimizer = qhfast.QHAdam([a, b], lr=1e-2, low_precision=mode, **path)
    for p in (a, b):
        p.grad = torch.randn(8, 4).bfloat16()
    optimizer.step()
    b.data = b.data.float()
    a.grad, b.grad = torch.randn(8, 4).bfloat16(), None
    optimizer.step()
    assert set(optimizer.state[b]) == {"beta1_weight", "beta2_weight", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("path", EAGER_PATHS)
def test_a_bf16_model_converted_to_fp16_keeps_its_masters(path):
    """``model.half()`` on a bf16 model gives its params new storage, which the master check
    takes for an outside write: it must compare with the master as the conversion leaves it
    (rounded to bf16, then to fp16), not rounded to fp16 at once, or nearly every master is
    replaced by its bf16 value (4087 of 4096 elements were). lr = 0: nothing else moves."""
    torch.manual_seed(0)
    p = torch.randn(64, 64).bfloat16().requires_grad_()
    optimizer = qhfast.QHAdamW([p], lr=1e-2, **path)
    for t in range(3):
        p.grad = torch.randn(64, 64).bfloat16()
        optimizer.step()
    before = optimizer.state[p]["master_param"].clone()
    p.data = p.data.half()
    p.grad = torch.randn(64, 64).half()
    optimizer.param_groups[0]["lr"] = 0.0
    optimizer.step()
    assert torch.equal(optimizer.state[p]["master_param"], before)


@pytest.mark.parametrize("path", EAGER_PATHS)
@pytest.mark.parametrize("before,after", [(torch.bfloat16, torch.float16),
                                          (torch.float16, torch.bfloat16)], ids=["bf16", "fp16"])
def test_a_checkpoint_loaded_into_a_model_converted_between_16_bit_dtypes_keeps_its_masters(
        path, before, after):
    """A checkpoint of a bf16 model loaded into the same model converted to fp16 (or back): the
    optimizer that loads it has not stepped the params, so it cannot know their last dtype,
    and took the conversion's double rounding for outside writes (every master replaced by its
    param's value, one ulp off). lr = 0: the masters must stay as saved."""
    torch.manual_seed(0)
    p = torch.randn(64, 64).to(before).requires_grad_()
    optimizer = qhfast.QHAdamW([p], lr=1e-2, **path)
    for t in range(3):
        p.grad = torch.randn(64, 64).to(before)
        optimizer.step()
    saved = optimizer.state_dict()
    q = torch.nn.Parameter(p.detach().to(after))
    loaded = qhfast.QHAdamW([q], lr=0.0, **path)
    loaded.load_state_dict(saved)
    loaded.param_groups[0]["lr"] = 0.0
    q.grad = torch.randn(64, 64).to(after)
    loaded.step()
    assert torch.equal(loaded.state[q]["master_param"], optimizer.state[p]["master_param"])


@pytest.mark.parametrize("path", EAGER_PATHS)
def test_float64_params_with_bf16_moments_step_on_the_eager_paths(path):
    """fp64 params with bf16 moments, as the C kernel rounds them (to fp32, then at random to
    bf16): the eager rounding viewed the fp64 bits as int32 and raised. After one step the
    first moment is the gradient rounded to one of its two bf16 neighbours (within a bf16
    spacing, at most 2^-7 of the value, of it)."""
    torch.manual_seed(0)
    p = torch.zeros(64, 64, dtype=torch.float64, requires_grad=True)
    optimizer = qhfast.QHAdam([p], state_dtype=torch.bfloat16, **path)
    g = torch.randn(64, 64, dtype=torch.float64)
    p.grad = g.clone()
    optimizer.step()
    first = optimizer.state[p]["exp_avg"]
    assert first.dtype == torch.bfloat16
    assert ((first.double() - g).abs() <= g.abs() * 2**-7).all()
    assert (first.double() != g).any()  # rounded, not kept in fp64


@pytest.mark.parametrize("path", EAGER_PATHS)
def test_a_nan_stays_a_nan_in_bf16_state(path):
    """A NaN gradient whose fp32 payload is all ones (0x7FFFFFFF): adding the random bits of
    stochastic rounding to it carries into the sign bit (a -0.0) unless NaN is kept apart, so
    a momentum buffer stored in bf16 must come out NaN, whatever the draw, on every path."""
    torch.manual_seed(0)
    p = torch.zeros(4096, requires_grad=True)
    optimizer = qhfast.QHM([p], lr=0.1, momentum=0.9, nu=0.7, state_dtype=torch.bfloat16, **path)
    p.grad = torch.full((4096,), 0x7FFFFFFF, dtype=torch.int32).view(torch.float32)
    assert p.grad.isnan().all()
    optimizer.step()
    assert optimizer.state[p]["momentum_buffer"].isnan().all()
