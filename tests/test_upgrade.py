"""The upgrade path: an optimizer checkpoint written by qhfast 0.1.0 loads and resumes where 0.1.0
did.

tests/data/qhfast-0.1.0-checkpoint.pth.gz was written by the released 0.1.0 code (git revision
31bd9c5) with tests/data/make_qhfast_0_1_0_checkpoint.py, whose docstring says how. For QHM,
QHAdam and QHAdamW, with fp32 parameters and bf16 parameters with and without fp32 masters, on
the per-tensor, foreach and capturable paths, it holds the parameters and the state_dict after
some steps, the gradients of the next steps, and the parameters and state 0.1.0 reached after
them. Today's code loads each state_dict (``weights_only=True``), takes the same steps and must
land on 0.1.0's parameters and state.

Those expected values were computed on another CPU (CI's AMD EPYC, torch's AVX2 kernels), and
torch's CPU kernels round differently on other vector paths, so they are compared within the
cross-CPU tolerance below, not bit for bit. What both sides compute in this process is compared
bit for bit: the two spellings of the options, and a resume interrupted by a checkpoint saved
today against one that is not.
"""

from __future__ import annotations

import copy
import functools
import gzip
import io
from pathlib import Path

import pytest
import torch

import qhfast
from helpers import assert_same, max_relative_error, ulps_apart

CHECKPOINT = Path(__file__).parent / "data" / "qhfast-0.1.0-checkpoint.pth.gz"
CLASSES = {"QHM": qhfast.QHM, "QHAdam": qhfast.QHAdam, "QHAdamW": qhfast.QHAdamW}

#: How far today's resume on this CPU may land from 0.1.0's stored values (computed on another
#: CPU) in an fp32 tensor, in ulps of the tensor's largest element: at most
#: ``FP32_ULPS · eps · max|expected|`` everywhere.
#:
#: torch's elementwise CPU kernels round differently on different vector paths: with FMA (AVX2,
#: AVX-512) a multiply-add such as lerp's, addcmul's or addcdiv's rounds once, without it
#: (ATEN_CPU_CAPABILITY=default, or an older CPU) twice. Such a difference moves an op's result by
#: at most one ulp of the values it combines. (The counters, ``beta1_weight``..., are separate
#: multiplies and adds of scalars, which every path rounds alike: measured equal; they are held to
#: the same rule in their own dtype.)
#: Counting, for each stored fp32 value, the roundings that reach it in one resumed step, with
#: the factors they reach it with, and adding over the 6 resumed steps (earlier differences are
#: carried with factors of at most 1: lerp's 1 - w, decay's 1 - lr·λ):
#:
#: - QHAdam's ``exp_avg``: the working gradient d (1: coupled decay) and the lerp (2: the
#:   difference, then a multiply-add): 3 a step, 18 in all;
#: - ``exp_avg_sq``: d twice (in d·d), the multiply and the addcmul (3): 5 a step, 30;
#: - a parameter or master under QHAdam: the decoupled decay (1) and two addcdivs (2 each: the
#:   division, then a multiply-add), and under 1 from the update's inputs, which reach it scaled
#:   by lr = 0.01: 6 a step, 36;
#: - QHM's parameter: two scaled adds (2), d times lr·(1 - ν) = 0.15, and the momentum's own
#:   difference (3 a step, growing) times lr·ν = 0.35: 2.15 + 0.35·3k at step k, 35 in all.
#:
#: The largest is 36, under 6 steps × 8 = 48, which leaves room for intermediates somewhat larger
#: than the final tensor's largest element. Measured: 1.15 at most (ATEN_CPU_CAPABILITY=default,
#: which fuses none of the multiply-adds the stored AVX2 run fused), 0 under avx2 and avx512.
#: The bound still catches a real change: a fresh state, or any one hyperparameter moved by 1e-3
#: (the lr by 0.1%), moves some fp32 value of each fp32 or fp32-master run by 99 such ulps or more
#: (test_without_the_loaded_state_the_run_ends_elsewhere,
#: test_a_changed_run_is_outside_the_tolerance).
FP32_ULPS = 48
#: A bf16 value is an fp32 value rounded to nearest: two fp32 values within the tolerance above
#: round to the same bf16 value unless a rounding tie lies between them, and then to adjacent
#: ones, one ulp apart. That happens: one of QHAdamW/bf16_master's masters comes within 3 fp32
#: ulps of a tie. Without masters (``master_weights=False``) the fp32 values the parameters are
#: rounded from lie 58 or more ulps of their own, and at least 21 ulps of their tensor's largest
#: element, from a tie (measured), 18 times the largest cross-CPU difference seen: there the bf16
#: values are in practice equal, and a flip would show in the fp32 moments of the coupled-decay
#: runs.
BF16_ULPS = 1


@functools.cache
def _checkpoint() -> dict:
    return torch.load(io.BytesIO(gzip.decompress(CHECKPOINT.read_bytes())), weights_only=True)


def _case_names() -> list[str]:
    return list(_checkpoint()["cases"])


def _case(name: str):
    case = _checkpoint()["cases"][name]
    return case, _checkpoint()["grads"][case["setting"]]


def _today_kwargs(kwargs: dict) -> dict:
    """0.1.0's arguments in today's spelling: master_weights becomes low_precision."""
    kwargs = dict(kwargs)
    if "master_weights" in kwargs:
        kwargs["low_precision"] = "master" if kwargs.pop("master_weights") else "nearest"
    return kwargs


def _optimizer(case, params, state_dict, spelling):
    """Today's optimizer on ``params``, ``state_dict`` loaded (unless None)."""
    kwargs = case["kwargs"] if spelling == "0.1.0" else _today_kwargs(case["kwargs"])
    # lr and the other hyperparameters come from the checkpoint: construct with another lr
    optimizer = CLASSES[case["optimizer"]](params, **{**kwargs, "lr": 123.0})
    if state_dict is not None:
        optimizer.load_state_dict(state_dict)
    return optimizer


def _step(optimizer, params, grads) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.clone()
        optimizer.step()


def _resume(case, grads, state_dict=None, spelling="0.1.0"):
    """Today's optimizer on the checkpoint's parameters, the state loaded (unless None), stepped
    with the stored gradients; returns the optimizer and its parameters."""
    params = [p.clone().requires_grad_() for p in case["params"]]
    optimizer = _optimizer(case, params, state_dict, spelling)
    _step(optimizer, params, grads)
    return optimizer, params


def _outcome(optimizer, params) -> dict:
    """The parameters and state a run ended with, as the checkpoint file stores 0.1.0's."""
    return {"params": [p.detach().clone() for p in params],
            "state": copy.deepcopy(optimizer.state_dict()["state"])}


def _departures(case, outcome) -> list[str]:
    """Where ``outcome`` leaves 0.1.0's stored parameters and state beyond the cross-CPU
    tolerance (FP32_ULPS, BF16_ULPS): empty if it lands on them."""
    expected = {"params": case["expected"], "state": case["expected_state"]}
    pairs = [(f"param {i}", a, e) for i, (a, e) in
             enumerate(zip(outcome["params"], expected["params"], strict=True))]
    if outcome["state"].keys() != expected["state"].keys():
        return [f"state of params {sorted(outcome['state'])}, not {sorted(expected['state'])}"]
    for index, expected_state in expected["state"].items():
        if outcome["state"][index].keys() != expected_state.keys():
            return [f"state {index} holds {sorted(outcome['state'][index])}"]
        pairs += [(f"state {index} {key}", outcome["state"][index][key], e)
                  for key, e in expected_state.items()]
    departures = []
    for what, actual, expected_value in pairs:
        if (actual.dtype, actual.shape, actual.device) != (
                expected_value.dtype, expected_value.shape, expected_value.device):
            departures.append(f"{what}: {actual.dtype} {tuple(actual.shape)} {actual.device}")
        elif expected_value.dtype == torch.bfloat16:
            apart = int(ulps_apart(actual, expected_value).max()) if actual.numel() else 0
            if apart > BF16_ULPS:
                departures.append(f"{what}: {apart} bf16 ulps apart")
        elif expected_value.is_floating_point() and expected_value.numel():
            error = max_relative_error([expected_value], [actual])
            ulps = error / torch.finfo(expected_value.dtype).eps
            if not ulps <= FP32_ULPS:  # NaN fails too
                departures.append(f"{what}: {ulps:.3g} ulps of its largest element")
        elif not torch.equal(actual, expected_value):
            departures.append(f"{what}: differs")
    return departures


def test_the_checkpoint_was_written_by_qhfast_0_1_0():
    data = _checkpoint()
    assert data["qhfast_version"] == "0.1.0" and data["revision"] == "31bd9c5"
    assert len(data["cases"]) == 24
    for case in data["cases"].values():
        (group,) = case["state_dict"]["param_groups"]
        assert "master_weights" in group and "low_precision" not in group  # 0.1.0's format
        assert case["state_dict"]["state"]  # steps were taken


@pytest.mark.parametrize("name", _case_names())
def test_a_0_1_0_checkpoint_resumes_where_0_1_0_did(name):
    """Loaded as 0.1.0 wrote it, with 0.1.0's arguments, the run lands on 0.1.0's parameters
    and state within the cross-CPU tolerance; with today's spelling of the arguments
    (``low_precision``) it lands on the same bits as with 0.1.0's."""
    case, grads = _case(name)
    optimizer, params = _resume(case, grads, case["state_dict"], "0.1.0")

    (group,) = optimizer.param_groups
    assert group["lr"] == case["state_dict"]["param_groups"][0]["lr"]
    assert "master_weights" not in group
    for flag in ("foreach", "capturable"):
        assert group[flag] == case["kwargs"].get(flag, False)
    outcome = _outcome(optimizer, params)
    departures = _departures(case, outcome)
    assert not departures, "; ".join(departures)
    for index, state in optimizer.state_dict()["state"].items():
        if "master_param" in state:  # a bf16 parameter is its master rounded, bit for bit
            assert torch.equal(params[index].detach(), state["master_param"].to(torch.bfloat16))

    today = _outcome(*_resume(case, grads, case["state_dict"], "today"))
    assert_same(today, outcome)


@pytest.mark.parametrize("name", _case_names())
def test_a_checkpoint_saved_today_after_the_upgrade_resumes_bitwise(name):
    """Halfway through the resumed steps, today's state_dict of the upgraded optimizer, saved
    and loaded (``weights_only=True``) into a new optimizer constructed with today's spelling and
    another lr, continues to the same bits as the uninterrupted resume."""
    case, grads = _case(name)
    straight = _outcome(*_resume(case, grads, case["state_dict"]))

    params = [p.clone().requires_grad_() for p in case["params"]]
    half = len(grads) // 2
    first = _optimizer(case, params, case["state_dict"], "0.1.0")
    _step(first, params, grads[:half])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert "low_precision" in saved["param_groups"][0]
    assert "master_weights" not in saved["param_groups"][0]
    second = _optimizer(case, params, saved, "today")
    _step(second, params, grads[half:])
    assert_same(_outcome(second, params), straight)


def _changed_hyperparameters(group: dict) -> dict[str, dict]:
    """Each hyperparameter of a 0.1.0 param group moved by 1e-3, the lr by 0.1%: the changes a
    tolerance of cross-CPU rounding must not hide."""
    changed = {"lr": {"lr": group["lr"] * (1 + 1e-3)},
               "weight_decay": {"weight_decay": group["weight_decay"] + 1e-3}}
    for key in ("momentum", "nu"):
        if key in group:
            changed[key] = {key: group[key] - 1e-3}
    for key in ("betas", "nus"):
        if key in group:
            for i in range(2):
                pair = list(group[key])
                pair[i] -= 1e-3
                changed[f"{key}[{i}]"] = {key: tuple(pair)}
    return changed


@pytest.mark.parametrize("optimizer_name", CLASSES)
def test_a_changed_run_is_outside_the_tolerance(optimizer_name):
    """The tolerance is tight enough to mean something: with any one hyperparameter of the
    checkpoint moved by 1e-3 (the lr by 0.1%), today's run leaves 0.1.0's values in the fp32 and
    fp32-master cases. (Without masters, a bf16 parameter's 2^-8 resolution can hide
    such a change: the lr's, for one, changes no bit there.)"""
    names = [n for n in _case_names() if n.startswith(f"{optimizer_name}/")
             and _case(n)[0]["setting"] in ("fp32", "bf16_master")]
    for name in names:
        case, grads = _case(name)
        (group,) = case["state_dict"]["param_groups"]
        for what, change in _changed_hyperparameters(group).items():
            state_dict = {"param_groups": [{**group, **change}],
                          "state": case["state_dict"]["state"]}
            outcome = _outcome(*_resume(case, grads, state_dict))
            assert _departures(case, outcome), (name, what)


@pytest.mark.parametrize("name", _case_names())
def test_without_the_loaded_state_the_run_ends_elsewhere(name):
    """The comparison above is live: the same steps from a fresh state end outside the
    tolerance, and bf16 parameters end outside it if the checkpoint's fp32 masters are dropped
    (the master is then made from the bf16 parameter)."""
    case, grads = _case(name)
    assert _departures(case, _outcome(*_resume(case, grads)))
    if case["setting"] == "bf16_master":
        stripped = {
            "param_groups": case["state_dict"]["param_groups"],
            "state": {
                i: {k: v for k, v in s.items() if k != "master_param"}
                for i, s in case["state_dict"]["state"].items()
            },
        }
        assert all("master_param" in s for s in case["state_dict"]["state"].values())
        assert _departures(case, _outcome(*_resume(case, grads, stripped)))
