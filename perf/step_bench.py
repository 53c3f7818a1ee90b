"""Optimizer step time: qhfast against torch.optim and qhoptim on one parameter set.

    python perf/step_bench.py                 # ~21M params in 179 tensors, CPU
    python perf/step_bench.py --blocks 2      # smaller, quicker
    python perf/step_bench.py --only QHAdam   # rows whose name contains a word
    python perf/step_bench.py --compiled      # also torch.compile'd steps (minutes to compile)

The parameter set is shaped like a small transformer (width 384, 11 blocks of attention and
MLP weights, biases and norms, plus an embedding). Gradients are random and set once; every
optimizer takes warm-up steps (state creation) and then each of ``--steps`` steps is timed
alone. Machines drift (a shared CPU, the allocator, page placement), so the whole table is
measured ``--rounds`` times, each round timing every row once on freshly made tensors, and
each row's statistics pool all its rounds. The table gives the median and the spread (25th-75th
percentile) in milliseconds, and the median as a ratio to torch Adam's default path and to
torch's fused Adam, both measured in the same run. QH rows use the paper's recommended settings (nu = 0.7), so the quasi-hyperbolic
term is paid for; ``QHAdam nus=(1,1)`` rows are plain Adam through qhfast.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch

import qhfast

WIDTH = 384


def transformer_shapes(blocks: int, width: int = WIDTH, vocab: int = 4096) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, width)]
    for _ in range(blocks):
        shapes += [
            (width,), (width,),  # attention norm
            (3 * width, width), (3 * width,),  # qkv
            (width, width), (width,),  # attention output
            (width,), (width,),  # mlp norm
            (4 * width, width), (4 * width,),  # mlp up
            (width, 4 * width), (width,),  # mlp down
            (width,), (width,), (width,), (width,),  # extra per-block scales/shifts
        ]
    return shapes + [(width,), (width,)]


def make_params(shapes, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen).mul_(0.02).to(device=device, dtype=dtype)
        p.requires_grad_()
        p.grad = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        params.append(p)
    return params


def qhoptim_classes():
    try:
        import qhoptim.pyt
    except ImportError:
        return {}
    return {"QHM": qhoptim.pyt.QHM, "QHAdam": qhoptim.pyt.QHAdam}


def configurations(device: str) -> list[tuple[str, torch.dtype, Callable]]:
    """(row name, param dtype, optimizer factory)."""
    qhm = dict(lr=1.0, momentum=0.999, nu=0.7)
    qhadam = dict(lr=1e-3, betas=(0.995, 0.999), nus=(0.7, 1.0))
    rows: list[tuple[str, torch.dtype, Callable]] = []
    default_foreach = device != "cpu"
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for path, foreach in (("per-tensor", False), ("foreach", True)):
            default = " (default)" if foreach == default_foreach else ""
            rows.append((f"qhfast QHM {tag} {path}{default}", dtype,
                         lambda p, f=foreach: qhfast.QHM(p, **qhm, foreach=f)))
            rows.append((f"qhfast QHAdam {tag} {path}{default}", dtype,
                         lambda p, f=foreach: qhfast.QHAdam(p, **qhadam, foreach=f)))
            if dtype == torch.bfloat16:
                rows.append((f"qhfast QHAdam bf16 no-masters {path}{default}", dtype,
                             lambda p, f=foreach: qhfast.QHAdam(p, **qhadam, foreach=f,
                                                                master_weights=False)))
            else:
                rows.append((f"qhfast QHAdam nus=(1,1) fp32 {path}{default}", dtype,
                             lambda p, f=foreach: qhfast.QHAdam(p, lr=1e-3, foreach=f)))
        for path, kwargs in (("loop", dict(foreach=False)), ("foreach", dict(foreach=True)),
                             ("fused", dict(fused=True))):
            default = " (default)" if kwargs.get("foreach") == default_foreach else ""
            rows.append((f"torch SGD momentum {tag} {path}{default}", dtype,
                         lambda p, k=kwargs: torch.optim.SGD(p, lr=0.1, momentum=0.9, **k)))
            rows.append((f"torch Adam {tag} {path}{default}", dtype,
                         lambda p, k=kwargs: torch.optim.Adam(p, lr=1e-3, **k)))
            rows.append((f"torch AdamW {tag} {path}{default}", dtype,
                         lambda p, k=kwargs: torch.optim.AdamW(p, lr=1e-3, **k)))
    oracle = qhoptim_classes()
    if oracle:
        rows.append(("qhoptim 1.1.0 QHM fp32", torch.float32, lambda p: oracle["QHM"](p, **qhm)))
        rows.append(("qhoptim 1.1.0 QHAdam fp32", torch.float32,
                     lambda p: oracle["QHAdam"](p, **qhadam)))
    return rows


def compiled_configurations() -> list[tuple[str, torch.dtype, Callable, bool]]:
    """(row name, param dtype, optimizer factory, fullgraph). Tensor lr: what a scheduled run
    compiles. torch's Adam inserts graph breaks on purpose, so it cannot take fullgraph."""
    qhadam = dict(lr=torch.tensor(1e-3), betas=(0.995, 0.999), nus=(0.7, 1.0))
    return [
        ("qhfast QHM fp32 compiled", torch.float32,
         lambda p: qhfast.QHM(p, lr=torch.tensor(1.0), momentum=0.999, nu=0.7), True),
        ("qhfast QHAdam fp32 compiled", torch.float32, lambda p: qhfast.QHAdam(p, **qhadam), True),
        ("qhfast QHAdam bf16 compiled", torch.bfloat16, lambda p: qhfast.QHAdam(p, **qhadam), True),
        ("torch Adam fp32 compiled", torch.float32,
         lambda p: torch.optim.Adam(p, lr=torch.tensor(1e-3)), False),
    ]


def time_steps(step: Callable, steps: int, warmup: int, device: str) -> list[float]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Optimizer state (moments, masters, counters) in bytes per parameter element, exact."""
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values()
                for v in s.values() if isinstance(v, torch.Tensor))
    elements = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    return state / elements


def quartiles(times: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(times, n=4)
    return q1, median, q3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=11, help="transformer blocks (default 11: ~21M params)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all rows (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row and round")
    parser.add_argument("--warmup", type=int, default=12,
                        help="untimed steps first (default 12: the allocator settles after ~10)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", default="", help="run rows whose name contains this text")
    parser.add_argument("--compiled", action="store_true",
                        help="add torch.compile'd steps (compiled once, timed in one round)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="This overload of add", category=UserWarning)

    shapes = transformer_shapes(args.blocks)
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(f"# step time: {numel / 1e6:.1f}M params in {len(shapes)} tensors on {args.device}")
    print(f"# torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"# command: python perf/step_bench.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# {args.rounds} rounds x {args.steps} timed steps per row after {args.warmup} warm-up steps")
    rows = [row for row in configurations(args.device)
            if not args.only or args.only in row[0] or row[0].startswith("torch Adam fp32")]
    samples: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    state_bytes: dict[str, float] = {}
    for round_index in range(args.rounds):
        for name, dtype, make in rows:
            params = make_params(shapes, dtype, args.device)
            optimizer = make(params)
            samples[name] += time_steps(optimizer.step, args.steps, args.warmup, args.device)
            state_bytes[name] = state_bytes_per_param(optimizer)
            del optimizer
            median = statistics.median(samples[name])
            print(f"  round {round_index + 1}/{args.rounds}  {name:48s} {median * 1e3:8.1f} ms",
                  file=sys.stderr, flush=True)
            del params
    lines = [(name, *quartiles(times)) for name, times in samples.items()]
    results = {name: median for name, _, median, _ in lines}

    default_adam = next(v for k, v in results.items() if k.startswith("torch Adam fp32") and "(default)" in k)
    fused_adam = results.get("torch Adam fp32 fused")
    print()
    print("| optimizer | median ms | p25-p75 ms | / torch Adam default | / torch Adam fused "
          "| state B/param |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, q1, median, q3 in lines:
        fused_ratio = f"{median / fused_adam:.2f}" if fused_adam else "-"
        print(f"| {name} | {median * 1e3:.1f} | {q1 * 1e3:.1f}-{q3 * 1e3:.1f} | "
              f"{median / default_adam:.2f} | {fused_ratio} | {state_bytes[name]:.2f} |")
    if args.compiled:
        print_compiled_table(args, shapes, default_adam, fused_adam)
    return 0


def print_compiled_table(args, shapes, default_adam: float, fused_adam: float | None) -> None:
    """Compiled steps: the first two calls (the step that creates the state, then the steady
    step: two graphs) are the compile time; then rounds x steps timed steps in one round."""
    print()
    print("| compiled optimizer | compile s (2 graphs) | median ms | p25-p75 ms "
          "| / torch Adam default | / torch Adam fused |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, dtype, make, fullgraph in compiled_configurations():
        if args.only and args.only not in name:
            continue
        torch._dynamo.reset()
        params = make_params(shapes, dtype, args.device)
        step = torch.compile(make(params).step, fullgraph=fullgraph)
        start = time.perf_counter()
        step()
        step()
        compile_seconds = time.perf_counter() - start
        q1, median, q3 = quartiles(
            time_steps(step, args.rounds * args.steps, args.warmup, args.device)
        )
        print(f"  compiled {name:40s} {median * 1e3:8.1f} ms (compile {compile_seconds:.0f} s)",
              file=sys.stderr, flush=True)
        fused_ratio = f"{median / fused_adam:.2f}" if fused_adam else "-"
        print(f"| {name} | {compile_seconds:.0f} | {median * 1e3:.1f} | {q1 * 1e3:.1f}-{q3 * 1e3:.1f} "
              f"| {median / default_adam:.2f} | {fused_ratio} |")
        del step, params


if __name__ == "__main__":
    raise SystemExit(main())
