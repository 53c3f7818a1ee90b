"""DDP, FSDP2, DCP checkpoints, ZeRO and tensor parallelism with qhfast, on real gloo processes
on the CPU.

Two spawns cover everything (process start-up dominates the cost): one of 2 ranks trains
every DDP/FSDP2/ZeRO and tensor-parallel setting and runs the checkpoint round trips, one of
4 ranks the 2-D mesh. References run in this process.
"""

import pytest
import torch
import torch.distributed as dist

import _distributed as D

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def _reference(name, dtype=torch.float32, steps=D.STEPS, **extra):
    cls, kwargs = D.OPTIMIZERS[name]
    model = D.make_model(dtype)
    optimizer = cls(model.parameters(), **kwargs, **extra)
    D.train_reference(model, optimizer, range(steps))
    return model, optimizer


def _eight_bit_reference(name="QHAdamW", steps=D.STEPS, **options):
    """make_wide_model trained in one process, with 8-bit moments (or ``options``)."""
    cls, kwargs = D.OPTIMIZERS[name]
    model = D.make_wide_model()
    optimizer = cls(model.parameters(), **{"state_dtype": "8bit", **kwargs, **options})
    torch.manual_seed(0)
    D.train_reference(model, optimizer, range(steps), data=D.wide_batch)
    return model, optimizer


def _assert_identical(expected, actual):
    for e, a in zip(expected, actual, strict=True):
        assert e.dtype == a.dtype and torch.equal(e, a), (e - a).abs().max()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The results of D.two_rank_runs on each of 2 ranks, and the checkpoint directory. The
    single-process checkpoint that the ranks load is written first (at step 3: a plain model,
    no process group); the single process then continues to STEPS as the reference."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    directory = tmp_path_factory.mktemp("two_ranks")
    model, optimizer = _reference("QHAdamW", torch.bfloat16, steps=3)
    dcp.save({"model": get_model_state_dict(model),
              "optim": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=directory / "single")
    D.train_reference(model, optimizer, range(3, D.STEPS))
    eight_bit = _eight_bit_reference(steps=3)  # 8-bit moments, for the ranks to load
    dcp.save({"model": get_model_state_dict(eight_bit[0]),
              "optim": get_optimizer_state_dict(*eight_bit)},
             checkpoint_id=directory / "single_8bit")
    ranks = D.spawn(D.two_rank_runs, directory, str(directory / "single"),
                    str(directory / "single_8bit"), timeout=300.0)
    return directory, D.full_params(model), ranks, D._full_state(*eight_bit)


@pytest.fixture(scope="module")
def trained(two_ranks):
    return [rank_results["train"] for rank_results in two_ranks[2]]


@pytest.mark.parametrize("name", D.OPTIMIZERS)
def test_ddp_equals_the_single_process_run(trained, name):
    expected = D.full_params(_reference(name)[0])
    for rank_results in trained:
        _assert_identical(expected, rank_results[("ddp", name)])


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("name", D.OPTIMIZERS)
def test_fsdp2_fp32_equals_the_single_process_run_exactly(trained, name, foreach):
    """The same path on local shards and on the whole tensors: bit for bit."""
    expected = D.full_params(_reference(name, foreach=foreach)[0])
    for rank_results in trained:
        _assert_identical(expected, rank_results[("fsdp", name, foreach)])


def test_fsdp2_fused_step_on_local_shards_tracks_the_single_process_run(trained):
    """fused=True with FSDP2: the C kernel runs on the DTensors' local shards. Against the
    eager single-process run, 1e-5 relative: fp32 everywhere, the kernel's one division and
    torch's vectorized ops round differently (~1e-7 per op over 8 steps)."""
    expected = D.full_params(_reference("QHAdamW")[0])
    for rank_results in trained:
        assert rank_results[("fsdp_fused_backend", "QHAdamW")] == "cpu"
        actual = rank_results[("fsdp_fused", "QHAdamW")]
        for e, a in zip(expected, actual, strict=True):
            assert (e - a).abs().max() <= 1e-5 * e.abs().max()


def test_fsdp2_triton_kernel_on_local_shards_equals_the_c_kernel(trained):
    """The Triton kernel (Triton's interpreter, in the ranks) on FSDP2's local shards: bit for
    bit the C kernel's run on the same shards."""
    pytest.importorskip("triton")
    for rank_results in trained:
        assert rank_results[("fsdp_triton_backend", "QHAdamW")] == "triton"
        expected = rank_results[("fsdp_fused", "QHAdamW")]
        actual = rank_results[("fsdp_triton", "QHAdamW")]
        assert all(torch.equal(e, a) for e, a in zip(expected, actual, strict=True))


@pytest.mark.parametrize("name", D.OPTIMIZERS)
def test_fsdp2_bf16_compute_tracks_the_fp32_run(trained, name):
    """MixedPrecisionPolicy(param_dtype=bf16): forward, backward and reduction in bf16
    (precision 2^-8), fp32 sharded params and optimizer. The gradients' bf16 rounding steers
    the run slightly off the fp32 one; measured against how far the params moved, the gap is
    0.4% (QHM), 0.6% (QHAdam) and 4.1% (QHAdamW, whose nu2 = 0.9 puts the current noisy gradient
    in the denominator). Bound: 10%; a wrong step (scale, sign, a skipped update) is ~100%."""
    expected = D.full_params(_reference(name)[0])
    start = D.full_params(D.make_model())
    flat = lambda tensors: torch.cat([t.flatten() for t in tensors])  # noqa: E731
    for rank_results in trained:
        actual = rank_results[("fsdp_bf16_compute", name)]
        assert all(a.dtype == torch.float32 for a in actual)
        deviation = (flat(expected) - flat(actual)).norm()
        assert deviation <= 0.1 * (flat(expected) - flat(start)).norm()


@pytest.mark.parametrize("name", D.OPTIMIZERS)
def test_fsdp2_bf16_params_with_masters_equal_the_single_process_run(trained, name):
    """bf16 params sharded by FSDP2 with fp32 masters sharded like them: the same bf16
    forward/backward and fp32 update as one process with bf16 params."""
    expected = D.full_params(_reference(name, torch.bfloat16)[0])
    for rank_results in trained:
        _assert_identical(expected, rank_results[("fsdp_bf16_params", name)])
        kind, dtype, placements = rank_results[("fsdp_master", name)]
        assert kind == "DTensor" and dtype == torch.float32
        assert placements == (torch.distributed.tensor.Shard(0),)


def test_fsdp2_masters_take_a_write_through_the_dtensor(trained):
    """bf16 params with fp32 masters, halved between steps through the DTensor (as a model's
    ``set_model_state_dict`` or a clamp writes): the masters take the write, as in one
    process. Such a write counts on the DTensor's version, not its local shard's: the masters
    missed it, and the next step went on from the old weights."""
    model, optimizer = _reference("QHAdamW", torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    D.train_reference(model, optimizer, range(D.STEPS, 2 * D.STEPS))
    for rank_results in trained:
        _assert_identical(D.full_params(model), rank_results[("fsdp_bf16_written", "QHAdamW")])


@pytest.mark.parametrize("mode", ["kahan", "stochastic"])
@pytest.mark.parametrize("name", D.OPTIMIZERS)
def test_fsdp2_lean_precision_shards_its_buffers_and_tracks_the_fp32_run(trained, name, mode):
    """bf16 params, bf16 moments, kahan compensation or stochastic rounding under FSDP2: every
    per-element state tensor is a DTensor sharded like its parameter, in the expected dtype,
    and the run tracks the fp32 single-process one. The draws differ from one process's (each
    rank rounds its own shard), so the bound is statistical: within 10% of how far the params
    moved. Measured in one process over 5 seeds: bf16 params with masters deviate 1.7-4.3%
    (bf16 forward and backward), kahan the same, stochastic rounding 3.5-6.8%; a wrong step
    (scale, sign, a skipped update) is ~100%."""
    expected = D.full_params(_reference(name)[0])
    start = D.full_params(D.make_model())
    flat = lambda tensors: torch.cat([t.float().flatten() for t in tensors])  # noqa: E731
    dtypes = {"kahan_compensation": torch.bfloat16, "momentum_buffer": torch.bfloat16,
              "exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16}
    for rank_results in trained:
        actual = rank_results[("fsdp_lean", name, mode)]
        assert all(a.dtype == torch.bfloat16 for a in actual)
        deviation = (flat(expected) - flat(actual)).norm()
        assert deviation <= 0.1 * (flat(expected) - flat(start)).norm()
        state = rank_results[("fsdp_lean_state", name, mode)]
        assert state and {key for key, *_ in state} <= set(dtypes)
        assert any(key == "kahan_compensation" for key, *_ in state) == (mode == "kahan")
        for key, kind, dtype, same_layout in state:
            assert kind == "DTensor" and dtype == dtypes[key] and same_layout, key


def test_inputs_that_do_not_line_up_with_dtensor_params_raise_and_change_nothing(trained):
    messages = {
        "plain_grad": "a DTensor parameter needs a DTensor gradient",
        "replicated_grad": "does not match its parameter's (Shard(dim=0),)",
        "partial_grad": "a Partial (not yet reduced) gradient cannot be applied",
        "full_state_dict": "got full tensors for sharded (DTensor) parameters",
        "8bit_rows": "of shape (64, 100): its rows are 100 numbers (shape (64, 100)), not a "
                     "multiple of 256",
        "8bit_dim_1": "of shape (16, 512): it is sharded along dim 1",
        "8bit_later": "of shape (64, 100): its rows are 100 numbers",
        "flat_scales": "'exp_avg' of parameter 0 holds scales shaped (64,), which a sharded "
                       "parameter needs shaped (32, 2)",
    }
    for rank_results in trained:
        for case, expected in messages.items():
            message, unchanged = rank_results[("bad_input")][case]
            assert message is not None and expected in message, (case, message)
            assert unchanged, case


def test_zero_redundancy_optimizer(trained):
    expected = D.full_params(_reference("QHAdam")[0])
    for rank_results in trained:
        _assert_identical(expected, rank_results[("zero", "QHAdam")])


# --------------------------------------------------------------------------------------------
# torch.distributed.checkpoint


@pytest.fixture(scope="module")
def checkpoints(two_ranks):
    directory, single_process, ranks, _ = two_ranks
    return directory, single_process, [rank_results["checkpoints"] for rank_results in ranks]


def test_dcp_round_trip_resumes_the_same_trajectory(checkpoints):
    _, _, ranks = checkpoints
    for rank_results in ranks:
        _assert_identical(rank_results["uninterrupted"], rank_results["resumed"])
        assert all(kind == "DTensor" and dtype == torch.float32
                   for kind, dtype in rank_results["saved_master"])


def test_dcp_round_trip_of_kahan_compensation_and_bf16_moments(checkpoints):
    _, _, ranks = checkpoints
    for rank_results in ranks:
        assert rank_results["kahan_loaded"]
        assert all(kind == "DTensor" and dtype == torch.bfloat16
                   for kind, dtype in rank_results["kahan_loaded"])
        _assert_identical(rank_results["kahan_uninterrupted"], rank_results["kahan_resumed"])


def test_dcp_checkpoint_from_one_process_loads_on_two_ranks(checkpoints):
    _, single_process, ranks = checkpoints
    for rank_results in ranks:
        _assert_identical(single_process, rank_results["from_single"])


def test_dcp_checkpoint_from_two_ranks_loads_in_one_process(checkpoints):
    directory, _, ranks = checkpoints
    cls, kwargs = D.OPTIMIZERS["QHAdamW"]
    model = D.make_model(torch.bfloat16)
    optimizer = cls(model.parameters(), **kwargs)
    D.dcp_load(model, optimizer, directory / "two_ranks")
    master = optimizer.state[next(model.parameters())]["master_param"]
    assert master.dtype == torch.float32 and type(master) is torch.Tensor
    D.train_reference(model, optimizer, range(3, D.STEPS))
    _assert_identical(ranks[0]["uninterrupted"], D.full_params(model))


# --------------------------------------------------------------------------------------------
# 8-bit moments under FSDP2 (make_wide_model: a (33, 512) weight, rows of 2 blocks, 17 + 16 rows)


@pytest.fixture(scope="module")
def eight_bit(two_ranks):
    directory, _, ranks, single_state = two_ranks
    return directory, single_state, [rank_results["eight_bit"] for rank_results in ranks]


def _expected_layout(rank, name):
    """What each shard holds: the weight's moments 8-bit, sharded like it, scales (rows, 2);
    the bias (1-D) and the small layer keep fp32 moments."""
    rows = 17 if rank == 0 else 16
    keys = ["momentum_buffer"] if name == "QHM" else ["exp_avg", "exp_avg_sq"]
    layout = []
    for index, shape, local in [(0, (33, 512), (rows, 512)), (1, (33,), (rows,)),
                                (2, (2, 33), (1, 33)), (3, (2,), (1,))]:
        for key in keys:
            if index == 0:
                layout += [(index, key, "DTensor", torch.uint8, shape, local, True),
                           (index, key + "_scale", "DTensor", torch.float32, (33, 2), (rows, 2),
                            True)]
            else:
                layout.append((index, key, "DTensor", torch.float32, shape, local, True))
    return sorted(layout, key=str)


@pytest.mark.parametrize("foreach", [None, True], ids=["c_kernel", "foreach"])
@pytest.mark.parametrize("name", ["QHM", "QHAdamW"])
def test_fsdp2_8bit_moments_are_sharded_like_their_params_and_track_the_fp32_run(
        eight_bit, name, foreach):
    """Each shard quantizes its own blocks: codes and scales are DTensors sharded like the
    weight, on the C kernel (the default) and foreach. The draws differ from one process's
    (each rank rounds its own shard), so the bound is statistical: against the single-process
    run with fp32 moments, within 5% of how far the params moved (measured: QHM 1.0%,
    QHAdamW 1.5%, both paths; a wrong or skipped step is ~100%)."""
    _, _, ranks = eight_bit
    expected = D.full_params(_eight_bit_reference(name, state_dtype=None)[0])
    start = D.full_params(D.make_wide_model())
    flat = lambda tensors: torch.cat([t.flatten() for t in tensors])  # noqa: E731
    for rank, rank_results in enumerate(ranks):
        assert sorted(rank_results[("layout", name, foreach)], key=str) == _expected_layout(
            rank, name)
        assert rank_results[("backend", name, foreach)] == ("cpu" if foreach is None else None)
        actual = rank_results[("train", name, foreach)]
        deviation = (flat(expected) - flat(actual)).norm()
        assert deviation <= 0.05 * (flat(expected) - flat(start)).norm()


def test_fsdp2_8bit_moments_of_bf16_stochastic_params_track_the_fp32_run(eight_bit):
    """bf16 parameters rounded stochastically with 8-bit moments under FSDP2 (the leanest
    mode: no master, no compensation): the layout of the fp32 case, bf16 parameters, and the
    run within 10% of the fp32 single-process run's movement (measured: 2.9%; bf16 forward and
    backward alone give 1.7-4.3% in the lean-precision test above; a wrong step is ~100%)."""
    _, _, ranks = eight_bit
    expected = D.full_params(_eight_bit_reference("QHAdamW", state_dtype=None)[0])
    start = D.full_params(D.make_wide_model())
    flat = lambda tensors: torch.cat([t.float().flatten() for t in tensors])  # noqa: E731
    for rank, rank_results in enumerate(ranks):
        actual, layout = rank_results["bf16_stochastic"]
        assert sorted(layout, key=str) == _expected_layout(rank, "QHAdamW")
        assert all(a.dtype == torch.bfloat16 for a in actual)
        deviation = (flat(expected) - flat(actual)).norm()
        assert deviation <= 0.1 * (flat(expected) - flat(start)).norm()


@pytest.mark.parametrize("foreach", [None, True], ids=["c_kernel", "foreach"])
def test_an_empty_shard_of_8bit_moments_steps(eight_bit, foreach):
    """A (1, 4096) tensor on 2 ranks: the second rank's shard has no rows, no codes and no
    scales, and both step. A constant gradient is one code per block, exact: two steps of
    QHAdam move each element by lr · g / |g| = 0.1 each, to 0.8."""
    _, _, ranks = eight_bit
    for rank, rank_results in enumerate(ranks):
        full, layout = rank_results[("one_row", foreach)]
        rows = 1 - rank
        assert sorted(layout) == [("exp_avg", (rows, 4096)), ("exp_avg_scale", (rows, 16)),
                                  ("exp_avg_sq", (rows, 4096)), ("exp_avg_sq_scale", (rows, 16))]
        torch.testing.assert_close(full, torch.full((1, 4096), 0.8), rtol=1e-6, atol=0)


def test_fsdp2_8bit_on_the_triton_kernel_equals_the_c_kernel(eight_bit):
    """The Triton kernel (interpreted) on the shards' 8-bit moments: params, codes and scales
    after 3 steps bit for bit the C kernel's on the same shards with the same seeds."""
    pytest.importorskip("triton")
    _, _, ranks = eight_bit
    for rank_results in ranks:
        params, state, backend = rank_results["triton"]
        assert backend == "triton"
        _assert_identical(rank_results["saved_params"], params)
        expected = rank_results["saved"]
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(state[key], value), key


def test_a_sharded_8bit_state_dict_converts_to_fp32_moments_and_back_on_load(eight_bit):
    """set_optimizer_state_dict of 8-bit moments into an optimizer with fp32 moments: each
    shard dequantized on its own (gathered: the single process's moments, dequantized), and
    back into 8-bit moments: the same codes and scales (nearest rounding of values a code
    holds exactly)."""
    import qhfast._quantize as quantize

    _, single_state, ranks = eight_bit
    for rank, rank_results in enumerate(ranks):
        layout, state = rank_results["to_fp32"]
        assert {key for _, key, *_ in layout} == {"exp_avg", "exp_avg_sq"}
        assert all(kind == "DTensor" and dtype == torch.float32 and same
                   for _, _, kind, dtype, _, _, same in layout)
        for key in ("exp_avg", "exp_avg_sq"):
            exact = quantize.dequantize(single_state[(0, key)], single_state[(0, key + "_scale")],
                                        key == "exp_avg_sq", torch.float32)
            assert torch.equal(state[(0, key)], exact), key
        layout, state = rank_results["back_to_8bit"]
        assert sorted(layout, key=str) == _expected_layout(rank, "QHAdamW")
        for key, value in single_state.items():
            assert torch.equal(state[key], value), key


def test_dcp_round_trip_of_8bit_moments_resumes_the_same_trajectory(eight_bit):
    """Codes and scales saved by DCP at step 3 on 2 ranks and loaded into a fresh sharded
    optimizer (its shards, not the full tensors): with the same seeds after the save and after
    the load, the resumed run is the uninterrupted one bit for bit."""
    _, _, ranks = eight_bit
    for rank, rank_results in enumerate(ranks):
        assert sorted(rank_results["loaded_layout"], key=str) == _expected_layout(rank, "QHAdamW")
        _assert_identical(rank_results["uninterrupted"], rank_results["resumed"])


def test_dcp_8bit_checkpoint_from_two_ranks_loads_in_one_process(eight_bit):
    """The 2-rank checkpoint loaded into a plain model and optimizer in one process: every
    code, scale and moment equals the ranks' state gathered at the save, and the steps go on."""
    directory, _, ranks = eight_bit
    model, optimizer = _eight_bit_reference(steps=0)
    D.dcp_load(model, optimizer, directory / "eight_bit")
    loaded = D._full_state(model, optimizer)
    saved = ranks[0]["saved"]
    assert loaded.keys() == saved.keys() and loaded[(0, "exp_avg_scale")].shape == (33, 2)
    for key, value in saved.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    before = D.full_params(model)
    D.train_reference(model, optimizer, range(3, D.STEPS), data=D.wide_batch)
    assert all(not torch.equal(b, a) for b, a in zip(before, D.full_params(model)))


def test_dcp_8bit_checkpoint_from_one_process_loads_on_two_ranks(eight_bit):
    """A single process's 8-bit checkpoint loaded onto FSDP2's shards: gathered, the codes,
    scales and moments are the single process's."""
    _, single_state, ranks = eight_bit
    for rank_results in ranks:
        loaded = rank_results["from_single"]
        assert loaded.keys() == single_state.keys()
        for key, value in single_state.items():
            assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


def test_fsdp2_example_trains_under_torchrun(tmp_path):
    """The README's command, shortened: examples/fsdp2_qhadamw.py on 2 processes."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "fsdp2_qhadamw.py"
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(example), "--steps", "60", "--checkpoint", str(tmp_path / "checkpoint")],
        capture_output=True, text=True, timeout=180,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    losses = [float(v) for v in re.findall(r"loss ([0-9.]+)", completed.stdout)]
    assert len(losses) >= 2 and losses[-1] < losses[0] / 2, completed.stdout  # it learns
    assert (tmp_path / "checkpoint" / ".metadata").exists()


# --------------------------------------------------------------------------------------------
# tensor parallelism (parallelize_module), alone on 2 ranks and under FSDP2 on a 2-D mesh of 4

#: float64 throughout: the row-wise layer's all-reduce sums two partial products where one
#: process does one matmul, so the runs differ by reduction order (measured ~4e-16 relative
#: after 8 steps); a wrong update (a shard stepped with the wrong gradient or twice, a
#: replicated param diverging) is off by far more than 1e-12
TP_TOLERANCE = 1e-12


def _full_batch_reference(name, **extra):
    cls, kwargs = D.OPTIMIZERS[name]
    model = D.make_model(torch.float64)
    optimizer = cls(model.parameters(), **kwargs, **extra)
    for step in range(D.STEPS):
        optimizer.zero_grad()
        D.loss_of(model, *D.batch(step)).backward()
        optimizer.step()
    return D.full_params(model)


def _assert_close(expected, actual, tolerance=TP_TOLERANCE):
    start = D.full_params(D.make_model(torch.float64))
    assert max((e - s).abs().max() for e, s in zip(expected, start)) > 1e-3  # it trained
    for e, a in zip(expected, actual, strict=True):
        assert e.dtype == a.dtype and (e - a).abs().max() <= tolerance * e.abs().max()


@pytest.fixture(scope="module")
def tensor_parallel(two_ranks):
    return [rank_results["tensor_parallel"] for rank_results in two_ranks[2]]


def test_tensor_parallel_params_are_sharded_on_dim_0_and_1_and_replicated(tensor_parallel):
    from torch.distributed.tensor import Replicate, Shard

    for rank_results in tensor_parallel:
        assert rank_results["layouts"] == [
            ("DTensor", (Shard(0),)), ("DTensor", (Shard(0),)),  # column-wise weight, bias
            ("DTensor", (Shard(1),)), ("DTensor", (Replicate(),)),  # row-wise weight, bias
            ("Parameter", ()), ("Parameter", ()),  # the plain last layer
        ]
        # the moments of a DTensor param are DTensors laid out like it
        assert {key for key, *_ in rank_results["state_layouts"]} == {"exp_avg", "exp_avg_sq"}
        assert all(kind == "DTensor" and same for _, kind, same in rank_results["state_layouts"])


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("name", D.OPTIMIZERS)
def test_tensor_parallel_equals_the_single_process_run(tensor_parallel, name, foreach):
    expected = _full_batch_reference(name)
    for rank_results in tensor_parallel:
        _assert_close(expected, rank_results[("tp", name, foreach)])


def test_tensor_parallel_steps_inside_backward(tensor_parallel):
    """qhfast.step_in_backward on DTensor params: their gradients are accumulated (already
    reduced) by autograd, so the hooks fire; the run equals the single-process one."""
    expected = _full_batch_reference("QHAdamW")
    for rank_results in tensor_parallel:
        _assert_close(expected, rank_results[("tp_in_backward", "QHAdamW")])
        assert rank_results["grads_released"]


@pytest.fixture(scope="module")
def fsdp_tensor_parallel(tmp_path_factory):
    return D.spawn(D.train_fsdp_tensor_parallel, tmp_path_factory.mktemp("fsdp_tp"), world=4,
                   timeout=300.0)


@pytest.mark.parametrize("name", D.OPTIMIZERS)
def test_fsdp2_over_tensor_parallel_on_a_2d_mesh_equals_the_single_process_run(
        fsdp_tensor_parallel, name):
    """4 gloo processes, mesh (dp=2, tp=2): each tp pair sees half of each step's batch, FSDP2
    averages across the pairs; the reference sums the two half-batch gradients and halves."""
    from torch.distributed.tensor import Replicate, Shard

    cls, kwargs = D.OPTIMIZERS[name]
    model = D.make_model(torch.float64)
    optimizer = cls(model.parameters(), **kwargs)
    D.train_reference(model, optimizer, range(D.STEPS))
    expected = D.full_params(model)
    for rank_results in fsdp_tensor_parallel:
        placements = [p for _, p in rank_results["layouts"]]
        assert placements[2] == (Shard(0), Shard(1)) and placements[3] == (Shard(0), Replicate())
        _assert_close(expected, rank_results[("fsdp_tp", name)])
