"""The benchmark: step time, memory and training quality, for qhfast against torch.optim and
qhoptim, in one command.

    python -m perf                  # the quick table: ~2 minutes on a 2-core CPU (or the GPU)
    python -m perf --full           # every row: each precision mode and path, torch's and qhoptim's
    python -m perf --sweep          # qhfast against torch on several models' shapes (the targets)
    python -m perf --blocks 24 --width 1024    # a larger parameter set
    python -m perf --full --only QHAdam    # rows whose name contains a word (plus the reference rows)
    python -m perf --full --only "AdamW8bit,8bit-state (default)"    # or any of several
    python -m perf --no-fused       # skip the fused rows
    python -m perf --all-fused      # on a GPU: compiled rows for every variant (each compiles ~1 min)

It prints each table and writes them, with the machine, torch version and command, into
perf/RESULTS.md between markers for the device (``--output`` elsewhere, ``--output -`` not at
all); the rest of that file (analysis, attempts) is left as it is. Progress goes to stderr.

Per row: the median step time and its spread over every timed step of every round; ratios to
torch's default Adam and fused Adam from the same run; the ratio to the memory-bandwidth floor
(the bytes the step must move, divided by the faster of two memory streams measured next to
the row);
the exact optimizer state per parameter; and the peak memory one step allocates beyond what
existed before it. qhfast's rows come in precision variants (see ``step_bench``): fp32
parameters, and bf16 parameters with each ``low_precision`` mode and optionally bf16 moments.

Then the training quality tables (``quality``): each task trained with qhfast in each precision
variant and torch's AdamW, held-out losses relative to the fp32 run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402
import step_bench  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
#: rows the ratios need, kept whatever --only says
REFERENCE_ROWS = ("torch Adam fp32 fused", "torch Adam fp32 loop", "torch Adam fp32 foreach")


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.*)", cpuinfo).group(1).strip()
    except (OSError, AttributeError):
        pass
    memory = ""
    try:
        kib = int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1))
        memory = f", {kib / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        pass
    text = (f"{cpu}, {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads){memory}; "
            f"torch {torch.__version__}, Python {platform.python_version()}")
    if device == "cuda":
        text += f"; GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    return text


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=11, help="transformer blocks (default 11: ~21M params)")
    parser.add_argument("--width", type=int, default=step_bench.WIDTH, help="model width (default 384)")
    parser.add_argument("--full", action="store_true",
                        help="every row (each precision mode and path) and every quality task and row")
    parser.add_argument("--sweep", action="store_true",
                        help="instead of the table: qhfast against torch on several shape sets")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all rows (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row and round (default 10)")
    parser.add_argument("--warmup", type=int, default=12,
                        help="untimed steps of a fresh optimizer (default 12: the allocator settles)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", default="",
                        help="rows whose name contains this text (or one of several, comma-separated)")
    parser.add_argument("--no-fused", dest="fused", action="store_false", help="skip fused=True rows")
    parser.add_argument("--all-fused", action="store_true",
                        help=f"every fused row, not only {', '.join(step_bench.DEFAULT_FUSED)}")
    parser.add_argument("--quality-steps", type=int, default=None,
                        help="training steps of each quality task (default: each task's own, "
                        + ", ".join(f"{t.name} {t.steps}" for t in quality.TASKS.values())
                        + "; 0: skip the quality runs)")
    parser.add_argument("--quality-task", choices=[*quality.TASKS, "all"], default=None,
                        help="which quality task (default: mlp, with --full all)")
    parser.add_argument("--plot", default=None,
                        help="PNG of the loss curves (default perf/scratch/quality-DEVICE.png; needs matplotlib)")
    parser.add_argument("--output", default=str(RESULTS), help="markdown file to update, '-' for none")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run (seconds, for tests): 1 block of width 64, 1 round of 2 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.blocks, args.width, args.rounds, args.steps, args.warmup = 1, 64, 1, 2, 1
        args.quality_steps = 3 if args.quality_steps is None else min(args.quality_steps, 3)
    if args.quality_task is None:
        args.quality_task = "all" if args.full else "mlp"
    if args.plot is None:
        args.plot = str(Path(__file__).resolve().parent / "scratch" / f"quality-{args.device}.png")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    command = "python -m perf" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    warnings.filterwarnings("ignore", message="This overload of add", category=UserWarning)
    began = time.perf_counter()
    allocator = step_bench.fix_malloc_placement()

    def progress(text: str) -> None:
        print(f"[{time.perf_counter() - began:6.0f} s] {text}", file=sys.stderr, flush=True)

    if args.sweep:
        import sweep

        text = sweep.run(progress, rounds=args.rounds, quick=args.quick)
        text = f"Command: `{command}`, {datetime.date.today().isoformat()}, " \
               f"{time.perf_counter() - began:.0f} s in all.\n\nMachine: {machine(args.device)}.\n\n{text}"
        print(text)
        if args.output != "-":
            write_block(Path(args.output), f"{args.device}-sweep", text,
                        "qhfast against torch on several shape sets")
            progress(f"written to {args.output}")
        return 0
    shapes = step_bench.transformer_shapes(args.blocks, args.width)
    numel = sum(torch.Size(s).numel() for s in shapes)
    words = [word for word in args.only.split(",") if word] or [""]
    rows = [row for row in step_bench.rows(args.device, fused=args.fused, every_fused=args.all_fused,
                                           full=args.full)
            if any(word in row.name for word in words) or row.name.startswith(REFERENCE_ROWS)]
    runner = step_bench.Runner(shapes, args.device, args.steps, args.warmup)
    measured, total = 0, args.rounds * len(rows)
    timing_began = time.perf_counter()
    for round_index in range(args.rounds):
        for i, row in enumerate(rows):
            result = runner.measure(row)
            measured += 1
            left = (time.perf_counter() - timing_began) / measured * (total - measured)
            if result.missing:
                progress(f"round {round_index + 1}/{args.rounds} row {i + 1}/{len(rows)} {row.name:45s} "
                         f"{result.missing}")
                continue
            note = "" if result.compile_seconds is None else f" (first step {result.compile_seconds:.1f} s)"
            progress(f"round {round_index + 1}/{args.rounds} row {i + 1}/{len(rows)} {row.name:45s} "
                     f"{statistics.median(result.times) * 1e3:8.2f} ms{note}; step table ~{left:.0f} s left")
    streams = runner.stream_samples

    lines = [
        f"Command: `{command}`, {datetime.date.today().isoformat()}, DURATION.",
        "",
        f"Machine: {machine(args.device)}.",
        "",
        f"Parameters: {numel / 1e6:.1f}M in {len(shapes)} tensors (transformer-like shapes, width "
        f"{args.width}, {args.blocks} blocks) on {args.device}; {args.rounds} rounds x {args.steps} "
        f"timed steps per row after {args.warmup} warm-up steps (fused and graph rows: built once, "
        "2 warm-up steps in later rounds).",
        "",
        f"Bandwidth ({args.device}, 256 MiB buffers, measured before every row of every round): "
        f"copy {spread(streams['copy'])} GB/s, update (x += y) {spread(streams['update'])} GB/s "
        "(median, min-max). A row's floor is its moved bytes over the faster stream's median "
        "in the measurements just before it. GB/s: moved bytes over the median step; "
        "\"GB/s / fp32's\": that against the row with fp32 parameters and state on the same "
        "path (a lean mode as fast as its bytes scores 1).",
        "",
        f"Allocator: {allocator}.",
        "",
    ]
    lines += step_table(runner.results, numel)
    lines += compile_table(runner.results)
    if args.quality_steps != 0:
        progress("training quality")
        tasks = list(quality.TASKS) if args.quality_task == "all" else [args.quality_task]
        table, plotted = quality.quality_table(args.quality_steps, args.plot, progress, tasks)
        lines += ["", "Training quality: every row of a task starts from the same weights and sees "
                  "the same batches, with the same hyperparameters; \"held-out vs fp32\" is the "
                  f"held-out loss relative to the `{quality.BASELINE}` row. "
                  + (f"Loss curves: `{os.path.relpath(args.plot)}` (not committed)."
                     if plotted else "No plot (matplotlib is not installed; `pip install -e \".[perf]\"`)."),
                  "", *table]
    text = "\n".join(lines).replace("DURATION", f"{time.perf_counter() - began:.0f} s in all", 1)
    print(text)
    if args.output != "-":
        write_block(Path(args.output), args.device + ("-full" if args.full else ""), text)
        progress(f"written to {args.output}")
    return 0


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def step_table(results: dict[str, step_bench.Measurement], numel: int) -> list[str]:
    medians = {name: statistics.median(r.times) for name, r in results.items() if not r.missing}
    default_adam = next(v for k, v in medians.items() if k.startswith("torch Adam fp32") and "(default)" in k)
    fused_adam = medians["torch Adam fp32 fused"]
    gbps = {name: results[name].traffic_bytes * numel / median / 1e9
            for name, median in medians.items()}
    lines = ["| optimizer | median ms | p25-p75 ms | / torch Adam default | / torch Adam fused "
             "| / floor | moved B/param | GB/s | GB/s / fp32's | state B/param | step temp B/param |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        if r.missing:
            lines.append(f"| {name} | {r.missing} |" + " |" * 10)
            continue
        q1, median, q3 = step_bench.quartiles(r.times)
        floor = r.traffic_bytes * numel / (statistics.median(r.bandwidths) * 1e9)
        temp = "-" if r.peak_bytes is None else f"{r.peak_bytes:.2f}"
        twin = step_bench.fp32_twin(name)
        share = f"{gbps[name] / gbps[twin]:.2f}" if twin in gbps and twin != name else "-"
        lines.append(
            f"| {name} | {median * 1e3:.2f} | {q1 * 1e3:.2f}-{q3 * 1e3:.2f} | {median / default_adam:.2f} "
            f"| {median / fused_adam:.2f} | {median / floor:.2f} | {r.traffic_bytes:.4g} "
            f"| {gbps[name]:.1f} | {share} | {r.state_bytes:.2f} | {temp} |"
        )
    return lines


def compile_table(results: dict[str, step_bench.Measurement]) -> list[str]:
    once = {name: r.compile_seconds for name, r in results.items() if r.compile_seconds is not None}
    if not once:
        return []
    lines = ["", "One-off cost of the rows built once: the first step, which compiles (fused) or "
             "captures (CUDA graph) it.", "", "| optimizer | first step s |", "|---|---:|"]
    return lines + [f"| {name} | {seconds:.1f} |" for name, seconds in once.items()]


def write_block(path: Path, device: str, text: str,
                title: str = "step time, memory, training quality") -> None:
    """Replace the generated block named ``device`` (``cpu``, ``cpu-full``, ``cpu-sweep``, ...)
    in ``path``, or append one."""
    begin = f"<!-- python -m perf: {device}: begin (generated: the next run replaces this block) -->"
    end = f"<!-- python -m perf: {device}: end -->"
    block = f"{begin}\n## {device.upper()}: {title}\n\n{text}\n{end}"
    old = path.read_text() if path.exists() else "# perf results\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + block
    path.write_text(new.rstrip("\n") + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
