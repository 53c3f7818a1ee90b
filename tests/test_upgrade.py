"""The upgrade path: an optimizer checkpoint written by qhfast 0.1.0 loads and resumes bitwise.

tests/data/qhfast-0.1.0-checkpoint.pth.gz was written by the released 0.1.0 code (git revision
31bd9c5) with tests/data/make_qhfast_0_1_0_checkpoint.py, whose docstring says how. For QHM,
QHAdam and QHAdamW, with fp32 parameters and bf16 parameters with and without fp32 masters, on
the per-tensor, foreach and capturable paths, it holds the parameters and the state_dict after
some steps, the gradients of the next steps, and the parameters and state 0.1.0 reached after
them. Today's code loads each state_dict (``weights_only=True``), takes the same steps and must
land on 0.1.0's parameters and state bit for bit.
"""

from __future__ import annotations

import functools
import gzip
import io
from pathlib import Path

import pytest
import torch

import qhfast

CHECKPOINT = Path(__file__).parent / "data" / "qhfast-0.1.0-checkpoint.pth.gz"
CLASSES = {"QHM": qhfast.QHM, "QHAdam": qhfast.QHAdam, "QHAdamW": qhfast.QHAdamW}


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


def _resume(case, grads, state_dict=None, spelling="0.1.0"):
    """Today's optimizer on the checkpoint's parameters, the state loaded (unless None), stepped
    with the stored gradients; returns the optimizer and its parameters."""
    params = [p.clone().requires_grad_() for p in case["params"]]
    kwargs = case["kwargs"] if spelling == "0.1.0" else _today_kwargs(case["kwargs"])
    # lr and the other hyperparameters come from the checkpoint: construct with another lr
    optimizer = CLASSES[case["optimizer"]](params, **{**kwargs, "lr": 123.0})
    if state_dict is not None:
        optimizer.load_state_dict(state_dict)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.clone()
        optimizer.step()
    return optimizer, params


def test_the_checkpoint_was_written_by_qhfast_0_1_0():
    data = _checkpoint()
    assert data["qhfast_version"] == "0.1.0" and data["revision"] == "31bd9c5"
    assert len(data["cases"]) == 24
    for case in data["cases"].values():
        (group,) = case["state_dict"]["param_groups"]
        assert "master_weights" in group and "low_precision" not in group  # 0.1.0's format
        assert case["state_dict"]["state"]  # steps were taken


@pytest.mark.parametrize("spelling", ["0.1.0", "today"])
@pytest.mark.parametrize("name", _case_names())
def test_a_0_1_0_checkpoint_resumes_bitwise(name, spelling):
    case, grads = _case(name)
    optimizer, params = _resume(case, grads, case["state_dict"], spelling)

    (group,) = optimizer.param_groups
    assert group["lr"] == case["state_dict"]["param_groups"][0]["lr"]
    assert "master_weights" not in group
    for flag in ("foreach", "capturable"):
        assert group[flag] == case["kwargs"].get(flag, False)
    for p, expected in zip(params, case["expected"]):
        assert p.dtype == expected.dtype and torch.equal(p.detach(), expected)
    state = optimizer.state_dict()["state"]
    assert state.keys() == case["expected_state"].keys()
    for index, expected_state in case["expected_state"].items():
        assert state[index].keys() == expected_state.keys()
        for key, expected in expected_state.items():
            value = state[index][key]
            assert value.dtype == expected.dtype and value.device == expected.device, (index, key)
            assert torch.equal(value, expected), (index, key)


@pytest.mark.parametrize("name", _case_names())
def test_without_the_loaded_state_the_run_ends_elsewhere(name):
    """The check above is live: the same steps from a fresh state end elsewhere, and bf16
    parameters end elsewhere if the checkpoint's fp32 masters are dropped (the master is then
    made from the bf16 parameter)."""
    case, grads = _case(name)
    _, fresh = _resume(case, grads)
    assert not all(torch.equal(p.detach(), e) for p, e in zip(fresh, case["expected"]))
    if case["setting"] == "bf16_master":
        stripped = {
            "param_groups": case["state_dict"]["param_groups"],
            "state": {
                i: {k: v for k, v in s.items() if k != "master_param"}
                for i, s in case["state_dict"]["state"].items()
            },
        }
        assert all("master_param" in s for s in case["state_dict"]["state"].values())
        _, no_masters = _resume(case, grads, stripped)
        assert not all(torch.equal(p.detach(), e) for p, e in zip(no_masters, case["expected"]))
