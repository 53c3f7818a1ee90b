"""The Triton kernel (qhfast/kernels/triton_kernel.py) run by Triton's interpreter on CPU tensors.

``TRITON_INTERPRET=1`` with ``QHFAST_TRITON_ON_CPU=1`` sends ``fused=True`` CPU groups to the
Triton kernel (qhfast._fused), so whole optimizers run it here. Its arithmetic is the C
kernel's, operation for operation, with correctly rounded division and square root and the same
random bits for the same seeds: every dtype, precision mode and state dtype is checked against
the C kernel bit for bit, and against independent references (the per-tensor path in float64,
torch's own conversions). The interpreter spends about 13 ms a program (a chunk of a tensor),
so the problems are small: what a GPU run does fast (3000 tensors of a few elements) is
checked with 3000 tensors of which 100 have elements.

Skipped where triton is not installed (CI installs it with every torch version).
"""

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

import qhfast
import qhfast._fused
import qhfast._quantize as quantize
from helpers import Problem, max_relative_error

triton = pytest.importorskip("triton")
from qhfast.kernels import triton as triton_plans  # noqa: E402

BLOCK, CHUNK = triton_plans.BLOCK, triton_plans.CHUNK


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(qhfast._fused.TRITON_ON_CPU, "1")


def _use_triton(monkeypatch, on: bool) -> None:
    if on:
        monkeypatch.setenv(qhfast._fused.TRITON_ON_CPU, "1")
    else:
        monkeypatch.delenv(qhfast._fused.TRITON_ON_CPU, raising=False)


def _backend(optimizer) -> str:
    return qhfast._fused._PLANS[optimizer][0].backend


SETTINGS = {
    "QHAdam": lambda p, **o: qhfast.QHAdam(p, lr=0.01, nus=(0.7, 0.9), weight_decay=0.01, **o),
    "QHAdamW": lambda p, **o: qhfast.QHAdamW(p, lr=0.01, nus=(0.6, 1.0), weight_decay=0.1,
                                             maximize=True, **o),
    "QHM": lambda p, **o: qhfast.QHM(p, lr=0.1, momentum=0.9, nu=0.7, weight_decay=0.01,
                                     weight_decay_type="direct", **o),
}
PRECISIONS = {
    torch.float32: [{}, dict(state_dtype=torch.bfloat16)],
    torch.float64: [{}, dict(state_dtype=torch.bfloat16)],
    **{dtype: [dict(low_precision=mode, state_dtype=state)
               for mode in ("master", "kahan", "stochastic", "nearest")
               for state in (None, torch.bfloat16)]
       for dtype in (torch.bfloat16, torch.float16)},
}


def _steps(make, dtype, sizes, steps=3, scaled=False, seed=0):
    """Params and optimizer after ``steps`` steps with random gradients. The lr is a 0-d
    tensor changed in place and the first beta/momentum a float changed, every step (the
    kernels must see both); ``scaled``: gradients times 1024, with GradScaler's grad_scale
    and found_inf handed over as GradScaler does."""
    generator = torch.Generator().manual_seed(seed)
    draw = torch.complex128 if dtype.is_complex else torch.float64
    params = [torch.randn(n, generator=generator, dtype=draw).to(dtype).requires_grad_()
              for n in sizes]
    optimizer = make(params, fused=True)
    group = optimizer.param_groups[0]
    group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float64)
    torch.manual_seed(seed)
    for t in range(steps):
        group["lr"].mul_(0.9)
        if "betas" in group:
            group["betas"] = (0.9 - 0.05 * t, group["betas"][1])
        else:
            group["momentum"] = 0.9 - 0.05 * t
        for p in params:
            grad = torch.randn(p.shape, generator=generator, dtype=draw)
            p.grad = (grad * (1024.0 if scaled else 1.0)).to(dtype)
        if scaled:
            optimizer.grad_scale = torch.tensor(1024.0)
            optimizer.found_inf = torch.tensor(0.0)
        optimizer.step()
    return params, optimizer


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def _assert_bitwise(expected, actual) -> None:
    (params_e, opt_e), (params_a, opt_a) = expected, actual
    for x, y in zip(params_e, params_a):
        assert torch.equal(_bits(x), _bits(y))
    for p, q in zip(params_e, params_a):
        state_e, state_a = opt_e.state[p], opt_a.state[q]
        assert state_e.keys() == state_a.keys()
        for key in state_e:
            assert state_e[key].dtype == state_a[key].dtype, key
            assert torch.equal(_bits(state_e[key]), _bits(state_a[key])), key


@pytest.mark.parametrize("dtype", PRECISIONS, ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("name", SETTINGS)
def test_the_triton_kernel_equals_the_c_kernel_bit_for_bit(name, dtype, monkeypatch):
    """Every precision mode and state dtype of the parameter's dtype, a tensor lr changed in
    place and a float beta changed between steps, and (in every other combination) gradients
    scaled as GradScaler hands them over: params, moments, masters, compensations and
    normalizers equal the C kernel's bit for bit, the random draws included (the same seeds
    from torch's generator, the same hash)."""
    for k, options in enumerate(PRECISIONS[dtype]):
        make = lambda p, **o: SETTINGS[name](p, **o, **options)  # noqa: E731
        run = dict(make=make, dtype=dtype, sizes=(3, 100), scaled=k % 2 == 1)
        _use_triton(monkeypatch, False)
        expected = _steps(**run)
        _use_triton(monkeypatch, True)
        actual = _steps(**run)
        assert _backend(expected[1]) == "cpu" and _backend(actual[1]) == "triton"
        _assert_bitwise(expected, actual)


@pytest.mark.parametrize("dtype,options", [(torch.float32, {}),
                                           (torch.bfloat16, dict(low_precision="stochastic"))])
def test_channels_last_params_equal_the_c_kernels_bit_for_bit(dtype, options, monkeypatch):
    """Conv weights in channels_last (a flat run of elements in another order than the
    shape's): both kernels take them, their gradients and state laid out alike, and agree bit
    for bit, random draws included (an element's draw follows its place in memory)."""
    def run():
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(2, 3, 4, 5, generator=generator).to(dtype)
                  .contiguous(memory_format=torch.channels_last).requires_grad_(),
                  torch.randn(7, generator=generator).to(dtype).requires_grad_()]
        optimizer = SETTINGS["QHAdam"](params, fused=True, **options)
        torch.manual_seed(0)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(dtype).contiguous(
                    memory_format=torch.channels_last if p.dim() == 4 else torch.contiguous_format)
            optimizer.step()
        return params, optimizer

    _use_triton(monkeypatch, False)
    expected = run()
    _use_triton(monkeypatch, True)
    actual = run()
    assert _backend(expected[1]) == "cpu" and _backend(actual[1]) == "triton"
    assert not expected[0][0].is_contiguous()
    _assert_bitwise(expected, actual)


@pytest.mark.parametrize("name,dtype,options,sizes", [
    ("QHAdam", torch.float32, {}, ((44, 100), (33, 1000), (20, 512), 100)),
    ("QHAdamW", torch.bfloat16, dict(low_precision="stochastic"), ((44, 100), 100)),
    ("QHAdam", torch.float64, {}, ((44, 100), 100)),
    ("QHM", torch.float32, {}, ((44, 100), 100)),
    ("QHM", torch.float16, dict(low_precision="kahan"), ((44, 100), 100)),
    ("QHAdam", torch.complex64, {}, ((22, 100), 50)),
], ids=["QHAdam-fp32", "QHAdamW-bf16-stochastic", "QHAdam-fp64", "QHM-fp32", "QHM-fp16-kahan",
        "QHAdam-complex64"])
def test_8bit_moments_equal_the_c_kernels_bit_for_bit(name, dtype, options, sizes, monkeypatch):
    """state_dtype="8bit": codes, scales, params and the rest equal the C kernel's bit for
    bit after 2 steps (the same draws: the same seeds and hash), with GradScaler's scale.
    4400 elements (a partial last block) and 100 (fp32 moments, a bucket of its own; complex:
    2200 and 50, their parts coded); the first case adds 33000 (two chunks: the second's
    scales start at its 128th block) and (20, 512) (scales shaped (rows, 2))."""
    make = lambda p, **o: SETTINGS[name](p, state_dtype="8bit", **options, **o)  # noqa: E731
    run = dict(make=make, dtype=dtype, sizes=sizes, steps=2, scaled=True)
    _use_triton(monkeypatch, False)
    expected = _steps(**run)
    _use_triton(monkeypatch, True)
    actual = _steps(**run)
    assert _backend(expected[1]) == "cpu" and _backend(actual[1]) == "triton"
    key = "momentum_buffer" if name == "QHM" else "exp_avg"
    assert actual[1].state[actual[0][0]][key].dtype == torch.uint8
    _assert_bitwise(expected, actual)


def test_8bit_largest_element_is_exact_at_a_zero_draw_and_subnormal_blocks_stay_finite(
        monkeypatch):
    """The Triton kernel's inverse scale, as quantize()'s (tests/test_8bit_state.py has the C
    kernel's twin): element 0's draws are both 0 (the step's seeds are 0, so its hash is 0)
    and its moments' scales, d and d², are ones whose rounded reciprocal is one fp32 step too
    low: they come back exactly (without the step up, a code lower). The last row's second
    moments are subnormal: their scale is 2^-126, and they come back finite."""
    d = 1.125062346458435
    monkeypatch.setattr(torch, "randint", lambda *args, **kwargs: torch.zeros(
        (), dtype=torch.int64, device=kwargs.get("device")))
    p = torch.zeros(16, 256, requires_grad=True)
    optimizer = qhfast.QHAdam([p], betas=(0.0, 0.0), state_dtype="8bit", fused=True)
    grad = torch.linspace(-0.5, 1.0, 4096).view(16, 256)
    grad[0, 0] = d
    grad[15] *= 2.0 ** -66
    p.grad = grad
    optimizer.step()
    assert _backend(optimizer) == "triton"
    for key, moment, nonnegative in [("exp_avg", grad, False),
                                     ("exp_avg_sq", grad * grad, True)]:
        scales = optimizer.state[p][key + "_scale"]
        back = quantize.dequantize(optimizer.state[p][key], scales, nonnegative, torch.float32)
        assert back[0, 0].item() == moment[0, 0].item(), key
        assert back.isfinite().all()
    assert optimizer.state[p]["exp_avg_sq_scale"][15].item() == 2.0 ** -126


@pytest.mark.parametrize("name,options", [
    ("QHAdam", dict(weight_decay=0.1, maximize=True)),
    ("QHAdam", dict(nus=(0.0, 1.0), betas=(0.0, 0.5), eps=0.0)),  # lerp's other form, ν1 = 0
    ("QHAdamW", dict(nus=(0.5, 0.5), weight_decay=0.3)),
    ("QHM", dict(weight_decay=0.1, weight_decay_type="direct", nu=1.0)),
])
def test_float64_follows_the_per_tensor_path(name, options):
    """Against the per-tensor path (an independent implementation: torch ops), float64 to
    1e-12 relative after 15 steps of the test problem, where which tensors have gradients
    changes between steps (the plan is made again)."""
    make = {"QHAdam": qhfast.QHAdam, "QHAdamW": qhfast.QHAdamW,
            "QHM": lambda p, **o: qhfast.QHM(p, **{"lr": 0.5, "momentum": 0.9, "nu": 0.7, **o})}
    expected, actual = [], []
    for target, fused in ((expected, False), (actual, True)):
        problem = Problem()
        params = problem.params()
        optimizer = make[name](params, **options, **({"fused": True} if fused else
                                                      {"foreach": False}))
        for t in range(15):
            problem.set_grads(params, t)
            optimizer.step()
        target.extend(p.detach() for p in params)
    assert _backend(optimizer) == "triton"
    assert max_relative_error(expected, actual) < 1e-12


@pytest.mark.parametrize("capturable", [False, True])
def test_float32_is_within_a_few_ulps_of_the_per_tensor_path(capturable):
    """fp32 after 10 steps within 1e-6 relative (a few ulps: the per-tensor path divides
    each term, the kernel the sum, and torch's vectorized sqrt is not correctly rounded;
    measured 1.8e-7). With capturable=True the normalizers are fp32 tensors on the params'
    device, as on a GPU (the kernel's fp32 counter arithmetic; the other tests count in
    float64)."""
    finals = []
    for options in ({"foreach": False}, {"fused": True, "capturable": capturable}):
        problem = Problem()
        params = problem.params(torch.float32)
        optimizer = qhfast.QHAdam(params, nus=(0.7, 0.9), **options)
        for t in range(10):
            problem.set_grads(params, t)
            optimizer.step()
        finals.append([p.detach() for p in params])
    assert _backend(optimizer) == "triton"
    counter = optimizer.state[params[0]]["beta1_weight"].dtype
    assert counter == (torch.float32 if capturable else torch.float64)
    assert max_relative_error(*finals) < 1e-6


def _qhadam_reference(theta, grad, m, v, w1, w2, lr, betas, nus, eps):
    """One QHAdam step written with torch ops in fp32 as the kernels' docstrings state it (the
    normalizers and the per-tensor factors in float64, rounded once), independent of their
    conversions: the square root correctly rounded through float64."""
    w1, w2 = w1 * betas[0] + 1, w2 * betas[1] + 1
    f1, f2 = torch.tensor(1 / w1, dtype=torch.float32), torch.tensor(1 / w2, dtype=torch.float32)
    keep2 = torch.tensor(1 - 1 / w2, dtype=torch.float32)
    d = grad.float()
    if f1 < 0.5:  # torch's lerp: which form depends on the weight
        m = m + f1 * (d - m)
    else:
        m = d - (d - m) * (1.0 - f1)
    v = v * keep2 + f2 * d * d
    den = (v * nus[1] + torch.tensor(1 - nus[1], dtype=torch.float32) * d * d)
    den = den.double().sqrt().float() + eps
    step = torch.tensor(-lr * nus[0], dtype=torch.float32) * m
    step = step + torch.tensor(-lr * (1 - nus[0]), dtype=torch.float32) * d
    return theta + step / den, m, v, w1, w2


@pytest.mark.parametrize("mode", ["master", "nearest"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_deterministic_modes_equal_a_torch_ops_reference_bit_for_bit(dtype, mode):
    """bf16/fp16 parameters with "master" and "nearest": 4 steps equal the reference above bit
    for bit, the parameter rounded by torch's own cast (round to nearest even), including
    values near the dtype's overflow, subnormals and zeros. betas (0.6, 0.9) with nus (0.7,
    0.8): from the second step the moments' lerp weight is below 0.5."""
    lr, betas, nus, eps = 0.01, (0.6, 0.9), (0.7, 0.8), 1e-8
    generator = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(500, generator=generator),
                        torch.tensor([0.0, -0.0, 1e-7, -3e-6, 6e-5, 60000.0, -65000.0, 3e38])])
    p = values.to(dtype).requires_grad_()
    optimizer = qhfast.QHAdam([p], lr=lr, betas=betas, nus=nus, eps=eps, fused=True,
                              low_precision=mode)
    theta, m, v = p.detach().float(), torch.zeros(len(values)), torch.zeros(len(values))
    w1 = w2 = 0.0
    for t in range(4):
        grad = torch.randn(len(values), generator=generator).to(dtype)
        p.grad = grad
        optimizer.step()
        if t == 0:  # weight 1: lerp's other form, end - (end - start)·0 = d exactly
            w1, w2 = 1.0, 1.0
            d = grad.float()
            den = (d * d * nus[1] + torch.tensor(1 - nus[1], dtype=torch.float32) * d * d)
            den = den.double().sqrt().float() + eps
            step = (torch.tensor(-lr * nus[0], dtype=torch.float32) * d
                    + torch.tensor(-lr * (1 - nus[0]), dtype=torch.float32) * d)
            theta, m, v = theta + step / den, d, d * d
        else:
            theta, m, v, w1, w2 = _qhadam_reference(theta, grad, m, v, w1, w2, lr, betas, nus,
                                                    eps)
        if mode == "nearest":
            theta = theta.to(dtype).float()
        state = optimizer.state[p]
        assert torch.equal(p.detach().view(torch.int16), theta.to(dtype).view(torch.int16))
        assert torch.equal(state["exp_avg"], m) and torch.equal(state["exp_avg_sq"], v)
        if mode == "master":
            assert torch.equal(state["master_param"], theta)
    assert _backend(optimizer) == "triton"


@pytest.mark.parametrize("dtype,spacing", [(torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)],
                         ids=["bf16", "fp16"])
def test_stochastic_rounding_is_unbiased_and_follows_the_seed(dtype, spacing):
    """2^14 parameters at 1.0 each take an SGD step of an eighth of their spacing (QHM, ν = 0,
    maximize, lr 1/8): each lands on 1.0 or the next value, up with probability 1/8. The
    mean's standard error is sqrt(7/64/2^14) = 0.0026 spacings: within 0.02 (7.7 of them).
    The same torch seed gives the same bits, another seed others."""
    def step(seed):
        torch.manual_seed(seed)
        p = torch.ones(1 << 14, dtype=dtype, requires_grad=True)
        optimizer = qhfast.QHM([p], lr=0.125, momentum=0.0, nu=0.0, maximize=True, fused=True,
                               low_precision="stochastic")
        p.grad = torch.full_like(p, spacing)
        optimizer.step()
        assert _backend(optimizer) == "triton"
        return (p.detach().double() - 1.0) / spacing

    moved = step(0)
    assert ((moved == 0) | (moved == 1)).all()
    assert abs(moved.mean().item() - 0.125) < 0.02
    assert torch.equal(step(0), moved)
    assert not torch.equal(step(1), moved)


def test_chunk_edges_and_many_tensors_equal_the_c_kernel(monkeypatch):
    """Sizes 0, 1, BLOCK-1, BLOCK, BLOCK+1, several blocks and CHUNK+1 (two chunks), then
    3000 tensors of which every 30th has 1 to 3 elements (a wide table, its last columns
    used): bit for bit the C kernel's, with bf16 parameters rounded at random and bf16
    moments, whose random bits follow each element's index over the whole bucket."""
    sizes = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, CHUNK + 1]
    sizes += [1 + (i // 30) % 3 if i % 30 == 29 else 0 for i in range(3000)]
    make = lambda p, **o: qhfast.QHAdam(p, low_precision="stochastic",  # noqa: E731
                                        state_dtype=torch.bfloat16, **o)
    _use_triton(monkeypatch, False)
    expected = _steps(make, torch.bfloat16, sizes, steps=2)
    _use_triton(monkeypatch, True)
    actual = _steps(make, torch.bfloat16, sizes, steps=2)
    assert _backend(actual[1]) == "triton"
    _assert_bitwise(expected, actual)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_params_run_on_their_real_views(dtype, monkeypatch):
    """Complex parameters (their moments complex like them) take the kernel on real views:
    bit for bit the C kernel's, which takes them the same way."""
    make = SETTINGS["QHAdam"]
    _use_triton(monkeypatch, False)
    expected = _steps(make, dtype, (3, 50))
    _use_triton(monkeypatch, True)
    actual = _steps(make, dtype, (3, 50))
    assert _backend(expected[1]) == "cpu" and _backend(actual[1]) == "triton"
    assert actual[1].state[actual[0][0]]["exp_avg"].dtype == dtype
    _assert_bitwise(expected, actual)


def test_the_switch_needs_the_interpreter(monkeypatch):
    """QHFAST_TRITON_ON_CPU=1 without TRITON_INTERPRET=1 leaves fused=True CPU groups on the C
    kernel (compiled Triton cannot take CPU tensors); with both, the Triton kernel."""
    monkeypatch.delenv("TRITON_INTERPRET")
    (p,), optimizer = _steps(SETTINGS["QHAdam"], torch.float32, (100,), steps=1)
    assert _backend(optimizer) == "cpu"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p.grad = torch.ones_like(p)
    optimizer.step()
    assert _backend(optimizer) == "triton"


def test_state_dict_moves_between_triton_the_c_kernel_and_foreach(monkeypatch):
    """A checkpoint of the Triton path resumes on the C kernel (bit for bit the Triton
    continuation) and on the foreach path (1e-12, float64); capturable=True (its counters in
    the compute dtype) takes the Triton kernel too and continues within 1e-12."""
    problem = Problem()
    params = problem.params()
    optimizer = qhfast.QHAdam(params, nus=(0.7, 0.9), fused=True)
    for t in range(3):
        problem.set_grads(params, t)
        optimizer.step()
    saved, start = optimizer.state_dict(), [p.detach().clone() for p in params]
    finals = {}
    for path, options, triton in (("triton", dict(fused=True), True),
                                  ("cpu", dict(fused=True), False),
                                  ("foreach", dict(foreach=True), False),
                                  ("capturable", dict(fused=True, capturable=True), True)):
        _use_triton(monkeypatch, triton)
        resumed = [x.clone().requires_grad_() for x in start]
        other = qhfast.QHAdam(resumed, nus=(0.7, 0.9), **options)
        other.load_state_dict(saved)
        for t in range(3, 6):
            problem.set_grads(resumed, t)
            other.step()
        if path != "foreach":
            assert _backend(other) == ("triton" if triton else "cpu"), path
        finals[path] = [p.detach() for p in resumed]
    assert all(torch.equal(a, b) for a, b in zip(finals["triton"], finals["cpu"]))
    assert max_relative_error(finals["foreach"], finals["triton"]) < 1e-12
    assert max_relative_error(finals["foreach"], finals["capturable"]) < 1e-12


def _last_index(signed: bool) -> int:
    """A code map's last binade index, as the launcher passes it."""
    return quantize.code_map(signed, torch.device("cpu")).binades + 1


def _compile_for_sm90(kernel, signature: dict, constants: dict) -> str:
    """The PTX of ``kernel`` compiled for an H100/H200 (sm_90) with the launcher's options:
    Triton compiles without a GPU (its wheel ships ptxas)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{name: "constexpr" for name in constants}}
    source = ASTSource(kernel, signature, constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=4, enable_fp_fusion=False))
    return compiled.asm["ptx"]


def test_the_kernels_compile_for_an_nvidia_gpu_with_vector_accesses(monkeypatch):
    """What the interpreter cannot show: the kernels compile for sm_90 (the GPU image's triton
    and the newest), with no multiply-add contracted into an FMA, correctly rounded division
    and square root (as the interpreter computes), and, where the launcher found the tensors
    16-byte aligned, 128-bit loads and stores in the full blocks (16-bit tensors included);
    a GradScaler skip must not cost them (it once did: a per-lane found_inf mask). 8-bit
    moments compile too, with their fp32 parameter and gradient in vector accesses and their
    codes in 64-bit ones."""
    pytest.importorskip("triton.backends.nvidia")
    monkeypatch.delenv("TRITON_INTERPRET")  # the module loaded afresh: compilable functions
    spec = importlib.util.spec_from_file_location(
        "qhfast_triton_kernel_for_sm90", Path(triton_plans.__file__).with_name("triton_kernel.py"))
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    pointers = {"table": "*i64", "chunks": "*i64", "n_chunks": "i32", "n": "i32",
                "grad_scale": "*fp32", "found_inf": "*fp32", "seeds": "*i64",
                "signed_values": "*fp32", "signed_binade": "*i32",
                "nonnegative_values": "*fp32", "nonnegative_binade": "*i32"}
    flags = dict(REAL64=False, PARAM=0, MODE=0, STATE=0, DECAY=0, MAXIMIZE=False,
                 HAS_SCALE=True, HAS_FOUND_INF=True, NEEDS_RANDOM=False, ALIGNED=True,
                 CHUNK=CHUNK, BLOCK=BLOCK, SIGNED_LAST=_last_index(True),
                 NONNEGATIVE_LAST=_last_index(False))
    qhadam = {**pointers, **{k: "*fp64" for k in ("lr", "nu1", "nu2", "eps", "weight_decay")}}
    qhm = {**pointers, **{k: "*fp64" for k in ("lr", "momentum", "nu", "weight_decay")}}
    variants = [
        (kernels.qhadam, qhadam, dict(flags, COUNTER64=False), 4),
        (kernels.qhadam, qhadam, dict(flags, PARAM=1, MODE=3, STATE=1, NEEDS_RANDOM=True,
                                      COUNTER64=True), 1),
        (kernels.qhm, qhm, dict(flags, PARAM=2, MODE=2, DECAY=2, NEEDS_RANDOM=True), 2),
        # 8-bit moments: (4, 256) blocks, the rows' scales reduced and the codes encoded
        (kernels.qhadam, qhadam, dict(flags, STATE=2, NEEDS_RANDOM=True, COUNTER64=True), 2),
    ]
    for kernel, signature, constants, vectors in variants:
        ptx = _compile_for_sm90(kernel, signature, constants)
        assert "fma." not in ptx
        if kernel is kernels.qhadam:
            assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx
            assert "div.approx" not in ptx and "div.full" not in ptx and "sqrt.approx" not in ptx
        # per tensor of the block: one 128-bit access (16-bit values: 8 a thread; fp32: 4, twice)
        assert ptx.count("ld.global.v4") >= vectors and ptx.count("st.global.v4") >= vectors - 1
    # the 8-bit variant's codes (8 a thread): a 64-bit access per code tensor of a full block
    assert ptx.count("ld.global.v2.b32") >= 2 and ptx.count("st.global.v2.b32") >= 2
    ptx = _compile_for_sm90(kernels.advance_normalizers,
                            {"table": "*i64", "n": "i32", "beta1": "*fp64", "beta2": "*fp64",
                             "found_inf": "*fp32"},
                            dict(COUNTER64=False, HAS_FOUND_INF=True, BLOCK=BLOCK))
    assert "fma." not in ptx


def test_8bit_moments_of_channels_last_params_leave_the_triton_kernel_with_a_warning(
        monkeypatch):
    """The Triton kernel takes 8-bit moments of contiguous params only (their blocks follow
    the elements' order): a channels_last conv weight's bucket steps on the eager path, with
    a RuntimeWarning naming the cause, and the rest of the group on the kernel. Against the
    foreach path, float64, 1e-12 (the eager buckets draw the same random numbers: the
    compiled group step, which fused=True groups take off the kernels and which draws its own,
    is replaced by the eager one here; it is tested elsewhere)."""
    monkeypatch.setattr(qhfast.kernels.cpu, "_warned", set())
    monkeypatch.setattr(qhfast._fused, "compiled_group_step",
                        lambda optimizer, group, params, amp: optimizer._step_group(group, params, amp))
    finals = []
    for options in ({"foreach": True}, {"fused": True}):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(8, 64, 3), torch.nn.Flatten(),
                                    torch.nn.Linear(64 * 4, 4)).double()
        model.to(memory_format=torch.channels_last)
        optimizer = qhfast.QHAdam(model.parameters(), state_dtype="8bit", **options)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for t in range(2):
                optimizer.zero_grad()
                inputs = torch.randn(2, 8, 4, 4, dtype=torch.float64)
                model(inputs.to(memory_format=torch.channels_last)).square().mean().backward()
                optimizer.step()
        layout = [w for w in caught if "not contiguous (channels_last)" in str(w.message)]
        assert len(layout) == (1 if options.get("fused") else 0)
        finals.append([p.detach().clone() for p in model.parameters()])
    plan = qhfast._fused._PLANS[optimizer][0]
    assert plan.backend == "triton" and plan.refused == [model[0].weight]
    assert optimizer.state[model[0].weight]["exp_avg"].dtype == torch.uint8
    assert max_relative_error(*finals) < 1e-12
