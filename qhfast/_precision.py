r"""Low-precision parameters and state: where the fp32 result of an update is kept.

Every update computes in fp32 (fp64 for fp64 parameters). For a bf16/fp16 parameter the
``low_precision`` mode says what holds the exact result between steps:

``"master"`` (default)
    an fp32 copy of the parameter (``state["master_param"]``, 4 bytes per element); the update
    runs on it and the parameter receives it rounded to nearest.
``"kahan"``
    a compensation buffer in the parameter's dtype (``state["kahan_compensation"]``, 2 bytes per
    element) that holds what rounding the parameter lost: the update runs on the fp32 value
    :math:`\theta + c` (exact in fp32), then :math:`\theta \leftarrow \mathrm{rn}(\theta + c + u)`
    and :math:`c \leftarrow \mathrm{sr}(\theta + c + u - \theta_{new})` (compensated summation:
    the pair carries about 16 significant bits for bf16). ``c`` is written with stochastic
    rounding: an update of under 2^-8 of the parameter's ulp is below c's own resolution once
    c is large, and rounding it to nearest loses a fixed share of every such update (measured:
    12% of 2000 updates of 1e-5 on a bf16 weight at 1.0).
``"stochastic"``
    nothing: the update runs on the parameter upcast, and the result is rounded to the
    parameter's dtype stochastically, up with probability equal to the fraction of the gap
    covered (unbiased: :math:`\mathbb{E}[\mathrm{sr}(x)] = x`), so small updates accumulate in
    expectation.
``"nearest"``
    nothing: the result is rounded to nearest, and an update below half an ulp is lost.

``state_dtype`` says how the moments (QHAdam's ``exp_avg``/``exp_avg_sq``, QHM's
``momentum_buffer``) are stored: None keeps them in the compute dtype; ``torch.bfloat16`` stores
them in bf16 and writes them with stochastic rounding (a moving average with :math:`\beta_2 =
0.999` changes by 0.1% a step, below half a bf16 ulp, so round-to-nearest would freeze it);
``"8bit"`` stores them as blockwise 8-bit codes, also written with stochastic rounding
(``qhfast._quantize``).

Random numbers come from torch's default generator of the parameter's device (seed it with
``torch.manual_seed``): the same RNG state gives a bitwise identical run. Draws happen on the
device, so the step makes no host sync and can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import _quantize as quantize
from ._tensors import DTensor, flat_format, shard_like
from ._tensors import local as _local

__all__ = [
    "LOW_PRECISION_DTYPES",
    "LOW_PRECISION_MODES",
    "STATE_DTYPES",
    "MASTER_KEY",
    "COMPENSATION_KEY",
    "compute_dtype",
    "buffer_dtype",
    "state_fits",
    "resolve_low_precision",
    "check_precision_options",
    "upgrade_group",
    "nearest_value",
    "stochastic_round_",
    "init_precision_state",
    "working_params",
    "sync_masters",
    "mark_stepped",
    "store_params",
    "working_buffers",
    "store_buffers",
    "reconcile_state",
]

#: Parameter dtypes whose update runs in fp32.
LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)
#: the values of ``low_precision``
LOW_PRECISION_MODES = ("master", "kahan", "stochastic", "nearest")
#: the values of ``state_dtype`` ("8bit": see ``qhfast._quantize``)
STATE_DTYPES = (None, torch.bfloat16, "8bit")

MASTER_KEY = "master_param"
COMPENSATION_KEY = "kahan_compensation"


#: the dtype of a complex dtype's parts (``dtype.to_real()``, which dynamo cannot trace)
_REAL_PARTS = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def compute_dtype(p: Tensor) -> torch.dtype:
    """The dtype a parameter's update computes in: fp32 for bf16/fp16, the real dtype of a
    complex parameter (its update runs on ``torch.view_as_real`` views), else its own."""
    if p.dtype in LOW_PRECISION_DTYPES:
        return torch.float32
    return _REAL_PARTS.get(p.dtype, p.dtype)


def buffer_dtype(p: Tensor, group: dict[str, Any]) -> torch.dtype:
    """The dtype the moments of ``p`` are stored in under ``group``'s ``state_dtype``: ``"8bit"``
    codes are ``uint8`` (for tensors of ``quantize.MIN_ELEMENTS`` or more; smaller ones keep
    what None keeps); a complex parameter's are otherwise complex like it, as torch.optim
    stores them."""
    state = group["state_dtype"]
    if isinstance(state, str) and quantize.quantizes(p):
        return torch.uint8
    if p.dtype.is_complex:
        return p.dtype
    if isinstance(state, str):
        return compute_dtype(p)
    return state or compute_dtype(p)


def state_fits(state: dict[str, Any], p: Tensor, group: dict[str, Any],
               keys: Sequence[str]) -> bool:
    """Whether ``p``'s (made) state is in the form ``p``'s dtype and the group's options need:
    its moments (``keys``) in :func:`buffer_dtype`, and the master or compensation the mode
    keeps for a bf16/fp16 ``p`` (and no other). A model converted to another dtype between
    steps leaves the state of the old one (:func:`reconcile_state` converts it)."""
    first = state.get(keys[0])
    if first is not None and first.dtype != buffer_dtype(p, group):
        return False
    kept = {"master": MASTER_KEY, "kahan": COMPENSATION_KEY}.get(group["low_precision"])
    if p.dtype not in LOW_PRECISION_DTYPES:
        kept = None
    if not all((key in state) == (key == kept) for key in (MASTER_KEY, COMPENSATION_KEY)):
        return False
    compensation = state.get(COMPENSATION_KEY)  # in the param's dtype (fp16 and bf16 differ)
    return compensation is None or compensation.dtype == p.dtype


# --------------------------------------------------------------------------------------------
# options


def resolve_low_precision(low_precision: Any, master_weights: Any) -> str:
    """The mode from ``low_precision`` and the older ``master_weights`` flag (None: not given;
    True means "master", False "nearest"). Raises if the two contradict each other."""
    if master_weights is None:
        return low_precision
    if not isinstance(master_weights, bool):
        raise TypeError(f"Invalid master_weights value: {master_weights!r} "
                        "(master_weights must be True, False or None)")
    implied = "master" if master_weights else "nearest"
    # low_precision's default is "master": with master_weights=False it means "not given"
    if low_precision == implied or (low_precision == "master" and not master_weights):
        return implied
    raise ValueError(
        f"master_weights={master_weights} means low_precision={implied!r}, which contradicts "
        f"low_precision={low_precision!r}; pass low_precision alone"
    )


def check_precision_options(group: dict[str, Any]) -> None:
    """Raise unless the group's ``low_precision`` and ``state_dtype`` are valid choices."""
    mode = group["low_precision"]
    if not (isinstance(mode, str) and mode in LOW_PRECISION_MODES):
        choices = ", ".join(repr(m) for m in LOW_PRECISION_MODES)
        raise ValueError(f"Invalid low_precision value: {mode!r} (low_precision must be one of "
                         f"{choices})")
    dtype = group["state_dtype"]
    if not any(dtype is allowed or (isinstance(dtype, str) and dtype == allowed)
               for allowed in STATE_DTYPES):
        raise ValueError(f"Invalid state_dtype value: {dtype!r} "
                         "(state_dtype must be None, torch.bfloat16 or \"8bit\")")


def upgrade_group(group: dict[str, Any]) -> dict[str, Any]:
    """A param group written with ``master_weights`` (qhfast 0.1.0) rewritten in place with
    ``low_precision``; the group is returned."""
    if "master_weights" in group:
        flag = group.pop("master_weights")
        group["low_precision"] = resolve_low_precision(group.get("low_precision", "master"), flag)
    return group


# --------------------------------------------------------------------------------------------
# rounding fp32 to bf16/fp16, written as integer or exact fp32 arithmetic
#
# Not as casts: a compiler may drop a down-and-up cast pair (inductor does, unless told to
# emulate precision casts), and then x - rn(x) would be 0 and a rounding decision made on it
# would never round. Every function here returns or writes values the narrow dtype holds
# exactly, so the final cast (a copy into the narrow tensor) cannot change them.

#: significant bits (the implicit one included) and the smallest spacing (subnormals)
_FORMATS = {torch.float16: (11, -24), torch.bfloat16: (8, -133)}


def _spacing(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The gap between the two ``dtype`` values around each fp32 ``x`` (a power of two)."""
    bits, smallest = _FORMATS[dtype]
    exponent = torch.frexp(x).exponent  # |x| in [2^(e-1), 2^e)
    return torch.exp2(torch.clamp(exponent - bits, min=smallest).to(torch.float32))


def _overflow_to_inf(x: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.where(x.abs() > torch.finfo(dtype).max, x * float("inf"), x)


def nearest_value(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` (fp32) rounded to nearest-even in ``dtype``, returned in fp32."""
    if dtype == torch.bfloat16:  # bf16 is fp32's upper half: round the lower half away
        bits = x.view(torch.int32)
        odd = bits.bitwise_right_shift(16).bitwise_and_(1)
        rounded = (bits + odd + 0x7FFF).bitwise_and_(-(1 << 16)).view(torch.float32)
        # a NaN stays a NaN (the addition could carry its payload into the sign or exponent)
        return torch.where(x.isnan(), x, rounded)
    spacing = _spacing(x, dtype)
    return _overflow_to_inf(torch.round(x / spacing) * spacing, dtype)  # x / spacing: exact


def stochastic_round_(dsts: Sequence[Tensor], srcs: Sequence[Tensor]) -> None:
    """``dst ← sr(src)`` for each pair: ``src`` (fp32; fp64 is rounded to fp32 first) rounded to
    ``dst``'s dtype (bf16 or fp16), up or down at random with the probability that makes the
    result unbiased (the share of the gap between the two neighbours that ``src`` has
    covered). A value that ``dst``'s dtype
    holds exactly is written unchanged. Draws from the default generator of the tensors'
    device."""
    for dst, src in zip(dsts, srcs):
        src = src.float()  # fp64 moments: rounded to fp32 first, as the C kernel does
        if dst.dtype == torch.bfloat16:
            # adding 16 random bits to the lower half and truncating carries into the upper
            # half with probability (dropped bits)/2^16. Sign-magnitude: the magnitude is
            # rounded, so negative values are unbiased too; infinities stay infinite
            bits = src.view(torch.int32)
            noisy = bits + torch.randint_like(bits, 0, 1 << 16)
            rounded = noisy.bitwise_and_(-(1 << 16)).view(torch.float32)
            # a NaN stays a NaN (the addition could carry its payload into the sign)
            dst.copy_(torch.where(src.isnan(), src, rounded))
        else:
            spacing = _spacing(src, dst.dtype)
            scaled = src / spacing  # exact: a power-of-two scaling
            below = torch.floor(scaled)
            up = torch.rand_like(src) < scaled - below
            rounded = torch.copysign((below + up) * spacing, src)  # -0.0 stays -0.0
            dst.copy_(_overflow_to_inf(rounded, dst.dtype))


# --------------------------------------------------------------------------------------------
# the parameters' working values


def init_precision_state(state: dict[str, Any], p: Tensor, mode: str) -> None:
    """Create what ``mode`` keeps for a bf16/fp16 parameter (nothing for other dtypes)."""
    if p.dtype not in LOW_PRECISION_DTYPES:
        return
    if mode == "master":
        state[MASTER_KEY] = p.detach().to(torch.float32, copy=True)
    elif mode == "kahan":
        state[COMPENSATION_KEY] = torch.zeros_like(p, memory_format=torch.preserve_format)


def working_params(params: list[Tensor], states: list[dict[str, Any]], mode: str) -> list[Tensor]:
    """The fp32 values the update runs on, one per parameter of a (device, dtype) chunk: the
    parameters themselves if they are not low precision, else the masters, or the parameters
    upcast (plus their compensation)."""
    if params[0].dtype not in LOW_PRECISION_DTYPES:
        return params
    if mode == "master":
        return [s[MASTER_KEY] for s in states]
    work = [p.to(torch.float32) for p in params]
    if mode == "kahan":  # θ + c is exact in fp32: |c| <= half an ulp of θ, 8 bits of its own
        torch._foreach_add_(work, [s[COMPENSATION_KEY] for s in states])
    return work


def sync_masters(params: list[Tensor], states: list[dict[str, Any]],
                 seen: dict[int, tuple]) -> None:
    """``"master"``: where a parameter was written from outside since qhfast last stepped it
    (a clamp, a ``load_state_dict`` of the model, weights swapped in; torch counts in-place
    writes in ``p._version``, and new storage changes ``p.data_ptr()``), its master takes the
    written value wherever it differs from the master rounded to nearest (what the step
    left), and keeps its fp32 value elsewhere. Else the next step would go on from the
    master and undo the write. A model converted between bf16 and fp16 keeps its masters
    where the conversion alone made the values. ``seen``: by ``id(p)``, each parameter's
    :func:`_fingerprint` when it was last stepped or checked (:func:`mark_stepped`); one not
    in it is checked."""
    for p, state in zip(params, states):
        master = state.get(MASTER_KEY)
        if master is None:
            continue
        where = _fingerprint(p)
        last = seen.get(id(p))
        if last == where:
            continue
        seen[id(p)] = where  # a kernel's write of the parameter changes none of them
        local, master = _local(p), _local(master)
        # what the last step left, rounded to nearest (the cast), and converted as a model's
        # .half() or .bfloat16() converts it where the dtype changed since; not known for a
        # param this optimizer has not stepped (a loaded checkpoint): either 16-bit dtype
        if last is not None:
            written = local != master.to(last[-1]).to(local.dtype)
        else:
            written = local != master.to(local.dtype)
            other = {torch.bfloat16: torch.float16, torch.float16: torch.bfloat16}.get(local.dtype)
            if other is not None:
                written &= local != master.to(other).to(local.dtype)
        torch.where(written, local.to(torch.float32), master, out=master)


def _fingerprint(p: Tensor) -> tuple:
    """Where and at which version ``p`` is, and its dtype: its local tensor's pointer and
    in-place writes, and for a DTensor its own (a write through the DTensor, as
    ``set_model_state_dict`` or a clamp makes, counts there and not on the local shard, which
    qhfast's steps write)."""
    local = _local(p)
    wrapper = p._version if local is not p else 0
    return local.data_ptr(), local._version, wrapper, local.dtype


def mark_stepped(params: list[Tensor], states: list[dict[str, Any]],
                 seen: dict[int, tuple]) -> None:
    """After an eager step (its in-place writes count in ``p._version``): remember where and
    at which version each parameter with a master is."""
    for p, state in zip(params, states):
        if MASTER_KEY in state:
            seen[id(p)] = _fingerprint(p)


def store_params(
    params: list[Tensor],
    states: list[dict[str, Any]],
    work: list[Tensor],
    mode: str,
    found_inf: Tensor | None = None,
) -> None:
    """Write the updated working values back to the low-precision parameters (and their
    compensation), as ``mode`` says; ``work`` is consumed. A nonzero ``found_inf`` (a skipped
    step, whose working values did not change) leaves every bit as it was."""
    if params[0].dtype not in LOW_PRECISION_DTYPES:
        return
    if mode == "stochastic":
        stochastic_round_(params, work)
    elif mode == "kahan":
        rounded = [nearest_value(w, p.dtype) for p, w in zip(params, work)]
        if found_inf is not None:
            # θ + c may sit exactly halfway between two values, and a tie may round away from
            # θ; a skipped step keeps θ, and then c = (θ + c) - θ is c again, exactly
            skip = found_inf != 0
            rounded = [torch.where(skip, p.to(torch.float32), r) for p, r in zip(params, rounded)]
        torch._foreach_sub_(work, rounded)  # the residual, exact in fp32
        torch._foreach_copy_(params, rounded)
        stochastic_round_([s[COMPENSATION_KEY] for s in states], work)
    else:  # master (the parameter mirrors it) or nearest
        torch._foreach_copy_(params, work)


# --------------------------------------------------------------------------------------------
# the moments


def working_buffers(
    states: list[dict[str, Any]], keys: Sequence[str], dtype: torch.dtype,
    nonnegative: Sequence[str] = (), eight_bit: bool = False,
) -> list[dict[str, Any]]:
    """``states`` as the update reads them: the moments (``keys``) in the compute ``dtype``. The
    same dicts if they are stored so, else copies whose moments are upcast (bf16) temporaries.
    ``eight_bit`` (``state_dtype="8bit"``): each moment as it is stored, codes dequantized
    (``nonnegative``: the second moments' keys) and small tensors' moments as they are."""
    if not keys:
        return states
    if eight_bit:
        return [{**s, **{k: _working_buffer(s, k, dtype, k in nonnegative) for k in keys}}
                for s in states]
    if states[0][keys[0]].dtype == dtype:  # one storage dtype for the whole chunk
        return states
    return [{**s, **{k: s[k].to(dtype) for k in keys}} for s in states]


def _working_buffer(state: dict[str, Any], key: str, dtype: torch.dtype,
                    nonnegative: bool) -> Tensor:
    stored = state[key]
    if stored.dtype == torch.uint8:
        return quantize.dequantize(stored, state[key + quantize.SCALE_SUFFIX], nonnegative, dtype)
    return stored  # a tensor under quantize.MIN_ELEMENTS: in the compute dtype


def store_buffers(
    states: list[dict[str, Any]], work: list[dict[str, Any]], keys: Sequence[str],
    nonnegative: Sequence[str] = (), found_inf: Tensor | None = None, eight_bit: bool = False,
) -> None:
    """Write updated moments back from the working copies: bf16 with stochastic rounding,
    8-bit codes requantized (stochastically; ``eight_bit``). A nonzero ``found_inf`` (a
    skipped step) keeps every code and scale as it was (a bf16 value is kept by its own
    rounding)."""
    if not keys:
        return
    if eight_bit:
        for key in keys:
            for s, w in zip(states, work):
                if s[key].dtype == torch.uint8:
                    _store_codes(s, key, w[key], key in nonnegative, found_inf)
        return
    # stored in the compute dtype: ``work`` is ``states`` (not tested with ``is``: dynamo
    # before torch 2.13 cannot trace ``is`` between lists)
    if work[0][keys[0]].dtype == states[0][keys[0]].dtype:
        return
    for key in keys:
        stochastic_round_([s[key] for s in states], [w[key] for w in work])


def _store_codes(state: dict[str, Any], key: str, value: Tensor, nonnegative: bool,
                 found_inf: Tensor | None) -> None:
    codes, scales = quantize.quantize(value, nonnegative)
    scale_key = key + quantize.SCALE_SUFFIX
    if found_inf is not None:
        skip = found_inf != 0
        codes = torch.where(skip, state[key], codes)
        scales = torch.where(skip, state[scale_key], scales)
    torch._foreach_copy_([state[key], state[scale_key]], [codes, scales])


# --------------------------------------------------------------------------------------------
# a state made under other options (a checkpoint, or a group whose options changed)


def reconcile_state(
    state: dict[str, Any], p: Tensor, mode: str, dtype: torch.dtype, keys: Sequence[str],
    nonnegative: Sequence[str] = (),
) -> None:
    """Convert a parameter's state to what ``mode`` and the moments' ``dtype`` need, never
    changing ``p``.

    The best fp32 value of the parameter is the master if there is one, else θ + c if there is
    a compensation, else θ. "master" keeps that value as its master; "kahan" keeps
    c = value - θ; "stochastic" and "nearest" keep nothing. Moments are cast to ``dtype``
    (rounded to nearest: a one-off rounding, not one per step), or quantized to 8-bit codes
    (``dtype`` uint8; to nearest) or dequantized from them (``nonnegative``: the second
    moments' keys, coded on their own map).
    """
    for key in keys:
        if key in state and state[key].dtype != dtype:
            _convert_buffer(state, key, p, dtype, key in nonnegative)
        scale_key = key + quantize.SCALE_SUFFIX
        if scale_key in state and not isinstance(state[scale_key], DTensor):
            # scales saved flat (before they were shaped by rows): the same numbers
            state[scale_key] = state[scale_key].reshape(quantize.scale_shape(state[key].shape))
    master = state.pop(MASTER_KEY, None)
    compensation = state.pop(COMPENSATION_KEY, None)
    if p.dtype not in LOW_PRECISION_DTYPES:
        return
    param = p.detach().to(torch.float32)
    if master is not None:
        value = master.to(torch.float32)
    elif compensation is not None:
        value = param + compensation.to(torch.float32)
    else:
        value = param
    if mode == "master":
        state[MASTER_KEY] = value  # param is already a copy: p is not fp32
    elif mode == "kahan":
        state[COMPENSATION_KEY] = (value - param).to(p.dtype)


def _convert_buffer(state: dict[str, Any], key: str, p: Tensor, dtype: torch.dtype,
                    nonnegative: bool) -> None:
    """(Complex moments are coded as their real views, and made from them; a DTensor's
    shards are converted each on its own, and the results sharded like ``p``.)"""
    scale_key = key + quantize.SCALE_SUFFIX
    value = state[key]
    if isinstance(value, DTensor):
        shards = {k: v.to_local() for k, v in state.items() if k in (key, scale_key)}
        _convert_buffer(shards, key, p.to_local(), dtype, nonnegative)
        shape = quantize.codes_shape(p) if dtype == torch.uint8 else tuple(p.shape)
        state[key] = shard_like(shards[key], p, shape)
        state.pop(scale_key, None)
        if dtype == torch.uint8:
            state[scale_key] = shard_like(shards[scale_key], p, quantize.scale_shape(shape))
        return
    if value.dtype == torch.uint8:
        real = _REAL_PARTS.get(dtype, torch.float32)  # a complex moment's: its parts' dtype
        value = quantize.dequantize(value, state.pop(scale_key), nonnegative, real)
    elif value.is_complex():
        value = torch.view_as_real(value)
    if dtype == torch.uint8:
        state[key], state[scale_key] = quantize.quantize(value, nonnegative, stochastic=False)
    elif dtype.is_complex:
        state[key] = torch.view_as_complex(value.to(_REAL_PARTS[dtype]).contiguous())
    else:  # laid out as the param (channels_last: dequantized codes come contiguous)
        layout = flat_format(p)
        value = value.to(dtype)
        state[key] = value if layout is None else value.contiguous(memory_format=layout)
