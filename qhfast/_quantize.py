r"""8-bit moments (``state_dtype="8bit"``): blockwise codes through a non-linear code map.

A moment tensor of at least :data:`MIN_ELEMENTS` elements is stored as one ``uint8`` code per
element (a tensor shaped like the parameter) and one fp32 scale per block of :data:`BLOCK`
consecutive elements (``state[key + "_scale"]``, the block's largest magnitude): element
:math:`x = s_b \cdot q[c]` with :math:`q` the code map. Smaller tensors keep the compute
dtype (their bytes do not matter; bitsandbytes does the same).

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
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BLOCK", "MIN_ELEMENTS", "SCALE_SUFFIX", "quantizes", "blocks", "quantize",
           "dequantize"]

#: elements per block (one fp32 scale each)
BLOCK = 256
#: smaller tensors keep the compute dtype
MIN_ELEMENTS = 4096
#: a quantized moment ``key``'s scales are ``state[key + SCALE_SUFFIX]``
SCALE_SUFFIX = "_scale"


def quantizes(p: Tensor) -> bool:
    """Whether ``state_dtype="8bit"`` stores the moments of ``p`` as codes."""
    return p.numel() >= MIN_ELEMENTS


def blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def _dynamic_magnitudes(steps_per_binade: list[int]) -> torch.Tensor:
    """Zero, then the magnitudes below 1 with ``steps_per_binade[k]`` evenly spaced values in
    the binade [2^-(k+1), 2^-k), then 1: ascending, float64."""
    values = [0.0, 1.0]
    for k, steps in enumerate(steps_per_binade):
        values += [2.0 ** -(k + 1) * (1 + j / steps) for j in range(steps)]
    return torch.tensor(sorted(values), dtype=torch.float64)


#: steps per binade, from the top: 127 magnitudes (signed) and 255 values (non-negative)
_SIGNED_STEPS = [16] * 3 + [8] * 4 + [4] * 4 + [2] * 5 + [1] * 20
_NONNEGATIVE_STEPS = [32] * 3 + [16] * 4 + [8] * 4 + [4] * 4 + [2] * 6 + [1] * 34


#: the code maps made so far, by (signed, device): made once per device (a step captured in a
#: CUDA graph finds them made by its warm-up steps); a plain dict, which dynamo traces
_MAPS: dict[tuple[bool, torch.device], tuple[Tensor, Tensor, Tensor]] = {}


def _maps(signed: bool, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(value of each code, the values in ascending order, the code of each sorted value),
    fp32/int64 tensors on ``device``. Code 0 is 0.0, so zero-filled codes are a zero moment."""
    maps = _MAPS.get((signed, device))
    if maps is None:
        maps = _MAPS[(signed, device)] = _make_maps(signed, device)
    return maps


def _make_maps(signed: bool, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    if signed:
        magnitudes = _dynamic_magnitudes(_SIGNED_STEPS)  # 128: zero and 127 magnitudes
        by_code = torch.cat([magnitudes, -magnitudes[1:], torch.zeros(1, dtype=torch.float64)])
        order = torch.argsort(by_code[:255])  # code 255 is unused (a second zero)
    else:
        by_code = _dynamic_magnitudes(_NONNEGATIVE_STEPS)  # 256: zero and 255 values
        order = torch.arange(256)
    by_code = by_code.to(torch.float32)
    return (by_code.to(device), by_code[order].to(device).contiguous(), order.to(device))


def _as_blocks(x: Tensor) -> Tensor:
    """``x`` flattened and zero-padded to whole blocks, shaped (blocks, BLOCK)."""
    flat = x.reshape(-1)
    pad = blocks(flat.numel()) * BLOCK - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK)


def dequantize(codes: Tensor, scales: Tensor, nonnegative: bool, dtype: torch.dtype) -> Tensor:
    """The moment the codes and scales hold, in ``dtype``, shaped like ``codes``
    (``nonnegative``: a second moment's codes)."""
    by_code, _, _ = _maps(not nonnegative, codes.device)
    values = _as_blocks(by_code[codes.long()]) * scales.unsqueeze(1)
    return values.reshape(-1)[: codes.numel()].view(codes.shape).to(dtype)


def quantize(x: Tensor, nonnegative: bool, stochastic: bool = True) -> tuple[Tensor, Tensor]:
    """``x`` (fp32 or fp64) as (codes shaped like it, fp32 block scales): each value rounded to
    one of its two neighbouring codes, at random with the probability that makes the result
    unbiased (``stochastic``), else to the nearer (``nonnegative``: a second moment)."""
    _, ascending, code_of = _maps(not nonnegative, x.device)
    values = _as_blocks(x.float())
    scales = values.abs().amax(dim=1)
    normalized = values / torch.where(scales > 0, scales, 1.0).unsqueeze(1)  # in [-1, 1]
    above = torch.searchsorted(ascending, normalized.contiguous()).clamp_(1, len(ascending) - 1)
    upper, lower = ascending[above], ascending[above - 1]
    up = (normalized - lower) / (upper - lower)  # where between its neighbours, in [0, 1]
    if stochastic:
        take_upper = torch.rand_like(up) < up
    else:
        take_upper = up >= 0.5
    codes = code_of[above - (~take_upper).long()].to(torch.uint8)
    return codes.reshape(-1)[: x.numel()].view(x.shape), scales
