"""The C kernel (``cpu_kernel.c``): its build, its disk cache and its loading.

The source is compiled once per variant, a combination of the macros it documents (the compute
type, the parameter and state formats, the precision mode, the counter type), whatever the
number or shapes of the tensors it will update, and loaded with ``ctypes``. This module knows
nothing of optimizers: the orchestration (``qhfast._fused``) checks a bucket's tensors and
makes a :class:`Plan` of them (:func:`plan`), which each step points at the gradients and runs
(``qhadam_step`` / ``qhm_step``).

The disk cache (``$QHFAST_CACHE_DIR``, default ``~/.cache/qhfast``) keeps one file per variant,
named by a hash of the source, the compiler and its flags and the CPU:

* an entry is the library followed by a trailer, a magic string and the SHA-256 of the
  library. It is compiled in a scratch directory beside it and moved into place with
  ``os.replace``, so processes building it at once (``torchrun``'s first step) each leave a
  whole entry. Before loading, the whole entry is read and checked: a truncated, empty or
  otherwise damaged one (a full disk, an interrupted copy) is rebuilt, never loaded;
* the cache is only read from a directory that no other user can write into or replace: made
  with mode 0o700, taken by its real path, refused if owned by another user or group- or
  world-writable, or if a folder above it is (unless sticky, as /tmp); entries too. A refused
  directory, one that cannot be made, or one where a kernel cannot be built or loaded (not
  writable, a full disk, a file system that runs no code) gives a ``RuntimeWarning`` (once per
  process and directory) and the process builds its kernels in a private temporary directory,
  removed at exit. The default directory, if ours and open to others (qhfast 0.1.0 made it
  under the umask), is set to mode 0o700 instead. A build killed mid-way leaves a scratch
  directory, removed an hour later by the next build;
* where the build with ``-fopenmp`` fails for want of OpenMP (macOS's clang rejects it,
  Linux's clang without libomp cannot link it), the kernel is built without it,
  single-threaded (the pragmas are ignored), under its own key, which later processes find
  first;
* where no kernel can be built or loaded (no C compiler, a ``CC`` that is no command line),
  :func:`load` returns None and a ``RuntimeWarning``, once per process, says why and what to
  do.
"""

from __future__ import annotations

import atexit
import array
import ctypes
import hashlib
import os
import platform
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Plan", "plan", "load", "SOURCE", "builds"]

SOURCE = Path(__file__).with_name("cpu_kernel.c")
FLAGS = ["-O3", "-march=native", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno",
         "-fno-trapping-math", "-fno-unswitch-loops", "-fPIC", "-shared"]
#: the start of an entry's trailer (the SHA-256 of the library follows); part of the key
_MAGIC = b"qhfast-kernel-v1"
_TRAILER_SIZE = len(_MAGIC) + 32

_libraries: dict[tuple, ctypes.CDLL | None] = {}
#: what this process has warned about (each once)
_warned: set = set()
#: compilers that failed with -fopenmp in this process
_without_openmp: set[tuple[str, ...]] = set()
#: this process's private cache, where the configured one cannot be used (made on demand)
_private: Path | None = None
_lock = threading.Lock()
#: how many kernel variants this process has compiled or loaded (tests read it)
builds = 0


def load(variant: tuple) -> ctypes.CDLL | None:
    """The compiled kernel for ``variant`` (REAL, PARAM, MODE, STATE, COUNTER): loaded from the
    disk cache or compiled (``$CC``, default ``cc``; about a second); None if it cannot be
    (with a ``RuntimeWarning``, once per process)."""
    if variant not in _libraries:
        with _lock:
            if variant not in _libraries:
                _libraries[variant] = _load(variant)
    return _libraries[variant]


def _load(variant: tuple) -> ctypes.CDLL | None:
    real, param, mode, state, counter = variant
    defines = [f"-DREAL={real}", f"-DPARAM={param}", f"-DMODE={mode}", f"-DSTATE={state}",
               f"-DCOUNTER={counter}"]
    try:
        compiler = tuple(shlex.split(os.environ.get("CC") or "")) or ("cc",)
    except ValueError as error:  # e.g. an unclosed quote
        _warn_unbuilt(f"CC={os.environ.get('CC')!r} is not a command line: {error}")
        return None
    try:
        cache = _cache_dir()
    except OSError as error:  # no private directory either (no writable temporary folder)
        _warn_unbuilt(_cause(error))
        return None
    try:
        library = _load_from(cache, compiler, defines)
    except _FAILURES as error:
        if cache == _private:
            _warn_unbuilt(_cause(error))
            return None
        # the cache may be what failed (a full disk, a file system that runs no code): a
        # private directory next; where the kernel fails there too, the cache was not the cause
        try:
            library = _load_from(_private_dir(), compiler, defines)
        except _FAILURES as again:
            _warn_unbuilt(_cause(again))
            return None
        _warn_private(cache, f"a kernel could not be built or loaded in it ({_cause(error)})")
    global builds
    builds += 1
    return library


#: what a compiler says where it has no OpenMP: macOS's clang ("unsupported option
#: '-fopenmp'"), Linux's clang without libomp ("cannot find -lomp"), a gcc without libgomp
#: ("cannot find -lgomp", "omp.h: No such file")
_OPENMP_FAILURE = re.compile(r"openmp|gomp|libomp|-lomp\b|omp\.h", re.IGNORECASE)
#: what building or loading a kernel raises where it fails (AttributeError: a library without
#: the kernel's functions)
_FAILURES = (OSError, subprocess.CalledProcessError, AttributeError)


def _load_from(directory: Path, compiler: tuple[str, ...], defines: list[str]) -> ctypes.CDLL:
    """The kernel from its entry in ``directory``, built there if it has none. With OpenMP;
    else (a compiler without it: :data:`_OPENMP_FAILURE`) without, single-threaded, under its
    own key, which later processes then find first."""
    with_openmp, without_openmp = (
        directory / f"qhfast_cpu_kernel_{_key(compiler, [*FLAGS, *openmp, *defines])}.so"
        for openmp in (["-fopenmp"], []))
    if _verified(with_openmp):
        path = with_openmp
    elif _verified(without_openmp):  # built by a process that found no OpenMP
        path = without_openmp
    elif compiler in _without_openmp:
        path = _build(compiler, [*FLAGS, *defines], without_openmp)
    else:
        try:
            path = _build(compiler, [*FLAGS, "-fopenmp", *defines], with_openmp)
        except subprocess.CalledProcessError as error:
            # only a failure that names OpenMP: another (a compiler killed for memory) would
            # leave an entry without it that later processes find first, single-threaded
            if not _OPENMP_FAILURE.search(error.stderr or ""):
                raise
            path = _build(compiler, [*FLAGS, *defines], without_openmp)
            _without_openmp.add(compiler)
    library = ctypes.CDLL(str(path))
    _declare(library)
    return library


def _warn_unbuilt(cause: str) -> None:
    _warn("build", f"qhfast could not build its CPU kernel ({cause}), so CPU steps run several "
                   "times slower: on the eager path by default, through torch.compile with "
                   "fused=True (which needs a C++ compiler too). Install a C compiler or set CC "
                   "to one; QHFAST_CPU_KERNEL=0 turns the kernel off, and this warning with it.")


def _key(compiler: tuple[str, ...], options: list[str]) -> str:
    parts = [_MAGIC, SOURCE.read_bytes(), shlex.join([*compiler, *options]).encode(),
             platform.machine().encode(), _cpu_model().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:24]


def _cache_dir() -> Path:
    """The configured cache directory (made if missing, by its real path), or this process's
    private one where it cannot be made or another user could write into it or replace it."""
    configured = os.environ.get("QHFAST_CACHE_DIR")
    directory = Path(configured or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qhfast"))
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory = directory.resolve()  # what is checked is what is used: no link between
        info = directory.stat()
        if not configured and info.st_mode & 0o077 and _unsafe(info, mode=False) is None:
            # the default directory, ours, made by qhfast 0.1.0 under the umask (775 with
            # Ubuntu's 002): closed to others; entries others could have written are rebuilt
            directory.chmod(0o700)
            info = directory.stat()
        problem = _unsafe(info) or _replaceable(directory)
    except OSError as error:
        problem = f"it cannot be made ({error})"
    if problem is None:
        return directory
    _warn_private(directory, problem)
    return _private_dir()


def _replaceable(directory: Path) -> str | None:
    """Why another user could replace ``directory`` (a real path) through a folder above it
    (and so put code in it), or None: each must be owned by root or this user and writable by
    no one else, unless sticky, as /tmp (there only an entry's owner renames or removes it)."""
    if not hasattr(os, "getuid"):
        return None
    for folder in directory.parents:
        info = folder.stat()
        if info.st_uid not in (0, os.getuid()):
            return (f"the folder {folder} above it is owned by another user (uid "
                    f"{info.st_uid}), who could replace it")
        others = 0o002 | (0 if _private_group(info.st_gid) else 0o020)
        if info.st_mode & others and not info.st_mode & stat.S_ISVTX:
            return (f"other users can write to the folder {folder} above it (mode "
                    f"{stat.S_IMODE(info.st_mode):o}), and replace it")
    return None


def _private_group(gid: int) -> bool:
    """Whether group ``gid`` is this user's own ("user private groups", which make Ubuntu's
    umask 002 safe: ``~/.cache`` is then mode 775): the user's primary group, named as the
    user, with no other members."""
    try:
        import grp
        import pwd
        user = pwd.getpwuid(os.getuid())
        group = grp.getgrgid(gid)
    except (ImportError, KeyError):
        return False
    return (gid == user.pw_gid and group.gr_name == user.pw_name
            and set(group.gr_mem) <= {user.pw_name})


def _warn_private(directory: Path, problem: str) -> None:
    _warn(("cache", str(directory)),
          f"qhfast does not use the kernel cache {directory}: {problem}. This process builds its "
          "CPU kernels in a private temporary directory instead (about a second each). Set "
          "QHFAST_CACHE_DIR to a directory that only you can write (mode 700), on a file "
          "system with room that can run code.")


def _private_dir() -> Path:
    """This process's private cache (made on the first call), removed at exit."""
    global _private
    if _private is None:
        _private = Path(tempfile.mkdtemp(prefix="qhfast-"))
        atexit.register(shutil.rmtree, _private, ignore_errors=True)
    return _private


def _unsafe(info: os.stat_result, mode: bool = True) -> str | None:
    """Why another user could have written this file or directory (by its owner, and by its
    mode unless ``mode`` is False), or None."""
    if not hasattr(os, "getuid"):
        return None  # Windows: no POSIX owner and mode
    if info.st_uid != os.getuid():
        return f"it is owned by another user (uid {info.st_uid}), who could put code in it"
    if mode and info.st_mode & 0o022:
        return (f"other users can write to it (mode {stat.S_IMODE(info.st_mode):o}), "
                "and put code in it")
    return None


def _trailer(library: bytes) -> bytes:
    return _MAGIC + hashlib.sha256(library).digest()


def _verified(path: Path) -> bool:
    """Whether ``path`` is a whole entry (its trailer matches) that no other user can have
    written."""
    try:
        with open(path, "rb") as file:
            info, data = os.fstat(file.fileno()), file.read()
    except OSError:
        return False
    library = data[:-_TRAILER_SIZE]
    return bool(library) and data[-_TRAILER_SIZE:] == _trailer(library) and _unsafe(info) is None


def _build(compiler: tuple[str, ...], options: list[str], path: Path) -> Path:
    """Compile the entry ``path`` in a scratch directory beside it and move it there
    atomically. Returns the entry's path."""
    _remove_stale_scratch(path.parent)
    scratch = tempfile.mkdtemp(prefix=_SCRATCH, dir=path.parent)
    try:
        built = Path(scratch) / path.name
        subprocess.run([*compiler, *options, str(SOURCE), "-o", str(built), "-lm"], check=True,
                       capture_output=True, text=True, errors="replace")
        library = built.read_bytes()
        built.write_bytes(library + _trailer(library))
        built.chmod(0o700)  # not writable by others, whatever the umask
        os.replace(built, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


#: the prefix of a build's scratch directory
_SCRATCH = ".build-"


def _remove_stale_scratch(directory: Path) -> None:
    """Remove the scratch directories of builds killed mid-way: those an hour old (a build
    takes seconds)."""
    now = time.time()
    for scratch in directory.glob(_SCRATCH + "*"):
        try:
            if now - scratch.lstat().st_mtime > 3600:
                shutil.rmtree(scratch, ignore_errors=True)
        except OSError:
            pass


def _cause(error: Exception) -> str:
    if isinstance(error, subprocess.CalledProcessError):
        output = (error.stderr or "").strip()
        return (f"{shlex.join(error.cmd[:1])} exited with status {error.returncode}"
                + (f": {output[:500]}" if output else ""))
    return str(error)


def _warn(key: object, message: str) -> None:
    """A RuntimeWarning, once per process and ``key``, pointing at the caller's code (the
    first frame outside qhfast and torch, e.g. ``optimizer.step()``)."""
    if key in _warned:
        return
    _warned.add(key)
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("qhfast",
                                                                                       "torch"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RuntimeWarning, stacklevel=level)


def _cpu_model() -> str:
    """The CPU as -march=native sees it: its model and its instruction-set flags (x86's
    "model name" and "flags", Arm's "Features"), so that a cache shared between machines (a
    network home, VMs of one model name) never loads code built for other instructions."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keys = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    seen = dict.fromkeys(line for line in lines if line.startswith(keys))  # first of each, ordered
    return "\n".join(seen) or platform.processor()


#: the entries of a packed binade table as the kernel reads it (four AVX-512 registers)
_BINADE_ENTRIES = 64


class _CodeMap(ctypes.Structure):
    """The kernel's ``code_map_t``: a ``_quantize.CodeMap``, its steps and first codes packed
    into one table (``binade``: the steps' fp32 bits with the first code in the low 8 bits)."""

    _fields_ = [("values", ctypes.c_void_p), ("bf16_values", ctypes.c_void_p),
                ("binade", ctypes.c_void_p), ("binades", ctypes.c_int32),
                ("below", ctypes.c_float)]


class _CodeMaps:
    """The kernel's ``maps`` argument: the signed and non-negative code maps of 8-bit state
    (``_quantize.CodeMap``s of CPU tensors) as ``code_map_t``s, with the tables they point
    into."""

    def __init__(self, maps: tuple) -> None:
        # a power of two (or 0) has no low mantissa bits: the first code (< 256) goes there;
        # padded to the 64 entries that the kernel's AVX-512 lookup reads whole
        if any(m.binades + 2 > _BINADE_ENTRIES for m in maps):
            raise RuntimeError(f"a code map has more than {_BINADE_ENTRIES - 2} binades, more "
                               "than the C kernel's lookup holds")
        # the values as bf16 too, for the kernel's AVX-512 decoding: exact, or refused
        if any(not torch.equal(m.values.bfloat16().float(), m.values) for m in maps):
            raise RuntimeError("a code map has values that bf16 does not hold exactly, as the "
                               "C kernel's decoding reads them")
        self.tables = [(m.values, m.values.bfloat16(), torch.nn.functional.pad(
            m.steps.view(torch.int32) | m.first_code, (0, _BINADE_ENTRIES - m.binades - 2)))
            for m in maps]
        self.structs = (_CodeMap * 2)(*(
            _CodeMap(values.data_ptr(), bf16_values.data_ptr(), binade.data_ptr(), m.binades,
                     2.0 ** m.binades)
            for (values, bf16_values, binade), m in zip(self.tables, maps)))


def _declare(library: ctypes.CDLL) -> None:
    i64p, d, i, u64 = ctypes.POINTER(ctypes.c_int64), ctypes.c_double, ctypes.c_int, ctypes.c_uint64
    pp = ctypes.c_void_p  # the address of an array of data pointers (_Pointers), or of the maps
    library.qhadam_step.argtypes = [i, i64p, pp, pp, pp, pp, pp, pp, pp, pp, pp, pp,
                                    d, d, d, d, d, d, d, i, d, u64, i]
    library.qhadam_step.restype = None
    library.qhm_step.argtypes = [i, i64p, pp, pp, pp, pp, pp, pp, d, d, d, d, i, d, u64, i]
    library.qhm_step.restype = None


# --------------------------------------------------------------------------------------------
# plans: one bucket's calls

_REAL = {torch.float32: "float", torch.float64: "double", torch.bfloat16: "float",
         torch.float16: "float"}
_PARAM = {torch.float32: 0, torch.float64: 0, torch.bfloat16: 1, torch.float16: 2}
_MODE = {"master": 1, "kahan": 2, "stochastic": 3, "nearest": 4}
_COUNTER = {torch.float64: "double", torch.float32: "float"}
_STATE = {torch.bfloat16: 1, torch.uint8: 2}  # else 0: the compute dtype
_POINTER_CODE = "Q" if ctypes.sizeof(ctypes.c_void_p) == 8 else "I"  # array's code for void *


class _Pointers:
    """An array of the tensors' data pointers (0 for None) for a ``void **`` argument:
    ``address`` is what the kernel gets, valid while this object lives."""

    __slots__ = ("array", "address")

    def __init__(self, tensors: list[Tensor | None]) -> None:
        self.array = array.array(_POINTER_CODE, [0 if t is None else t.data_ptr() for t in tensors])
        self.address = self.array.buffer_info()[0]


def plan(kind: str, tensors: dict[str, list[Tensor | None]], mode: str,
         code_maps: tuple | None = None) -> "Plan | None":
    """A :class:`Plan` of a bucket's tensors, or None where no kernel can be built (no
    compiler: a ``RuntimeWarning``, see :func:`load`). ``code_maps``: where the moments are
    8-bit codes (uint8 ``firsts``), the signed and the non-negative ``_quantize.CodeMap``."""
    params = tensors["params"]
    dtype = params[0].dtype
    low = dtype in (torch.bfloat16, torch.float16)
    weights = tensors.get("weights1") or [None]
    counter = "double" if weights[0] is None else _COUNTER[weights[0].dtype]
    variant = (_REAL[dtype], _PARAM[dtype], _MODE[mode] if low else 0,
               _STATE.get(tensors["firsts"][0].dtype, 0), counter)
    library = load(variant)
    if library is None:
        return None
    random = variant[3] != 0 or (low and mode in ("kahan", "stochastic"))
    return Plan(library, kind, tensors, random, code_maps if variant[3] == 2 else None)


class Plan:
    """One bucket's kernel call (made by :func:`plan`): the pointer arrays of its tensors by
    role (``params``, ``grads``, ``firsts``, ``seconds``, ``extras``: the fp32 master or the
    16-bit compensation, ``weights1``/``weights2``: QHAdam's normalizers, 0-d fp64 or fp32 on
    the CPU; ``scales1``/``scales2``: the moments' block scales where they are 8-bit codes),
    CPU tensors the kernel trusts, each read as one flat run of elements (contiguous, or a
    channels_last param with its gradient and state laid out alike); the gradients' are
    refilled each step."""

    def __init__(self, library: ctypes.CDLL, kind: str, tensors: dict[str, list[Tensor | None]],
                 random: bool, code_maps: tuple | None = None) -> None:
        self.library, self.kind, self.random = library, kind, random
        self.n = len(tensors["params"])
        self.sizes = (ctypes.c_int64 * self.n)(*(p.numel() for p in tensors["params"]))
        self.pointers = {role: _Pointers(values) for role, values in tensors.items()}
        self.maps = None if code_maps is None else _CodeMaps(code_maps)

    def point_to_grads(self, grads: list[Tensor]) -> None:
        """Point the call at the step's gradients (laid out as their params, of the params'
        sizes and dtype: checked by the caller)."""
        self.point_to("grads", grads)

    def point_to(self, role: str, tensors: list[Tensor]) -> None:
        """Point the call's ``role`` at ``tensors`` (laid out as the params, of their sizes
        and dtypes: checked by the caller)."""
        self.pointers[role] = _Pointers(tensors)

    def run(self, hyper: dict[str, float], *, decay: int, maximize: bool,
            grad_scale: float | None, threads: int) -> None:
        """One step: ``hyper`` the floats lr, eps, weight_decay and beta1, beta2, nu1, nu2
        (QHAdam) or momentum, nu (QHM); ``decay`` 0 none, 1 coupled, 2 decoupled (the C
        kernel tells none from the weight decay's value)."""
        factor = -1.0 if maximize else 1.0
        if grad_scale is not None:
            factor /= grad_scale
        seed = _draw_seeds() if self.random else 0
        pointer = {role: pointers.address for role, pointers in self.pointers.items()}
        scales1, scales2, maps = ((pointer["scales1"], pointer["scales2"], self.maps.structs)
                                  if self.maps else (None, None, None))
        if self.kind == "qhadam":
            self.library.qhadam_step(
                self.n, self.sizes, pointer["params"], pointer["grads"], pointer["firsts"],
                pointer["seconds"], scales1, scales2, pointer["extras"], pointer["weights1"],
                pointer["weights2"], maps, hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["nu1"], hyper["nu2"],
                hyper["eps"], hyper["weight_decay"], int(decay == 2), factor, seed, threads)
        else:
            self.library.qhm_step(
                self.n, self.sizes, pointer["params"], pointer["grads"], pointer["firsts"],
                scales1, pointer["extras"], maps, hyper["lr"], hyper["momentum"], hyper["nu"],
                hyper["weight_decay"], int(decay == 2), factor, seed, threads)


def _draw_seeds() -> int:
    """64 random bits from torch's default CPU generator: the kernel's two 32-bit seeds."""
    return int(torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64)) & ((1 << 64) - 1)
