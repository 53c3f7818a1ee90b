"""The kernel's disk cache, tried as a new user would: damaged entries, cache directories
another user can write or nobody can make, no C compiler, a compiler without OpenMP, and
processes building at once (qhfast/kernels/cpu.py).

The scenarios run in fresh interpreters (a kernel loaded into a process stays loaded, and a
damaged one used to crash it) against caches in pytest's tmp_path, never the user's own. Each
interpreter that imports torch costs seconds, so one runs the scenarios of the first three
tests in turn, each with its own caches, and prints what happened as JSON: whether each step
ran on the kernel, and the qhfast warnings.
"""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import qhfast
import qhfast._fused
import qhfast.kernels.cpu as cpu

#: where the imported qhfast lives, for the children
PACKAGE_ROOT = str(Path(qhfast.__file__).resolve().parents[1])
ROOT = hasattr(os, "getuid") and os.getuid() == 0
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
#: the cache directories the child uses in turn (see the test); "foreign" needs root to chown
DIRECTORIES = ["shared", *(["foreign"] if ROOT else []), "unmakeable", "shared", "private"]


@pytest.fixture(scope="module")
def entries(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Whole cache entries of three kernel variants (fp32, fp64 and bf16 parameters), built in
    this process by a default step into a fresh cache: the directory, and each entry's file
    name by dtype."""
    directory = tmp_path_factory.mktemp("built")
    names = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QHFAST_CACHE_DIR", str(directory))
        patch.delenv("CC", raising=False)
        patch.setattr(cpu, "_libraries", {})
        patch.setattr(qhfast._fused, "CPU_KERNEL", True)
        for name, dtype in DTYPES.items():
            before = set(os.listdir(directory))
            params = [torch.ones(3, dtype=dtype, requires_grad=True)]
            params[0].grad = torch.ones_like(params[0])
            qhfast.QHAdam(params).step()
            (names[name],) = set(os.listdir(directory)) - before
    return directory, names


#: the child's code: ``use(cache, compiler)`` sets what a new process would get, ``step(dtype)``
#: makes a few QHAdam steps on the default path and returns the final params and whether the
#: kernel ran, the warnings are recorded
SCENARIOS = """
import json, os, warnings
import torch, qhfast, qhfast._fused
from qhfast.kernels import cpu

caught = []
warnings.simplefilter("always")
warnings.showwarning = lambda message, *rest: caught.append(str(message))

def qhfast_warnings():
    taken = [w for w in caught if "qhfast" in w]
    caught.clear()
    return taken

def use(cache, compiler=None):
    os.environ["QHFAST_CACHE_DIR"] = cache
    os.environ.pop("CC", None)
    if compiler:
        os.environ["CC"] = compiler
    cpu._libraries.clear()  # as in a new process

def step(dtype, steps=1, **options):
    torch.manual_seed(0)
    params = [torch.randn(n, dtype=dtype, requires_grad=True) for n in (7, 300)]
    optimizer = qhfast.QHAdam(params, lr=0.01, nus=(0.7, 1.0), **options)
    for t in range(steps):
        for p in params:
            p.grad = torch.sin(3 * p.detach()) + 0.1 * t
        optimizer.step()
    plans = qhfast._fused._PLANS.get(optimizer)
    return [p.detach() for p in params], bool(plans and plans[0].backend)

def error(a, b):
    return max(float(((x - y).abs().max() / x.abs().max())) for x, y in zip(a, b))

tmp, directories, compiler = {tmp!r}, {directories!r}, {compiler!r}
result = {{}}

use(os.path.join(tmp, "damaged"))
used = [step(dtype)[1] for dtype in (torch.float32, torch.float64, torch.bfloat16)]
result["damaged"] = {{"used": used, "builds": cpu.builds, "warnings": qhfast_warnings()}}

result["directories"] = {{"used": [], "warnings": []}}
for directory in directories:
    use(directory)
    result["directories"]["used"].append(step(torch.float32)[1])
    result["directories"]["warnings"].append(qhfast_warnings())
result["directories"]["private"] = str(cpu._private)

compilers = result["compilers"] = {{}}
expected = step(torch.float64, 5, foreach=False)[0]
use(os.path.join(tmp, "compilers"), "/nonexistent/cc")
fp64, compilers["used_without_compiler"] = step(torch.float64, 5)
compilers["error_without_compiler"] = error(expected, fp64)
compilers["used_fp32_without_compiler"] = step(torch.float32)[1]
compilers["warnings_without_compiler"] = qhfast_warnings()
use(os.path.join(tmp, "compilers"), compiler)
builds = cpu.builds
fp64, compilers["used_without_openmp"] = step(torch.float64, 5)
compilers["builds"] = cpu.builds - builds
compilers["error_without_openmp"] = error(expected, fp64)
compilers["warnings_without_openmp"] = qhfast_warnings()
use(os.path.join(tmp, "compilers"), compiler)
cpu._without_openmp.clear()  # as in a new process
compilers["used_again_without_openmp"] = step(torch.float64)[1]

use(os.path.join(tmp, "full"), compiler.replace("cc-without-openmp", "cc-on-a-full-disk"))
result["full"] = {{"used": step(torch.float32)[1], "warnings": qhfast_warnings()}}

result["flaky"] = {{"used": []}}
for _ in range(2):  # two processes
    use(os.path.join(tmp, "flaky"), compiler.replace("cc-without-openmp", "cc-killed-once"))
    result["flaky"]["used"].append(step(torch.float32)[1])
result["flaky"]["warnings"] = qhfast_warnings()
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def child(entries, tmp_path_factory) -> tuple[dict, Path]:
    """The caches of the three tests below, prepared in a fresh directory, and one interpreter
    run through their scenarios. Returns its results and the directory."""
    built, names = entries
    tmp = tmp_path_factory.mktemp("scenarios")

    # damaged entries: a truncated one (its first 1000 bytes), a garbage and an empty one
    (tmp / "damaged").mkdir(mode=0o700)
    whole = (built / names["float32"]).read_bytes()
    (tmp / "damaged" / names["float32"]).write_bytes(whole[:1000])
    (tmp / "damaged" / names["float64"]).write_bytes(os.urandom(len(whole)))
    (tmp / "damaged" / names["bfloat16"]).write_bytes(b"")

    # cache directories holding a whole entry with another user's code in it: a library that
    # creates the file "ran" when it is loaded
    source, library = tmp / "planted.c", tmp / "planted.so"
    source.write_text('#include <stdio.h>\n__attribute__((constructor)) static void planted(void)'
                      f' {{ fclose(fopen("{tmp / "ran"}", "w")); }}\n')
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    planted = library.read_bytes()
    planted += cpu._trailer(planted)
    for scenario in ("shared", "foreign", "private"):
        (tmp / scenario).mkdir(mode=0o700)
        (tmp / scenario / names["float32"]).write_bytes(planted)
    os.chmod(tmp / "shared", 0o777)
    os.chmod(tmp / "private" / names["float32"], 0o666)
    if ROOT:  # CI runs as root; a user cannot give a directory away
        for path in (tmp / "foreign", tmp / "foreign" / names["float32"]):
            os.chown(path, 65534, 65534)
    (tmp / "file").write_text("")  # a cache dir under it cannot be made, not even by root
    directories = [str(tmp / ("file/cache" if d == "unmakeable" else d)) for d in DIRECTORIES]

    # a compiler that cannot build with -fopenmp, as Linux's clang without libomp (macOS's
    # clang rejects the option), and logs its calls
    compiler = tmp / "cc-without-openmp"
    compiler.write_text(f"""#!/bin/sh
echo "$@" >> "{tmp / "compiler.log"}"
for arg in "$@"; do
    if [ "$arg" = -fopenmp ]; then echo "/usr/bin/ld: cannot find -lomp" >&2; exit 1; fi
done
exec cc "$@"
""")
    compiler.chmod(0o755)
    # a compiler whose first build with -fopenmp is killed (out of memory), and logs its calls
    flaky = tmp / "cc-killed-once"
    flaky.write_text(f"""#!/bin/sh
echo "$@" >> "{tmp / "flaky.log"}"
case "$*" in *-fopenmp*)
    if [ ! -e "{tmp / "killed"}" ]; then
        touch "{tmp / "killed"}"
        echo "cc: fatal error: Killed signal terminated program cc1" >&2; exit 1
    fi;;
esac
exec cc "$@"
""")
    flaky.chmod(0o755)
    # a compiler that fails in one cache directory, as on a full disk
    full = tmp / "cc-on-a-full-disk"
    full.write_text(f"""#!/bin/sh
case "$*" in *{tmp / "full"}/*)
    echo "/usr/bin/ld: final link failed: No space left on device" >&2; exit 1;;
esac
exec cc "$@"
""")
    full.chmod(0o755)

    code = SCENARIOS.format(tmp=str(tmp), directories=directories, compiler=str(compiler))
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("CC", "QHFAST_CPU_KERNEL", "QHFAST_CACHE_DIR")}
    environment["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (done.returncode, done.stderr[-4000:])  # SIGBUS: -7
    return json.loads(done.stdout.splitlines()[-1]), tmp


def test_damaged_entries_are_rebuilt_and_the_step_runs_on_the_kernel(entries, child):
    """A truncated entry (the dynamic loader maps the library past the end of the file: the
    process died of SIGBUS at its first step), a garbage one and an empty one are detected
    before loading and rebuilt in place: each step runs on the kernel, silently, and the cache
    then holds the three whole entries, nothing else."""
    _, names = entries
    result, tmp = child
    assert result["damaged"] == {"used": [True, True, True], "builds": 3, "warnings": []}
    assert sorted(os.listdir(tmp / "damaged")) == sorted(names.values())
    assert all(cpu._verified(tmp / "damaged" / name) for name in names.values())


def test_a_cache_others_can_write_or_nobody_can_make_is_not_used(entries, child):
    """A cache directory that other users can write (mode 777, or owned by another user) holds
    a whole entry with their code in it: it is never loaded (the code does not run); the
    process says so once per directory, naming it and QHFAST_CACHE_DIR, and builds its kernels
    in a private temporary directory, removed at exit. So does a directory that cannot be
    made. In a private directory, an entry that others can write is rebuilt, silently."""
    _, names = entries
    result, tmp = child
    result, name = result["directories"], names["float32"]
    assert result["used"] == [True] * len(DIRECTORIES)
    assert not (tmp / "ran").exists()  # the planted code never ran
    reasons = {"shared": f"{tmp / 'shared'}: other users can write to it (mode 777)",
               "foreign": f"{tmp / 'foreign'}: it is owned by another user (uid 65534)",
               "unmakeable": f"{tmp / 'file' / 'cache'}: it cannot be made ([Errno 20] Not a "
                             "directory"}
    for scenario, caught in zip(DIRECTORIES[:-2], result["warnings"]):
        assert len(caught) == 1, caught
        assert caught[0].startswith(f"qhfast does not use the kernel cache {reasons[scenario]}")
        assert "private temporary directory" in caught[0] and "QHFAST_CACHE_DIR" in caught[0]
    assert result["warnings"][-2:] == [[], []]  # once per directory; nothing for a bad entry
    assert os.listdir(tmp / "shared") == [name]  # the planted entry, not replaced either
    assert cpu._verified(tmp / "private" / name)  # rebuilt: ours, and only we can write it
    assert not Path(result["private"]).exists()
    if not ROOT:
        pytest.skip("a directory owned by another user needs root to chown it; the other "
                    "cases passed")


def test_without_a_compiler_it_warns_once_and_without_openmp_it_builds_single_threaded(child):
    """No compiler (``CC`` names none): one RuntimeWarning per process, naming the cause, what
    the steps do instead and how to fix or silence it; the steps take the eager path. A
    compiler without OpenMP (macOS's clang: it rejects ``-fopenmp``): the kernel is built
    without it and computes the per-tensor trajectory (float64, 1e-12); that is no reason to
    warn."""
    result, tmp = child
    result = result["compilers"]
    (warning,) = result["warnings_without_compiler"]
    assert warning.startswith("qhfast could not build its CPU kernel ([Errno 2] No such file or "
                              "directory: '/nonexistent/cc')")
    for words in ("several times slower", "eager path", "Install a C compiler or set CC",
                  "QHFAST_CPU_KERNEL=0"):
        assert words in warning
    assert not result["used_without_compiler"] and not result["used_fp32_without_compiler"]
    assert result["error_without_compiler"] < 1e-12
    assert result["used_without_openmp"] and result["builds"] == 1
    assert result["error_without_openmp"] < 1e-12
    assert result["warnings_without_openmp"] == []
    calls = (tmp / "compiler.log").read_text().splitlines()
    assert len(calls) == 2 and "-fopenmp" in calls[0].split() and "-fopenmp" not in calls[1].split()
    (entry,) = os.listdir(tmp / "compilers")
    assert cpu._verified(tmp / "compilers" / entry)
    # a new process finds that entry first: no build tried with -fopenmp again
    assert result["used_again_without_openmp"]
    assert len((tmp / "compiler.log").read_text().splitlines()) == 2


def test_a_build_that_fails_once_for_another_reason_than_openmp_keeps_openmp(child):
    """A build with -fopenmp that fails once for a reason of its own (the compiler killed for
    memory) is no compiler without OpenMP: no entry without OpenMP is made, which every later
    process would have found first (single-threaded for good, silently); the next build has
    OpenMP."""
    result, tmp = child
    assert result["flaky"]["used"] == [True, True]
    calls = (tmp / "flaky.log").read_text().splitlines()
    assert calls and all("-fopenmp" in call.split() for call in calls)
    (entry,) = os.listdir(tmp / "flaky")
    assert cpu._verified(tmp / "flaky" / entry)


def test_a_cache_where_the_kernel_cannot_be_built_falls_back_to_a_private_one(child):
    """A cache directory where the build fails (a full disk; a file system that runs no code
    fails at loading) is left, with a warning naming it and the cause, for the private
    directory, where the kernel is built and used: not a warning to install a compiler, and
    the eager path."""
    result, tmp = child
    (warning,) = result["full"]["warnings"]
    assert warning.startswith(f"qhfast does not use the kernel cache {tmp / 'full'}: a kernel "
                              "could not be built or loaded in it (")
    assert "No space left on device" in warning and "private temporary directory" in warning
    assert result["full"]["used"]


def test_processes_building_at_once_all_load_and_leave_one_entry(tmp_path):
    """Four processes build the same variant at the same moment (``torchrun``'s first step;
    here the kernel module alone, without torch): all load it, and the cache holds one whole
    entry and no scratch files."""
    cache, barrier = tmp_path / "cache", tmp_path / "barrier"
    barrier.mkdir()
    code = f"""
import importlib.util, json, os, time
spec = importlib.util.spec_from_file_location("cpu", {cpu.__file__!r})
cpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpu)
open(os.path.join({str(barrier)!r}, str(os.getpid())), "w").close()
deadline = time.monotonic() + 120
while len(os.listdir({str(barrier)!r})) < 4 and time.monotonic() < deadline:
    time.sleep(0.005)
library = cpu.load(("float", 0, 0, 0, "double"))
print(json.dumps({{"loaded": library is not None, "builds": cpu.builds}}))
"""
    environment = {key: value for key, value in os.environ.items() if key != "CC"}
    environment["QHFAST_CACHE_DIR"] = str(cache)
    children = [subprocess.Popen([sys.executable, "-c", code], env=environment, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for _ in range(4)]
    outputs = [process.communicate(timeout=600) for process in children]
    assert [process.returncode for process in children] == [0] * 4, outputs
    assert [json.loads(out) for out, _ in outputs] == [{"loaded": True, "builds": 1}] * 4
    (entry,) = os.listdir(cache)
    assert cpu._verified(cache / entry)


def test_the_default_cache_made_open_by_0_1_0_is_closed_and_a_chosen_one_is_not(tmp_path,
                                                                                monkeypatch):
    """qhfast 0.1.0 made ``~/.cache/qhfast`` under the umask (775 with Ubuntu's 002): the
    default directory, if ours, is set to 700 and used; a group-writable directory the user
    chose (``QHFAST_CACHE_DIR``, perhaps shared on purpose) is left as it is, with a warning,
    and a private directory is used instead."""
    monkeypatch.setattr(cpu, "_warned", set())
    monkeypatch.setattr(cpu, "_private", None)
    default = tmp_path / "xdg" / "qhfast"
    default.mkdir(parents=True)
    default.chmod(0o775)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("QHFAST_CACHE_DIR", raising=False)
    assert cpu._cache_dir() == default and (default.stat().st_mode & 0o777) == 0o700
    chosen = tmp_path / "chosen"
    chosen.mkdir()
    chosen.chmod(0o775)
    monkeypatch.setenv("QHFAST_CACHE_DIR", str(chosen))
    with pytest.warns(RuntimeWarning, match="other users can write to it"):
        private = cpu._cache_dir()
    assert private != chosen and (chosen.stat().st_mode & 0o777) == 0o775
    assert (private.stat().st_mode & 0o777) == 0o700


def test_a_cache_under_a_folder_others_can_write_is_not_used(tmp_path, monkeypatch):
    """Another user can replace a directory of ours (with one holding their code) through a
    folder above it that they can write, unless it is sticky (as /tmp); a link to it is taken
    by its real path. Such a cache is refused with a warning naming the folder, as one they
    could write into is."""
    monkeypatch.setattr(cpu, "_warned", set())
    monkeypatch.setattr(cpu, "_private", None)
    for mode in (0o777, 0o1777):
        shared = tmp_path / f"shared-{mode:o}"
        (shared / "mine").mkdir(parents=True, mode=0o700)
        shared.chmod(mode)
        monkeypatch.setenv("QHFAST_CACHE_DIR", str(shared / "mine"))
        if mode & 0o1000:  # sticky: only the owner of "mine" can rename or remove it
            assert cpu._cache_dir() == shared / "mine"
            continue
        link = tmp_path / "link"
        link.symlink_to(shared / "mine")
        for configured in (shared / "mine", link):
            monkeypatch.setenv("QHFAST_CACHE_DIR", str(configured))
            with pytest.warns(RuntimeWarning, match=(
                    f"does not use the kernel cache {shared / 'mine'}: other users can write "
                    f"to the folder {shared} above it \\(mode 777\\)")):
                private = cpu._cache_dir()
            assert private == cpu._private != shared / "mine"
            cpu._warned.clear()


def test_a_cc_that_is_no_command_line_warns_and_a_blank_one_is_cc(entries, monkeypatch):
    """``CC`` with an unclosed quote raised ValueError from every step; it is a build that
    cannot be made: one warning naming it, and the eager path. A blank ``CC`` is no compiler
    named: ``cc``, as an unset one (it ran "-O3" as the compiler)."""
    directory, _ = entries
    monkeypatch.setattr(cpu, "_warned", set())
    monkeypatch.setenv("QHFAST_CACHE_DIR", str(directory))
    variant = ("float", 0, 0, 0, "double")  # fp32, built by the entries fixture
    monkeypatch.setenv("CC", "/home/o'brien/bin/gcc")
    with pytest.warns(RuntimeWarning, match="could not build its CPU kernel \\(CC=.* is not a "
                                            "command line: No closing quotation\\)"):
        assert cpu._load(variant) is None
    monkeypatch.setenv("CC", "  ")
    builds = cpu.builds
    assert cpu._load(variant) is not None and cpu.builds == builds + 1


def test_scratch_directories_of_killed_builds_are_removed_an_hour_later(tmp_path):
    """A build killed mid-way leaves its scratch directory in the cache; the next build removes
    those an hour old (never one that may be another process's build in progress)."""
    old, recent = tmp_path / ".build-old", tmp_path / ".build-recent"
    for scratch in (old, recent):
        scratch.mkdir()
        (scratch / "partial.so").write_bytes(b"\x7fELF")
    os.utime(old, (os.path.getatime(old), os.path.getmtime(old) - 7200))
    cpu._remove_stale_scratch(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [".build-recent"]


@pytest.mark.parametrize("private", [True, False])
def test_a_group_writable_folder_above_is_taken_where_the_group_is_the_users_own(
        tmp_path, monkeypatch, private):
    """With user private groups (each user's primary group of their own: Ubuntu, Fedora),
    umask 002 makes ~/.cache mode 775, which only the user can write: taken. A folder above
    the cache writable by a group of others is refused."""
    monkeypatch.setattr(cpu, "_warned", set())
    monkeypatch.setattr(cpu, "_private", None)
    monkeypatch.setattr(cpu, "_private_group", lambda gid: private)
    (tmp_path / "cache" / "qhfast").mkdir(parents=True, mode=0o700)
    (tmp_path / "cache").chmod(0o775)
    monkeypatch.setenv("QHFAST_CACHE_DIR", str(tmp_path / "cache" / "qhfast"))
    if private:
        assert cpu._cache_dir() == tmp_path / "cache" / "qhfast"
    else:
        with pytest.warns(RuntimeWarning, match="other users can write to the folder"):
            assert cpu._cache_dir() == cpu._private


def test_a_private_group_is_the_users_primary_one_named_as_the_user_and_no_one_elses(
        monkeypatch):
    import grp
    import pwd

    user = types.SimpleNamespace(pw_name="ana", pw_gid=1000)
    groups = {1000: ("ana", []), 1001: ("staff", []), 1002: ("ana", ["bob"])}
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: user)
    monkeypatch.setattr(grp, "getgrgid", lambda gid: types.SimpleNamespace(
        gr_name=groups[gid][0], gr_mem=groups[gid][1]))
    assert cpu._private_group(1000)
    assert not cpu._private_group(1001)  # another group
    user.pw_gid = 1002
    assert not cpu._private_group(1002)  # a member besides the user
