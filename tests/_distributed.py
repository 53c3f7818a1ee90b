"""Shared pieces of the distributed tests: the model, the data, the single-process reference,
and the rank workers that torch.multiprocessing spawns (gloo, CPU: one spawn of 2 ranks runs
``two_rank_runs``, one of 4 ranks the 2-D mesh).

The reference accumulates the gradients of the ranks' half batches and divides by the world
size: what DDP's all-reduce and FSDP2's reduce-scatter compute (two terms, a power-of-two
divisor), so fp32 results can be compared exactly.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import qhfast
import qhfast._fused

WORLD = 2
STEPS = 8
OPTIMIZERS = {
    "QHM": (qhfast.QHM, dict(lr=0.3, momentum=0.9, nu=0.7, weight_decay=0.01)),
    "QHAdam": (qhfast.QHAdam, dict(lr=0.01, nus=(0.7, 1.0), weight_decay=0.01)),
    "QHAdamW": (qhfast.QHAdamW, dict(lr=0.01, nus=(0.7, 0.9), weight_decay=0.1)),
}


def make_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, 15), torch.nn.Tanh(),  # 15 rows: an uneven FSDP shard
        torch.nn.Linear(15, 2),
    )
    return model.to(dtype)


def batch(step: int, rank: int | None = None, features: int = 8,
          seed: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's full batch (16 rows), or one rank's half of it."""
    gen = torch.Generator().manual_seed(seed + step)
    x, y = torch.randn(16, features, generator=gen), torch.randn(16, 2, generator=gen)
    if rank is None:
        return x, y
    rows = slice(rank * 8, (rank + 1) * 8)
    return x[rows], y[rows]


def make_wide_model() -> torch.nn.Module:
    """For 8-bit moments: a (33, 512) weight (16896 elements in rows of two blocks of 256; 33
    rows, an uneven FSDP2 split of 17 and 16) whose moments are 8-bit, and a bias and a small
    layer whose moments stay fp32."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, 33), torch.nn.Tanh(), torch.nn.Linear(33, 2))


def wide_batch(step: int, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """make_wide_model's batch: as batch(), 512 features."""
    return batch(step, rank, features=512, seed=200)


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    return torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)


def train_reference(model, optimizer, steps: range, data=batch) -> None:
    """Single process: each step, the half-batch gradients summed, divided by the world size."""
    for step in steps:
        optimizer.zero_grad()
        for rank in range(WORLD):
            loss_of(model, *data(step, rank)).backward()
        for p in model.parameters():
            p.grad.div_(WORLD)
        optimizer.step()


def train_rank(model, optimizer, steps: range, rank: int, data=batch) -> None:
    for step in steps:
        optimizer.zero_grad()
        loss_of(model, *data(step, rank)).backward()
        optimizer.step()


def full_params(model) -> list[torch.Tensor]:
    return [
        (p.full_tensor() if isinstance(p, torch.distributed.tensor.DTensor) else p).detach().clone()
        for p in model.parameters()
    ]


def dcp_load(model, optimizer, path) -> None:
    """Load a DCP checkpoint into ``model`` and ``optimizer`` in place, as torch documents it
    (sharded or not: in one process too)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


# --------------------------------------------------------------------------------------------
# spawning


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, out_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, out_dir, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        del result
        # Free what references the group (DTensors' device meshes) and destroy it while the
        # interpreter is alive: gloo threads left for interpreter shutdown can abort the
        # process (SIGABRT) after the work is done.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, out_dir: Path, *args, world: int = WORLD, timeout: float = 120.0) -> list:
    """Run fn(rank, world, out_dir, *args) on `world` gloo ranks; return each rank's result."""
    context = mp.start_processes(
        _entry, args=(world, _free_port(), fn, str(out_dir), args), nprocs=world,
        join=False, start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"distributed workers did not finish in {timeout} s")
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


# --------------------------------------------------------------------------------------------
# rank workers (module level, so spawn can pickle them)


def train_many(rank: int, world: int, out_dir: str) -> dict:
    """DDP, FSDP2 (fp32 both paths, bf16 mixed precision, bf16 params with masters (also
    written between steps), with kahan and stochastic rounding and bf16 moments, one fused
    run), ZeRO."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    results = {}
    for name, (cls, kwargs) in OPTIMIZERS.items():
        model = DistributedDataParallel(make_model())
        optimizer = cls(model.parameters(), **kwargs)
        train_rank(model, optimizer, range(STEPS), rank)
        results[("ddp", name)] = full_params(model.module)

        for foreach in (False, True):
            model = make_model()
            for layer in model[::2]:
                fully_shard(layer)
            fully_shard(model)
            optimizer = cls(model.parameters(), **kwargs, foreach=foreach)
            train_rank(model, optimizer, range(STEPS), rank)
            results[("fsdp", name, foreach)] = full_params(model)

        model = make_model()
        fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        optimizer = cls(model.parameters(), **kwargs)
        train_rank(model, optimizer, range(STEPS), rank)
        results[("fsdp_bf16_compute", name)] = full_params(model)

        model = make_model(torch.bfloat16)
        fully_shard(model)
        optimizer = cls(model.parameters(), **kwargs)
        train_rank(model, optimizer, range(STEPS), rank)
        results[("fsdp_bf16_params", name)] = full_params(model)
        master = optimizer.state[next(model.parameters())]["master_param"]
        results[("fsdp_master", name)] = (type(master).__name__, master.dtype, master.placements)

        for mode in ("kahan", "stochastic"):  # bf16 params and bf16 moments, no master
            model = make_model(torch.bfloat16)
            fully_shard(model)
            optimizer = cls(model.parameters(), **kwargs, low_precision=mode,
                            state_dtype=torch.bfloat16)
            torch.manual_seed(rank)
            train_rank(model, optimizer, range(STEPS), rank)
            results[("fsdp_lean", name, mode)] = full_params(model)
            results[("fsdp_lean_state", name, mode)] = [
                (key, type(value).__name__, value.dtype, value.placements == p.placements)
                for p in model.parameters() for key, value in optimizer.state[p].items()
                if value.dim() > 0
            ]

    # bf16 params with masters, halved through the DTensor between steps (a write that counts
    # on the DTensor, not on its local shard): the masters take the write
    model = make_model(torch.bfloat16)
    fully_shard(model)
    optimizer = qhfast.QHAdamW(model.parameters(), **OPTIMIZERS["QHAdamW"][1])
    train_rank(model, optimizer, range(STEPS), rank)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    train_rank(model, optimizer, range(STEPS, 2 * STEPS), rank)
    results[("fsdp_bf16_written", "QHAdamW")] = full_params(model)

    def fused_fsdp_run() -> tuple[list[torch.Tensor], str]:
        """QHAdamW fused=True on FSDP2 shards: the final params and the kernel that ran."""
        model = make_model()
        for layer in model[::2]:
            fully_shard(layer)
        fully_shard(model)
        optimizer = qhfast.QHAdamW(model.parameters(), **OPTIMIZERS["QHAdamW"][1], fused=True)
        train_rank(model, optimizer, range(STEPS), rank)
        return full_params(model), qhfast._fused._PLANS[optimizer][0].backend

    results[("fsdp_fused", "QHAdamW")], results[("fsdp_fused_backend", "QHAdamW")] = (
        fused_fsdp_run())
    if importlib.util.find_spec("triton") is not None:  # the Triton kernel on local shards
        os.environ.update(TRITON_INTERPRET="1", QHFAST_TRITON_ON_CPU="1")
        results[("fsdp_triton", "QHAdamW")], results[("fsdp_triton_backend", "QHAdamW")] = (
            fused_fsdp_run())
        del os.environ["QHFAST_TRITON_ON_CPU"]

    results["bad_input"] = bad_distributed_input()

    model = DistributedDataParallel(make_model())
    optimizer = ZeroRedundancyOptimizer(
        model.parameters(), optimizer_class=qhfast.QHAdam, **OPTIMIZERS["QHAdam"][1]
    )
    train_rank(model, optimizer, range(STEPS), rank)
    results[("zero", "QHAdam")] = full_params(model.module)
    return results


def bad_distributed_input() -> dict:
    """Gradients that do not line up with a DTensor parameter: each step must raise and leave
    the parameter as it was. Returns {case: (error message, parameter unchanged)}."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    param = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
    optimizer = qhfast.QHAdam([param], lr=0.1)
    local = torch.ones(2, 3)
    cases = {
        "plain_grad": torch.ones(4, 3),  # the global shape: torch accepts it, shards would not line up
        "replicated_grad": distribute_tensor(torch.ones(4, 3), mesh, [Replicate()]),
        "partial_grad": DTensor.from_local(torch.ones(4, 3), mesh, [Partial()]),
    }
    outcome = {}
    try:  # a full (plain) state dict loaded into a sharded optimizer
        full = {"state": {0: {"exp_avg": torch.zeros(4, 3), "exp_avg_sq": torch.zeros(4, 3),
                              "beta1_weight": torch.tensor(1.0), "beta2_weight": torch.tensor(1.0)}},
                "param_groups": [dict(optimizer.state_dict()["param_groups"][0], params=[0])]}
        optimizer.load_state_dict(full)
        outcome["full_state_dict"] = (None, None)
    except ValueError as error:
        outcome["full_state_dict"] = (str(error), not optimizer.state)
    for case, grad in cases.items():
        param.grad = grad
        try:
            optimizer.step()
            outcome[case] = (None, None)
        except RuntimeError as error:
            outcome[case] = (str(error), torch.equal(param.to_local(), local) and not optimizer.state)
    # 8-bit moments of layouts whose shards would cut quantization blocks
    layouts = {"8bit_rows": (torch.ones(64, 100), [Shard(0)]),  # rows of 100 numbers
               "8bit_dim_1": (torch.ones(16, 512), [Shard(1)])}
    for case, (full, placements) in layouts.items():
        odd = torch.nn.Parameter(distribute_tensor(full, mesh, placements))
        before = odd.to_local().clone()
        try:
            qhfast.QHAdam([odd], state_dtype="8bit")
            outcome[case] = (None, None)
        except ValueError as error:
            outcome[case] = (str(error), torch.equal(odd.to_local(), before))
    # ... and the same asked for after construction: the step refuses before any change
    odd = torch.nn.Parameter(distribute_tensor(torch.ones(64, 100), mesh, [Shard(0)]))
    wide = torch.nn.Parameter(distribute_tensor(torch.ones(32, 512), mesh, [Shard(0)]))
    optimizer = qhfast.QHAdam([wide, odd], lr=0.1)
    optimizer.param_groups[0]["state_dtype"] = "8bit"
    wide.grad = distribute_tensor(torch.ones(32, 512), mesh, [Shard(0)])
    odd.grad = distribute_tensor(torch.ones(64, 100), mesh, [Shard(0)])
    try:
        optimizer.step()
        outcome["8bit_later"] = (None, None)
    except ValueError as error:
        unchanged = not optimizer.state and bool((odd.to_local() == 1).all()
                                                 and (wide.to_local() == 1).all())
        outcome["8bit_later"] = (str(error), unchanged)
    # flat scales (an earlier qhfast's) loaded into sharded 8-bit moments
    optimizer = qhfast.QHAdam([wide], lr=0.1, state_dtype="8bit")
    saved = {0: {key: distribute_tensor(value, mesh, [Shard(0)]) for key, value in {
        "exp_avg": torch.zeros(32, 512, dtype=torch.uint8), "exp_avg_scale": torch.zeros(64),
        "exp_avg_sq": torch.zeros(32, 512, dtype=torch.uint8),
        "exp_avg_sq_scale": torch.zeros(32, 2)}.items()}}
    saved[0].update(beta1_weight=torch.tensor(1.0), beta2_weight=torch.tensor(1.0))
    try:
        optimizer.load_state_dict({"state": saved, "param_groups": [
            dict(optimizer.state_dict()["param_groups"][0], params=[0])]})
        outcome["flat_scales"] = (None, None)
    except ValueError as error:
        outcome["flat_scales"] = (str(error), not optimizer.state)
    return outcome


def checkpoint_round_trip(rank: int, world: int, out_dir: str, from_single: str) -> dict:
    """FSDP2 + QHAdamW with bf16 params and fp32 masters through DCP: save at step 3 on 2 ranks,
    resume in a fresh model and optimizer; and load a checkpoint written by one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    cls, kwargs = OPTIMIZERS["QHAdamW"]

    def sharded():
        model = make_model(torch.bfloat16)
        fully_shard(model)
        return model, cls(model.parameters(), **kwargs)

    results = {}
    model, optimizer = sharded()
    train_rank(model, optimizer, range(3), rank)
    saved = get_optimizer_state_dict(model, optimizer)
    results["saved_master"] = [
        (type(v["master_param"]).__name__, v["master_param"].dtype) for v in saved["state"].values()
    ]
    dcp.save({"model": get_model_state_dict(model), "optim": saved},
             checkpoint_id=Path(out_dir) / "two_ranks")
    train_rank(model, optimizer, range(3, STEPS), rank)
    results["uninterrupted"] = full_params(model)

    model, optimizer = sharded()
    dcp_load(model, optimizer, Path(out_dir) / "two_ranks")
    train_rank(model, optimizer, range(3, STEPS), rank)
    results["resumed"] = full_params(model)

    model, optimizer = sharded()
    dcp_load(model, optimizer, from_single)
    train_rank(model, optimizer, range(3, STEPS), rank)
    results["from_single"] = full_params(model)

    # kahan compensation and bf16 moments through DCP; the same RNG state after the save and
    # after the load, so the resumed run must be the uninterrupted one bit for bit
    def lean():
        model = make_model(torch.bfloat16)
        fully_shard(model)
        return model, cls(model.parameters(), **kwargs, low_precision="kahan",
                          state_dtype=torch.bfloat16)

    model, optimizer = lean()
    torch.manual_seed(rank)
    train_rank(model, optimizer, range(3), rank)
    dcp.save({"model": get_model_state_dict(model),
              "optim": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=Path(out_dir) / "kahan")
    torch.manual_seed(10 + rank)
    train_rank(model, optimizer, range(3, STEPS), rank)
    results["kahan_uninterrupted"] = full_params(model)
    model, optimizer = lean()
    dcp_load(model, optimizer, Path(out_dir) / "kahan")
    results["kahan_loaded"] = [(type(v).__name__, v.dtype) for s in optimizer.state.values()
                               for k, v in s.items() if k == "kahan_compensation"]
    torch.manual_seed(10 + rank)
    train_rank(model, optimizer, range(3, STEPS), rank)
    results["kahan_resumed"] = full_params(model)
    return results


# --------------------------------------------------------------------------------------------
# tensor parallelism


def _tensor_parallel(model, mesh):
    """Megatron-style MLP: the first layer column-wise (weight and bias sharded on dim 0), the
    second row-wise (weight sharded on dim 1, bias replicated, output all-reduced); the last
    layer stays a plain module, its params plain tensors on every rank."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    return parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})


def _layouts(model) -> list:
    return [(type(p).__name__, tuple(getattr(p, "placements", ()))) for p in model.parameters()]


def train_tensor_parallel(rank: int, world: int, out_dir: str) -> dict:
    """Every optimizer on both paths, and QHAdamW stepping inside backward, on a 2-way
    tensor-parallel float64 MLP: both ranks see the full batch of each step."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name, (cls, kwargs) in OPTIMIZERS.items():
        for foreach in (False, True):
            model = _tensor_parallel(make_model(torch.float64), mesh)
            optimizer = cls(model.parameters(), **kwargs, foreach=foreach)
            for step in range(STEPS):
                optimizer.zero_grad()
                loss_of(model, *batch(step)).backward()
                optimizer.step()
            results[("tp", name, foreach)] = full_params(model)
    results["layouts"] = _layouts(model)
    results["state_layouts"] = [
        (key, type(value).__name__, tuple(value.placements) == tuple(p.placements))
        for p in model.parameters() if hasattr(p, "placements")
        for key, value in optimizer.state[p].items() if value.dim() > 0
    ]

    model = _tensor_parallel(make_model(torch.float64), mesh)
    cls, kwargs = OPTIMIZERS["QHAdamW"]
    optimizer = cls(model.parameters(), **kwargs)
    with qhfast.step_in_backward(optimizer):
        for step in range(STEPS):
            loss_of(model, *batch(step)).backward()
    results[("tp_in_backward", "QHAdamW")] = full_params(model)
    results["grads_released"] = all(p.grad is None for p in model.parameters())
    return results


def _state_layout(model, optimizer) -> list:
    """(param index, key, type, dtype, global shape, local shape, laid out like the param) of
    each per-element state tensor."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    return [(i, key, type(v).__name__, v.dtype, tuple(v.shape), tuple(local(v).shape),
             getattr(v, "placements", None) == getattr(p, "placements", None))
            for i, p in enumerate(model.parameters())
            for key, v in optimizer.state[p].items() if v.dim() > 0]


def _full_state(model, optimizer) -> dict:
    """{(param index, key): the full tensor} of the per-element state."""
    return {(i, key): (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
            for i, p in enumerate(model.parameters())
            for key, v in optimizer.state[p].items() if v.dim() > 0}


def eight_bit_runs(rank: int, world: int, out_dir: str, from_single: str) -> dict:
    """state_dtype="8bit" under FSDP2 on make_wide_model: QHM and QHAdamW trained on both
    paths (the C kernel, foreach) and QHAdamW with bf16 parameters ("stochastic"), QHAdamW
    on the Triton kernel (interpreted, 3 steps); QHAdamW
    through DCP: saved at step 3 and resumed (the same
    RNG seeds after the save and after the load), and a single process's 8-bit checkpoint
    loaded onto the shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    def sharded(name, state_dtype="8bit", dtype=torch.float32, **options):
        cls, kwargs = OPTIMIZERS[name]
        model = make_wide_model().to(dtype)
        fully_shard(model)
        return model, cls(model.parameters(), **kwargs, state_dtype=state_dtype, **options)

    results = {}
    for name in ("QHM", "QHAdamW"):
        for foreach in (None, True):
            model, optimizer = sharded(name, foreach=foreach)
            torch.manual_seed(rank)
            train_rank(model, optimizer, range(STEPS), rank, data=wide_batch)
            results[("train", name, foreach)] = full_params(model)
            results[("layout", name, foreach)] = _state_layout(model, optimizer)
            plans = qhfast._fused._PLANS.get(optimizer)
            results[("backend", name, foreach)] = plans[0].backend if plans else None
    # a tensor of one row: the second rank's shard is empty (0 rows, 0 scales)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    for foreach in (None, True):
        row = torch.nn.Parameter(distribute_tensor(torch.ones(1, 4096), mesh, [Shard(0)]))
        optimizer = qhfast.QHAdam([row], lr=0.1, state_dtype="8bit", foreach=foreach)
        for _ in range(2):
            row.grad = distribute_tensor(torch.full((1, 4096), 0.5), mesh, [Shard(0)])
            optimizer.step()
        layout = [(key, tuple(v.to_local().shape)) for key, v in optimizer.state[row].items()
                  if v.dim() > 0]
        results[("one_row", foreach)] = (row.full_tensor(), layout)
    # the leanest: bf16 parameters rounded stochastically, 8-bit moments (4.1 bytes a parameter)
    model, optimizer = sharded("QHAdamW", dtype=torch.bfloat16, low_precision="stochastic")
    torch.manual_seed(rank)
    train_rank(model, optimizer, range(STEPS), rank, data=wide_batch)
    results["bf16_stochastic"] = (full_params(model), _state_layout(model, optimizer))
    if importlib.util.find_spec("triton") is not None:  # the Triton kernel on local shards
        os.environ.update(TRITON_INTERPRET="1", QHFAST_TRITON_ON_CPU="1")
        model, optimizer = sharded("QHAdamW", fused=True)
        torch.manual_seed(rank)
        train_rank(model, optimizer, range(3), rank, data=wide_batch)  # interpreted: slow
        del os.environ["QHFAST_TRITON_ON_CPU"]
        results["triton"] = (full_params(model), _full_state(model, optimizer),
                             qhfast._fused._PLANS[optimizer][0].backend)

    model, optimizer = sharded("QHAdamW")
    torch.manual_seed(rank)
    train_rank(model, optimizer, range(3), rank, data=wide_batch)
    results["saved"] = _full_state(model, optimizer)
    results["saved_params"] = full_params(model)
    dcp.save({"model": get_model_state_dict(model),
              "optim": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=Path(out_dir) / "eight_bit")
    torch.manual_seed(10 + rank)
    train_rank(model, optimizer, range(3, STEPS), rank, data=wide_batch)
    results["uninterrupted"] = full_params(model)
    model, optimizer = sharded("QHAdamW")
    dcp_load(model, optimizer, Path(out_dir) / "eight_bit")
    results["loaded_layout"] = _state_layout(model, optimizer)
    torch.manual_seed(10 + rank)
    train_rank(model, optimizer, range(3, STEPS), rank, data=wide_batch)
    results["resumed"] = full_params(model)
    model, optimizer = sharded("QHAdamW")
    dcp_load(model, optimizer, from_single)
    results["from_single"] = _full_state(model, optimizer)

    # a sharded state dict converted on load, shard by shard: 8-bit moments (the single
    # process's, loaded above) to fp32 and back
    full_model, full_precision = sharded("QHAdamW", state_dtype=None)
    set_optimizer_state_dict(full_model, full_precision, get_optimizer_state_dict(model, optimizer))
    results["to_fp32"] = (_state_layout(full_model, full_precision),
                          _full_state(full_model, full_precision))
    model, optimizer = sharded("QHAdamW")
    set_optimizer_state_dict(model, optimizer, get_optimizer_state_dict(full_model, full_precision))
    results["back_to_8bit"] = (_state_layout(model, optimizer), _full_state(model, optimizer))
    return results


def two_rank_runs(rank: int, world: int, out_dir: str, from_single: str,
                  eight_bit_from_single: str) -> dict:
    """Everything the 2-rank tests check, in one spawn (a spawn's start-up, torch's import and
    the process group, costs more than most of the work): the DDP/FSDP2/ZeRO training, the DCP
    round trips and tensor parallelism."""
    return {"train": train_many(rank, world, out_dir),
            "checkpoints": checkpoint_round_trip(rank, world, out_dir, from_single),
            "tensor_parallel": train_tensor_parallel(rank, world, out_dir),
            "eight_bit": eight_bit_runs(rank, world, out_dir, eight_bit_from_single)}


def train_fsdp_tensor_parallel(rank: int, world: int, out_dir: str) -> dict:
    """A 2-D mesh on 4 ranks: tensor parallel within pairs, FSDP2 across them (data parallel:
    each pair sees half of the batch). float64, every optimizer."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    results = {}
    for name, (cls, kwargs) in OPTIMIZERS.items():
        model = _tensor_parallel(make_model(torch.float64), mesh["tp"])
        fully_shard(model, mesh=mesh["dp"])
        optimizer = cls(model.parameters(), **kwargs)
        train_rank(model, optimizer, range(STEPS), mesh["dp"].get_local_rank())
        results[("fsdp_tp", name)] = full_params(model)
    results["layouts"] = _layouts(model)
    return results
