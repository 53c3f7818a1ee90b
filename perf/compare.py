"""A/B of one optimizer: the working tree against a git revision and torch, in one process.

    python perf/compare.py --rev HEAD~1                # QHAdam: tree vs HEAD~1 vs torch Adam loop
    python perf/compare.py --rev main --optimizer QHM  # QHM vs torch SGD momentum loop
    python perf/compare.py --tiny                      # per-step Python overhead: 179 tensors of 4
    python perf/compare.py --fused                     # fused=True against torch's fused Adam

The machine's speed drifts between processes by more than most changes are worth, so
``python -m perf`` tables cannot judge a small change. Here every contender steps the same
parameter tensors, in rounds that alternate between them, and the medians are comparable.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_bench  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "QHAdam": (dict(lr=1e-3, betas=(0.995, 0.999), nus=(0.7, 1.0)),
               "torch Adam loop", lambda p: torch.optim.Adam(p, lr=1e-3, foreach=False)),
    "QHM": (dict(lr=1.0, momentum=0.999, nu=0.7),
            "torch SGD momentum loop", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=False)),
}


FUSED_TORCH = {
    "QHAdam": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
    "QHM": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
}


def qhfast_at(rev: str | None):
    """The qhfast package of the working tree (rev None) or of a git revision."""
    for name in [m for m in sys.modules if m == "qhfast" or m.startswith("qhfast.")]:
        del sys.modules[name]
    if rev is None:
        root = ROOT
    else:
        root = Path(tempfile.mkdtemp())
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "qhfast"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("qhfast")
    finally:
        sys.path.remove(str(root))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", help="git revision to compare against")
    parser.add_argument("--optimizer", choices=sorted(SETTINGS), default="QHAdam")
    parser.add_argument("--blocks", type=int, default=11)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=12)
    parser.add_argument("--fused", action="store_true",
                        help="qhfast with fused=True (compiles first) against torch's fused kernel")
    parser.add_argument("--tiny", action="store_true",
                        help="the same number of tensors with 4 elements each: what is left is overhead")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)

    kwargs, torch_name, make_torch = SETTINGS[args.optimizer]
    if args.fused:
        kwargs = dict(kwargs, fused=True)
        torch_name = torch_name.replace("loop", "fused")
        make_torch = FUSED_TORCH[args.optimizer]
    shapes = step_bench.transformer_shapes(args.blocks)
    if args.tiny:
        shapes = [(4,)] * len(shapes)
    params = step_bench.make_params(shapes, getattr(torch, args.dtype), "cpu")
    contenders = {}
    if args.rev:
        contenders[f"qhfast@{args.rev}"] = getattr(qhfast_at(args.rev), args.optimizer)(params, **kwargs)
    contenders["qhfast (working tree)"] = getattr(qhfast_at(None), args.optimizer)(params, **kwargs)
    contenders[torch_name] = make_torch(params)
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for optimizer in contenders.values():
        for _ in range(args.warmup):
            optimizer.step()
    for _ in range(args.rounds):
        for name, optimizer in contenders.items():
            samples[name] += step_bench.time_steps(optimizer.step, args.steps, 0, "cpu")
    command = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# python perf/compare.py {command}")
    print(f"# {len(shapes)} tensors, {sum(torch.Size(s).numel() for s in shapes) / 1e6:.2f}M params; "
          f"{args.rounds} rounds x {args.steps} steps, interleaved, same tensors; torch {torch.__version__}")
    for name, times in samples.items():
        q1, median, q3 = step_bench.quartiles(times)
        print(f"{name:28s} median {median * 1e3:6.1f} ms   p25-p75 {q1 * 1e3:.1f}-{q3 * 1e3:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
