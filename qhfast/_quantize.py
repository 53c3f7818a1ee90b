r"""8-bit moments (``state_dtype="8bit"``): blockwise codes through a non-linear code map.

A moment of a parameter of two or more dimensions and at least :data:`MIN_ELEMENTS` elements
is stored as one ``uint8`` code per element (a tensor shaped like the parameter) and one fp32
scale per block of :data:`BLOCK` consecutive elements (``state[key + "_scale"]``, the block's
largest magnitude, or 2^-126 where that is smaller but nonzero): element
:math:`x = s_b \cdot q[c]` with :math:`q` the code map. Smaller tensors keep the compute dtype
(their bytes do not matter; bitsandbytes does the same), and so do 1-D ones (biases, norm
weights: a small share of a model, which FSDP2 would cut at offsets that are not whole
blocks).

Where each row (an index of dim 0) is whole blocks, the scales are shaped (rows, blocks per
row) (:func:`scale_shape`), so a tensor split along dim 0 splits its scales alike: an FSDP2
shard quantizes its own blocks, and its codes and scales are DTensors sharded like the
parameter, which torch.distributed.checkpoint saves and reshards (:func:`sharding_problem`
says which layouts cannot).

The code maps are "dynamic": floating-point-like, normalized to a top value of exactly 1 (a
block's largest element is stored exactly), with the most steps per binade just below the
top, where most of a block's values lie, and fewer further down, where a value only needs to
stay nonzero and unbiased. A linear map would round every element far below the block's
largest to zero:

* signed (first moment, QHM's buffer): zero, 127 magnitudes and their negatives: 16 steps in
  each of the top 3 binades (6.25% apart), then 8, 4, 2 and 1 down to 1.5e-11;
* non-negative (second moment): zero and 255 values: 32 steps in each of the top 3 binades
  (3.1% apart), then 16, 8, 4, 2 and 1 down to 2.8e-17. A second moment spans the square of
  the gradients' range: gradients 1e-4 times smaller than their neighbours' in a block still
  get a second moment, not zero (whose update would blow up).

The second moment is stored itself, not its square root (which would need half the range): a
stochastically rounded square root is unbiased, but its square, the moment, is then biased up
by the rounding's variance at every write, and with β2 = 0.999 a moving average compounds that
into a moment too large by half.

Writes round stochastically by default: up to the next code with the probability that makes
the expectation exact (:math:`\mathbb{E}[q[c]] = x / s_b`), so a moving average that moves by
0.1% a step neither freezes nor drifts; the random numbers come from the default generator of
the tensors' device. A one-off conversion (a checkpoint loaded into 8-bit state) rounds to
nearest.

The C and Triton kernels decode and encode with the same operations (:class:`CodeMap`), their
uniform numbers the 16-bit halves of a hash of each element and seeds drawn from that
generator: given those numbers as ``draws``, :func:`quantize` writes the kernels' codes.
A complex parameter's moments are coded as its real view's parts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from ._tensors import DTensor, shard_like

__all__ = ["BLOCK", "MIN_ELEMENTS", "SCALE_SUFFIX", "CodeMap", "quantizes", "blocks",
           "scale_shape", "codes_shape", "sharding_problem", "new_scales", "code_map",
           "quantize", "dequantize"]

#: elements per block (one fp32 scale each)
BLOCK = 256
#: smaller tensors keep the compute dtype
MIN_ELEMENTS = 4096
#: a quantized moment ``key``'s scales are ``state[key + SCALE_SUFFIX]``
SCALE_SUFFIX = "_scale"


def quantizes(p: Tensor) -> bool:
    """Whether ``state_dtype="8bit"`` stores the moments of ``p`` as codes: whether ``p`` has
    two or more dimensions and its moments hold :data:`MIN_ELEMENTS` or more real numbers (a
    complex element is two: its moments are coded as the real view's parts)."""
    return p.dim() >= 2 and p.numel() * (2 if p.is_complex() else 1) >= MIN_ELEMENTS


def blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def scale_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of the scales of codes shaped ``shape``: (rows, blocks per row) where each
    row (an index of dim 0) is whole blocks, so that splitting the codes along dim 0 splits
    the scales alike; else (blocks,). The blocks are the same either way: the scales are in
    the codes' (row-major) order."""
    row = math.prod(shape[1:])
    if len(shape) >= 2 and row % BLOCK == 0:
        return (shape[0], row // BLOCK)
    return (blocks(math.prod(shape)),)


def codes_shape(p: Tensor) -> tuple[int, ...]:
    """The shape of the codes of ``p``'s moments: its own, or its real view's if complex."""
    return (*p.shape, 2) if p.is_complex() else tuple(p.shape)


def sharding_problem(p: Tensor) -> str | None:
    """Why the 8-bit moments of DTensor parameter ``p`` cannot be sharded like it (None where
    they can): each shard must hold whole blocks of the full tensor, so that the shards' codes
    and scales are those of the full tensor, cut. That needs ``p`` replicated, or sharded
    along dim 0 only (FSDP2's default; data-parallel replicas may be added) with each of its
    rows whole blocks of :data:`BLOCK`."""
    if not isinstance(p, DTensor) or not quantizes(p):
        return None
    dims = [placement.dim for placement in p.placements if hasattr(placement, "dim")]
    if not dims:  # replicated: every rank holds the whole tensor
        return None
    if any(dim != 0 for dim in dims):
        return (f"it is sharded along dim {max(dims)} ({p.placements}): its shards would cut "
                "the quantization blocks, which only a split along dim 0 keeps whole")
    if len(scale_shape(codes_shape(p))) != 2:
        row = math.prod(codes_shape(p)[1:])
        return (f"its rows are {row} numbers (shape {tuple(p.shape)}), not a multiple of "
                f"{BLOCK}: a split along dim 0 would cut the quantization blocks")
    return None


def new_scales(codes: Tensor) -> Tensor:
    """Zero scales for ``codes`` (fp32, :func:`scale_shape`): for DTensor codes a DTensor
    sharded like them, each shard the scales of its own codes."""
    if not isinstance(codes, DTensor):
        return torch.zeros(scale_shape(codes.shape), dtype=torch.float32, device=codes.device)
    local = torch.zeros(scale_shape(codes.to_local().shape), dtype=torch.float32,
                        device=codes.device)
    return shard_like(local, codes, scale_shape(codes.shape))


#: steps per binade, from the top: 127 magnitudes (signed) and 255 values (non-negative)
_SIGNED_STEPS = [16] * 3 + [8] * 4 + [4] * 4 + [2] * 5 + [1] * 20
_NONNEGATIVE_STEPS = [32] * 3 + [16] * 4 + [8] * 4 + [4] * 4 + [2] * 6 + [1] * 34


class CodeMap(NamedTuple):
    r"""A code map, as both the torch ops here and the C kernel read it.

    ``values``: the value of each of the 256 codes (fp32; code 0 is 0.0, so zero-filled codes
    are a zero moment). Encoding a magnitude :math:`y \in [0, 1]` (an element times its block's
    inverse scale, :func:`_inverse`; the largest may exceed 1 by an fp32 step or two) is
    arithmetic, by its binade: ``index`` = 127 - (the biased fp32 exponent of :math:`y`),
    clamped to [0, ``binades`` + 1]: 0 is :math:`y = 1` (the top code), 1 to
    ``binades`` the binades from [1/2, 1) down, ``binades`` + 1 everything below the smallest
    nonzero value :math:`2^{-\mathrm{binades}}`. Within a binade the position
    :math:`t = (\mathrm{mantissa} - 1) \cdot \mathrm{steps}[index]` (the mantissa in [1, 2)),
    below it :math:`t = y \cdot 2^{\mathrm{binades}}`; either is exact in fp32, and the two codes
    around :math:`y` are ``first_code[index]`` + ⌊t⌋ and the next, :math:`t - ⌊t⌋` of the way
    from one to the other. A stochastic write takes ``first_code[index]`` + ⌊t + u⌋ for a
    uniform draw u in [0, 1): the next code with probability :math:`t - ⌊t⌋`, to the draws'
    resolution, in one addition and one rounding (the kernels' cheapest form). Within a
    binade t has at most 23 - log2(steps) bits after the point, so t + u is exact in fp32 for
    the kernels' 16-bit draws, and the probability is ⌊2^16 (t - ⌊t⌋)⌋ / 2^16: low by under
    2^-16 of a step. With ``torch.rand``'s 24-bit draws, or below the smallest binade, t + u
    may round: a bias of about 2^-20 of a step or less. A signed map codes the magnitude, and
    a negative value with magnitude code c > 0 as 127 + c."""

    values: Tensor  # fp32 [256]
    steps: Tensor  # fp32 [binades + 2]: steps per binade (0 for index 0, unused for the last)
    first_code: Tensor  # int32 [binades + 2]: the code of each binade's lowest value
    binades: int


def _make_map(signed: bool, device: torch.device) -> CodeMap:
    steps = _SIGNED_STEPS if signed else _NONNEGATIVE_STEPS
    magnitudes = [0.0]  # ascending: zero, then each binade from the smallest up, then 1
    first_code = []
    for k in reversed(range(len(steps))):
        first_code.append(len(magnitudes))
        magnitudes += [2.0 ** -(k + 1) * (1 + j / steps[k]) for j in range(steps[k])]
    first_code = [len(magnitudes)] + first_code[::-1] + [0]  # index 0 (y = 1), binades, below
    magnitudes.append(1.0)
    if signed:  # 128 magnitudes, their negatives by code 127 + c, and an unused code 255
        values = magnitudes + [-m for m in magnitudes[1:]] + [0.0]
    else:
        values = magnitudes
    assert len(values) == 256
    table = [0.0] + [float(s) for s in steps] + [0.0]
    return CodeMap(torch.as_tensor(values, dtype=torch.float32, device=device),
                   torch.as_tensor(table, dtype=torch.float32, device=device),
                   torch.as_tensor(first_code, dtype=torch.int32, device=device), len(steps))


#: the code maps made so far, by (signed, device): made once per device (a step captured in a
#: CUDA graph finds them made by its warm-up steps); a plain dict, which dynamo traces
_MAPS: dict[tuple[bool, torch.device], CodeMap] = {}


def code_map(signed: bool, device: torch.device) -> CodeMap:
    """The signed (first moment, QHM's buffer) or non-negative (second moment) map, its tensors
    on ``device``. Maps made under a FakeTensorMode (a memory estimate, a trace) are neither
    kept nor taken from the cache: fake tensors belong to their mode."""
    found = _MAPS.get((signed, device))
    if torch.compiler.is_compiling():  # dynamo's fake tensors: maps made here stay in the graph
        return found if found is not None else _make_map(signed, device)
    faking = torch._guards.detect_fake_mode() is not None
    if found is None or is_fake(found.values) != faking:
        found = _make_map(signed, device)
        if not faking:
            _MAPS[(signed, device)] = found
    return found


def _as_blocks(x: Tensor) -> Tensor:
    """``x`` flattened and zero-padded to whole blocks, shaped (blocks, BLOCK)."""
    flat = x.reshape(-1)
    pad = blocks(flat.numel()) * BLOCK - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK)


def dequantize(codes: Tensor, scales: Tensor, nonnegative: bool, dtype: torch.dtype) -> Tensor:
    """The moment the codes and scales hold, in ``dtype``, shaped like ``codes``
    (``nonnegative``: a second moment's codes): code value × block scale, in fp32."""
    values = code_map(not nonnegative, codes.device).values
    moment = _as_blocks(torch.take(values, codes.long())) * scales.reshape(-1, 1)
    return moment.reshape(-1).narrow(0, 0, codes.numel()).view(codes.shape).to(dtype)


#: the smallest nonzero scale (the smallest normal fp32): a subnormal's reciprocal overflows
_SMALLEST_SCALE = 2.0 ** -126


def _inverse(scales: Tensor) -> Tensor:
    """What each block's elements are multiplied by to put their magnitudes in [0, 1] (one
    multiplication each, where a division costs the kernels several): 1/scale, one fp32 step
    up where rounding to nearest left scale · (1/scale) below 1, so that a block's largest
    element comes to 1 or an fp32 step or two above, the top code either way (an element
    just below it may too: a bias of a few 2^-23); 1 where the scale is not > 0 (zero,
    NaN). The reciprocal of a scale above 2^126 (8.5e37) is subnormal: where subnormals are
    flushed to zero (``torch.set_flush_denormal(True)``) such a block's values code as 0, as
    only a diverged run's moments would be that large."""
    positive = scales > 0
    inverse = 1 / torch.where(positive, scales, 1.0)
    up = (inverse.view(torch.int32) + 1).view(torch.float32)
    return torch.where(positive & (scales * inverse < 1), up, inverse)


def quantize(x: Tensor, nonnegative: bool, stochastic: bool = True,
             draws: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``x`` (fp32 or fp64) as (codes shaped like it, fp32 block scales shaped by
    :func:`scale_shape`, each the block's largest magnitude, 2^-126 where that is smaller
    but nonzero). Each value times its block's inverse scale (:func:`_inverse`) is rounded
    to one of its two neighbouring codes (in magnitude, for a signed map), at random with
    the probability that makes the result unbiased (``stochastic``: up where the share of
    the gap covered and a uniform draw in [0, 1) add up to 1 or more, see :class:`CodeMap`;
    ``draws``, shaped like ``x``, else ``torch.rand``; a draw that rounds to 1 in fp32 is
    taken as the largest below it), else to the nearer (a tie up). ``nonnegative``: a
    second moment. NaN values code as 0 and their block's scale is NaN, so the whole block
    reads back NaN; so does a block with an infinite value (its scale
    is infinite, its other values code as 0, and 0·∞ is NaN): one overflowing moment loses
    its block of 256 where fp32 state would lose that element alone (a GradScaler-skipped
    step writes none)."""
    code_map_ = code_map(not nonnegative, x.device)
    if draws is not None and draws.shape != x.shape:
        raise ValueError(f"draws must be shaped like x ({tuple(x.shape)}), got "
                         f"{tuple(draws.shape)}")
    values = _as_blocks(x.float())
    scales = values.abs().amax(dim=1)
    scales = torch.where((scales > 0) & (scales < _SMALLEST_SCALE), _SMALLEST_SCALE, scales)
    magnitude = (values * _inverse(scales).unsqueeze(1)).abs()  # in [0, 1], see _inverse
    bits = magnitude.view(torch.int32)
    index = (127 - bits.bitwise_right_shift(23)).clamp_(0, code_map_.binades + 1).long()
    mantissa = bits.bitwise_and(0x7FFFFF).bitwise_or_(0x3F800000).view(torch.float32)  # [1, 2)
    position = torch.where(index == code_map_.binades + 1,
                           magnitude * 2.0 ** code_map_.binades,
                           (mantissa - 1) * torch.take(code_map_.steps, index))
    if not stochastic:
        lower = position.floor()
        rounded = lower + (position - lower >= 0.5)  # the share of the gap is exact
    else:  # up where the share of the gap and the draw reach 1: with the share's probability
        draw = (torch.rand_like(position) if draws is None
                else _as_blocks(draws.float()).clamp(max=1 - 2.0 ** -24))
        rounded = (position + draw).floor()
    codes = torch.take(code_map_.first_code, index) + rounded.int()
    codes = torch.where(magnitude.isnan(), 0, codes)
    if not nonnegative:
        codes = torch.where((values < 0) & (codes > 0), codes + 127, codes)
    codes = codes.to(torch.uint8)
    return (codes.reshape(-1).narrow(0, 0, x.numel()).view(x.shape),
            scales.view(scale_shape(x.shape)))
