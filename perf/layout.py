"""Where the tensors lie, and the C kernel's step time (issue 21's allocator finding).

    python perf/layout.py                  # one buffer: every stream at the same address mod 2 MiB,
                                           # qhfast's own tensors shifted, each tensor its own mmap
    python perf/layout.py --heap           # glibc's own placement after a 2 GiB tensor is freed
    MALLOC_MMAP_THRESHOLD_=65536 python perf/layout.py --heap   # ... with the threshold fixed

QHAdam's kernel on 64M elements in 8 tensors, 2 threads (perf/kernel_bench.py's setup), its
parameters, gradients and moments (and MODE's extra tensor) laid out as each row says; the
rows interleaved, the best of --rounds steps, and each stream's address mod 2 MiB printed.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_bench  # noqa: E402
from qhfast.kernels import cpu  # noqa: E402

TENSORS, NUMEL, THREADS = 8, 64 << 20, 2
TWO_MIB = 2 << 20
ROLES = ["params", "grads", "first", "second", "extras", "first_scales", "second_scales"]
OWN = ["first", "second", "extras"]  # what qhfast allocates itself


def carve(made: dict, layout: str, shift: int) -> dict:
    """``made``'s tensors copied into one buffer, each in a slot of a multiple of 2 MiB:
    "coincide" puts every stream at the same address mod 2 MiB (glibc's heap gives
    consecutive chunks a 16-byte header: 64 bytes apart here, torch's alignment), "shifted"
    moves qhfast's own tensors by a different multiple of ``shift`` each; "separate" copies
    each tensor on its own (its own mmap under the fixed threshold)."""
    if layout == "separate":
        return {k: [t if t is None or k not in ROLES else t.clone() for t in v] for k, v in made.items()}
    items = [(k, j, t) for k in ROLES for j, t in enumerate(made[k]) if t is not None]
    biggest = max(t.numel() * t.element_size() for _, _, t in items)
    slot = -(-(biggest + 4 * shift + 4096) // TWO_MIB) * TWO_MIB
    buffer = torch.empty(len(items) * slot + 4096, dtype=torch.uint8)
    base = (-buffer.data_ptr()) % 4096
    out = {k: ([None] * len(v) if k in ROLES else v) for k, v in made.items()}
    for index, (k, j, t) in enumerate(items):
        offset = index * slot + base + (shift * (1 + OWN.index(k)) if layout == "shifted" and k in OWN
                                        else 0)
        nbytes = t.numel() * t.element_size()
        view = buffer[offset:offset + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        out[k][j] = view
    out["buffer"] = [buffer]
    return out


def stepper(library: ctypes.CDLL, name: str, made: dict, maps) -> tuple:
    """A step of QHAdam's kernel over ``made`` (kernel_bench's call, on these tensors)."""
    tables = {k: kernel_bench.pointers(v) for k, v in made.items() if k != "buffer"}
    p = {k: table[1] for k, table in tables.items()}
    if kernel_bench.VARIANTS[name][3] != 2:
        p["first_scales"] = p["second_scales"] = None
    n = NUMEL // TENSORS
    sizes = (ctypes.c_int64 * TENSORS)(*[n] * TENSORS)
    d, i = ctypes.c_double, ctypes.c_int
    structs = None if maps is None else ctypes.byref(maps.structs)

    def step() -> None:
        library.qhadam_step(i(TENSORS), sizes, p["params"], p["grads"], p["first"], p["second"],
                            p["first_scales"], p["second_scales"], p["extras"], p["w1"], p["w2"],
                            structs, d(0.995), d(0.999), d(1e-3), d(0.7), d(1.0), d(1e-8), d(0.0),
                            i(0), d(1.0), ctypes.c_uint64(0x123456789ABCDEF), i(THREADS))
    return step, tables


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="fp32,bf16 stochastic+bf16-state")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--shift", type=int, default=16 * 1024 + 128)
    parser.add_argument("--heap", action="store_true",
                        help="glibc's placement after a 2 GiB tensor is freed (no layout of ours)")
    args = parser.parse_args()
    if args.heap:
        big = torch.ones(1 << 29)
        del big  # glibc raises its mmap threshold: later large tensors come from the heap
        layouts = ["heap"]
    else:
        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD: each copy its own mmap
        layouts = ["separate", "coincide", "shifted"]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.variants.split(","):
            real, param, mode, state, *_ = kernel_bench.VARIANTS[name]
            library_path = Path(scratch) / f"{mode}{param}{state}.so"
            subprocess.run(["cc", *cpu.FLAGS, "-fopenmp", f"-DREAL={real}", f"-DPARAM={param}",
                            f"-DMODE={mode}", f"-DSTATE={state}", "-DCOUNTER=double",
                            str(cpu.SOURCE), "-o", str(library_path), "-lm"], check=True)
            library = ctypes.CDLL(str(library_path))
            for layout in layouts:
                _, (made, _, maps) = kernel_bench.kernel_call(
                    cpu.SOURCE, name, "qhadam", NUMEL, TENSORS, THREADS, Path(scratch))
                made = made if layout == "heap" else carve(made, layout, args.shift)
                step, tables = stepper(library, name, made, maps)
                step()
                rows.append((name, layout, made, step, tables, maps, []))
        for _ in range(args.rounds):
            for row in rows:
                start = time.perf_counter()
                row[3]()
                row[6].append(time.perf_counter() - start)
    print(f"# python perf/layout.py {' '.join(sys.argv[1:])}")
    for name, layout, made, _, _, _, times in rows:
        where = [made[k][0].data_ptr() % TWO_MIB for k in ("params", "grads", "first", "second")]
        print(f"{name:28s} {layout:9s} best {min(times) * 1e3:7.2f} ms   params, grads, "
              f"moments at {where} mod 2 MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
