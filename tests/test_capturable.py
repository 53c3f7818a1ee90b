"""capturable=True: counters on the param's device, no host sync in step(), same trajectory.

On the CPU this checks the parts that do not need a GPU: where the counters live, that the
device-side path computes the same function, and that step() never reads a tensor's value on
the host. The CUDA graph capture-and-replay test runs only where CUDA is available.
"""

import pytest
import torch

from helpers import OPTIMIZERS, PATHS, Problem, max_relative_error, run

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_capturable_path_computes_the_same_trajectory(name, foreach):
    """float64, 1e-12 relative: the device-side normalizers are float64 tensors here, so the
    two paths differ only in the grouping of float64 operations."""
    expected = run(lambda p: OPTIMIZERS[name](p, foreach=foreach), 300)
    actual = run(lambda p: OPTIMIZERS[name](p, foreach=foreach, capturable=True), 300)
    assert max_relative_error(expected, actual) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_capturable_counters_live_on_the_param_device_in_compute_dtype(dtype):
    problem = Problem()
    params = problem.params(dtype)
    optimizer = OPTIMIZERS["QHAdam"](params, capturable=True)
    problem.set_grads(params, 10)
    optimizer.step()
    for key in ("beta1_weight", "beta2_weight"):
        counter = optimizer.state[params[0]][key]
        assert counter.device == params[0].device and counter.shape == ()
        assert counter.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_capturable_step_reads_no_tensor_value_on_the_host(name, foreach, monkeypatch):
    """Every way of pulling a tensor's value to Python (a device sync on a GPU) raises here."""
    problem = Problem()
    params = problem.params(torch.bfloat16)
    optimizer = OPTIMIZERS[name](params, foreach=foreach, capturable=True, weight_decay=0.1)
    problem.set_grads(params, 10)

    def host_read(*args, **kwargs):
        raise AssertionError("host read of a tensor value inside step()")

    for method in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, host_read)
    optimizer.step()
    monkeypatch.undo()
    # the check is live: the default (non-capturable) QHAdam path reads its CPU counters
    if name != "QHM":
        for method in ("__float__", "tolist"):
            monkeypatch.setattr(torch.Tensor, method, host_read)
        with pytest.raises(AssertionError, match="host read"):
            OPTIMIZERS[name](params, foreach=foreach).step()


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_cuda_graph_capture_and_replay_matches_eager(name, dtype):
    problem = Problem()
    eager_params = [p.detach().cuda().to(dtype).requires_grad_() for p in problem.params(torch.float32)]
    graph_params = [p.detach().clone().requires_grad_() for p in eager_params]
    eager = OPTIMIZERS[name](eager_params, capturable=True, foreach=True)
    captured = OPTIMIZERS[name](graph_params, capturable=True, foreach=True)
    grads = [torch.zeros_like(p) for p in graph_params]
    for p, g in zip(graph_params, grads):
        p.grad = g

    def set_grads(step):
        for i, (e, g) in enumerate(zip(eager_params, grads)):
            value = problem.grad(i, e, step).to(device=e.device, dtype=dtype)
            e.grad = value.clone()
            g.copy_(value)

    # warm up on a side stream (state gets created), then capture one step
    set_grads(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager.step()
        captured.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured.step()
    for step in range(1, 30):
        set_grads(step)
        eager.step()
        graph.replay()
    torch.cuda.synchronize()
    # replay launches the same deterministic elementwise kernels on the same inputs as eager
    for e, c in zip(eager_params, graph_params):
        assert torch.equal(e, c)


@cuda
def test_stepping_a_non_capturable_optimizer_inside_a_capture_raises():
    param = torch.zeros(4, device="cuda", requires_grad=True)
    param.grad = torch.ones_like(param)
    optimizer = OPTIMIZERS["QHAdam"]([param])
    optimizer.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable"):
        with torch.cuda.graph(graph):
            optimizer.step()
