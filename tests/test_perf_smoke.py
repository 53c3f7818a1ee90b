"""The benchmark runs end to end in a tiny configuration, so it cannot rot unnoticed."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "perf"))

import quality  # noqa: E402


def _rows(table: str) -> dict[str, list[str]]:
    return {
        cells[0]: cells[1:]
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith("| optimizer")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
        if len(cells) == 9 or len(cells) == 5  # the step table and the quality table
    }


def _perf_main():
    """perf/__main__.py as a module (its ``main`` guard not run)."""
    spec = importlib.util.spec_from_file_location("perf_main", ROOT / "perf" / "__main__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_python_m_perf_runs_end_to_end_and_writes_its_block(tmp_path):
    """`python -m perf --quick` (one fused row compiles, a few seconds): the step table with
    exact state and traffic bytes, the quality table, and its block in the output file, which
    replaces the block an earlier run wrote (made here by perf's own ``write_block``, as a run
    writes it, so the test runs perf once) instead of appending."""
    output = tmp_path / "RESULTS.md"
    output.write_text("# results\n\nhand-written analysis stays\n")
    _perf_main().write_block(output, "cpu", "STALE: an earlier run's tables")
    assert output.read_text().count("<!-- python -m perf: cpu: begin") == 1
    command = [sys.executable, "-m", "perf", "--quick", "--only", "QHAdam fp32", "--output", str(output),
               "--plot", str(tmp_path / "q.png")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "round 1/1" in done.stderr  # progress
    rows = _rows(done.stdout)
    # columns: median, p25-p75, /Adam default, /Adam fused, /floor, moved, state, temp
    assert rows["qhfast QHAdam fp32 per-tensor (default)"][5:7] == ["28", "8.00"]
    assert rows["qhfast QHAdam fp32 fused"][5:7] == ["28", "8.00"]
    assert rows["torch Adam fp32 fused"][3] == "1.00"
    assert float(rows["qhfast QHAdam fp32 foreach"][4]) > 0  # a floor ratio was computed
    assert "qhoptim 1.1.0 QHAdam fp32" in rows
    assert sum(name.startswith(("qhfast QHAdamW", "torch AdamW")) for name in rows) == 5  # quality
    text = output.read_text()
    assert text.startswith("# results\n\nhand-written analysis stays\n")
    assert text.count("<!-- python -m perf: cpu: begin") == 1
    assert text.count("<!-- python -m perf: cpu: end -->") == 1
    assert "STALE" not in text
    assert "| qhfast QHAdam fp32 fused |" in text and "Machine: " in text
    assert "Loss curves: " in text and (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"


def test_peak_step_memory_counts_the_temporaries_on_the_cpu():
    """The profiler-based peak sees a step's temporaries: torch's foreach Adam holds a
    denominator list (4 B/param in fp32), the fused kernel none."""
    import step_bench
    import torch

    params = step_bench.make_params(step_bench.transformer_shapes(1, 64), torch.float32, "cpu")
    n = sum(p.numel() for p in params)
    peaks = {}
    for name, flags in (("foreach", dict(foreach=True)), ("fused", dict(fused=True))):
        optimizer = torch.optim.Adam(params, **flags)
        optimizer.step()
        peaks[name] = step_bench.peak_step_bytes(optimizer.step, "cpu")
    assert peaks["foreach"] >= 4 * n
    assert peaks["fused"] < n


def test_quality_runs_end_to_end(capsys, tmp_path):
    assert quality.main(["--steps", "3", "--plot", str(tmp_path / "q.png")]) == 0
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert sum(line.startswith("| qhfast") or line.startswith("| torch") for line in table.splitlines()) == 5


@pytest.fixture
def restore_qhfast_modules():
    """compare.py imports qhfast afresh (the working tree, a git revision) in place of the
    loaded one; put the loaded modules back after the test. Otherwise later tests run a second
    copy of qhfast after compiling the first, and torch 2.15's dynamo fails a guard on the mix
    (``G['__import_qhfast_dot__precision'] is G['precision']``: "Guard failed on the same frame
    it was created")."""
    def loaded():
        return {name: module for name, module in sys.modules.items()
                if name == "qhfast" or name.startswith("qhfast.")}

    saved = loaded()
    yield
    for name in loaded():
        del sys.modules[name]
    sys.modules.update(saved)


def test_compare_runs_end_to_end(capsys, restore_qhfast_modules):
    import compare

    assert compare.main(["--rev", "HEAD", "--blocks", "0", "--rounds", "1", "--steps", "2",
                         "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    for name in ("qhfast@HEAD", "qhfast (working tree)", "torch Adam loop"):
        assert name in out


def test_compile_time_runs_end_to_end(capsys):
    import compile_time

    import qhfast._base

    options = dict(qhfast._base.FUSED_INDUCTOR_OPTIONS)
    assert compile_time.main(["--blocks", "0", "--width", "32", "--inductor-defaults"]) == 0
    assert "inductor defaults: 3 tensors, first step" in capsys.readouterr().out
    assert qhfast._base.FUSED_INDUCTOR_OPTIONS == options  # restored
