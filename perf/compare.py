"""A/B of one optimizer: the working tree against a git revision and torch, in one process.

    python perf/compare.py --rev HEAD~1                # QHAdam: tree vs HEAD~1 vs torch Adam loop
    python perf/compare.py --rev main --optimizer QHM  # QHM vs torch SGD momentum loop
    python perf/compare.py --tiny                      # per-step Python overhead: 179 tensors of 4
    python perf/compare.py --fused                     # fused=True against torch's fused Adam
    python perf/compare.py --dtype bfloat16 --low-precision kahan --state-dtype bfloat16
    python perf/compare.py --modes                     # every precision variant against each other
    python perf/compare.py --modes --foreach           # the same on the foreach path
    python perf/compare.py --modes --large --rounds 3 --steps 3   # 64M params in 8 tensors

The machine's speed drifts between processes by more than most changes are worth, so
``python -m perf`` tables cannot judge a small change. Here every contender steps the same
parameter tensors, in rounds that alternate between them, and the medians are comparable.

``--low-precision`` and ``--state-dtype`` pass qhfast's precision options to the qhfast
contenders (a revision from before them rejects them). ``--modes`` races the working tree's
qhfast in every precision variant of ``step_bench.PRECISION_VARIANTS`` (fp32 parameters, and
bf16/fp16 parameters in each ``low_precision`` mode, with and without bf16 moments) against each
other and torch, each dtype's contenders sharing one parameter set, and prints each one's
state and moved bytes per parameter, its time relative to the fp32 and bf16-master ones, and
its effective bandwidth (moved bytes over the median step) against the fp32 one's. Every run
fixes glibc's mmap threshold (``step_bench.fix_malloc_placement``).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
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

FOREACH_TORCH = {
    "QHAdam": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
    "QHM": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
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
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=12)
    parser.add_argument("--fused", action="store_true",
                        help="qhfast with fused=True (compiles first) against torch's fused kernel")
    parser.add_argument("--foreach", action="store_true",
                        help="qhfast and torch with foreach=True (not the per-tensor loop)")
    parser.add_argument("--large", action="store_true",
                        help="64M parameters in 8 tensors (memory-bound: the bytes issue's setting)")
    parser.add_argument("--tiny", action="store_true",
                        help="the same number of tensors with 4 elements each: what is left is overhead")
    parser.add_argument("--low-precision", choices=["master", "kahan", "stochastic", "nearest"],
                        help="qhfast's low_precision (it acts on bf16 parameters: --dtype bfloat16)")
    parser.add_argument("--state-dtype", choices=["bfloat16"], help="qhfast's state_dtype")
    parser.add_argument("--modes", action="store_true",
                        help="the working tree in every precision variant (ignores --rev, --dtype, "
                             "--low-precision, --state-dtype)")
    args = parser.parse_args(argv)
    if args.fused and args.foreach:
        parser.error("--fused and --foreach exclude each other")
    warnings.filterwarnings("ignore", category=UserWarning)

    kwargs, torch_name, make_torch = SETTINGS[args.optimizer]
    if args.fused:
        kwargs = dict(kwargs, fused=True)
        torch_name = torch_name.replace("loop", "fused")
        make_torch = FUSED_TORCH[args.optimizer]
    if args.foreach:
        kwargs = dict(kwargs, foreach=True)
        torch_name = torch_name.replace("loop", "foreach")
        make_torch = FOREACH_TORCH[args.optimizer]
    if args.low_precision:
        kwargs = dict(kwargs, low_precision=args.low_precision)
    if args.state_dtype:
        kwargs = dict(kwargs, state_dtype=getattr(torch, args.state_dtype))
    shapes = step_bench.transformer_shapes(args.blocks)
    if args.tiny:
        shapes = [(4,)] * len(shapes)
    if args.large:  # the bytes issue's setting: 64M parameters in 8 tensors
        shapes = [(8192, 1024)] * 8  # 2-D: what 8-bit moments quantize
    allocator = step_bench.fix_malloc_placement()
    contenders = {}
    if args.modes:
        qhfast = qhfast_at(None)
        params = {dtype: step_bench.make_params(shapes, dtype, "cpu")
                  for dtype in (torch.float32, torch.bfloat16, torch.float16)}
        for tag, dtype, options in step_bench.PRECISION_VARIANTS:
            if args.optimizer == "QHM" and tag in step_bench.QHADAM_ONLY:
                continue
            contenders[f"qhfast {tag}"] = getattr(qhfast, args.optimizer)(params[dtype], **kwargs, **options)
        contenders[f"{torch_name} fp32"] = make_torch(params[torch.float32])
        contenders[f"{torch_name} bf16"] = make_torch(params[torch.bfloat16])
    else:
        params = step_bench.make_params(shapes, getattr(torch, args.dtype), "cpu")
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
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(f"# {len(shapes)} tensors, {numel / 1e6:.2f}M params; {args.rounds} rounds x "
          f"{args.steps} steps, interleaved, same tensors; torch {torch.__version__}; {allocator}")
    medians = {name: statistics.median(times) for name, times in samples.items()}
    traffic = {name: step_bench.traffic_bytes_per_param(o) for name, o in contenders.items()}
    width = max(28, *(len(name) for name in samples))
    for name, times in samples.items():
        q1, median, q3 = step_bench.quartiles(times)
        line = f"{name:{width}s} median {median * 1e3:7.2f} ms   p25-p75 {q1 * 1e3:.2f}-{q3 * 1e3:.2f}"
        if args.modes:
            optimizer = contenders[name]
            moved = step_bench.traffic_bytes_per_param(optimizer)
            gbps = moved * numel / median / 1e9
            fp32_gbps = traffic["qhfast fp32"] * numel / medians["qhfast fp32"] / 1e9
            line += (f"   / fp32 {median / medians['qhfast fp32']:.2f}"
                     f"   / bf16 master {median / medians['qhfast bf16 master']:.2f}"
                     f"   state {step_bench.state_bytes_per_param(optimizer):5.2f} B/param"
                     f"   moved {moved:5.2f} B/param   {gbps:5.1f} GB/s"
                     f" ({gbps / fp32_gbps:.2f} of fp32's)")
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
