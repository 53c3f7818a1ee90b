"""Cold first step of a fused (``fused=True``) QHAdam group: what building its kernel costs.

    python perf/compile_time.py                       # the CPU kernel (a fresh kernel cache)
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python perf/compile_time.py --compiled
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python perf/compile_time.py --compiled --inductor-defaults

On the CPU ``fused=True`` runs qhfast's C kernel, built once per dtype combination (the run
points ``QHFAST_CACHE_DIR`` at a fresh folder, so the build is cold). ``--compiled`` times the
compiled group step instead (torch.compile, what CUDA uses), with inductor's phase breakdown;
a fresh ``TORCHINDUCTOR_CACHE_DIR`` makes that compile cold. The machine's speed drifts
between processes: compare runs made one after the other, several of each.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_bench  # noqa: E402

import qhfast  # noqa: E402
import qhfast._fused  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=11)
    parser.add_argument("--width", type=int, default=step_bench.WIDTH)
    parser.add_argument("--compiled", action="store_true",
                        help="the compiled group step (torch.compile), not the CPU kernel")
    parser.add_argument("--inductor-defaults", action="store_true",
                        help="with --compiled: compile without qhfast's FUSED_INDUCTOR_OPTIONS")
    args = parser.parse_args(argv)
    saved = dict(qhfast._fused.FUSED_INDUCTOR_OPTIONS), qhfast._fused.CPU_KERNEL
    saved_cache = os.environ.get("QHFAST_CACHE_DIR")
    if args.inductor_defaults:
        qhfast._fused.FUSED_INDUCTOR_OPTIONS.clear()
    qhfast._fused.CPU_KERNEL = not args.compiled
    try:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["QHFAST_CACHE_DIR"] = cache
            return measure(args)
    finally:
        qhfast._fused.FUSED_INDUCTOR_OPTIONS.update(saved[0])
        qhfast._fused.CPU_KERNEL = saved[1]
        if saved_cache is None:
            os.environ.pop("QHFAST_CACHE_DIR", None)
        else:
            os.environ["QHFAST_CACHE_DIR"] = saved_cache


def measure(args: argparse.Namespace) -> int:
    shapes = step_bench.transformer_shapes(args.blocks, args.width)
    params = step_bench.make_params(shapes, torch.float32, "cpu")
    optimizer = qhfast.QHAdam(params, **step_bench.QHADAM_SETTINGS, fused=True)
    built = qhfast.kernels.cpu.builds
    start = time.perf_counter()
    optimizer.step()
    seconds = time.perf_counter() - start
    if not args.compiled:
        print(f"CPU kernel: {len(shapes)} tensors, first step {seconds:.2f} s "
              f"({qhfast.kernels.cpu.builds - built} kernel built)")
        return 0
    phases = dict(zip(*torch._dynamo.utils.compile_times(repr="csv")))
    print(f"compiled group step, options {qhfast._fused.FUSED_INDUCTOR_OPTIONS or 'inductor defaults'}: "
          f"{len(shapes)} tensors, first step {seconds:.1f} s")
    for phase in ("Scheduler.__init__", "GraphLowering.codegen", "GraphLowering.run"):
        print(f"  {phase}: {phases.get(phase, '-')} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
