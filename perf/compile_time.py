"""Compile time of one fused (``fused=True``) QHAdam step, with inductor's phase breakdown.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python perf/compile_time.py            # qhfast's options
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python perf/compile_time.py --inductor-defaults

A fresh cache directory makes the compile cold (a warm cache skips most of it). The machine's
speed drifts between processes: compare runs made one after the other, several of each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_bench  # noqa: E402

import qhfast  # noqa: E402
import qhfast._base  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=11)
    parser.add_argument("--width", type=int, default=step_bench.WIDTH)
    parser.add_argument("--inductor-defaults", action="store_true",
                        help="compile without qhfast's FUSED_INDUCTOR_OPTIONS")
    args = parser.parse_args(argv)
    saved = dict(qhfast._base.FUSED_INDUCTOR_OPTIONS)
    if args.inductor_defaults:
        qhfast._base.FUSED_INDUCTOR_OPTIONS.clear()
    try:
        return measure(args)
    finally:
        qhfast._base.FUSED_INDUCTOR_OPTIONS.update(saved)


def measure(args: argparse.Namespace) -> int:
    shapes = step_bench.transformer_shapes(args.blocks, args.width)
    params = step_bench.make_params(shapes, torch.float32, "cpu")
    optimizer = qhfast.QHAdam(params, **step_bench.QHADAM_SETTINGS, fused=True)
    start = time.perf_counter()
    optimizer.step()
    seconds = time.perf_counter() - start
    phases = dict(zip(*torch._dynamo.utils.compile_times(repr="csv")))
    print(f"options {qhfast._base.FUSED_INDUCTOR_OPTIONS or 'inductor defaults'}: "
          f"{len(shapes)} tensors, first step {seconds:.1f} s")
    for phase in ("Scheduler.__init__", "GraphLowering.codegen", "GraphLowering.run"):
        print(f"  {phase}: {phases.get(phase, '-')} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
