"""CUDA-only checks: fp16 GradScaler on the GPU, the compiled step's kernel count, and the
step's peak extra memory on the foreach path against the per-tensor path. They skip without
CUDA (CUDA graph capture and replay is in test_capturable.py)."""

import pytest
import torch

from helpers import OPTIMIZERS, Problem, assert_same, max_relative_error, snapshot

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cuda_params(dtype):
    return [p.detach().to("cuda", dtype).requires_grad_() for p in Problem().params(torch.float32)]


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fp16_gradscaler_on_cuda_skips_inf_and_halves_the_scale(name, capturable):
    params = _cuda_params(torch.float16)
    optimizer = OPTIMIZERS[name](params, capturable=capturable)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)

    def backward(poison):
        loss = sum((p.float() * (i + 1)).sum() for i, p in enumerate(params))
        if poison:
            loss = loss * float("inf")
        scaler.scale(loss).backward()

    for poison in (False, False, True):
        optimizer.zero_grad()
        backward(poison)
        before = snapshot(optimizer, params)
        scaler.step(optimizer)
        scaler.update()
    assert_same(snapshot(optimizer, params)["state"], before["state"])
    assert_same(snapshot(optimizer, params)["params"], before["params"])
    assert scaler.get_scale() == 2.0**9


def test_compiled_step_fuses_into_few_kernels():
    """fp32 QHAdam over a few tensors compiles (foreach, horizontal fusion) to a handful of
    kernels for the steady step, not one per op per tensor (~15 ops x 4 tensors)."""
    from torch._inductor import metrics

    params = _cuda_params(torch.float32)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = OPTIMIZERS["QHAdam"](params, lr=torch.tensor(0.01, device="cuda"), capturable=True)
    step = torch.compile(optimizer.step, fullgraph=True)
    step()  # first graph: creates the state
    metrics.reset()
    torch._dynamo.reset()
    step = torch.compile(optimizer.step, fullgraph=True)
    step()  # steady-state graph alone
    assert 0 < metrics.generated_kernel_count <= 8


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_peak_step_memory_foreach_against_per_tensor(name):
    """The per-tensor path holds temporaries of one tensor at a time; foreach holds them for
    the whole bucket, bounded by a few param-sized lists (the working gradient and the
    denominator: at most 3x the params' bytes here, with fp32 params)."""
    params = [torch.randn(1024, 1024, device="cuda", requires_grad=True) for _ in range(8)]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    peaks = {}
    for foreach in (False, True):
        optimizer = OPTIMIZERS[name](params, foreach=foreach, weight_decay=0.1)
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()  # state exists
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        optimizer.step()
        torch.cuda.synchronize()
        peaks[foreach] = torch.cuda.max_memory_allocated() - base
    one_tensor = params[0].numel() * params[0].element_size()
    assert peaks[False] <= 4 * one_tensor
    assert peaks[True] <= 3 * param_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fused_step_on_cuda_matches_the_foreach_path(name, dtype):
    """fused=True on the GPU (Triton): after 10 steps the fp32 values (params, or masters for
    bf16) match the eager foreach path to 1e-5 relative (fp32 regrouping, ~1e-7 per op)."""
    problem = Problem()
    results = []
    for fused in (False, True):
        params = _cuda_params(dtype)
        optimizer = OPTIMIZERS[name](params, fused=fused, foreach=None if fused else True)
        for t in range(10):
            for i, p in enumerate(params):
                p.grad = problem.grad(i, p.detach().cpu(), t).to("cuda", dtype)
            optimizer.step()
        results.append([optimizer.state[p].get("master_param", p).detach().cpu() for p in params])
    assert max_relative_error(*results) < 1e-5


def test_python_m_perf_on_cuda_has_graph_rows_and_a_cuda_block(tmp_path):
    """The benchmark's GPU side end to end, tiny: the CUDA table with CUDA-graph-replayed rows,
    the allocator's peak per step, and its own `cuda` block in the results file."""
    import subprocess
    import sys
    from pathlib import Path

    output = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [sys.executable, "-m", "perf", "--quick", "--device", "cuda", "--only", "QHAdam fp32",
         "--quality-steps", "0", "--output", str(output)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    table = {line.split(" | ")[0].lstrip("| "): line for line in done.stdout.splitlines()
             if line.startswith("| ")}
    assert "qhfast QHAdam fp32 CUDA graph" in table
    assert "torch Adam fp32 fused CUDA graph" in table
    assert "qhfast QHAdam fp32 foreach (default)" in table
    assert table["qhfast QHAdam fp32 foreach (default)"].rstrip(" |").split(" | ")[-1] != "-"
    assert "<!-- python -m perf: cuda: begin" in output.read_text()


@pytest.mark.parametrize("options", [dict(low_precision="kahan", state_dtype=torch.bfloat16),
                                     dict(low_precision="stochastic", state_dtype=torch.bfloat16)],
                         ids=["kahan_bf16_state", "stochastic_bf16_state"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_lean_precision_captured_in_a_cuda_graph(name, options):
    """bf16 params, capturable: the step, its random draws included, is captured in a CUDA
    graph without a host sync (sync debug mode "error" raises on one) and its replays, with
    a tensor lr changed in place between them, track the eager fp32 run on the same gradients
    within the CPU bounds of test_low_precision_modes (2 bf16 eps for kahan, 8 for stochastic
    rounding). Replays draw fresh random numbers (CUDA's generator is graph-safe), so two
    replays of the same inputs do not repeat the same rounding."""
    problem = Problem()
    lr = {"QHM": 0.5}.get(name, 0.01)
    params = _cuda_params(torch.bfloat16)
    optimizer = OPTIMIZERS[name](params, lr=torch.tensor(lr, device="cuda"), capturable=True,
                                 **options)
    reference = [p.detach().float().cpu().requires_grad_() for p in params]
    fp32 = OPTIMIZERS[name](reference, lr=torch.tensor(lr))

    def set_grads(t):
        for i, (p, r) in enumerate(zip(params, reference)):
            g = problem.grad(i, r.detach(), t)
            r.grad = g.clone()
            if p.grad is None:
                p.grad = g.to("cuda", torch.bfloat16)
            else:
                p.grad.copy_(g)

    set_grads(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for t in range(3):  # warm-up: state created
            optimizer.step()
            fp32.step()
            set_grads(t + 1)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for t in range(3, 30):
        if t == 15:  # a scheduler's in-place change, seen by the replay
            optimizer.param_groups[0]["lr"].fill_(lr / 2)
            fp32.param_groups[0]["lr"].fill_(lr / 2)
        graph.replay()
        fp32.step()
        set_grads(t + 1)
    torch.cuda.synchronize()
    eps = torch.finfo(torch.bfloat16).eps
    bound = (2 if options["low_precision"] == "kahan" else 8) * eps
    actual = [p.detach().cpu() for p in params]
    assert max_relative_error([r.detach() for r in reference], actual) < bound
