"""The C kernel (``cpu_kernel.c``): its build, its disk cache and its loading.

The source is compiled once per variant, a combination of the macros it documents (the compute
type, the parameter and state formats, the precision mode, the counter type), whatever the
number or shapes of the tensors it will update. Built libraries are kept on disk
(``$QHFAST_CACHE_DIR``, default ``~/.cache/qhfast``) under a key of the source, the flags, the
compiler and the CPU, and loaded with ``ctypes``. This module knows nothing of optimizers: the
orchestration (``qhfast._fused``) picks the variant and calls ``qhadam_step`` / ``qhm_step``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

__all__ = ["load", "SOURCE", "builds"]

SOURCE = Path(__file__).with_name("cpu_kernel.c")

_libraries: dict[tuple, ctypes.CDLL | None] = {}
#: why a variant could not be built, and those whose failure has been reported
_failures: dict[tuple, str] = {}
_warned: set[tuple] = set()
_compile_lock = threading.Lock()
#: how many kernel variants this process has compiled or loaded (tests read it)
builds = 0


def _cache_dir() -> Path:
    root = os.environ.get("QHFAST_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qhfast")
    return Path(root)


def load(variant: tuple, warn: bool) -> ctypes.CDLL | None:
    """The compiled kernel for ``variant`` (REAL, PARAM, MODE, STATE, COUNTER): loaded from the
    disk cache or compiled (``cc``, about a second); None if it cannot be (with a warning
    once, if ``warn``)."""
    if variant in _libraries:
        library = _libraries[variant]
        if library is None and warn and variant not in _warned:
            _warned.add(variant)
            warnings.warn(f"qhfast could not build its fused CPU kernel ({_failures[variant]}); "
                          "fused=True falls back to torch.compile", RuntimeWarning, stacklevel=5)
        return library
    with _compile_lock:
        if variant in _libraries:
            return load(variant, warn)
        real, param, mode, state, counter = variant
        defines = [f"-DREAL={real}", f"-DPARAM={param}", f"-DMODE={mode}", f"-DSTATE={state}",
                   f"-DCOUNTER={counter}"]
        compiler = os.environ.get("CC", "cc")
        flags = ["-O3", "-march=native", "-std=gnu11", "-fopenmp", "-ffp-contract=off",
                 "-fno-math-errno", "-fno-trapping-math", "-fno-unswitch-loops", "-fPIC", "-shared"]
        source = SOURCE.read_bytes()
        key = hashlib.sha256(b"\0".join([source, " ".join(defines + flags).encode(),
                                         compiler.encode(), platform.machine().encode(),
                                         _cpu_model().encode()])).hexdigest()[:24]
        path = _cache_dir() / f"qhfast_cpu_kernel_{key}.so"
        try:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
                    built = Path(scratch) / path.name
                    subprocess.run([compiler, *flags, *defines, str(SOURCE), "-o", str(built),
                                    "-lm"], check=True, capture_output=True, text=True)
                    os.replace(built, path)
            library = ctypes.CDLL(str(path))
        except (OSError, subprocess.CalledProcessError) as error:
            _failures[variant] = (getattr(error, "stderr", "") or str(error)).strip()[:500]
            _libraries[variant] = None  # type: ignore[assignment]
            return load(variant, warn)
        _declare(library)
        global builds
        builds += 1
        _libraries[variant] = library
        return library


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _declare(library: ctypes.CDLL) -> None:
    i64p, d, i, u64 = ctypes.POINTER(ctypes.c_int64), ctypes.c_double, ctypes.c_int, ctypes.c_uint64
    pp = ctypes.c_void_p  # the address of an array of data pointers (_Pointers)
    library.qhadam_step.argtypes = [i, i64p, pp, pp, pp, pp, pp, pp, pp,
                                    d, d, d, d, d, d, d, i, d, u64, i]
    library.qhadam_step.restype = None
    library.qhm_step.argtypes = [i, i64p, pp, pp, pp, pp, d, d, d, d, i, d, u64, i]
    library.qhm_step.restype = None
