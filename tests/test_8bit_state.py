"""state_dtype="8bit": blockwise 8-bit moments (qhfast/_quantize.py).

Against the fp32-state run of the same optimizer (the reference: the moments' update in fp32
is the tested eager path), and against the format's own promises: exact bytes, unbiased
writes, the block's largest value and zero exact, the ranges that keep small elements alive.
"""

import io

import pytest
import torch

import qhfast
import qhfast._quantize as quantize

SHAPE = (300, 40)  # 12000 elements: 47 blocks, the last one partial


def _param(dtype=torch.float32, shape=SHAPE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()


def _run(make, steps, grad, dtype=torch.float32, params=None):
    """``params`` (or one of SHAPE) after ``steps`` steps of ``make`` with ``grad(t, p)``."""
    params = params or [_param(dtype)]
    optimizer = make(params)
    torch.manual_seed(0)
    for t in range(steps):
        for p in params:
            p.grad = grad(t, p).to(p.dtype)
        optimizer.step()
    return params, optimizer


def _random_grad(t, p):
    generator = torch.Generator().manual_seed(1000 + t)
    return torch.randn(p.shape, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("name,expected", [("QHAdam", 2 + 2 * 4 * 47 / 12000),
                                           ("QHM", 1 + 4 * 47 / 12000)])
def test_state_bytes_per_parameter(name, expected):
    """One byte per element per moment plus an fp32 scale per block of 256: QHAdam 2.03
    bytes per parameter (<= 2.1), QHM 1.02 (<= 1.05). A tensor under 4096 elements keeps fp32
    moments, and so does a 1-D tensor (a bias); bf16 parameters with "stochastic" hold a
    parameter in 4.03 bytes in all."""
    make = {"QHAdam": lambda p: qhfast.QHAdam(p, state_dtype="8bit"),
            "QHM": lambda p: qhfast.QHM(p, lr=0.1, momentum=0.9, nu=0.7, state_dtype="8bit")}[name]
    small, bias = _param(shape=(63, 65)), _param(shape=(5000,))
    (p, q, r), optimizer = _run(make, 1, _random_grad, params=[_param(), small, bias])
    per_element = [v for v in optimizer.state[p].values() if v.dim() > 0]
    assert sum(v.numel() * v.element_size() for v in per_element) / p.numel() == expected
    assert all(v.dtype in (torch.uint8, torch.float32) for v in per_element)
    for kept in (q, r):
        assert all(v.dtype == torch.float32 for v in optimizer.state[kept].values() if v.dim() > 0)
    (b,), optimizer = _run(lambda p: qhfast.QHAdam(p, state_dtype="8bit",
                                                   low_precision="stochastic"),
                           1, _random_grad, dtype=torch.bfloat16)
    held = b.numel() * 2 + sum(v.numel() * v.element_size()
                               for v in optimizer.state[b].values() if v.dim() > 0)
    assert held / b.numel() == 2 + 2 + 2 * 4 * 47 / 12000


@pytest.mark.parametrize("nonnegative", [False, True], ids=["signed", "second_moment"])
def test_writes_are_unbiased_and_exact_values_stay_exact(nonnegative):
    """64 blocks of a block maximum (1.5), zeros and a value between codes (0.31 of it): the
    maximum and the zeros come back exactly, the in-between value's mean over 64·127 writes
    within 6 standard errors of itself (its codes are at most 12.5% apart: a standard error
    below 0.31·0.125/2/sqrt(8128) = 2.2e-4 of the maximum); rounded to nearest, one code."""
    block = torch.full((quantize.BLOCK,), 0.465)
    block[0], block[1::2] = 1.5, 0.0
    x = block.repeat(64)
    torch.manual_seed(0)
    codes, scales = quantize.quantize(x, nonnegative)
    back = quantize.dequantize(codes, scales, nonnegative, torch.float32).view(64, -1)
    assert codes.dtype == torch.uint8 and torch.equal(scales, torch.full((64,), 1.5))
    assert torch.equal(back[:, 0], torch.full((64,), 1.5))
    assert torch.equal(back[:, 1::2], torch.zeros(64, quantize.BLOCK // 2))
    middle = back[:, 2::2]
    assert abs(middle.mean().item() - 0.465) < 6 * 2.2e-4 * 1.5
    assert len(middle.unique()) == 2  # the two neighbouring codes, nothing else
    nearest, _ = quantize.quantize(x, nonnegative, stochastic=False)
    assert len(quantize.dequantize(nearest, scales, nonnegative, torch.float32)
               .view(64, -1)[:, 2::2].unique()) == 1
    # a draw that rounds to 1 in fp32 (an fp64 draw) does not push a code past the top
    high, _ = quantize.quantize(x, nonnegative, draws=torch.full(x.shape, 1 - 2.0 ** -30,
                                                                  dtype=torch.float64))
    back = quantize.dequantize(high, scales, nonnegative, torch.float32).view(64, -1)
    assert torch.equal(back[:, 0], torch.full((64,), 1.5))
    assert torch.equal(back[:, 1::2], torch.zeros(64, quantize.BLOCK // 2))
    # the kernels' draws, 16-bit: over 65535 of the 65536 the mean is exact to a step / 2^15
    x = torch.full((257, quantize.BLOCK), 0.465)
    x[:, 0] = 1.5
    draws = torch.zeros_like(x)
    draws[:, 1:] = torch.randperm(65535).view(257, -1) / 65536
    codes, scales = quantize.quantize(x, nonnegative, draws=draws)
    middle = quantize.dequantize(codes, scales, nonnegative, torch.float32)[:, 1:]
    gap = middle.max() - middle.min()
    assert 0 < gap < 0.125 * 1.5 and len(middle.unique()) == 2
    assert abs(middle.double().mean().item() - 0.465) <= gap.item() * 2 ** -15


@pytest.mark.parametrize("nonnegative", [False, True], ids=["signed", "second_moment"])
def test_a_blocks_largest_element_is_exact_and_subnormal_blocks_stay_finite(nonnegative):
    """Elements are multiplied by their block's reciprocal scale (no division): 1/scale rounds
    below the exact reciprocal for about 15% of scales, which would put the largest element
    one code down where it rounds down (draws of 0 here); it must come back exactly, for 4096
    maxima across 2^-100 to 2^100. A block of subnormal moments gets the scale 2^-126 (the
    reciprocal of a subnormal overflows) and comes back finite, its largest within a code."""
    torch.manual_seed(0)
    top = (1 + torch.rand(4096)) * 2.0 ** torch.randint(-100, 100, (4096,)).float()
    x = top.unsqueeze(1) * torch.rand(4096, quantize.BLOCK)
    x[:, 0] = top
    if not nonnegative:
        x[::2] = -x[::2]
    codes, scales = quantize.quantize(x, nonnegative, draws=torch.zeros_like(x))
    assert torch.equal(scales.view(-1), top)
    assert torch.equal(quantize.dequantize(codes, scales, nonnegative, torch.float32)[:, 0],
                       x[:, 0])
    tiny = torch.full((quantize.BLOCK,), 2.0 ** -140)
    tiny[0] = 2.0 ** -130
    codes, scales = quantize.quantize(tiny, nonnegative)
    back = quantize.dequantize(codes, scales, nonnegative, torch.float32)
    assert scales.item() == 2.0 ** -126 and back.isfinite().all()
    assert 2.0 ** -131 <= back[0] <= 2.0 ** -129


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["QHAdam", "QHAdamW", "QHM"])
def test_the_trajectory_tracks_the_fp32_state_run(name, dtype):
    """60 steps towards a target through noisy gradients: parameters within 3% of the
    fp32-state run's total movement, on the default (per-tensor) and foreach paths (measured:
    QHAdam 1.6%, QHM 0.2%; with pure noise for gradients the runs are random walks, and part
    by several percent)."""
    make = {"QHAdam": lambda p, **o: qhfast.QHAdam(p, lr=2e-2, nus=(0.7, 1.0), **o),
            "QHAdamW": lambda p, **o: qhfast.QHAdamW(p, lr=2e-2, weight_decay=0.1, **o),
            "QHM": lambda p, **o: qhfast.QHM(p, lr=0.1, momentum=0.9, nu=0.7, **o)}[name]
    target = _param(seed=7).detach().double()

    def grad(t, p):
        return p.detach().double() - target + 0.3 * _random_grad(t, p)

    start = _param(dtype).detach().float()
    (expected,), _ = _run(lambda p: make(p), 60, grad, dtype)
    moved = (expected.detach().float() - start).norm()
    for foreach in (None, True):
        (actual,), optimizer = _run(lambda p: make(p, state_dtype="8bit", foreach=foreach), 60,
                                    grad, dtype)
        key = "momentum_buffer" if name == "QHM" else "exp_avg"
        assert optimizer.state[actual][key].dtype == torch.uint8
        assert (actual.detach().float() - expected.detach().float()).norm() < 0.03 * moved


def _second_moment(optimizer, p):
    state = optimizer.state[p]
    value = state["exp_avg_sq"]
    if value.dtype == torch.uint8:
        return quantize.dequantize(value, state["exp_avg_sq_scale"], True, torch.float32)
    return value


def test_the_second_moment_follows_a_10x_drop_of_the_gradient_scale():
    """β2 = 0.999 for 2000 steps, then gradients 10x smaller: after 1000 more steps the
    dequantized second moment is within 2x of the fp32 run's everywhere (it moves by 0.1% a
    step, below a code's spacing: nearest rounding would freeze it)."""
    def grad(t, p):
        return _random_grad(t % 7, p)[:8, :] * (1.0 if t < 2000 else 0.1)

    make = lambda p, **o: qhfast.QHAdam(p, betas=(0.9, 0.999), lr=0.0, **o)  # noqa: E731
    params = lambda: [_param(shape=(8, 40 * 16))]  # noqa: E731 (5120 elements: 20 blocks)
    (p,), expected = _run(make, 3000, grad, params=params())
    (q,), actual = _run(lambda p: make(p, state_dtype="8bit"), 3000, grad, params=params())
    ratio = _second_moment(actual, q) / _second_moment(expected, p)
    assert 0.5 < ratio.min() and ratio.max() < 2.0


def test_small_elements_in_a_block_of_large_ones_keep_their_updates():
    """Half of each block's elements get gradients 1e-4 times the others': their movement over
    30 steps stays within 2x of the fp32 run's, in its largest and its norm (a linear code map
    would round their second moment to zero, and their updates would blow up to lr·m/eps)."""
    scale = torch.ones(SHAPE, dtype=torch.float64)
    scale.view(-1)[1::2] = 1e-4

    def grad(t, p):
        return _random_grad(t, p) * scale

    make = lambda p, **o: qhfast.QHAdam(p, lr=1e-3, **o)  # noqa: E731
    start = _param().detach().clone()
    (p,), _ = _run(make, 30, grad)
    (q,), _ = _run(lambda p: make(p, state_dtype="8bit"), 30, grad)
    small = slice(1, None, 2)
    expected = (p.detach() - start).view(-1)[small].abs()
    actual = (q.detach() - start).view(-1)[small].abs()
    assert actual.max() <= 2 * expected.max()
    assert 0.5 < actual.norm() / expected.norm() < 2


def test_a_skipped_step_changes_no_code_and_no_scale():
    """GradScaler's found_inf (as it hands it over): codes, scales, counters and parameters
    unchanged, where requantizing the dequantized moments would move some codes."""
    (p,), optimizer = _run(lambda p: qhfast.QHAdam(p, state_dtype="8bit", capturable=True), 3,
                           _random_grad)
    before = {k: v.clone() for k, v in optimizer.state[p].items()}
    theta = p.detach().clone()
    p.grad = _random_grad(9, p).float()
    optimizer.grad_scale = torch.tensor(1.0)
    optimizer.found_inf = torch.tensor(1.0)
    optimizer.step()
    assert torch.equal(p.detach(), theta)
    for key, value in optimizer.state[p].items():
        assert torch.equal(value, before[key]), key


def _resumed(make, start, state_dicts, state):
    """``start`` resumed from each of ``state_dicts`` by ``make``'s optimizer (each loaded
    state equal to ``state``, shapes included) and stepped once with the same gradient and
    seed: the parameters each gives."""
    finals = []
    for state_dict in state_dicts:
        resumed = start.clone().requires_grad_()
        other = make([resumed])
        other.load_state_dict(state_dict)
        for key, value in state.items():
            loaded = other.state[resumed][key]
            assert loaded.shape == value.shape and torch.equal(loaded, value), key
        torch.manual_seed(5)
        resumed.grad = _random_grad(3, resumed).float()
        other.step()
        finals.append(resumed.detach())
    return finals


def test_checkpoints_round_trip_exactly_and_convert_on_load():
    """state_dict and torch.save(weights_only=True) keep codes and scales exactly (the resumed
    run continues bit for bit); loading into another state_dtype converts once: 8-bit into
    fp32 or bf16 moments (dequantized) and back (quantized to nearest), within the format's
    rounding."""
    make = lambda p, **o: qhfast.QHAdam(p, lr=1e-2, state_dtype="8bit", **o)  # noqa: E731
    (p,), optimizer = _run(make, 3, _random_grad)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    start = p.detach().clone()
    assert torch.equal(*_resumed(make, start, (optimizer.state_dict(), saved), optimizer.state[p]))
    exact = quantize.dequantize(optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_scale"],
                                False, torch.float32)
    for state_dtype in (None, torch.bfloat16):
        other = qhfast.QHAdam([start.clone().requires_grad_()], state_dtype=state_dtype)
        other.load_state_dict(optimizer.state_dict())
        state = next(iter(other.state.values()))
        assert "exp_avg_scale" not in state and state["exp_avg"].dtype == (state_dtype or torch.float32)
        assert torch.allclose(state["exp_avg"].float(), exact, rtol=2**-8, atol=0)
        back = make([start.clone().requires_grad_()])
        back.load_state_dict(other.state_dict())
        state = next(iter(back.state.values()))
        again = quantize.dequantize(state["exp_avg"], state["exp_avg_scale"], False, torch.float32)
        assert state["exp_avg"].dtype == torch.uint8
        assert torch.allclose(again, exact, rtol=0.07, atol=0)  # half a code at the most


@pytest.mark.parametrize("target", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_dcp_checkpoint_of_8bit_moments_into_other_moments_is_refused(tmp_path, target):
    """torch.distributed.checkpoint loads into the tensors the target optimizer has: 8-bit
    codes land in its fp32/bf16 moments as numbers (254 for a moment of 0.025) and their
    scales are dropped. That load raises, naming the way that works, instead of stepping on
    the codes. (dcp.load itself writes into the tensors get_optimizer_state_dict returned,
    which are the optimizer's own: only a load that works leaves a state to step from.)"""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    def trained(state_dtype):
        torch.manual_seed(0)
        model = torch.nn.Linear(512, 33)
        optimizer = qhfast.QHAdamW(model.parameters(), lr=0.01, state_dtype=state_dtype)
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(16, 512)).pow(2).mean().backward()
            optimizer.step()
        return model, optimizer

    model, optimizer = trained("8bit")
    dcp.save({"optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=tmp_path)
    model, optimizer = trained(target)
    state = {"optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=tmp_path)
    with pytest.raises(ValueError, match="keeps 8-bit codes .* Load it with state_dtype=.8bit."):
        set_optimizer_state_dict(model, optimizer, state["optim"])


def test_scales_are_shaped_by_rows_of_whole_blocks_and_flat_ones_still_load():
    """A tensor whose rows are whole blocks has its scales shaped (rows, blocks per row), the
    same numbers in the same order as flat ones (what FSDP2 splits along dim 0 with the
    codes); a checkpoint with them flat (as qhfast wrote them before) loads reshaped, and the
    resumed run equals the one from the shaped checkpoint bit for bit."""
    make = lambda p: qhfast.QHAdam(p, lr=1e-2, state_dtype="8bit")  # noqa: E731
    (p,), optimizer = _run(make, 2, _random_grad, params=[_param(shape=(20, 512))])
    state = optimizer.state[p]
    assert state["exp_avg_scale"].shape == state["exp_avg_sq_scale"].shape == (20, 2)
    rows = state["exp_avg_sq"].view(40, 256)  # each block of 256, in the codes' order
    exact = quantize.dequantize(state["exp_avg_sq"], state["exp_avg_sq_scale"], True, torch.float32)
    assert torch.equal(exact.view(40, 256).amax(dim=1), state["exp_avg_sq_scale"].view(-1))
    assert (rows == 255).sum(dim=1).min() >= 1  # the top code: each block's largest value
    saved = optimizer.state_dict()
    flat = {**saved, "state": {0: {k: v.reshape(-1) if k.endswith("_scale") else v
                                   for k, v in saved["state"][0].items()}}}
    assert torch.equal(*_resumed(make, p.detach(), (saved, flat), state))


@pytest.mark.parametrize("name", ["QHAdam", "QHM"])
def test_complex_parameters_code_their_parts_and_track_the_complex_state_run(name):
    """A complex64 parameter of 3000 elements (6000 parts) keeps 8-bit codes shaped like its
    real view, a scale per 256 parts, on the default path (the C kernel) and foreach; 40
    steps track the run with complex moments within 3% of its movement (measured: QHAdam
    1.8%, QHM 0.6%); a checkpoint converts to complex moments and back on load."""
    make = {"QHAdam": lambda p, **o: qhfast.QHAdam(p, lr=2e-2, nus=(0.7, 1.0), **o),
            "QHM": lambda p, **o: qhfast.QHM(p, lr=0.1, momentum=0.9, nu=0.7, **o)}[name]
    key = "momentum_buffer" if name == "QHM" else "exp_avg"
    target = _param(torch.complex64, (50, 60), seed=7).detach()

    def grad(t, p):
        noise = torch.view_as_complex(_random_grad(t, torch.empty(50, 60, 2)).float())
        return p.detach() - target + 0.3 * noise

    def params():
        return [_param(torch.complex64, (50, 60))]

    start = params()[0].detach()
    (expected,), _ = _run(make, 40, grad, params=params())
    moved = (expected.detach() - start).abs().norm()
    for foreach in (None, True):
        (actual,), optimizer = _run(lambda p: make(p, state_dtype="8bit", foreach=foreach), 40,
                                    grad, params=params())
        state = optimizer.state[actual]
        assert state[key].dtype == torch.uint8 and state[key].shape == (50, 60, 2)
        assert state[key + "_scale"].shape == (quantize.blocks(6000),)
        assert (actual.detach() - expected.detach()).abs().norm() < 0.03 * moved
    exact = quantize.dequantize(state[key], state[key + "_scale"], False, torch.float32)
    complex_state = make([actual.detach().clone().requires_grad_()])
    complex_state.load_state_dict(optimizer.state_dict())
    loaded = next(iter(complex_state.state.values()))[key]
    assert loaded.dtype == torch.complex64 and torch.equal(torch.view_as_real(loaded), exact)
    back = make([actual.detach().clone().requires_grad_()], state_dtype="8bit")
    back.load_state_dict(complex_state.state_dict())
    codes = next(iter(back.state.values()))[key]
    assert codes.dtype == torch.uint8 and torch.equal(codes, state[key])  # nearest: the same


def test_a_step_under_fake_tensors_leaves_real_steps_working(monkeypatch):
    """A step run under FakeTensorMode (as memory-estimation tools run one) keeps no fake
    code maps for the real steps that follow (they would fail on them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(quantize, "_MAPS", {})
    with FakeTensorMode():
        fake = torch.zeros(50, 100, requires_grad=True)
        fake.grad = torch.ones(50, 100)
        qhfast.QHAdam([fake], state_dtype="8bit", foreach=True).step()
    for foreach in (True, None):
        (p,), optimizer = _run(lambda p: qhfast.QHAdam(p, state_dtype="8bit", foreach=foreach), 2,
                               _random_grad)
        assert optimizer.state[p]["exp_avg"].dtype == torch.uint8 and p.isfinite().all()


def _kernel_draws(offset, numel, seed, shift):
    """The C kernel's uniform draws for the 8-bit writes of a tensor whose elements start at
    ``offset`` over its call: 16 bits (from bit ``shift``: 0 for the first moment or QHM's
    buffer, 16 for the second) of a hash of element ^ seed (the low 32 bits of the step's
    seeds): x * 0x9E3779B1 mod 2^32, then x ^ (x >> 16), over 2^16."""
    x = (torch.arange(offset, offset + numel, dtype=torch.int64) ^ (seed & 0xFFFFFFFF))
    x = (x * 0x9E3779B1) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    return ((x >> shift) & 0xFFFF).to(torch.float32) / 65536


@pytest.mark.parametrize("dtype,mode", [(torch.float32, "master"), (torch.bfloat16, "master"),
                                        (torch.float16, "kahan")], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", ["QHAdam", "QHM"])
def test_the_c_kernel_writes_the_reference_codes_for_its_draws(name, dtype, mode, monkeypatch):
    """One C kernel step on 8-bit moments against the C kernel's step on the same moments
    dequantized into fp32 state (the arithmetic, tested elsewhere) and quantize() of its new
    moments with the kernel's draws: codes and scales equal, and the parameters (and masters)
    equal bit for bit. Three quantized tensors share the call (the first's last block is
    partial; the second's elements start at 12000, its rows whole blocks, so its scales are
    shaped (rows, 2); the third's 70000 take 5 chunks, on OpenMP's threads, and its gradient
    has a NaN and an infinity: their blocks' scales are NaN and infinite) and a small one (fp32
    moments) gets its own call."""
    from qhfast.kernels import cpu

    seed = 0x9ABCDEF012345678
    monkeypatch.setattr(cpu, "_draw_seeds", lambda: seed)
    make = {"QHAdam": lambda p, **o: qhfast.QHAdam(p, lr=1e-2, nus=(0.7, 0.9), weight_decay=0.1,
                                                   **o),
            "QHM": lambda p, **o: qhfast.QHM(p, lr=0.1, momentum=0.9, nu=0.7, **o)}[name]
    shapes = [SHAPE, (10, 512), (70, 1000), (100,)]
    params = [_param(dtype, shape, seed=k) for k, shape in enumerate(shapes)]
    _, eight_bit = _run(lambda p: make(p, state_dtype="8bit", low_precision=mode), 3,
                        _random_grad, params=params)
    copies = [p.detach().clone().requires_grad_() for p in params]
    reference = make(copies, low_precision=mode)
    reference.load_state_dict(eight_bit.state_dict())  # the moments dequantized: exact in fp32
    for p, q in zip(params, copies):
        p.grad = _random_grad(5, p).to(dtype)
        q.grad = p.grad.clone()
    params[2].grad.view(-1)[1000], params[2].grad.view(-1)[40000] = float("nan"), float("inf")
    copies[2].grad.copy_(params[2].grad)
    eight_bit.step()
    reference.step()
    keys = {"QHAdam": [("exp_avg", False, 0), ("exp_avg_sq", True, 16)],
            "QHM": [("momentum_buffer", False, 0)]}[name]
    exactly = dict(rtol=0, atol=0, equal_nan=True)  # NaN where the NaN and infinity went
    offset = 0
    for p, q in zip(params[:3], copies):
        torch.testing.assert_close(p, q, **exactly)
        if dtype != torch.float32:
            torch.testing.assert_close(
                eight_bit.state[p]["master_param"] if mode == "master" else p,
                reference.state[q]["master_param"] if mode == "master" else q, **exactly)
        for key, nonnegative, shift in keys:
            codes, scales = quantize.quantize(
                reference.state[q][key], nonnegative,
                draws=_kernel_draws(offset, p.numel(), seed, shift).view(p.shape))
            assert torch.equal(eight_bit.state[p][key], codes), key
            torch.testing.assert_close(eight_bit.state[p][key + "_scale"], scales, **exactly)
            assert scales.shape == ((10, 2) if p.shape == (10, 512) else (quantize.blocks(p.numel()),))
        offset += p.numel()
    assert eight_bit.state[params[3]][keys[0][0]].dtype == torch.float32
    scales = eight_bit.state[params[2]][keys[0][0] + "_scale"]
    assert scales.isnan().nonzero().view(-1).tolist() == [1000 // 256]
    assert scales.isinf().nonzero().view(-1).tolist() == [40000 // 256]


def test_the_c_kernels_largest_element_is_exact_at_a_zero_draw(monkeypatch):
    """The C kernel multiplies by the block's reciprocal scale, like quantize(): where 1/scale
    rounds low, the largest element is one fp32 step under the top and only a draw of 0 (one
    in 2^16) rounds it a code down, which random draws do not test. Here element 0's draws
    are both 0 (the step's seed is 0: its hash is 0), and its moments' scales, d and d², are
    such scales: both come back exactly."""
    from qhfast.kernels import cpu

    d = 1.125062346458435  # d * fl(1/d) and d² * fl(1/d²) both round below 1 in fp32
    top = torch.tensor([d, d * d])
    assert (top * (1 / top) < 1).all()
    assert _kernel_draws(0, 1, 0, 0).item() == _kernel_draws(0, 1, 0, 16).item() == 0
    monkeypatch.setattr(cpu, "_draw_seeds", lambda: 0)
    p = torch.zeros(16, 256, requires_grad=True)
    optimizer = qhfast.QHAdam([p], betas=(0.0, 0.0), state_dtype="8bit")
    p.grad = torch.linspace(-0.5, 1.0, 4096).view(16, 256)
    p.grad[0, 0] = d
    optimizer.step()
    for key, nonnegative in [("exp_avg", False), ("exp_avg_sq", True)]:
        codes, scales = optimizer.state[p][key], optimizer.state[p][key + "_scale"]
        back = quantize.dequantize(codes, scales, nonnegative, torch.float32)
        assert back[0, 0].item() == top[int(nonnegative)].item(), key


@pytest.mark.parametrize("isa", ["native", "no_avx512"])
def test_the_c_kernel_encodes_every_binade_of_both_maps(isa, monkeypatch):
    """Moments across every binade of both maps and below their smallest (β = 0: the moments
    are the gradient and its square, from 1 down to 2^-63.5 and 2^-127 of their block's
    largest), signs and mantissas mixed: the kernel's codes and scales are quantize()'s for
    its draws, on AVX-512 and without it."""
    from qhfast.kernels import cpu

    if isa == "no_avx512":
        monkeypatch.setattr(cpu, "FLAGS", [*cpu.FLAGS, "-mno-avx512f"])
        monkeypatch.setattr(cpu, "_libraries", {})
    seed = 0x13579BDF02468ACE
    monkeypatch.setattr(cpu, "_draw_seeds", lambda: seed)
    j = torch.arange(4096)
    grad = (2.0 ** -(j % 128 / 2) * (1 + j % 7 / 7) * (1 - 2 * (j % 3 == 0))).float()
    grad[-256:] *= 2.0 ** -66  # the last block's second moments subnormal: scale 2^-126
    p = torch.zeros(16, 256, requires_grad=True)
    optimizer = qhfast.QHAdam([p], betas=(0.0, 0.0), state_dtype="8bit")
    p.grad = grad.view(16, 256)
    optimizer.step()
    for key, moment, nonnegative, shift in [("exp_avg", grad, False, 0),
                                            ("exp_avg_sq", grad * grad, True, 16)]:
        codes, scales = quantize.quantize(moment.view(16, 256), nonnegative,
                                          draws=_kernel_draws(0, 4096, seed, shift).view(16, 256))
        assert torch.equal(optimizer.state[p][key], codes), key
        assert torch.equal(optimizer.state[p][key + "_scale"], scales), key
        assert (scales[-1].item() == 2.0 ** -126) == nonnegative
        # every binade index of the map is hit: 0 (the top), each binade, below the smallest
        y = moment.view(16, 256).abs() / scales.view(16, 1)
        last = quantize.code_map(not nonnegative, y.device).binades + 1
        index = (127 - (y.view(torch.int32) >> 23)).clamp(0, last)
        assert index.unique().tolist() == list(range(last + 1)), key


def test_a_map_larger_than_the_kernels_lookup_is_refused():
    """The C kernel's AVX-512 lookup holds 64 binade entries (62 binades): a larger map is
    refused where its tables are made, not read out of bounds."""
    from qhfast.kernels import cpu

    fits = quantize.code_map(False, torch.device("cpu"))
    steps = torch.zeros(65, dtype=torch.float32)
    too_large = quantize.CodeMap(fits.values, steps, torch.zeros(65, dtype=torch.int32), 63)
    assert cpu._CodeMaps((fits, fits)).tables[0][2].numel() == 64
    with pytest.raises(RuntimeError, match="more than 62 binades"):
        cpu._CodeMaps((fits, too_large))


def test_a_map_whose_values_bf16_cannot_hold_is_refused():
    """The C kernel's AVX-512 decoding reads the code values as bf16, exact for qhfast's maps
    (at most 6 significant bits); a value with more is refused where the tables are made, not
    decoded wrongly."""
    from qhfast.kernels import cpu

    fits = quantize.code_map(True, torch.device("cpu"))
    assert torch.equal(cpu._CodeMaps((fits, fits)).tables[0][1].float(), fits.values)
    values = fits.values.clone()
    values[5] = 1 / 3
    with pytest.raises(RuntimeError, match="bf16 does not hold exactly"):
        cpu._CodeMaps((fits, fits._replace(values=values)))


@pytest.mark.parametrize("name", ["QHAdam", "QHM"])
def test_the_c_kernel_without_avx512_writes_the_same_codes(name, monkeypatch):
    """The kernel's codes come from AVX-512 permutes where the machine has them (this one)
    and from plain loops the compiler vectorizes where not: built with -mno-avx512f (under
    its own cache key), the test above holds as well."""
    from qhfast.kernels import cpu

    monkeypatch.setattr(cpu, "FLAGS", [*cpu.FLAGS, "-mno-avx512f"])
    monkeypatch.setattr(cpu, "_libraries", {})
    builds = cpu.builds
    test_the_c_kernel_writes_the_reference_codes_for_its_draws(name, torch.float32, "master",
                                                               monkeypatch)
    assert cpu.builds > builds


@pytest.mark.usefixtures("fresh_dynamo")
def test_the_compiled_step_is_whole_and_a_changing_lr_recompiles_nothing():
    """torch.compile(fullgraph=True) of the step with 8-bit moments (capturable): the
    quantization's search, random draws and block scales trace without a break; two graphs
    (the first step makes the state), then a tensor lr changed every step recompiles nothing."""
    from torch._dynamo.testing import CompileCounter

    p = _param()
    optimizer = qhfast.QHAdam([p], lr=torch.tensor(0.01), state_dtype="8bit", capturable=True)
    backend = CompileCounter()
    step = torch.compile(optimizer.step, backend=backend, fullgraph=True)
    frames = []
    for t in range(4):
        p.grad = _random_grad(t, p).float()
        optimizer.param_groups[0]["lr"].fill_(0.01 / (t + 1))
        step()
        frames.append(backend.frame_count)
    assert frames == [1, 2, 2, 2]
    state = optimizer.state[p]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_scale"].abs().min() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["master", "kahan", "stochastic", "nearest"])
def test_every_precision_mode_of_16_bit_params_tracks_its_fp32_state_run(mode, dtype):
    """8-bit moments under each ``low_precision`` mode: within 3% of the same mode's
    fp32-state run's movement (the target problem of the trajectory test), plus, for the
    modes that keep no fp32 value ("stochastic", "nearest"), 4 eps of the parameter's dtype
    times its norm: there a slightly different update flips the parameter's own roundings
    (measured for bf16: a difference of 3.4% of the movement, or 3.4 eps of the norm)."""
    target = _param(seed=7).detach().double()

    def grad(t, p):
        return p.detach().double() - target + 0.3 * _random_grad(t, p)

    make = lambda p, **o: qhfast.QHAdam(p, lr=2e-2, low_precision=mode, **o)  # noqa: E731
    start = _param(dtype).detach().float()
    (expected,), _ = _run(make, 40, grad, dtype)
    (actual,), optimizer = _run(lambda p: make(p, state_dtype="8bit"), 40, grad, dtype)
    assert optimizer.state[actual]["exp_avg_sq"].dtype == torch.uint8
    bound = 0.03 * (expected.detach().float() - start).norm()
    if mode in ("stochastic", "nearest"):
        bound += 4 * torch.finfo(dtype).eps * expected.detach().float().norm()
    assert (actual.detach().float() - expected.detach().float()).norm() < bound


@pytest.mark.parametrize("path", ["capturable", "step_in_backward"])
def test_capturable_and_in_backward_steps_track_the_fp32_state_run(path):
    """The other eager paths with 8-bit moments: capturable (counters on the device) and
    qhfast.step_in_backward (one parameter at a time, inside backward()), within 3%."""
    target = _param(seed=7).detach()
    options = dict(capturable=True) if path == "capturable" else {}

    def train(**state):
        p = _param()
        optimizer = qhfast.QHAdam([p], lr=2e-2, **options, **state)
        handle = qhfast.step_in_backward(optimizer) if path == "step_in_backward" else None
        torch.manual_seed(0)
        for t in range(40):
            noise = 0.3 * _random_grad(t, p).float()
            (0.5 * (p - target).square().sum() + (p * noise).sum()).backward()
            if handle is None:
                optimizer.step()
                p.grad = None
        return p.detach(), optimizer

    start = _param().detach()
    expected, _ = train()
    actual, optimizer = train(state_dtype="8bit")
    assert next(iter(optimizer.state.values()))["exp_avg"].dtype == torch.uint8
    assert (actual - expected).norm() < 0.03 * (expected - start).norm()


def test_a_qhoptim_checkpoint_loads_into_8bit_moments():
    """qhoptim 1.1.0's QHAdam state (fp32 moments, float normalizers) loads into 8-bit
    moments (quantized to nearest once) and continues: within 4% of the movement of the
    trajectory the same checkpoint continues on in fp32 moments, 10 steps of random gradients
    later (measured 1.9%: each step's update differs by the codes' few percent; a moment
    converted wrongly, say a scale off by 2x, moves it by tens of percent)."""
    import qhoptim.pyt as oracle

    kwargs = dict(lr=1e-2, nus=(0.7, 1.0))
    (p,), original = _run(lambda p: oracle.QHAdam(p, **kwargs), 5, _random_grad)
    saved, start = original.state_dict(), p.detach().clone()
    finals = []
    for state_dtype in (None, "8bit"):
        q = start.clone().requires_grad_()
        optimizer = qhfast.QHAdam([q], **kwargs, state_dtype=state_dtype)
        optimizer.load_state_dict(saved)
        assert optimizer.state[q]["exp_avg"].dtype == (torch.uint8 if state_dtype else torch.float32)
        for t in range(5, 15):
            q.grad = _random_grad(t, q).float()
            optimizer.step()
        finals.append(q.detach())
    moved = (finals[0] - start).norm()
    assert (finals[1] - finals[0]).norm() < 0.04 * moved
