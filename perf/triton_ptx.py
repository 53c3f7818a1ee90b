"""What the Triton kernel compiles to on an H100/H200 (sm_90), without a GPU: triton's wheel
ships ptxas, and ``triton.compile`` takes a target. Prints, per variant, the compile time and
the counts of the PTX memory and arithmetic instructions that matter: vector (``.v4``/``.v2``)
against scalar global loads and stores, FMAs, and which division and square root.

    python perf/triton_ptx.py
"""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qhfast._quantize as quantize  # noqa: E402
from qhfast.kernels import triton as plans  # noqa: E402
from qhfast.kernels import triton_kernel as kernels  # noqa: E402

SIGNATURE = {"table": "*i64", "chunks": "*i64", "n_chunks": "i32", "n": "i32", "lr": "*fp64",
             "nu1": "*fp64", "nu2": "*fp64", "eps": "*fp64", "weight_decay": "*fp64",
             "grad_scale": "*fp32", "found_inf": "*fp32", "seeds": "*i64",
             "signed_values": "*fp32", "signed_binade": "*i32", "nonnegative_values": "*fp32",
             "nonnegative_binade": "*i32"}
BASE = dict(REAL64=False, PARAM=0, MODE=0, STATE=0, COUNTER64=False, DECAY=0, MAXIMIZE=False,
            HAS_SCALE=False, HAS_FOUND_INF=False, NEEDS_RANDOM=False, ALIGNED=True,
            CHUNK=plans.CHUNK, BLOCK=plans.BLOCK,
            SIGNED_LAST=quantize.code_map(True, torch.device("cpu")).binades + 1,
            NONNEGATIVE_LAST=quantize.code_map(False, torch.device("cpu")).binades + 1)
VARIANTS = {
    "QHAdam fp32": {},
    "QHAdam bf16 stochastic+bf16-state, GradScaler": dict(
        PARAM=1, MODE=3, STATE=1, NEEDS_RANDOM=True, HAS_SCALE=True, HAS_FOUND_INF=True),
    "QHAdam fp16 kahan, decoupled decay": dict(PARAM=2, MODE=2, NEEDS_RANDOM=True, DECAY=2),
    "QHAdam fp64, coupled decay": dict(REAL64=True, COUNTER64=True, DECAY=1),
    "QHAdam bf16 master": dict(PARAM=1, MODE=1),
    "QHAdam fp32, not aligned": dict(ALIGNED=False),
    "QHAdam fp32 8bit-state": dict(STATE=2, NEEDS_RANDOM=True),
    "QHAdam bf16 stochastic+8bit-state": dict(PARAM=1, MODE=3, STATE=2, NEEDS_RANDOM=True),
}


def main() -> None:
    print(f"triton {triton.__version__}, target sm_90")
    for name, flags in VARIANTS.items():
        constants = {**BASE, **flags}
        signature = {**SIGNATURE, **{key: "constexpr" for key in constants}}
        start = time.perf_counter()
        compiled = triton.compile(ASTSource(kernels.qhadam, signature, constants),
                                  target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=4, enable_fp_fusion=False))
        seconds = time.perf_counter() - start
        ptx = compiled.asm["ptx"]
        counts = Counter(re.findall(r"(?:ld|st)\.global(?:\.v[24])?\.b\d+", ptx))
        ops = Counter(re.findall(r"(?:fma|div|sqrt)\.[\w.]+", ptx))
        print(f"{name}: {seconds:.1f} s; {dict(sorted(counts.items()))}; {dict(sorted(ops.items()))}")


if __name__ == "__main__":
    main()
