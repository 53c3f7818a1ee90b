"""8-bit moments (``state_dtype="8bit"``) against fp32 ones: training quality on the tasks of
``perf/quality.py`` with stochastic and with round-to-nearest writes, and the step time of the
eager path that serves them for now (the kernels do not take 8-bit state yet), interleaved.

    OMP_NUM_THREADS=1 python perf/state_8bit.py            # quality (about 3 minutes) and time
    python perf/state_8bit.py --time-only
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import quality  # noqa: E402

import qhfast  # noqa: E402
import qhfast._quantize as quantize  # noqa: E402


def quality_rows() -> list[str]:
    rows = ["| task | params | moments | held-out | vs fp32 moments |", "|---|---|---|---:|---:|"]
    original = quantize.quantize
    try:
        for task in (quality.MLP, quality.LM):
            qh = dict(lr=task.lr, betas=(0.995, 0.999), nus=(0.7, 1.0),
                      weight_decay=task.weight_decay)
            for dtype in (torch.float32, torch.bfloat16):
                baseline = None
                for label, state, stochastic in (("fp32", None, True),
                                                 ("8-bit, stochastic writes", "8bit", True),
                                                 ("8-bit, nearest writes", "8bit", False)):
                    quantize.quantize = functools.partial(original, stochastic=stochastic)
                    _, held = task.train(
                        lambda p: qhfast.QHAdamW(p, **qh, state_dtype=state), dtype, task.steps)
                    baseline = held if baseline is None else baseline
                    rows.append(f"| {task.name} | {str(dtype)[6:]} | {label} | {held:.5f} | "
                                f"{(held / baseline - 1) * 100:+.2f}% |")
                    print(rows[-1], file=sys.stderr, flush=True)
    finally:
        quantize.quantize = original
    return rows


def time_rows(rounds: int = 5) -> list[str]:
    """QHAdam on 8 tensors of 1M fp32 parameters, the default path, best of ``rounds``."""
    def make(state):
        params = [torch.randn(1 << 20, requires_grad=True) for _ in range(8)]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = qhfast.QHAdam(params, state_dtype=state)
        optimizer.step()
        return optimizer

    contenders = {"fp32 moments (the C kernel)": make(None),
                  "8-bit moments (the eager path)": make("8bit")}
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(rounds):
        for name, optimizer in contenders.items():
            start = time.perf_counter()
            optimizer.step()
            best[name] = min(best[name], time.perf_counter() - start)
    base = best["fp32 moments (the C kernel)"]
    table = ["| QHAdam, 8M fp32 parameters | state B/param | step | / fp32 moments |",
             "|---|---:|---:|---:|"]
    for name, optimizer in contenders.items():
        state = sum(v.numel() * v.element_size() for s in optimizer.state.values()
                    for v in s.values() if v.dim() > 0) / (8 << 20)
        table.append(f"| {name} | {state:.2f} | {best[name] * 1e3:.1f} ms | "
                     f"{best[name] / base:.2f} |")
    return table + ["", _quantize_time(rounds)]


def _quantize_time(rounds: int) -> str:
    """Where a quantization's time goes: the whole of it, and its code search alone."""
    x = torch.randn(1 << 20)
    _, ascending, _ = quantize._maps(True, x.device)
    normalized = (x / x.abs().max()).contiguous()
    best = {"quantize": float("inf"), "searchsorted": float("inf")}
    for _ in range(rounds):
        for name, work in (("quantize", lambda: quantize.quantize(x, False)),
                           ("searchsorted", lambda: torch.searchsorted(ascending, normalized))):
            start = time.perf_counter()
            work()
            best[name] = min(best[name], time.perf_counter() - start)
    return (f"One quantization of 1M fp32 values: {best['quantize'] * 1e3:.1f} ms, of which "
            f"the code search (torch.searchsorted) {best['searchsorted'] * 1e3:.1f} ms.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-only", action="store_true")
    args = parser.parse_args()
    if not args.time_only:
        print("\n".join(quality_rows()) + "\n")
    print("\n".join(time_rows()))


if __name__ == "__main__":
    main()
