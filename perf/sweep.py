"""qhfast against torch.optim on several models' shapes: the speed targets on more than one model.

    python -m perf --sweep           # every shape set, written into perf/RESULTS.md
    python perf/sweep.py --rounds 5  # the same, printed only
    python perf/sweep.py --only "3000 tiny tensors" --rounds 5   # one set (per-step overhead)

Each shape set gets its own parameter tensors (fp32, random gradients set once) that every
contender steps in turn, in rounds; a contender's time in a round is the median of its steps
there, and a ratio is taken within each round (the machine drifts between rounds by more than
most differences) and its median over the rounds is quoted, with the range.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_bench  # noqa: E402

import qhfast  # noqa: E402


def many_small_shapes(count: int, total: int, seed: int = 0) -> list[tuple[int, ...]]:
    """``count`` tensors of log-uniform sizes (64 to 64K elements) scaled to ``total`` in all,
    as a convolutional network's filters, biases and norms."""
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.exp(torch.empty(count).uniform_(4.2, 11.1, generator=generator))
    sizes = (sizes * total / sizes.sum()).round().clamp(min=1).long().tolist()
    return [(int(n),) for n in sizes]


#: name -> shapes: 50 to 500 tensors, 5M to 60M parameters, many small tensors and a large
#: embedding; "tiny" is the per-step overhead (almost no arithmetic)
SHAPE_SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "perf's transformer": lambda: step_bench.transformer_shapes(11, 384),
    "small transformer": lambda: step_bench.transformer_shapes(7, 256, vocab=8192),
    "500 small tensors": lambda: many_small_shapes(500, 5_000_000),
    "large embedding": lambda: step_bench.transformer_shapes(3, 768, vocab=50_000),
    "3000 tiny tensors": lambda: [(16,)] * 3000,
}

QHADAM = step_bench.QHADAM_SETTINGS
QHM = step_bench.QHM_SETTINGS

#: (target name, qhfast contender, torch contender, the issue's bound)
PAIRS = (
    ("QHAdam default / torch Adam default", "qhfast QHAdam (default)", "torch Adam loop (default)", 1.0),
    ("QHAdam fused / torch Adam fused", "qhfast QHAdam fused", "torch Adam fused", 1.1),
    ("QHM default / torch SGD momentum default", "qhfast QHM (default)",
     "torch SGD momentum loop (default)", 1.0),
    ("QHM fused / torch SGD momentum fused", "qhfast QHM fused", "torch SGD momentum fused", 1.0),
    ("QHAdam default / qhoptim QHAdam", "qhfast QHAdam (default)", "qhoptim 1.1.0 QHAdam", None),
    ("QHAdam default / torch Adam foreach (overhead)", "qhfast QHAdam (default)",
     "torch Adam foreach", 1.0),
)


def contenders(params: list[torch.Tensor], tiny: bool) -> dict[str, torch.optim.Optimizer]:
    made = {
        "qhfast QHAdam (default)": qhfast.QHAdam(params, **QHADAM),
        "torch Adam loop (default)": torch.optim.Adam(params, lr=1e-3, foreach=False),
        "torch Adam foreach": torch.optim.Adam(params, lr=1e-3, foreach=True),
    }
    if tiny:
        return made
    made.update({
        "qhfast QHAdam fused": qhfast.QHAdam(params, **QHADAM, fused=True),
        "torch Adam fused": torch.optim.Adam(params, lr=1e-3, fused=True),
        "qhfast QHM (default)": qhfast.QHM(params, **QHM),
        "torch SGD momentum loop (default)": torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False),
        "qhfast QHM fused": qhfast.QHM(params, **QHM, fused=True),
        "torch SGD momentum fused": torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True),
    })
    oracle = step_bench.qhoptim_classes()
    if oracle:
        made["qhoptim 1.1.0 QHAdam"] = oracle["QHAdam"](params, **QHADAM)
    return made


def race(optimizers: dict[str, torch.optim.Optimizer], rounds: int, steps: int,
         warmup: int) -> dict[str, list[float]]:
    """Each contender's median step time in each round, rounds alternating between them."""
    for optimizer in optimizers.values():
        for _ in range(warmup):
            optimizer.step()
    per_round: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(rounds):
        for name, optimizer in optimizers.items():
            times = step_bench.time_steps(optimizer.step, steps, 2, "cpu")
            per_round[name].append(statistics.median(times))
    return per_round


def run(progress: Callable[[str], None] = lambda line: None, rounds: int = 3,
        quick: bool = False, only: str | None = None) -> str:
    """Race every shape set (or the one named ``only``); return the markdown (a line per set,
    then the ratio table)."""
    lines = ["| shape set | tensors | params | " + " | ".join(p[0] for p in PAIRS) + " |",
             "|---|---:|---:|" + "---:|" * len(PAIRS)]
    times_lines = []
    for name, make_shapes in SHAPE_SETS.items():
        if only is not None and name != only:
            continue
        shapes = make_shapes()
        if quick:
            shapes = [tuple(max(1, d // 64) for d in s) for s in shapes[:40]]
        params = step_bench.make_params(shapes, torch.float32, "cpu")
        tiny = name.startswith("3000")
        start = time.perf_counter()
        per_round = race(contenders(params, tiny), rounds, 2 if quick else 10, 1 if quick else 5)
        cells = []
        for _, ours, theirs, bound in PAIRS:
            if ours not in per_round or theirs not in per_round:
                cells.append("-" if theirs != "qhoptim 1.1.0 QHAdam" or tiny
                             else step_bench.MISSING)
                continue
            ratios = sorted(a / b for a, b in zip(per_round[ours], per_round[theirs]))
            verdict = "" if bound is None else (" ✓" if statistics.median(ratios) <= bound else " ✗")
            cells.append(f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f}){verdict}")
        numel = sum(torch.Size(s).numel() for s in shapes)
        lines.append(f"| {name} | {len(shapes)} | {numel / 1e6:.1f}M | " + " | ".join(cells) + " |")
        times_lines.append(f"- {name}: " + ", ".join(
            f"{contender} {statistics.median(t) * 1e3:.2f} ms" for contender, t in per_round.items()))
        progress(f"sweep {name:22s} {len(shapes)} tensors, {numel / 1e6:.1f}M params "
                 f"({time.perf_counter() - start:.0f} s)")
        del params
    header = (f"Ratios of step times (median over {rounds} rounds of the per-round ratio, min-max; "
              "✓/✗: within the target's bound or not: 1.0 for the default paths and fused QHM, "
              "1.1 for fused QHAdam). fp32; QHAdam nus=(0.7, 1.0), betas=(0.995, 0.999); QHM "
              "nu=0.7, momentum=0.999; torch at its defaults. \"default\" is each library with "
              "no path flag (qhfast: its CPU kernel; torch: the per-tensor loop on the CPU).")
    return "\n".join([header, "", *lines, "", "Median step times:", "", *times_lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (seconds, for tests)")
    parser.add_argument("--only", choices=list(SHAPE_SETS), help="race this shape set alone")
    args = parser.parse_args(argv)
    print(run(lambda line: print(line, file=sys.stderr, flush=True), args.rounds, args.quick,
              args.only))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
