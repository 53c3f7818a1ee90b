"""Every bad input raises a clear error naming the argument and its range, and changes nothing."""

import copy
import math
import re

import expecttest
import numpy as np
import pytest
import torch

import qhfast
import qhfast._precision
from helpers import OPTIMIZERS, PATHS, Problem, assert_same, snapshot


def _param():
    return torch.zeros(3, requires_grad=True)


def _message(make, error=ValueError) -> str:
    with pytest.raises(error) as info:
        make()
    return str(info.value)


class TestConstructorErrors(expecttest.TestCase):
    def test_qhm(self):
        qhm = lambda **kw: lambda: qhfast.QHM([_param()], **{"lr": 0.1, "momentum": 0.9, "nu": 0.7, **kw})  # noqa: E731
        self.assertExpectedInline(_message(qhm(lr=-1.0)), """Invalid learning rate: -1.0 (lr must be a finite number >= 0)""")
        self.assertExpectedInline(_message(qhm(lr=math.inf)), """Invalid learning rate: inf (lr must be a finite number >= 0)""")
        self.assertExpectedInline(_message(qhm(momentum=-0.1)), """Invalid momentum value: -0.1 (momentum must be a finite number >= 0)""")
        self.assertExpectedInline(_message(qhm(nu=math.nan)), """Invalid nu value: nan (nu must be a finite number)""")
        self.assertExpectedInline(_message(qhm(weight_decay=-1e-4)), """Invalid weight_decay value: -0.0001 (weight_decay must be a finite number >= 0)""")
        self.assertExpectedInline(_message(qhm(weight_decay_type="decoupled")), """Invalid weight_decay_type value: 'decoupled' (weight_decay_type must be 'grad' or 'direct')""")
        self.assertExpectedInline(_message(qhm(lr=torch.tensor([0.1, 0.2]))), """Invalid learning rate: a tensor lr must have exactly one element, got shape (2,)""")
        self.assertExpectedInline(_message(qhm(lr="0.1"), TypeError), """Invalid learning rate: lr must be a float or a 1-element tensor, got str""")
        self.assertExpectedInline(
            _message(lambda: qhfast.QHM([_param()], lr=0.1, momentum=0.9)), """parameter group didn't specify a value of required optimization parameter nu (QHM takes it in the constructor or in every param group)"""
        )

    def test_qhm_accepts_boundary_and_out_of_unit_values(self):
        """momentum 1 and above and nu outside [0, 1] are legal (conversions produce them), as in
        qhoptim."""
        for kwargs in (dict(momentum=1.0, nu=0.5), dict(momentum=1.5, nu=0.5), dict(momentum=0.0, nu=-0.5),
                       dict(momentum=0.5, nu=3.0)):
            qhfast.QHM([_param()], lr=0.1, **kwargs)
        qhfast.QHM([_param()], lr=torch.tensor(0.1), momentum=0.9, nu=0.7)

    def test_qhadam(self):
        qhadam = lambda **kw: lambda: qhfast.QHAdam([_param()], **kw)  # noqa: E731
        self.assertExpectedInline(_message(qhadam(lr=-1.0)), """Invalid learning rate: -1.0 (lr must be a finite number >= 0)""")
        self.assertExpectedInline(_message(qhadam(eps=-1e-8)), """Invalid epsilon value: -1e-08 (eps must be a finite number >= 0)""")
        self.assertExpectedInline(_message(qhadam(betas=(1.0, 0.999))), """Invalid beta parameter at index 0: 1.0 (betas[0] must be in [0, 1))""")
        self.assertExpectedInline(_message(qhadam(betas=(0.9, -0.5))), """Invalid beta parameter at index 1: -0.5 (betas[1] must be in [0, 1))""")
        self.assertExpectedInline(_message(qhadam(betas=(0.9,))), """Invalid betas value: (0.9,) (betas must be a pair of numbers in [0, 1))""")
        self.assertExpectedInline(_message(qhadam(nus=0.7)), """Invalid nus value: 0.7 (nus must be a pair of finite numbers)""")
        self.assertExpectedInline(_message(qhadam(nus=(0.7, 1.0, 1.0))), """Invalid nus value: (0.7, 1.0, 1.0) (nus must be a pair of finite numbers)""")
        self.assertExpectedInline(_message(qhadam(nus=(0.7, math.inf))), """Invalid nu parameter at index 1: inf (nus[1] must be a finite number)""")
        self.assertExpectedInline(_message(qhadam(weight_decay=-0.1)), """Invalid weight_decay value: -0.1 (weight_decay must be a finite number >= 0)""")
        self.assertExpectedInline(_message(qhadam(lr=torch.ones(2))), """Invalid learning rate: a tensor lr must have exactly one element, got shape (2,)""")
        self.assertExpectedInline(_message(qhadam(decouple_weight_decay="yes"), TypeError), """Invalid decouple_weight_decay value: 'yes' (decouple_weight_decay must be True or False, or 1 or 0)""")
        self.assertExpectedInline(_message(qhadam(decouple_weight_decay=2), TypeError), """Invalid decouple_weight_decay value: 2 (decouple_weight_decay must be True or False, or 1 or 0)""")
        self.assertExpectedInline(
            _message(lambda: qhfast.QHAdamW([_param()], decouple_weight_decay=False)), """Invalid decouple_weight_decay value: False (QHAdamW always decouples weight decay; use QHAdam for coupled decay)"""
        )
        qhfast.QHAdam([_param()], nus=(-0.5, 2.0))  # legal: any finite nus

    def test_flags(self):
        make = lambda **kw: lambda: qhfast.QHAdam([_param()], **kw)  # noqa: E731
        self.assertExpectedInline(_message(make(foreach="yes"), TypeError), """Invalid foreach value: 'yes' (foreach must be True, False or None)""")
        self.assertExpectedInline(_message(make(fused=1), TypeError), """Invalid fused value: 1 (fused must be True, False or None)""")
        self.assertExpectedInline(_message(make(fused=True, foreach=True), RuntimeError), """`fused` and `foreach` cannot be `True` together.""")
        self.assertExpectedInline(_message(make(master_weights="yes"), TypeError), """Invalid master_weights value: 'yes' (master_weights must be True, False or None)""")
        self.assertExpectedInline(_message(make(low_precision="fp32")), """Invalid low_precision value: 'fp32' (low_precision must be one of 'master', 'kahan', 'stochastic', 'nearest')""")
        self.assertExpectedInline(_message(make(low_precision=None)), """Invalid low_precision value: None (low_precision must be one of 'master', 'kahan', 'stochastic', 'nearest')""")
        self.assertExpectedInline(_message(make(state_dtype=torch.float16)), """Invalid state_dtype value: torch.float16 (state_dtype must be None, torch.bfloat16 or "8bit")""")
        self.assertExpectedInline(_message(make(state_dtype="bf16")), """Invalid state_dtype value: 'bf16' (state_dtype must be None, torch.bfloat16 or "8bit")""")
        for bad in ("4bit", "int8", torch.int8, torch.uint8):
            self.assertIn("state_dtype must be None, torch.bfloat16 or", _message(make(state_dtype=bad)))
        self.assertExpectedInline(_message(make(master_weights=True, low_precision="kahan")), """master_weights=True means low_precision='master', which contradicts low_precision='kahan'; pass low_precision alone""")
        self.assertExpectedInline(_message(make(master_weights=False, low_precision="stochastic")), """master_weights=False means low_precision='nearest', which contradicts low_precision='stochastic'; pass low_precision alone""")
        self.assertExpectedInline(_message(make(differentiable=True, fused=True), RuntimeError), """`fused` does not support `differentiable`""")
        self.assertExpectedInline(_message(make(differentiable=True, state_dtype=torch.bfloat16)), """Invalid state_dtype value: torch.bfloat16 with differentiable=True (state_dtype must be None: bf16 and 8-bit moments are written with stochastic rounding, which autograd cannot differentiate)""")
        self.assertExpectedInline(_message(make(differentiable=True, state_dtype="8bit")), """Invalid state_dtype value: '8bit' with differentiable=True (state_dtype must be None: bf16 and 8-bit moments are written with stochastic rounding, which autograd cannot differentiate)""")
        self.assertExpectedInline(
            _message(lambda: qhfast.QHAdam([torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)], differentiable=True)), """QHAdam with differentiable=True needs float32, float64 or complex parameters, got a parameter of dtype torch.bfloat16 (its update is rounded to it, as low_precision says, which autograd cannot differentiate)"""
        )

    def test_params(self):
        make = lambda p: lambda: qhfast.QHAdam([p])  # noqa: E731
        self.assertExpectedInline(
            _message(make(torch.zeros(3, dtype=torch.complex32, requires_grad=True)), TypeError), """QHAdam only optimizes floating-point tensors of dtype float16, bfloat16, float32 or float64 (or complex64/complex128), got a parameter of dtype torch.complex32"""
        )
        # float8 is floating point, but torch has no arithmetic for it: the first step raised
        # torch's NotImplementedError after making state and advancing the counters
        self.assertExpectedInline(
            _message(make(torch.nn.Parameter(torch.zeros(3).to(torch.float8_e4m3fn))), TypeError), """QHAdam only optimizes floating-point tensors of dtype float16, bfloat16, float32 or float64 (or complex64/complex128), got a parameter of dtype torch.float8_e4m3fn"""
        )
        self.assertExpectedInline(
            _message(lambda: qhfast.QHAdam([torch.zeros(3, dtype=torch.complex64, requires_grad=True)], state_dtype=torch.bfloat16)), """Invalid state_dtype value: torch.bfloat16 for a torch.complex64 parameter (state_dtype must be None or "8bit": torch has no complex bf16)"""
        )


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bad_param_group_changes_nothing(name):
    params = Problem().params()
    optimizer = OPTIMIZERS[name](params[:2])
    before = [dict(g) for g in optimizer.param_groups]
    with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):
        optimizer.add_param_group({"params": params[2:], "lr": -1.0})
    with pytest.raises(TypeError, match="only optimizes floating-point tensors"):
        optimizer.add_param_group(
            {"params": [torch.zeros(2, dtype=torch.complex32, requires_grad=True)]})
    assert optimizer.param_groups == before


@pytest.mark.parametrize("foreach", PATHS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sparse_gradient_raises_and_changes_nothing(name, foreach):
    """The sparse gradient sits in the second group: the first group must not have stepped
    either when the step raises. Checked with fresh state and after some steps."""
    problem = Problem()
    params = problem.params(torch.float32)
    params[0] = params[0].detach().bfloat16().requires_grad_()  # a master to protect too
    # QHM takes sparse gradients (as qhoptim and torch.optim.SGD), but not with bf16 moments
    second = {"params": params[2:], **({"state_dtype": torch.bfloat16} if name == "QHM" else {})}
    message = ("QHM takes sparse gradients .* got state_dtype=torch.bfloat16" if name == "QHM"
               else f"{name} does not support sparse gradients")
    optimizer = OPTIMIZERS[name]([{"params": params[:2]}, second], foreach=foreach)
    for warm_up_steps in (0, 3):
        for t in range(warm_up_steps):
            problem.set_grads(params, t)
            optimizer.step()
        problem.set_grads(params, 7)
        params[3].grad = params[3].grad.to_sparse()
        before = snapshot(optimizer, params)
        with pytest.raises(RuntimeError, match=message):
            optimizer.step()
        assert_same(snapshot(optimizer, params), before)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_with_an_invalid_hyperparameter_is_refused_and_changes_nothing(name):
    problem = Problem()
    params = problem.params()
    optimizer = OPTIMIZERS[name](params)
    problem.set_grads(params, 10)
    optimizer.step()
    corrupt = optimizer.state_dict()
    corrupt = {"state": {}, "param_groups": [dict(corrupt["param_groups"][0], lr=-0.5)]}
    before = snapshot(optimizer, params)
    with pytest.raises(ValueError, match=r"Invalid learning rate: -0.5 \(lr must be"):
        optimizer.load_state_dict(corrupt)
    assert_same(snapshot(optimizer, params), before)


def test_a_checkpoint_of_other_shapes_is_refused_and_changes_nothing():
    """Moments shaped unlike their parameter (another model's checkpoint: a moment of shape
    (1,) would broadcast silently) and 8-bit codes without a scale per block raise
    ValueError naming the entry, before anything is loaded."""
    p = torch.randn(40, 128, requires_grad=True)
    optimizer = qhfast.QHAdam([p], state_dtype="8bit")
    p.grad = torch.randn_like(p)
    optimizer.step()
    saved = optimizer.state_dict()
    state = saved["state"][0]
    cases = {
        "exp_avg_sq": ({**state, "exp_avg_sq": state["exp_avg_sq"][:20]},
                       "'exp_avg_sq' of parameter 0 is shaped (20, 128), the parameter's needs "
                       "(40, 128)"),
        "scales": ({**state, "exp_avg_scale": state["exp_avg_scale"][:10]},
                   "'exp_avg' of parameter 0 holds 8-bit codes with 10 scales in "
                   "'exp_avg_scale', not 20 (one per block)"),
        "broadcast": ({**state, "exp_avg": torch.zeros(1), "exp_avg_sq": torch.zeros(1)},
                      "'exp_avg' of parameter 0 is shaped (1,), the parameter's needs (40, 128)"),
    }
    for corrupt, message in cases.values():
        before = snapshot(optimizer, [p])
        with pytest.raises(ValueError, match=re.escape(message)):
            optimizer.load_state_dict({**saved, "state": {0: corrupt}})
        assert_same(snapshot(optimizer, [p]), before)


def test_a_checkpoint_this_optimizer_cannot_step_from_is_refused_and_changes_nothing():
    """A state entry with a counter that is not a number, a moment that is not a tensor or
    is complex for a real parameter, or a key missing (another optimizer's checkpoint:
    torch's Adam keeps ``step``, not the normalizers) raises ValueError naming the entry, with
    the checkpoint's lr not applied and the fp32 masters of bf16 parameters still fp32 (the
    base class, had it run, would have cast them to bf16)."""
    p = torch.randn(8, 4, dtype=torch.bfloat16, requires_grad=True)
    optimizer = qhfast.QHAdam([p], lr=0.01)
    p.grad = torch.randn_like(p)
    optimizer.step()
    saved = optimizer.state_dict()
    state = saved["state"][0]
    missing = {k: v for k, v in state.items() if k != "exp_avg_sq"}
    adam = torch.optim.Adam([torch.zeros(8, 4, requires_grad=True)])
    adam.param_groups[0]["params"][0].grad = torch.ones(8, 4)
    adam.step()
    cases = [
        ({**state, "beta2_weight": None}, "'beta2_weight' of parameter 0 is None, not a number"),
        ({**state, "beta1_weight": "2"}, "'beta1_weight' of parameter 0 is '2', not a number"),
        ({**state, "beta1_weight": torch.ones(2)}, "'beta1_weight' of parameter 0 is tensor"),
        ({**state, "exp_avg": [0.0] * 32}, "'exp_avg' of parameter 0 is list, not a floating"),
        ({**state, "exp_avg": state["exp_avg"].to(torch.complex64)},
         "'exp_avg' of parameter 0 is torch.complex64 for a torch.bfloat16 parameter"),
        (missing, "'exp_avg_sq' of parameter 0 is missing (the entry has ['beta1_weight', "
                  "'beta2_weight', 'exp_avg', 'master_param'])"),
        (adam.state_dict()["state"][0], "'beta1_weight' of parameter 0 is missing (the entry "
                                        "has ['exp_avg', 'exp_avg_sq', 'step'])"),
    ]
    for corrupt, message in cases:
        before = snapshot(optimizer, [p])
        with pytest.raises(ValueError, match=re.escape(message)):
            optimizer.load_state_dict({"state": {0: corrupt}, "param_groups": [
                dict(saved["param_groups"][0], lr=0.5)]})
        assert_same(snapshot(optimizer, [p]), before)
        assert optimizer.state[p]["master_param"].dtype == torch.float32


def test_a_load_that_fails_after_torch_loaded_changes_nothing(monkeypatch):
    """A load that raises once torch's base class has loaded the checkpoint (here: the
    conversion to the groups' precision options) leaves the optimizer as it was, and it
    steps on as it would have."""
    problem = Problem()
    params = problem.params(torch.bfloat16)
    optimizer = qhfast.QHAdam(params, low_precision="kahan")
    problem.set_grads(params, 0)
    optimizer.step()
    saved = optimizer.state_dict()
    saved["param_groups"][0]["lr"] = 0.5
    before = snapshot(optimizer, params)
    twin = copy.deepcopy(optimizer)

    def fail(*args):
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(qhfast._precision, "reconcile_state", fail)
    with pytest.raises(RuntimeError, match="conversion failed"):
        optimizer.load_state_dict(saved)
    monkeypatch.undo()
    assert_same(snapshot(optimizer, params), before)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    problem.set_grads(params, 1)
    problem.set_grads(twin_params, 1)
    torch.manual_seed(0)  # the same draws for kahan's compensation
    optimizer.step()
    torch.manual_seed(0)
    twin.step()
    assert_same(snapshot(optimizer, params), snapshot(twin, twin_params))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_flags_are_checked_in_every_group_a_load_or_add_makes(name):
    """The flags the constructor checks (``maximize="False"`` would ascend), checked for a
    group added later and in a checkpoint's groups as they will be loaded: with this
    optimizer's state_dtype, which differentiable=True cannot have."""
    params = Problem().params()
    optimizer = OPTIMIZERS[name](params[:2], state_dtype="8bit")
    saved = optimizer.state_dict()
    before = snapshot(optimizer, params[:2])
    with pytest.raises(TypeError, match=re.escape(
            "Invalid maximize value: 'False' (maximize must be True or False)")):
        optimizer.add_param_group({"params": params[2:], "maximize": "False"})
    cases = [
        (dict(maximize="False"), TypeError, "Invalid maximize value: 'False'"),
        (dict(foreach=True, fused=True), RuntimeError, "`fused` and `foreach` cannot be"),
        (dict(capturable=1), TypeError, "Invalid capturable value: 1"),
        (dict(differentiable=True), ValueError, "Invalid state_dtype value: '8bit' with "
                                                "differentiable=True"),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            optimizer.load_state_dict({**saved, "param_groups": [
                dict(saved["param_groups"][0], **change)]})
        assert_same(snapshot(optimizer, params[:2]), before)
    assert len(optimizer.param_groups) == 1


def _refused_at_the_next_step(optimizer, params, index, key, value, error, message):
    """``param_groups[index][key] = value`` makes the next step raise ``error`` matching
    ``message`` and change nothing; the key's value is then put back."""
    kept = optimizer.param_groups[index][key]
    optimizer.param_groups[index][key] = value
    before = snapshot(optimizer, params)
    with pytest.raises(error, match=re.escape(message)):
        optimizer.step()
    assert_same(snapshot(optimizer, params), before)
    optimizer.param_groups[index][key] = kept


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_flags_set_in_param_groups_after_steps_are_checked_at_the_next(name):
    """A flag set in ``param_groups`` between steps (as an LR schedule sets lr) is checked
    before the step changes anything: ``maximize="False"`` would make it ascend, QHAdam's
    ``decouple_weight_decay="False"`` decouple, QHM's ``weight_decay_type="Direct"`` take the
    "grad" decay; QHAdamW's decay cannot be coupled."""
    problem = Problem()
    params = problem.params()
    optimizer = OPTIMIZERS[name](params)
    problem.set_grads(params, 0)
    optimizer.step()
    problem.set_grads(params, 1)
    own = {"QHM": ("weight_decay_type", "Direct", ValueError,
                   "Invalid weight_decay_type value: 'Direct'"),
           "QHAdam": ("decouple_weight_decay", "False", TypeError,
                      "Invalid decouple_weight_decay value: 'False'"),
           "QHAdamW": ("decouple_weight_decay", False, ValueError,
                       "QHAdamW always decouples weight decay")}[name]
    for flag, value, error, message in [
            ("maximize", "False", TypeError, "Invalid maximize value: 'False'"),
            ("capturable", 1, TypeError, "Invalid capturable value: 1"),
            ("foreach", "yes", TypeError, "Invalid foreach value: 'yes'"), own]:
        _refused_at_the_next_step(optimizer, params, 0, flag, value, error, message)


def test_a_checkpoint_group_without_a_hyperparameter_takes_the_default():
    """A saved group missing ``eps`` (a hand-made checkpoint) loads with the constructor's
    default, and one missing QHM's required ``nu`` is refused, naming it."""
    p = _param()
    optimizer = qhfast.QHAdam([p], eps=1e-6)
    saved = optimizer.state_dict()
    del saved["param_groups"][0]["eps"]
    optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["eps"] == 1e-6
    p.grad = torch.ones_like(p)
    optimizer.step()
    qhm = qhfast.QHM([{"params": [p], "lr": 0.1, "momentum": 0.9, "nu": 0.7}])
    saved = qhm.state_dict()
    del saved["param_groups"][0]["nu"]
    with pytest.raises(ValueError, match="a param group of the checkpoint has no 'nu'"):
        qhm.load_state_dict(saved)
    assert qhm.param_groups[0]["nu"] == 0.7


def test_load_hooks_see_and_change_what_is_loaded():
    """As torch.optim: what a load pre-hook returns is what is loaded (state included), and
    a post-hook sees the loaded state."""
    problem = Problem()
    params = problem.params()
    optimizer = qhfast.QHAdam(params)
    problem.set_grads(params, 0)
    optimizer.step()
    saved = optimizer.state_dict()

    def zero_the_first_moment(opt, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"][0]["exp_avg"].zero_()
        state_dict["param_groups"][0]["lr"] = 0.5
        return state_dict

    clones = [p.detach().clone().requires_grad_() for p in params]
    loaded = qhfast.QHAdam(clones)
    seen = []
    loaded.register_load_state_dict_pre_hook(zero_the_first_moment)
    loaded.register_load_state_dict_post_hook(
        lambda opt: seen.append(opt.state[clones[0]]["exp_avg"].abs().sum().item()))
    loaded.load_state_dict(saved)
    assert loaded.param_groups[0]["lr"] == 0.5
    assert seen == [0.0] and loaded.state[clones[0]]["exp_avg"].abs().sum() == 0
    assert optimizer.state[params[0]]["exp_avg"].abs().sum() > 0  # the saved dict unchanged

@pytest.mark.parametrize("path", [{}, {"foreach": False}, {"foreach": True}],
                         ids=["default", "per_tensor", "foreach"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_hyperparameters_set_in_param_groups_after_steps_are_checked_at_the_next(name, path):
    """A hyperparameter set in ``param_groups`` between steps is checked, in every group,
    before the step changes anything: a wrong type raised half-way through the step (the first
    group stepped, the second's counters advanced) and an out-of-range value was used (lr=-1,
    betas[0]=1.5: NaN params)."""
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))]
    optimizer = OPTIMIZERS[name]([{"params": params[:1]}, {"params": params[1:]}], **path)
    for p in params:
        p.grad = torch.ones(3)
    optimizer.step()
    bad = [("lr", -1.0, ValueError, "Invalid learning rate: -1.0"),
           ("lr", "0.1", TypeError, "Invalid learning rate: lr must be a float"),
           ("lr", torch.tensor([0.1, 0.2]), ValueError, "a tensor lr must have exactly one"),
           ("weight_decay", None, TypeError, "Invalid weight_decay value"),
           ("weight_decay", -0.1, ValueError, "Invalid weight_decay value: -0.1"),
           # (a float hyperparameter's tensor is read by the step anyway: checked too)
           ("weight_decay", torch.tensor(-0.1), ValueError, "Invalid weight_decay value: -0.1")]
    if name == "QHM":
        bad += [("momentum", (0.9,), TypeError, "Invalid momentum value"),
                ("nu", math.inf, ValueError, "Invalid nu value: inf")]
    else:
        bad += [("betas", (1.5, 0.999), ValueError, "Invalid beta parameter at index 0: 1.5"),
                ("betas", 0.9, ValueError, "Invalid betas value: 0.9"),
                ("nus", (math.inf, 1.0), ValueError, "Invalid nu parameter at index 0: inf"),
                ("eps", None, TypeError, "Invalid epsilon value"),
                ("eps", -1.0, ValueError, "Invalid epsilon value: -1.0"),
                ("eps", torch.tensor(-1.0), ValueError, "Invalid epsilon value: -1.0")]
    for key, value, error, message in bad:
        _refused_at_the_next_step(optimizer, params, 1, key, value, error, message)
    optimizer.param_groups[1]["lr"] = torch.tensor(0.5)  # a valid tensor is still taken
    optimizer.step()


@pytest.mark.parametrize("path", [{}, {"foreach": False}, {"foreach": True},
                                  {"capturable": True}],
                         ids=["default", "per_tensor", "foreach", "capturable"])
def test_numpy_pairs_set_in_param_groups_after_steps_step_as_tuples(path):
    """``betas`` and ``nus`` set to numpy arrays between steps (as torch.optim.Adam takes
    them) step as the tuples of floats the constructor makes of them; the per-tensor, foreach
    and capturable paths raised."""
    finals = []
    for betas, nus in (((0.8, 0.99), (0.7, 1.0)), (np.array([0.8, 0.99]), np.array([0.7, 1.0]))):
        p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        optimizer = qhfast.QHAdam([p], **path)
        for t in range(3):
            optimizer.param_groups[0].update(betas=betas, nus=nus)
            p.grad = torch.full_like(p, float(t + 1))
            optimizer.step()
        finals.append(p.detach().clone())
    assert torch.equal(*finals)


def test_numpy_numbers_are_taken_as_the_python_numbers_they_hold(tmp_path):
    """As qhoptim and torch.optim take them: numpy scalars and arrays in the constructor, a
    param group or a checkpoint are kept as Python numbers (float64 arithmetic; a checkpoint
    that loads with weights_only=True), and an np.float32 lr set between steps steps as the
    float it holds, not in float32 arithmetic."""
    params = [_param(), _param()]
    optimizer = qhfast.QHAdam(params[:1], lr=np.float32(1e-3), betas=np.array([0.9, 0.99]),
                              nus=[np.float32(0.7), 1.0], decouple_weight_decay=np.True_,
                              weight_decay=np.int64(0), maximize=np.False_)
    optimizer.add_param_group({"params": params[1:], "eps": np.float64(1e-6)})
    optimizer.param_groups[1]["maximize"] = np.False_  # set between steps: kept, and taken
    optimizer.param_groups[1]["decouple_weight_decay"] = np.True_
    group = optimizer.param_groups[0]
    assert (type(group["lr"]), group["betas"], type(group["nus"][0])) == (float, (0.9, 0.99), float)
    assert group["decouple_weight_decay"] is True and group["maximize"] is False
    assert type(optimizer.param_groups[1]["eps"]) is float
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    saved = optimizer.state_dict()
    saved["param_groups"][0]["lr"] = np.float32(0.5)
    optimizer.load_state_dict(saved)
    assert type(optimizer.param_groups[0]["lr"]) is float
    torch.save(optimizer.state_dict(), tmp_path / "saved.pt")
    torch.load(tmp_path / "saved.pt", weights_only=True)
    for name in OPTIMIZERS:
        finals = []
        for lr in (np.float32(0.01), float(np.float32(0.01))):
            p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
            stepped = OPTIMIZERS[name]([p], foreach=True)
            for t in range(3):
                stepped.param_groups[0]["lr"] = lr  # as a hand-written schedule sets it
                p.grad = torch.full_like(p, float(t + 1))
                stepped.step()
            finals.append(p.detach().clone())
        assert torch.equal(*finals), name


def test_a_frozen_integer_parameter_is_let_be():
    """As torch.optim: an integer tensor in the params (it cannot require grad) is accepted
    and never stepped; one given a gradient raises at the step, changing nothing."""
    weight = _param()
    counter = torch.nn.Parameter(torch.tensor([1, 2]), requires_grad=False)
    optimizer = qhfast.QHAdam([weight, counter])
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    assert torch.equal(counter, torch.tensor([1, 2])) and counter not in optimizer.state
    counter.grad = torch.ones_like(counter)
    before = snapshot(optimizer, [weight])
    with pytest.raises(TypeError, match="only optimizes floating-point tensors"):
        optimizer.step()
    assert_same(snapshot(optimizer, [weight]), before)


def test_qhm_takes_its_required_hyperparameters_from_every_param_group():
    """As torch.optim's ``required``: lr, momentum and nu given by each param group instead of
    the constructor give the constructor's trajectory; a group added later without them raises
    ValueError naming the first missing one, in torch.optim's words, and adds nothing."""
    settings = dict(lr=0.1, momentum=0.9, nu=0.7)
    finals = []
    for make in (lambda ps: qhfast.QHM(ps, **settings),
                 lambda ps: qhfast.QHM([{"params": ps, **settings}])):
        params = [_param(), _param()]
        optimizer = make(params)
        for t in range(3):
            for p in params:
                p.grad = torch.full_like(p, float(t + 1))
            optimizer.step()
        finals.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*finals))
    with pytest.raises(ValueError, match="didn't specify a value of required optimization "
                                         "parameter momentum"):
        optimizer.add_param_group({"params": [_param()], "lr": 0.1})
    assert len(optimizer.param_groups) == 1
    copied = copy.deepcopy(optimizer)  # its defaults hold a copy of torch's sentinel
    with pytest.raises(ValueError, match="didn't specify a value of required optimization "
                                         "parameter momentum"):
        copied.add_param_group({"params": [_param()], "lr": 0.1})


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fused_on_a_device_without_a_fused_step_is_refused_before_anything_is_made(name):
    """fused=True with parameters on the meta device (no kernel, and inductor cannot compile
    for it) raises RuntimeError naming the devices it serves: at construction, and at a step
    of a group switched to fused=True later, before any state is made."""
    p = torch.zeros(3, device="meta", requires_grad=True)
    with pytest.raises(RuntimeError, match="fused=True needs parameters on a device"):
        OPTIMIZERS[name]([p], fused=True)
    optimizer = OPTIMIZERS[name]([p])
    optimizer.param_groups[0]["fused"] = True
    p.grad = torch.zeros(3, device="meta")
    with pytest.raises(RuntimeError, match="fused=True needs parameters on a device"):
        optimizer.step()
    assert not optimizer.state
    fused = OPTIMIZERS[name]([_param()], fused=True)  # and a group added later: not kept
    with pytest.raises(RuntimeError, match="fused=True needs parameters on a device"):
        fused.add_param_group({"params": [p]})
    assert len(fused.param_groups) == 1


def test_a_step_with_no_param_groups_does_nothing():
    """As torch.optim (a wrapper may empty ``param_groups``): a step is a no-op."""
    optimizer = qhfast.QHAdam([_param()])
    optimizer.param_groups.clear()
    assert optimizer.step() is None


def test_qhadamw_refuses_coupled_decay_in_an_added_or_loaded_group():
    """QHAdamW always decouples: a group added, or a checkpoint's, with
    ``decouple_weight_decay`` False (or 0) is refused as the constructor refuses it."""
    optimizer = qhfast.QHAdamW([_param()], weight_decay=0.1)
    with pytest.raises(ValueError, match="QHAdamW always decouples weight decay"):
        optimizer.add_param_group({"params": [_param()], "decouple_weight_decay": False})
    saved = optimizer.state_dict()
    saved["param_groups"][0]["decouple_weight_decay"] = 0
    with pytest.raises(ValueError, match="QHAdamW always decouples weight decay"):
        optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["decouple_weight_decay"] is True


def test_functional_qhm_refuses_an_unknown_weight_decay_type_and_takes_empty_lists():
    """The functional QHM took any weight_decay_type other than "grad" and "direct" for no
    decay at all (a typo turned weight decay off silently); it raises as the optimizer does,
    before changing anything. Empty lists are a step of nothing, for both functional forms
    (they raised IndexError and RuntimeError)."""
    from qhfast.functional import qhadam, qhm

    p, buffer = torch.ones(3), torch.zeros(3)
    with pytest.raises(ValueError, match="Invalid weight_decay_type value: 'Direct'"):
        qhm([p], [torch.ones(3)], [buffer], lr=0.1, momentum=0.9, nu=0.7, weight_decay=1.0,
            weight_decay_type="Direct")
    assert torch.equal(p, torch.ones(3)) and torch.equal(buffer, torch.zeros(3))
    qhm([], [], [], lr=0.1, momentum=0.9, nu=0.7)
    qhadam([], [], [], [], [], [], lr=0.1, betas=(0.9, 0.999), nus=(0.7, 1.0), eps=1e-8)


def test_what_the_readme_says_is_not_taken_or_not_run():
    """amsgrad is not a QHAdam option (TypeError, as for any unexpected keyword); QHAdamW is a
    QHAdam; step hooks do not run for steps made inside backward (there is no step() call)."""
    with pytest.raises(TypeError, match="amsgrad"):
        qhfast.QHAdam([_param()], amsgrad=True)
    assert isinstance(qhfast.QHAdamW([_param()]), qhfast.QHAdam)
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = qhfast.QHAdam([p])
    ran = []
    optimizer.register_step_pre_hook(lambda *args: ran.append("pre"))
    optimizer.register_step_post_hook(lambda *args: ran.append("post"))
    with qhfast.step_in_backward(optimizer):
        (p * p).sum().backward()
    assert not torch.equal(p.detach(), torch.ones(3)) and ran == []


def test_a_sparse_gradient_of_a_16_bit_param_names_its_dtype():
    """QHM takes sparse gradients for fp32/fp64 params only; the message read "a Parameter
    parameter of dtype ..." (the class's name)."""
    p = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.bfloat16))
    optimizer = qhfast.QHM([p], lr=0.1, momentum=0.9, nu=0.7)
    p.grad = torch.ones(4, 3, dtype=torch.bfloat16).to_sparse()
    with pytest.raises(RuntimeError, match=r"; got a parameter of dtype torch\.bfloat16$"):
        optimizer.step()
    assert not p.any() and not optimizer.state
