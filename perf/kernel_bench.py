"""The CPU kernel alone: its step time per element, without the optimizer around it.

    python perf/kernel_bench.py                      # in cache: 256K elements, 1 thread
    python perf/kernel_bench.py --large              # 64M elements in 8 tensors, 2 threads
    python perf/kernel_bench.py --variants "bf16 stochastic+bf16-state,fp32" /tmp/a.c /tmp/b.c
    python perf/kernel_bench.py --optimizer qhm

Each source (default: qhfast's ``kernels/cpu_kernel.c``) is compiled with the flags qhfast uses,
once per variant (parameter format, precision mode, state format), and its ``qhadam_step`` or
``qhm_step`` called through ctypes on tensors made for it, in interleaved rounds. In cache,
the time per element is the kernel's arithmetic (what a core spends per element when memory
keeps up): a mode is memory-bound where its bytes per element over that time exceed the
memory bandwidth a core gets. ``--large`` is the memory-bound case of the bytes issue. Prints
the best round's ns per element and ms, relative to the first row.
"""

from __future__ import annotations

import argparse
import array
import ctypes
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qhfast._quantize as quantize  # noqa: E402
from qhfast.kernels import cpu  # noqa: E402

#: name: (REAL, PARAM, MODE, STATE) of cpu_kernel.c, the parameter dtype, the extra tensor's
VARIANTS = {
    "fp32": ("float", 0, 0, 0, torch.float32, None),
    "fp32 bf16-state": ("float", 0, 0, 1, torch.float32, None),
    "bf16 master": ("float", 1, 1, 0, torch.bfloat16, torch.float32),
    "bf16 kahan": ("float", 1, 2, 0, torch.bfloat16, torch.bfloat16),
    "bf16 kahan+bf16-state": ("float", 1, 2, 1, torch.bfloat16, torch.bfloat16),
    "bf16 stochastic": ("float", 1, 3, 0, torch.bfloat16, None),
    "bf16 stochastic+bf16-state": ("float", 1, 3, 1, torch.bfloat16, None),
    "bf16 nearest": ("float", 1, 4, 0, torch.bfloat16, None),
    "fp16 master": ("float", 2, 1, 0, torch.float16, torch.float32),
    "fp16 kahan": ("float", 2, 2, 0, torch.float16, torch.float16),
    "fp16 kahan+bf16-state": ("float", 2, 2, 1, torch.float16, torch.float16),
    "fp16 stochastic": ("float", 2, 3, 0, torch.float16, None),
    "fp16 stochastic+bf16-state": ("float", 2, 3, 1, torch.float16, None),
    "fp16 nearest": ("float", 2, 4, 0, torch.float16, None),
    "fp32 8bit-state": ("float", 0, 0, 2, torch.float32, None),
    "bf16 stochastic+8bit-state": ("float", 1, 3, 2, torch.bfloat16, None),
}


def pointers(tensors: list) -> tuple[array.array, ctypes.c_void_p]:
    table = array.array("Q", [0 if t is None else t.data_ptr() for t in tensors])
    return table, ctypes.c_void_p(table.buffer_info()[0])


def kernel_call(source: Path, name: str, optimizer: str, numel: int, tensors: int, threads: int,
                scratch: Path):
    """A callable that runs one step of ``source``'s kernel for variant ``name``, and the
    tensors it steps (kept alive by the caller)."""
    real, param, mode, state, param_dtype, extra_dtype = VARIANTS[name]
    library_path = scratch / f"{abs(hash((str(source), name)))}.so"
    subprocess.run(["cc", *cpu.FLAGS, "-fopenmp", f"-DREAL={real}", f"-DPARAM={param}",
                    f"-DMODE={mode}", f"-DSTATE={state}", "-DCOUNTER=double", str(source), "-o",
                    str(library_path), "-lm"], check=True)
    library = ctypes.CDLL(str(library_path))
    n = numel // tensors

    def moments(values: torch.Tensor, nonnegative: bool) -> tuple:
        """``values`` in the state format, and their block scales (None unless 8-bit)."""
        if state == 2:
            return quantize.quantize(values, nonnegative)
        return values.to(torch.bfloat16 if state else torch.float32), None

    firsts = [moments(torch.randn(n) * 0.1, False) for _ in range(tensors)]
    seconds = [moments(torch.rand(n), True) for _ in range(tensors)]
    made = {
        "params": [torch.randn(n).to(param_dtype) for _ in range(tensors)],
        "grads": [torch.randn(n).to(param_dtype) for _ in range(tensors)],
        "first": [codes for codes, _ in firsts],
        "second": [codes for codes, _ in seconds],
        "first_scales": [scales for _, scales in firsts],
        "second_scales": [scales for _, scales in seconds],
        "extras": [None if extra_dtype is None else torch.zeros(n, dtype=extra_dtype)
                   for _ in range(tensors)],
        "w1": [torch.ones((), dtype=torch.float64) for _ in range(tensors)],
        "w2": [torch.ones((), dtype=torch.float64) for _ in range(tensors)],
    }
    tables = {key: pointers(values) for key, values in made.items()}
    sizes = (ctypes.c_int64 * tensors)(*[n] * tensors)
    d, i = ctypes.c_double, ctypes.c_int
    seeds = ctypes.c_uint64(0x123456789ABCDEF)
    p = {key: table[1] for key, table in tables.items()}
    maps = cpu._CodeMaps(tuple(quantize.code_map(signed, torch.device("cpu"))
                               for signed in (True, False))) if state == 2 else None
    structs = None if maps is None else ctypes.byref(maps.structs)
    if state != 2:
        p["first_scales"] = p["second_scales"] = None
    if optimizer == "qhadam":  # QHAdam's paper settings, nu2 = 1, no decay
        def step() -> None:
            library.qhadam_step(i(tensors), sizes, p["params"], p["grads"], p["first"],
                                p["second"], p["first_scales"], p["second_scales"], p["extras"],
                                p["w1"], p["w2"], structs, d(0.995), d(0.999), d(1e-3), d(0.7),
                                d(1.0), d(1e-8), d(0.0), i(0), d(1.0), seeds, i(threads))
    else:
        def step() -> None:
            library.qhm_step(i(tensors), sizes, p["params"], p["grads"], p["first"],
                             p["first_scales"], p["extras"], structs, d(1.0), d(0.999), d(0.7),
                             d(0.0), i(0), d(1.0), seeds, i(threads))
    return step, (made, tables, maps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="*", type=Path, default=[cpu.SOURCE])
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--optimizer", choices=["qhadam", "qhm"], default="qhadam")
    parser.add_argument("--large", action="store_true",
                        help="64M elements in 8 tensors on 2 threads (default: 256K in 4, 1)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    numel, tensors, threads, repeats = ((64 << 20, 8, 2, 1) if args.large else (1 << 18, 4, 1, 20))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for source in args.sources:
            for name in args.variants.split(","):
                step, keep = kernel_call(source, name.strip(), args.optimizer, numel, tensors,
                                         threads, Path(scratch))
                step()
                rows.append((f"{source.name} {name.strip()}", step, [], keep))
        for _ in range(args.rounds):
            for _, step, times, _ in rows:
                start = time.perf_counter()
                for _ in range(repeats):
                    step()
                times.append((time.perf_counter() - start) / repeats)
    print(f"# python perf/kernel_bench.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# {args.optimizer}, {numel / 2**20:.2f}M elements in {tensors} tensors, "
          f"{threads} thread(s), best of {args.rounds} rounds")
    first = min(rows[0][2])
    for name, _, times, _ in rows:
        best = min(times)
        print(f"{name:45s} {best / numel * 1e9:6.3f} ns/element {best * 1e3:8.2f} ms "
              f"{best / first:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
