"""The benchmark runs end to end in a tiny configuration, so it cannot rot unnoticed."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "perf"))

import quality  # noqa: E402


def _table_rows(table: str) -> list[list[str]]:
    """The body rows of the markdown tables in ``table``, as lists of cells."""
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith("| optimizer")
    ]


def _rows(table: str) -> dict[str, list[str]]:
    """The step table's rows by name (11 cells: the quality tables have 6)."""
    return {cells[0]: cells[1:] for cells in _table_rows(table) if len(cells) == 11}


def _quality_rows(table: str) -> list[list[str]]:
    return [cells for cells in _table_rows(table) if len(cells) == 6]


#: (state, moved) bytes per parameter of each precision variant: QHAdam, QHM (None: no row)
PRECISION_BYTES = {
    "fp32": ((8, 28), (4, 20)),
    "fp32 bf16-state": ((4, 20), None),
    "bf16 master": ((12, 28), (8, 20)),
    "bf16 kahan": ((10, 26), (6, 18)),
    "bf16 kahan+bf16-state": ((6, 18), (4, 14)),
    "bf16 stochastic": ((8, 22), (4, 14)),
    "bf16 stochastic+bf16-state": ((4, 14), (2, 10)),
    "bf16 nearest": ((8, 22), (4, 14)),
    "fp16 master": ((12, 28), (8, 20)),
    "fp16 kahan": ((10, 26), (6, 18)),
    "fp16 kahan+bf16-state": ((6, 18), (4, 14)),
    "fp16 stochastic": ((8, 22), (4, 14)),
    "fp16 stochastic+bf16-state": ((4, 14), (2, 10)),
    "fp16 nearest": ((8, 22), (4, 14)),
}
#: 8-bit moments: the parameter's bytes and its passes (read and written: no master)
EIGHT_BIT_VARIANTS = {"fp32 8bit-state": (4, 2), "bf16 stochastic+8bit-state": (2, 2)}


def _eight_bit_bytes(shapes, tag):
    """(state, moved) bytes per parameter of an 8-bit variant on ``shapes``, QHAdam and QHM:
    a tensor of two or more dimensions and 4096 elements or more keeps each moment in a byte
    per element and an fp32 scale per (started) block of 256, a smaller or 1-D one in fp32; moved is the gradient and the
    parameter passes plus each state tensor read and written (0-d counters left out)."""
    param_bytes, passes = EIGHT_BIT_VARIANTS[tag]
    sizes = [(torch.Size(shape).numel(), len(shape)) for shape in shapes]
    total = sum(n for n, _ in sizes)
    per_moment = sum(n + 4 * -(-n // 256) if n >= 4096 and dims >= 2 else 4 * n
                     for n, dims in sizes) / total
    return tuple((moments * per_moment, param_bytes * (1 + passes) + 2 * moments * per_moment)
                 for moments in (2, 1))


def _perf_main():
    """perf/__main__.py as a module (its ``main`` guard not run)."""
    spec = importlib.util.spec_from_file_location("perf_main", ROOT / "perf" / "__main__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_python_m_perf_runs_end_to_end_and_writes_its_block(tmp_path):
    """`python -m perf --quick --full` (a few seconds): the step table with exact state and
    traffic bytes, both quality tables, and its block in the output file, which a second run
    replaces instead of appending; the quick table (no --full) has its own block, the MLP task
    and the rows a first run needs."""
    output = tmp_path / "RESULTS.md"
    output.write_text("# results\n\nhand-written analysis stays\n")
    # an earlier run's block, as perf writes it (so that perf runs once here)
    _perf_main().write_block(output, "cpu-full", "STALE: an earlier run's tables")
    command = [sys.executable, "-m", "perf", "--quick", "--full", "--only",
               "QHAdam fp32,torch AdamW fp32 fused,",  # (an empty word matches no row)
               "--output", str(output), "--plot", str(tmp_path / "q.png")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "round 1/1" in done.stderr and "s left" in done.stderr  # progress, time left
    assert "Failed to initialize NumPy" not in done.stderr
    rows = _rows(done.stdout)
    # columns: median, p25-p75, /Adam default, /Adam fused, /floor, moved, GB/s,
    # GB/s / fp32's, state, temp
    assert "torch AdamW fp32 fused" in rows and "torch AdamW fp32 foreach" not in rows
    moved_and_state = {name: (cells[5], cells[8]) for name, cells in rows.items()}
    assert moved_and_state["qhfast QHAdam fp32 (default)"] == ("28", "8.00")
    assert moved_and_state["qhfast QHAdam fp32 per-tensor"] == ("28", "8.00")
    assert moved_and_state["qhfast QHAdam fp32 fused"] == ("28", "8.00")
    assert moved_and_state["qhfast QHAdam fp32 bf16-state (default)"] == ("20", "4.00")
    # effective bandwidth: moved bytes over the step, and against the fp32 row of the path
    lean, fp32 = rows["qhfast QHAdam fp32 bf16-state (default)"], rows["qhfast QHAdam fp32 (default)"]
    # (the medians are printed to 0.005 ms, the ratios to 0.005, GB/s to 0.05)
    import step_bench

    numel = sum(torch.Size(shape).numel() for shape in step_bench.transformer_shapes(1, 64))
    lean_ms, fp32_ms = float(lean[0]), float(fp32[0])
    ratio, slack = (20 / lean_ms) / (28 / fp32_ms), 0.005 / lean_ms + 0.005 / fp32_ms
    assert fp32[7] == "-" and abs(float(lean[7]) - ratio) <= 0.005 + ratio * slack
    gbps = 28 * numel / fp32_ms / 1e6
    assert abs(float(fp32[6]) - gbps) <= 0.05 + gbps * 0.005 / fp32_ms
    assert rows["torch Adam fp32 fused"][3] == "1.00"
    assert float(rows["qhfast QHAdam fp32 foreach"][4]) > 0  # a floor ratio was computed
    assert "qhoptim 1.1.0 QHAdam fp32" in rows
    quality_rows = _quality_rows(done.stdout)  # two tasks of 10 rows
    assert [cells[0] for cells in quality_rows] == [name for name, _, _ in
                                                    quality.configurations(quality.MLP)] * 2
    assert [cells[4] for cells in quality_rows if cells[0] == quality.BASELINE] == ["+0.00%"] * 2
    assert "Task `mlp`" in done.stdout and "Task `lm`" in done.stdout
    text = output.read_text()
    assert text.startswith("# results\n\nhand-written analysis stays\n")
    assert text.count("<!-- python -m perf: cpu-full: begin") == 1
    assert text.count("<!-- python -m perf: cpu-full: end -->") == 1
    assert "STALE" not in text
    assert "| qhfast QHAdam fp32 fused |" in text and "Machine: " in text
    assert "Loss curves: " in text and (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"

    quick = subprocess.run(command[:4] + command[7:], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)  # no --full, no --only
    assert quick.returncode == 0, quick.stderr
    names = set(_rows(quick.stdout))
    import step_bench

    assert names == {name for name in step_bench.QUICK_ROWS if name in
                     {row.name for row in step_bench.rows("cpu")}}
    assert "Task `mlp`" in quick.stdout and "Task `lm`" not in quick.stdout
    text = output.read_text()
    assert text.count("<!-- python -m perf: cpu: begin") == 1 and text.count("cpu-full: begin") == 1


def test_a_row_whose_package_is_missing_says_so(monkeypatch):
    """Without qhoptim the qhoptim rows stay in the table, saying how to install it; so do
    the rows of bitsandbytes' and torchao's 8-bit AdamW in the full table."""
    import step_bench

    main_module = _perf_main()
    monkeypatch.setattr(step_bench, "qhoptim_classes", lambda: {})
    monkeypatch.setattr(step_bench, "peer_8bit_classes", lambda: dict.fromkeys(step_bench.PEER_8BIT))
    rows = [row for row in step_bench.rows("cpu", full=True) if row.name.startswith(
        ("qhoptim", "torch Adam fp32", "bitsandbytes", "torchao"))]
    runner = step_bench.Runner(step_bench.transformer_shapes(0, 16), "cpu", steps=1, warmup=0)
    runner.streams = step_bench.StreamBandwidth("cpu", megabytes=1)
    for row in rows:
        runner.measure(row)
    table = "\n".join(main_module.step_table(runner.results, 100))
    assert f"| qhoptim 1.1.0 QHAdam fp32 | {step_bench.MISSING} |" in table
    assert f"| qhoptim 1.1.0 QHM fp32 | {step_bench.MISSING} |" in table
    assert "| bitsandbytes AdamW8bit fp32 | not installed: pip install bitsandbytes |" in table
    assert "| torchao AdamW8bit fp32 | not installed: pip install torchao |" in table


def test_state_bytes_count_subclasses_by_their_tensors_and_shared_tables_once():
    """How the peers hold 8-bit state: torchao as a tensor subclass (counted by the tensors
    inside it, not by its logical shape and dtype), bitsandbytes with a code map that every
    parameter's state shares (held once; read by each parameter's step)."""
    from torch.testing._internal.two_tensor import TwoTensor

    import step_bench

    params = [torch.nn.Parameter(torch.zeros(1000)) for _ in range(2)]
    optimizer = torch.optim.SGD(params, lr=0.1)
    table = torch.zeros(256)
    for p in params:  # a subclass of two fp16 tensors, logically fp16 of 1000 elements
        optimizer.state[p] = {"moment": TwoTensor(torch.zeros(1000, dtype=torch.float16),
                                                  torch.zeros(1000, dtype=torch.float16)),
                              "codes": torch.zeros(1000, dtype=torch.uint8), "table": table}
    expected = (2 * (2 * 2000 + 1000) + 256 * 4) / 2000
    assert step_bench.state_bytes_per_param(optimizer) == expected
    for p in params:
        p.grad = torch.zeros_like(p)
    # read the gradient, read and write the parameter and each state tensor (the table too)
    assert step_bench.traffic_bytes_per_param(optimizer) == pytest.approx(
        4 + 2 * 4 + 2 * (4 + 1) + 2 * 1.024, rel=1e-12)


def test_step_rows_cover_every_precision_mode_with_exact_bytes():
    """Every precision variant has a QHAdam (and, but for fp32 bf16-state, a QHM) row on the
    per-tensor and foreach paths, named after its mode, with the state and moved bytes its
    mode implies: what a mode without a master reads of the parameter, and a Kahan
    compensation's read and write, are counted."""
    import step_bench

    rows = {row.name: row for row in step_bench.rows("cpu", fused=True)}
    fused = [name for name, row in rows.items() if row.once]
    assert len(fused) == 2 * len(step_bench.PRECISION_VARIANTS) - len(step_bench.QHADAM_ONLY) + 1
    assert not any("no-masters" in name for name in rows)
    runner = step_bench.Runner(step_bench.transformer_shapes(1, 64), "cpu", steps=1, warmup=1)
    runner.streams = step_bench.StreamBandwidth("cpu", megabytes=1)  # the floor is not tested here
    for tag, expected in PRECISION_BYTES.items():
        for optimizer, nbytes in zip(("QHAdam", "QHM"), expected):
            for path in ("(default)", "per-tensor", "foreach", "fused"):
                name = f"qhfast {optimizer} {tag} {path}"
                if nbytes is None:
                    assert name not in rows
                    continue
                result = runner.measure(rows[name])
                state, moved = nbytes
                assert abs(result.state_bytes - state) < 0.01, name  # 0-d counters: a little more
                assert result.traffic_bytes == moved, name
    shapes = step_bench.transformer_shapes(1, 64)
    for tag in EIGHT_BIT_VARIANTS:
        for optimizer, (state, moved) in zip(("QHAdam", "QHM"), _eight_bit_bytes(shapes, tag)):
            for path in ("(default)", "per-tensor", "foreach", "fused"):
                name = f"qhfast {optimizer} {tag} {path}"
                result = runner.measure(rows[name])
                assert abs(result.state_bytes - state) < 0.01, name
                assert result.traffic_bytes == pytest.approx(moved, rel=1e-12), name
    assert set(runner.results) >= {f"qhfast QHAdam {tag} foreach"
                                   for tag in [*PRECISION_BYTES, *EIGHT_BIT_VARIANTS]}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_quick_table_has_each_librarys_default_and_fused_rows(device):
    """The first run answers "faster than what I use?" on either device: its rows include
    qhfast's and torch's default paths (the per-tensor loop and qhfast's kernel on the CPU,
    foreach on a GPU: rows named differently) and fused steps, for QHAdam/Adam and QHM/SGD,
    and bf16 with masters. (Only the names are built here: nothing runs on the device.)"""
    import step_bench

    names = {row.name for row in step_bench.rows(device, full=False)}
    default = "(default)" if device == "cpu" else "foreach (default)"
    torch_default = "loop (default)" if device == "cpu" else "foreach (default)"
    assert {f"qhfast QHAdam fp32 {default}", f"qhfast QHM fp32 {default}",
            f"qhfast QHAdam bf16 master {default}", "qhfast QHAdam fp32 fused",
            "qhfast QHM fp32 fused", "qhfast QHAdam bf16 master fused",
            f"torch Adam fp32 {torch_default}", f"torch SGD momentum fp32 {torch_default}",
            "torch Adam fp32 fused", "torch SGD momentum fp32 fused",
            "qhoptim 1.1.0 QHAdam fp32", "qhoptim 1.1.0 QHM fp32"} <= names


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
    """Both tasks by default, a table each, every precision mode a row; --task picks one."""
    assert quality.main(["--steps", "3", "--plot", str(tmp_path / "q.png")]) == 0
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    rows = _quality_rows(table)
    names = [cells[0] for cells in rows]
    assert len(rows) == 20 and names[:10] == names[10:]
    for mode in ("fp32", "bf16 master", "bf16 kahan", "bf16 kahan+bf16-state",
                 "bf16 stochastic+bf16-state", "bf16 nearest", "fp32 8bit-state",
                 "bf16 stochastic+8bit-state"):
        assert f"qhfast QHAdamW {mode}" in names
    assert {"torch AdamW fp32", "torch AdamW bf16"} <= set(names)
    for cells in rows:
        held_out, versus = float(cells[3]), cells[4]
        assert held_out > 0 and versus.endswith("%") and versus[0] in "+-"
    assert quality.main(["--task", "lm", "--steps", "2"]) == 0
    table = capsys.readouterr().out
    assert "Task `lm`" in table and "Task `mlp`" not in table and len(_quality_rows(table)) == 10


def test_the_quality_tasks_bf16_linear_computes_as_a_bf16_gemm():
    """quality.Linear on bf16 weights: output and gradients in bf16, each the float64 result
    of the same bf16 operands rounded to bf16 (a bf16 GEMM sums in fp32: the fp32 sum of 32
    exact products is within a few fp32 ulps of the float64 one, far inside the half bf16 ulp
    the final rounding allows, so at most one bf16 ulp apart); in fp32 it is nn.Linear."""
    import torch

    torch.manual_seed(0)
    layer = quality.Linear(32, 16).to(torch.bfloat16)
    x = torch.randn(8, 32).to(torch.bfloat16).requires_grad_()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    expected = x.detach().double() @ w.T + b
    ulp = expected.abs().clamp(min=1e-3) * 2.0**-7  # a bf16 ulp is at most 2^-7 relative
    assert ((y.double() - expected).abs() <= ulp).all()
    y.float().square().sum().backward()
    assert layer.weight.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    g = 2 * y.detach().double()
    assert ((layer.weight.grad.double() - g.T @ x.detach().double()).abs()
            <= (g.T @ x.detach().double()).abs().clamp(min=1e-2) * 2.0**-7).all()
    fp32 = quality.Linear(32, 16)
    plain = torch.nn.Linear(32, 16)
    plain.load_state_dict(fp32.state_dict())
    assert torch.equal(fp32(x.detach().float()), plain(x.detach().float()))


def test_lm_source_is_learnable_and_its_entropy_is_below_uniform():
    """The language-model task's source: fixed by its seed, and far from uniform (there is
    something to learn), with held-out sequences separate from the training ones."""
    import math

    train, held_out = quality.lm_data(2)
    assert train.shape == (2 * quality.LM_BATCH, quality.CONTEXT + 1)
    assert held_out.shape == (quality.HELD_OUT_SEQUENCES, quality.CONTEXT + 1)
    assert int(train.max()) < quality.VOCAB and int(train.min()) >= 0
    assert not any(bool((held_out == row).all(1).any()) for row in train)
    assert quality.source_entropy() < 0.5 * math.log(quality.VOCAB)
    assert quality.markov_sequences(4, seed=9).equal(quality.markov_sequences(4, seed=9))


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
    import step_bench

    compare_shapes = step_bench.transformer_shapes(0)  # --blocks 0
    assert compare.main(["--rev", "HEAD", "--blocks", "0", "--rounds", "1", "--steps", "2",
                         "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    for name in ("qhfast@HEAD", "qhfast (working tree)", "torch Adam loop"):
        assert name in out
    assert compare.main(["--modes", "--blocks", "0", "--rounds", "1", "--steps", "1",
                         "--warmup", "0"]) == 0
    lines = {line.split(" median ")[0].strip(): line for line in capsys.readouterr().out.splitlines()
             if " median " in line}
    eight_bit = {tag: _eight_bit_bytes(compare_shapes, tag) for tag in EIGHT_BIT_VARIANTS}
    for tag, ((state, moved), _) in [*PRECISION_BYTES.items(), *eight_bit.items()]:
        assert f"state {state:5.2f} B/param   moved {moved:5.2f} B/param" in lines[f"qhfast {tag}"], tag
    assert "/ bf16 master 1.00" in lines["qhfast bf16 master"]
    assert {"torch Adam loop fp32", "torch Adam loop bf16"} <= set(lines)


def test_compile_time_runs_end_to_end(capsys):
    """Both measurements run: the CPU kernel's cold build (one kernel, into a scratch cache)
    and the compiled group step's compile; the module's settings are restored after each."""
    import compile_time

    import qhfast._fused

    options, kernel = dict(qhfast._fused.FUSED_INDUCTOR_OPTIONS), qhfast._fused.CPU_KERNEL
    assert compile_time.main(["--blocks", "0", "--width", "32"]) == 0
    assert "CPU kernel: 3 tensors, first step" in capsys.readouterr().out
    assert compile_time.main(["--blocks", "0", "--width", "32", "--compiled",
                              "--inductor-defaults"]) == 0
    assert "inductor defaults: 3 tensors, first step" in capsys.readouterr().out
    assert qhfast._fused.FUSED_INDUCTOR_OPTIONS == options  # restored
    assert qhfast._fused.CPU_KERNEL == kernel
