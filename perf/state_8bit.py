"""8-bit moments (``state_dtype="8bit"``) against fp32 ones: training quality on the tasks of
``perf/quality.py`` with stochastic and with round-to-nearest writes, and the step times of the
C kernel and of the eager path on them, interleaved.

    OMP_NUM_THREADS=1 python perf/state_8bit.py            # quality (about 3 minutes) and time
    python perf/state_8bit.py --time-only [--large]
    OMP_NUM_THREADS=1 python perf/state_8bit.py --spread 5  # the LM task on the C kernel, 5
                                                             # realizations of its random draws
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
from step_bench import fix_malloc_placement  # noqa: E402

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
                    # on the foreach path: the kernels write stochastically whatever
                    # quantize() does (they are tested to write its codes for their draws)
                    _, held = task.train(
                        lambda p: qhfast.QHAdamW(p, **qh, state_dtype=state, foreach=True),
                        dtype, task.steps)
                    baseline = held if baseline is None else baseline
                    rows.append(f"| {task.name} | {str(dtype)[6:]} | {label} | {held:.5f} | "
                                f"{(held / baseline - 1) * 100:+.2f}% |")
                    print(rows[-1], file=sys.stderr, flush=True)
    finally:
        quantize.quantize = original
    return rows


def time_rows(rounds: int = 5, tensors: int = 8, numel: int = 1 << 20) -> list[str]:
    """QHAdam and QHM on ``tensors`` tensors of ``numel`` fp32 parameters, fp32 against 8-bit
    moments on the C kernel (the default) and 8-bit moments on the eager foreach path, each
    the best of ``rounds`` steps, interleaved; glibc's mmap threshold fixed (as ``perf``).
    "channels_last": the parameters shaped as conv weights (numel/1024, 64, 4, 4) in that
    layout, whose 8-bit moments the C kernel steps through contiguous copies."""
    def make(cls, state, channels_last=False, **options):
        shape = (numel // 1024, 64, 4, 4) if channels_last else (numel // 1024, 1024)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        params = [torch.randn(shape).contiguous(memory_format=layout).requires_grad_()
                  for _ in range(tensors)]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = cls(params, state_dtype=state, **options)
        optimizer.step()
        return optimizer

    qhm = dict(lr=0.1, momentum=0.9, nu=0.7)
    contenders = {
        ("QHAdam", "fp32 moments (C kernel)"): make(qhfast.QHAdam, None),
        ("QHAdam", "8-bit moments (C kernel)"): make(qhfast.QHAdam, "8bit"),
        ("QHAdam", "8-bit moments, channels_last (C kernel)"): make(qhfast.QHAdam, "8bit",
                                                                    channels_last=True),
        ("QHAdam", "8-bit moments (eager foreach)"): make(qhfast.QHAdam, "8bit", foreach=True),
        ("QHM", "fp32 momentum (C kernel)"): make(qhfast.QHM, None, **qhm),
        ("QHM", "8-bit momentum (C kernel)"): make(qhfast.QHM, "8bit", **qhm),
        ("QHM", "8-bit momentum, channels_last (C kernel)"): make(qhfast.QHM, "8bit",
                                                                  channels_last=True, **qhm),
        ("QHM", "8-bit momentum (eager foreach)"): make(qhfast.QHM, "8bit", foreach=True, **qhm),
    }
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(rounds):
        for name, optimizer in contenders.items():
            start = time.perf_counter()
            optimizer.step()
            best[name] = min(best[name], time.perf_counter() - start)
    millions = tensors * numel / 1e6
    table = [f"| {millions:.0f}M fp32 parameters | state B/param | step | / fp32 state's |",
             "|---|---:|---:|---:|"]
    for (kind, name), optimizer in contenders.items():
        base = best[next(key for key in contenders if key[0] == kind)]
        state = sum(v.numel() * v.element_size() for s in optimizer.state.values()
                    for v in s.values() if v.dim() > 0) / (tensors * numel)
        table.append(f"| {kind}, {name} | {state:.2f} | {best[(kind, name)] * 1e3:.1f} ms | "
                     f"{best[(kind, name)] / base:.2f} |")
    return table


def spread_rows(realizations: int) -> list[str]:
    """The LM task's held-out loss with 8-bit moments on the default path (the C kernel)
    against fp32 moments, once per realization of the kernel's random draws (its seeds
    XOR-ed with a multiple of the golden ratio): how much the stochastic writes alone move
    the result, everything else the same."""
    from qhfast.kernels import cpu

    task = quality.LM
    qh = dict(lr=task.lr, betas=(0.995, 0.999), nus=(0.7, 1.0), weight_decay=task.weight_decay)
    _, base = task.train(lambda p: qhfast.QHAdamW(p, **qh), torch.float32, task.steps)
    rows = ["| LM, 8-bit moments | " + " | ".join(f"draws {k}" for k in range(realizations))
            + " | mean |", "|---|" + "---:|" * (realizations + 1)]
    original = cpu._draw_seeds
    try:
        for label, dtype, options in (
                ("fp32 params", torch.float32, dict(state_dtype="8bit")),
                ("bf16 params, stochastic", torch.bfloat16,
                 dict(state_dtype="8bit", low_precision="stochastic"))):
            changes = []
            for k in range(realizations):
                salt = (0x9E3779B97F4A7C15 * k) & ((1 << 64) - 1)
                cpu._draw_seeds = lambda salt=salt: original() ^ salt
                _, held = task.train(lambda p: qhfast.QHAdamW(p, **qh, **options), dtype,
                                     task.steps)
                changes.append((held / base - 1) * 100)
            rows.append(f"| {label} | " + " | ".join(f"{c:+.2f}%" for c in changes)
                        + f" | {sum(changes) / len(changes):+.2f}% |")
    finally:
        cpu._draw_seeds = original
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-only", action="store_true")
    parser.add_argument("--spread", type=int, default=0, metavar="N",
                        help="only the LM task on the C kernel, N realizations of its draws")
    parser.add_argument("--large", action="store_true",
                        help="time 8 tensors of 8M parameters (the bytes issue's 64M) not 8 of 1M")
    args = parser.parse_args()
    placement = fix_malloc_placement()
    if args.spread:
        print("\n".join(spread_rows(args.spread)))
        return
    if not args.time_only:
        print("\n".join(quality_rows()) + "\n")
    print("\n".join(time_rows(numel=(8 if args.large else 1) << 20)))
    print(f"\n({placement}; {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
